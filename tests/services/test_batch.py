"""`cupscale batch` on a real local Ray: good and bad images, resume, config changes, safe names, tile-parallel."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import small_config
from PIL import Image

from cupscale_dist import UserError
from cupscale_dist.cli.main import main
from cupscale_dist.execution.raycluster import ClusterOptions
from cupscale_dist.services.batch.inputs import Item, list_inputs
from cupscale_dist.services.batch.manifest import MANIFEST_NAME
from cupscale_dist.services.batch.naming import assign_outputs, output_name, safe_component
from cupscale_dist.services.batch.run import run_batch
from cupscale_dist.services.batch.worker import MAX_ATTEMPTS, AttemptLedger, UpscaleWorker

ray = pytest.importorskip("ray")

CPU_WORKERS = ClusterOptions(gpus_per_actor=0, cpus_per_actor=0.5)  # fractional CPUs: never starve the pool


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colours + a little noise: a cheap stand-in for a photo."""
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs * 255 / width, ys * 255 / height, 128 + 0 * xs], axis=-1)
    rgb = rgb + np.random.default_rng(seed).normal(0, 8, rgb.shape)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def make_folder(root: Path) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Good inputs (name -> size) and bad inputs (name -> expected error text) under ``root``."""
    (root / "sub").mkdir(parents=True)
    good = {"a.png": (64, 64), "sub/b.jpg": (64, 96), "sub/b.png": (64, 64), "la.png": (64, 64),
            "grey16.png": (64, 64), "cmyk.jpg": (64, 64)}
    picture(64, 64, 1).save(root / "a.png")
    picture(64, 96, 2).save(root / "sub/b.jpg", quality=95)
    picture(64, 64, 3).save(root / "sub/b.png")  # same output name as sub/b.jpg: a deterministic suffix
    picture(64, 64, 4).convert("LA").save(root / "la.png")  # odd modes are converted, not refused
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(root / "grey16.png")
    picture(64, 64, 5).convert("CMYK").save(root / "cmyk.jpg")
    bad = {"zero.png": "empty (0 bytes)", "corrupt.png": "not a readable image", "trunc.png": "truncated",
           "tiny.png": "too small", "huge.png": "pixel limit"}
    (root / "zero.png").write_bytes(b"")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image at all" * 10)
    data = (root / "a.png").read_bytes()
    (root / "trunc.png").write_bytes(data[: len(data) // 2])
    picture(8, 8).save(root / "tiny.png")
    picture(160, 160).save(root / "huge.png")  # over max_input_pixels below
    (root / "notes.txt").write_text("not an image: ignored by a folder listing")
    return good, bad


def manifest_rows(out: Path, root: Path) -> dict[str, dict]:
    """The manifest keyed by the input's path relative to ``root``."""
    return {Path(r["input_path"]).relative_to(root).as_posix(): r
            for r in pq.read_table(out / MANIFEST_NAME).to_pylist()}


def test_folder_of_good_and_bad_images_then_resume_then_config_change(local_ray, sdxl_dir, tmp_path):
    good, bad = make_folder(tmp_path / "in")
    out = tmp_path / "out"
    config = small_config(sdxl_dir, max_input_pixels=120 * 120)

    first = run_batch(str(tmp_path / "in"), out, config, cluster=CPU_WORKERS, workers=2, progress=False)
    assert (first.total, first.done, first.errors, first.failed) == (len(good) + len(bad), len(good), len(bad), 0)
    rows = manifest_rows(out, tmp_path / "in")
    assert sorted(rows) == sorted([*good, *bad])  # one row per input, notes.txt is no input
    for name, (width, height) in good.items():
        row = rows[name]
        assert row["status"] == "ok", row["error"]
        with Image.open(out / row["output_path"]) as image:
            assert image.size == (2 * width, 2 * height) == (row["output_width"], row["output_height"])
        assert row["config_hash"] == config.config_hash() and row["prompt"] == config.prompt and row["seed"] == 0
        assert row["upscale_s"] > 0 and row["total_s"] >= row["upscale_s"]
    for name, text in bad.items():
        assert rows[name]["status"] == "error" and text in rows[name]["error"] and rows[name]["output_path"] is None
    assert rows["sub/b.jpg"]["output_path"] == "sub/b.png"  # sorted first, so it keeps the plain name
    assert rows["sub/b.png"]["output_path"].startswith("sub/b-")  # the collision: a hash of its input path
    assert not (out / ".cupscale-attempts").exists()

    written = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = run_batch(str(tmp_path / "in"), out, config, cluster=CPU_WORKERS, workers=2, progress=False)
    assert (again.done, again.skipped, again.errors, again.rows) == (0, len(good) + len(bad), 0, [])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == written  # nothing was rewritten
    assert manifest_rows(out, tmp_path / "in") == rows

    changed = config.replace(seed=7)
    third = run_batch(str(tmp_path / "in"), out, changed, cluster=CPU_WORKERS, workers=2, progress=False)
    assert (third.done, third.skipped, third.errors) == (len(good), 0, len(bad))
    redone = manifest_rows(out, tmp_path / "in")
    assert all(redone[n]["config_hash"] == changed.config_hash() and redone[n]["seed"] == 7 for n in redone)
    assert all(redone[n]["output_path"] == rows[n]["output_path"] for n in good)  # same names, new pixels
    assert sorted(out.rglob("*.png")) == sorted(written)


def test_tile_parallel_gives_the_bytes_of_the_worker_pool(local_ray, sdxl_dir, tmp_path, photo):
    (tmp_path / "in").mkdir()
    photo.save(tmp_path / "in" / "photo.png")
    config = small_config(sdxl_dir, view_batch_size=2)
    pool = run_batch(str(tmp_path / "in"), tmp_path / "pool", config, cluster=CPU_WORKERS, workers=1, progress=False)
    tiles = run_batch(str(tmp_path / "in"), tmp_path / "tiles", config, tile_parallel=True, progress=False,
                      cluster=ClusterOptions(actors=2, gpus_per_actor=0, cpus_per_actor=0.5))
    assert pool.done == tiles.done == 1
    with Image.open(tmp_path / "pool" / "photo.png") as a, Image.open(tmp_path / "tiles" / "photo.png") as b:
        assert a.size == (256, 192) and np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_parquet_rows_carry_prompts_and_seeds_through_the_cli(local_ray, sdxl_dir, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    picture(64, 64, 1).save(images / "one.png")
    picture(64, 64, 2).save(images / "two.png")
    table = pa.table({"path": ["images/one.png", str(images / "two.png"), "images/missing.png", "images/one.png", ""],
                      "prompt": ["a red barn", "a blue lake", None, "again", None],
                      "seed": [11, 22, None, None, None]})
    pq.write_table(table, tmp_path / "list.parquet")
    out = tmp_path / "out"
    code = main(["batch", "--input", str(tmp_path / "list.parquet"), "--output", str(out), "--model", sdxl_dir,
                 "--device", "cpu", "--dtype", "float32", "--scale", "2", "--tile", "16", "--stride", "8",
                 "--steps", "5", "--set", "torch_threads=1", "--workers", "1", "--gpus-per-actor", "0",
                 "--cpus-per-actor", "0.5", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "5 inputs: 2 upscaled, 0 already done, 3 bad inputs, 0 failed" in captured.out
    rows = pq.read_table(out / MANIFEST_NAME).to_pylist()
    by_path = {r["input_path"]: r for r in rows}
    assert (by_path[str(images / "one.png")]["prompt"], by_path[str(images / "one.png")]["seed"]) == ("a red barn", 11)
    assert (by_path[str(images / "two.png")]["prompt"], by_path[str(images / "two.png")]["seed"]) == ("a blue lake", 22)
    assert by_path[str(images / "one.png")]["config_hash"] != by_path[str(images / "two.png")]["config_hash"]
    assert "no such file" in by_path[str(images / "missing.png")]["error"]
    errors = sorted(r["error"] for r in rows if r["status"] == "error")
    assert any("listed again (first at row 0)" in e for e in errors) and any("empty 'path'" in e for e in errors)
    assert "no such file" in captured.err  # the closing report names the bad rows
    with Image.open(out / "one.png") as image:
        assert image.text["cupscale:prompt"] == "a red barn" and image.text["cupscale:seed"] == "11"


def test_worker_gives_up_on_an_input_that_killed_it(sdxl_dir, tmp_path):
    item = {"input_path": str(tmp_path / "poison.png"), "output_path": "poison.png", "overrides": {},
            "input_bytes": 1, "input_mtime_ns": 1}
    ledger = AttemptLedger(tmp_path)
    for _ in range(MAX_ATTEMPTS):  # each attempt so far died with its worker process before recording a row
        ledger.begin(item["input_path"])
    worker = UpscaleWorker(small_config(sdxl_dir), str(tmp_path))
    row = worker(pa.table({"item": [json.dumps(item)]})).to_pylist()[0]
    assert row["status"] == "failed" and f"died {MAX_ATTEMPTS} times" in row["error"]
    assert not (tmp_path / "poison.png").exists()


def test_workers_that_cannot_load_the_model_fail_in_one_clear_line(local_ray, tmp_path):
    (tmp_path / "in").mkdir()
    picture(64, 64).save(tmp_path / "in" / "a.png")
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(UserError, match=f"batch workers failed: --model {broken}: model_index.json lists no vae"):
        run_batch(str(tmp_path / "in"), tmp_path / "out", small_config(str(broken)), cluster=CPU_WORKERS,
                  progress=False)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()  # nothing finished: no (empty) manifest (issue 13)


# --- names: safe, never an input, deterministic ------------------------------------------------------------------
def test_output_names_are_safe_components():
    assert safe_component("..") == "_" and safe_component(".hidden") == "hidden" and safe_component("") == "_"
    assert str(output_name("a/../b c?.jpg")) == "a/_/b_c_.png"
    assert str(output_name("café/photo.tif")) == "café/photo.png"
    assert ".." not in output_name("../../etc/passwd").parts


def test_collisions_resolve_the_same_way_in_any_order(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "taken.png").write_bytes(b"someone else's file")  # not ours: never overwritten
    rels = ["x.png", "x.jpg", "X.webp", "sub/y.png", "taken.png", "sub/../z.png"]
    names = []
    for order in range(3):
        items = [Item(str(tmp_path / "in" / r), r) for r in rels]
        random.Random(order).shuffle(items)
        assign_outputs(items, out, {})
        names.append({i.rel: i.output_path for i in items})
    assert names[0] == names[1] == names[2]
    got = names[0]
    assert got["X.webp"] == "X.png"  # sorted first (uppercase), then case-insensitive collisions get a hash
    assert got["x.jpg"].startswith("x-") and got["x.png"].startswith("x-") and got["x.jpg"] != got["x.png"]
    assert got["taken.png"].startswith("taken-") and got["sub/y.png"] == "sub/y.png"
    assert got["sub/../z.png"] == "sub/_/z.png"


def test_never_overwrites_an_input_and_keeps_recorded_names(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    picture(64, 64).save(folder / "a.png")
    picture(64, 64).save(folder / "b.jpg")
    items = list_inputs(str(folder), folder)  # --output == --input
    assign_outputs(items, folder, {})
    names = {Path(i.input_path).name: i.output_path for i in items}
    assert names["a.png"] != "a.png" and names["b.jpg"] == "b.png"
    previous = {str(folder / "b.jpg"): {"input_path": str(folder / "b.jpg"), "output_path": "kept-name.png"}}
    items = list_inputs(str(folder), folder, produced=[str(folder / "kept-name.png")])
    assign_outputs(items, folder, previous)
    assert {Path(i.input_path).name: i.output_path for i in items}["b.jpg"] == "kept-name.png"


def test_outputs_inside_the_input_folder_are_never_inputs(tmp_path):
    folder = tmp_path / "photos"
    (folder / "up").mkdir(parents=True)
    picture(64, 64).save(folder / "a.png")
    picture(64, 64).save(folder / "up" / "a.png")
    assert [Path(i.input_path) for i in list_inputs(str(folder), folder / "up")] == [folder / "a.png"]


def test_symlinked_output_subdir_pointing_outside_is_not_used(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir(), elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere)
    items = [Item(str(tmp_path / "in" / "sub" / "a.png"), "sub/a.png")]
    assign_outputs(items, out, {})
    assert items[0].output_path is None and "no free output name" in items[0].error


@pytest.mark.parametrize("kwargs, message", [
    ({"workers": 0}, "--workers 0"),
    ({"cluster": ClusterOptions(actors=2)}, "--actors sets the denoisers of one image"),
    ({"tile_parallel": True, "workers": 2}, "--tile-parallel runs one image at a time"),
])
def test_bad_flag_combinations_fail_before_any_work(kwargs, message, tmp_path, sdxl_dir):
    with pytest.raises(UserError, match=message):
        run_batch(str(tmp_path), tmp_path / "out", small_config(sdxl_dir), progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_dry_run_plans_and_writes_nothing(tmp_path, sdxl_dir, capsys):
    good, _ = make_folder(tmp_path / "in")
    code = main(["batch", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", sdxl_dir,
                 "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0 and not (tmp_path / "out").exists()
    assert "11 inputs: 11 to upscale" in captured.out
    plan = json.loads(captured.out[: captured.out.rindex("]") + 1])
    assert len(plan) == 11 and all(p["action"] == "upscale" and p["output"].endswith(".png") for p in plan)


def test_missing_input_and_output_file_are_one_line_errors(tmp_path, capsys):
    assert main(["batch", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "no such directory, file or matching glob" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["batch", "--input", str(tmp_path), "--output", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
