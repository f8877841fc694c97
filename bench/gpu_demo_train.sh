#!/usr/bin/env bash
# Phase 2 of the demo model on the lent GPU: bash bench/gpu_demo_train.sh OUT_DIR MINUTES [train options...]
# Continues the shipped UNet and text encoders (cupscale_dist/demo/model) on the GPU for MINUTES, writes the weights
# and training.json to OUT_DIR (7 files: the device tool brings back 8). Carry .whl/ (bench/gpu_carry.sh).
set -euo pipefail
out=${1:?usage: bash bench/gpu_demo_train.sh OUT_DIR MINUTES}; minutes=${2:?minutes}; shift 2
source bench/gpu_site.sh
python3 -m cupscale_dist.demo.train --out /tmp/demo-gpu --device cuda --unet-from cupscale_dist/demo/model \
  --unet-minutes "$minutes" --unet-steps 1000000 "$@"
for part in unet text_encoder text_encoder_2; do
  mkdir -p "$out/$part" && cp /tmp/demo-gpu/$part/*.json /tmp/demo-gpu/$part/*.safetensors "$out/$part/"
done
cp /tmp/demo-gpu/training.json "$out/"
