#!/usr/bin/env bash
# The GPU acceptance run, one command: bash bench/gpu.sh OUT_DIR (from the repository root).
# On the lent GPU machine (torch and transformers there, no diffusers/ray/pywavelets): carry .whl/, made here by
# bench/gpu_carry.sh, and it is installed first. Writes OUT_DIR/gpu.json; prints it too.
set -euo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR}
source bench/gpu_site.sh
exec timeout 540 python3 bench/gpu.py --out "$out"
