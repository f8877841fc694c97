"""Train the embedded demo model (`--model demo`): a small SDXL-family latent diffusion model, on CPU, from a fixed seed.

    python -m cupscale_dist.demo.train --out cupscale_dist/demo/model      # the shipped weights (see --help for sizes)

Same architecture family as SDXL, so every code path runs as on SDXL: an AutoencoderKL (4 latent channels, factor 4
rather than SDXL's 8: a tiny VAE trained for minutes reconstructs a factor-4 latent far better), a UNet2DConditionModel
with `text_time` added conditioning (micro-conditioning and the pooled embedding) and cross-attention over two CLIP
text encoders' hidden states, CLIP's real BPE tokenizer (openai/CLIP's 49,408-token vocabulary), SDXL's scheduler.

Two phases, both seeded: (1) the VAE on random crops of the training photos (L1 + L1 on image gradients + a small KL);
(2) the UNet and both text encoders on the frozen VAE's latents (epsilon prediction, min-SNR weighting, 10 % caption
dropout to zeros as SDXL's `force_zeros_for_empty_prompt` expects, EMA weights). The photos, their captions and
licences are in :mod:`cupscale_dist.demo.photos`; the held-out ones are never sampled. Weights are saved as float16
safetensors (the package budget is 25 MB) and load in any dtype.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..testing.tiny import EOS_TOKEN, SCHEDULER_CONFIG, _save_pipeline, write_clip_tokenizer
from .photos import HELD_OUT, Photo, load_photo, training_photos

BPE_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")  # openai/CLIP's BPE, via open_clip (MIT)
CLIP_MERGES = 49152 - 256 - 2  # openai/CLIP SimpleTokenizer: merges kept so the vocab is 49,408 tokens

VAE_BLOCK_OUT_CHANNELS = (32, 64, 64)  # 3 blocks -> factor 4; ~1 M parameters train in ~20 min on 2 cores
UNET_CHANNELS = (64, 128)  # ~5.8 M parameters: 0.7 s per 32-crop step on 2 cores
UNET_SAMPLE_SIZE = 32  # latent side of the native size: 32 x 4 = 128 px (the probe's input size)
TEXT_HIDDEN_SIZE = 32  # per encoder; cross-attention sees both (64), as SDXL concatenates its two encoders
TEXT_PROJECTION_DIM = 32
ADDITION_TIME_EMBED_DIM = 8
VAE_CROP_PX = 64
UNET_CROP_PX = (64, 128)  # most steps on 64 px crops (cheap); the last quarter at the native 128 px
KL_WEIGHT = 1e-6  # as Stable Diffusion's autoencoder: a nearly deterministic latent
GRADIENT_LOSS_WEIGHT = 0.5  # L1 on image gradients keeps edges from blurring under a plain L1
CAPTION_DROPOUT = 0.1  # CFG's unconditional branch (SDXL zeroes the empty prompt's embeddings)
MIN_SNR_GAMMA = 5.0  # Hang et al. 2023: faster convergence for epsilon prediction
LOW_T_SHARE = 0.5  # half the timesteps drawn below LOW_T_MAX: an upscaler starts at strength <= 0.6
LOW_T_MAX = 650
EMA_DECAY = 0.999
PYRAMID_STEP = 0.8  # photos are seen at scales 1, 0.8, 0.64, ... down to the crop size: detail at every scale
COLOUR_WEIGHT = 2.0  # colour photos sampled twice as often as grey ones


def clip_merges() -> list[tuple[str, str]]:
    """CLIP's real BPE merges, read from the shipped `bpe_simple_vocab_16e6.txt.gz` as openai/CLIP does."""
    lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")[1 : CLIP_MERGES + 1]
    return [tuple(line.split()) for line in lines]


class CropSampler:
    """Seeded random crops (random scale, position, flip) of the training photos, as [-1, 1] tensors with captions."""

    def __init__(self, photos: list[Photo], seed: int):
        self.rng = np.random.default_rng(seed)
        self.photos, self.levels = photos, []
        for entry in photos:
            image = Image.fromarray(load_photo(entry.name))
            scales, scale = [], 1.0
            while min(image.size) * scale >= max(UNET_CROP_PX):
                scales.append(scale)
                scale *= PYRAMID_STEP
            self.levels.append([np.asarray(image.resize((round(image.width * s), round(image.height * s)),
                                                        Image.BICUBIC)) for s in scales])
        colour = [0 if e.caption.startswith("a black and white") else 1 for e in photos]
        weights = np.array([COLOUR_WEIGHT if c else 1.0 for c in colour])
        self.weights = weights / weights.sum()

    def batch(self, size: int, crop: int):
        """(pixels (B, 3, crop, crop) in [-1, 1], captions, time_ids (B, 6): original size, crop top-left, target)."""
        pixels, captions, time_ids = [], [], []
        for _ in range(size):
            i = self.rng.choice(len(self.photos), p=self.weights)
            level = self.levels[i][self.rng.integers(len(self.levels[i]))]
            h, w = level.shape[:2]
            y, x = self.rng.integers(h - crop + 1), self.rng.integers(w - crop + 1)
            patch = level[y : y + crop, x : x + crop]
            if self.rng.random() < 0.5:
                patch = patch[:, ::-1]
            pixels.append(torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1))
            captions.append(self.photos[i].caption)
            time_ids.append([h, w, y, x, crop, crop])
        pixels = torch.stack(pixels).float() / 127.5 - 1
        return pixels, captions, torch.tensor(time_ids, dtype=torch.float32)


def build_components(tokenizer_dir: Path, seed: int):
    """The untrained pipeline: VAE, two CLIP text encoders with CLIP's tokenizer, the SDXL-style UNet, the scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    merges = clip_merges()
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tokenizer_dir / "tokenizer", EOS_TOKEN, merges))
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tokenizer_dir / "tokenizer_2", "!", merges))

    def text_encoder(tok, cls):
        torch.manual_seed(seed)
        return cls(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=TEXT_HIDDEN_SIZE, intermediate_size=4 * TEXT_HIDDEN_SIZE,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, projection_dim=TEXT_PROJECTION_DIM,
            hidden_act="quick_gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id))

    text_encoder_1 = text_encoder(tokenizer, CLIPTextModel)
    text_encoder_2 = text_encoder(tokenizer_2, CLIPTextModelWithProjection)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCK_OUT_CHANNELS),
        block_out_channels=VAE_BLOCK_OUT_CHANNELS, layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=128)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=UNET_SAMPLE_SIZE, in_channels=4, out_channels=4, block_out_channels=UNET_CHANNELS,
        layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
        use_linear_projection=True, cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
        attention_head_dim=tuple(c // 32 for c in UNET_CHANNELS), norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TEXT_PROJECTION_DIM)
    return dict(vae=vae, text_encoder=text_encoder_1, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG))


def cosine_lr(step: int, steps: int, peak: float, warmup: int = 100, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` times the peak."""
    warm = min(1.0, (step + 1) / warmup)
    return peak * warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def train_vae(vae, sampler: CropSampler, steps: int, batch: int, lr: float, log: list) -> None:
    """Phase 1: reconstruction (L1 + gradient L1) with a small KL, on random crops."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="training the demo VAE", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        x, _, _ = sampler.batch(batch, VAE_CROP_PX)
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample()).sample
        l1 = (y - x).abs().mean()
        grads = sum((a - b).abs().mean() for a, b in zip(image_gradients(y), image_gradients(x)))
        loss = l1 + GRADIENT_LOSS_WEIGHT * grads + KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(l1=f"{l1.item():.4f}")
        if step % 50 == 0 or step == steps - 1:
            log.append({"phase": "vae", "step": step, "l1": round(l1.item(), 5), "loss": round(loss.item(), 5)})
    vae.eval()


@torch.no_grad()
def latent_scaling_factor(vae, sampler: CropSampler, batches: int = 8) -> float:
    """1 / std of the latents, as Stable Diffusion chose its `scaling_factor`: unit-variance latents for the UNet."""
    latents = [vae.encode(sampler.batch(16, VAE_CROP_PX)[0]).latent_dist.mode() for _ in range(batches)]
    return float(1.0 / torch.cat(latents).std())


def train_unet(components: dict, sampler: CropSampler, steps: int, batch: int, lr: float, seed: int, log: list) -> dict:
    """Phase 2: the UNet and both text encoders on the frozen VAE's latents; returns the EMA weights."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**components)
    vae, unet = components["vae"], components["unet"]
    trained = torch.nn.ModuleDict({k: components[k] for k in ("unet", "text_encoder", "text_encoder_2")}).train()
    ema = copy.deepcopy(trained).eval().requires_grad_(False)
    noise_schedule = DDPMScheduler(**{k: SCHEDULER_CONFIG[k] for k in ("num_train_timesteps", "beta_start",
                                                                        "beta_end", "beta_schedule")})
    alpha_bar = noise_schedule.alphas_cumprod
    snr = alpha_bar / (1 - alpha_bar)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(trained.parameters(), lr=lr, weight_decay=1e-4)
    scaling = vae.config.scaling_factor
    bar = tqdm(range(steps), desc="training the demo UNet + text encoders", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        crop = UNET_CROP_PX[0] if step < 0.75 * steps else UNET_CROP_PX[1]
        size = batch if crop == UNET_CROP_PX[0] else max(1, batch * UNET_CROP_PX[0] ** 2 // crop ** 2)
        pixels, captions, time_ids = sampler.batch(size, crop)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator) * scaling
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False)
        keep = (torch.rand(size, generator=generator) >= CAPTION_DROPOUT).float()
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        low = torch.rand(size, generator=generator) < LOW_T_SHARE
        t = torch.where(low, torch.randint(0, LOW_T_MAX, (size,), generator=generator),
                        torch.randint(0, 1000, (size,), generator=generator))
        noise = torch.randn(latents.shape, generator=generator)
        noisy = noise_schedule.add_noise(latents, noise, t)
        pred = unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        weight = torch.clamp(snr[t], max=MIN_SNR_GAMMA) / snr[t]
        mse = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (weight * mse).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), trained.parameters()):
                e.lerp_(p, 1 - decay)
        bar.set_postfix(mse=f"{mse.mean().item():.4f}")
        if step % 50 == 0 or step == steps - 1:
            log.append({"phase": "unet", "step": step, "mse": round(mse.mean().item(), 5), "crop": crop})
    return ema.state_dict()


def train(out: str | Path, *, seed: int = 0, vae_steps: int = 2000, unet_steps: int = 4000, vae_batch: int = 16,
          unet_batch: int = 32, vae_lr: float = 1e-3, unet_lr: float = 5e-4, threads: int | None = None) -> Path:
    """Train both phases and `save_pretrained` the pipeline (float16 safetensors) plus `training.json` into ``out``."""
    from diffusers import StableDiffusionXLPipeline

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    started = time.time()
    photos = training_photos()
    assert not {p.name for p in photos} & set(HELD_OUT)
    sampler = CropSampler(photos, seed)
    log: list[dict] = []
    components = build_components(out / ".tokenizers", seed)

    train_vae(components["vae"], sampler, vae_steps, vae_batch, vae_lr, log)
    components["vae"].requires_grad_(False).register_to_config(
        scaling_factor=latent_scaling_factor(components["vae"], sampler))
    vae_done = time.time()

    ema = train_unet(components, sampler, unet_steps, unet_batch, unet_lr, seed, log)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        prefix = name + "."
        components[name].load_state_dict({k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)})
        components[name].eval()

    pipe = StableDiffusionXLPipeline(**components).to(torch.float16)
    _save_pipeline(pipe, out, {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"}, clip_merges())  # the hub's layout
    shutil.rmtree(out / ".tokenizers", ignore_errors=True)
    record = dict(
        seed=seed, vae_steps=vae_steps, unet_steps=unet_steps, vae_batch=vae_batch, unet_batch=unet_batch,
        vae_lr=vae_lr, unet_lr=unet_lr, threads=torch.get_num_threads(),
        vae_minutes=round((vae_done - started) / 60, 1), unet_minutes=round((time.time() - vae_done) / 60, 1),
        photos=[p.name for p in photos], held_out=list(HELD_OUT), machine=platform.processor() or platform.machine(),
        torch=torch.__version__, python=sys.version.split()[0], log=log,
    )
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the diffusers pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    path = train(args.out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                 vae_batch=args.vae_batch, unet_batch=args.unet_batch, threads=args.threads)
    print(path)


if __name__ == "__main__":
    main()
