"""`cupscale`: creatively upscale images with C-Upscale.

Usage:
    cupscale upscale IN.png -o OUT.png [--scale 2|4|8|16 | --size WxH] [--config PRESET|FILE] [options]
    cupscale batch --input DIR|GLOB|FILE.parquet --output DIR [--workers N] [--tile-parallel] [options]
    cupscale submit [--address URL] [--wait] -- upscale|batch ARGS...     run it as a Ray Job on a cluster
    cupscale jobs list|status ID|logs ID|stop ID [--address URL]
    cupscale serve [--host 127.0.0.1] [--port 8000] [--results DIR] [--queue N] [--token-file FILE] [options]
    cupscale knobs                      list every config knob with its default and reason
    cupscale presets                    list the bundled presets

Errors are one line on stderr and a non-zero exit; nothing is written or overwritten on error.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from typing import NoReturn

from ..errors import UserError
from .cluster import add_jobs_parsers, add_serve_parser, cmd_jobs, cmd_serve, cmd_submit
from .commands import (
    add_batch_parser,
    add_eval_parser,
    cmd_batch,
    cmd_caption,
    cmd_eval,
    cmd_knobs,
    cmd_presets,
    cmd_upscale,
)
from .options import add_cluster_options, add_run_options

EXAMPLES = """examples:
  cupscale upscale examples/astronaut.png -o astronaut-2x.png --config cpu-demo     # the small demo model, CPU
  cupscale upscale photo.png -o photo-4k.png --config sdxl-4k --prompt "a harbour at dusk"
  cupscale upscale photo.png -o photo-8k.png --config sdxl-8k --dry-run              # print the plan only
  cupscale upscale photo.png -o out.png --model /models/sdxl --set lambda_global=0.7 --set jitter=8
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr, like every other error (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"cupscale: error: {one_line(message)}; see `{self.prog} --help`\n")


# What str.splitlines (and a terminal) breaks a line at: never inside an error line, whatever a value held.
LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


def one_line(text: str) -> str:
    """``text`` with every line break written as its escape (``\\r``): the error contract is one line on stderr."""
    return "".join(repr(char)[1:-1] if char in LINE_BREAKS else char for char in text)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cupscale", description=__doc__.split("\n\n")[0],
                           epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step is doing")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    up = sub.add_parser("upscale", help="upscale one image", epilog=EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("input", help="input image (PNG, JPEG, WebP, TIFF, ...)")
    up.add_argument("-o", "--output", required=True,
                    help="output .png or .tif/.tiff (tiled BigTIFF), written band by band, or .webp/.jpg (whole, "
                         "through PIL; WebP up to 16383 px a side); carries the run's parameters and the input's "
                         "A1111/ComfyUI metadata")
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
    cap.add_argument("--tiles", action="store_true",
                     help="caption every view of every stage (the --regional-prompts format)")
    add_run_options(cap)
    add_batch_parser(sub)
    add_jobs_parsers(sub)
    add_eval_parser(sub)
    add_serve_parser(sub)
    sub.add_parser("knobs", help="list every knob with its default and reason")
    sub.add_parser("presets", help="list the bundled presets")
    # `submit` checks the job's own argv with this same parser before anything is sent (no import back up here).
    parser.set_defaults(parse_argv=parser.parse_args)
    return parser


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
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    warnings_to_log()
    quiet_libraries(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        release_ray()  # Ray logs as it shuts down: now, above the error line, not after it at exit
        close_progress_bars()
        sys.stderr.flush()
        print(f"cupscale: error: {one_line(str(exc))}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        close_progress_bars()
        print("cupscale: interrupted; no output was written", file=sys.stderr)
        return 130


def warnings_to_log() -> None:
    """Python warnings (torch's, Ray's) become one-line log records (logger ``py.warnings``), not the multi-line
    text ``warnings`` prints: an error stays one line, and the last one on stderr."""
    import warnings

    log = logging.getLogger("py.warnings")

    def to_log(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001 - warnings' signature
        text = (str(message).strip().splitlines() or [""])[0]
        log.warning("%s:%s: %s: %s", filename, lineno, category.__name__, text)

    warnings.showwarning = to_log


def close_progress_bars() -> None:
    """End the lines of progress bars a failed step left open (tqdm draws with ``\\r`` and no newline until it
    closes), so that the error is a line of its own."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        bar.close()


def release_ray() -> None:
    """Shut down the Ray this process started or joined, if any (its atexit hook would log after our last line)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - the user's error is what matters now
            logging.getLogger(__name__).debug("ray.shutdown failed", exc_info=True)


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
