"""Issue 35 item 1: no silently wrong picture. NaN or inf in the latent after a step (a UNet with NaN weights, a
LoRA or ControlNet scaled to overflow) or in a VAE tile (an inf in the VAE) stops the run in one line naming the
likely causes, in the reference, with the latent on in-process owners, and nothing is written."""

from __future__ import annotations

import pytest
import torch
from helpers import small_config

from cupscale_dist import UserError, upscale
from cupscale_dist.execution.executor import LocalExecutor
from cupscale_dist.execution.worker import ModelWorker


@pytest.fixture
def fresh_model(sdxl_dir):
    """A worker of its own: the tests poison its weights in memory."""
    return ModelWorker(sdxl_dir, device="cpu", dtype="float32")


@pytest.mark.parametrize("owners", [0, 2], ids=["reference", "owned-bands"])
def test_a_unet_with_nan_weights_stops_at_the_first_step_in_one_line(fresh_model, photo, owners):
    with torch.no_grad():
        next(fresh_model.unet.parameters()).view(-1)[0] = float("nan")
    config = small_config(fresh_model.name)
    with pytest.raises(UserError,
                       match=r"^stage 1, step 1: the latent is no longer finite \(NaN or inf\); likely") as e:
        upscale(photo, config, executor=LocalExecutor(fresh_model, 4, owners=owners), progress=False)
    assert "\n" not in str(e.value)


def test_an_inf_in_the_vae_decoder_stops_at_the_first_decoded_tile(fresh_model, photo):
    with torch.no_grad():
        fresh_model.vae.decoder.conv_out.weight.view(-1)[0] = float("inf")
    with pytest.raises(UserError, match=r"^the VAE decoded a tile to NaN or inf; likely causes: a VAE file"):
        upscale(photo, small_config(fresh_model.name), executor=LocalExecutor(fresh_model, 4), progress=False)


def test_a_run_that_stops_on_nan_writes_no_file(fresh_model, photo, tmp_path):
    from cupscale_dist.services.runner import run_upscale

    with torch.no_grad():
        next(fresh_model.unet.parameters()).view(-1)[0] = float("inf")
    out = tmp_path / "out.png"
    with pytest.raises(UserError, match="no longer finite"):
        run_upscale(photo, small_config(fresh_model.name), out, progress=False,
                    executor=LocalExecutor(fresh_model, 4))
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_latents_times_1e30_stop_in_one_line_and_write_nothing(sdxl_model, photo, tmp_path):
    """A checkpoint's latents are finite but 1e30 times too large (the file passes the finite-tensor check): the
    resumed run overflows and stops in one line instead of writing a black picture."""
    from cupscale_dist.services.runner import run_upscale

    config = small_config(sdxl_model.name, steps=6, strength=0.8)

    class Stop(Exception):
        pass

    def stop_after_two(info):
        if info["step"] == 2:
            raise Stop

    checkpoints, out = tmp_path / "ckpt", tmp_path / "out" / "out.png"
    out.parent.mkdir()
    with pytest.raises(Stop):
        run_upscale(photo, config, out, progress=False, callback=stop_after_two, checkpoint_dir=str(checkpoints),
                    executor=LocalExecutor(sdxl_model, 4))
    payload = torch.load(checkpoints / "checkpoint.pt", weights_only=True)
    payload["latents"] = payload["latents"] * 1e30
    torch.save(payload, checkpoints / "checkpoint.pt")
    with pytest.raises(UserError, match=r"no longer finite|VAE decoded a tile to NaN or inf") as caught:
        run_upscale(photo, config, out, progress=False, checkpoint_dir=str(checkpoints), resume=True,
                    executor=LocalExecutor(sdxl_model, 4))
    assert "\n" not in str(caught.value) and list(out.parent.iterdir()) == []
