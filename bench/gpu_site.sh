# Sourced by the GPU scripts: makes diffusers, ray and pywavelets importable on the lent GPU machine (it has torch and
# transformers, not these) from the carried .whl/ (bench/gpu_carry.sh makes it): wheels, and Ray as a stripped tar.xz.
# A warm machine keeps /tmp/site from the previous call: then nothing is installed again.
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
export PYTHONUNBUFFERED=1 RAY_DISABLE_USAGE_STATS=1 HF_HUB_OFFLINE=1
if ! python3 -c "import diffusers, ray, pywt" 2>/dev/null; then
  mkdir -p /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  for archive in .whl/*.tar.xz; do [ -e "$archive" ] && tar -xJf "$archive" -C /tmp/site; done
fi
