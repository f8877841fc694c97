"""`cupscale eval`: how good is an upscale? Downscale high-resolution originals by the scale, upscale them back,
compare.

Per image and overall (issue #10):
- ``psnr`` / ``ssim``: the upscale against the original (RGB; SSIM with an 11-tap Gaussian window, Wang et al. 2004);
- ``consistency``: PSNR of the upscale downscaled back to the input's size against the input (does it keep what the
  input says? the global prior's job);
- ``detail``: high-frequency energy of the upscale over bicubic's (``detail_original`` gives the original's, the
  detail there is to find): above 1 = sharper than bicubic;
- ``seam``: gradient energy across the views' boundary lines over gradient energy across every other line of the
  output's pixel grid (the latent grid's lines), divided by the same ratio for bicubic's upscale; 1 = the boundaries
  look as they do in bicubic's, above 1 = seams;
- side-by-side crops (bicubic | ours | original) as PNG.

With ``--inception`` / ``--clip`` it adds FID, KID, IS (whole images and crops) and CLIP score
(:mod:`cupscale_dist.quality.distribution`, the ``[metrics]`` extra).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import UpscaleConfig
from ..errors import UserError
from ..pipeline import upscale
from ..plan import Plan, check_inputs
from .image_metrics import gaussian_blur, high_frequency_energy, luminance, psnr, seam_score, ssim

HELD_OUT = "held-out"  # eval's default originals: the demo model's held-out photos (never seen in training)
SIZE_STEP = 32  # originals are centre-cropped to a multiple of 32 x scale, so every stage is a multiple of 64 px
CROP_PX = 128  # side of each side-by-side crop, in output pixels
REPORT_NAME = "eval.json"  # the report's file name in --out
NAME_HASH_CHARS = 8  # hex digits of the path hash that tells apart originals with the same file name


def view_boundaries(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Every stage's view edges, in the output's pixel grid: (columns, rows) where a view starts or ends."""
    factor = plan.vae_scale_factor
    out_w, out_h = plan.stages[-1].size
    columns, rows = set(), set()
    for stage in plan.stages:
        width, height = stage.size
        columns |= {round(v * factor * out_w / width) for v in np.unique(stage.views[:, [1, 3]])}
        rows |= {round(v * factor * out_h / height) for v in np.unique(stage.views[:, [0, 2]])}
    inner = lambda lines, end: np.array(sorted(v for v in lines if 0 < v < end), dtype=np.int64)  # noqa: E731
    return inner(columns, out_w), inner(rows, out_h)


# ---------------------------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------------------------
def prepare_pair(original: Image.Image, scale: int) -> tuple[Image.Image, Image.Image]:
    """(original centre-cropped to a multiple of 32 x scale, its bicubic downscale by ``scale``: the input)."""
    step = SIZE_STEP * scale
    width, height = (original.width // step) * step, (original.height // step) * step
    if width == 0 or height == 0:
        raise UserError(f"an original of {original.width}x{original.height} is too small to evaluate at x{scale}; "
                        f"give originals of at least {step}x{step} px")
    left, top = (original.width - width) // 2, (original.height - height) // 2
    cropped = original.convert("RGB").crop((left, top, left + width, top + height))
    return cropped, cropped.resize((width // scale, height // scale), Image.Resampling.BICUBIC)


def busiest_crop(image: Image.Image, side: int) -> tuple[int, int, int, int]:
    """The ``side``-px square with the most detail in the original (where an upscaler has something to show)."""
    side = min(side, image.width, image.height)
    y = luminance(image)
    energy = np.abs(y - gaussian_blur(torch.from_numpy(y)[None], 2.0, 6)[0].numpy())
    best, box = -1.0, (0, 0, side, side)
    for top in range(0, image.height - side + 1, max(1, side // 2)):
        for left in range(0, image.width - side + 1, max(1, side // 2)):
            value = float(energy[top : top + side, left : left + side].mean())
            if value > best:
                best, box = value, (left, top, left + side, top + side)
    return box


def side_by_side(images: list[Image.Image], box: tuple[int, int, int, int], gap: int = 4) -> Image.Image:
    """The same crop of each image, left to right, on white."""
    crops = [im.crop(box) for im in images]
    width = sum(c.width for c in crops) + gap * (len(crops) - 1)
    sheet = Image.new("RGB", (width, crops[0].height), "white")
    for i, crop in enumerate(crops):
        sheet.paste(crop, (i * (crop.width + gap), 0))
    return sheet


def image_figures(original: Image.Image, low: Image.Image, ours: Image.Image, bicubic: Image.Image,
                  boundaries: tuple[np.ndarray, np.ndarray], period: int = 1) -> dict[str, float]:
    """Every per-image figure of the module docstring."""
    back = ours.resize(low.size, Image.Resampling.BICUBIC)
    hf_bicubic = high_frequency_energy(bicubic)
    return {
        "psnr": psnr(ours, original), "ssim": ssim(ours, original),
        "psnr_bicubic": psnr(bicubic, original), "ssim_bicubic": ssim(bicubic, original),
        "consistency": psnr(back, low),
        "detail": high_frequency_energy(ours) / hf_bicubic,
        "detail_original": high_frequency_energy(original) / hf_bicubic,
        "seam": seam_score(ours, bicubic, *boundaries, period),
    }


def evaluate_image(name: str, original: Image.Image, config: UpscaleConfig, executor, *,
                   outputs: tuple[Path, Path] | None = None, overwrite: bool = False, progress: bool = False) -> dict:
    """Downscale ``original`` by ``config.scale``, upscale it back on ``executor``, and measure; ``outputs``: where
    the side-by-side sheet and the upscale go (:func:`output_paths`)."""
    original, low = prepare_pair(original, config.scale)
    plan = check_inputs(low.size, config, executor.spec)
    ours = upscale(low, config, executor=executor, plan=plan, progress=progress)
    bicubic = low.resize(original.size, Image.Resampling.BICUBIC)
    figures = image_figures(original, low, ours, bicubic, view_boundaries(plan), plan.vae_scale_factor)
    row = {"image": name, "input": list(low.size), "output": list(ours.size), **figures}
    if outputs is not None:
        sheet_path, ours_path = outputs
        sheet = side_by_side([bicubic, ours, original], busiest_crop(original, CROP_PX))
        write_output(sheet_path, png_bytes(sheet), overwrite)
        write_output(ours_path, png_bytes(ours), overwrite)
        row["side_by_side"] = str(sheet_path)
    return {"row": row, "original": original, "ours": ours}


# ---------------------------------------------------------------------------------------------------------------
# --out: checked before any work, every file written whole, nothing replaced without overwrite
# ---------------------------------------------------------------------------------------------------------------
def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """``--out`` before any work: a folder, or one that can be created, that takes new files (proved by creating
    one: permission bits don't, see :func:`cupscale_dist.files.imageio.check_output_path`). Folders created for the
    proof are removed again, so a run refused later leaves nothing behind."""
    out = Path(os.path.expanduser(out_dir))  # Path.expanduser raises for '~name' of no user
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for {REPORT_NAME}, the upscales and the side-by-side "
                        "crops")
    created = []
    try:
        for folder in [*reversed(out.parents), out]:
            if not folder.is_dir():
                folder.mkdir()
                created.append(folder)
        fd, probe = tempfile.mkstemp(prefix=".eval-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"--out {out}: can't write there ({exc.strerror or exc}); choose another folder") from None
    finally:
        for folder in reversed(created):
            folder.rmdir()
    return out


def output_stems(names: list[str]) -> list[str]:
    """An output file stem per original: its file name's stem, plus a short hash of its path where two originals
    share a stem (compared case-insensitively, as macOS and Windows do), so neither overwrites the other."""
    stems = [Path(name).stem for name in names]
    counts = Counter(stem.casefold() for stem in stems)
    keys = [str(Path(name).resolve()) if Path(name).exists() else name for name in names]
    unique = [stem if counts[stem.casefold()] == 1 else
              f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:NAME_HASH_CHARS]}" for stem, key in zip(stems, keys)]
    taken = Counter(stem.casefold() for stem in unique)
    repeated = [name for name, stem in zip(names, unique) if taken[stem.casefold()] > 1]  # the same path twice
    if repeated:
        raise UserError(f"original {repeated[0]} is given more than once; give each original once")
    return unique


def output_paths(names: list[str], scale: int, out: Path, overwrite: bool) -> tuple[list[tuple[Path, Path]], Path]:
    """(sheet, upscale) per original and the report's path in ``out``; one UserError, before any work, if one of
    them exists without ``overwrite``, is a folder, or is one of the originals (never replaced, even with
    ``overwrite``)."""
    pairs = [(out / f"{stem}-x{scale}.png", out / f"{stem}-x{scale}-ours.png") for stem in output_stems(names)]
    report = out / REPORT_NAME
    inputs = {(stat.st_dev, stat.st_ino) for stat in (Path(name).stat() for name in names if Path(name).is_file())}
    for path in [report, *(p for pair in pairs for p in pair)]:
        if not path.exists():
            continue
        stat = path.stat()
        if (stat.st_dev, stat.st_ino) in inputs:  # the same file, whatever its name or link
            raise UserError(f"--out: {path} is one of the originals; an input is never overwritten: choose another "
                            "--out folder")
        if path.is_dir():
            raise UserError(f"--out: {path} is a folder; remove it or choose another --out folder")
        if not overwrite:
            raise UserError(f"--out: {path} already exists; pass --overwrite or choose another --out folder")
    return pairs, report


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PIL's ``image.save(path.png)`` encodes it."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_output(path: Path, data: bytes, overwrite: bool) -> None:
    """``data`` as ``path``, whole or not at all (a temp file beside it, then one rename); without ``overwrite`` the
    name is claimed exclusively, so a file that appeared while the run worked is not replaced either."""
    from ..files.imageio import place, temp_beside

    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_beside(path)
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        place(temp, path, overwrite)
    finally:
        temp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# A set of images
# ---------------------------------------------------------------------------------------------------------------
FIGURES = ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic", "consistency", "detail", "detail_original", "seam")


def held_out_originals() -> list[tuple[str, Image.Image, str]]:
    """The demo model's held-out photos with their hand-written captions as prompts, from the pip packages."""
    from ..demo.photos import HELD_OUT as NAMES, load_photo, photo

    try:
        return [(name, Image.fromarray(load_photo(name)), photo(name).caption) for name in NAMES]
    except ImportError as exc:
        raise UserError(f"the held-out photos come from scikit-image ({exc.name} is missing); "
                        "`pip install scikit-image scikit-learn`, or pass your own originals") from None


def evaluate(originals: list[tuple], config: UpscaleConfig, *, out_dir: str | Path | None = None,
             worker=None, progress: bool = True, inception: str | None = None, clip: str | None = None,
             crops_per_image: int = 10, overwrite: bool = False) -> dict:
    """Evaluate ``config`` on every original ``(name, image[, prompt])`` (a prompt replaces ``config.prompt`` for
    that image); returns ``{"model", "scale", "config_hash", "images": [rows], "overall": {figure: mean}}``.
    ``worker``: an already loaded in-process ``ModelWorker`` (else one is loaded for ``config``). ``out_dir``: where
    the report, upscales and sheets go, checked first (:func:`output_paths`); ``overwrite`` replaces earlier ones."""
    from ..execution.executor import LocalExecutor, open_executor

    outputs, report_path = [None] * len(originals), None
    if out_dir:  # every output name is checked now: nothing is found taken (or an input) after the work
        out = check_out_dir(out_dir)
        outputs, report_path = output_paths([name for name, *_ in originals], config.scale, out, overwrite)
    if inception or clip:
        from .distribution import check_metric_sources

        check_metric_sources(inception, clip)  # before any upscaling
    for _, original, *_ in originals:
        prepare_pair(original, config.scale)  # too small -> one line before any model loads
    executor = LocalExecutor(worker, config.view_batch_size, keep=True) if worker else open_executor(config, keep=True)
    prompts = [prompt[0] if prompt else config.prompt for _, _, *prompt in originals]
    try:
        results = [evaluate_image(name, original, replace(config, prompt=prompt), executor, outputs=paths,
                                  overwrite=overwrite, progress=progress)
                   for (name, original, *_), prompt, paths in zip(originals, prompts, outputs)]
    finally:
        executor.release()
    rows = [{**r["row"], "prompt": prompt} for r, prompt in zip(results, prompts)]
    overall = {k: float(np.mean([r[k] for r in rows])) for k in FIGURES}
    if inception or clip:
        from .distribution import distribution_metrics

        overall.update(distribution_metrics([r["original"] for r in results], [r["ours"] for r in results], prompts,
                                            inception=inception, clip=clip, crops_per_image=crops_per_image,
                                            seed=config.seed))
    report = {"model": config.model, "scale": config.scale, "config_hash": config.config_hash(), "images": rows,
              "overall": overall}
    if report_path is not None:
        write_output(report_path, (json.dumps(report, indent=1) + "\n").encode("utf-8"), overwrite)
    return report


def format_table(report: dict) -> str:
    """A small plain-text table: one line per image, then the mean."""
    shown = ("psnr", "psnr_bicubic", "ssim", "ssim_bicubic", "consistency", "detail", "seam")
    lines = [f"{'image':<24}" + "".join(f"{k:>14}" for k in shown)]
    for row in [*report["images"], {"image": "overall", **report["overall"]}]:
        lines.append(f"{row['image']:<24}" + "".join(f"{row[k]:>14.4f}" for k in shown))
    extra = {k: v for k, v in report["overall"].items() if k not in FIGURES}
    if extra:
        lines.append("  ".join(f"{k}={v:.4f}" for k, v in extra.items()))
    return "\n".join(lines)
