"""The local Ray head (cluster/start-local-head.sh, execution/raycluster.py; issue 13): no pid file when `ray start`
fails, it listens on loopback only, and its token file is private (made private if it was not)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from helpers import REPO, START_HEAD, env


def test_start_local_head_leaves_no_pid_file_when_ray_start_fails(tmp_path):
    temp_dir = tmp_path / "head"
    done = subprocess.run(["bash", str(START_HEAD), str(temp_dir)], capture_output=True, text=True, timeout=120,
                          env={**env(), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                               "NUM_CPUS": "-1", "RAY_AUTH_TOKEN": "0" * 64})
    assert done.returncode != 0 and "ray start failed" in done.stderr
    assert not (temp_dir / "cupscale-head.pgid").exists()


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
