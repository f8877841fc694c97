#!/usr/bin/env bash
# The GPU acceptance run, one command: bash bench/gpu.sh OUT_DIR (from the repository root).
# On the lent GPU machine (torch and transformers there, no diffusers/ray/pywavelets): carry .whl/, made here by
# ../shared/tools/gpu-wheels.sh, and it is installed first. Writes OUT_DIR/gpu.json; prints it too.
set -euo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR}
if ! python3 -c "import diffusers, ray, pywt" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 RAY_DISABLE_USAGE_STATS=1
exec timeout 540 python3 bench/gpu.py --out "$out"
