"""The `cupscale` CLI held to its promises (issue 2, "CLI" and "Bad input"), end to end on the tiny SDXL model:
in-process through ``cupscale_dist.cli.main`` and once as a real ``python -m cupscale_dist.cli`` process.

Every bad input: exit code != 0, exactly one stderr line starting with "cupscale: error:" (no traceback), and
nothing written or overwritten (the output folder's listing and an existing output's bytes and mtime are checked).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cupscale_dist.cli.main import main
from cupscale_dist.files.imageio import read_png_metadata

# The fast run every end-to-end test uses: 64x48 -> 128x96 in one stage of one 16x16-latent view, 2 steps, in
# this process (--actors 0: the single-process reference; the Ray path, byte-identical, is tested on its own).
RUN = ["--tile", "16", "--stride", "8", "--steps", "4", "--device", "cpu", "--dtype", "float32", "--seed", "7",
       "--set", "torch_threads=1", "--actors", "0"]
SENTINEL_MTIME = 1_000_000_000  # 2001: an existing output touched by a failed run would get a new mtime


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``main(argv)`` like the console script does: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse exits by itself
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("cupscale: error:"), lines[0]
    assert "Traceback" not in err
    return lines[0]


def snapshot(*folders: Path) -> dict[str, tuple[int, bytes]]:
    """Every file below ``folders``: (mtime_ns, bytes); folders appear with an empty entry."""
    state = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            state[str(path)] = (path.stat().st_mtime_ns, path.read_bytes()) if path.is_file() else (0, b"")
    return state


def structured(width: int, height: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    disc = ((ys - height // 2) ** 2 + (xs - width // 2) ** 2 < (height // 4) ** 2)[..., None]
    rgb = np.stack([xs * 4, ys * 5, 255 - xs * 3], axis=-1) * (1 - disc) + disc * np.array([250, 200, 40])
    return rgb.clip(0, 255).astype(np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path, width: int, height: int) -> None:
    """A valid all-black greyscale PNG of a few KB that decodes to width*height bytes."""
    packer, row = zlib.compressobj(9), b"\0" * (width + 1)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Inputs, config files and model folders, good and bad; never written to by a test."""
    ws = tmp_path_factory.mktemp("cli-inputs")
    Image.fromarray(structured(64, 48)).save(ws / "in.png")
    Image.fromarray(structured(64, 64)).save(ws / "square.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(ws / "one.png")
    rgba = np.dstack([structured(64, 48), np.where(np.arange(64) < 32, 0, 255)[None, :].repeat(48, 0)])
    Image.fromarray(rgba.astype(np.uint8), "RGBA").save(ws / "rgba.png")
    full = (ws / "in.png").read_bytes()
    (ws / "half.png").write_bytes(full[: len(full) // 2])
    (ws / "text.png").write_text("this is a text file, not a picture\n")
    (ws / "empty.png").write_bytes(b"")
    bomb_png(ws / "bomb.png", 5000, 5000)  # 25 Mpx > the default 16.7 Mpx max_input_pixels
    (ws / "folder.png").mkdir()
    configs = {"invalid.yaml": "strength: [0.5\n", "unknown.yaml": "strength: 0.5\nbogus_knob: 1\n",
               "range.yaml": "strength: 2\n", "type.yaml": "steps: many\n", "list.yaml": "- strength\n- 0.5\n",
               "stride.yaml": "tile: 8\nstride: 16\n", "duplicate.yaml": "strength: 0.5\nsteps: 4\nstrength: 0.9\n",
               "nan.yaml": "guidance_scale: .nan\n"}
    for name, text in configs.items():
        (ws / name).write_text(text)
    (ws / "no-index").mkdir()
    (ws / "bad-index").mkdir()
    (ws / "bad-index" / "model_index.json").write_text("{not json")
    prompts = {"prompts-malformed.json": json.dumps({"stages": [{"stage": 0, "views": [{"box": [0, 0, 1, 1]}]}]}),
               "prompts-notjson.json": "{'stages': oops",
               "prompts-count.json": json.dumps({"prompt": "a cat", "stages": [{"stage": 0, "views": [
                   {"box": [0, 0, 128, 128], "prompt": "a cat"}, {"box": [0, 0, 128, 128], "prompt": "a dog"}]}]})}
    view = {"box": [0, 0, 128, 128], "prompt": "a cat"}
    prompts.update({  # issue 13 item 8: every schema departure is one line, never a traceback or silently ignored
        "prompts-deep.json": "[" * 100_000 + "]" * 100_000,
        "prompts-global-int.json": json.dumps({"prompt": 5, "stages": []}),
        "prompts-stage-string.json": json.dumps({"stages": [{"stage": "0", "views": [view]}]}),
        "prompts-stage-range.json": json.dumps({"stages": [{"stage": 3, "views": [view]}]}),
        "prompts-stage-twice.json": json.dumps({"stages": [{"stage": 0, "views": [view]},
                                                           {"stage": 0, "views": [view]}]}),
        "prompts-stage-bool.json": json.dumps({"stages": [{"stage": False, "views": [view]}]}),
        "prompts-view-int.json": json.dumps({"stages": [{"stage": 0, "views": [{"box": [0, 0, 1, 1], "prompt": 7}]}]}),
        "prompts-box.json": json.dumps({"stages": [{"stage": 0, "views": [{"box": [0, 0, "x"], "prompt": "a"}]}]}),
        "prompts-unknown-key.json": json.dumps({"prompt": "a cat", "stage": []}),
        "prompts-size.json": json.dumps({"stages": [{"stage": 0, "size": [64, 64], "views": [view]}]}),
    })
    for name, text in prompts.items():
        (ws / name).write_text(text)
    return ws


@pytest.fixture
def out(tmp_path) -> Path:
    """An output folder holding one existing result, ``existing.png``, with an old mtime."""
    folder = tmp_path / "out"
    folder.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "existing.png")
    os.utime(folder / "existing.png", ns=(SENTINEL_MTIME * 10**9, SENTINEL_MTIME * 10**9))
    return folder


def upscale_args(ws: Path, model: str, output: Path, *extra: str, source: str = "in.png") -> list[str]:
    return ["upscale", str(ws / source), "-o", str(output), "--model", model, "--scale", "2", *RUN, *extra]


# ---------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------
PROMPT = "a lighthouse on a cliff, café au lait, 猫"


@pytest.fixture(scope="module")
def twice(ws, sdxl_dir, tmp_path_factory) -> tuple[Path, Path, str]:
    """The same upscale run twice, in-process, into two files; returns (first, second, stdout of the first)."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("cli-e2e")
    outputs, stdouts = [folder / "first.png", folder / "second.png"], []
    for output in outputs:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(upscale_args(ws, sdxl_dir, output, "-q", "--prompt", PROMPT, "--set", "lambda_global=0.7"))
        assert code == 0
        stdouts.append(buffer.getvalue())
    assert sorted(p.name for p in folder.iterdir()) == ["first.png", "second.png"]  # no temp files left behind
    return outputs[0], outputs[1], stdouts[0]


def test_upscale_writes_png_of_the_right_size(twice):
    first, _, stdout = twice
    with Image.open(first) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (128, 96)
    assert f"wrote {first} (128x96)" in stdout


def test_png_text_chunks_carry_the_run(twice, sdxl_dir, ws):
    meta = read_png_metadata(twice[0])
    assert meta["prompt"] == PROMPT
    assert meta["seed"] == "7"
    assert meta["model"] == sdxl_dir
    assert json.loads(meta["stages"]) == [[128, 128]]
    assert meta["tile"] == "16" and meta["stride"] == "8"
    config = json.loads(meta["config"])
    assert config["lambda_global"] == 0.7  # --set reached the config
    assert config["prompt"] == PROMPT and config["seed"] == 7 and config["steps"] == 4 and config["scale"] == 2
    assert config["tile"] == 16 and config["stride"] == 8 and config["model"] == sdxl_dir
    assert meta["source"] == str(ws / "in.png")
    from cupscale_dist import UpscaleConfig

    assert UpscaleConfig(**{k: v for k, v in config.items()}).config_hash() == meta["config_hash"]


def test_same_arguments_twice_give_identical_bytes(twice):
    first, second, _ = twice
    assert first.read_bytes() == second.read_bytes()


def test_real_process_matches_in_process_run(twice, ws, sdxl_dir, tmp_path):
    """`python -m cupscale_dist.cli upscale ...` as a user runs it: exit 0, the file, the same bytes."""
    output = tmp_path / "process.png"
    argv = upscale_args(ws, sdxl_dir, output, "--prompt", PROMPT, "--set", "lambda_global=0.7")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "cupscale_dist.cli", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert f"wrote {output} (128x96)" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["process.png"]
    assert Image.open(output).size == (128, 96)
    assert read_png_metadata(output) == read_png_metadata(twice[0])
    assert output.read_bytes() == twice[0].read_bytes()  # threads pinned by --set torch_threads=1


def test_overwrite_replaces_an_existing_output(twice, ws, sdxl_dir, out, capsys):
    target = out / "existing.png"
    code, _, err = cli(capsys, *upscale_args(ws, sdxl_dir, target, "-q", "--prompt", PROMPT,
                                              "--set", "lambda_global=0.7", "--overwrite"))
    assert code == 0, err
    assert target.read_bytes() == twice[0].read_bytes()
    assert target.stat().st_mtime_ns != SENTINEL_MTIME * 10**9
    assert sorted(p.name for p in out.iterdir()) == ["existing.png"]


def test_size_gives_exactly_that_size(ws, sdxl_dir, tmp_path, capsys):
    output = tmp_path / "sized.png"
    argv = upscale_args(ws, sdxl_dir, output, "-q")
    argv[argv.index("--scale") : argv.index("--scale") + 2] = ["--size", "100x75"]
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert Image.open(output).size == (100, 75)
    assert "(100x75)" in out
    assert json.loads(read_png_metadata(output)["config"])["size"] == [100, 75]


def test_odd_mode_input_is_converted(ws, sdxl_dir, tmp_path, capsys):
    """An RGBA input (left half fully transparent) runs like any other and gives an RGB result."""
    output = tmp_path / "from-rgba.png"
    code, _, err = cli(capsys, *upscale_args(ws, sdxl_dir, output, "-q", source="rgba.png"))
    assert code == 0, err
    with Image.open(output) as image:
        assert image.mode == "RGB" and image.size == (128, 96)


def test_preset_loads_and_flags_override_it(ws, sdxl_dir, tmp_path, capsys):
    output = tmp_path / "demo.png"
    code, _, err = cli(capsys, "upscale", ws / "in.png", "-o", output, "--config", "cpu-demo", "--model", sdxl_dir,
                       "--steps", "4", "--actors", "0", "-q")
    assert code == 0, err
    config = json.loads(read_png_metadata(output)["config"])
    assert config["tile"] == 64 and config["stride"] == 32  # from configs/cpu-demo.yaml
    assert config["prompt"] == "a photo of an astronaut" and config["device"] == "cpu"
    assert config["steps"] == 4 and config["model"] == sdxl_dir  # the flags win
    assert Image.open(output).size == (128, 96)


# ---------------------------------------------------------------------------------------------------------------
# Dry run, help, commands
# ---------------------------------------------------------------------------------------------------------------
def test_dry_run_prints_the_plan_and_writes_nothing(ws, out, capsys):
    before = snapshot(out, ws)
    code, stdout, err = cli(capsys, "upscale", ws / "in.png", "-o", out / "new.png", "--scale", "4", "--tile", "16",
                            "--stride", "8", "--steps", "10", "--strength", "0.6", "--model", "/nowhere/at/all",
                            "--dry-run")
    assert code == 0, err
    plan = json.loads(stdout)
    assert plan["input"] == [64, 48] and plan["output"] == [256, 192]
    assert [s["size"] for s in plan["stages"]] == [[128, 128], [256, 192]]
    for stage in plan["stages"]:
        assert stage["steps"] == 6  # round(0.6 * 10)
        assert stage["views_per_step"] >= 1
        assert stage["unet_evaluations"] == stage["views_per_step"] * 6 * 2  # x2 for CFG
        assert stage["est_host_memory_mb"] > 0
    assert plan["stages"][1]["views_per_step"] > plan["stages"][0]["views_per_step"]
    assert plan["unet_evaluations"] == sum(s["unet_evaluations"] for s in plan["stages"])
    assert snapshot(out, ws) == before  # no output, no model load, nothing touched


def test_dry_run_leaves_an_existing_output_alone(ws, out, capsys):
    before = snapshot(out)
    code, stdout, _ = cli(capsys, "upscale", ws / "in.png", "-o", out / "existing.png", "--dry-run")
    assert code == 0 and json.loads(stdout)["stages"]
    assert snapshot(out) == before


def test_dry_run_of_a_preset(ws, tmp_path, capsys):
    code, stdout, err = cli(capsys, "upscale", ws / "in.png", "-o", tmp_path / "x.png", "--config", "cpu-demo",
                            "--dry-run")
    assert code == 0, err
    plan = json.loads(stdout)
    assert plan["model"] == "demo" and plan["tile"] == 64 and plan["stride"] == 32
    assert plan["stages"][0]["steps"] == 2 and plan["output"] == [128, 96]  # strength 0.2 of 10 steps
    assert list(tmp_path.iterdir()) == []


def test_set_reaches_knobs_that_have_flags_too(ws, tmp_path, capsys):
    """--set works for every knob, also those with their own flag (prompt, seed, tile, size, ...), verbatim for
    text knobs (a prompt with a colon is a prompt, not a YAML mapping), and wins over the flag."""
    from cupscale_dist import UpscaleConfig

    code, stdout, err = cli(capsys, "upscale", ws / "in.png", "-o", tmp_path / "x.png", "--dry-run", "--tile", "32",
                            "--set", "tile=16", "--set", "stride=8", "--set", "prompt=photo: a cat, 1.0",
                            "--set", "seed=3", "--set", "size=[100, 75]", "--set", "scheduler=ddim")
    assert code == 0, err
    plan = json.loads(stdout)
    assert plan["tile"] == 16 and plan["stride"] == 8 and plan["output"] == [100, 75]
    expected = UpscaleConfig(prompt="photo: a cat, 1.0", seed=3, tile=16, stride=8, size=(100, 75), scheduler="ddim")
    assert plan["config_hash"] == expected.config_hash()


def test_no_arguments_prints_help(capsys):
    code, out, err = cli(capsys)
    assert code == 0
    assert out.startswith("usage: cupscale") and "upscale" in out and "knobs" in out
    assert err == ""


def test_no_arguments_prints_help_as_a_process():
    done = subprocess.run([sys.executable, "-m", "cupscale_dist.cli"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: cupscale") and done.stderr == ""


@pytest.mark.parametrize("command, hint", [("upscal", "did you mean `cupscale upscale`"),
                                           ("presetz", "did you mean `cupscale presets`"),
                                           ("frobnicate", "upscale")])
def test_unknown_command(capsys, command, hint):
    code, out, err = cli(capsys, command, "x.png")
    assert hint in assert_one_error_line(code, err)
    assert out == ""


def test_presets_and_knobs(capsys):
    code, out, _ = cli(capsys, "presets")
    assert code == 0 and {"cpu-demo", "sdxl-2k", "sdxl-4k", "sdxl-8k", "sdxl-16k", "sd15-2k"} <= set(out.split())
    code, out, _ = cli(capsys, "knobs")
    assert code == 0
    names = {line.split()[0] for line in out.splitlines()}
    assert {"lambda_global", "strength", "max_input_pixels", "tile", "stride"} <= names


# ---------------------------------------------------------------------------------------------------------------
# Bad input: exit != 0, one line, nothing written or overwritten
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Bad:
    """A bad invocation: ``extra`` args on top of the fast run; by default the target is the existing output with
    --overwrite, so a run that wrongly went ahead would visibly replace it."""

    source: str = "in.png"
    extra: list[str] = field(default_factory=list)
    words: str = ""  # must appear in the error line
    output: str = "existing.png"
    overwrite: bool = True
    scale: bool = True

    def argv(self, ws: Path, out: Path, model: str) -> list[str]:
        argv = ["upscale", str(ws / self.source), "-o", str(out / self.output), "--model", model, *RUN, "-q"]
        argv += ["--overwrite"] if self.overwrite else []
        argv += ["--scale", "2"] if self.scale else []
        return argv + [a.replace("{ws}", str(ws)) for a in self.extra]


BAD = {
    # input
    "missing-file": Bad(source="missing.png", words="no such file"),
    "directory-input": Bad(source="folder.png", words="not a file"),
    "not-an-image": Bad(source="text.png", words="not a readable image"),
    "empty-file": Bad(source="empty.png", words="empty"),
    "truncated-png": Bad(source="half.png", words="truncated"),
    "over-pixel-limit": Bad(source="square.png", extra=["--set", "max_input_pixels=1000"], words="64x64"),
    "decompression-bomb": Bad(source="bomb.png", words="5000x5000"),
    "one-by-one": Bad(source="one.png", words="1x1"),
    # output
    "output-exists": Bad(overwrite=False, words="--overwrite"),
    "output-dir-missing": Bad(output="missing/new.png", words="does not exist"),
    "output-unknown-type": Bad(output="new.gif", words=".webp"),
    "output-is-directory": Bad(output="", extra=["-o", "{ws}/folder.png"], words="directory"),
    # scale / size
    "scale-3": Bad(extra=["--scale", "3"], scale=False, words="scale"),
    "scale-not-a-number": Bad(extra=["--scale", "two"], scale=False, words="--scale"),
    "size-0x5": Bad(extra=["--size", "0x5"], scale=False, words="--size"),
    "size-abc": Bad(extra=["--size", "abc"], scale=False, words="--size"),
    "size-smaller-than-input": Bad(extra=["--size", "32x24"], scale=False, words="larger"),
    "scale-and-size": Bad(extra=["--size", "128x96"], words="--size"),
    # config
    "config-invalid-yaml": Bad(extra=["--config", "{ws}/invalid.yaml"], words="YAML"),
    "config-unknown-key": Bad(extra=["--config", "{ws}/unknown.yaml"], words="bogus_knob"),
    "config-out-of-range": Bad(extra=["--config", "{ws}/range.yaml"], words="strength"),
    "config-wrong-type": Bad(extra=["--config", "{ws}/type.yaml"], words="steps"),
    "config-not-a-mapping": Bad(extra=["--config", "{ws}/list.yaml"], words="mapping"),
    "config-stride-over-tile": Bad(extra=["--config", "{ws}/stride.yaml", "--tile", "8", "--stride", "16"],
                                   words="stride"),
    "config-missing": Bad(extra=["--config", "{ws}/nope.yaml"], words="nope.yaml"),
    "config-unknown-preset": Bad(extra=["--config", "sdxl-3k"], words="presets"),
    "set-unknown-knob": Bad(extra=["--set", "nonsense=1"], words="nonsense"),
    "set-out-of-range": Bad(extra=["--set", "lambda_global=1.5"], words="lambda_global"),
    "set-not-key-value": Bad(extra=["--set", "lambda_global"], words="--set"),
    "set-bad-yaml": Bad(extra=["--set", "lambda_global=[0.5"], words="lambda_global"),
    "strength-out-of-range": Bad(extra=["--strength", "2"], words="strength"),
    "steps-zero": Bad(extra=["--steps", "0"], words="steps"),
    "strength-rounds-to-no-step": Bad(extra=["--steps", "2", "--strength", "0.2"], words="--steps 3"),
    "seed-negative": Bad(extra=["--seed", "-1"], words="seed"),
    "seed-too-big": Bad(extra=["--seed", "99999999999999999999"], words="seed"),
    # model and device
    "model-dir-missing": Bad(extra=["--model", "{ws}/no-such-model"], words="--model"),
    "model-dir-without-index": Bad(extra=["--model", "{ws}/no-index"], words="model_index.json"),
    "model-index-unreadable": Bad(extra=["--model", "{ws}/bad-index"], words="model_index.json"),
    "device-unknown": Bad(extra=["--device", "quantum"], words="--device"),
    "dtype-unknown": Bad(extra=["--dtype", "float7"], words="--dtype"),
    # regional prompts
    "regional-prompts-missing": Bad(extra=["--regional-prompts", "{ws}/nope.json"], words="no such file"),
    "regional-prompts-not-json": Bad(extra=["--regional-prompts", "{ws}/prompts-notjson.json"], words="JSON"),
    "regional-prompts-malformed": Bad(extra=["--regional-prompts", "{ws}/prompts-malformed.json"], words="expected"),
    "regional-prompts-view-count": Bad(extra=["--regional-prompts", "{ws}/prompts-count.json"], words="2 views"),
    # issue 13 item 3: NaN and inf pass every bound check; each float knob refuses them
    "set-guidance-nan": Bad(extra=["--set", "guidance_scale=.nan"], words="guidance_scale=nan is not a finite"),
    "set-guidance-inf": Bad(extra=["--set", "guidance_scale=.inf"], words="guidance_scale=inf is not a finite"),
    "set-lambda-nan": Bad(extra=["--set", "lambda_global=.nan"], words="lambda_global=nan is not a finite"),
    "strength-nan": Bad(extra=["--strength", "nan"], words="strength=nan is not a finite"),
    "config-file-nan": Bad(extra=["--config", "{ws}/nan.yaml"], words="guidance_scale=nan"),
    "cpus-per-actor-nan": Bad(extra=["--cpus-per-actor", "nan"], words="--cpus-per-actor=nan"),
    # issue 13 item 4: argv bytes that are not UTF-8 arrive as lone surrogates
    "prompt-not-utf8": Bad(extra=["--prompt", "\udcff\udcfe"], words="prompt: b'\\xff\\xfe' is not valid UTF-8"),
    "negative-prompt-not-utf8": Bad(extra=["--negative-prompt", "a \udcff"], words="negative_prompt"),
    # issue 13 item 8: regional-prompts schema
    "regional-prompts-deep": Bad(extra=["--regional-prompts", "{ws}/prompts-deep.json"], words="nested too deeply"),
    "regional-prompts-global-int": Bad(extra=["--regional-prompts", "{ws}/prompts-global-int.json"],
                                       words="the file.prompt must be a str, got 5"),
    "regional-prompts-stage-string": Bad(extra=["--regional-prompts", "{ws}/prompts-stage-string.json"],
                                         words="stages[0].stage must be a int, got '0'"),
    "regional-prompts-stage-bool": Bad(extra=["--regional-prompts", "{ws}/prompts-stage-bool.json"],
                                       words="stages[0].stage must be a int"),
    "regional-prompts-stage-range": Bad(extra=["--regional-prompts", "{ws}/prompts-stage-range.json"],
                                        words="stage 3 does not exist, this run has 1 stage"),
    "regional-prompts-stage-twice": Bad(extra=["--regional-prompts", "{ws}/prompts-stage-twice.json"],
                                        words="listed twice"),
    "regional-prompts-view-int": Bad(extra=["--regional-prompts", "{ws}/prompts-view-int.json"],
                                     words="stages[0].views[0].prompt must be a str, got 7"),
    "regional-prompts-box": Bad(extra=["--regional-prompts", "{ws}/prompts-box.json"], words="box must be 4 integers"),
    "regional-prompts-unknown-key": Bad(extra=["--regional-prompts", "{ws}/prompts-unknown-key.json"],
                                        words="unknown key(s) 'stage'"),
    "regional-prompts-size": Bad(extra=["--regional-prompts", "{ws}/prompts-size.json"],
                                 words="64x64 in the file but 128x128 in this run"),
    # issue 13 item 11
    "output-unwritable-proc": Bad(output="", extra=["-o", "/proc/cupscale-out.png", "--model", "{ws}/no-such-model"],
                                  words="can't write to /proc"),  # before the model is even looked at
    "output-is-the-input": Bad(output="", extra=["-o", "{ws}/in.png"], words="is the input image"),
    "size-over-output-limit": Bad(extra=["--size", "100000x100000"], scale=False, words="max_output_pixels"),
    "scale-over-output-limit": Bad(extra=["--set", "max_output_pixels=10000"], words="128x96 is over the 10000-pixel"),
    "config-duplicate-key": Bad(extra=["--config", "{ws}/duplicate.yaml"], words="duplicate key 'strength' at line 3"),
    # run options
    "actors-negative": Bad(extra=["--actors", "-1"], words="--actors"),
    "resume-without-checkpoint-dir": Bad(extra=["--resume"], words="--checkpoint-dir"),
    # arguments
    "no-output-option": Bad(output="", extra=[], words="-o"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_input_is_one_line_and_writes_nothing(case, ws, out, sdxl_dir, capsys):
    argv = case.argv(ws, out, sdxl_dir)
    if not case.output:  # the case brings its own -o, or none at all
        at = argv.index("-o")
        del argv[at : at + 2]
    before = snapshot(out, ws)
    code, stdout, err = cli(capsys, *argv)
    line = assert_one_error_line(code, err)
    assert case.words in line, line
    assert snapshot(out, ws) == before  # no new file, no temp file, the existing output untouched
    assert "wrote" not in stdout


def test_bad_input_as_a_process(ws, tmp_path):
    """A real process: exit code, one stderr line, nothing written; for an input error and an argument error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv in (["upscale", str(ws / "half.png"), "-o", str(tmp_path / "x.png")],
                 ["upscale", str(ws / "in.png"), "-o", str(tmp_path / "x.png"), "--size", "abc"]):
        done = subprocess.run([sys.executable, "-m", "cupscale_dist.cli", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert_one_error_line(done.returncode, done.stderr)
        assert done.stdout == ""
    assert list(tmp_path.iterdir()) == []
