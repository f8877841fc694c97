"""How much of the img2img noise the demo UNet removes at the low timesteps an upscale starts from, side by side for
several model directories: the grain diagnosis of issue 23.

    PYTHONPATH=$PWD python bench/demo_low_t.py cupscale_dist/demo/model [OTHER_MODEL_DIR ...] > low_t.json

For a 128 px centre crop of two training photos, the scaled latent ``z`` is noised to timestep ``t`` with a fixed
seed, the UNet predicts the noise, and the implied ``x0`` is compared with ``z``: ``model_x0_rmse`` against
``no_op_rmse`` (``x_t / sqrt(alpha_bar)``, no denoising at all), in latent units (the latents have unit variance).
What the model leaves of the noise at t = 51..201 is what the preset's two steps (t = 101, then 1) leave in the
picture, decoded by a factor-2 VAE as pixel-scale grain.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, rounded  # noqa: E402

PHOTOS = ("rocket", "chelsea")  # training photos: a smooth white body on sky, and fur
TIMESTEPS = (1, 51, 101, 201, 401)
CROP_PX = 128  # the demo UNet's native size


def measure(model: str, threads: int) -> dict:
    import torch
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    from cupscale_dist.demo.photos import load_photo, photo

    torch.set_num_threads(threads)
    pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=torch.float32)
    alpha_bar = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    rows = {}
    with torch.no_grad():
        for name in PHOTOS:
            array = load_photo(name)
            top, left = (array.shape[0] - CROP_PX) // 2, (array.shape[1] - CROP_PX) // 2
            crop = array[top : top + CROP_PX, left : left + CROP_PX].copy()
            x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
            z = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
            embeds, _, pooled, _ = pipe.encode_prompt([photo(name).caption], device="cpu",
                                                      do_classifier_free_guidance=False)
            time_ids = torch.tensor([[CROP_PX, CROP_PX, 0, 0, CROP_PX, CROP_PX]], dtype=torch.float32)
            for t in TIMESTEPS:
                noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(t))
                a = alpha_bar[t]
                noisy = a.sqrt() * z + (1 - a).sqrt() * noise
                eps = pipe.unet(noisy, torch.tensor([t]), embeds,
                                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
                x0 = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
                rows[f"{name} t={t}"] = {"model_x0_rmse": float((x0 - z).pow(2).mean().sqrt()),
                                         "no_op_rmse": float((noisy / a.sqrt() - z).pow(2).mean().sqrt()),
                                         "eps_mse": float((eps - noise).pow(2).mean())}
            log(f"{model}: {name} done")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="diffusers model directories (e.g. cupscale_dist/demo/model)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = {"bench": "demo_low_t", "photos": list(PHOTOS), "crop_px": CROP_PX,
              "models": {model: measure(model, args.threads) for model in args.models}}
    print(json.dumps(rounded(result), indent=1))


if __name__ == "__main__":
    main()
