"""The GPU acceptance run (issue 20): one command on a machine with one CUDA GPU, at most ~8 minutes, one JSON file.

    bash bench/gpu.sh OUT_DIR          # installs .whl/ (../shared/tools/gpu-wheels.sh) if diffusers/ray are missing
    python bench/gpu.py --out OUT_DIR  # the same, when the packages are there

Sections, each timed and kept in the JSON even when a later one fails or the time budget runs out:
1. ``unet``: SDXL-architecture UNet, random weights, bf16: bare batched tiles/s, ``predict_views`` vs bare, view
   masks / pixel masks / lambda-mix overhead (``bench/step_cost.py --full-size``'s measurement).
2. ``model``: full-size SDXL in the hub's layout (random weights, fp16 files; ``cupscale_dist.testing.fullsize``).
3. ``flux``: a FLUX.1-dev-sized transformer (11.9 B parameters, random weights, built on the GPU in bf16): s/view
   for 4 views of 1024 px, bare (stock processor) vs ``predict_views`` plain (per-view global positions), view
   masks and the lambda-mix composer, and the achieved TFLOP/s (``bench/flux_cost.py``'s ``transformer_rates``).
4. ``zimage``: a Z-Image-Turbo-sized transformer (ZImageTransformer2DModel, 6.15 B parameters, random weights, built
   on the GPU in bf16): the same rows as ``flux`` for 4 views of 1024 px with a 128-token caption: s/view bare (the
   stock forward and processor) vs ``predict_views`` plain / view masks / lambda-mix, the achieved TFLOP/s
   (``bench/zimage_cost.py``'s count). ``--smoke-cpu`` runs it on the tiny Z-Image's transformer.
5. ``upscale``: a real ``upscale()`` 1024 -> 2048 through Ray on that model, ``weights`` full / fp8 / offload and
   ``compile`` off / on, 1 actor (a whole GPU) and 2 actors sharing the GPU: seconds, each actor's peak GPU memory,
   and whether 1 and 2 actors gave identical bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, random_model, regional_rates, rounded  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 450  # the issue's 8 minutes, less the interpreter's and the wheels' start
UPSCALE_STEPS = 10  # scheduler steps of the real upscales (6 run at strength 0.6): seconds, not minutes, per case
CASES = [  # (name, actors, weights, compile); the first two give the bytes comparison
    ("full_1_actor", 1, "full", False),
    ("full_2_actors", 2, "full", False),
    ("fp8_1_actor", 1, "fp8", False),
    ("offload_1_actor", 1, "offload", False),
    ("full_compiled_1_actor", 1, "full", True),
]


def unet_section(seed: int) -> dict:
    import step_cost  # bench/step_cost.py: the measurement the issue names, reused as is

    args = SimpleNamespace(device="cuda", dtype="bfloat16", tiles=[4, 8], latent=128, repeats=10, warmup=3,
                           stub_only=False, seed=seed, profile=True)
    return step_cost.full_size(args)


def flux_section(seed: int, device: str = "cuda") -> dict:
    """Flux rows: the FLUX.1-dev transformer on the GPU; on CPU (the smoke run) the tiny Flux's, figures meaningless."""
    import torch

    from flux_cost import transformer_rates  # bench/flux_cost.py

    if device == "cuda":
        return transformer_rates("cuda", torch.bfloat16, seed=seed)
    from cupscale_dist.testing.tiny_flux import flux_transformer

    config = {k: v for k, v in flux_transformer(seed, True).config.items() if not k.startswith("_")}
    return transformer_rates("cpu", torch.float32, config, views=2, view_latent=16, text_tokens=32, repeats=2,
                             warmup=1, seed=seed)


def zimage_section(seed: int, device: str = "cuda") -> dict:
    """Z-Image rows: the Z-Image-Turbo transformer on the GPU; on CPU (the smoke run) the tiny Z-Image's, figures
    meaningless."""
    import torch

    if device == "cuda":
        from zimage_cost import ZIMAGE_TURBO_TRANSFORMER  # bench/zimage_cost.py: the published config

        return zimage_rates("cuda", torch.bfloat16, ZIMAGE_TURBO_TRANSFORMER, seed=seed)
    from cupscale_dist.testing.tiny_zimage import zimage_transformer

    config = {k: v for k, v in zimage_transformer(seed).config.items() if not k.startswith("_")}
    return zimage_rates("cpu", torch.float32, config, views=2, view_latent=16, caption_tokens=32, repeats=2, warmup=1,
                        seed=seed)


def zimage_rates(device: str, dtype, config: dict, views: int = 4, view_latent: int = 128, caption_tokens: int = 128,
                 repeats: int = 5, warmup: int = 2, seed: int = 0) -> dict:
    """Seconds per view batch of a Z-Image transformer (random weights, built on ``device`` in ``dtype``), side by
    side after warm-up, median of ``repeats``, as ``flux_cost.transformer_rates`` does for Flux: ``bare`` (diffusers'
    forward and stock processor, every view at local positions, one caption of ``caption_tokens``), ``plain``
    (``predict_views`` with lambda = 1, nothing screened: per-view global positions by the RoPE formula), ``masks``
    (view masks screening half the caption's tokens), ``mix`` (lambda 0.5: a second caption stream) -> s/view, the
    ratios to bare and the achieved TFLOP/s (FLOPs counted from the model, ``zimage_cost.flops_per_view``)."""

    import numpy as np
    import torch
    from diffusers import ZImageTransformer2DModel

    from cupscale_dist.method.step import StageContext
    from cupscale_dist.method.views import make_views
    from cupscale_dist.models.backbones.zimage.attention import install_regional_processor
    from cupscale_dist.models.backbones.zimage.backbone import ZImage, ZImageStage
    from zimage_cost import flops_per_view

    transformer = random_model(ZImageTransformer2DModel, config, device, dtype, seed)
    channels, dim = config["in_channels"], config["cap_feat_dim"]
    backbone = ZImage(transformer)  # no pipeline: the captions are given, not encoded
    stock = type(transformer.noise_refiner[0].attention.processor)  # the refiners keep diffusers' processor
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(3, caption_tokens, dim, generator=gen)  # every row non-zero: all tokens real
    side = view_latent * 2
    rects = make_views(side, side, view_latent, view_latent // 2)[:views]
    windows = torch.randn(views, channels, view_latent, view_latent, generator=gen)
    allowed = np.ones((views, caption_tokens), dtype=bool)
    allowed[:, 1 : caption_tokens // 2] = False
    base = StageContext(embeds[2:3], embeds[0:1], embeds[1:2], np.zeros(views, dtype=np.int64), None, None,
                        (side, side), 8, 1.0, 1.0, "mix", family=ZImageStage("global")).to(device, dtype)
    images = list(windows.to(device, dtype).unsqueeze(2).unbind(0))  # diffusers' (C, F=1, h, w) per view
    captions = [base.global_embeds[0].to(device, dtype)] * views
    t = torch.full((views,), 0.3, device=device, dtype=dtype)

    def bare():  # the stock processor is installed around it, outside the timed region
        transformer(images, t, captions, return_dict=False)

    def use_stock():
        for layer in transformer.layers:
            layer.attention.set_processor(stock())

    def use_regional():
        backbone.processor = install_regional_processor(transformer)

    per_view = regional_rates(backbone, windows, rects, base, allowed, bare, use_stock, use_regional, device,
                              warmup, repeats)
    flops = flops_per_view(transformer, caption_tokens, (view_latent // 2) ** 2)["tflop_per_view"]
    return {"device": device, "views_per_call": views, "caption_tokens": caption_tokens,
            "parameters": sum(p.numel() for p in transformer.parameters()), "s_per_view": per_view,
            "vs_bare": {name: per_view[name] / per_view["bare"] for name in per_view},
            "achieved_tflops_bare": flops / per_view["bare"]}


def upscale_section(model: Path | str, deadline: float, device: str = "cuda") -> dict:
    import numpy as np
    import ray
    import torch
    from PIL import Image

    from cupscale_dist import UpscaleConfig, upscale
    from cupscale_dist.execution.executor import open_executor
    from cupscale_dist.execution.raycluster import ClusterOptions

    with Image.open(ROOT / "examples" / "astronaut.png") as image:
        photo = image.convert("RGB").resize((1024, 1024), Image.Resampling.BICUBIC)
    gpus = 1 if device == "cuda" else 0
    if device != "cuda":  # the CPU smoke run: the demo model, 256 px in
        photo = photo.resize((256, 256), Image.Resampling.BICUBIC)
    ray.init(num_gpus=gpus, num_cpus=max(4, (os.cpu_count() or 8) // 2), include_dashboard=False, log_to_driver=False)
    results, outputs = {}, {}
    try:
        for name, actors, weights, compile_ in CASES:
            if time.monotonic() > deadline or (weights == "offload" and device != "cuda"):
                results[name] = {"skipped": "time budget spent" if weights != "offload" else "offload needs a GPU"}
                continue
            tile = 128 if device == "cuda" else 32
            config = UpscaleConfig(model=str(model), scale=2, tile=tile, stride=tile // 2, steps=UPSCALE_STEPS,
                                   strength=0.6, device=device, dtype="bfloat16" if gpus else "float32",
                                   prompt="an astronaut, detailed photo", weights=weights, compile=compile_,
                                   torch_threads=None if gpus else 1)
            cluster = ClusterOptions(actors=actors, gpus_per_actor=gpus / actors, cpus_per_actor=1)
            try:
                start = time.perf_counter()
                executor = open_executor(config, cluster, keep=True)
                try:  # released whatever happens: a failed case must not keep the GPU from the next ones
                    loaded = time.perf_counter()
                    out = upscale(photo, config, executor=executor, progress=False)
                    done = time.perf_counter()
                    usage = executor.pool.usage()
                finally:
                    executor.release()
                outputs[name] = np.asarray(out).tobytes()
                results[name] = {"load_s": loaded - start, "upscale_s": done - loaded, "actors": actors,
                                 "gpu_peak_gb_per_actor": [u.get("gpu_peak_bytes", 0) / 1e9 for u in usage]}
            except Exception as exc:  # noqa: BLE001 - one case failing must not lose the others
                results[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            log(f"upscale {name}: {results[name]}")
            torch.cuda.empty_cache()
    finally:
        ray.shutdown()
    if "full_1_actor" in outputs and "full_2_actors" in outputs:
        results["bytes_identical_1_vs_2_actors"] = outputs["full_1_actor"] == outputs["full_2_actors"]
    full = results.get("full_1_actor", {}).get("gpu_peak_gb_per_actor")
    for name in ("fp8_1_actor", "offload_1_actor"):
        ours = results.get(name, {}).get("gpu_peak_gb_per_actor")
        if full and ours and full[0] > 0:
            results[f"{name}_peak_vs_full"] = ours[0] / full[0]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu.json")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke-cpu", action="store_true", help="the upscale section only, on CPU with the demo "
                        "model (checks this script where no GPU is lent; its figures mean nothing)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + args.budget_s
    import torch

    result = {"bench": "gpu", "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "sections": {}}

    def section(name, run):
        begin = time.monotonic()
        try:
            result["sections"][name] = run()
        except Exception:  # noqa: BLE001 - keep what the other sections measured
            result["sections"][name] = {"error": traceback.format_exc()[-2000:]}
        result["sections"][name + "_s"] = time.monotonic() - begin
        (out / "gpu.json").write_text(json.dumps(rounded(result), indent=1, default=str))  # after every section

    if args.smoke_cpu:
        section("flux", lambda: flux_section(args.seed, device="cpu"))
        section("zimage", lambda: zimage_section(args.seed, device="cpu"))
        section("upscale", lambda: upscale_section("demo", deadline, device="cpu"))
    elif not torch.cuda.is_available():
        result["error"] = "no CUDA GPU visible"
    else:
        section("unet", lambda: unet_section(args.seed))
        section("flux", lambda: flux_section(args.seed))
        torch.cuda.empty_cache()  # the 24 GB transformer goes before the next one is built
        section("zimage", lambda: zimage_section(args.seed))
        torch.cuda.empty_cache()  # and the 12 GB one before the SDXL model
        with tempfile.TemporaryDirectory() as tmp:
            from cupscale_dist.testing.fullsize import build_full_size

            model = Path(tmp) / "sdxl"
            section("model", lambda: {"path": str(build_full_size("sdxl", model, args.seed, full_precision=False))})
            if (model / "model_index.json").is_file():
                section("upscale", lambda: upscale_section(model, deadline))
    result["seconds"] = time.monotonic() - started
    (out / "gpu.json").write_text(json.dumps(rounded(result), indent=1, default=str))
    print(json.dumps(rounded(result), indent=1, default=str))


if __name__ == "__main__":
    main()
