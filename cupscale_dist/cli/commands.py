"""The commands that run the method here or on a Ray cluster: upscale, caption, batch, eval, knobs, presets."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from ..config import UpscaleConfig, preset_names
from ..errors import UserError
from ..files.userfile import check_path_text
from .options import add_cluster_options, add_run_options, config_from_args

BATCH_EXAMPLES = """examples:
  cupscale batch --input photos/ --output up/ --config cpu-demo --gpus-per-actor 0 --cpus-per-actor 0.5 --workers 2
  cupscale batch --input 'photos/**/*.jpg' --output /data/up --config sdxl-4k          # one GPU per worker
  cupscale batch --input list.parquet --output /data/up --config sdxl-4k  # columns: path [, prompt, seed, ...]
  cupscale batch --input big/ --output /data/16k --config sdxl-16k --tile-parallel --actors 8
A rerun skips inputs already in DIR/manifest.parquet with the same config; bad inputs become error rows.
"""


EVAL_EXAMPLES = """examples:
  cupscale eval --config cpu-demo --out eval/              # the demo's held-out photos, x2: table + eval.json + crops
  cupscale eval --config cpu-demo --out eval/ --overwrite  # again, into the same folder
  cupscale eval originals/*.png --config sdxl-4k --scale 4 --json
  cupscale eval originals/*.png --config sdxl-4k --inception pt_inception-2015-12-05-6726825d.pth --clip clip-vit-l-14/
Each original is centre-cropped to a multiple of 32 x scale px, downscaled by the scale (bicubic) and upscaled back.
"""


# Arguments and knobs that name a file or folder: a name no file system takes (5,000 characters, a NUL) is one line
# before anything opens it, not `OSError: File name too long` from deep inside (issue 35).
PATH_ARGS = {"input": "input", "output": "--output", "config": "--config", "checkpoint_dir": "--checkpoint-dir",
             "originals": "original", "out": "--out", "inception": "--inception", "clip": "--clip"}
PATH_KNOBS = ("model", "model_config", "lora", "controlnet", "upscale_model", "captioner_model", "regional_prompts")


def check_path_args(args: argparse.Namespace, config: UpscaleConfig | None = None) -> None:
    """Every path argument (and, given ``config``, every path knob) of a command: one UserError for a name no file
    can have. Without ``config`` the knobs come from their flags and ``--set``."""
    values = [("--input" if name == "input" and getattr(args, "command", None) == "batch" else flag,
               getattr(args, name, None)) for name, flag in PATH_ARGS.items()]
    if config is None:
        values += [(f"--{name.replace('_', '-')}", getattr(args, name, None)) for name in PATH_KNOBS]
        values += [(f"--set {key}", text) for key, text in getattr(args, "overrides", []) if key in PATH_KNOBS]
    else:
        values += [(name, getattr(config, name, None)) for name in PATH_KNOBS]
    for flag, value in values:
        for one in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(one, str):
                check_path_text(one, flag)


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="quality figures: downscale originals, upscale them back, compare (table or JSON)",
                        epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("originals", nargs="*",
                    help="high-resolution originals (default: the demo model's held-out photos)")
    ev.add_argument("--out", metavar="DIR", help="write eval.json, the upscales and side-by-side crops (bicubic | "
                                                  "ours | original) here (created if missing)")
    ev.add_argument("--overwrite", action="store_true", help="replace files an earlier eval wrote in --out (an "
                                                             "original is never replaced)")
    ev.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    ev.add_argument("--inception", metavar="FILE",
                    help="FID Inception weights file: adds FID, KID and IS (whole and crops)")
    ev.add_argument("--clip", metavar="DIR", help="local transformers CLIP model directory: adds CLIP score")
    ev.add_argument("--crops-per-image", dest="crops_per_image", type=int, default=10, metavar="N",
                    help="random crops per image for the patch FID/KID/IS (default 10)")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_run_options(ev)


def add_batch_parser(sub) -> None:
    batch = sub.add_parser("batch", help="upscale a folder, glob or parquet of images with Ray Data",
                           epilog=BATCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_argument("--input", required=True, metavar="DIR|GLOB|FILE.parquet",
                       help="a folder (recursive), a glob, or a parquet with a 'path' column (+ prompt, seed, ...)")
    batch.add_argument("--output", required=True, metavar="DIR", help="output folder; also holds manifest.parquet")
    batch.add_argument("--workers", type=int, help="images in parallel, one actor each (default: one per GPU, else 1)")
    batch.add_argument("--tile-parallel", dest="tile_parallel", action="store_true",
                       help="one image at a time, its views spread over --actors denoisers (for 8K/16K)")
    batch.add_argument("--retry-errors", dest="retry_errors", action="store_true",
                       help="also redo inputs the manifest records as bad (failed runs are always redone)")
    batch.add_argument("--dry-run", action="store_true", help="print what would be done (names, skips) and exit")
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_run_options(batch)
    add_cluster_options(batch)


def cmd_upscale(args: argparse.Namespace) -> int:
    from ..execution.raycluster import ClusterOptions
    from ..files.imageio import check_output_path, load_input, temp_beside
    from ..plan import check_inputs
    from ..services.checkpoint import Checkpointer, image_sha
    from ..services.runner import run_upscale

    check_path_args(args)  # before the config file is read
    config = config_from_args(args)
    check_path_args(args, config)  # the path knobs a config file set
    # a dry run writes nothing
    output = check_output_path(args.output, args.overwrite or args.dry_run, source=args.input)
    image, carried = load_input(args.input, config.max_input_pixels, config.min_input_side)
    if args.dry_run:  # the plan, checked as the run checks it (a checkpoint only matters to a run)
        from ..method.parts import describe_parts

        plan = check_inputs(image.size, config, output=output)
        described = plan.describe()  # + each actor's band and halo (with --actors N, else for 1 actor)
        described["parts"] = describe_parts(plan.stages, config, args.actors or 1)
        print(json.dumps(described, indent=2))
        return 0
    resuming = args.resume and args.checkpoint_dir
    checkpoint = (Checkpointer(args.checkpoint_dir, args.checkpoint_every, config.config_hash(), image_sha(image))
                  if resuming else None)
    plan = check_inputs(image.size, config, output=output, checkpoint=checkpoint)  # fail before any model loads
    cluster = ClusterOptions(args.actors, args.address, args.gpus_per_actor, args.cpus_per_actor, args.start_timeout)
    partial = temp_beside(output)  # the result goes here first (and the directory proves it takes new files)
    try:  # without --overwrite the result claims its name exclusively: of two racing runs one wins
        run_upscale(image, config, output, source=args.input, progress=not args.quiet, cluster=cluster,
                    checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
                    overwrite=args.overwrite, temp=partial, carried=carried)
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {output} ({plan.output_size[0]}x{plan.output_size[1]})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..files.imageio import load_image
    from ..quality.evaluate import check_out_dir, evaluate, format_table, held_out_originals

    check_path_args(args)  # before the config file is read
    config = config_from_args(args)
    check_path_args(args, config)  # the path knobs a config file set
    if args.crops_per_image < 1:
        raise UserError(f"--crops-per-image {args.crops_per_image}: give at least 1")
    if args.out:
        check_out_dir(args.out)  # before the originals are read (evaluate() checks every output name, before upscaling)
    originals = ([(path, load_image(path, config.max_input_pixels, config.min_input_side)) for path in args.originals]
                 or held_out_originals())
    report = evaluate(originals, config, out_dir=args.out, progress=not args.quiet, inception=args.inception,
                      clip=args.clip, crops_per_image=args.crops_per_image, overwrite=args.overwrite)
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from ..files.imageio import load_image
    from ..plan import check_inputs
    from ..services.caption import caption_views

    check_path_args(args)  # before the config file is read
    config = config_from_args(args)
    check_path_args(args, config)  # the path knobs a config file set
    image = load_image(args.input, config.max_input_pixels, config.min_input_side)
    plan = check_inputs(image.size, config)
    print(json.dumps(caption_views(image, config, plan if args.tiles else None), indent=2))
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from ..execution.raycluster import ClusterOptions
    from ..services.batch.run import run_batch, summarize_errors

    check_path_args(args)  # before the config file is read
    config = config_from_args(args)
    check_path_args(args, config)  # the path knobs a config file set
    cluster = ClusterOptions(args.actors, args.address, args.gpus_per_actor, args.cpus_per_actor, args.start_timeout)
    summary = run_batch(args.input, args.output, config, cluster=cluster, workers=args.workers,
                        tile_parallel=args.tile_parallel, retry_errors=args.retry_errors, progress=not args.quiet,
                        dry_run=args.dry_run)
    if args.dry_run:
        print(json.dumps(summary.planned, indent=2))
    for line in summarize_errors(summary.rows):
        print(line, file=sys.stderr)
    print(summary.line())
    return 0


def cmd_knobs(_: argparse.Namespace) -> int:
    for f in fields(UpscaleConfig):
        print(f"{f.name:18} {f.default!r:40} {f.metadata.get('why', '')}")
    return 0


def cmd_presets(_: argparse.Namespace) -> int:
    print("\n".join(preset_names()))
    return 0
