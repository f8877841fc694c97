"""Step 4 of a batch: one image, loaded, upscaled and saved into a manifest row (the same function for the Ray
Data worker and the tile-parallel driver), and :class:`UpscaleWorker`, the thin Ray Data callable class around it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path

import pyarrow as pa

from ...config import UpscaleConfig
from ...errors import UserError
from .manifest import MANIFEST_SCHEMA, STATUS_ERROR, STATUS_FAILED, STATUS_OK, Journal, utc_now

log = logging.getLogger(__name__)


ATTEMPTS_DIR = ".cupscale-attempts"  # per-input attempt markers of the running batch (removed at the end)


MAX_ATTEMPTS = 2  # Ray retries a task whose worker process died forever; an input that kills its worker twice
#                   (host OOM, a crashing codec) becomes a 'failed' row instead of taking down every restart


# ---------------------------------------------------------------------------------------------------------------
# 3. Resume
# ---------------------------------------------------------------------------------------------------------------
def item_config(config: UpscaleConfig, overrides: dict) -> UpscaleConfig:
    """The config of one row: the batch config plus the row's own prompt / seed / regional prompts."""
    return config.replace(**overrides)


# ---------------------------------------------------------------------------------------------------------------
# 4. One image (the same function for the Ray Data worker and the tile-parallel driver)
# ---------------------------------------------------------------------------------------------------------------
def base_row(item: dict) -> dict:
    """A manifest row for ``item`` before anything is known about it ('failed' until proven otherwise)."""
    return {"input_path": item["input_path"], "output_path": None, "status": STATUS_FAILED, "error": None,
            "input_bytes": item.get("input_bytes"), "input_mtime_ns": item.get("input_mtime_ns"),
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


def config_fields(config: UpscaleConfig) -> dict:
    """The manifest's record of what a row ran with."""
    return {"prompt": config.prompt, "negative_prompt": config.negative_prompt, "seed": config.seed,
            "model": config.model, "regional_prompts": config.regional_prompts, "captioner": config.captioner,
            "config_hash": config.config_hash()}


def process_item(item: dict, config: UpscaleConfig, output_dir: Path, executor=None) -> dict:
    """Load, upscale, save one input; always returns its manifest row (errors become ``error``/``failed`` rows)."""
    from ...files.imageio import load_input, save_png
    from ...pipeline import upscale
    from ..runner import run_metadata

    start = time.perf_counter()
    row = base_row(item)
    try:
        cfg = item_config(config, item["overrides"])
        row.update(config_fields(cfg))
        image, carried = load_input(item["input_path"], cfg.max_input_pixels, cfg.min_input_side)
        row.update(input_width=image.width, input_height=image.height)
        plan = check_item_plan(item["input_path"], image.size, cfg)
        loaded = time.perf_counter()
        result = upscale(image, cfg, executor=executor, plan=plan, progress=False)
        upscaled = time.perf_counter()
        target = output_dir / item["output_path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        save_png(result, target, run_metadata(plan, item["input_path"]), carried=carried)
        row.update(status=STATUS_OK, output_path=item["output_path"], output_width=result.width,
                   output_height=result.height, load_s=loaded - start, upscale_s=upscaled - loaded,
                   save_s=time.perf_counter() - upscaled)
    except UserError as exc:
        row.update(status=STATUS_ERROR, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure is this row's failure, never the dataset's
        first = (str(exc).strip().splitlines() or [""])[0]
        row.update(status=STATUS_FAILED, error=f"{type(exc).__name__}: {first}; rerun the batch to retry it")
        log.exception("input %s failed", item["input_path"])
    row.update(total_s=time.perf_counter() - start, finished_at=utc_now())
    return row


def check_item_plan(input_path: str, size: tuple[int, int], config: UpscaleConfig):
    """What `cupscale upscale` checks before any work (:func:`cupscale_dist.plan.check_inputs`), per input, with the
    input named in the error."""
    from ...plan import check_inputs

    try:
        return check_inputs(size, config)
    except UserError as exc:
        raise UserError(f"input {input_path}: {exc}") from None


class AttemptLedger:
    """Counts attempts per input in files under the output dir, so a retried task sees that its worker died."""

    def __init__(self, output_dir: Path):
        self.directory = output_dir / ATTEMPTS_DIR

    def _path(self, input_path: str) -> Path:
        return self.directory / hashlib.sha1(input_path.encode()).hexdigest()

    def begin(self, input_path: str) -> int:
        """Record one more attempt; returns how many there have been, this one included."""
        path = self._path(input_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            count = int(path.read_text() or 0) + 1
        except (OSError, ValueError):
            count = 1
        path.write_text(str(count))
        return count

    def end(self, input_path: str) -> None:
        self._path(input_path).unlink(missing_ok=True)

    def clear(self) -> None:
        if self.directory.is_dir():
            for marker in self.directory.iterdir():
                marker.unlink(missing_ok=True)
            self.directory.rmdir()


class UpscaleWorker:
    """Ray Data callable class: loads the model once, then upscales one image per call (thin, like ``_MapWorker``)."""

    def __init__(self, config: UpscaleConfig, output_dir: str):
        from ...execution.executor import open_executor

        self.config, self.output_dir = config, Path(output_dir)
        self.executor = open_executor(config, keep=True)  # in this Ray Data worker's process, for every row
        self.ledger = AttemptLedger(self.output_dir)
        self.journal = Journal(self.output_dir)

    def __repr__(self) -> str:
        return f"UpscaleWorker(pid={os.getpid()}, {self.executor!r})"

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for item in map(json.loads, batch.column("item").to_pylist()):
            if self.ledger.begin(item["input_path"]) > MAX_ATTEMPTS:
                row = base_row(item)
                row.update(error=f"the worker process died {MAX_ATTEMPTS} times on this input (out of memory? "
                                 "see the Ray logs); rerun the batch to retry it", finished_at=utc_now())
            else:
                row = process_item(item, self.config, self.output_dir, self.executor)
            self.journal.append(row)  # durable before the driver hears of it: a killed driver loses nothing
            self.ledger.end(item["input_path"])
            rows.append(row)
        return pa.Table.from_pylist([{n: r.get(n) for n in MANIFEST_SCHEMA.names} for r in rows],
                                    schema=MANIFEST_SCHEMA)
