"""`cupscale`: creatively upscale images with C-Upscale.

Usage:
    cupscale upscale IN.png -o OUT.png [--scale 2|4|8|16 | --size WxH] [--config PRESET|FILE] [options]
    cupscale batch --input DIR|GLOB|FILE.parquet --output DIR [--workers N] [--tile-parallel] [options]
    cupscale submit [--address URL] [--wait] -- upscale|batch ARGS...     run it as a Ray Job on a cluster
    cupscale jobs list|status ID|logs ID|stop ID [--address URL]
    cupscale serve [--host 127.0.0.1] [--port 8000] --results DIR [--queue N] [--token-file FILE] [options]
    cupscale knobs                      list every config knob with its default and reason
    cupscale presets                    list the bundled presets

Errors are one line on stderr and a non-zero exit; nothing is written or overwritten on error.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import NoReturn

from .config import UpscaleConfig, preset_names
from .errors import UserError

EXAMPLES = """examples:
  cupscale upscale examples/astronaut.png -o astronaut-2x.png --config cpu-demo     # the small demo model, CPU
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
    up.add_argument("-o", "--output", required=True, help="output .png or .tif/.tiff (tiled BigTIFF), written band by band, or .webp/.jpg (whole, through PIL; WebP up to 16383 px a side); carries the run's parameters and the input's A1111/ComfyUI metadata")
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
    add_batch_parser(sub)
    add_jobs_parsers(sub)
    add_eval_parser(sub)
    add_serve_parser(sub)
    sub.add_parser("knobs", help="list every knob with its default and reason")
    sub.add_parser("presets", help="list the bundled presets")
    return parser


BATCH_EXAMPLES = """examples:
  cupscale batch --input photos/ --output up/ --config cpu-demo --gpus-per-actor 0 --cpus-per-actor 0.5 --workers 2
  cupscale batch --input 'photos/**/*.jpg' --output /data/up --config sdxl-4k          # one GPU per worker
  cupscale batch --input list.parquet --output /data/up --config sdxl-4k  # columns: path [, prompt, seed, ...]
  cupscale batch --input big/ --output /data/16k --config sdxl-16k --tile-parallel --actors 8
A rerun skips inputs already in DIR/manifest.parquet with the same config; bad inputs become error rows.
"""

SUBMIT_EXAMPLES = """examples:
  cluster/start-local-head.sh /tmp/ray-head                      # a local head; prints the addresses
  cupscale submit --wait -- upscale /data/in.png -o /data/out.png --config cpu-demo
  cupscale submit --address http://head:8265 --working-dir . --entrypoint-num-gpus 1 -- upscale ...
  cupscale submit -- batch --input /data/in --output /data/out --config sdxl-4k
  cupscale jobs list; cupscale jobs logs raysubmit_XYZ --follow; cupscale jobs stop raysubmit_XYZ
Token auth: the token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
"""


EVAL_EXAMPLES = """examples:
  cupscale eval --config cpu-demo --out eval/              # the demo's held-out photos, x2: table + eval.json + crops
  cupscale eval originals/*.png --config sdxl-4k --scale 4 --json
  cupscale eval originals/*.png --config sdxl-4k --inception pt_inception-2015-12-05-6726825d.pth --clip clip-vit-l-14/
Each original is centre-cropped to a multiple of 32 x scale px, downscaled by the scale (bicubic) and upscaled back.
"""


SERVE_EXAMPLES = """examples:
  cupscale serve --results /tmp/cupscale-jobs --config cpu-demo          # http://127.0.0.1:8000/docs
  curl -s --data-binary @in.png 'http://127.0.0.1:8000/v1/upscale?scale=2&prompt=a+harbour'   # -> {"id": ...}
  curl -s http://127.0.0.1:8000/v1/jobs/ID; curl -so out.png http://127.0.0.1:8000/v1/jobs/ID/result
  cupscale serve --host 0.0.0.0 --token-file ~/.cupscale-token --results /data/jobs --config sdxl-4k --actors 4
Request knobs are the CLI's (`cupscale knobs`); model, device, dtype and limits are the service's (--config/--set).
"""


def add_serve_parser(sub) -> None:
    srv = sub.add_parser("serve", help="upscaling as an HTTP service (Ray Serve): submit, poll, fetch, cancel",
                         epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs "
                                                          "--token-file)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--results", required=True, metavar="DIR",
                     help="job records and results (shared storage on a multi-node cluster); kept across restarts")
    srv.add_argument("--queue", type=int, default=16, metavar="N", help="jobs that may wait; past it 429 (default 16)")
    srv.add_argument("--token-file", dest="token_file", metavar="FILE",
                     help="bearer token every /v1 request must send (required off loopback)")
    srv.add_argument("--max-request-mb", dest="max_request_mb", type=float, default=64.0, metavar="MB",
                     help="largest request body (default 64)")
    srv.add_argument("--dry-run", action="store_true", help="check the options and print the service's settings")
    add_run_options(srv)
    add_cluster_options(srv)


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    from .raycluster import ClusterOptions, connect
    from .serve import ServiceOptions, check_bind, read_token

    token = read_token(args.token_file)
    check_bind(args.host, token)
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: use 1..65535")
    if args.queue < 1:
        raise UserError(f"--queue {args.queue}: use 1 or more")
    if not args.max_request_mb > 0:
        raise UserError(f"--max-request-mb {args.max_request_mb}: use a positive number")
    config = config_from_args(args)
    results = Path(args.results).expanduser().resolve()
    results.mkdir(parents=True, exist_ok=True)
    cluster = ClusterOptions(args.actors, args.address, args.gpus_per_actor, args.cpus_per_actor, args.start_timeout)
    options = ServiceOptions(str(results), config, args.queue, token, int(args.max_request_mb * 2**20), cluster)
    url = f"http://{args.host}:{args.port}"
    if args.dry_run:
        print(json.dumps({"url": url, "results": str(results), "queue": args.queue, "token": bool(token),
                          "model": config.model, "config_hash": config.config_hash()}, indent=2))
        return 0
    from . import serve as service

    for key, value in service.SLOW_START_ENV.items():
        os.environ.setdefault(key, value)
    ray = connect(cluster)

    try:
        service.deploy(options, args.host, args.port)
        print(f"cupscale serve: {url} (API docs {url}/docs), results in {results}; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("cupscale serve: stopped; finished results stay in the results folder", file=sys.stderr)
        return 0
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="quality figures: downscale originals, upscale them back, compare (table or JSON)",
                        epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("originals", nargs="*", help="high-resolution originals (default: the demo model's held-out photos)")
    ev.add_argument("--out", metavar="DIR", help="write eval.json, the upscales and side-by-side crops (bicubic | ours | "
                                                  "original) here")
    ev.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    ev.add_argument("--inception", metavar="FILE", help="FID Inception weights file: adds FID, KID and IS (whole and crops)")
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


def add_jobs_parsers(sub) -> None:
    job_server = argparse.ArgumentParser(add_help=False)  # shared by submit and jobs (defined once)
    job_server.add_argument("--address", help="job server, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
                                              "else http://127.0.0.1:8265)")
    submit = sub.add_parser("submit", help="run `upscale` or `batch` as a Ray Job on a cluster", parents=[job_server],
                            epilog=SUBMIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    submit.add_argument("--wait", action="store_true", help="follow the job's log until it ends; exit 1 if it failed")
    submit.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up waiting after S seconds")
    submit.add_argument("--working-dir", dest="working_dir", metavar="DIR", help="folder shipped to the job (its cwd)")
    submit.add_argument("--pip", action="append", default=[], metavar="SPEC", help="pip package for the job, repeatable")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable, repeatable")
    submit.add_argument("--entrypoint-num-cpus", dest="entrypoint_num_cpus", type=float, metavar="N",
                        help="CPUs reserved for the job's driver")
    submit.add_argument("--entrypoint-num-gpus", dest="entrypoint_num_gpus", type=float, metavar="N",
                        help="GPUs reserved for the job's driver (default: 1 for `upscale --actors 0`, whose driver runs the "
                             "models; else none: drivers in Ray mode run no model)")
    submit.add_argument("--entrypoint-memory", dest="entrypoint_memory", type=int, metavar="BYTES",
                        help="memory reserved for the job's driver")
    submit.add_argument("--dry-run", action="store_true", help="print the submission (entrypoint, runtime_env) and exit")
    submit.add_argument("-q", "--quiet", action="store_true", help="with --wait: don't echo the job's log")
    submit.add_argument("job", nargs=argparse.REMAINDER, metavar="-- upscale|batch ARGS",
                        help="the cupscale command the job runs")
    jobs = sub.add_parser("jobs", help="list, inspect, follow or stop Ray Jobs", epilog=SUBMIT_EXAMPLES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    actions.add_parser("list", help="every job on the cluster", parents=[job_server])
    for name, text in (("status", "a job's status and message"), ("logs", "a job's log"), ("stop", "stop a job")):
        action = actions.add_parser(name, help=text, parents=[job_server])
        action.add_argument("job_id", metavar="ID", help="the submission id (raysubmit_...)")
        if name == "logs":
            action.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")


def cmd_upscale(args: argparse.Namespace) -> int:
    from .imageio import check_output_path, check_output_side, load_input, temp_beside
    from .raycluster import ClusterOptions
    from .plan import describe_plan
    from .runner import run_upscale

    config = config_from_args(args)
    output = check_output_path(args.output, args.overwrite or args.dry_run, source=args.input)  # a dry run writes nothing
    image, carried = load_input(args.input, config.max_input_pixels, config.min_input_side)
    try:
        plan = describe_plan(image.size, config)
    except ValueError as exc:
        raise UserError(f"{exc}; ask for a larger --size or a --scale of 2, 4, 8 or 16") from None
    config.check_output_size(tuple(plan["output"]))
    check_output_side(output, tuple(plan["output"]))
    if args.dry_run:
        print(json.dumps(plan, indent=2))
        return 0
    check_run_inputs(args, config, image, plan)  # fail before any model loads
    cluster = ClusterOptions(args.actors, args.address, args.gpus_per_actor, args.cpus_per_actor, args.start_timeout)
    partial = temp_beside(output)  # the result goes here first (and the directory proves it takes new files)
    try:  # without --overwrite the result claims its name exclusively: of two racing runs one wins
        run_upscale(image, config, output, source=args.input, progress=not args.quiet, cluster=cluster,
                    checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
                    overwrite=args.overwrite, temp=partial, carried=carried)
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {output} ({plan['output'][0]}x{plan['output'][1]})")
    return 0


def check_run_inputs(args: argparse.Namespace, config: UpscaleConfig, image, plan: dict) -> None:
    """What a run reads besides the image, checked against its plan: the regional-prompts file and, with
    ``--resume``, every field of the checkpoint (a wrong shape or step would give a traceback or a wrong image)."""
    if config.regional_prompts:
        from .captioner import check_prompt_file, read_prompt_file

        check_prompt_file(config.regional_prompts, read_prompt_file(Path(config.regional_prompts)), plan["stages"])
    if args.resume and args.checkpoint_dir:
        from .checkpoint import Checkpointer, ResumePlan, image_sha

        Checkpointer(args.checkpoint_dir, args.checkpoint_every, config.config_hash(), image_sha(image),
                     ResumePlan.from_plan(plan)).load()


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_table, held_out_originals
    from .imageio import load_image

    config = config_from_args(args)
    if args.crops_per_image < 1:
        raise UserError(f"--crops-per-image {args.crops_per_image}: give at least 1")
    originals = ([(path, load_image(path, config.max_input_pixels, config.min_input_side)) for path in args.originals]
                 or held_out_originals())
    report = evaluate(originals, config, out_dir=args.out, progress=not args.quiet, inception=args.inception,
                      clip=args.clip, crops_per_image=args.crops_per_image)
    print(json.dumps(report, indent=1) if args.json else format_table(report))
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from .caption import caption_views
    from .imageio import load_image
    from .pipeline import target_size

    config = config_from_args(args)
    image = load_image(args.input, config.max_input_pixels, config.min_input_side)
    config.check_output_size(target_size(image.size, config))
    print(json.dumps(caption_views(image, config, args.tiles), indent=2))
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from .batch import run_batch, summarize_errors
    from .raycluster import ClusterOptions

    config = config_from_args(args)
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


def cmd_submit(args: argparse.Namespace) -> int:
    from . import jobs

    argv = args.job[1:] if args.job[:1] == ["--"] else args.job
    env_vars = {}
    for pair in args.env:
        if "=" not in pair:
            raise UserError(f"--env {pair!r} is not KEY=VALUE; use e.g. --env HF_HUB_OFFLINE=1")
        key, value = pair.split("=", 1)
        env_vars[key] = value
    spec = jobs.JobSpec(argv, args.working_dir, args.pip, env_vars, args.entrypoint_num_cpus,
                        args.entrypoint_num_gpus, args.entrypoint_memory)
    job = build_parser().parse_args(argv)  # the job's own flags are checked here, before anything is sent
    if spec.entrypoint_num_gpus is None and driver_runs_models(job):
        spec.entrypoint_num_gpus = 1.0
        print("submit: reserving 1 GPU for the job's driver (`upscale --actors 0` runs every model in the driver); "
              "--entrypoint-num-gpus 0 runs it on CPU", file=sys.stderr)
    if args.dry_run:
        print(json.dumps({"address": jobs.job_server_address(args.address), **spec.request()}, indent=2))
        return 0
    job_id, address = jobs.submit(spec, args.address)
    print(f"submitted {job_id} to {address}", flush=True)
    if not args.wait:
        print(f"follow it with `cupscale jobs logs {job_id} --follow`")
        return 0
    try:
        info = jobs.follow(job_id, address, echo=not args.quiet, timeout_s=args.timeout)
    except KeyboardInterrupt:
        print(f"cupscale: stopped waiting; {job_id} keeps running (`cupscale jobs stop {job_id}` stops it)",
              file=sys.stderr)
        return 130
    if str(info.status) != "SUCCEEDED":
        raise UserError(f"job {job_id} {info.status}: {info.message}; see `cupscale jobs logs {job_id}`")
    print(f"job {job_id} SUCCEEDED")
    return 0


def driver_runs_models(job: argparse.Namespace) -> bool:
    """The one layout whose driver needs a GPU: the single-process reference (`upscale --actors 0`) on a GPU
    device. Every other job's driver runs no model (Ray mode, Ray Data workers) and fits a CPU-only head."""
    if job.command != "upscale" or job.actors != 0:
        return False
    return not config_from_args(job).device.startswith("cpu")


def cmd_jobs(args: argparse.Namespace) -> int:
    from . import jobs

    if args.jobs_command == "list":
        for job in jobs.list_jobs(args.address):
            print(jobs.format_job(job))
    elif args.jobs_command == "status":
        info = jobs.job_info(args.job_id, args.address)
        print(f"{args.job_id} {info.status}: {info.message or ''}".rstrip(": "))
    elif args.jobs_command == "logs" and args.follow:
        info = jobs.follow(args.job_id, args.address)
        print(f"job {args.job_id} {info.status}")
    elif args.jobs_command == "logs":
        print(jobs.job_logs(args.job_id, args.address), end="")
    else:
        stopped = jobs.stop_job(args.job_id, args.address)
        status = jobs.job_info(args.job_id, args.address).status
        print(f"stop requested for {args.job_id} ({status})" if stopped else f"{args.job_id} had already ended ({status})")
    return 0


def cmd_knobs(_: argparse.Namespace) -> int:
    for f in fields(UpscaleConfig):
        print(f"{f.name:18} {f.default!r:40} {f.metadata.get('why', '')}")
    return 0


def cmd_presets(_: argparse.Namespace) -> int:
    print("\n".join(preset_names()))
    return 0


COMMANDS = {"upscale": cmd_upscale, "caption": cmd_caption, "batch": cmd_batch, "submit": cmd_submit,
            "jobs": cmd_jobs, "eval": cmd_eval, "serve": cmd_serve, "knobs": cmd_knobs, "presets": cmd_presets}


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
    # Ray announces each local start and that token auth is on (we keep it on on purpose): noise on every run.
    logging.getLogger("ray._private.worker").setLevel(logging.WARNING)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dl
        from transformers.utils import logging as tl

        dl.set_verbosity_error(), tl.set_verbosity_error(), dl.disable_progress_bar(), tl.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
