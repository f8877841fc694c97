"""The invariants of method.md, on the real code paths (any weights)."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch
from diffusers import EulerDiscreteScheduler
from helpers import pointwise

from cupscale_dist.method.prior import GlobalPrior, inject_global_prior, noise_level
from cupscale_dist.method.step import StageSchedule, reduce_and_step, reduce_predictions
from cupscale_dist.method.views import coverage, jitter_views, make_views, view_batches
from cupscale_dist.method.wavelets import dwt2, idwt2, low_band


# --- views -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,tile,stride",
                         [((64, 64), 16, 8), ((37, 53), 16, 8), ((12, 40), 16, 5), ((40, 40), 16, 16)])
def test_views_cover_every_pixel_and_clamp_to_border(shape, tile, stride):
    views = make_views(*shape, tile, stride)
    assert coverage(views, *shape).min() >= 1
    assert views[:, 2].max() == shape[0] and views[:, 3].max() == shape[1]
    assert (views[:, 0] >= 0).all() and (views[:, 1] >= 0).all()
    assert len({tuple(v) for v in views}) == len(views)


def test_jitter_moves_views_but_keeps_coverage():
    views = make_views(64, 80, 16, 8)
    moved = 0
    for step in range(20):
        jittered = jitter_views(views, 64, 80, 4, np.random.default_rng([0, 0, step]))
        assert coverage(jittered, 64, 80).min() >= 1
        assert ((jittered[:, 2] - jittered[:, 0]) == 16).all()
        moved += int((jittered != views).any())
    assert moved > 0


# --- MultiDiffusion exactness -------------------------------------------------------------------------------------


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
def test_multidiffusion_is_exact_for_a_pointwise_denoiser(blend):
    z = torch.randn(1, 4, 40, 56, generator=torch.Generator().manual_seed(0))
    views = make_views(40, 56, 16, 8)
    batches = [(b, torch.stack([pointwise(z[0, :, t:bb, l:r]) for t, l, bb, r in views[b.start:b.stop]]))
               for b in view_batches(len(views), 3)]
    tiled = reduce_predictions(batches, views, z.shape, blend)
    assert (tiled - pointwise(z)).abs().max() <= 1e-6


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
def test_overlapping_views_that_disagree_are_averaged_not_overwritten(blend):
    """Issue 23's gap: a pointwise denoiser predicts the same value for a pixel in every view, so "last view wins"
    (each view overwriting the overlap) passes the exactness test above. Here each view predicts its own values
    (a per-view offset), and every pixel must be the blend-weighted mean of the views covering it, computed pixel
    by pixel from the definition (method.md 9b)."""
    from cupscale_dist.method.step import window_weights

    views = make_views(24, 40, 16, 8)
    rng = np.random.default_rng(3)
    predictions = [torch.from_numpy(rng.normal(size=(4, 16, 16)).astype(np.float32) + 10 * k)
                   for k in range(len(views))]
    batches = [(b, torch.stack(predictions[b.start:b.stop])) for b in view_batches(len(views), 2)]
    reduced = reduce_predictions(batches, views, (1, 4, 24, 40), blend, 0.3)
    window = window_weights(16, 16, blend, 0.3)
    window = np.ones((16, 16)) if window is None else window.numpy().astype(np.float64)
    for y in range(24):
        for x in range(40):
            covering = [(k, y - t, x - l) for k, (t, l, b, r) in enumerate(views) if t <= y < b and l <= x < r]
            weights = np.array([window[dy, dx] for _, dy, dx in covering])
            values = np.stack([predictions[k][:, dy, dx].numpy() for k, dy, dx in covering])
            expected = (weights[:, None] * values).sum(0) / weights.sum()
            np.testing.assert_allclose(reduced[0, :, y, x].numpy(), expected, rtol=1e-5, atol=1e-4)


def test_tiled_scheduler_step_equals_untiled_step():
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="leading", steps_offset=1)
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(4)
    z = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(1))
    prior = GlobalPrior.from_latent(torch.zeros_like(z), torch.zeros_like(z), "haar", 1)
    schedule = StageSchedule(scheduler, 4, prior, "x0", prior_fraction=0.0, prior_schedule="cosine")
    views = make_views(32, 48, 16, 8)
    batches = [(range(i, i + 1), pointwise(z[:, :, t:b, l:r])) for i, (t, l, b, r) in enumerate(views)]
    tiled = reduce_and_step(z, batches, views, schedule, 0)
    reference = EulerDiscreteScheduler.from_config(scheduler.config)
    reference.set_timesteps(10)
    reference.set_begin_index(4)
    untiled = reference.step(pointwise(z), reference.timesteps[4], z).prev_sample
    assert (tiled - untiled).abs().max() <= 1e-6


# --- the global structure prior ----------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_torch_haar_matches_pywavelets(levels):
    x = torch.randn(2, 4, 32, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    low, highs = dwt2(x, "haar", levels)
    ref = pywt.wavedec2(x.numpy(), "haar", mode="periodization", level=levels, axes=(-2, -1))
    np.testing.assert_allclose(low.numpy(), ref[0], atol=1e-12)
    for mine, theirs in zip(highs, ref[1:]):
        for a, b in zip(mine, theirs):
            np.testing.assert_allclose(a.numpy(), b, atol=1e-12)
    assert (idwt2(low, highs) - x).abs().max() < 1e-12


def test_pywavelets_path_round_trips_other_wavelets():
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    low, highs = dwt2(x, "db2", 2)
    assert low.shape[-2:] == (8, 8)
    assert (idwt2(low, highs, "db2") - x).abs().max() < 1e-5


@pytest.mark.parametrize("wavelet,levels", [("haar", 1), ("haar", 2), ("db2", 1)])
@pytest.mark.parametrize("alpha,sigma", [(1.0, 3.5), (0.8, 0.6)])
def test_prior_injection_with_full_weight_sets_the_low_band(wavelet, levels, alpha, sigma):
    gen = torch.Generator().manual_seed(4)
    z_low, noise, z_t, eps = (torch.randn(1, 4, 32, 32, generator=gen) for _ in range(4))
    prior = GlobalPrior.from_latent(z_low, noise, wavelet, levels)
    adjusted = inject_global_prior(eps, z_t, prior, 1.0, alpha, sigma)
    x0 = (z_t - sigma * adjusted) / alpha
    assert (low_band(x0, wavelet, levels) - prior.low).abs().max() <= 1e-5
    # ... and the high bands of the model's own x0 prediction are untouched.
    _, highs_before = dwt2((z_t - sigma * eps) / alpha, wavelet, levels)
    _, highs_after = dwt2(x0, wavelet, levels)
    assert all((a - b).abs().max() <= 1e-4 for ha, hb in zip(highs_before, highs_after) for a, b in zip(ha, hb))


def test_prior_with_zero_weight_changes_nothing():
    gen = torch.Generator().manual_seed(5)
    z_low, noise, z_t, eps = (torch.randn(1, 4, 16, 16, generator=gen) for _ in range(4))
    prior = GlobalPrior.from_latent(z_low, noise, "haar", 1)
    assert (inject_global_prior(eps, z_t, prior, 0.0, 1.0, 2.0) - eps).abs().max() <= 1e-5


def test_noise_level_reads_the_scheduler_parametrisation():
    from diffusers import DDIMScheduler

    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    euler.set_timesteps(10)
    assert noise_level(euler, 3) == (1.0, float(euler.sigmas[3]))
    ddim = DDIMScheduler.from_config(euler.config)
    ddim.set_timesteps(10)
    alpha, sigma = noise_level(ddim, 3)
    assert abs(alpha**2 + sigma**2 - 1) < 1e-6
    assert noise_level(ddim, 10) == (1.0, 0.0)
