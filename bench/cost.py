"""Cost per image (issue 20), side by side in one run: what each mode costs in UNet evaluations, modelled H100
seconds, CPU wall time on the demo model, worker memory and compile speed-up.

    PYTHONPATH=$PWD python bench/cost.py > cost.json                  # ~5 min on 2 cores; progress on stderr
    PYTHONPATH=$PWD python bench/cost.py --full-size > cost.json      # + peak RSS of full-size SDXL workers (~10 min,
                                                                      #   ~20 GB temporary disk, ~13 GB RAM)

1. Plans, 1024 px in, x2/x4/x8/x16 out, for the SDXL presets (default, guidance 1, fast, lightning): UNet evaluations
   (CFG counted twice) and modelled one-H100 seconds at the measured bare rate of 1024-px tiles (architecture.md:
   56.8 evaluations/s). No model is loaded.
2. CPU wall time of a real upscale on the demo model in the same four modes (no LoRA: the demo has none; the modes'
   scheduler, steps, strength and guidance, the default being SDXL's 30 steps at strength 0.6), as ratios.
3. ``weights: full`` vs ``fp8`` on the demo model: PSNR of the fp8 picture against the full one, and that they differ.
4. Compile: demo-model view predictions per second, eager vs regional compilation, after a warm-up.
5. ``--full-size``: peak RSS (VmHWM) of a process holding a full-size SDXL ``ModelWorker`` (random weights in the
   hub's layout, ``cupscale_dist.testing.fullsize``) with ``weights: full`` vs ``fp8``, both bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, log, rounded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
H100_EVALUATIONS_PER_S = 56.8  # bare batched SDXL UNet, 1024-px tiles, bf16 (architecture.md's anchor)
MODES = {  # each a change from the preset of its size
    "default": {},
    "guidance_1": {"guidance_scale": 1.0},
    "fast": "fast",
    "lightning": "lightning",
}
DEMO_MODES = {  # the SDXL presets' schedules on the demo model (it has no distilled LoRA; cpu-demo's own 5 steps
    # would hide what the step counts change)
    "default": {"steps": 30, "strength": 0.6},
    "guidance_1": {"steps": 30, "strength": 0.6, "guidance_scale": 1.0},
    "fast": {"scheduler": "ddim", "timestep_spacing": "trailing", "steps": 8, "strength": 0.5},
    "lightning": {"scheduler": "euler", "timestep_spacing": "trailing", "steps": 4, "strength": 0.6,
                  "guidance_scale": 1.0},
}


def preset_config(scale: int, mode: str):
    from cupscale_dist import UpscaleConfig

    size = {2: "2k", 4: "4k", 8: "8k", 16: "16k"}[scale]
    change = MODES[mode]
    if isinstance(change, str):  # the few-step presets exist for 4K-16K; at 2K the 4K one at scale 2
        name = f"sdxl-{size}-{change}" if scale > 2 else f"sdxl-4k-{change}"
        return UpscaleConfig.load(name, scale=scale)
    return UpscaleConfig.load(f"sdxl-{size}", **change)


def plans() -> dict:
    from cupscale_dist.plan import make_plan

    rows = {}
    for scale in (2, 4, 8, 16):
        row = {}
        for mode in MODES:
            evaluations = make_plan((1024, 1024), preset_config(scale, mode), (8, 4)).describe()["unet_evaluations"]
            row[mode] = {"unet_evaluations": evaluations, "h100_seconds_modelled": evaluations / H100_EVALUATIONS_PER_S}
        base = row["default"]["unet_evaluations"]
        for mode in MODES:
            row[mode]["vs_default"] = row[mode]["unet_evaluations"] / base
        rows[f"1024->{1024 * scale}"] = row
    return rows


def demo_walls(repeats: int) -> dict:
    from PIL import Image

    from cupscale_dist import UpscaleConfig, upscale
    from cupscale_dist.execution.worker import ModelWorker

    base = UpscaleConfig.load("cpu-demo", torch_threads=1, scale=2)
    worker = ModelWorker.for_config(base)
    with Image.open(ROOT / "examples" / "astronaut.png") as image:
        photo = image.convert("RGB")
    walls = {}
    for mode, change in DEMO_MODES.items():
        config = base.replace(**change)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            upscale(photo, config, model=worker, progress=False)
            times.append(time.perf_counter() - start)
        walls[mode] = min(times)
        log(f"demo {mode}: {walls[mode]:.2f} s")
    return {"seconds": walls, "vs_default": {m: walls[m] / walls["default"] for m in walls},
            "note": "real upscale of the bundled photo x2 on the demo model, 1 torch thread, best of the repeats"}


def fp8_picture() -> dict:
    from PIL import Image

    from cupscale_dist import UpscaleConfig, upscale

    with Image.open(ROOT / "examples" / "astronaut.png") as image:
        photo = image.convert("RGB")
    config = UpscaleConfig.load("cpu-demo", torch_threads=1, scale=2)
    full = np.asarray(upscale(photo, config, progress=False)).astype(np.float64)
    fp8 = np.asarray(upscale(photo, config.replace(weights="fp8"), progress=False)).astype(np.float64)
    mse = float(np.mean((full - fp8) ** 2))
    return {"psnr_fp8_vs_full_db": float("inf") if mse == 0 else 10 * np.log10(255**2 / mse),
            "identical": bool(mse == 0)}


def compile_speedup(calls: int) -> dict:
    import copy

    import torch

    from cupscale_dist import UpscaleConfig
    from cupscale_dist.execution.worker import ModelWorker
    from cupscale_dist.method.step import StageContext, predict_views
    from cupscale_dist.models.backbones.sdxl.backbone import SDXL, SDXLStage
    from cupscale_dist.models.weights import compile_denoiser

    torch.set_num_threads(1)
    worker = ModelWorker.for_config(UpscaleConfig.load("cpu-demo"))
    embeds, pooled = worker.encode_prompts(["a photo"])
    embeds, pooled = torch.from_numpy(embeds), torch.from_numpy(pooled)
    latent, f, channels = 32, worker.spec.vae_scale_factor, worker.spec.latent_channels  # the demo's: 2, 8
    sdxl = SDXLStage(pooled, pooled, pooled, "global", (latent * f, latent * 4 * f))
    context = StageContext(embeds, embeds, embeds, np.zeros(4, dtype=np.int64), None, None, (latent, latent * 4), f,
                           3.0, 0.5, "mix", family=sdxl)
    rects = np.array([[0, i * latent, latent, (i + 1) * latent] for i in range(4)])
    windows = torch.randn(4, channels, latent, latent, generator=torch.Generator().manual_seed(0))
    compiled = SDXL(copy.deepcopy(worker.pipe.unet))
    start = time.perf_counter()
    compile_denoiser(compiled.unet)
    predict_views(compiled, windows, 500, 0.5, context, range(4), rects)  # warm-up: the compile itself
    compile_s = time.perf_counter() - start
    rates = {}
    for name, backbone in (("eager", worker.backbone), ("compiled", compiled)):
        start = time.perf_counter()
        for _ in range(calls):
            predict_views(backbone, windows, 500, 0.5, context, range(4), rects)
        rates[name] = calls / (time.perf_counter() - start)
    return {"calls_per_s": rates, "speedup": rates["compiled"] / rates["eager"], "compile_and_warm_up_s": compile_s,
            "note": "4 views of 32x32 latent px per call on the demo UNet, CFG on, 1 torch thread"}


FULL_SIZE_CHILD = """
import json, sys
from pathlib import Path
from cupscale_dist.execution.worker import ModelWorker
worker = ModelWorker(sys.argv[1], device="cpu", dtype="bfloat16", weights=sys.argv[2])
status = Path("/proc/self/status").read_text().splitlines()
fields = (line.split(":", 1) for line in status)
print(json.dumps({k: int(v.split()[0]) * 1024 for k, v in fields if k in ("VmHWM", "VmRSS")}))
"""


def full_size_rss() -> dict:
    from cupscale_dist.testing.fullsize import build_full_size

    with tempfile.TemporaryDirectory() as tmp:
        log("writing full-size SDXL (random weights, the hub's layout) ...")
        model = build_full_size("sdxl", Path(tmp) / "sdxl")
        out = {}
        for mode in ("full", "fp8"):
            done = subprocess.run([sys.executable, "-c", FULL_SIZE_CHILD, str(model), mode], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=1800)
            if done.returncode:
                raise RuntimeError(done.stderr[-2000:])
            out[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            log(f"full-size SDXL worker, weights={mode}: peak RSS {out[mode]['VmHWM'] / 2**30:.2f} GiB")
    return {"peak_rss_bytes": out, "fp8_vs_full_peak": out["fp8"]["VmHWM"] / out["full"]["VmHWM"],
            "fp8_vs_full_resident": out["fp8"]["VmRSS"] / out["full"]["VmRSS"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="demo upscales per mode (best is kept)")
    parser.add_argument("--compile-calls", type=int, default=20)
    parser.add_argument("--full-size", action="store_true", help="also the full-size SDXL worker's peak RSS")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    result = {"bench": "cost", "machine": {"cpus": os.cpu_count(), "load_average_start": load_average()}}
    log("plans ...")
    result["plans"] = plans()
    log("demo model wall times ...")
    result["demo_wall"] = demo_walls(args.repeats)
    log("fp8 picture ...")
    result["fp8_demo"] = fp8_picture()
    log("compile ...")
    result["compile_demo"] = compile_speedup(args.compile_calls)
    if args.full_size:
        result["full_size_sdxl_worker"] = full_size_rss()
    result["seconds"] = time.perf_counter() - started
    result["machine"]["load_average_end"] = load_average()
    print(json.dumps(rounded(result), indent=1))


if __name__ == "__main__":
    main()
