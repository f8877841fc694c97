"""Paths a user names (issue 35 item 4): 5,000-character paths and names over 255 bytes are one line naming the
option; FIFOs and directories where a file is read, lock files that are FIFOs or folders, control characters and
'~' forms (an unknown user, a non-ASCII name, a local file named ~something) are one line, never a traceback or a
hang (a FIFO case runs in a subprocess under a bound)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import DEMO, IMAGE, bounded, refused_line, short_line

from cupscale_dist import UserError
from cupscale_dist.cli.main import main

# ---------------------------------------------------------------------------------------------------------------
# Paths of 5,000 characters: one line naming the option, never `OSError: File name too long`
# ---------------------------------------------------------------------------------------------------------------
LONG = "/tmp/" + "a" * 5000
LONG_PATH_ARGS = {
    "input": (["upscale", LONG, "-o", "/tmp/o.png", *DEMO, "--dry-run"], "input '"),
    "output": (["upscale", IMAGE, "-o", LONG + ".png", *DEMO, "--dry-run"], "--output '"),
    "config": (["upscale", IMAGE, "-o", "/tmp/o.png", "--config", LONG + ".yaml", "--dry-run"], "--config '"),
    "model": (["upscale", IMAGE, "-o", "/tmp/o.png", *DEMO, "--model", LONG, "--dry-run"], "--model '"),
    "lora": (["upscale", IMAGE, "-o", "/tmp/o.png", *DEMO, "--lora", LONG, "--dry-run"], "--lora '"),
    "checkpoint-dir": (["upscale", IMAGE, "-o", "/tmp/o-long.png", *DEMO, "--checkpoint-dir", LONG, "--resume",
                        "--actors", "0"], "--checkpoint-dir '"),
    "set-model_config": (["upscale", IMAGE, "-o", "/tmp/o.png", *DEMO, "--set", f"model_config={LONG}", "--dry-run"],
                         "--set model_config '"),
    "batch-input": (["batch", "--input", LONG, "--output", "/tmp/bo-long", *DEMO, "--dry-run"], "--input '"),
    "batch-output": (["batch", "--input", IMAGE, "--output", LONG, *DEMO, "--dry-run"], "--output '"),
    "eval-original": (["eval", LONG, *DEMO], "original '"),
    "eval-out": (["eval", "--out", LONG, *DEMO], "--out '"),
    "eval-inception": (["eval", IMAGE, "--inception", LONG, *DEMO], "--inception '"),
    "eval-clip": (["eval", IMAGE, "--clip", LONG, *DEMO], "--clip '"),
    "caption-input": (["caption", LONG, *DEMO], "input '"),
    "serve-results": (["serve", "--results", LONG, *DEMO], "--results '"),
}


@pytest.mark.parametrize("argv, flag", LONG_PATH_ARGS.values(), ids=LONG_PATH_ARGS.keys())
def test_a_path_of_5000_characters_is_one_line_naming_the_option(argv, flag, capsys):
    assert main(argv) == 2
    line = short_line(capsys.readouterr().err)
    assert flag in line and "over the 4095 a path may have; give a shorter path" in line, line
    assert not Path("/tmp/o-long.png").exists()


def test_a_file_name_over_255_bytes_is_refused_too(capsys):
    assert main(["upscale", IMAGE, "-o", "/tmp/" + "b" * 300 + ".png", *DEMO, "--dry-run"]) == 2
    assert "has a name of 304 bytes, over the 255" in short_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------------------------
# FIFOs and directories where a file is read: refused at once (a FIFO hung the reader before)
# ---------------------------------------------------------------------------------------------------------------
def test_fifos_and_directories_are_refused_where_a_file_is_read(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    out = bounded(f"""
        from pathlib import Path
        from cupscale_dist import UserError
        from cupscale_dist.captions.promptfile import read_prompt_file
        from cupscale_dist.config import UpscaleConfig
        from cupscale_dist.files.userfile import read_json_object
        for name, call in [("prompts", lambda p: read_prompt_file(Path(p))),
                           ("config", lambda p: UpscaleConfig.load(p)),
                           ("json", lambda p: read_json_object(p, "model_index.json " + p, "re-save it"))]:
            for path in ({str(fifo)!r}, {str(tmp_path)!r}):
                try:
                    call(path)
                    print(name, "ACCEPTED")
                except UserError as exc:
                    print(name, exc)
        """)
    lines = out.strip().splitlines()
    assert len(lines) == 6, out
    for fifo_line, dir_line in zip(lines[0::2], lines[1::2]):  # config.py asks is_file() first: its own words
        assert ("is a named pipe (FIFO), not a file" in fifo_line
                or "neither a file nor a preset" in fifo_line), fifo_line
        assert "is a directory, not a file" in dir_line or "neither a file nor a preset" in dir_line, dir_line


# ---------------------------------------------------------------------------------------------------------------
# Found by tests/files/test_fuzz_files.py, kept as plain regression tests
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["\r", "a\nb.json", "tab\there.json"])
def test_fuzz_found_a_path_with_a_control_character_split_the_error_line(name, tmp_path, capsys):
    path = str(tmp_path / name)
    assert main(["upscale", IMAGE, "-o", str(tmp_path / "o.png"), *DEMO, "--regional-prompts", path, "--dry-run"]) == 2
    assert "contains a control character" in short_line(capsys.readouterr().err)


def test_fuzz_found_a_path_of_an_unknown_users_home_raised_runtimeerror(tmp_path, capsys):
    from cupscale_dist.models.addons import parse_lora  # noqa: F401 - pathlib's expanduser raised in here

    for argv in (["upscale", IMAGE, "-o", str(tmp_path / "o.png"), *DEMO, "--lora", "~0", "--dry-run"],
                 ["upscale", IMAGE, "-o", str(tmp_path / "o.png"), *DEMO, "--model", "~nosuchuser9/m", "--dry-run"],
                 ["batch", "--input", "~nosuchuser9/in", "--output", str(tmp_path / "out"), *DEMO, "--dry-run"]):
        assert main(argv) == 2
        assert "this machine has no such user; give the full path" in short_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_lock_file_that_is_a_fifo_or_a_folder_is_one_line(tmp_path):
    from cupscale_dist.services.batch.manifest import LOCK_NAME, OutputLock

    (tmp_path / "dir" / LOCK_NAME).mkdir(parents=True)
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / LOCK_NAME)
    for folder, words in (("dir", "is a directory, not a lock file"), ("fifo", "is a named pipe (FIFO), not a lock")):
        with pytest.raises(UserError) as error:
            with OutputLock(tmp_path / folder):
                pass
        assert words in refused_line(error) and "delete it" in str(error.value)
    out = bounded(f"""
        from pathlib import Path
        from cupscale_dist import UserError
        from cupscale_dist.files.folderlock import probe_lock_file
        try:
            probe_lock_file(Path({str(tmp_path / "fifo" / LOCK_NAME)!r}), "a service", "held by {{holder}}")
        except UserError as exc:
            print(exc)
        """)
    assert "is a named pipe (FIFO), not a lock file" in short_line(out), out  # the service's probe waited forever


@pytest.mark.parametrize("text", ["~\x80", "~\udcff/x", "~é/x.png"])
def test_fuzz_found_a_non_ascii_user_name_after_a_tilde_raised_unicodedecodeerror(text):
    from cupscale_dist.files.userfile import check_path_text

    with pytest.raises(UserError) as error:  # the example Hypothesis found (nightly profile), then two more
        check_path_text(text, "--lora")
    assert "no such user" in refused_line(error)


def test_fuzz_found_a_local_file_named_tilde_something_raised_runtimeerror(tmp_path, monkeypatch, capsys):
    from cupscale_dist.models.addons import parse_lora

    monkeypatch.chdir(tmp_path)  # './~0' is a file here, not a home: pathlib dropped the './' and looked up user '0'
    with pytest.raises(UserError, match="not a file"):
        parse_lora("./~0")
    from cupscale_dist.models.hub import resolve_model
    from cupscale_dist.models.spec import local_family, model_geometry

    assert local_family("./~0") is None and model_geometry("./~0") == model_geometry("./missing/x")
    with pytest.raises(UserError, match="not a diffusers model directory"):
        resolve_model("./~0")
