"""Options every command that runs the method shares, defined once (like huggingface_hub's cli/_cli_utils.py), and
the config and cluster they make."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..config import UpscaleConfig, parse_size, preset_names, set_value
from ..errors import UserError


def parse_set(text: str) -> tuple[str, str]:
    """``KEY=VALUE``; the value is typed by :func:`set_value` once the knob is known."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set {text!r} is not KEY=VALUE; use e.g. --set lambda_global=0.7")
    key, value = text.split("=", 1)
    return key.strip(), value


def size_option(text: str) -> tuple[int, int]:
    """``--size WxH`` for argparse: the config's one-line error, as argparse reports a bad value."""
    try:
        return parse_size(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the method (defined once)."""
    group = parser.add_argument_group("method")
    group.add_argument("--config", help=f"preset ({', '.join(preset_names())}) or YAML file; flags override it")
    group.add_argument("--model", help="hub id, local diffusers dir, single-file .safetensors (SDXL/SD1.5), or 'demo' "
                                       "(a small SDXL-family model trained here, CPU)")
    group.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                       help="LoRA .safetensors file, scale 1 if omitted; repeatable (all are applied, in order)")
    group.add_argument("--controlnet", help="ControlNet tile model: local dir or hub id")
    group.add_argument("--creativity", type=float, help="0-1: how much new detail (sets --strength unless given)")
    group.add_argument("--resemblance", type=float, help="0-1: how closely to follow the input (sets the prior's "
                                                         "window and weight, controlnet_scale unless given)")
    group.add_argument("--prompt", help="global prompt (default: the captioner's caption, or none)")
    group.add_argument("--negative-prompt", dest="negative_prompt")
    scale = group.add_mutually_exclusive_group()
    scale.add_argument("--scale", type=int, help="2, 4, 8 or 16 (x2 per stage)")
    scale.add_argument("--size", type=size_option, help="exact output size WxH")
    group.add_argument("--steps", type=int, help="T, scheduler steps of a full run")
    group.add_argument("--strength", type=float, help="s: fraction of T actually run per stage")
    group.add_argument("--tile", type=int, help="view size in latent pixels")
    group.add_argument("--stride", type=int, help="view stride in latent pixels")
    group.add_argument("--seed", type=int)
    group.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    group.add_argument("--dtype", help="auto, float32, bfloat16, float16")
    group.add_argument("--captioner", choices=["none", "vllm", "transformers"])
    group.add_argument("--captioner-model", dest="captioner_model")
    group.add_argument("--regional-prompts", dest="regional_prompts", help="JSON of per-view prompts")
    group.add_argument("--keep-captioner", dest="keep_captioner", action="store_const", const=True,
                       help="keep the captioner pool between stages (default: release its GPU memory)")
    group.add_argument("--set", dest="overrides", type=parse_set, action="append", default=[], metavar="KEY=VALUE",
                       help="any knob (see `cupscale knobs`), repeatable")


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """Where the views are denoised (defined once; none of these change the output bytes)."""
    group = parser.add_argument_group("ray")
    group.add_argument("--actors", type=int, help="denoiser actors (default: one per GPU, else 1; 0 = no Ray)")
    group.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    group.add_argument("--gpus-per-actor", dest="gpus_per_actor", type=float, help="default 1 with GPUs, else 0")
    group.add_argument("--cpus-per-actor", dest="cpus_per_actor", type=float, default=1.0)
    group.add_argument("--start-timeout", dest="start_timeout", type=float, default=120.0, metavar="S",
                       help="seconds to wait for the actors to be placed and load the model")


def config_from_args(args: argparse.Namespace) -> UpscaleConfig:
    names = {f.name for f in fields(UpscaleConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    flags.update((key, set_value(key, text)) for key, text in args.overrides)  # --set KNOB wins over --knob
    return UpscaleConfig.load(args.config, **flags)
