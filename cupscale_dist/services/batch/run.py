"""Dataset-wide upscaling with Ray Data: a folder, a glob or a parquet of paths in; images + a manifest out.

Usage:
    cupscale batch --input DIR|GLOB|FILE.parquet --output DIR [--config PRESET] [--workers N] [--tile-parallel]

Flow (:func:`run_batch`), read top to bottom:
    1. list the inputs (a parquet may add per-row ``prompt``, ``negative_prompt``, ``regional_prompts``, ``seed``)
    2. give each a safe output name (no path traversal, never an input, collisions resolved deterministically)
    3. skip what ``manifest.parquet`` already records as done with the same config hash (resumable)
    4. run the rest: a Ray Data actor pool (:class:`UpscaleWorker`, one image per call, one GPU per worker by
       default), or with ``tile_parallel`` one image at a time through the tile orchestrator's actors
    5. write one manifest row per input as results arrive; a bad input is an error row, never a stopped dataset

Inputs and outputs are plain paths: on a multi-node cluster they must be on storage every node mounts at the
same path (the KubeRay manifests in ``cluster/`` mount one volume at ``/data``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ...config import UpscaleConfig
from ...errors import UserError
from .inputs import Item, list_inputs
from .manifest import (
    MANIFEST_NAME,
    STATUS_ERROR,
    STATUS_FAILED,
    STATUS_OK,
    Journal,
    ManifestWriter,
    OutputLock,
    is_done,
    read_manifest,
    utc_now,
)
from .naming import assign_outputs
from .worker import AttemptLedger, UpscaleWorker, base_row, item_config, process_item

log = logging.getLogger(__name__)

MAX_BLOCKS = 4096  # one image per block balances the pool (images take seconds to minutes each); past a few


# ---------------------------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class BatchSummary:
    manifest: Path
    total: int  # inputs of this run
    done: int  # upscaled now
    skipped: int  # already done (same config hash, same input)
    errors: int  # bad inputs found now
    failed: int  # broken runs (retried on the next run)
    planned: list[dict] = field(default_factory=list)  # per input: input, output, action (for --dry-run)
    rows: list[dict] = field(default_factory=list)  # the manifest rows written by this run
    dry_run: bool = False
    todo: list[Item] = field(default_factory=list, repr=False)  # inputs to upscale (set by planning)
    bad: list[Item] = field(default_factory=list, repr=False)  # inputs known bad before any work
    previous: dict[str, dict] = field(default_factory=dict, repr=False)  # the manifest as it was, by input path

    def line(self) -> str:
        if self.dry_run:
            todo = sum(p["action"] == "upscale" for p in self.planned)
            return (f"batch (dry run): {self.total} inputs: {todo} to upscale, {self.skipped} already done, "
                    f"{self.errors} known bad; nothing was written")
        return (f"batch: {self.total} inputs: {self.done} upscaled, {self.skipped} already done, {self.errors} bad "
                f"inputs, {self.failed} failed; manifest {self.manifest}")


def run_batch(input_spec: str, output_dir: str | os.PathLike, config: UpscaleConfig, *, cluster=None,
              workers: int | None = None, tile_parallel: bool = False, retry_errors: bool = False,
              progress: bool = True, dry_run: bool = False) -> BatchSummary:
    """Upscale every input of ``input_spec`` into ``output_dir`` and keep ``output_dir/manifest.parquet``.

    Args:
        input_spec (str): a directory (recursive), a glob, an image file, or a parquet with a ``path`` column and
            optional ``prompt`` / ``negative_prompt`` / ``regional_prompts`` / ``seed`` columns.
        output_dir (path): created if missing; outputs mirror the inputs' relative paths, as ``.png``.
        config (UpscaleConfig): the method's knobs for every image (per-row parquet fields override).
        cluster (ClusterOptions, *optional*): where to run; ``gpus_per_actor`` / ``cpus_per_actor`` size each
            worker (default: 1 GPU when the cluster has GPUs, else CPU only).
        workers (int, *optional*): Ray Data pool size (default: one per GPU, else 1).
        tile_parallel (bool): one image at a time, its views fanned out to ``cluster.actors`` denoiser actors
            (for 8K/16K, where one image needs the whole cluster).
        retry_errors (bool): redo inputs recorded as bad (``error`` rows); ``failed`` rows are always redone.
        dry_run (bool): plan only (names, what would be skipped); nothing runs or is written.
    """
    from ...execution.raycluster import ClusterOptions

    cluster = cluster or ClusterOptions()
    # 1. Check inputs.
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: use a positive number of image workers")
    if tile_parallel and workers is not None:
        raise UserError("--workers sets images in parallel; --tile-parallel runs one image at a time on all "
                        "denoisers: size it with --actors instead")
    if not tile_parallel and cluster.actors is not None:
        raise UserError("--actors sets the denoisers of one image and needs --tile-parallel; "
                        "for images in parallel use --workers N")
    output_dir = _prepare_output_dir(Path(os.path.expanduser(output_dir)), create=not dry_run)
    if dry_run:
        return _plan_batch(input_spec, output_dir, config, retry_errors, dry_run=True)
    with OutputLock(output_dir):  # before reading the manifest: what it says must not change under us
        summary = _plan_batch(input_spec, output_dir, config, retry_errors, dry_run=False)
        _run_planned(summary, config, output_dir, cluster, workers, tile_parallel, progress)
    return summary


def _plan_batch(input_spec: str, output_dir: Path, config: UpscaleConfig, retry_errors: bool,
                dry_run: bool) -> BatchSummary:
    """Steps 1-3: the inputs, their output names and configs, and what is left to do (``summary.todo``)."""
    manifest = output_dir / MANIFEST_NAME
    previous = read_manifest(manifest)
    produced = {str((output_dir / r["output_path"]).resolve()) for r in previous.values() if r.get("output_path")}
    items = list_inputs(input_spec, output_dir, produced)
    # 2. Output names, per-row configs and input fingerprints.
    assign_outputs(items, output_dir, previous)
    for item in items:
        if item.error is None:
            try:
                item.config_hash = item_config(config, item.overrides).config_hash()
            except UserError as exc:
                item.error = f"input {item.input_path}: {exc}"
        try:
            stat = os.stat(item.input_path)
            item.input_bytes, item.input_mtime_ns = stat.st_size, stat.st_mtime_ns
        except OSError:
            pass
    # 3. What is left to do.
    todo = [i for i in items
            if i.error is None and not is_done(i, previous.get(i.input_path), output_dir, retry_errors)]
    bad = [i for i in items if i.error is not None]
    summary = BatchSummary(manifest, len(items), 0, len(items) - len(todo) - len(bad), 0, 0)
    todo_paths = {i.input_path for i in todo}
    summary.planned = [{"input": i.input_path, "output": i.output_path, "action": "error" if i.error else
                        ("upscale" if i.input_path in todo_paths else "skip")} for i in items]
    if dry_run:
        summary.errors, summary.dry_run = len(bad), True
    summary.todo, summary.bad, summary.previous = todo, bad, previous
    return summary


def _run_planned(summary: BatchSummary, config: UpscaleConfig, output_dir: Path, cluster, workers: int | None,
                 tile_parallel: bool, progress: bool) -> None:
    """Steps 4-5: run what is left, recording every row durably as it finishes."""
    todo, bad = summary.todo, summary.bad
    writer, journal = ManifestWriter(summary.manifest, summary.previous), Journal(output_dir)
    writer.write()  # rows a killed run left in the journal go into the parquet first
    journal.clear()

    def on_row(row: dict) -> None:
        writer.add(row)
        summary.rows.append(row)
        summary.done += row["status"] == STATUS_OK
        summary.errors += row["status"] == STATUS_ERROR
        summary.failed += row["status"] == STATUS_FAILED
        if row["status"] != STATUS_OK:
            log.info("%s: %s", row["input_path"], row["error"])

    def record(row: dict) -> None:  # a row made here, on the driver: journal it too (workers journal their own)
        journal.append(row)
        on_row(row)

    for item in bad:
        row = base_row({"input_path": item.input_path, "input_bytes": item.input_bytes,
                        "input_mtime_ns": item.input_mtime_ns})
        row.update(status=STATUS_ERROR, error=item.error, finished_at=utc_now())
        record(row)
    # 4. Run: a Ray Data actor pool over images, or the tile orchestrator image by image.
    try:
        if todo and tile_parallel:
            _run_tile_parallel(todo, config, output_dir, cluster, record, progress)
        elif todo:
            _run_pool(todo, config, output_dir, cluster, workers, on_row, progress)
    finally:
        writer.rows.update((row["input_path"], row) for row in journal.rows())  # rows the driver never heard of
        writer.write()  # 5. whatever finished is recorded, also when the run is interrupted
        journal.clear()


def _prepare_output_dir(path: Path, create: bool) -> Path:
    if path.exists() and not path.is_dir():
        raise UserError(f"--output {path} is a file; give a directory for the upscaled images and the manifest")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"--output {path}: can't create it ({exc.strerror or exc}); "
                            "choose another directory") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"--output {path} is not writable; choose another directory")
    return path


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="img", desc="batch")


def image_worker_gpus(config: UpscaleConfig, cluster, cluster_gpus: float) -> float:
    """GPU share of one image worker: the chosen one, else a whole GPU, or, with a captioner, what that image's
    own captioner pool leaves of it (both then share one GPU, as in `upscale`; placement.py)."""
    from ...execution.placement import model_worker_share

    return model_worker_share(config, cluster.gpus_per_actor, cluster_gpus, spread_over=min(cluster_gpus, 1))


def _run_pool(todo: list[Item], config: UpscaleConfig, output_dir: Path, cluster, workers: int | None,
              on_row: Callable[[dict], None], progress: bool) -> None:
    """Ray Data: paths -> UpscaleWorker actor pool (one image per call) -> manifest rows, as they finish."""
    from ...execution.placement import worker_count
    from ...execution.raycluster import connect, root_cause

    ray = connect(cluster)
    from ray.data import ActorPoolStrategy, DataContext

    resources = ray.cluster_resources()
    gpus = image_worker_gpus(config, cluster, resources.get("GPU", 0))
    cpus = cluster.cpus_per_actor
    deadline = time.monotonic() + cluster.start_timeout_s  # an autoscaling cluster may still be adding nodes
    while gpus > resources.get("GPU", 0) or cpus > resources.get("CPU", 0):
        if time.monotonic() > deadline:
            raise UserError(f"one batch worker needs {gpus:g} GPU and {cpus:g} CPU but the cluster has "
                            f"{resources.get('GPU', 0):g} GPU and {resources.get('CPU', 0):g} CPU after "
                            f"{cluster.start_timeout_s:g} s; lower --gpus-per-actor/--cpus-per-actor "
                            "(--gpus-per-actor 0 runs on CPU) or raise --start-timeout")
        time.sleep(1.0)
        resources = ray.cluster_resources()
    count = worker_count(resources.get("GPU", 0), gpus, workers)
    fits = min(int(resources.get("GPU", 0) // gpus) if gpus else count,
               int(resources.get("CPU", 0) // cpus) if cpus else count)
    # All workers fit: a fixed pool. Otherwise start what fits and let the pool grow as an autoscaler adds nodes.
    if fits >= count:
        compute = ActorPoolStrategy(size=count)
    else:
        compute = ActorPoolStrategy(min_size=max(1, fits), max_size=count)
    context = DataContext.get_current()
    context.enable_progress_bars = False  # one bar (ours) counting images, not Ray Data's per-operator bars
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": we know
    if not log.isEnabledFor(logging.INFO):
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    AttemptLedger(output_dir).clear()
    log.info("batch: %d images on %d workers (%g GPU, %g CPU each)", len(todo), count, gpus, cpus)
    dataset = ray.data.from_items([{"item": i.to_json()} for i in todo], override_num_blocks=min(len(todo), MAX_BLOCKS))
    dataset = dataset.map_batches(UpscaleWorker, fn_constructor_args=(config, str(output_dir)), batch_size=1,
                                  batch_format="pyarrow", compute=compute, num_cpus=cpus, num_gpus=gpus)
    bar = _progress(len(todo), progress)
    try:
        for row in dataset.iter_rows():
            on_row(dict(row))
            bar.update(1)
    except ray.exceptions.RayError as exc:
        cause = root_cause(exc).removeprefix(f"{UserError.__module__}.{UserError.__name__}: ")
        raise UserError(f"batch workers failed: {cause}; finished images are in the manifest, rerun the same "
                        "command to resume") from None
    finally:
        bar.close()
    AttemptLedger(output_dir).clear()


def _run_tile_parallel(todo: list[Item], config: UpscaleConfig, output_dir: Path, cluster,
                       on_row: Callable[[dict], None], progress: bool) -> None:
    """One image at a time on this driver (which holds no weights); every forward pass of each image goes to one
    shared pool of model-worker actors."""
    from ...execution.executor import open_executor

    executor = open_executor(config, cluster, keep=True)  # loaded once, serves every image of the batch
    bar = _progress(len(todo), progress)
    try:
        for item in todo:
            on_row(process_item(json.loads(item.to_json()), config, output_dir, executor))
            bar.update(1)
    finally:
        bar.close()
        executor.release()


def summarize_errors(rows: Iterable[dict], limit: int = 5) -> list[str]:
    """The first few error lines of a manifest, for the CLI's closing report."""
    bad = [r for r in rows if r.get("status") != STATUS_OK]
    lines = [f"  {r['status']}: {r['error']}" for r in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more (see the manifest's 'error' column)")
    return lines
