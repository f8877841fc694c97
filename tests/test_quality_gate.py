"""Quality gates (issue #10): the trained demo model on a held-out crop must keep its measured quality.

A change that breaks the views' blending, the global prior or the VAE tiling leaves every shape right and every
test of plumbing green, but makes the picture worse: these thresholds sit a little below the figures measured on
this crop (README, "Quality"), so such a change fails here. `tests/mutants/run.py` breaks each on purpose.
"""

from pathlib import Path

import pytest
from PIL import Image

from cupscale_dist import UpscaleConfig
from cupscale_dist.evaluate import evaluate
from cupscale_dist.worker import ModelWorker

CROP = (128, 32, 384, 288)  # 256 px of the held-out astronaut: face, suit, flag and the background's edges
# Measured on this crop at x2 (bench figures in the README); the gates leave a margin for platform rounding.
MIN_CONSISTENCY_DB = 30.0
MAX_SEAM = 1.05
MIN_DETAIL = 1.1  # high-frequency energy over bicubic's
MIN_PRIOR_GAIN_DB = 0.3  # consistency with the prior minus without it
MIN_SEAM_RISE_NO_OVERLAP = 0.05  # stride = tile must show its seams, or the seam score is blind

ASTRONAUT = Path(__file__).resolve().parents[1] / "examples" / "astronaut.png"  # held out of training


@pytest.fixture(scope="module")
def worker():
    return ModelWorker.load("demo", "cpu", "float32")


@pytest.fixture(scope="module")
def crop():
    return [("astronaut-crop", Image.open(ASTRONAUT).convert("RGB").crop(CROP))]


def figures(crop, worker, **knobs) -> dict:
    # vae_tile 128 px: the 256 px output is decoded (and the input encoded) in overlapping tiles, as a large one is
    config = UpscaleConfig.load("cpu-demo", scale=2, torch_threads=2, vae_tile=128, **knobs)
    return evaluate(crop, config, worker=worker, progress=False)["overall"]


@pytest.fixture(scope="module")
def default(crop, worker):
    return figures(crop, worker)


def test_defaults_keep_the_input_add_detail_and_hide_seams(default):
    assert default["consistency"] >= MIN_CONSISTENCY_DB, default
    assert default["seam"] <= MAX_SEAM, default
    assert default["detail"] >= MIN_DETAIL, default


def test_the_global_prior_improves_consistency(default, crop, worker):
    without = figures(crop, worker, prior_fraction=0.0)
    assert default["consistency"] - without["consistency"] >= MIN_PRIOR_GAIN_DB, (default, without)


def test_no_overlap_shows_seams(default, crop, worker):
    no_overlap = figures(crop, worker, stride=32)
    assert no_overlap["seam"] - default["seam"] >= MIN_SEAM_RISE_NO_OVERLAP, (default, no_overlap)
