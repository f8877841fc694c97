"""Issue 35, hardening round 3: knobs and plans. Scales in sane ranges (item 1), plans bounded by what they build
(item 2), knobs that would be ignored are refused (item 5), inline YAML merge keys and warnings around the one-line
error (item 7). Every case is refused before any model loads: the CLI runs with ``--dry-run`` on the bundled demo
model, in this process.
"""

from __future__ import annotations

import logging
import sys
import types
import warnings
from pathlib import Path

import pytest
from helpers import MAX_LINE, cli, structured
from PIL import Image

from cupscale_dist.config import (
    CONTROLNET_SCALE_RANGE,
    GUIDANCE_SCALE_MAX,
    LORA_SCALE_RANGE,
    MAX_MODEL_EVALUATIONS,
    MAX_PLAN_MEMORY_MB,
    MAX_STAGE_PIXELS,
    TRUE_CFG_MAX,
    UpscaleConfig,
    set_value,
)
from cupscale_dist.errors import UserError
from cupscale_dist.models.backbones import backbone_class
from cupscale_dist.plan import check_family_knobs, make_plan

SDXL, FLUX = (8, 4), (8, 16)  # (VAE factor, latent channels)


def refused(code: int, err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert len(lines[0]) <= MAX_LINE and lines[0].startswith("cupscale: error:"), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("knobs")
    Image.fromarray(structured(64, 48)).save(ws / "in.png")
    Image.fromarray(structured(16, 16)).save(ws / "tiny.png")
    return ws


def dry_run(capsys, ws: Path, *extra, image: str = "in.png") -> tuple[int, str, str]:
    return cli(capsys, "upscale", ws / image, "-o", ws / "out.png", "--model", "demo", "--dry-run", *extra)


# -- item 1: guidance, true CFG, LoRA and ControlNet scales in sane ranges ----------------------------------------
@pytest.mark.parametrize("extra, words", [
    (["--set", "guidance_scale=1e308"], ["guidance_scale=1e+308", f"[0.0, {GUIDANCE_SCALE_MAX}]"]),
    (["--set", "guidance_scale=31"], ["guidance_scale=31.0", "out of range"]),
    (["--set", "true_cfg=1.0e9"], ["true_cfg=1000000000.0", f"[1.0, {TRUE_CFG_MAX}]"]),
    (["--lora", "style.safetensors:1e30"], ["lora 'style.safetensors:1e30'", "scale 1e+30", "[-5, 5]"]),
    (["--lora", "style.safetensors:-6"], ["scale -6", "[-5, 5]"]),
    (["--lora", "style.safetensors:nan"], ["scale nan"]),
    (["--set", "lora=[a.safetensors, 'b.safetensors:inf']"], ["'b.safetensors:inf'", "scale inf"]),
    (["--set", "controlnet_scale=1e30"], ["controlnet_scale=1e+30", f"[0.0, {CONTROLNET_SCALE_RANGE[1]}]"]),
], ids=["guidance-1e308", "guidance-31", "true-cfg", "lora-1e30", "lora-negative", "lora-nan", "lora-set-list",
        "controlnet"])
def test_scales_out_of_range_are_one_line(capsys, ws, extra, words):
    refused(*dry_run(capsys, ws, *extra)[::2], *words)


def test_scales_out_of_range_in_a_config_file_and_the_api(capsys, ws, tmp_path):
    (tmp_path / "big.yaml").write_text("guidance_scale: 1e308\n")
    refused(*dry_run(capsys, ws, "--config", tmp_path / "big.yaml")[::2], "guidance_scale=1e+308")
    (tmp_path / "lora.yaml").write_text("lora: ['a.safetensors:0.5', 'b.safetensors:1e30']\n")
    refused(*dry_run(capsys, ws, "--config", tmp_path / "lora.yaml")[::2], "scale 1e+30")
    for bad in (dict(guidance_scale=1e308), dict(true_cfg=1e9), dict(lora=("a.safetensors:100",)),
                dict(controlnet_scale=3.0)):
        with pytest.raises(UserError, match="range"):
            UpscaleConfig(**bad)


def test_scales_in_range_pass():
    low, high = LORA_SCALE_RANGE
    config = UpscaleConfig(guidance_scale=GUIDANCE_SCALE_MAX, true_cfg=4.0, controlnet_scale=1.0,
                           lora=(f"a.safetensors:{low}", f"b.safetensors:{high}", "C:/loras/c.safetensors", "d:0.8"))
    assert config.guidance_scale == GUIDANCE_SCALE_MAX and len(config.lora) == 4


def test_exponent_numbers_are_floats():
    """PyYAML (YAML 1.1) read `1e308` as text, so the range check never saw it (a type error instead)."""
    assert set_value("guidance_scale", "1e308") == 1e308
    assert set_value("guidance_scale", "-2E-3") == -0.002 and set_value("true_cfg", "1.0e9") == 1e9
    assert set_value("seed", "12") == 12 and set_value("prompt", "1e5") == "1e5"  # text knobs stay verbatim


# -- item 2: plans bounded by what they build ---------------------------------------------------------------------
def test_thin_size_is_refused_in_one_line(capsys, ws):
    """The issue's case: `--size 268435456x1` passed max_output_pixels and planned 17.2 Gpx stages."""
    refused(*dry_run(capsys, ws, "--size", "268435456x1")[::2], "268435456x1", "both axes")


def test_a_shrink_on_one_axis_is_refused_like_a_shrink_on_both(capsys, ws):
    both = refused(*dry_run(capsys, ws, "--size", "32x24")[::2])
    one = refused(*dry_run(capsys, ws, "--size", "4096x24")[::2])
    assert both.replace("32x24", "S") == one.replace("4096x24", "S")
    assert dry_run(capsys, ws, "--size", "128x48")[0] == 0  # equal on one axis is no shrink


def test_every_stage_is_bounded(capsys, ws):
    """16x16 -> 16777216x16 is within max_output_pixels, but 64-px rounding makes the stages 64 px high (the last
    1.07 Gpx): refused at the first stage over the bound."""
    line = refused(*dry_run(capsys, ws, "--size", "16777216x16", image="tiny.png")[::2], "max_stage_pixels")
    assert "8388608x64 stage" in line
    with pytest.raises(UserError, match="max_stage_pixels"):
        make_plan((16, 16), UpscaleConfig(size=(16777216, 16)), SDXL)


def test_plan_memory_and_evaluations_are_bounded(capsys, ws):
    refused(*dry_run(capsys, ws, "--scale", "16", "--set", "max_plan_memory_mb=1")[::2], "max_plan_memory_mb",
            "MB of host memory")
    refused(*dry_run(capsys, ws, "--set", "max_model_evaluations=10")[::2], "max_model_evaluations", "--steps")
    line = refused(*dry_run(capsys, ws, "--scale", "16", "--tile", "8", "--stride", "1")[::2])
    assert "model evaluations, over the 1000000 limit" in line


@pytest.mark.parametrize("preset", ["sdxl-16k", "flux-16k", "sdxl-16k-fast", "sdxl-8k"])
def test_presets_fit_the_default_bounds(preset):
    config = UpscaleConfig.load(preset)
    plan = make_plan((1024, 1024), config, FLUX if "flux" in preset else SDXL).describe()
    assert plan["unet_evaluations"] <= MAX_MODEL_EVALUATIONS / 4
    assert plan["est_peak_host_memory_mb"] <= MAX_PLAN_MEMORY_MB / 4
    assert max(s["size"][0] * s["size"][1] for s in plan["stages"]) <= MAX_STAGE_PIXELS


# -- item 5: knobs that would be ignored are refused ----------------------------------------------------------------
@pytest.mark.parametrize("scheduler", ["ddim", "lcm", "tcd"])
def test_karras_with_a_scheduler_without_it_is_refused(capsys, ws, scheduler):
    guidance = ["--set", "guidance_scale=1.5"] if scheduler == "lcm" else []
    refused(*dry_run(capsys, ws, "--set", f"scheduler={scheduler}", "--set", "karras_sigmas=true", *guidance)[::2],
            "karras_sigmas", f"scheduler={scheduler}", "karras_sigmas=false")


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_karras_with_euler_and_dpmpp(scheduler):
    assert UpscaleConfig(scheduler=scheduler, karras_sigmas=True).karras_sigmas


@pytest.mark.parametrize("knob, value", [("karras_sigmas", True), ("timestep_spacing", "trailing")])
def test_flux_refuses_spacing_knobs(knob, value):
    config = UpscaleConfig(**{knob: value})
    with pytest.raises(UserError, match=f"{knob}.*ignore it; set {knob}=") as caught:
        check_family_knobs(config, types.SimpleNamespace(family="flux"))
    assert "\n" not in str(caught.value)
    backbone_class("flux").check_config(UpscaleConfig())  # the defaults pass


def test_timestep_spacing_none_goes_back_to_the_models(capsys, ws, tmp_path):
    assert UpscaleConfig.load("sdxl-4k-fast").timestep_spacing == "trailing"
    assert UpscaleConfig.load("sdxl-4k-fast", timestep_spacing="none").timestep_spacing is None
    (tmp_path / "none.yaml").write_text("timestep_spacing: none\n")
    assert UpscaleConfig.load(str(tmp_path / "none.yaml")).timestep_spacing is None
    code, out, err = dry_run(capsys, ws, "--set", "timestep_spacing=none")
    assert code == 0 and not err.strip(), err


# -- item 7: inline merge keys; warnings stay above the error line ----------------------------------------------------
@pytest.mark.parametrize("text", ["<<: {strength: 0.9}\n", "steps: 4\n<<: [{strength: 0.9}]\n",
                                  "size: {<<: {a: 1}}\n"])
def test_inline_merge_key_is_refused(capsys, ws, tmp_path, text):
    (tmp_path / "merge.yaml").write_text(text)
    refused(*dry_run(capsys, ws, "--config", tmp_path / "merge.yaml")[::2], "merge keys (<<)")


def test_a_quoted_merge_key_is_an_unknown_key(capsys, ws, tmp_path):
    (tmp_path / "quoted.yaml").write_text("'<<': {strength: 0.9}\n")
    refused(*dry_run(capsys, ws, "--config", tmp_path / "quoted.yaml")[::2], "unknown key(s) <<")


def test_warnings_and_ray_shutdown_stay_above_the_error_line(capsys, caplog, monkeypatch):
    """A torch-style warning during the command goes to the log as one record, and Ray's own shutdown (which logs)
    happens before the one error line, not after it at exit."""
    ray = pytest.importorskip("ray")
    said = []

    def failing_command(_args):
        warnings.warn("torch says something\nover two lines", UserWarning, stacklevel=1)
        raise UserError("the thing is wrong; fix it")

    def noisy_shutdown():
        said.append("shutdown")
        logging.getLogger("ray").warning("Ray: shutting down workers")

    monkeypatch.setitem(sys.modules["cupscale_dist.cli.main"].COMMANDS, "knobs", failing_command)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", noisy_shutdown)
    code, _, err = cli(capsys, "knobs")
    lines = err.strip().splitlines()
    assert code == 2 and said == ["shutdown"], err
    assert lines[-1] == "cupscale: error: the thing is wrong; fix it", err
    assert "torch says something" not in err  # pytest's handler holds the log here; the CLI's prints it above
    records = [r.getMessage() for r in caplog.records if r.name == "py.warnings"]
    assert len(records) == 1 and "UserWarning: torch says something" in records[0], records
    assert "\n" not in records[0]


# -- the service: a request's knobs are typed by set_value and checked by the same UpscaleConfig ---------------------
@pytest.mark.parametrize("query, words", [("guidance_scale=1e308", "guidance_scale=1e+308"),
                                          ("true_cfg=1e9", "true_cfg="),
                                          ("scheduler=tcd&karras_sigmas=true",
                                           "karras_sigmas=true with scheduler=tcd")])
def test_a_request_is_refused_by_the_same_checks(query, words):
    datastructures = pytest.importorskip("starlette.datastructures")
    from cupscale_dist.services.serve import request_knobs

    knobs, _ = request_knobs(datastructures.QueryParams(query))
    with pytest.raises(UserError, match=words.replace("+", r"\+")):
        UpscaleConfig().replace(**knobs)


def test_a_request_sets_timestep_spacing_back_to_the_models():
    datastructures = pytest.importorskip("starlette.datastructures")
    from cupscale_dist.services.serve import request_knobs

    knobs, _ = request_knobs(datastructures.QueryParams("timestep_spacing=none"))
    assert UpscaleConfig.load("sdxl-4k-fast").replace(**knobs).timestep_spacing is None


def test_an_open_progress_bar_does_not_share_the_error_line(capsys, monkeypatch):
    """A stage that fails mid-loop leaves its tqdm bar open (drawn with \\r, no newline): the error got appended to
    the bar's text, so stderr's last line did not start with `cupscale: error:`."""
    from tqdm.auto import tqdm

    def failing_stage(_args):
        bar = tqdm(total=4, desc="stage 1 128x96 (6 views)", unit="step")
        bar.update(1)
        raise UserError("the latent is not finite after step 1; lower guidance_scale")

    monkeypatch.setitem(sys.modules["cupscale_dist.cli.main"].COMMANDS, "knobs", failing_stage)
    code, _, err = cli(capsys, "knobs")
    assert code == 2
    assert err.splitlines()[-1] == "cupscale: error: the latent is not finite after step 1; lower guidance_scale", err
