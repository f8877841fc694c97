"""The service's parts that need no Ray: the job store (atomic records, restart recovery, one owner per folder),
request knob parsing, the bind/token rule, `cupscale serve` flag checks, and the ComfyUI node's contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from starlette.datastructures import QueryParams

from cupscale_dist.errors import UserError
from cupscale_dist.services.jobstore import JobStore

REPO = Path(__file__).resolve().parents[1]  # comfyui_cupscale/ is a ComfyUI node folder, not an installed package


def test_job_store_records_are_atomic_and_a_restart_fails_unfinished_jobs(tmp_path):
    store = JobStore(tmp_path)
    done = store.create(b"png", {"knobs": {}})
    store.update(done["id"], status="succeeded")
    store.result_path(done["id"]).write_bytes(b"result")
    running = store.create(b"png", {"knobs": {}})
    store.update(running["id"], status="running")
    queued = store.create(b"png", {"knobs": {}})
    (tmp_path / "inputs" / ("f" * 32)).write_bytes(b"orphan upload")  # a record was never written for it
    assert not list((tmp_path / "jobs").glob(".*"))  # no temp files left behind
    again = JobStore(tmp_path)  # the replica restarted
    assert sorted(again.recover()) == sorted([running["id"], queued["id"]])
    for job in (running, queued):
        record = again.get(job["id"])
        assert record["status"] == "failed" and "interrupted" in record["error"]
        assert not again.input_path(job["id"]).exists()
    assert again.get(done["id"])["status"] == "succeeded" and again.result_path(done["id"]).read_bytes() == b"result"
    assert not (tmp_path / "inputs" / ("f" * 32)).exists()
    again.update(done["id"], status="failed")  # a final status is never left
    assert again.get(done["id"])["status"] == "succeeded"
    assert again.get("../../etc/passwd") is None and again.get("0" * 32) is None


def test_one_service_per_results_folder(tmp_path):
    first = JobStore(tmp_path)
    first.claim()
    script = ("import sys; from cupscale_dist.services.jobstore import JobStore\n"
              "try: JobStore(sys.argv[1]).claim()\nexcept Exception as e: print(e); sys.exit(3)")
    other = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert other.returncode == 3 and "in use by another service" in other.stdout
    first.release()
    assert subprocess.run([sys.executable, "-c", script, str(tmp_path)]).returncode == 0


def test_request_knobs_are_typed_like_set_and_service_knobs_refused():
    from cupscale_dist.services.serve import request_knobs

    knobs, extra = request_knobs(QueryParams("seed=3&strength=0.5&prompt=a+cat&size=256x128&source=in.png"))
    assert knobs == {"seed": 3, "strength": 0.5, "prompt": "a cat", "size": (256, 128)} and extra == {"source": "in.png"}
    for query, needle in (("colour=red", "unknown knob 'colour'"), ("model=/etc", "set by the service"),
                          ("seed=1&seed=2", "given 2 times"), ("size=0x5", "must be positive")):
        with pytest.raises(UserError, match=needle):
            request_knobs(QueryParams(query))


def test_bind_rule_and_serve_flags(tmp_path, capsys):
    from cupscale_dist.cli.main import main
    from cupscale_dist.services.serve import check_bind

    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "x" * 32)
    with pytest.raises(UserError, match="--token-file"):
        check_bind("0.0.0.0", None)
    assert main(["serve", "--host", "0.0.0.0", "--results", str(tmp_path), "--config", "cpu-demo"]) == 2
    assert "reachable from other machines" in capsys.readouterr().err
    short = tmp_path / "token"
    short.write_text("abc")
    assert main(["serve", "--token-file", str(short), "--results", str(tmp_path)]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert main(["serve", "--results", str(tmp_path), "--queue", "0"]) == 2
    short.write_text("s" * 32)
    assert main(["serve", "--host", "0.0.0.0", "--token-file", str(short), "--results", str(tmp_path / "r"),
                 "--config", "cpu-demo", "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["url"] == "http://0.0.0.0:8000" and shown["token"] is True


def test_comfyui_node_follows_the_node_contract():
    """ComfyUI's documented custom-node contract: mappings, INPUT_TYPES with (type, options) tuples, RETURN_TYPES,
    FUNCTION naming a method whose parameters are the inputs, CATEGORY."""
    import inspect

    sys.path.insert(0, str(REPO))
    import comfyui_cupscale
    from comfyui_cupscale.nodes import png_to_tensor, tensor_to_png

    cls = comfyui_cupscale.NODE_CLASS_MAPPINGS["CupscaleUpscale"]
    assert set(comfyui_cupscale.NODE_DISPLAY_NAME_MAPPINGS) == set(comfyui_cupscale.NODE_CLASS_MAPPINGS)
    types = cls.INPUT_TYPES()
    assert set(types) <= {"required", "optional", "hidden"} and types["required"]["image"] == ("IMAGE",)
    for section in types.values():
        for spec in section.values():
            assert isinstance(spec, tuple) and isinstance(spec[0], (str, list))
    assert cls.RETURN_TYPES == ("IMAGE",) and isinstance(cls.CATEGORY, str)
    params = inspect.signature(getattr(cls(), cls.FUNCTION)).parameters
    assert set(types["required"]) <= set(params) and set(types["optional"]) <= set(params)
    assert all(params[name].default is not inspect.Parameter.empty for name in types["optional"])
    torch = pytest.importorskip("torch")
    image = torch.rand(5, 7, 3)
    back = png_to_tensor(tensor_to_png(image))
    assert back.shape == (5, 7, 3) and float((back - image).abs().max()) <= 0.5 / 255 + 1e-6


def test_rayservice_manifest_builds_the_app(monkeypatch):
    """cluster/kuberay/rayservice.yaml: its import_path is the application builder, its args are accepted, the
    token comes from the Secret (required), Ray token auth is on, results are on the shared volume."""
    import importlib

    import yaml

    manifest = yaml.safe_load((REPO / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService" and manifest["spec"]["rayClusterConfig"]["authOptions"]["mode"] == "token"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    module, _, name = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert any(e["name"] == "CUPSCALE_SERVE_TOKEN" and "secretKeyRef" in e["valueFrom"] for e in head["env"] if "valueFrom" in e)
    assert application["args"]["results"].startswith("/data/")
    monkeypatch.delenv("CUPSCALE_SERVE_TOKEN", raising=False)
    with pytest.raises(UserError, match="CUPSCALE_SERVE_TOKEN"):
        builder(application["args"])
    monkeypatch.setenv("CUPSCALE_SERVE_TOKEN", "k" * 32)
    app = builder(application["args"])
    assert type(app).__name__ == "Application"
    with pytest.raises(UserError, match="unknown key"):
        builder({**application["args"], "colour": 1})
