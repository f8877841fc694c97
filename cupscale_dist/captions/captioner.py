"""Global and regional captions from a vision-language model (method.md step 6), around one engine or a Ray pool.

:class:`VLMCaptioner` adds what the pipeline needs around an engine (:mod:`cupscale_dist.captions.engines`): the
per-region instruction, a cache by crop hash, the cut to the 77-token CLIP text encoder, and the fallback to the
global prompt when a caption fails. With ``use_ray=True`` the engines live in the actor pool of
:mod:`cupscale_dist.captions.pool`; else one engine runs in this process.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable

from PIL import Image

from ..errors import UserError
from .engines import DEFAULT_MODEL, CaptionEngine, check_model, load_engine

logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Describe this photo in one detailed sentence."
# {position} tells the model where its crop sits, {global_prompt} what the whole photo shows, so a crop of fur
# is described as "the cat's back", not as "a brown carpet" (method.md, regional semantic prior).
DEFAULT_REGION_CONTEXT = (
    "This is the {position} part of a photo of {global_prompt}. "
    "Describe what this part shows in one detailed sentence."
)
# SDXL/SD1.5 text encoders take 77 tokens: start + 75 + end.
CLIP_CONTENT_TOKENS = 75


def region_position(box: tuple[int, int, int, int], size: tuple[int, int]) -> str:
    """Where a box's centre lies in a 3×3 grid of the image: 'top-left', 'top', ..., 'center', ..., 'bottom-right'."""
    (left, top, right, bottom), (width, height) = box, size
    col = min(int(3 * (left + right) / 2 / width), 2)
    row = min(int(3 * (top + bottom) / 2 / height), 2)
    vertical, horizontal = ("top", "", "bottom")[row], ("left", "", "right")[col]
    return "-".join(p for p in (vertical, horizontal) if p) or "center"


def count_clip_tokens(text: str) -> int:
    """A lower bound on CLIP's BPE count (every word and punctuation mark is at least one token).

    Pass the text encoder's own count to `VLMCaptioner(count_tokens=...)` for an exact cut; with this one a
    caption may still run past 75 tokens, and the text encoder drops the tail.
    """
    return len(re.findall(r"\w+|[^\w\s]", text))


def fit_caption(text: str, budget: int, count_tokens: Callable[[str], int] = count_clip_tokens) -> str:
    """The longest word-boundary prefix of `text` that fits `budget` tokens (CLIP's 77 = start + 75 + end)."""
    words = " ".join(text.split()).split(" ")
    while words and count_tokens(" ".join(words)) > budget:
        words.pop()
    return " ".join(words)


def crop_key(crop: Image.Image, instruction: str) -> str:
    """Cache key: the crop's pixels (with size and mode) and the full instruction it was asked with."""
    h = hashlib.sha256()
    h.update(f"{crop.mode}{crop.size}".encode())
    h.update(crop.tobytes())
    h.update(instruction.encode())
    return h.hexdigest()


class VLMCaptioner:
    """Global and regional captions from a vision-language model (method.md step 6).

    Args:
        backend (`str`): 'vllm' or 'transformers' (see the module docstring).
        model (`str`): hub id or local dir of an image-text-to-text model; the paper uses LLaVA-NeXT
            (`DEFAULT_MODEL`). Checked before any actor starts.
        pool_size (`int`, *optional*, defaults to 1): engine actors; crops are split across them in order.
        gpus_per_actor (`float`, *optional*): GPU share per actor (0 where the cluster has none); None = chosen by
            `placement.captioner_share` (a part of a GPU `beside_workers`, else a whole one). vLLM's
            `gpu_memory_utilization` follows it so actors sharing a GPU fit.
        beside_workers (`bool`, *optional*, defaults to True): model workers share the GPUs with this pool.
        placement_timeout_s (`float`, *optional*): how long the pool may wait to be placed (None: the pool's default).
        cpus_per_actor (`float`, *optional*, defaults to 1.0): fractional, so caption actors don't starve the
            other pools (architecture.md, Ray facts).
        max_new_tokens (`int`, *optional*, defaults to 48): generation cap; a caption past the text encoder's
            budget is wasted work.
        token_budget (`int`, *optional*, defaults to 75): CLIP tokens a caption may use (77 minus start/end);
            captions are cut at a word boundary to fit.
        instruction (`str`): the user turn for the global caption.
        region_context (`str`): the user turn for a crop; `{position}` and `{global_prompt}` are filled in.
        timeout_s (`float`, *optional*, defaults to 600): per-call limit in the Ray pool; past it, the regions
            of that call fall back to the global prompt.
        dtype (`str`, *optional*, defaults to "auto"): engine weights dtype ("float32" for CPU tests).
        use_ray (`bool`, *optional*, defaults to True): engines in a Ray actor pool, else one in this process.
        count_tokens (`Callable[[str], int]`, *optional*): the text encoder's token count (e.g. from its CLIP
            tokenizer); defaults to `count_clip_tokens`, a lower bound (one token per word or mark).
    """

    def __init__(self, backend: str, model: str = DEFAULT_MODEL, *, pool_size: int = 1,
                 gpus_per_actor: float | None = None, cpus_per_actor: float = 1.0, max_new_tokens: int = 48,
                 token_budget: int = CLIP_CONTENT_TOKENS, instruction: str = DEFAULT_INSTRUCTION,
                 region_context: str = DEFAULT_REGION_CONTEXT, timeout_s: float = 600.0, dtype: str = "auto",
                 use_ray: bool = True, count_tokens: Callable[[str], int] = count_clip_tokens,
                 beside_workers: bool = True, placement_timeout_s: float | None = None):
        self.check_inputs(backend, model, pool_size, max_new_tokens, token_budget, region_context, timeout_s)
        self.backend, self.model = backend, model
        self.engine_options = {"max_new_tokens": max_new_tokens, "dtype": dtype}
        self.pool_size, self.gpus_per_actor, self.cpus_per_actor = pool_size, gpus_per_actor, cpus_per_actor
        self.beside_workers, self.placement_timeout_s = beside_workers, placement_timeout_s
        self.token_budget, self.count_tokens = token_budget, count_tokens
        self.instruction, self.region_context = instruction, region_context
        self.timeout_s, self.use_ray = timeout_s, use_ray
        self.cache: dict[str, str] = {}  # crop_key -> fitted caption; survives close(), so a rerun is free
        self.stats = {"engine_calls": 0, "crops_sent": 0, "cache_hits": 0, "fallbacks": 0}  # for logs and tests
        self._runner = None  # the pool or in-process engine; started on first use, released by close()

    @staticmethod
    def check_inputs(backend, model, pool_size, max_new_tokens, token_budget, region_context, timeout_s) -> None:
        """All validation, before any engine or actor starts (style.md, "An error message")."""
        for name, value in (("pool_size", pool_size), ("max_new_tokens", max_new_tokens),
                            ("token_budget", token_budget), ("timeout_s", timeout_s)):
            if value <= 0:
                raise UserError(f"captioner {name}={value!r}: must be > 0")
        try:
            region_context.format(position="top-left", global_prompt="a cat")
        except (KeyError, IndexError) as exc:
            raise UserError(f"captioner region_context {region_context!r}: unknown field {exc}; "
                            "only {position} and {global_prompt} are filled in") from None
        check_model(backend, model)

    # -- public API --

    def describe_image(self, image: Image.Image) -> str:
        """The global caption; '' (an unconditional prompt) if the engine fails, logged."""
        return self._caption([image], [self.instruction], fallback="")[0]

    def describe_regions(self, image: Image.Image, boxes: list[tuple[int, int, int, int]],
                         global_prompt: str) -> list[str]:
        """One prompt per box (left, top, right, bottom px), in box order; a failed one is `global_prompt`."""
        crops = [image.crop(tuple(int(v) for v in box)) for box in boxes]
        instructions = [self.region_context.format(position=region_position(box, image.size),
                                                   global_prompt=global_prompt) for box in boxes]
        return self._caption(crops, instructions, fallback=global_prompt)

    def close(self) -> None:
        """Release the engines (the actor pool's GPU memory goes back to the UNet); the cache stays."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    # -- internals --

    def _caption(self, crops: list[Image.Image], instructions: list[str], fallback: str) -> list[str]:
        """Cache lookups, one engine batch for the misses, cut to the budget, fallback per failed crop."""
        keys = [crop_key(crop, text) for crop, text in zip(crops, instructions)]
        first: dict[str, int] = {}  # key -> its first crop: a crop repeated within the call is asked once
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        todo = [i for key, i in first.items() if key not in self.cache]
        self.stats["cache_hits"] += len(keys) - len(todo)
        if todo:
            self.stats["engine_calls"] += 1
            self.stats["crops_sent"] += len(todo)
            answers = self._run([crops[i] for i in todo], [instructions[i] for i in todo])
            for i, caption in zip(todo, answers):
                caption = fit_caption(caption, self.token_budget, self.count_tokens) if caption else ""
                if caption:  # failures are not cached: the next stage asks again
                    self.cache[keys[i]] = caption
        out = []
        for i, key in enumerate(keys):
            if key not in self.cache:
                self.stats["fallbacks"] += 1
                logger.warning("captioner: crop %d got no caption; using the fallback prompt %r", i, fallback)
            out.append(self.cache.get(key, fallback))
        return out

    def _run(self, crops: list[Image.Image], instructions: list[str]) -> list[str | None]:
        """Captions from the engine(s); None where a call failed or timed out (already logged)."""
        if self._runner is None:
            self._runner = self._start()
        return self._runner.caption(crops, instructions, timeout_s=self.timeout_s)

    def _start(self):
        if self.use_ray:
            from cupscale_dist.captions.pool import CaptionerPool

            from ..execution.raycluster import ClusterOptions, connect

            # `cupscale caption` and `upscale --actors 0` have no Ray yet: RAY_ADDRESS or local
            connect(ClusterOptions())

            return CaptionerPool(self.backend, self.model, pool_size=self.pool_size,
                                 gpus_per_actor=self.gpus_per_actor, cpus_per_actor=self.cpus_per_actor,
                                 engine_options=self.engine_options, beside_workers=self.beside_workers,
                                 placement_timeout_s=self.placement_timeout_s)
        return InProcessRunner(load_engine(self.backend, self.model, **self.engine_options))


class InProcessRunner:
    """One engine in this process (no Ray); same `caption`/`close` contract as
    `cupscale_dist.captions.pool.CaptionerPool`.

    `timeout_s` is not enforced here: a Python thread can't be stopped, so a hung engine would leak it.
    """

    def __init__(self, engine: CaptionEngine):
        self.engine = engine

    def caption(self, crops: list[Image.Image], instructions: list[str], timeout_s: float) -> list[str | None]:
        try:
            return self.engine.generate(crops, instructions)
        except Exception:
            logger.warning("captioner: engine failed on %d crops", len(crops), exc_info=True)
            return [None] * len(crops)

    def close(self) -> None:
        self.engine = None
