"""creativity and resemblance (issue 11): user-level knobs mapped onto the method's own; explicit knobs win; the
peak prior weight they set (prior_scale) really scales the injection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cupscale_dist import UpscaleConfig, UserError
from cupscale_dist.config import user_knob_values


def test_the_defaults_sit_in_the_middle_of_the_mapping():
    """creativity 0.75 / resemblance 0.5 are the method's defaults, so the knobs move around the paper's setting."""
    default = UpscaleConfig()
    mapped = UpscaleConfig(**user_knob_values(0.75, 0.5))
    for name in ("strength", "prior_fraction", "prior_scale", "controlnet_scale"):
        assert getattr(mapped, name) == pytest.approx(getattr(default, name)), name


def test_creativity_sets_strength_and_resemblance_the_prior_and_controlnet():
    low, high = UpscaleConfig.load(creativity=0.0), UpscaleConfig.load(creativity=1.0)
    assert (low.strength, high.strength) == (pytest.approx(0.15), pytest.approx(0.75))
    assert low.prior_fraction == high.prior_fraction == UpscaleConfig().prior_fraction  # creativity alone
    loose, close = UpscaleConfig.load(resemblance=0.0), UpscaleConfig.load(resemblance=1.0)
    assert (loose.prior_fraction, close.prior_fraction) == (pytest.approx(0.2), pytest.approx(0.8))
    assert (loose.prior_scale, close.prior_scale) == (pytest.approx(0.5), pytest.approx(1.0))
    assert (loose.controlnet_scale, close.controlnet_scale) == (pytest.approx(0.0), pytest.approx(1.2))
    assert loose.strength == UpscaleConfig().strength
    # Monotone in between.
    strengths = [UpscaleConfig.load(creativity=c).strength for c in np.linspace(0, 1, 11)]
    assert strengths == sorted(strengths) and len(set(strengths)) == 11


def test_explicit_method_knobs_win(tmp_path):
    assert UpscaleConfig.load(creativity=1.0, strength=0.3).strength == 0.3
    assert UpscaleConfig.load(resemblance=1.0, prior_fraction=0.1).prior_fraction == 0.1
    assert UpscaleConfig.load(resemblance=1.0, prior_fraction=0.1).controlnet_scale == pytest.approx(1.2)
    # A preset's strength is a default the user's creativity moves (cpu-demo sets strength 0.2) ...
    assert UpscaleConfig.load("cpu-demo", creativity=1.0).strength == pytest.approx(0.75)
    # ... but within one layer (a YAML file, or one set of overrides) the explicit knob wins.
    path = tmp_path / "mine.yaml"
    path.write_text("creativity: 1.0\nstrength: 0.25\nresemblance: 0.0\n")
    mine = UpscaleConfig.load(str(path))
    assert (mine.strength, mine.prior_fraction) == (0.25, pytest.approx(0.2))
    assert mine.replace(seed=3).strength == 0.25  # an unrelated change keeps them


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), float("inf"), "high", True])
def test_out_of_range_values_are_one_line_errors(value):
    with pytest.raises(UserError, match=r"creativity=.*\[0, 1\]") as info:
        UpscaleConfig.load(creativity=value)
    assert "\n" not in str(info.value)


def test_prior_scale_scales_the_injected_prior():
    """reduce_and_step's prior weight is prior_scale * w_t: scale 0 is the prior switched off, bit for bit, and
    0.5 moves the low band half as far as 1 does."""
    from cupscale_dist.method.prior import GlobalPrior
    from cupscale_dist.method.schedulers import make_scheduler
    from cupscale_dist.method.step import StageSchedule, reduce_and_step
    from cupscale_dist.method.views import make_views
    from cupscale_dist.method.wavelets import low_band

    torch.manual_seed(0)
    z_low, noise = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    eps = torch.randn(1, 4, 16, 16)
    views = make_views(16, 16, 16, 16)

    def step(prior_scale: float, fraction: float = 1.0) -> torch.Tensor:
        scheduler = make_scheduler("ddim", {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                            "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"})
        scheduler.set_timesteps(10)
        schedule = StageSchedule(scheduler, 4, GlobalPrior.from_latent(z_low, noise, "haar", 1), "x0", fraction,
                                 "constant", prior_scale=prior_scale)
        latents = scheduler.add_noise(z_low, noise, scheduler.timesteps[4:5])
        return reduce_and_step(latents, [([0], eps.clone())], views, schedule, 0)

    off = step(1.0, fraction=0.0)
    assert torch.equal(step(0.0), off)
    full, half = low_band(step(1.0), "haar", 1), low_band(step(0.5), "haar", 1)
    base = low_band(off, "haar", 1)
    assert torch.allclose(half - base, 0.5 * (full - base), atol=1e-5)
    assert (full - base).abs().mean() > 1e-3
