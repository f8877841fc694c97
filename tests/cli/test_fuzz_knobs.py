"""Issue 35 item 6: a fuzz harness for the CLI's knobs. Generated `--set KEY=VALUE` over every knob `cupscale knobs`
lists, typed flags and YAML config files (generated mappings and generated text) go through the real entry point
(`cupscale_dist.cli.main.main`, in this process) with `--dry-run`, so each example costs milliseconds.

The property, for every example: exit 0, or exit 2 with exactly one stderr line of at most 300 characters starting
`cupscale: error:`; never a traceback or another exception; no file written anywhere in the work folder (a dry run
writes nothing). Examples come from the Hypothesis profile in conftest.py (`HYPOTHESIS_PROFILE=ci`, the default: a
fixed, derandomized budget; `nightly`: many more). Failing examples found so far are plain regression tests below.
"""

from __future__ import annotations

import contextlib
import io
import os
import typing
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import MAX_LINE
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, strategies as st  # noqa: E402

from cupscale_dist.cli.main import main  # noqa: E402
from cupscale_dist.config import UpscaleConfig  # noqa: E402


def knob_names() -> list[str]:
    """The knobs as `cupscale knobs` prints them (first column): the list a user sees."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["knobs"]) == 0
    names = [line.split()[0] for line in out.getvalue().splitlines() if line.strip()]
    assert names == [f.name for f in fields(UpscaleConfig)]
    return names


KNOBS = knob_names()
CHOICES = sorted({str(v) for f in fields(UpscaleConfig) if isinstance(f.type, str) and f.type.startswith("Literal")
                  for v in typing.get_args(eval(f.type, {"Literal": typing.Literal}))})


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(folder / "in.png")
    return folder


def listing(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def run_cli(argv: list[str], work: Path) -> tuple[int, str, str]:
    """``main(argv)`` as the console script runs it, from inside ``work`` (a relative path lands there): (exit code,
    stdout, stderr); any other exception fails the example, and so does a file written or touched."""
    before, cwd = listing(work), os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse exits by itself
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(cwd)
    assert listing(work) == before, "a dry run wrote a file"
    return code, out.getvalue(), err.getvalue()


def assert_contract(code: int, stdout: str, stderr: str) -> None:
    """Exit 0, or exit 2 with one stderr line (<= 300 characters) and no traceback."""
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr[-3000:]
    assert code in (0, 2), (code, stderr[-3000:])
    if code == 2:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1, stderr[-3000:]
        assert lines[0].startswith("cupscale: error:") and len(lines[0]) <= MAX_LINE, lines[0]


def upscale(work: Path, *extra: str) -> list[str]:
    return ["upscale", str(work / "in.png"), "-o", str(work / "out.png"), "--model", "demo", "--dry-run", *extra]


# -- what is generated ----------------------------------------------------------------------------------------------
# argv can't hold a NUL byte (execve ends the string there): everything else may come in, including text that is not
# UTF-8, which Python hands over with surrogate escapes.
argv_text = st.text(st.characters(blacklist_characters="\x00"), max_size=60)
non_utf8 = st.binary(min_size=1, max_size=20).map(lambda b: b.decode("utf-8", "surrogateescape").replace("\x00", ""))
control = st.text(st.characters(max_codepoint=0x1f, blacklist_characters="\x00"), min_size=1, max_size=8)
special = st.sampled_from([".nan", "nan", "NaN", ".inf", "-.inf", "inf", "1e308", "-1e308", "1e-320", "1e400", "0x7f",
                           "1_000", "2**63", str(2**63), str(-(2**63)), str(10**30), "-1", "0", "-0.0", "true", "no",
                           "~", "null", "none", "", "[]", "{}", "[1]", "[1, 2, 3]", "[-1, -1]", "[.nan, 1]",
                           "[65536, 65536]", "{a: 1}", "&a 1", "*a", "<<: {a: 1}", "!!python/object:os.system",
                           "[" * 20, "'unterminated", "x:1e30", "a.safetensors:1e30", "hf://../x/y", "/dev/zero",
                           "/etc/passwd", "..", "C:/x.safetensors:-6"])
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                    st.integers(min_value=-(2**70), max_value=2**70).map(str),
                    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False).map(lambda v: f"{v:.3g}"))
value_text = st.one_of(special, numbers, st.sampled_from(CHOICES), argv_text, non_utf8, control,
                       st.lists(numbers, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"))
sets = st.lists(st.tuples(st.sampled_from(KNOBS), value_text), min_size=1, max_size=3)

FLAGS = ["--size", "--scale", "--steps", "--strength", "--tile", "--stride", "--seed", "--lora", "--creativity",
         "--resemblance", "--prompt", "--negative-prompt", "--device", "--dtype", "--controlnet", "--config"]
flags = st.lists(st.tuples(st.sampled_from(FLAGS), value_text), min_size=1, max_size=3)

yaml_scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.sampled_from(CHOICES))
yaml_value = st.recursive(yaml_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=6)
yaml_mapping = st.dictionaries(st.one_of(st.sampled_from(KNOBS), st.text(max_size=12)), yaml_value, max_size=4)
# Raw text from YAML's own syntax characters and knob names: anchors, merge keys, tags, flow collections, escapes.
yaml_pieces = st.sampled_from(["\n", ": ", "- ", "[", "]", "{", "}", ", ", "&a ", "*a", "<<", "!!str ", "!!float ",
                               "!!python/name:os.system ", '"\\0"', '"\\x00"', '"\\ud800"', "'", "#", "%YAML 1.1\n",
                               "---\n", "...\n", "? ", "|\n  ", ".nan", "1e308", "~", "\t", "\x85", "\ufeff"]
                              + [k + ": " for k in KNOBS])
yaml_text = st.lists(st.one_of(yaml_pieces, st.text(max_size=6)), max_size=30).map("".join)


# -- the properties -------------------------------------------------------------------------------------------------
@given(sets=sets)
@example(sets=[("guidance_scale", "1e308")])
@example(sets=[("lora", "x.safetensors:1e30")])
@example(sets=[("size", "[268435456, 1]")])
@example(sets=[("timestep_spacing", "none")])
@example(sets=[("scheduler", "ddim"), ("karras_sigmas", "true")])
def test_set_any_knob(work, sets):
    argv = upscale(work, *(arg for key, value in sets for arg in ("--set", f"{key}={value}")))
    assert_contract(*run_cli(argv, work))


@given(flags=flags)
@example(flags=[("--size", "268435456x1")])
@example(flags=[("--strength", "nan")])
@example(flags=[("--lora", "a.safetensors:1e30")])
@example(flags=[("--config", "\x1f\x1f\x1f\x1f\x1f\x08")])  # found: the preset list made the line 302 characters
@example(flags=[("--config", "x" * 5000)])
@example(flags=[("--strength", "2.4190365753323646e-296")])  # found: the fix named --steps of 296 digits
@example(flags=[("--strength", "1e-320")])  # 0.5 / strength overflows
def test_typed_flags(work, flags):
    argv = upscale(work, *(arg for flag, value in flags for arg in (flag, value)))
    assert_contract(*run_cli(argv, work))


@given(data=yaml_mapping)
@example(data={"guidance_scale": float("inf")})
@example(data={"lora": ["a.safetensors:0.5", "b.safetensors:1e30"]})
def test_generated_config_mapping(work, data):
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    try:
        assert_contract(*run_cli(upscale(work, "--config", str(path)), work))
    finally:
        path.unlink()


@given(text=yaml_text)
@example(text="<<: {strength: 0.9}\n")
@example(text='model: "a\\0b"\n')
@example(text="!!float ")  # found: PyYAML's constructor raised IndexError, a traceback
@example(text="steps: !!bool x\nseed: !!timestamp x\n")
def test_generated_config_text(work, text):
    path = work / "config.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        assert_contract(*run_cli(upscale(work, "--config", str(path)), work))
    finally:
        path.unlink()


# -- regression tests for what the fuzzing found ----------------------------------------------------------------------
@pytest.mark.parametrize("key", ["\r", "a\nb", "\u2028", ""])
def test_unknown_key_with_a_line_break_is_shown_escaped(tmp_path, key):
    """Found by test_generated_config_mapping: `{"\\r": null}` echoed the key raw, and the error became two lines."""
    from cupscale_dist.config import read_yaml
    from cupscale_dist.errors import UserError

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({key: None}))
    with pytest.raises(UserError) as caught:
        read_yaml(str(path))
    assert len(str(caught.value).splitlines()) == 1 and repr(key) in str(caught.value), str(caught.value)
    with pytest.raises(UserError) as caught:  # an unknown `--set` key, through replace()
        UpscaleConfig().replace(**{key + "x" * 100: 1})
    assert len(str(caught.value).splitlines()) == 1 and len(str(caught.value)) < 150, str(caught.value)


def test_an_error_with_a_line_break_stays_one_line(work, monkeypatch):
    """The last guard: whatever a message holds, the CLI writes it as one line (breaks escaped)."""
    import sys

    from cupscale_dist.errors import UserError

    def failing(_args):
        raise UserError("value 'a\rb\nc' is bad; fix it")

    monkeypatch.setitem(sys.modules["cupscale_dist.cli.main"].COMMANDS, "knobs", failing)
    code, out, err = run_cli(["knobs"], work)
    assert_contract(code, out, err)
    assert err.strip() == "cupscale: error: value 'a\\rb\\nc' is bad; fix it"


@pytest.mark.parametrize("text", ["!!float ", "!!int ''", "!!bool x", "!!timestamp x", "[!!float ]"])
def test_a_bad_tagged_value_is_a_yaml_error(text):
    """Found by test_generated_config_text: `!!float ` with no value was an IndexError traceback."""
    from cupscale_dist.config import set_value
    from cupscale_dist.errors import UserError

    with pytest.raises(UserError, match="not a number"):
        set_value("steps", text)


@pytest.mark.parametrize("strength", [2.4190365753323646e-296, 1e-320, 1e-4])
def test_a_tiny_strength_names_a_strength_not_a_huge_step_count(strength):
    """Found by test_typed_flags: strength 2.4e-296 asked for `--steps` of 296 digits (a 430-character line; the
    steps knob stops at 1000)."""
    from cupscale_dist.errors import UserError
    from cupscale_dist.plan import make_plan

    with pytest.raises(UserError, match=r"use a --strength above 0\.0005$") as caught:
        make_plan((64, 48), UpscaleConfig(strength=strength, model="demo"), (8, 4))
    assert len(str(caught.value)) < 200
    with pytest.raises(UserError, match="use --steps 2 or more"):  # a fix that the steps knob can reach
        make_plan((64, 48), UpscaleConfig(strength=0.4, steps=1), (8, 4))
