"""What a process that loads no model imports (a Ray-mode CLI driver, a refusal, `--dry-run`, the test workers): not
diffusers' transformer models. `diffusers.models.transformers` loads every DiT diffusers ships and peft through its
hooks (~2.8 CPU s a process, measured: 6.7 -> 3.7 CPU s for the package's import); the FLUX.1 and Z-Image attention
processors import their diffusers module where one is made."""

import subprocess
import sys

from helpers import REPO


def test_importing_the_package_and_the_cli_loads_no_diffusers_transformer_models():
    code = ("import sys, cupscale_dist.pipeline, cupscale_dist.cli.main, actors.worker, "
            "cupscale_dist.execution.partowner, cupscale_dist.models.backbones; "
            "print(sorted(m for m in sys.modules if m.startswith('diffusers.models.transformers') or m == 'peft'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
