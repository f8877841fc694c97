"""Issue 35 item 2: a cancel (anything the step callback raises) takes effect while a stage is being prepared
(between its upscale-model and VAE tiles, after its prompts), not only between denoising steps."""

from __future__ import annotations

import pytest
from helpers import small_config

from cupscale_dist import upscale
from cupscale_dist.execution.executor import LocalExecutor


class Cancelled(Exception):
    pass


class CountingExecutor(LocalExecutor):
    """The reference executor, counting the forward passes it ran by kind."""

    def __init__(self, worker):
        super().__init__(worker, 2)
        self.ran: dict[str, int] = {}

    def map(self, method, calls):
        for result in super().map(method, calls):
            self.ran[method] = self.ran.get(method, 0) + 1
            yield result


def test_a_cancel_raised_while_encoding_stops_before_the_next_tile(sdxl_model, photo):
    config = small_config(sdxl_model.name, vae_tile=64)  # a 192x256 stage: 12 encode tiles of 64 px
    executor = CountingExecutor(sdxl_model)
    calls = []

    def cancel_at_the_third_preparation_call(info):
        calls.append(info)
        if info["step"] == 0 and info["stage_input"] is None and len(calls) == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        upscale(photo, config, executor=executor, callback=cancel_at_the_third_preparation_call, progress=False)
    assert executor.ran == {"encode_tile": 2}  # the third tile's result was not taken; no prompt, no step ran


def test_the_preparation_ticks_carry_no_latent_and_the_steps_still_report_theirs(sdxl_model, photo):
    config = small_config(sdxl_model.name, vae_tile=64)
    seen = []
    upscale(photo, config, executor=LocalExecutor(sdxl_model, 2), callback=seen.append, progress=False)
    preparing = [info for info in seen if info["step"] == 0 and info["stage_input"] is None]
    assert len(preparing) >= 12 and all(info["gather"] is None for info in preparing)
    steps = [info for info in seen if info["step"] > 0]
    assert [info["step"] for info in steps] == [1, 2, 3] and all(info["gather"] is not None for info in steps)
