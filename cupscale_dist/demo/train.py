"""Train the embedded demo model (`--model demo`): a small SDXL-family latent diffusion model, on CPU, from a fixed
seed.

    python -m cupscale_dist.demo.train --out cupscale_dist/demo/model      # the shipped weights (see --help for sizes)

Same architecture family as SDXL, so every code path runs as on SDXL: an AutoencoderKL (8 latent channels, factor 2
rather than SDXL's 8: see :mod:`cupscale_dist.demo.linear_vae` for why a small VAE on 2 cores keeps the picture only
at factor 2), a UNet2DConditionModel
with `text_time` added conditioning (micro-conditioning and the pooled embedding) and cross-attention over two CLIP
text encoders' hidden states, CLIP's real BPE tokenizer (openai/CLIP's 49,408-token vocabulary), SDXL's scheduler.

Two phases, both seeded: (1) the VAE: a linear autoencoder with exactly AutoencoderKL's linear path fitted by least
squares on random crops of the training photos, its latents whitened, written into AutoencoderKL exactly, then
fine-tuned as the real (nonlinear) class; (2) the UNet and both text encoders on the frozen VAE's latents (epsilon
prediction, min-SNR weighting, 10 % caption dropout to zeros as SDXL's `force_zeros_for_empty_prompt` expects, EMA
weights). The photos, their captions and
licences are in :mod:`cupscale_dist.demo.photos`; the held-out ones are never sampled. Weights are saved as float16
safetensors (the package budget is 40 MB), the VAE's as float32 (its constant channels; ~2 MB), and load in any dtype.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
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
from .linear_vae import (
    LinearAutoencoder,
    embed_in_autoencoder_kl,
    finetune_autoencoder_kl,
    fit_linear_autoencoder,
    whiten_latents,
)
from .photos import HELD_OUT, Photo, load_photo, training_photos
from .schedule import cosine_lr

BPE_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")  # openai/CLIP's BPE, via open_clip (MIT)
CLIP_MERGES = 49152 - 256 - 2  # openai/CLIP SimpleTokenizer: merges kept so the vocab is 49,408 tokens

VAE_BLOCK_OUT_CHANNELS = (32, 64)  # 2 blocks -> factor 2: factor 4's decoder capped the round trip near 29-31 dB
VAE_LATENT_CHANNELS = 8  # PCA of 2x2 patches: 4 components 30.5 / 27.5 dB on the held-out photos, 6: 40, 8: 45
VAE_FACTOR = 2 ** (len(VAE_BLOCK_OUT_CHANNELS) - 1)
UNET_CHANNELS = (32, 64, 128)  # 3 levels: the thin first one at factor 2's 4x latent keeps the cost ~1.5x factor 4's
UNET_SAMPLE_SIZE = 64  # latent side of the native size: 64 x 2 = 128 px (the probe's input size)
TEXT_HIDDEN_SIZE = 32  # per encoder; cross-attention sees both (64), as SDXL concatenates its two encoders
TEXT_PROJECTION_DIM = 32
ADDITION_TIME_EMBED_DIM = 8
VAE_CROP_PX = 64
UNET_CROP_PX = (64, 128)  # most steps on 64 px crops (cheap); the last quarter at the native 128 px
VAE_FINETUNE_LR = 2e-4  # Adam from the linear start; 5x lower than the linear fit's: the start is already good
CAPTION_DROPOUT = 0.1  # CFG's unconditional branch (SDXL zeroes the empty prompt's embeddings)
MIN_SNR_GAMMA = 5.0  # Hang et al. 2023: faster convergence for epsilon prediction
LOW_T_SHARE = 0.5  # half the timesteps drawn below LOW_T_MAX: an upscaler starts at strength <= 0.6
LOW_T_MAX = 650
EMA_DECAY = 0.999
TIMING_STEPS = (5, 25)  # a time budget is turned into a step count over these steps (the first ones warm caches up)
TIME_MARGIN = 0.9  # of a time budget: the native-size quarter runs a little slower per step than the timed start
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
    """The untrained pipeline but its VAE (phase 1 makes it): two CLIP text encoders with CLIP's tokenizer, the
    SDXL-style UNet, the scheduler."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
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
    levels = len(UNET_CHANNELS)  # cross-attention at the coarsest level only, as the former 2-level UNet had it
    unet = UNet2DConditionModel(
        sample_size=UNET_SAMPLE_SIZE, in_channels=VAE_LATENT_CHANNELS, out_channels=VAE_LATENT_CHANNELS,
        block_out_channels=UNET_CHANNELS, layers_per_block=2,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1), transformer_layers_per_block=1,
        use_linear_projection=True, cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
        attention_head_dim=tuple(c // 32 for c in UNET_CHANNELS), norm_num_groups=32,
        addition_embed_type="text_time", addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TEXT_PROJECTION_DIM)
    return dict(text_encoder=text_encoder_1, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG))


def train_vae(sampler: CropSampler, linear_steps: int, finetune_steps: int, batch: int, lr: float, seed: int,
              log: list):
    """Phase 1: the linear fit (least squares by Adam), whitened latents, the exact embedding in AutoencoderKL, then
    ``finetune_steps`` of MSE on the real class (its GroupNorms and SiLUs now free to bend); returns the VAE."""
    torch.manual_seed(seed)
    model = LinearAutoencoder(VAE_LATENT_CHANNELS, VAE_BLOCK_OUT_CHANNELS)
    bar = tqdm(total=linear_steps + finetune_steps, desc="training the demo VAE", unit="step")

    def progress(step, loss):
        bar.update()
        bar.set_postfix(mse=f"{loss:.5f}")

    log += fit_linear_autoencoder(model, lambda: sampler.batch(batch, VAE_CROP_PX)[0], linear_steps, lr,
                                  progress=progress)
    whiten_latents(model, sampler.batch(64, VAE_CROP_PX)[0])
    vae = embed_in_autoencoder_kl(model.eval(), sample_size=UNET_SAMPLE_SIZE * VAE_FACTOR)
    log += finetune_autoencoder_kl(vae, lambda: sampler.batch(batch // 2, VAE_CROP_PX)[0], finetune_steps,
                                   VAE_FINETUNE_LR, progress=progress)
    bar.close()
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_scaling_factor(vae, sampler: CropSampler, batches: int = 8) -> float:
    """1 / std of the latents, as Stable Diffusion chose its `scaling_factor`: unit-variance latents for the UNet."""
    latents = [vae.encode(sampler.batch(16, VAE_CROP_PX)[0]).latent_dist.mode() for _ in range(batches)]
    return float(1.0 / torch.cat(latents).std())


def train_unet(components: dict, sampler: CropSampler, steps: int, batch: int, lr: float, seed: int, log: list,
               device: str = "cpu", minutes: float | None = None, low_t_share: float = LOW_T_SHARE,
               low_t_max: int = LOW_T_MAX, unet_from: str | Path | None = None) -> tuple[dict, int]:
    """Phase 2: the UNet and both text encoders on the frozen VAE's latents; returns the EMA weights (on the CPU) and
    the number of steps run: ``steps``, or with ``minutes`` as many as fit in that time (measured over the first
    steps; re-running with that number as ``steps`` replays the same schedule)."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**components).to(device)
    vae, unet = components["vae"], components["unet"]
    trained = torch.nn.ModuleDict({k: components[k] for k in ("unet", "text_encoder", "text_encoder_2")}).train()
    if unet_from is not None:  # continue from a trained model's UNet and text encoders (its EMA weights)
        for name in trained:
            weights = type(components[name]).from_pretrained(Path(unet_from) / name, torch_dtype=torch.float32)
            trained[name].load_state_dict(weights.state_dict())
    trained.to(device)
    ema = copy.deepcopy(trained).eval().requires_grad_(False)
    noise_schedule = DDPMScheduler(**{k: SCHEDULER_CONFIG[k] for k in ("num_train_timesteps", "beta_start",
                                                                        "beta_end", "beta_schedule")})
    alpha_bar = noise_schedule.alphas_cumprod
    snr = alpha_bar / (1 - alpha_bar)
    generator = torch.Generator().manual_seed(seed)  # on the CPU whatever the device: one random stream for both
    opt = torch.optim.AdamW(trained.parameters(), lr=lr, weight_decay=1e-4)
    scaling = vae.config.scaling_factor
    bar = tqdm(total=steps, desc=f"training the demo UNet + text encoders ({device})", unit="step")
    step, started = 0, time.perf_counter()
    timed_from = None  # set at TIMING_STEPS[0], read at TIMING_STEPS[1]
    while step < steps:
        if minutes and step == TIMING_STEPS[1]:  # the budget fixes the schedule's length once, early
            per_step = (time.perf_counter() - timed_from) / (TIMING_STEPS[1] - TIMING_STEPS[0])
            left = minutes * 60 * TIME_MARGIN - (time.perf_counter() - started)
            steps = min(steps, step + max(1, int(left / per_step)))
            bar.total = steps
            bar.refresh()
        if step == TIMING_STEPS[0]:
            timed_from = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        crop = UNET_CROP_PX[0] if step < 0.75 * steps else UNET_CROP_PX[1]
        size = batch if crop == UNET_CROP_PX[0] else max(1, batch * UNET_CROP_PX[0] ** 2 // crop ** 2)
        pixels, captions, time_ids = sampler.batch(size, crop)
        pixels, time_ids = pixels.to(device), time_ids.to(device)
        with torch.no_grad():  # diffusers draws from the CPU generator and moves the sample to the VAE's device
            latents = vae.encode(pixels).latent_dist.sample(generator) * scaling
        # the text encoders run once per distinct caption (14 photos), then gather: same gradients, far fewer tokens
        distinct = sorted(set(captions))
        embeds, _, pooled, _ = pipe.encode_prompt(distinct, device=torch.device(device),
                                                  do_classifier_free_guidance=False)
        index = torch.tensor([distinct.index(c) for c in captions], device=device)
        embeds, pooled = embeds[index], pooled[index]
        keep = (torch.rand(size, generator=generator) >= CAPTION_DROPOUT).float().to(device)
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        low = torch.rand(size, generator=generator) < low_t_share
        t = torch.where(low, torch.randint(0, low_t_max, (size,), generator=generator),
                        torch.randint(0, 1000, (size,), generator=generator))
        t_snr, t = snr[t].to(device), t.to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        noisy = noise_schedule.add_noise(latents, noise, t)
        pred = unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        weight = torch.clamp(t_snr, max=MIN_SNR_GAMMA) / t_snr
        mse = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (weight * mse).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(trained.parameters()), 1 - decay)
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(mse=f"{mse.mean().item():.4f}")
            log.append({"phase": "unet", "step": step, "mse": round(mse.mean().item(), 5), "crop": crop})
        step += 1
        bar.update()
    bar.close()
    return {k: v.cpu() for k, v in ema.state_dict().items()}, steps


def train(out: str | Path, *, seed: int = 0, vae_linear_steps: int = 750, vae_finetune_steps: int = 800,
          unet_steps: int = 4500, vae_batch: int = 32, unet_batch: int = 32, vae_lr: float = 1e-3,
          unet_lr: float = 5e-4, threads: int | None = None, vae_from: str | Path | None = None,
          vae_only: bool = False, device: str = "cpu", unet_minutes: float | None = None,
          unet_from: str | Path | None = None, low_t_share: float = LOW_T_SHARE, low_t_max: int = LOW_T_MAX) -> Path:
    """Train both phases and `save_pretrained` the pipeline plus `training.json` into ``out``.

    ``vae_only``: phase 1 alone, ``out/vae`` + ``out/training.json``; ``vae_from``: such a directory (or a whole
    model's), whose VAE phase 2 then trains on, its phase-1 record carried into this one's. ``unet_from``: a whole
    model's directory whose UNet and text encoders phase 2 continues from (its VAE too, unless ``vae_from`` is given);
    its record is kept under ``continued_from``. ``device``: where phase 2 runs ("cuda" on a GPU); phase 1 runs on the
    CPU. ``unet_minutes``: phase 2 runs as many steps as fit (the count is recorded)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    started = time.time()
    photos = training_photos()
    assert not {p.name for p in photos} & set(HELD_OUT)
    sampler = CropSampler(photos, seed)
    log: list[dict] = []

    phase1 = dict(seed=seed, vae_linear_steps=vae_linear_steps, vae_finetune_steps=vae_finetune_steps,
                  vae_batch=vae_batch, vae_lr=vae_lr, vae_finetune_lr=VAE_FINETUNE_LR)
    if unet_from is not None and vae_from is None:
        vae_from = unet_from
    if vae_from is None:
        vae = train_vae(sampler, vae_linear_steps, vae_finetune_steps, vae_batch, vae_lr, seed, log)
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, sampler))
        phase1["vae_minutes"] = round((time.time() - started) / 60, 1)
    else:
        vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae", torch_dtype=torch.float32)
        vae.eval().requires_grad_(False)
        earlier = json.loads((Path(vae_from) / "training.json").read_text(encoding="utf-8"))
        phase1 = {k: v for k, v in earlier.items() if k.startswith("vae_") or k == "seed"}
        phase1["vae_from"] = str(vae_from)
        log += [entry for entry in earlier.get("log", []) if entry["phase"] != "unet"]
    vae_done = time.time()
    common = dict(photos=[p.name for p in photos], held_out=list(HELD_OUT), device=device,
                  machine=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                  **({"gpu": torch.cuda.get_device_name(0)} if device.startswith("cuda") else {}),
                  torch=torch.__version__, python=sys.version.split()[0])
    if vae_only:
        vae.save_pretrained(out / "vae", safe_serialization=True)
        record = dict(**phase1, **common, log=log)
        (out / "training.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        return out

    components = build_components(out / ".tokenizers", seed)  # seeded on its own: phase 1 does not shift it

    components["vae"] = vae
    ema, unet_steps = train_unet(components, sampler, unet_steps, unet_batch, unet_lr, seed, log, device=device,
                                 minutes=unet_minutes, low_t_share=low_t_share, low_t_max=low_t_max,
                                 unet_from=unet_from)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        prefix = name + "."
        components[name].load_state_dict({k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)})
        components[name].eval().to("cpu", torch.float16)  # the VAE stays float32: 2 MB, and exact

    components["vae"] = vae.to("cpu")
    pipe = StableDiffusionXLPipeline(**components)
    _save_pipeline(pipe, out, {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"}, clip_merges())  # the hub's layout
    shutil.rmtree(out / ".tokenizers", ignore_errors=True)
    record = dict(**phase1, unet_steps=unet_steps, unet_batch=unet_batch, unet_lr=unet_lr,
                  unet_minutes=round((time.time() - vae_done) / 60, 1), unet_low_t=[low_t_share, low_t_max],
                  **common, log=log)
    if unet_from is not None:  # the earlier run's record: which device made which part
        earlier = json.loads((Path(unet_from) / "training.json").read_text(encoding="utf-8"))
        record["continued_from"] = earlier
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the diffusers pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-linear-steps", type=int, default=750)
    parser.add_argument("--vae-finetune-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=4500)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--unet-batch", type=int, default=32)
    parser.add_argument("--vae-only", action="store_true", help="phase 1 only: OUT/vae and OUT/training.json")
    parser.add_argument("--vae-from", default=None, help="a --vae-only output (or a model directory): train the UNet "
                                                         "and text encoders on its VAE")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="where phase 2 trains: cpu (the shipped recipe) or cuda")
    parser.add_argument("--unet-minutes", type=float, default=None, help="phase 2: as many steps as fit in this "
                        "many minutes, at most --unet-steps (the count run is recorded in training.json)")
    parser.add_argument("--unet-from", default=None, help="a model directory: phase 2 continues from its UNet and "
                        "text encoders (and uses its VAE)")
    parser.add_argument("--unet-lr", type=float, default=5e-4)
    parser.add_argument("--low-t-share", type=float, default=LOW_T_SHARE, help="share of phase 2's timesteps drawn "
                        "below --low-t-max (an upscaler denoises from low noise)")
    parser.add_argument("--low-t-max", type=int, default=LOW_T_MAX)
    args = parser.parse_args(argv)
    path = train(args.out, seed=args.seed, vae_linear_steps=args.vae_linear_steps,
                 vae_finetune_steps=args.vae_finetune_steps, unet_steps=args.unet_steps, vae_batch=args.vae_batch,
                 unet_batch=args.unet_batch, threads=args.threads, vae_from=args.vae_from,
                 vae_only=args.vae_only, device=args.device, unet_minutes=args.unet_minutes, unet_from=args.unet_from,
                 unet_lr=args.unet_lr, low_t_share=args.low_t_share, low_t_max=args.low_t_max)
    print(path)


if __name__ == "__main__":
    main()
