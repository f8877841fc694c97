"""Several Ray machines (network namespaces on this host, cupscale_dist/testing/netns.py): `cupscale upscale` with its
actors on nodes other than the driver's gives the single-process reference's bytes; a node lost mid-denoise (every
process of the machine SIGKILLed at once) leaves the run to finish on the nodes left with the same bytes; losing
every worker's node stops the run within a bound with one line naming the node and --resume, and --resume then
finishes it (issue 24).

One module-scoped cluster: a head with 0 CPUs (the driver's machine: no actor fits there) and two 1-CPU workers.
The tests run in file order and each loss uses up a worker node; the last one adds a fresh node.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cupscale_dist.testing import netns

REPO = Path(__file__).resolve().parents[1]
# "Never hangs": a run here takes 15-40 s on a loaded 2-core host, node-loss detection adds a few seconds (the test
# cluster's health checks); the unfixed driver waited forever (still hanging after 500 s in issue 24).
NEVER_HANGS_S = 120
CHECKPOINT_WAIT_S = 120  # the driver's first checkpoint: imports, joining, two actors loading the demo model, a step
STOP_START_TIMEOUT_S = 5  # --start-timeout of the run that loses its only worker: how long a replacement may wait
# The tiny demo run: 96 px -> 192 px, one stage of 3 steps x 4 views, one view per call (12 calls over the actors).
RUN = ["--config", "cpu-demo", "--steps", "10", "--set", "view_batch_size=1", "--set", "torch_threads=1", "-q"]
WORKER_LINE = re.compile(r"worker (\d+) on node (\w+) pid")


@pytest.fixture(scope="module")
def cluster():
    reason = netns.unavailable()
    if reason:
        pytest.skip(reason)
    nodes = netns.Cluster(sys.executable, str(REPO))
    try:
        nodes.add_node(0, "head")  # the driver's machine only
        nodes.add_node(1, "b")
        nodes.add_node(1, "c")
        yield nodes
    finally:
        nodes.close()


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("in") / "in.png"
    Image.open(REPO / "examples" / "astronaut.png").convert("RGB").resize((96, 96)).save(path)
    return path


class Reference:
    """The single-process reference (--actors 0, no Ray) in this namespace, run while the cluster starts."""

    def __init__(self, image: Path):
        self.out = image.with_name("reference.png")
        self.proc = subprocess.Popen([sys.executable, "-m", "cupscale_dist.cli", "upscale", str(image), "-o",
                                      str(self.out), *RUN, "--actors", "0"], stderr=subprocess.PIPE, text=True,
                                     env=netns.clean_env(str(REPO)))

    def pixels(self) -> np.ndarray:
        if self.proc.returncode is None:
            _, err = self.proc.communicate(timeout=NEVER_HANGS_S)
            assert self.proc.returncode == 0, err
        return pixels(self.out)


@pytest.fixture(scope="module")
def reference(image):
    run = Reference(image)
    yield run
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


class Driver:
    """`cupscale -v upscale ...` inside a node's namespace; its stderr collected as it comes."""

    def __init__(self, cluster: netns.Cluster, node: netns.Node, *args: str):
        self.proc = cluster.popen(node, [cluster.python, "-m", "cupscale_dist.cli", "-v", "upscale", *args,
                                         "--address", cluster.gcs_address], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def worker_nodes(self, cluster: netns.Cluster) -> dict[int, netns.Node]:
        """Where each model worker runs, from the driver's log."""
        return {int(m[1]): cluster.node_by_id(m[2]) for m in map(WORKER_LINE.search, list(self.lines)) if m}

    def wait_for(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert self.proc.poll() is None, "driver ended early:\n" + "".join(self.lines[-20:])
            assert time.monotonic() < deadline, f"no {path.name} within {timeout} s"
            time.sleep(0.05)

    def finish(self) -> int:
        """The exit code; a driver still running after NEVER_HANGS_S fails the test (and is killed by close())."""
        try:
            return self.proc.wait(timeout=NEVER_HANGS_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # its actors' CPUs go back to the cluster for the next test
            self.proc.wait()
            pytest.fail(f"the driver hung: still running {NEVER_HANGS_S} s later\n" + "".join(self.lines[-20:]))


def test_actors_on_two_nodes_other_than_the_drivers_give_the_reference_bytes(reference, cluster, image, tmp_path):
    out = tmp_path / "out.png"
    driver = Driver(cluster, cluster.head, str(image), "-o", str(out), *RUN, "--actors", "2", "--cpus-per-actor", "1")
    assert driver.finish() == 0, "".join(driver.lines[-20:])
    hosts = {node.name for node in driver.worker_nodes(cluster).values()}
    assert hosts == {"b", "c"}  # one actor per worker node, none on the driver's
    assert np.array_equal(pixels(out), reference.pixels())


def test_node_lost_mid_denoise_finishes_on_the_nodes_left_with_the_reference_bytes(reference, cluster, image,
                                                                                      tmp_path):
    """Issue 24: the node of worker 0 is SIGKILLed whole after the first step; no node has room for a replacement,
    so worker 1 runs the lost worker's calls, re-issued in call order."""
    out, checkpoints = tmp_path / "out.png", tmp_path / "ckpt"
    driver = Driver(cluster, cluster.head, str(image), "-o", str(out), *RUN, "--actors", "2", "--cpus-per-actor",
                    "1", "--checkpoint-dir", str(checkpoints))
    driver.wait_for(checkpoints / "checkpoint.pt", CHECKPOINT_WAIT_S)  # step 1 done, step 2's calls going out
    victim = driver.worker_nodes(cluster)[0]
    cluster.kill_node(victim)
    assert driver.finish() == 0, "".join(driver.lines[-20:])
    assert any(f"model worker 0 lost (node {victim.address}" in line for line in driver.lines)
    assert np.array_equal(pixels(out), reference.pixels())


def test_every_worker_node_lost_stops_with_one_line_then_resume_finishes(reference, cluster, image, tmp_path):
    """The one worker's node is lost and the nodes left have no CPU for a replacement: one line naming the node and
    --resume within the bound; after a node joins, the same command with --resume gives the reference bytes."""
    for node in [node for node in cluster.nodes[1:] if node.alive][1:]:  # one worker node left (run alone: two)
        cluster.kill_node(node)
    out, checkpoints = tmp_path / "out.png", tmp_path / "ckpt"
    args = [str(image), "-o", str(out), *RUN, "--actors", "1", "--cpus-per-actor", "1", "--checkpoint-dir",
            str(checkpoints), "--start-timeout", str(STOP_START_TIMEOUT_S)]
    driver = Driver(cluster, cluster.head, *args)
    driver.wait_for(checkpoints / "checkpoint.pt", CHECKPOINT_WAIT_S)
    victim = driver.worker_nodes(cluster)[0]
    cluster.kill_node(victim)
    assert driver.finish() == 2
    last = driver.lines[-1]
    assert last.startswith(f"cupscale: error: model workers lost (node {victim.address} (") and "--resume" in last
    assert (checkpoints / "checkpoint.pt").exists() and not out.exists()

    cluster.add_node(1, "d")
    resumed = Driver(cluster, cluster.head, *args, "--resume")
    assert resumed.finish() == 0, "".join(resumed.lines[-20:])
    assert np.array_equal(pixels(out), reference.pixels())
