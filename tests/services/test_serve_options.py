"""The service's options without Ray: request knob parsing (typed like --set, service knobs refused), the
bind/token rule and `cupscale serve`'s flag checks, the RayService manifest's app."""

from __future__ import annotations

import json

import pytest
from helpers import REPO
from starlette.datastructures import QueryParams

from cupscale_dist.errors import UserError


def test_request_knobs_are_typed_like_set_and_service_knobs_refused():
    from cupscale_dist.services.serve import request_knobs

    knobs, extra = request_knobs(QueryParams("seed=3&strength=0.5&prompt=a+cat&size=256x128&source=in.png"))
    assert (knobs == {"seed": 3, "strength": 0.5, "prompt": "a cat", "size": (256, 128)}
            and extra == {"source": "in.png"})
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
    assert any(e["name"] == "CUPSCALE_SERVE_TOKEN" and "secretKeyRef" in e["valueFrom"] for e in head["env"]
               if "valueFrom" in e)
    assert application["args"]["results"].startswith("/data/")
    monkeypatch.delenv("CUPSCALE_SERVE_TOKEN", raising=False)
    with pytest.raises(UserError, match="CUPSCALE_SERVE_TOKEN"):
        builder(application["args"])
    monkeypatch.setenv("CUPSCALE_SERVE_TOKEN", "k" * 32)
    app = builder(application["args"])
    assert type(app).__name__ == "Application"
    with pytest.raises(UserError, match="unknown key"):
        builder({**application["args"], "colour": 1})
