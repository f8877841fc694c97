"""Fixtures of the service tests (Ray Serve and the in-process app)."""

from __future__ import annotations

import pytest
from helpers import FAST, MODEL, png_bytes


@pytest.fixture(scope="module")
def cli_bytes(tmp_path_factory):
    """`cupscale upscale` (the CLI's own code path, in this process, single-process reference) on the same input
    and parameters: its output file's bytes, per seed."""
    from cupscale_dist.cli.main import main

    folder = tmp_path_factory.mktemp("cli")
    source = folder / "in.png"
    source.write_bytes(png_bytes())
    cache = {}

    def run(seed: int) -> bytes:
        if seed not in cache:
            out = folder / f"out-{seed}.png"
            argv = ["upscale", str(source), "-o", str(out), "--config", "cpu-demo", "--model", MODEL, "--set",
                    "torch_threads=1", "--tile", FAST["tile"], "--stride", FAST["stride"], "--steps", FAST["steps"],
                    "--strength", FAST["strength"],
                    "--seed", str(seed), "--actors", "0", "-q"]
            assert main(argv) == 0
            cache[seed] = out.read_bytes()
        return cache[seed]

    run.source = str(source)
    return run
