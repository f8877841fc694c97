"""`cupscale batch` and its output folder under concurrency and kills (issue 13): one batch per folder (the
lock names its holder and dies with it), a rerun redoes an output that no longer matches its row, a killed driver
loses no finished image, a batch that fails before any work leaves no manifest, hidden files get a row.

Concurrency is tested with real processes held at a known point (SIGSTOP after they took the lock, SIGKILL
mid-run), never with sleeps that hope for an interleaving.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import CLI_FAST, cli_config, cupscale, finish, noisy_picture, stderr_error_line

from cupscale_dist import UserError
from cupscale_dist.execution.raycluster import ClusterOptions
from cupscale_dist.files.imageio import read_png_metadata, save_png
from cupscale_dist.services.batch.inputs import list_inputs
from cupscale_dist.services.batch.manifest import JOURNAL_DIR, LOCK_NAME, MANIFEST_NAME, Journal
from cupscale_dist.services.batch.run import run_batch

# The fast run: 64x64 -> 128x128 in one stage, views of 16 latent px, in-process unless a test says otherwise.
IN_PROCESS = ClusterOptions(actors=0)  # --tile-parallel --actors 0: the reference pipeline, no Ray at all


def photo_folder(root: Path, count: int) -> Path:
    root.mkdir(parents=True)
    for i in range(count):
        noisy_picture(i).save(root / f"img{i:02d}.png")
    return root


def wait_for(condition, what: str, timeout: float = 240):
    """Poll ``condition`` until it returns something truthy (a state, not a duration, decides the test)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)
    return result


def lock_holder(folder: Path) -> str:
    path = folder / LOCK_NAME
    return path.read_text() if path.exists() else ""


def outputs_match_manifest(out: Path) -> list[int]:
    """Every manifest row's output carries that row's seed and config hash; returns the seeds."""
    seeds = []
    for row in pq.read_table(out / MANIFEST_NAME).to_pylist():
        meta = read_png_metadata(out / row["output_path"])
        assert (int(meta["seed"]), meta["config_hash"]) == (row["seed"], row["config_hash"]), row["input_path"]
        seeds.append(row["seed"])
    return seeds


# ---------------------------------------------------------------------------------------------------------------
# 1. One batch per output folder
# ---------------------------------------------------------------------------------------------------------------
def batch_args(inputs: Path, out: Path, model: str, seed: int) -> list:
    return ["batch", "--input", inputs, "--output", out, "--model", model, *CLI_FAST, "--seed", seed,
            "--tile-parallel", "--actors", "0", "-q"]


def test_a_second_batch_into_a_busy_folder_is_refused_naming_the_holder(sdxl_dir, tmp_path):
    inputs, out = photo_folder(tmp_path / "in", 3), tmp_path / "out"
    first = cupscale(*batch_args(inputs, out, sdxl_dir, 1))
    holder = wait_for(lambda: lock_holder(out), "the first batch to take the folder")
    os.kill(first.pid, signal.SIGSTOP)  # it holds the folder, frozen at a known point
    try:
        second = cupscale(*batch_args(inputs, out, sdxl_dir, 2))
        code, _, err = finish(second)
        line = stderr_error_line(err)
        assert code == 2 and f"--output {out} is in use by another batch (pid {first.pid} on" in line, line
        assert holder.startswith(f"pid {first.pid} on {socket.gethostname()}, started ")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    code, _, err = finish(first)
    assert code == 0, err
    assert outputs_match_manifest(out) == [1, 1, 1]


def test_the_folder_lock_dies_with_its_holder(sdxl_dir, tmp_path):
    inputs, out = photo_folder(tmp_path / "in", 3), tmp_path / "out"
    first = cupscale(*batch_args(inputs, out, sdxl_dir, 1))
    wait_for(lambda: lock_holder(out), "the first batch to take the folder")
    first.kill()
    first.communicate()
    code, _, err = finish(cupscale(*batch_args(inputs, out, sdxl_dir, 2)))  # no stale lock left by the killed run
    assert code == 0, err
    assert outputs_match_manifest(out) == [2, 2, 2]


def test_a_rerun_redoes_an_output_that_no_longer_matches_its_row(sdxl_model, tmp_path):
    """Resume trusts the image, not only the row: one replaced since (another run, a hand edit) is redone."""
    from helpers import small_config

    inputs, out = photo_folder(tmp_path / "in", 2), tmp_path / "out"
    config = small_config(sdxl_model.name)
    assert run_batch(str(inputs), out, config, cluster=IN_PROCESS, tile_parallel=True, progress=False).done == 2
    row = pq.read_table(out / MANIFEST_NAME).to_pylist()[0]
    save_png(noisy_picture(9), out / row["output_path"],
             {**read_png_metadata(out / row["output_path"]), "config_hash": "0" * 16})
    again = run_batch(str(inputs), out, config, cluster=IN_PROCESS, tile_parallel=True, progress=False)
    assert (again.done, again.skipped) == (1, 1)
    assert outputs_match_manifest(out) == [0, 0]


# ---------------------------------------------------------------------------------------------------------------
# 10. A killed batch driver: every finished image is in the journal, a rerun recomputes none of them
# ---------------------------------------------------------------------------------------------------------------
def test_a_killed_batch_driver_loses_no_finished_image(sdxl_dir, tmp_path):
    import psutil

    inputs, out = photo_folder(tmp_path / "in", 8), tmp_path / "out"
    argv = ["batch", "--input", inputs, "--output", out, "--model", sdxl_dir, *CLI_FAST, "-q"]
    driver = cupscale(*argv, "--workers", "1", "--gpus-per-actor", "0", "--cpus-per-actor", "0.5",
                      start_new_session=True)  # its own process group: the Ray processes it starts are in it
    wait_for(lambda: len(list(out.glob("img*.png"))) >= 2, "two finished images")
    driver.kill()  # SIGKILL: no finally, no atexit
    driver.communicate()

    def workers_left() -> list:  # the raylet and task workers; Ray's two agents linger ~60 s by design
        group = []
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if os.getpgid(process.pid) == driver.pid and "Agent" not in " ".join(process.info["cmdline"] or []):
                    group.append(process)
        return group

    wait_for(lambda: not workers_left(), "the killed run's raylet and workers to end")
    written = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("img*.png")}
    journaled = {Path(r["output_path"]).name for r in Journal(out).rows() if r["status"] == "ok"}
    assert set(written) <= journaled  # each image on disk was recorded as it finished

    rerun = run_batch(str(inputs), out, cli_config(argv), cluster=IN_PROCESS, tile_parallel=True, progress=False)
    assert (rerun.skipped, rerun.done) == (len(written), 8 - len(written))
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("img*.png")
            if p.name in written} == written
    assert len(pq.read_table(out / MANIFEST_NAME)) == 8 and not list((out / JOURNAL_DIR).glob("*.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# 11. Smaller ones
# ---------------------------------------------------------------------------------------------------------------
def test_a_batch_that_fails_before_any_work_leaves_no_manifest(sdxl_dir, tmp_path):
    from helpers import small_config

    noisy_picture(0).save(tmp_path / "a.png")
    with pytest.raises(UserError):
        run_batch(str(tmp_path / "a.png"), tmp_path / "out", small_config(str(tmp_path / "no-model")),
                  cluster=IN_PROCESS, tile_parallel=True, progress=False)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_hidden_files_get_a_manifest_row_not_silence(sdxl_model, tmp_path):
    from helpers import small_config

    inputs = photo_folder(tmp_path / "in", 1)
    noisy_picture(1).save(inputs / ".hidden.png")
    (inputs / ".thumbs").mkdir()
    noisy_picture(2).save(inputs / ".thumbs" / "a.png")
    summary = run_batch(str(inputs), tmp_path / "out", small_config(sdxl_model.name), cluster=IN_PROCESS,
                        tile_parallel=True, progress=False)
    assert (summary.done, summary.errors) == (1, 2)
    rows = {Path(r["input_path"]).relative_to(inputs).as_posix(): r for r in
            pq.read_table(tmp_path / "out" / MANIFEST_NAME).to_pylist()}
    assert sorted(rows) == [".hidden.png", ".thumbs/a.png", "img00.png"]
    assert all("hidden file" in rows[n]["error"] for n in (".hidden.png", ".thumbs/a.png"))
    assert [i.error is None for i in list_inputs(str(inputs), tmp_path / "o")] == [False, False, True]
