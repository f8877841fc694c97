"""`cupscale eval --out` (issue 21 class 6): checked first, never replaces a file, and names same-named originals
apart."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import random_picture
from PIL import Image

from cupscale_dist.cli.main import main


# -- 6. cupscale eval --out -----------------------------------------------------------------------------------------
@pytest.fixture
def cheap_eval(monkeypatch, sdxl_dir):
    """`cupscale eval` with the upscale replaced by bicubic (the figures are not under test) and a count of runs."""
    from cupscale_dist.models.spec import ModelSpec

    runs = []

    def fake_upscale(image, config, **_):
        runs.append(image.size)
        return image.resize((image.width * config.scale, image.height * config.scale), Image.Resampling.BICUBIC)

    executor = SimpleNamespace(spec=ModelSpec.read(sdxl_dir), release=lambda: None)
    monkeypatch.setattr("cupscale_dist.quality.evaluate.upscale", fake_upscale)
    monkeypatch.setattr("cupscale_dist.execution.executor.open_executor", lambda *a, **k: executor)
    return lambda *args: main(["eval", *map(str, args), "--config", "cpu-demo", "--model", sdxl_dir, "--scale", "2",
                               "-q", "--json"]), runs


def test_eval_out_is_checked_first_never_replaces_and_names_same_named_originals_apart(tmp_path, cheap_eval,
                                                                                       monkeypatch, capsys):
    run, runs = cheap_eval
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    random_picture(1).save(tmp_path / "a" / "x.png")
    random_picture(2).save(tmp_path / "b" / "x.png")
    afile = tmp_path / "report.txt"
    afile.write_text("mine")
    with monkeypatch.context() as patched:  # --out is checked before the originals are even read
        patched.setattr("cupscale_dist.files.imageio.load_image", lambda *a: pytest.fail("an original was read"))
        for out, problem in ((afile, "is a file"), ("/proc/cupscale-eval", "can't write there"),
                             (afile / "sub", "can't write there")):
            assert run(tmp_path / "a" / "x.png", "--out", out) == 2
            err = capsys.readouterr().err.strip()
            assert problem in err and "\n" not in err, err
    assert runs == [] and afile.read_text() == "mine"

    out = tmp_path / "eval"
    assert run(tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", "--out", out) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    sheets = [Path(row["side_by_side"]) for row in report["images"]]
    assert len(set(sheets)) == 2 and all(p.is_file() for p in sheets)
    names = sorted(p.name for p in out.iterdir())  # the report, 2 sheets, 2 upscales: no temp file left
    assert names == sorted(["eval.json", *(p.name for p in sheets), *(f"{p.stem}-ours.png" for p in sheets)])
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    runs.clear()
    assert run(tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", "--out", out) == 2  # no --overwrite
    err = capsys.readouterr().err.strip()
    assert "already exists; pass --overwrite" in err and "\n" not in err and runs == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    victim = out / f"{sheets[0].stem.rsplit('-x2', 1)[0]}-x2-ours.png"  # an input named like an output
    assert run(tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", victim, "--out", out, "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    assert "is one of the originals" in err and runs == [] and victim.read_bytes() == before[victim.name]

    assert run(tmp_path / "a" / "x.png", tmp_path / "a" / "x.png", "--out", tmp_path / "new") == 2
    assert "given more than once" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert run(tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", "--out", out, "--overwrite") == 0
    assert len(runs) == 2 and sorted(p.name for p in out.iterdir()) == sorted(before)
