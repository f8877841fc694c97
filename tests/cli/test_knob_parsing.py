"""Knob values and config files (issue 21 classes 1 and 14): YAML alias bombs in --set, service queries and config
files are refused at once; bad knob text and bad config files are one short line; valid YAML knobs still parse as
before; a config file over the size cap is refused."""

from __future__ import annotations

import time
from urllib.parse import urlencode

import pytest
from helpers import QUICK_S, refused_run

from cupscale_dist.config import MAX_CONFIG_BYTES, MAX_KNOB_TEXT, UpscaleConfig, set_value
from cupscale_dist.errors import UserError


def alias_bomb(levels: int) -> str:
    """A flow list of ``levels`` anchors, each nine aliases of the one before: 9**levels values from ~50 bytes a
    level (10 levels: 526 bytes, 3.5 billion values; the issue's ``?steps=``)."""
    items = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


# ---------------------------------------------------------------------------------------------------------------
# 1. YAML alias bombs in knob values (--set, service query parameters) and config files
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("knob", ["steps", "size", "lora", "guidance_scale"])
def test_alias_bomb_gh21_class1_knob_value_is_refused_at_once(knob):
    started = time.monotonic()
    with pytest.raises(UserError, match="anchors and aliases") as excinfo:
        set_value(knob, alias_bomb(10))
    assert time.monotonic() - started < QUICK_S and len(str(excinfo.value)) < 200


def test_alias_bomb_gh21_class1_service_query_is_refused_at_once():
    datastructures = pytest.importorskip("starlette.datastructures")
    from cupscale_dist.services.serve import request_knobs

    started = time.monotonic()
    with pytest.raises(UserError, match="anchors and aliases") as excinfo:
        request_knobs(datastructures.QueryParams(urlencode({"steps": alias_bomb(10)})))
    assert time.monotonic() - started < QUICK_S and len(str(excinfo.value)) < 200


BAD_KNOB_TEXT = {  # --set values whose error was megabytes long, a traceback, or that ran for seconds
    "alias-bomb": (f"steps={alias_bomb(6)}", "anchors and aliases"),
    "anchor-alone": ("size=&w [64, 64]", "anchors and aliases"),
    "over-the-length-cap": ("steps=[" + "1, " * (MAX_KNOB_TEXT // 3) + "]", f"{MAX_KNOB_TEXT}-character limit"),
    "nested-deep": ("size=" + "[" * 3000, "nested more than"),
    "int-of-1200-hex-digits": ("steps=0x" + "f" * 1200, "past 2**63"),
    "int-of-5000-digits": ("steps=" + "9" * 5000, "not a number"),
    "huge-int-for-a-float": ("guidance_scale=0x" + "f" * 300, "past 2**63"),
}


@pytest.mark.parametrize("value, words", BAD_KNOB_TEXT.values(), ids=BAD_KNOB_TEXT.keys())
def test_bad_knob_text_gh21_class1_is_one_short_line(value, words, parse_ws, tmp_path, capsys):
    assert words in refused_run(capsys, parse_ws, tmp_path, "--set", value)


BAD_CONFIG_FILES = {
    "alias-bomb": (f"steps: {alias_bomb(6)}\n", "anchors and aliases"),
    "merge-key": ("base: &base {steps: 4}\nstrength: 0.5\n", "anchors and aliases"),
    "nested-deep": ("steps: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than"),
    "int-of-5000-digits": ("steps: " + "9" * 5000 + "\n", "not valid YAML"),
    "int-of-1200-hex-digits": ("seed: 0x" + "f" * 1200 + "\n", "past 2**63"),
    "mixed-unknown-keys": ("1: a\nbogus: b\n" + "x" * 1000 + ": c\n", "unknown key(s) 1, bogus, xxxx"),
}


@pytest.mark.parametrize("text, words", BAD_CONFIG_FILES.values(), ids=BAD_CONFIG_FILES.keys())
def test_bad_config_file_gh21_class1_is_one_short_line(text, words, parse_ws, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(text)
    assert words in refused_run(capsys, parse_ws, tmp_path, "--config", str(tmp_path / "bad.yaml"))


def test_valid_yaml_knobs_still_parse_as_before(tmp_path):
    assert set_value("size", "[2048, 1536]") == [2048, 1536] and set_value("steps", "30") == 30
    assert set_value("lora", "a.safetensors") == "a.safetensors" and set_value("prompt", "&x *y") == "&x *y"
    (tmp_path / "ok.yaml").write_text("steps: 12\nsize: [256, 192]\nlora: [a.safetensors, 'b.safetensors:0.5']\n")
    config = UpscaleConfig.load(str(tmp_path / "ok.yaml"))
    assert (config.steps, config.size, config.lora) == (12, (256, 192), ("a.safetensors", "b.safetensors:0.5"))


def test_config_file_gh21_class14_over_the_cap_is_refused(parse_ws, tmp_path, capsys):
    path = tmp_path / "big.yaml"  # a valid config, one byte over the cap (a long comment)
    path.write_text("steps: 4\n#" + "x" * (MAX_CONFIG_BYTES - 10) + "\n")
    line = refused_run(capsys, parse_ws, tmp_path, "--config", str(path))
    assert f"config: {path} is over the {MAX_CONFIG_BYTES}-byte limit" in line
    path.write_text("steps: 4\n#" + "x" * (MAX_CONFIG_BYTES - 11) + "\n")  # at the cap: read as before
    assert UpscaleConfig.load(str(path)).steps == 4
