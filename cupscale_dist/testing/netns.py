"""Several Ray machines on one host: each node in its own network namespace, for tests and benches.

Layout: a hub namespace holds a bridge; each node namespace has one veth (``eth0``) into it with an address of
``SUBNET`` (head ``.1``, then ``.2``, ...). Those addresses exist only inside these namespaces; the root namespace
gets no address, route or link, so nothing here can reach, or be reached from, any other network. Every node is a
real ``ray start`` (its own temp dir, object store, raylet and agents; the head also runs the GCS), token auth on
with a token file of this cluster's own (``~/.ray`` is never read or written).

Why drivers run inside a node's namespace (``Cluster.popen(node, ...)``) rather than the root namespace joining the
bridge: a Ray driver needs a raylet on its own machine (``ray.init(address=...)`` attaches to the local node), so a
driver outside every node could only use Ray Client; and a root-namespace address would be one more thing to undo.
A driver of a node other than the head runs through :meth:`Cluster.python_m` (see :func:`driver_main`), so that it
attaches to that node's raylet, not the head's.

Losing a machine (:meth:`Cluster.kill_node`): its link is cut first (its address stops answering, as a machine
that lost power: no connection reset reaches anyone), then every process of its namespace gets SIGKILL at once
(raylet, object store, agents, workers, a driver there), then the namespace is deleted. Ray marks the node dead
after its health checks fail: ``HEALTH_CHECKS`` shortens that from Ray's ~30 s to a few seconds; the code paths are
the same.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.231.0"  # RFC 1918, /24; private to the hub namespace, so clusters made in parallel never meet
PREFIX = "cupmn"  # namespaces are named PREFIX<pid of the creating process>-<name>: stale ones can be told apart
GCS_PORT = 6379
OBJECT_STORE_BYTES = 200 * 1024**2  # per node: plenty for tiny test models, small beside the host's /dev/shm
# Ray's defaults (3 s period, 10 s timeout, 5 failures) take ~30 s to declare a pulled-cable node dead; tests
# shouldn't wait that long for the same code path.
HEALTH_CHECKS = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                 "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
RAY_START_TIMEOUT_S = 120  # `ray start` on a loaded 2-core host takes 5-20 s; past this it is stuck
NODE_JOIN_TIMEOUT_S = 60  # a started raylet registers with the GCS within seconds
KILL_TIMEOUT_S = 10  # SIGKILLed processes vanish in milliseconds; a raylet forking a worker may need a second round


def unavailable() -> str | None:
    """Why namespaces can't be made here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns)"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's `ip`"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"ip netns add is not permitted here ({made.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def namespace_pids(ns: str) -> list[int]:
    out = ip("netns", "pids", ns, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def kill_namespace(ns: str) -> None:
    """SIGKILL every process in ``ns`` (repeated: a raylet may fork a worker while the first round lands)."""
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while (pids := namespace_pids(ns)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove_stale() -> None:
    """Namespaces a crashed earlier run of this module left (its creating process is gone): end and delete them."""
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        owner = name[len(PREFIX):].split("-")[0] if name.startswith(PREFIX) else ""
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            kill_namespace(name)
            ip("netns", "del", name, check=False)


def clean_env(pythonpath: str, python: str = sys.executable) -> dict[str, str]:
    """This environment without any Ray setting (address, auth, the single-host switch), offline, ``pythonpath``
    first: for the nodes, their drivers, and a reference run outside the cluster. The workers' niceness is kept: the
    tests set it (tests/conftest.py) so that a stand-in GPU is not starved by the other test processes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_worker_niceness"}
    env.update(PYTHONPATH=pythonpath, RAY_DISABLE_USAGE_STATS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(python).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


@dataclass
class Node:
    name: str  # short label, used in namespace and link names
    ns: str  # its network namespace
    address: str  # its IP inside the cluster's subnet
    temp_dir: Path  # its own Ray temp dir (session, sockets, logs)
    cpus: float
    alive: bool = True
    node_id: str = ""  # Ray's id for it, once it joined


_clusters = itertools.count()


class Cluster:
    """A Ray cluster of nodes in network namespaces; :meth:`close` removes every process, link and namespace.

    ``python``: the interpreter (and its ``ray``) every node and driver runs; ``pythonpath``: what Ray's workers and
    the drivers import first (the checkout under test); ``fast_health_checks``: ``HEALTH_CHECKS`` instead of Ray's
    defaults; ``system_config``: more of Ray's system settings for the head.
    """

    def __init__(self, python: str = sys.executable, pythonpath: str | None = None, *,
                 system_config: dict | None = None, fast_health_checks: bool = True):
        remove_stale()
        self.python, self.ray = python, str(Path(python).with_name("ray"))
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX, dir="/tmp"))  # short: Ray's socket paths must fit 107 chars
        self.token = self.root / "token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        self.pythonpath = pythonpath or str(Path(__file__).resolve().parents[2])
        self.system_config = {"enable_metrics_collection": False, **(HEALTH_CHECKS if fast_health_checks else {}),
                              **(system_config or {})}
        # PREFIX<pid>-<k>...: the k-th cluster of this process (two in one test process must not share names)
        self.tag = f"{PREFIX}{os.getpid()}-{next(_clusters)}"
        self.hub = f"{self.tag}hub"
        self.nodes: list[Node] = []
        self.procs: list[subprocess.Popen] = []  # drivers started by popen(), ended by close()
        try:
            ip("netns", "add", self.hub)
            ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            ip("-n", self.hub, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.address}:{GCS_PORT}"

    def env(self, **changes: str) -> dict[str, str]:
        """The environment of every node and driver: this cluster's token, the checkout first on the path, and no
        inherited Ray address, auth or single-host switch (``raycluster.single_host`` sets one in a test process)."""
        env = clean_env(self.pythonpath, self.python)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token), **changes)
        return env

    def add_node(self, cpus: float = 1, name: str | None = None) -> Node:
        """One more machine: a namespace on the bridge and ``ray start`` in it (the first one is the head)."""
        index = len(self.nodes)
        name = name or f"n{index}"
        node = Node(name, f"{self.tag}{name}", f"{SUBNET}.{index + 1}", self.root / name, cpus)
        self.nodes.append(node)
        ip("netns", "add", node.ns)
        ip("-n", node.ns, "link", "set", "lo", "up")
        # made inside the hub and the node: no link ever exists in the root namespace
        ip("-n", self.hub, "link", "add", f"v{name}", "type", "veth", "peer", "name", "eth0", "netns", node.ns)
        ip("-n", self.hub, "link", "set", f"v{name}", "master", "br0", "up")
        ip("-n", node.ns, "addr", "add", f"{node.address}/24", "dev", "eth0")
        ip("-n", node.ns, "link", "set", "eth0", "up")
        args = [self.ray, "start", "--node-ip-address", node.address, "--num-cpus", f"{cpus:g}", "--num-gpus", "0",
                "--object-store-memory", str(OBJECT_STORE_BYTES), "--temp-dir", str(node.temp_dir),
                "--disable-usage-stats"]
        if index == 0:
            args += ["--head", "--port", str(GCS_PORT), "--include-dashboard=false",
                     "--system-config", json.dumps(self.system_config)]
        else:
            args += ["--address", self.gcs_address]
        started = subprocess.run(["ip", "netns", "exec", node.ns, *args], env=self.env(), capture_output=True,
                                 text=True, timeout=RAY_START_TIMEOUT_S, check=False)
        if started.returncode != 0:
            raise RuntimeError(f"ray start on {node.name} failed:\n{started.stdout}\n{started.stderr}")
        node.node_id = self._wait_joined(node.address)
        return node

    def _wait_joined(self, address: str) -> str:
        """The Ray node id of the node at ``address``, once the GCS lists it alive."""
        probe = ("import json, ray; ray.init(address='auto', log_to_driver=False); "
                 "print(json.dumps({n['NodeManagerAddress']: n['NodeID'] for n in ray.nodes() if n['Alive']}))")
        deadline = time.monotonic() + NODE_JOIN_TIMEOUT_S
        while time.monotonic() < deadline:
            out = self.run(self.head, [self.python, "-c", probe], timeout=NODE_JOIN_TIMEOUT_S)
            if out.returncode == 0 and address in (alive := json.loads(out.stdout.strip().splitlines()[-1])):
                return alive[address]
            time.sleep(0.5)
        raise RuntimeError(f"node {address} did not register within {NODE_JOIN_TIMEOUT_S} s")

    def python_m(self, node: Node, module: str, *args: str) -> list[str]:
        """The command line of ``python -m module args`` as a driver of ``node`` (see :func:`driver_main`)."""
        return [self.python, "-m", __name__, node.address, module, *args]

    def popen(self, node: Node, argv: list[str], **kwargs) -> subprocess.Popen:
        """A process (e.g. a `cupscale` driver) inside ``node``'s namespace; killed with the node, or by close()."""
        kwargs.setdefault("env", self.env(RAY_ADDRESS=self.gcs_address))
        proc = subprocess.Popen(["ip", "netns", "exec", node.ns, *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, node: Node, argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env(RAY_ADDRESS=self.gcs_address))
        return subprocess.run(["ip", "netns", "exec", node.ns, *argv], capture_output=True, text=True,
                              timeout=timeout, check=False, **kwargs)

    def node_by_id(self, prefix: str) -> Node:
        """The node whose Ray node id starts with ``prefix`` (logs show the first 12 hex digits)."""
        return next(node for node in self.nodes if node.node_id.startswith(prefix))

    def node_of_pid(self, pid: int) -> Node | None:
        """The node whose namespace holds process ``pid`` (e.g. an actor's worker process)."""
        for node in self.nodes:
            if node.alive and pid in namespace_pids(node.ns):
                return node
        return None

    def kill_node(self, node: Node, pids: list[int] = ()) -> None:
        """The machine is lost: its link goes first (no process of it can answer, not even with a connection
        reset, as from a machine that lost power), then every process in it gets SIGKILL, then its namespace goes.

        ``pids``: its processes, listed beforehand (:func:`namespace_pids`): they are stopped (SIGSTOP) before
        anything else, within a millisecond, so a machine lost at a precise moment (a call just sent to it) sends
        nothing more; listing them here would take an ``ip`` process first.
        """
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        ip("-n", self.hub, "link", "del", f"v{node.name}", check=False)  # takes its eth0 with it
        kill_namespace(node.ns)
        ip("netns", "del", node.ns, check=False)
        node.alive = False

    def close(self) -> None:
        """End every process of every node (and the drivers), delete the namespaces, links and temp dirs."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for node in reversed(self.nodes):
            if node.alive:
                self.kill_node(node)
        kill_namespace(self.hub)
        ip("netns", "del", self.hub, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def driver_main(argv: list[str]) -> None:
    """``python -m cupscale_dist.testing.netns NODE_IP MODULE ARGS...``: run ``MODULE`` as ``__main__``, its
    ``ray.init`` attached to the raylet at ``NODE_IP``.

    Why: a driver attaches to a raylet it finds by listing the machine's processes, and prefers the head's. Here
    every node shares one process table (only the network is split), so a driver in a worker node's namespace would
    attach to the head's raylet and tell the cluster the head's address for itself: nothing could reach it (objects
    it puts, results sent to it). On a real machine the only raylet there is its own; this makes it so.
    """
    import functools
    import runpy

    import ray

    node_ip, module, *args = argv
    ray.init = functools.partial(ray.init, _node_ip_address=node_ip)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    driver_main(sys.argv[1:])
