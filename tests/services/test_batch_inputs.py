"""Batch inputs from a dataset (issue 21 class 7): a bad parquet cell is that row's error, the rest of the dataset
runs."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from helpers import random_picture, small_config


# -- 7. a bad parquet cell is that row's error, the rest of the dataset runs ------------------------------------
def test_bad_parquet_cells_become_error_rows_and_the_rest_runs(sdxl_dir, tmp_path):
    from cupscale_dist.execution.raycluster import ClusterOptions
    from cupscale_dist.services.batch.manifest import MANIFEST_NAME
    from cupscale_dist.services.batch.run import run_batch

    random_picture(1).save(tmp_path / "one.png")
    random_picture(2).save(tmp_path / "two.png")
    pq.write_table(pa.table({"path": ["one.png", "one\0.png", "two.png"], "regional_prompts": [None, None, 5]}),
                   tmp_path / "numbers.parquet")
    pq.write_table(pa.table({"path": ["one.png", "two.png"], "regional_prompts": [None, ["a", "b"]]}),
                   tmp_path / "lists.parquet")
    config = small_config(sdxl_dir, steps=2)
    planned = run_batch(str(tmp_path / "lists.parquet"), tmp_path / "dry", config, dry_run=True, progress=False)
    assert [p["action"] for p in planned.planned] == ["upscale", "error"]

    summary = run_batch(str(tmp_path / "numbers.parquet"), tmp_path / "out", config, tile_parallel=True,
                        cluster=ClusterOptions(actors=0), progress=False)
    assert (summary.done, summary.errors, summary.failed) == (1, 2, 0)
    rows = {r["input_path"]: r for r in pq.read_table(tmp_path / "out" / MANIFEST_NAME).to_pylist()}
    assert rows[str(tmp_path / "one.png")]["status"] == "ok" and (tmp_path / "out" / "one.png").is_file()
    errors = sorted(r["error"] for r in rows.values() if r["status"] == "error")
    assert len(errors) == 2 and all("\n" not in e for e in errors)
    assert "contains a NUL byte" in errors[0] and "row 1" in errors[0]
    assert "'regional_prompts' is 5 (of type int), not a file path" in errors[1] and "row 2" in errors[1]
