"""`cupscale`: creatively upscale images with C-Upscale.

Usage:
    cupscale upscale IN.png -o OUT.png [--scale 2|4|8|16 | --size WxH] [--config PRESET|FILE] [options]
    cupscale knobs                      list every config knob with its default and reason
    cupscale presets                    list the bundled presets

Errors are one line on stderr and a non-zero exit; nothing is written or overwritten on error.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

from .config import UpscaleConfig, preset_names
from .errors import UserError

EXAMPLES = """examples:
  cupscale upscale examples/astronaut.png -o astronaut-2x.png --config cpu-demo     # tiny random demo model, CPU
  cupscale upscale photo.png -o photo-4k.png --config sdxl-4k --prompt "a harbour at dusk"
  cupscale upscale photo.png -o photo-8k.png --config sdxl-8k --dry-run              # print the plan only
  cupscale upscale photo.png -o out.png --model /models/sdxl --set lambda_global=0.7 --set jitter=8
"""


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r} is not WxH; use e.g. --size 4096x4096") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"--size {text!r} must be positive; use e.g. --size 4096x4096")
    return width, height


def parse_set(text: str) -> tuple[str, str]:
    """``KEY=VALUE``; the value is typed by :func:`set_value` once the knob is known."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set {text!r} is not KEY=VALUE; use e.g. --set lambda_global=0.7")
    key, value = text.split("=", 1)
    return key.strip(), value


def set_value(name: str, text: str) -> object:
    """A --set value: verbatim for text knobs (prompts, paths, choices), else YAML (numbers, true/false, [W, H])."""
    import yaml

    annotation = next((f.type for f in fields(UpscaleConfig) if f.name == name), None)
    if isinstance(annotation, str) and (annotation in ("str", "str | None") or annotation.startswith("Literal")):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"--set {name}={text}: not a number, true/false or [list]; use e.g. --set {name}=0.5") from None


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that runs the method (defined once)."""
    group = parser.add_argument_group("method")
    group.add_argument("--config", help=f"preset ({', '.join(preset_names())}) or YAML file; flags override it")
    group.add_argument("--model", help="hub id, local diffusers dir, or 'demo' (tiny random weights, plumbing only)")
    group.add_argument("--prompt", help="global prompt (default: the captioner's caption, or none)")
    group.add_argument("--negative-prompt", dest="negative_prompt")
    scale = group.add_mutually_exclusive_group()
    scale.add_argument("--scale", type=int, help="2, 4, 8 or 16 (x2 per stage)")
    scale.add_argument("--size", type=parse_size, help="exact output size WxH")
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


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr, like every other error (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"cupscale: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cupscale", description=__doc__.split("\n\n")[0],
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step is doing")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    up = sub.add_parser("upscale", help="upscale one image", epilog=EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("input", help="input image (PNG, JPEG, WebP, TIFF, ...)")
    up.add_argument("-o", "--output", required=True, help="output .png (carries the run's parameters)")
    up.add_argument("--overwrite", action="store_true", help="replace an existing output")
    up.add_argument("--dry-run", action="store_true", help="print the plan (stages, views, UNet evaluations) and exit")
    up.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_run_options(up)
    add_cluster_options(up)
    ckpt = up.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpoint-dir", dest="checkpoint_dir", help="keep a checkpoint of the latent here")
    ckpt.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=1, metavar="K",
                      help="write the checkpoint every K steps (default 1)")
    ckpt.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    cap = sub.add_parser("caption", help="print the global caption (and, with --tiles, one prompt per view) as JSON")
    cap.add_argument("input", help="input image")
    cap.add_argument("--tiles", action="store_true", help="caption every view of every stage (the --regional-prompts format)")
    add_run_options(cap)
    sub.add_parser("knobs", help="list every knob with its default and reason")
    sub.add_parser("presets", help="list the bundled presets")
    return parser


def cmd_upscale(args: argparse.Namespace) -> int:
    from .imageio import check_output_path, load_image
    from .orchestrator import ClusterOptions
    from .plan import describe_plan
    from .runner import run_upscale

    config = config_from_args(args)
    output = check_output_path(args.output, args.overwrite or args.dry_run)  # a dry run writes nothing
    image = load_image(args.input, config.max_input_pixels, config.min_input_side)
    try:
        plan = describe_plan(image.size, config)
    except ValueError as exc:
        raise UserError(f"{exc}; ask for a larger --size or a --scale of 2, 4, 8 or 16") from None
    if args.dry_run:
        print(json.dumps(plan, indent=2))
        return 0
    if config.regional_prompts:
        from .captioner import check_view_count, read_prompt_file

        for entry in read_prompt_file(Path(config.regional_prompts)).get("stages", []):  # fail before any model loads
            stage = entry.get("stage")
            if isinstance(stage, int) and 0 <= stage < len(plan["stages"]):
                check_view_count(config.regional_prompts, stage, len(entry["views"]), plan["stages"][stage]["views_per_step"])
    cluster = ClusterOptions(args.actors, args.address, args.gpus_per_actor, args.cpus_per_actor, args.start_timeout)
    run_upscale(image, config, output, source=args.input, progress=not args.quiet, cluster=cluster,
                checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume)
    print(f"wrote {output} ({plan['output'][0]}x{plan['output'][1]})")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from .caption import caption_views
    from .imageio import load_image

    config = config_from_args(args)
    image = load_image(args.input, config.max_input_pixels, config.min_input_side)
    print(json.dumps(caption_views(image, config, args.tiles), indent=2))
    return 0


def cmd_knobs(_: argparse.Namespace) -> int:
    for f in fields(UpscaleConfig):
        print(f"{f.name:18} {f.default!r:40} {f.metadata.get('why', '')}")
    return 0


def cmd_presets(_: argparse.Namespace) -> int:
    print("\n".join(preset_names()))
    return 0


COMMANDS = {"upscale": cmd_upscale, "caption": cmd_caption, "knobs": cmd_knobs, "presets": cmd_presets}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 0
    if not argv[0].startswith("-") and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean `cupscale {close[0]}`?" if close else f"; commands: {', '.join(COMMANDS)}"
        print(f"cupscale: error: unknown command {argv[0]!r}{hint}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"cupscale: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cupscale: interrupted; no output was written", file=sys.stderr)
        return 130


def quiet_libraries(verbose: bool) -> None:
    """diffusers/transformers print load bars and advice on every load; keep stderr for what matters."""
    import warnings

    if verbose:
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dl
        from transformers.utils import logging as tl

        dl.set_verbosity_error(), tl.set_verbosity_error(), dl.disable_progress_bar(), tl.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
