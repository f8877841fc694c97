"""Quality gates (issue #10): the trained demo model on a held-out photo must keep its measured quality.

A change that breaks the views' blending, the global prior or the VAE tiling leaves every shape right and every
test of plumbing green, but makes the picture worse: these thresholds sit a little below the figures measured on
this photo (docs/quality.md), so such a change fails here. `tests/mutants/run.py` breaks each on purpose.
"""

import hashlib

import numpy as np
import pytest

from cupscale_dist import UpscaleConfig
from cupscale_dist.execution.worker import ModelWorker
from cupscale_dist.quality.evaluate import evaluate, held_out_originals

# Measured on the whole held-out astronaut at x2 with these knobs (2026-12-04, the factor-2 demo model of issue 23,
# the bundled Real-ESRGAN as step 1, the prior from the input, strength 0.2, guidance 1): consistency 33.37 dB, seam
# 0.957, detail 3.79, prior gain 3.45 dB, seam without overlap +1.05 (2.01). (A 256 px crop has too few boundary
# lines for a stable seam score.) The gates sit a little below (above, for the seam) the figures to absorb platform
# rounding, and inside issue 23's targets (>= 28 dB, >= 1.0, <= 1.10). The prior taken from the SR network's
# picture instead of the input's fails the consistency gate (tests/mutants/run.py).
MIN_CONSISTENCY_DB = 33.0
MAX_SEAM = 1.10
MIN_DETAIL = 3.4  # high-frequency energy over bicubic's
MIN_PRIOR_GAIN_DB = 3.0  # consistency with the prior minus without it
MIN_SEAM_RISE_NO_OVERLAP = 0.8  # stride = tile must show its seams, or the seam score is blind


class RepeatsPureCalls:
    """The worker, with the forward passes that depend only on their input and the weights (step 1's SR network,
    the VAE's encode: its posterior mean) answered from memory when the same input comes again. The evaluations
    here differ in knobs that act after them (prior_fraction, stride), so they share step 1 and the encodes and
    compute again only what a knob changes (measured: 274.5 -> 175.8 CPU s for the three, same figures); an input
    that differs (e.g. the prior taken from another picture) is a new key and runs."""

    PURE = ("upscale_tile", "encode_tile")

    def __init__(self, worker: ModelWorker):
        self.worker, self.answers = worker, {}

    def __getattr__(self, name: str):
        method = getattr(self.worker, name)
        if name not in self.PURE:
            return method

        def answered(pixels: np.ndarray) -> np.ndarray:
            data = np.ascontiguousarray(pixels)
            key = (name, data.shape, data.dtype.str, hashlib.sha256(data).digest())
            if key not in self.answers:
                self.answers[key] = method(pixels)
            return self.answers[key].copy()  # a caller may write into what it gets

        return answered


@pytest.fixture(scope="module")
def worker():
    # with the preset's SR network (resize: model)
    return RepeatsPureCalls(ModelWorker.for_config(UpscaleConfig.load("cpu-demo")))


@pytest.fixture(scope="module")
def crop():
    return held_out_originals()[:1]  # the astronaut (scikit-image's copy) and its caption


def figures(crop, worker, **knobs) -> dict:
    # vae_tile 384 px: the 512 px output is decoded in 2 x 2 overlapping tiles, as a large one is
    config = UpscaleConfig.load("cpu-demo", scale=2, torch_threads=2, vae_tile=384, **knobs)
    return evaluate(crop, config, worker=worker, progress=False)["overall"]


@pytest.fixture(scope="module")
def default(crop, worker):
    return figures(crop, worker)


def test_defaults_keep_the_input_and_its_detail_and_hide_seams(default):
    assert default["consistency"] >= MIN_CONSISTENCY_DB, default
    assert default["seam"] <= MAX_SEAM, default
    assert default["detail"] >= MIN_DETAIL, default


def test_the_global_prior_improves_consistency(default, crop, worker):
    without = figures(crop, worker, prior_fraction=0.0)
    assert default["consistency"] - without["consistency"] >= MIN_PRIOR_GAIN_DB, (default, without)


def test_no_overlap_shows_seams(default, crop, worker):
    no_overlap = figures(crop, worker, stride=UpscaleConfig.load("cpu-demo").tile)  # stride = tile
    assert no_overlap["seam"] - default["seam"] >= MIN_SEAM_RISE_NO_OVERLAP, (default, no_overlap)
