"""Batch journals and manifests (issue 35 items 4 and 7): wrong types, deep JSON, lines cut short or over the cap,
folders and FIFOs, rows whose output lies outside the output folder; and batch does not follow symlinks out of the
input folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import DEMO, bounded, refused_line, short_line
from PIL import Image

from cupscale_dist import UserError
from cupscale_dist.cli.main import main


# ---------------------------------------------------------------------------------------------------------------
# Batch journals and manifests: wrong types, deep JSON, folders and FIFOs, outputs outside the output folder
# ---------------------------------------------------------------------------------------------------------------
def journal_row(input_path: str, **fields) -> dict:
    from cupscale_dist.services.batch.manifest import MANIFEST_SCHEMA

    return {**dict.fromkeys(MANIFEST_SCHEMA.names), "input_path": input_path, "status": "ok", **fields}


def write_journal(out: Path, *lines: str) -> Path:
    from cupscale_dist.services.batch.manifest import JOURNAL_DIR

    (out / JOURNAL_DIR).mkdir(parents=True, exist_ok=True)
    path = out / JOURNAL_DIR / "host-1.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


POISONED_LINES = {
    "deep-json": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "a-list": ("[1, 2]", "not an object"),
    "a-number": ("5", "not an object"),
    "bytes-a-string": (json.dumps(journal_row("/x.png", input_bytes="12")), "input_bytes is '12'"),
    "width-past-int32": (json.dumps(journal_row("/x.png", input_width=2**40)), "input_width is 1099511627776"),
    "status-a-list": (json.dumps(journal_row("/x.png", status=["ok"])), "status is ['ok']"),
    "no-input-path": (json.dumps(journal_row(None)), "input_path is missing"),
    "bool-seed": (json.dumps(journal_row("/x.png", seed=True)), "seed is True"),
}


@pytest.mark.parametrize("line, words", POISONED_LINES.values(), ids=POISONED_LINES.keys())
def test_a_poisoned_journal_line_is_one_line_that_says_how_to_clear_it(line, words, tmp_path):
    from cupscale_dist.services.batch.manifest import MANIFEST_NAME, read_manifest

    path = write_journal(tmp_path, json.dumps(journal_row("/ok.png")), line)
    with pytest.raises(UserError) as error:
        read_manifest(tmp_path / MANIFEST_NAME)
    message = refused_line(error)
    assert words in message and "line 2" in message and f"delete it to clear it: rm '{path}'" in message, message


def test_a_journal_line_cut_short_by_a_kill_is_still_skipped(tmp_path):
    from cupscale_dist.services.batch.manifest import Journal

    path = write_journal(tmp_path, json.dumps(journal_row("/ok.png")))
    with open(path, "a") as handle:
        handle.write(json.dumps(journal_row("/cut.png"))[:40])  # no newline: the append a kill stopped
    assert [row["input_path"] for row in Journal(tmp_path).rows()] == ["/ok.png"]


def test_a_journal_line_over_the_cap_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    from cupscale_dist.services.batch import manifest

    monkeypatch.setattr(manifest, "MAX_JOURNAL_LINE", 1000)
    write_journal(tmp_path, json.dumps(journal_row("/x.png", prompt="p" * 2000)))
    with pytest.raises(UserError, match="line 1 is over 1000 bytes"):
        manifest.Journal(tmp_path).rows()


def test_journal_files_that_are_folders_or_fifos_and_a_journal_folder_that_is_a_file(tmp_path):
    from cupscale_dist.services.batch.manifest import JOURNAL_DIR, Journal

    (tmp_path / "a" / JOURNAL_DIR / "host-2.jsonl").mkdir(parents=True)
    with pytest.raises(UserError) as error:
        Journal(tmp_path / "a").rows()
    assert "is a directory, not a file" in refused_line(error) and "delete it to clear it" in str(error.value)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / JOURNAL_DIR).write_text("not a folder")
    with pytest.raises(UserError, match="is not a folder; delete it"):
        Journal(tmp_path / "b").rows()
    (tmp_path / "c" / JOURNAL_DIR).mkdir(parents=True)
    os.mkfifo(tmp_path / "c" / JOURNAL_DIR / "host-3.jsonl")
    out = bounded(f"""
        from pathlib import Path
        from cupscale_dist import UserError
        from cupscale_dist.services.batch.manifest import Journal
        try:
            print(Journal(Path({str(tmp_path / "c")!r})).rows())
        except UserError as exc:
            print(exc)
        """)
    assert "is a named pipe (FIFO), not a file" in short_line(out), out


def test_manifests_of_wrong_types_folders_and_fifos_are_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cupscale_dist.services.batch.manifest import MANIFEST_NAME, read_manifest

    (tmp_path / "a" / MANIFEST_NAME).mkdir(parents=True)  # pyarrow would read a folder as a dataset
    with pytest.raises(UserError) as error:
        read_manifest(tmp_path / "a" / MANIFEST_NAME)
    assert "is a directory, not a file" in refused_line(error) and "move it away" in str(error.value)
    (tmp_path / "b").mkdir()
    pq.write_table(pa.table({"input_path": ["/x.png"], "output_path": [5]}), tmp_path / "b" / MANIFEST_NAME)
    with pytest.raises(UserError) as error:
        read_manifest(tmp_path / "b" / MANIFEST_NAME)
    assert "a column output_path of type int64 (expected string)" in refused_line(error)
    pq.write_table(pa.table({"path": ["/x.png"]}), tmp_path / "b" / MANIFEST_NAME)
    with pytest.raises(UserError, match="has no input_path column"):
        read_manifest(tmp_path / "b" / MANIFEST_NAME)
    (tmp_path / "c").mkdir()
    os.mkfifo(tmp_path / "c" / MANIFEST_NAME)
    out = bounded(f"""
        from pathlib import Path
        from cupscale_dist import UserError
        from cupscale_dist.services.batch.manifest import read_manifest
        try:
            print(read_manifest(Path({str(tmp_path / "c" / MANIFEST_NAME)!r})))
        except UserError as exc:
            print(exc)
        """)
    assert "is a named pipe (FIFO), not a file" in short_line(out), out


def small_images(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for number, name in enumerate(names):
        Image.new("RGB", (64, 64), (40 * number, 90, 160)).save(folder / name)


def dry_run(capsys, inputs, out) -> dict:
    code = main(["batch", "--input", str(inputs), "--output", str(out), *DEMO, "--dry-run", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return {Path(row["input"]).name: row for row in json.loads(captured.out[: captured.out.rindex("]") + 1])}


@pytest.mark.parametrize("recorded", ["ABSOLUTE", "../in/b.png", "sub/../../in/b.png"])
def test_a_journal_row_whose_output_lies_outside_the_output_folder_is_ignored(recorded, tmp_path, capsys):
    small_images(tmp_path / "in", "a.png", "b.png")
    out = tmp_path / "out"
    out.mkdir()
    recorded = str(tmp_path / "in" / "b.png") if recorded == "ABSOLUTE" else recorded
    write_journal(out, json.dumps(journal_row(str(tmp_path / "in" / "a.png"), output_path=recorded)))
    planned = dry_run(capsys, tmp_path / "in", out)
    # trusted, the row made b.png "our output" (left out of the inputs) and a.png's output b.png
    assert sorted(planned) == ["a.png", "b.png"], planned
    assert planned["a.png"]["action"] == "upscale" and planned["a.png"]["output"] == "a.png", planned


# ---------------------------------------------------------------------------------------------------------------
# Item 7: batch does not follow symlinks out of the input folder
# ---------------------------------------------------------------------------------------------------------------
def test_batch_refuses_symlinks_out_of_the_input_folder(tmp_path, capsys):
    small_images(tmp_path / "in", "ok.png")
    small_images(tmp_path / "in" / "sub", "inside.png")
    small_images(tmp_path / "private", "secret.png")
    (tmp_path / "in" / "link.png").symlink_to(tmp_path / "private" / "secret.png")
    (tmp_path / "in" / "alias.png").symlink_to(tmp_path / "in" / "sub" / "inside.png")  # inside: fine
    for spec in (tmp_path / "in", f"{tmp_path / 'in'}/**/*.png"):
        planned = dry_run(capsys, spec, tmp_path / f"out-{len(str(spec))}")
        assert planned["link.png"]["action"] == "error", planned
        assert {planned[name]["action"] for name in ("ok.png", "inside.png", "alias.png")} == {"upscale"}, planned
    from cupscale_dist.services.batch.inputs import SYMLINK_OUT, list_inputs

    errors = [i.error for i in list_inputs(str(tmp_path / "in"), tmp_path / "out") if i.error]
    assert errors == [f"input {tmp_path / 'in' / 'link.png'}: {SYMLINK_OUT}"]
    alone = list_inputs(str(tmp_path / "in" / "link.png"), tmp_path / "out")  # named on its own: the user's choice
    assert [i.error for i in alone] == [None]
