"""LoRA files (issue 21 class 9): incomplete, non-finite, or for other layer sizes: refused in one line before any
model loads."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import exception_line, small_config

from cupscale_dist import UserError


# -- 9. LoRAs: incomplete, non-finite, or for other layer sizes -----------------------------------------------------
@pytest.fixture(scope="module")
def lora_state(sdxl_dir, tmp_path_factory):
    from safetensors.torch import load_file

    from cupscale_dist.testing.tiny import build_tiny_lora

    path = build_tiny_lora(sdxl_dir, tmp_path_factory.mktemp("lora") / "good.safetensors", seed=1)
    return load_file(str(path))


class Records(logging.Handler):
    """Every record a logger (and its children) emits."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_broken_loras_are_refused_in_one_line_before_any_model_loads(sdxl_dir, lora_state, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from cupscale_dist.execution.worker import ModelWorker
    from cupscale_dist.models.addons import Addons, Lora

    down = next(k for k in lora_state if k.startswith("unet.") and "attn1.to_q.lora_A" in k)
    up = next(k for k in lora_state if k.startswith("unet.") and "lora_B" in k)
    files = {
        "only_a": ({k: v for k, v in lora_state.items() if "lora_B" not in k}, "but no up (lora_B) factor"),
        "nan": ({**lora_state, up: torch.full_like(lora_state[up], float("nan"))}, f"weight {up} holds NaN"),
        "inf": ({**lora_state, down: torch.full_like(lora_state[down], float("inf"))}, "holds infinite values"),
        "wide": ({**lora_state, down: torch.zeros(lora_state[down].shape[0], 2 * lora_state[down].shape[1])},
                 f"has {2 * lora_state[down].shape[1]} inputs"),
    }
    for name, (state, _problem) in files.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    with monkeypatch.context() as patched:
        patched.setattr("cupscale_dist.execution.worker.load_pipeline", lambda *a, **k: pytest.fail("a model loaded"))
        for name, (_, problem) in files.items():
            with pytest.raises(UserError) as error:
                Addons.from_config(small_config(sdxl_dir, lora=(str(tmp_path / f"{name}.safetensors"),)))
            assert problem in exception_line(error) and str(tmp_path / name) in str(error.value), \
                (name, str(error.value))

    # A worker given a mismatched LoRA unchecked (the driver's check bypassed) still says it in one line: diffusers'
    # multi-line error log is not printed (its logger does not propagate to pytest's, so listen on it directly).
    diffusers_log, seen = logging.getLogger("diffusers"), Records()
    diffusers_log.addHandler(seen)
    try:
        with pytest.raises(UserError) as error:
            ModelWorker(sdxl_dir, "cpu", "float32", addons=Addons((Lora(str(tmp_path / "wide.safetensors"), 1.0),)))
    finally:
        diffusers_log.removeHandler(seen)
    assert "size mismatch" in exception_line(error)
    assert not [r for r in seen.records if r.levelno >= logging.ERROR], [r.getMessage() for r in seen.records]
