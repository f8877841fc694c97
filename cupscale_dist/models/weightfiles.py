"""Reading a user's weight file (an upscale model, a single-file checkpoint, LoRA tensors, FID weights): nothing in it
runs, every walk over what it holds is bounded, and every weight is a finite number.

- Code never runs: a pickled file (``.pth``/``.ckpt``/``.pt``) is read by ``torch.load(weights_only=True)`` only,
  and a TorchScript archive is refused by its zip entry names before torch opens it (:func:`refuse_code_archive`):
  ``torch.load`` without weights-only mode hands such an archive to ``torch.jit.load``, which runs its code.
- Walks are bounded: a pickle may hold a dict that contains itself (memo references make cycles cheap to write), so
  unwrapping ``state_dict`` entries stops at :data:`MAX_NESTING` levels and names a cycle; a state dict has at most
  :data:`MAX_ENTRIES` entries.
- Weights are finite: NaN or inf in a LoRA or upscale model turns every output pixel into NaN (a black image with
  exit 0), so they are refused when the file is checked (:func:`check_finite`).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import UserError, shown

ZIP_MAGIC = b"PK\x03\x04"  # what torch.load tests (serialization._is_zipfile) to read a file as a zip archive
TORCHSCRIPT_ENTRIES = ("constants.pkl", "code/")  # entries torch.jit.save writes and torch.save never does
MAX_NESTING = 8  # real checkpoints wrap their weights in 1-2 'state_dict' levels; deeper is a crafted file
MAX_ENTRIES = 100_000  # tensors in one file: a full SDXL checkpoint with an EMA copy has under 6,000
FIX = "pass a .safetensors file"  # the fix a message names unless its caller knows a better one


def refuse_code_archive(path: str | Path, what: str, fix: str = FIX, script_fix: str | None = None) -> None:
    """One UserError if ``path`` is a zip archive that holds TorchScript code (its fix ``script_fix``, by default:
    pass the weights), or a zip whose entries can't be listed (its fix ``fix``).

    Read with :mod:`zipfile` (names only, nothing extracted) before torch sees the file: torch reads a file that
    starts with the zip magic as an archive, so one that Python can't list is refused too.
    """
    with open(path, "rb") as handle:
        if handle.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            return  # a legacy (pre-1.6) pickle file: torch does not treat it as an archive
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception as exc:  # noqa: BLE001 - BadZipFile, NotImplementedError (a version byte), EOFError, ...
        raise UserError(f"{what}: not a readable weights archive ({type(exc).__name__}); {fix}") from None
    for name in names:
        inner = name.split("/", 1)[-1]  # entries live under the archive's own folder name
        if inner == TORCHSCRIPT_ENTRIES[0] or inner.startswith(TORCHSCRIPT_ENTRIES[1]):
            raise UserError(f"{what}: is a TorchScript archive (it holds {shown(name, 80)}), which would run code when "
                            "loaded; " + (script_fix or "pass the model's weights as .safetensors (or a plain "
                                                        "torch.save'd state dict)"))


def load_pickled(path: str | Path, what: str, *, mmap: bool = False, fix: str = FIX) -> object:
    """A ``.pth``/``.ckpt``/``.pt`` file's content, read as tensors and plain containers only (no code runs)."""
    import torch

    refuse_code_archive(path, what, fix)
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated, pickled-code or foreign file: one line either way
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what}: not a readable weights file ({type(exc).__name__}: {reason}); {fix}") from None


def unwrap_state_dict(content: object, what: str, key: str = "state_dict", fix: str = FIX) -> dict:
    """``content`` with its ``key`` wrappers taken off (``{"state_dict": {"state_dict": weights}}`` -> weights),
    at most :data:`MAX_NESTING` of them, a cycle named; refused unless a dict of at most :data:`MAX_ENTRIES` entries."""
    seen: set[int] = set()
    for _ in range(MAX_NESTING + 1):
        if not (isinstance(content, dict) and key in content):
            break
        if id(content) in seen:  # a dict that contains itself: unwrapping would never end
            raise UserError(f"{what}: its {key!r} entries form a cycle (a dict that contains itself), which no "
                            f"checkpoint has; {fix}")
        seen.add(id(content))
        content = content[key]
    else:
        raise UserError(f"{what}: {key!r} is nested more than {MAX_NESTING} levels deep, which no checkpoint is; "
                        f"{fix}")
    return check_entry_count(content, what, fix)


def check_entry_count(content: object, what: str, fix: str = FIX) -> dict:
    """``content`` if it is a dict of at most :data:`MAX_ENTRIES` entries, else one UserError."""
    if not isinstance(content, dict):
        raise UserError(f"{what}: holds a {type(content).__name__}, not a state dict of named tensors; {fix}")
    if len(content) > MAX_ENTRIES:
        raise UserError(f"{what}: holds {len(content)} entries, over the {MAX_ENTRIES} a model has; {fix}")
    return content


def plain_state_dict(content: object, what: str, fix: str = FIX) -> dict:
    """``content`` if it is a plain state dict: a bounded dict of name -> tensor, nothing else."""
    import torch

    state = check_entry_count(content, what, fix)
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            shown = f"{type(name).__name__} {str(name)[:40]!r} -> {type(value).__name__}"
            raise UserError(f"{what}: not a plain state dict (it holds {shown}); {fix}")
    return state


def check_finite(tensors: Iterable[tuple[str, object]], what: str, fix: str = "use another file") -> None:
    """One UserError naming the first (name, tensor) pair of ``tensors`` with a NaN or an infinite value."""
    import torch

    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
            raise UserError(f"{what}: weight {name} holds {bad} values (a broken export or training run); {fix}")


def safetensors_tensors(path: str | Path) -> Iterable[tuple[str, object]]:
    """(name, tensor) of a safetensors file one at a time, on CPU (at most one tensor in memory)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - a safetensors handle: keys() is its only listing
            yield name, handle.get_tensor(name)


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # safetensors' names of what a weight may be


def safetensors_dtypes(path: str) -> dict[str, str]:
    """Key -> dtype name ('F32', 'I64', ...) of a safetensors file, from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_slice(key).get_dtype() for key in handle.keys()}  # noqa: SIM118


def dtype_problem(dtypes: dict[str, str]) -> str | None:
    """Why a weight file's tensors (key -> safetensors dtype) can't be weights: integers or booleans, or None."""
    bad = sorted(key for key, dtype in dtypes.items() if dtype not in FLOAT_DTYPES)
    if bad:
        return f"holds {len(bad)} non-float tensor(s) (e.g. {shown(bad[0])} of {dtypes[bad[0]]}), which no weight is"
    return None


def safetensors_header(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a safetensors file, from its header alone (no tensor is read); at most
    :data:`~cupscale_dist.models.weightfiles.MAX_ENTRIES` keys."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = f.keys()
        if len(keys) > MAX_ENTRIES:  # a header of tiny entries: bound the walks over its keys
            raise UserError(f"{path}: holds {len(keys)} tensors, over the {MAX_ENTRIES} a model has; not a model file")
        return {key: tuple(f.get_slice(key).get_shape()) for key in keys}


def checkpoint_keys(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint without reading its tensors (header only; a .ckpt is memory-mapped, read as
    tensors and plain containers only, its ``state_dict`` wrappers unwrapped a bounded number of times)."""
    path = str(path)
    what = f"--model {path}"
    try:
        if path.lower().endswith(".safetensors"):
            return safetensors_header(path)
        import torch

        fix = "pass a .safetensors file of an SDXL, SD1.5 or Flux.1 model, or a diffusers directory"
        state = unwrap_state_dict(load_pickled(path, what, mmap=True, fix=fix), what, fix=fix)
        return {key: tuple(value.shape) for key, value in state.items()
                if isinstance(key, str) and isinstance(value, torch.Tensor)}
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: one line either way
        raise UserError(f"--model {path}: not a readable checkpoint ({type(exc).__name__}); pass a .safetensors "
                        "file of an SDXL, SD1.5 or Flux.1 model, or a diffusers directory") from None
