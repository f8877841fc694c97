"""Every scheduler kind (issue 20): the prior's arithmetic is the scheduler's own, the prior holds on its own x0,
Ray gives the reference's bytes, and a multistep solver's memory survives a checkpoint and ``--resume``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import Interrupted, as_bytes, ray_executor, small_config
from test_fidelity import assert_low_band_blended, one_full_view, record_steps, stage_schedule

from cupscale_dist import UserError, upscale
from cupscale_dist.method.prior import GlobalPrior, noise_level
from cupscale_dist.method.schedulers import FLOW_KINDS, KINDS, make_scheduler
from cupscale_dist.method.step import reduce_and_step
from cupscale_dist.testing.tiny import SCHEDULER_CONFIG

# noise-prediction kinds on the SDXL scheduler config; the flow-matching kind is tested on Flux
# (tests/models/test_flux.py)
VARIANTS = [pytest.param(kind, {}, id=kind) for kind in KINDS if kind not in FLOW_KINDS] + [
    pytest.param("dpmpp_2m", {"karras_sigmas": True}, id="dpmpp_2m-karras"),
    pytest.param("euler", {"karras_sigmas": True, "timestep_spacing": "trailing"}, id="euler-karras-trailing"),
    pytest.param("ddim", {"timestep_spacing": "trailing"}, id="ddim-trailing"),
]


@pytest.mark.parametrize("kind,options", VARIANTS)
def test_noise_level_is_the_schedulers_own_forward_process(kind, options):
    """(alpha, sigma) the prior uses at every step == the coefficients of the scheduler's own add_noise there."""
    scheduler = make_scheduler(kind, SCHEDULER_CONFIG, **options)
    scheduler.set_timesteps(8, device="cpu")
    x0, eps = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    for index, timestep in enumerate(scheduler.timesteps):
        fresh = make_scheduler(kind, SCHEDULER_CONFIG, **options)  # add_noise looks t up in its own table
        fresh.set_timesteps(8, device="cpu")
        if hasattr(fresh, "set_begin_index"):
            fresh.set_begin_index(index)
        alpha, sigma = noise_level(scheduler, index)
        t = timestep.reshape(1)
        assert float(fresh.add_noise(x0, eps, t)) == pytest.approx(alpha, rel=1e-5)
        assert float(fresh.add_noise(eps, x0, t)) == pytest.approx(sigma, rel=1e-5)
    assert noise_level(scheduler, len(scheduler.timesteps)) == (1.0, 0.0)


def own_x0(scheduler, output, sample: torch.Tensor, timestep) -> torch.Tensor:
    """The clean latent the scheduler itself derived in its last step."""
    if getattr(output, "pred_original_sample", None) is not None:  # Euler, DDIM
        return output.pred_original_sample
    if hasattr(scheduler, "model_outputs"):  # DPM-Solver++ keeps its x0 prediction for the next step
        return scheduler.model_outputs[-1]
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timestep)  # LCM's boundary condition
    return (output.denoised - c_skip * sample) / c_out


@pytest.mark.parametrize("kind", ["dpmpp_2m", "lcm"])
@pytest.mark.parametrize("levels,step,weight", [(1, 0, 1.0), (2, 2, 2 / 3)], ids=["J1-full", "J2-partial"])
def test_x0_prior_holds_for_the_new_schedulers_own_x0(kind, levels, step, weight):
    """9c on the scheduler's own x0: LL(x0') = w G + (1 - w) LL(x0) (the Euler and DDIM cases are test_fidelity's)."""
    gen = torch.Generator().manual_seed(0)
    z_low, noise, z_t, eps = (torch.randn(1, 4, 16, 24, generator=gen) for _ in range(4))
    prior = GlobalPrior.from_latent(z_low, noise, "haar", levels)
    schedule = stage_schedule(make_scheduler(kind, SCHEDULER_CONFIG), 10, 0.6, prior, "x0", step)
    untouched, timestep = copy.deepcopy(schedule.scheduler), schedule.timestep(step)
    inside = record_steps(schedule.scheduler)
    reduce_and_step(z_t, [(range(1), eps)], one_full_view(z_t), schedule, step)
    ours = own_x0(schedule.scheduler, inside[0], z_t, timestep)
    plain = own_x0(untouched, untouched.step(eps, timestep, z_t), z_t, timestep)
    assert_low_band_blended(ours, plain, prior.low, weight, levels)


def test_ray_actors_give_the_references_bytes_for_every_scheduler(local_ray, sdxl_model, photo):
    """One pool of 2 actors serves every new kind (the scheduler lives on the driver): the reference's bytes."""
    config = small_config(sdxl_model.name, steps=4, strength=0.75, view_batch_size=3)
    executor = ray_executor(config, 2)
    executor.keep = True
    try:
        seen = set()
        for kind in ("dpmpp_2m", "tcd", "lcm"):
            run = config.replace(scheduler=kind, guidance_scale=1.5 if kind == "lcm" else None)  # LCM: guidance <= 2
            expected = as_bytes(upscale(photo, run, model=sdxl_model, progress=False))
            assert as_bytes(upscale(photo, run, executor=executor, progress=False)) == expected, kind
            seen.add(expected)
        assert len(seen) == 3  # the scheduler really changed the picture
    finally:
        executor.release()


@pytest.mark.parametrize("kind", ["dpmpp_2m", "tcd"])
def test_a_resumed_run_of_a_multistep_or_stochastic_scheduler_gives_identical_bytes(sdxl_model, photo, tmp_path,
                                                                                   kind):
    """Killed after step 2 of 4 (the checkpoint holds DPM-Solver's memory), resumed: the uninterrupted run's bytes."""
    from cupscale_dist.services.runner import run_upscale

    config = small_config(sdxl_model.name, scheduler=kind, steps=5, strength=0.8)
    from cupscale_dist.execution.executor import LocalExecutor

    def executor():
        return LocalExecutor(sdxl_model, config.view_batch_size)

    run_upscale(photo, config, tmp_path / "ref.png", progress=False, executor=executor())

    def stop_after_two(info):
        if info["step"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_upscale(photo, config, tmp_path / "out.png", progress=False, executor=executor(),
                    checkpoint_dir=str(tmp_path / "ckpt"), callback=stop_after_two)
    state = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and (state["scheduler_state"] is not None) == (kind == "dpmpp_2m")
    run_upscale(photo, config, tmp_path / "out.png", progress=False, executor=executor(),
                checkpoint_dir=str(tmp_path / "ckpt"), resume=True)
    from PIL import Image

    with Image.open(tmp_path / "ref.png") as ref, Image.open(tmp_path / "out.png") as out:
        assert np.array_equal(np.asarray(ref), np.asarray(out))


def test_a_damaged_scheduler_state_in_a_checkpoint_is_one_line(sdxl_model, photo, tmp_path):
    from cupscale_dist.services.checkpoint import Checkpointer, image_sha

    config = small_config(sdxl_model.name, scheduler="dpmpp_2m")
    checkpointer = Checkpointer(tmp_path, 1, config.config_hash(), image_sha(photo))
    checkpointer({"stage": 0, "step": 0, "stage_input": photo})
    for state, words in (({"model_outputs": [torch.full((1, 4, 8, 8), float("nan"))]}, "not finite latents"),
                         ({"lower_order_nums": 99}, "lower_order_nums=99"), ([1, 2], "scheduler state")):
        checkpointer.write(0, 1, torch.zeros(1, 4, 8, 8), state)
        with pytest.raises(UserError, match=words):
            checkpointer.load()
