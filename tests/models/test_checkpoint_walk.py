"""A model checkpoint whose 'state_dict' contains itself is refused at once (issue 21 class 5), in bounded time."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import FAST_S, exception_line

from cupscale_dist import UserError


# -- 5. a checkpoint whose 'state_dict' is itself: refused at once --------------------------------------------------
def refused_within(call, seconds: float) -> str:
    """``call``'s one-line UserError, failing the test if it is still running after ``seconds`` (a hang)."""
    outcome = {}

    def target():
        try:
            call()
            outcome["error"] = None
        except Exception as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)  # a hung walk must not keep pytest from exiting
    started = time.monotonic()
    thread.start()
    thread.join(seconds * 10)
    assert not thread.is_alive(), f"still running after {seconds * 10:.0f} s: the walk does not end"
    assert time.monotonic() - started < seconds
    assert isinstance(outcome["error"], UserError), repr(outcome["error"])
    assert "\n" not in str(outcome["error"])
    return str(outcome["error"])


def test_a_checkpoint_whose_state_dict_contains_itself_is_refused_at_once(tmp_path, monkeypatch):
    from cupscale_dist.models.single_file import checkpoint_family
    from cupscale_dist.models.spec import ModelSpec

    itself: dict = {}
    itself["state_dict"] = itself
    torch.save(itself, tmp_path / "itself.ckpt")
    a: dict = {}
    a["state_dict"] = {"state_dict": a}
    torch.save(a, tmp_path / "pair.ckpt")
    deep: dict = {"weight": torch.zeros(1)}
    for _ in range(30):
        deep = {"state_dict": deep}
    torch.save(deep, tmp_path / "deep.ckpt")
    assert (tmp_path / "itself.ckpt").stat().st_size < 2048
    for name, problem in (("itself.ckpt", "form a cycle"), ("pair.ckpt", "form a cycle"), ("deep.ckpt", "nested more")):
        path = str(tmp_path / name)
        assert problem in refused_within(lambda path=path: checkpoint_family(path), FAST_S)
        assert problem in refused_within(lambda path=path: ModelSpec.load(path), FAST_S)
    sdxl_keys = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1),
                 "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}
    torch.save({"state_dict": {"state_dict": sdxl_keys}, "epoch": 3}, tmp_path / "twice.ckpt")
    assert checkpoint_family(tmp_path / "twice.ckpt") == "sdxl"  # real wrappers still unwrap

    # The count bound, at a size a test can afford: the walks over keys are bounded by the file's entry count.
    from safetensors.torch import save_file

    from cupscale_dist.models import weightfiles  # the header reader (safetensors_header) and the .ckpt walk

    save_file({k: v.contiguous() for k, v in sdxl_keys.items()}, str(tmp_path / "two.safetensors"))
    monkeypatch.setattr(weightfiles, "MAX_ENTRIES", 1)
    for name in ("twice.ckpt", "two.safetensors"):
        with pytest.raises(UserError, match="holds 2 .*over the 1 a model has") as error:
            checkpoint_family(tmp_path / name)
        exception_line(error)
