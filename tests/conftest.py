"""Fixtures every test folder sees: the tiny real models saved to disk (built once per test process), a photo, a
local Ray cluster, the Hypothesis profiles. Plain helpers (the fast config, the CLI, the service client) are in
tests/helpers.py."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.register_assert_rewrite("helpers")  # its asserts explain themselves like the tests' own (imported after this)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray starts its workers at nice 15 by default; beside the other xdist worker's nice-0 torch they then get ~3% of a
# core, and the multi-node runs missed their 120 s bounds in CI (2026-12-07). A Ray worker here stands in for a GPU:
# it runs at the test's own priority (relative, so the mutant runner's nice-19 runs stay at 19).
os.environ.setdefault("RAY_worker_niceness", "0")
torch.set_num_threads(1)  # CPU matmul bits depend on the thread count: pin it everywhere we compare bytes
# tests/helpers.py for the processes the tests start (Ray workers run code that uses it: test_fidelity's stand-in actor)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(Path(__file__).parent)]))


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    from cupscale_dist.testing.tiny import build_tiny_sdxl

    return str(build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory):
    from cupscale_dist.testing.tiny import build_tiny_sd15

    return str(build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15")))


@pytest.fixture(scope="session")
def zimage_dir(tmp_path_factory) -> str:
    """The tiny seeded Z-Image-Turbo (cupscale_dist.testing.tiny_zimage), built once per test process."""
    from cupscale_dist.testing.tiny_zimage import build_tiny_zimage

    return str(build_tiny_zimage(tmp_path_factory.mktemp("tiny-zimage")))


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> str:
    """The tiny seeded Idefics3 captioner (cupscale_dist.testing.vlm), built once per test process."""
    from cupscale_dist.testing.vlm import build_tiny_vlm

    return str(build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-idefics3", seed=0))


@pytest.fixture(scope="session")
def sdxl_model(sdxl_dir):
    from cupscale_dist.execution.worker import ModelWorker

    return ModelWorker(sdxl_dir, device="cpu", dtype="float32")


@pytest.fixture
def photo() -> Image.Image:
    """A small structured RGB image (smooth gradients + a disc), 96x128 so views are not square-only."""
    ys, xs = np.mgrid[0:96, 0:128]
    disc = ((ys - 48) ** 2 + (xs - 70) ** 2 < 20**2)[..., None]
    rgb = np.stack([xs * 2, ys * 2, 255 - xs], axis=-1) * (1 - disc) + disc * np.array([250, 200, 40])
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


class SharedRay:
    """One local Ray cluster per test process (per pytest-xdist worker), bound to 127.0.0.1 as `cupscale` binds it
    (token auth on): started by the first module that asks for ``local_ray`` and kept for the next ones, as a
    cluster start costs 10-25 s on 2 busy cores. A module starts from a clean cluster: one that holds resources
    (an actor or placement group a failed test left) or that someone shut down (the CLI's error path shuts Ray
    down) is started afresh. A module that needs a cluster of its own (other resources, nodes it kills) calls
    ``stop`` first (the ``no_shared_ray`` fixture)."""

    def __init__(self):
        self.temp_dir: str | None = None
        self.address: str | None = None

    def ensure(self):
        ray = pytest.importorskip("ray")
        if ray.is_initialized() and not (self.ours(ray) and self.idle(ray)):
            self.stop()
        if not ray.is_initialized():
            self.stop()  # the temp dir of a cluster someone else shut down
            from cupscale_dist.execution.raycluster import start_local

            # short: Ray's socket paths must fit 107 bytes (a pytest-xdist worker's tmp path is longer)
            self.temp_dir = tempfile.mkdtemp(prefix="cupscale-ray-", dir="/tmp")
            start_local(num_cpus=4, log_to_driver=False, _temp_dir=self.temp_dir)
            self.address = ray.get_runtime_context().gcs_address
        return ray

    def ours(self, ray) -> bool:
        return self.address is not None and ray.get_runtime_context().gcs_address == self.address

    @staticmethod
    def idle(ray, wait_s: float = 10.0) -> bool:
        """Every resource free (actors and placement groups are returned asynchronously: wait a little)."""
        deadline = time.monotonic() + wait_s
        while True:
            total, free = ray.cluster_resources(), ray.available_resources()
            held = [key for key, value in total.items()  # CPUs, GPUs, custom resources; not memory (objects stay)
                    if not key.startswith("node:") and "memory" not in key and free.get(key, 0) < value]
            if not held:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def stop(self):
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir = self.address = None


@pytest.fixture(scope="session")
def shared_ray():
    shared = SharedRay()
    yield shared
    shared.stop()


@pytest.fixture(scope="module")
def local_ray(shared_ray):
    """A real local Ray cluster for the module's tests: the test process's shared one (SharedRay)."""
    return shared_ray.ensure()


@pytest.fixture(scope="module")
def no_shared_ray(shared_ray):
    """For a module with a cluster of its own, or none and a big memory peak: the shared cluster is stopped first."""
    shared_ray.stop()


@pytest.fixture(scope="module")
def parse_ws(tmp_path_factory):
    """A folder holding one input image for the tests of bad input (knob text, config files, metadata, prompt files);
    tests write their bad files in their own tmp_path. The CLI has run once in it, so that no timed run pays the
    CLI's first imports."""
    import contextlib
    import io

    from helpers import structured, upscale_argv

    from cupscale_dist.cli.main import main

    ws = tmp_path_factory.mktemp("parsing")
    Image.fromarray(structured(64, 48)).save(ws / "in.png")
    with contextlib.redirect_stderr(io.StringIO()):
        main(upscale_argv(ws, ws / "out.png", "--set", "steps=many"))
    return ws


# Test files heaviest first. pytest-xdist (--dist loadfile) hands each worker a whole file at a time, in collection
# order (we turn off its own reordering by test count): the long files start first and the short ones fill in at the
# end, so no worker starts a 5-minute file while the other has finished. tests/durations.json holds each file's
# seconds from a full run (`python tests/durations.py JUNIT.xml` rewrites it); a file not in it counts as
# DEFAULT_FILE_S. Only the order changes: every test still runs, each file's tests in their own order.
DURATIONS = Path(__file__).with_name("durations.json")
DEFAULT_FILE_S = 20.0


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        first.setdefault(item.nodeid.split("::")[0], index)

    def key(item):
        path = item.nodeid.split("::")[0]
        return -seconds.get(path, DEFAULT_FILE_S), first[path]

    items.sort(key=key)


# Hypothesis profiles for the fuzz tests (tests/*/test_fuzz_*.py), chosen by HYPOTHESIS_PROFILE (default `ci`). `ci`: a
# small fixed budget, derandomized (the same examples every run, so CI is reproducible), no deadline (2 shared cores
# make any per-example time bound flaky). `nightly`: many more examples, drawn fresh each run.
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("nightly", max_examples=2000, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is in the dev extra; without it the fuzz tests skip (pytest.importorskip)
    pass


# CPU per test (issue 37: where CI's time goes), on request: CUPSCALE_TEST_CPU=DIR makes each test process write,
# when its session ends, a line per test to DIR/<worker>.jsonl: its wall seconds and the CPU seconds of this
# process's whole tree over it (setup, call, teardown): its Ray cluster's daemons and workers, CLI subprocesses,
# children that ended and were reaped (their parents' cutime). `python tests/durations.py --cpu DIR` sums them per
# file. It reads low: a daemon that left the tree (`ray start` daemonizes) and an actor that ended unreaped by its
# raylet are not counted (docs/layout.md#tests).
CPU_REPORT = os.environ.get("CUPSCALE_TEST_CPU")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def tree_cpu_seconds(root: int) -> float:
    """utime + stime + cutime + cstime of ``root`` and every live descendant, in seconds (Linux /proc)."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # ended while we looked
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        ticks[int(entry.name)] = sum(int(v) for v in fields[11:15])
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total / CLOCK_TICKS


if CPU_REPORT:
    CPU_ROWS: list[dict] = []  # written once the session ends: a test that audits its file writes sees none of ours

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        wall, cpu = time.monotonic(), tree_cpu_seconds(os.getpid())
        yield
        CPU_ROWS.append({"test": item.nodeid, "wall_s": round(time.monotonic() - wall, 2),
                         "cpu_s": round(tree_cpu_seconds(os.getpid()) - cpu, 2)})

    def pytest_sessionfinish(session):
        if CPU_ROWS:
            Path(CPU_REPORT).mkdir(parents=True, exist_ok=True)
            with open(Path(CPU_REPORT, os.environ.get("PYTEST_XDIST_WORKER", "main") + ".jsonl"), "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in CPU_ROWS)
