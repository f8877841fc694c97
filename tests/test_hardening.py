"""Issue 13, the adversarial pass: concurrent runs, what binds where, checkpoint contents, manifest durability,
engine failures. Each test reproduces one defect the pass found; the one-line input errors (NaN knobs, bad text,
prompt-file schema, output checks) are cases of ``test_cli.BAD``.

Concurrency is tested with real processes held at a known point (SIGSTOP after they took the lock, SIGKILL
mid-run), never with sleeps that hope for an interleaving.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cupscale_dist import UserError
from cupscale_dist.services.batch.manifest import JOURNAL_DIR, LOCK_NAME, MANIFEST_NAME, Journal
from cupscale_dist.services.batch.inputs import list_inputs
from cupscale_dist.services.batch.run import run_batch
from cupscale_dist.files.imageio import place, read_png_metadata, save_png
from cupscale_dist.execution.raycluster import ClusterOptions

REPO = Path(__file__).resolve().parents[1]
START_HEAD = REPO / "cluster" / "start-local-head.sh"
# The fast run: 64x64 -> 128x128 in one stage, views of 16 latent px, in-process unless a test says otherwise.
FAST = ["--tile", "16", "--stride", "8", "--steps", "4", "--device", "cpu", "--dtype", "float32",
        "--set", "torch_threads=1", "--scale", "2"]
IN_PROCESS = ClusterOptions(actors=0)  # --tile-parallel --actors 0: the reference pipeline, no Ray at all


def env(**changes: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER"))}
    return {**base, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **changes}


def cupscale(*args, **kwargs) -> subprocess.Popen:
    """``python -m cupscale_dist.cli ARGS`` as its own process (args may be bytes: argv that is not UTF-8)."""
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    return subprocess.Popen([sys.executable, "-m", "cupscale_dist.cli", *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=kwargs.pop("env", None) or env(), **kwargs)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cupscale: error:") and "Traceback" not in err, err
    return lines[0]


def picture(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size]
    rgb = np.stack([xs * 4, ys * 4, 255 - xs * 2], axis=-1) + rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def photo_folder(root: Path, count: int) -> Path:
    root.mkdir(parents=True)
    for i in range(count):
        picture(i).save(root / f"img{i:02d}.png")
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
    return ["batch", "--input", inputs, "--output", out, "--model", model, *FAST, "--seed", seed,
            "--tile-parallel", "--actors", "0", "-q"]


def test_a_second_batch_into_a_busy_folder_is_refused_naming_the_holder(sdxl_dir, tmp_path):
    inputs, out = photo_folder(tmp_path / "in", 3), tmp_path / "out"
    first = cupscale(*batch_args(inputs, out, sdxl_dir, 1))
    holder = wait_for(lambda: lock_holder(out), "the first batch to take the folder")
    os.kill(first.pid, signal.SIGSTOP)  # it holds the folder, frozen at a known point
    try:
        second = cupscale(*batch_args(inputs, out, sdxl_dir, 2))
        code, _, err = finish(second)
        line = one_line(err)
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
    from conftest import small_config

    inputs, out = photo_folder(tmp_path / "in", 2), tmp_path / "out"
    config = small_config(sdxl_model.name)
    assert run_batch(str(inputs), out, config, cluster=IN_PROCESS, tile_parallel=True, progress=False).done == 2
    row = pq.read_table(out / MANIFEST_NAME).to_pylist()[0]
    save_png(picture(9), out / row["output_path"], {**read_png_metadata(out / row["output_path"]), "config_hash": "0" * 16})
    again = run_batch(str(inputs), out, config, cluster=IN_PROCESS, tile_parallel=True, progress=False)
    assert (again.done, again.skipped) == (1, 1)
    assert outputs_match_manifest(out) == [0, 0]


# ---------------------------------------------------------------------------------------------------------------
# 2. `upscale -o` without --overwrite: exactly one of two racing runs wins
# ---------------------------------------------------------------------------------------------------------------
def test_two_upscales_racing_for_one_output_exactly_one_wins(sdxl_dir, tmp_path):
    picture(0).save(tmp_path / "in.png")
    target = tmp_path / "out.png"
    runs = [cupscale("upscale", tmp_path / "in.png", "-o", target, "--model", sdxl_dir, *FAST, "--actors", "0",
                     "--seed", seed, "-q") for seed in (1, 2)]
    results = [finish(run) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    (winner_seed,) = [seed for seed, (code, _, _) in zip((1, 2), results) if code == 0]
    (loser_err,) = [err for code, _, err in results if code == 2]
    assert "--overwrite" in one_line(loser_err)
    assert read_png_metadata(target)["seed"] == str(winner_seed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "out.png"]  # no partial file left behind


def test_placement_without_overwrite_never_replaces_a_file_that_appeared(tmp_path):
    """The check at the start passed, then another run wrote the name: the late one must fail, not replace."""
    target = tmp_path / "out.png"
    target.write_bytes(b"the other run's result")
    with pytest.raises(UserError, match="created by someone else while this run worked"):
        save_png(picture(0), target, {"seed": "1"}, overwrite=False)
    assert target.read_bytes() == b"the other run's result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    partial = tmp_path / "partial"
    partial.write_bytes(b"new")
    place(partial, target, overwrite=True)  # --overwrite replaces
    assert target.read_bytes() == b"new" and not partial.exists()


# ---------------------------------------------------------------------------------------------------------------
# 4. Text that is not UTF-8 in a real process's argv
# ---------------------------------------------------------------------------------------------------------------
def test_prompt_bytes_that_are_not_utf8_are_one_line_in_upscale_and_batch(sdxl_dir, tmp_path):
    picture(0).save(tmp_path / "in.png")
    out = tmp_path / "out"
    for argv in (["upscale", tmp_path / "in.png", "-o", tmp_path / "x.png", "--model", sdxl_dir, "--prompt",
                  b"\xff\xfe"],
                 ["batch", "--input", tmp_path / "in.png", "--output", out, "--model", sdxl_dir,
                  "--negative-prompt", b"ok \xff"]):
        code, stdout, err = finish(cupscale(*argv))
        assert code == 2 and "not valid UTF-8" in one_line(err) and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]  # no output, no manifest, no folder


# ---------------------------------------------------------------------------------------------------------------
# 7. Checkpoints with the right hashes and wrong contents
# ---------------------------------------------------------------------------------------------------------------
def resume_args(tmp_path: Path, model: str) -> list[str]:
    return ["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--model", model, *FAST,
            "--actors", "0", "-q", "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume"]


def cli_config(argv: list):
    from cupscale_dist.cli.main import build_parser
    from cupscale_dist.cli.options import config_from_args

    return config_from_args(build_parser().parse_args([str(a) for a in argv]))


def write_checkpoint(tmp_path: Path, model: str, drop: str | None = None, **fields) -> None:
    """A checkpoint this run accepts as its own (same config and input hashes), with ``fields`` replaced."""
    from cupscale_dist.services.checkpoint import Checkpointer, image_sha
    from cupscale_dist.files.imageio import load_image

    config = cli_config(resume_args(tmp_path, model))
    image = load_image(tmp_path / "in.png", config.max_input_pixels, config.min_input_side)
    checkpointer = Checkpointer(tmp_path / "ckpt", 1, config.config_hash(), image_sha(image))
    checkpointer({"stage": 0, "step": 0, "stage_input": image})
    checkpointer.write(0, 1, torch.zeros(1, 4, 16, 16))  # what a real run writes after its first step
    payload = torch.load(checkpointer.path, weights_only=True)
    payload.update(fields)
    if drop:
        del payload[drop]
    torch.save(payload, checkpointer.path)


def encoded(image: Image.Image, kind: str = "PNG") -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


BAD_CHECKPOINTS = {
    "latent-shape": ({"latents": torch.zeros(1, 4, 8, 8)}, "shape (1, 4, 8, 8) (expected (1, 4, 16, 16))"),
    "latent-channels": ({"latents": torch.zeros(1, 3, 16, 16)}, "shape (1, 3, 16, 16)"),
    "latent-ints": ({"latents": torch.zeros(1, 4, 16, 16, dtype=torch.int64)}, "expected a float tensor"),
    "latent-nan": ({"latents": torch.full((1, 4, 16, 16), float("nan"))}, "non-finite latents"),
    "step-negative": ({"step": -3}, "step=-3"),
    "step-huge": ({"step": 10**12}, "at step 1000000000000, but a stage of this run has 2 steps"),
    "stage-out-of-range": ({"stage": 4}, "at stage 4, but this run has 1 stage"),
    "stage-input-garbage": ({"stage_input": b"\x89PNG not really" * 1000}, "not a readable image"),
    "stage-input-huge": ({"stage_input": encoded(Image.new("L", (3000, 3000)))}, "3000x3000 (expected a PNG of 64x64)"),
    "stage-input-jpeg": ({"stage_input": encoded(picture(0), "JPEG")}, "a JPEG of 64x64"),
    "stage-input-text": ({"stage_input": "a string"}, "type str (expected PNG bytes)"),
    "field-missing": ({"drop": "latents"}, "does not hold the fields"),
    "hash-not-a-string": ({"config_hash": 5}, "written with another config (5 != "),
}


@pytest.mark.parametrize("fields, words", BAD_CHECKPOINTS.values(), ids=BAD_CHECKPOINTS.keys())
def test_a_checkpoint_with_wrong_contents_is_refused_in_one_line(fields, words, sdxl_dir, tmp_path, capsys):
    from cupscale_dist.cli.main import main

    picture(0).save(tmp_path / "in.png")
    write_checkpoint(tmp_path, sdxl_dir, **fields)
    code = main(resume_args(tmp_path, sdxl_dir))
    line = one_line(capsys.readouterr().err)
    assert code == 2 and words in line, line
    assert not (tmp_path / "out.png").exists()


def test_a_sound_checkpoint_still_resumes(sdxl_dir, tmp_path, capsys):
    from cupscale_dist.cli.main import main

    picture(0).save(tmp_path / "in.png")
    write_checkpoint(tmp_path, sdxl_dir)
    assert main(resume_args(tmp_path, sdxl_dir)) == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "out.png").size == (128, 128)


# ---------------------------------------------------------------------------------------------------------------
# 10. A killed batch driver: every finished image is in the journal, a rerun recomputes none of them
# ---------------------------------------------------------------------------------------------------------------
def test_a_killed_batch_driver_loses_no_finished_image(sdxl_dir, tmp_path):
    import psutil

    inputs, out = photo_folder(tmp_path / "in", 8), tmp_path / "out"
    argv = ["batch", "--input", inputs, "--output", out, "--model", sdxl_dir, *FAST, "-q"]
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
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("img*.png") if p.name in written} == written
    assert len(pq.read_table(out / MANIFEST_NAME)) == 8 and not list((out / JOURNAL_DIR).glob("*.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# 11. Smaller ones
# ---------------------------------------------------------------------------------------------------------------
def test_a_batch_that_fails_before_any_work_leaves_no_manifest(sdxl_dir, tmp_path):
    from conftest import small_config

    picture(0).save(tmp_path / "a.png")
    with pytest.raises(UserError):
        run_batch(str(tmp_path / "a.png"), tmp_path / "out", small_config(str(tmp_path / "no-model")),
                  cluster=IN_PROCESS, tile_parallel=True, progress=False)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


def test_hidden_files_get_a_manifest_row_not_silence(sdxl_model, tmp_path):
    from conftest import small_config

    inputs = photo_folder(tmp_path / "in", 1)
    picture(1).save(inputs / ".hidden.png")
    (inputs / ".thumbs").mkdir()
    picture(2).save(inputs / ".thumbs" / "a.png")
    summary = run_batch(str(inputs), tmp_path / "out", small_config(sdxl_model.name), cluster=IN_PROCESS,
                        tile_parallel=True, progress=False)
    assert (summary.done, summary.errors) == (1, 2)
    rows = {Path(r["input_path"]).relative_to(inputs).as_posix(): r for r in
            pq.read_table(tmp_path / "out" / MANIFEST_NAME).to_pylist()}
    assert sorted(rows) == [".hidden.png", ".thumbs/a.png", "img00.png"]
    assert all("hidden file" in rows[n]["error"] for n in (".hidden.png", ".thumbs/a.png"))
    assert [i.error is None for i in list_inputs(str(inputs), tmp_path / "o")] == [False, False, True]


def test_start_local_head_leaves_no_pid_file_when_ray_start_fails(tmp_path):
    temp_dir = tmp_path / "head"
    done = subprocess.run(["bash", str(START_HEAD), str(temp_dir)], capture_output=True, text=True, timeout=120,
                          env={**env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                               "NUM_CPUS": "-1", "RAY_AUTH_TOKEN": "0" * 64})
    assert done.returncode != 0 and "ray start failed" in done.stderr
    assert not (temp_dir / "cupscale-head.pgid").exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. `cupscale caption` with a VLM: Ray is started for it, vllm-cpu gets a KV cache that fits, failures are one line
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from cupscale_dist.testing.vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-idefics3", seed=0)


def caption(image: Path, model: Path, backend: str, **changes: str) -> tuple[int, str, str]:
    clean = {k: v for k, v in env(**changes).items() if k != "VLLM_CPU_KVCACHE_SPACE" or k in changes}
    return finish(cupscale("caption", image, "--captioner", backend, "--captioner-model", model, "--set",
                           "captioner_dtype=float32", "--model", "demo", env=clean), timeout=600)


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_caption_with_a_vlm_captions_the_image(backend, tiny_vlm, tmp_path):
    if backend == "vllm":
        pytest.importorskip("vllm")
    picture(0).save(tmp_path / "in.png")
    code, out, err = caption(tmp_path / "in.png", tiny_vlm, backend)  # VLLM_CPU_KVCACHE_SPACE unset: our default
    assert code == 0, err
    assert json.loads(out)["prompt"].strip() and "Traceback" not in err


def test_a_vllm_engine_that_cannot_start_is_one_line_with_its_root_cause(tiny_vlm, tmp_path):
    pytest.importorskip("vllm")
    picture(0).save(tmp_path / "in.png")
    code, out, err = caption(tmp_path / "in.png", tiny_vlm, "vllm", VLLM_CPU_KVCACHE_SPACE="100000")  # 100 TB
    assert code == 2 and out == "" and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("cupscale: error: captioner pool for") and "VLLM_CPU_KVCACHE_SPACE" in line, err
    assert "Available memory" in line  # vLLM's own words, from its engine process: the root cause


# ---------------------------------------------------------------------------------------------------------------
# 6. A local cluster listens on 127.0.0.1 only; the token file is private
# ---------------------------------------------------------------------------------------------------------------
LISTENERS = """
import json, os, psutil, ray
from cupscale_dist.execution.raycluster import ClusterOptions, connect
connect(ClusterOptions())
ray.get(ray.remote(lambda: os.getpid()).remote())  # a worker too
tree = [psutil.Process()] + psutil.Process().children(recursive=True)
pids = {p.pid: p.name() for p in tree}
session = ray._private.worker._global_node.get_session_dir_path()
exporter = [open(os.path.join(session, f)).read() for f in os.listdir(session) if f.startswith("metrics_export_port")]
print(json.dumps({"sockets": [[c.laddr.ip, pids[c.pid]] for c in psutil.net_connections(kind="inet")
                              if c.status == psutil.CONN_LISTEN and c.pid in pids], "exporter": exporter}))
"""


def test_a_local_cluster_listens_on_loopback_only_and_writes_a_private_token(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run([sys.executable, "-c", LISTENERS], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={k: v for k, v in env(HOME=str(home)).items() if not k.startswith("RAY_AUTH")})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    sockets, names = report["sockets"], {name for _, name in report["sockets"]}
    assert {"gcs_server", "raylet"} <= names and any("Agent" in n for n in names), sockets
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip, _ in sockets), sockets
    assert report["exporter"] == ["-1"]  # the dashboard agent started no /metrics exporter
    assert stat.S_IMODE((home / ".ray" / "auth_token").stat().st_mode) == 0o600


def test_an_existing_token_file_readable_by_others_is_made_private(tmp_path, monkeypatch):
    from cupscale_dist.execution.raycluster import keep_token_private

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    token = tmp_path / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("f" * 64)
    token.chmod(0o644)
    keep_token_private()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == "f" * 64


def test_any_lone_surrogate_in_a_text_knob_is_one_user_error():
    """Not only argv's escaped bytes: a surrogate from an API caller or a JSON escape is refused the same way."""
    from cupscale_dist import UpscaleConfig

    for text in ("\udcff", "a \ud800 b"):
        with pytest.raises(UserError, match="is not valid UTF-8"):
            UpscaleConfig(prompt=text)
