"""Upscale-model files (resize='model', issue 21 class 4): nothing in them runs, only plain state dicts pass;
valid files load weights-only and give spandrel's bytes. Every adversarial file is built here, tiny."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import FAST_S, exception_line
from PIL import Image

from cupscale_dist import UserError
from cupscale_dist.models import upscale_models as um


# -- 4. upscale-model files: nothing in them runs, only plain state dicts pass ----------------------------------
class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


@pytest.fixture
def torch_spy(monkeypatch):
    """Every torch.load call's weights_only, and every torch.jit.load call (refused: it would run the archive)."""
    calls = SimpleNamespace(load=[], jit=[])
    real_load = torch.load

    def load(*args, **kwargs):
        calls.load.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    def jit_load(*args, **kwargs):
        calls.jit.append(args)
        raise RuntimeError("torch.jit.load was called on a user's file")

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(torch.jit, "load", jit_load)
    return calls


def tiny_esrgan_state() -> dict[str, torch.Tensor]:
    um.import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def test_torchscript_and_non_state_dict_upscale_models_are_refused_before_torch_runs_them(tmp_path, torch_spy):
    scripted = torch.jit.script(Doubler())
    for name in ("script.pth", "script.pt", "script.ckpt"):
        torch.jit.save(scripted, str(tmp_path / name))
    selfish: dict = {}
    selfish["params_ema"] = selfish  # spandrel unwraps params_ema once: what is left is not a state dict
    torch.save(selfish, tmp_path / "cycle.pth")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    torch.save({"conv_first.weight": torch.zeros(8, 3, 3, 3), "note": "hello"}, tmp_path / "mixed.pth")
    nan = tiny_esrgan_state()
    first = next(iter(nan))
    nan[first].view(-1)[0] = float("nan")
    torch.save(nan, tmp_path / "nan.pth")
    (tmp_path / "notzip.pth").write_bytes(b"PK\x03\x04" + bytes(60))  # torch would open it as an archive
    refused = {"script.pth": "TorchScript archive", "script.pt": "TorchScript archive",
               "script.ckpt": "TorchScript archive", "cycle.pth": "not a plain state dict",
               "list.pth": "holds a list, not a state dict", "mixed.pth": "not a plain state dict",
               "nan.pth": "holds NaN values", "notzip.pth": "not a readable weights archive"}
    for name, problem in refused.items():
        path = um.resolve_upscale_model(str(tmp_path / name))
        for load in (um.check_upscale_model, lambda p: um.load_upscale_model(p, "cpu")):
            started = time.monotonic()
            with pytest.raises(UserError) as error:
                load(path)
            assert problem in exception_line(error), (name, str(error.value))
            assert ("as .safetensors" if "TorchScript" in problem else "resize=bicubic") in str(error.value)  # the fix
            assert time.monotonic() - started < FAST_S
    # The other readers of a user's pickled file refuse the archive by its names too (torch is not asked).
    from cupscale_dist.quality.inception import read_inception_weights
    from cupscale_dist.services.checkpoint import FILE_NAME, Checkpointer

    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / FILE_NAME).write_bytes((tmp_path / "script.pth").read_bytes())
    calls = len(torch_spy.load)
    for read in (lambda: read_inception_weights(tmp_path / "script.pth"),
                 lambda: Checkpointer(tmp_path / "resume", 1, "hash", "sha").load()):
        with pytest.raises(UserError) as error:
            read()
        assert "TorchScript archive" in exception_line(error)
    assert len(torch_spy.load) == calls
    assert torch_spy.jit == []  # the archives never reached torch.jit.load
    assert torch_spy.load and all(weights_only is True for weights_only in torch_spy.load)


def test_valid_upscale_models_load_weights_only_and_give_spandrels_bytes(tmp_path, torch_spy):
    from safetensors.torch import save_file

    spandrel = um.import_spandrel()
    state = tiny_esrgan_state()
    torch.save({"params_ema": state}, tmp_path / "wrapped.pth")  # as BasicSR saves them
    save_file(state, str(tmp_path / "plain.safetensors"))
    tile = np.asarray(Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)))
    for name in ("wrapped.pth", "plain.safetensors"):
        path = str(tmp_path / name)
        um.check_upscale_model(path)
        ours = um.run_upscale_model(um.load_upscale_model(path, "cpu"), tile)
        theirs = um.run_upscale_model(spandrel.ModelLoader("cpu").load_from_state_dict(
            spandrel.canonicalize_state_dict(state)).eval().float(), tile)
        assert ours.shape == (48, 40, 3) and ours.tobytes() == theirs.tobytes()
    assert torch_spy.jit == [] and torch_spy.load and all(w is True for w in torch_spy.load)
