"""Every file in cluster/ parses and points at real entrypoints, presets and files; examples compile."""

from __future__ import annotations

import os
import py_compile
import shlex
import subprocess
import tomllib

import pytest
import yaml
from helpers import REPO

from cupscale_dist.cli.main import build_parser
from cupscale_dist.config import preset_names

CLUSTER = REPO / "cluster"
RAY_VERSION = "2.60.0"  # pinned in pyproject.toml; every manifest must run the same Ray


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def check_cupscale_command(command: str) -> object:
    """A `cupscale ...` command line: the console script exists and the arguments parse; presets are real."""
    argv = shlex.split(command)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts and scripts[argv[0]] == "cupscale_dist.cli:main"
    args = build_parser().parse_args(argv[1:])
    if getattr(args, "config", None):
        assert args.config in preset_names() or (REPO / args.config).is_file(), args.config
    return args


def test_every_yaml_in_cluster_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {f.name for f in files} >= {"rayjob.yaml", "raycluster.yaml", "pvc.yaml", "aws-gpu.yaml"}
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_rayjob_runs_cupscale_batch_on_a_gpu_worker_group():
    job = load("kuberay/rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    args = check_cupscale_command(job["spec"]["entrypoint"])
    assert args.command == "batch" and args.input.startswith("/data/") and args.output.startswith("/data/")
    assert args.workers and args.gpus_per_actor == 1
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])  # the runtime env is YAML too
    spec = job["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == RAY_VERSION and spec["authOptions"]["mode"] == "token"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any(c["resources"]["limits"].get("nvidia.com/gpu") for c in g["template"]["spec"]["containers"])]
    assert gpu_groups and gpu_groups[0]["replicas"] >= args.workers


def test_raycluster_is_the_rayjobs_cluster():
    cluster, job = load("kuberay/raycluster.yaml"), load("kuberay/rayjob.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"] == job["spec"]["rayClusterSpec"]  # one cluster definition, no drift


def test_every_ray_pod_mounts_the_shared_volume_and_runs_our_image():
    spec = load("kuberay/raycluster.yaml")["spec"]
    claim = load("kuberay/pvc.yaml")["metadata"]["name"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            assert container["image"] == pods[0]["containers"][0]["image"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == claim


def test_one_model_cache_on_the_shared_volume_and_a_head_without_gpu():
    """The driver fetches a hub model once into HF_HOME; every pod must see that same path. The head runs drivers
    only (no forward pass): it asks for no GPU and takes no actors."""
    spec = load("kuberay/raycluster.yaml")["spec"]
    head = spec["headGroupSpec"]
    pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    caches = {e["value"] for pod in pods for c in pod["containers"] for e in c["env"] if e["name"] == "HF_HOME"}
    assert len(caches) == 1 and next(iter(caches)).startswith("/data/")  # one cache, on the shared volume
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in head["template"]["spec"]["containers"])
    assert head["rayStartParams"]["num-cpus"] == "0"
    launcher = load("aws-gpu.yaml")
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"] == {"CPU": 0}
    assert "--env HF_HOME=/data/hf-cache" in launcher["docker"]["run_options"]


def test_dockerfile_copies_real_paths_and_every_package():
    lines = [line.split() for line in (CLUSTER / "Dockerfile").read_text().splitlines() if line.strip()]
    assert lines[[l[0] for l in lines].index("FROM")][1] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    copied = set()
    for line in lines:
        if line[0] == "COPY":
            sources = [w for w in line[1:-1] if not w.startswith("--")]
            assert all((REPO / s).exists() for s in sources), sources
            copied.update(sources)
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    folders = {p.split(".")[0] for p in packages}  # cupscale_dist.* comes with the cupscale_dist folder
    assert folders | {"configs", "pyproject.toml"} <= copied


def test_cluster_launcher_config_is_complete():
    config = load("aws-gpu.yaml")
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type", "setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, key
    assert config["head_node_type"] in config["available_node_types"]
    assert any("g5" in t["node_config"]["InstanceType"] or t.get("resources", {}).get("GPU")
               for name, t in config["available_node_types"].items() if name != config["head_node_type"])
    assert config["docker"]["image"] == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    for _remote, local in config["file_mounts"].items():
        if not local.startswith("~"):  # paths in this checkout (`ray up` runs from the repository root)
            assert (REPO / local).exists(), local
    checkout = next(r for r, l in config["file_mounts"].items() if l == ".")
    assert any(checkout in c and "pip install" in c for c in config["setup_commands"])
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token ray start" in command  # token auth stays on


def test_start_local_head_script_is_executable_and_valid_bash():
    script = CLUSTER / "start-local-head.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--node-ip-address 127.0.0.1" in text and "--temp-dir" in text and "--stop" in text
    assert "ray stop" not in text.replace("`ray stop`", "")  # never kills other clusters on the machine


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.py")) + sorted((REPO / "examples").glob("*.sh")),
                         ids=lambda p: p.name)
def test_examples_compile(path, tmp_path):
    if path.suffix == ".py":
        py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)
    else:
        subprocess.run(["bash", "-n", str(path)], check=True)
        for line in path.read_text().splitlines():  # every cupscale command in a script parses
            if line.strip().startswith("cupscale ") and "\\" not in line and "$" not in line:
                check_cupscale_command(line.strip())
