#!/usr/bin/env bash
# Submit an upscale as a Ray Job to a local head, on CPU with the demo model, then stop the head.
#
#   examples/submit_job.sh [OUTPUT.png]          (from the repository root)
#
# The head keeps Ray's token auth on (`ray start --head` writes ~/.ray/auth_token if there is none);
# `cupscale submit` sends that token. Set RAY_PORT / DASHBOARD_PORT if 6379 / 8265 are taken.
set -euo pipefail
cd "$(dirname "$0")/.."
output="$(realpath -m "${1:-astronaut-2x.png}")"
temp_dir="$(mktemp -d /tmp/cupscale-head-XXXXXX)"
dashboard_port="${DASHBOARD_PORT:-8265}"

export RAY_AUTH_MODE=token HF_HUB_OFFLINE=1
NUM_CPUS=2 DASHBOARD_PORT="$dashboard_port" cluster/start-local-head.sh "$temp_dir"
trap 'cluster/start-local-head.sh --stop "$temp_dir"; rm -rf "$temp_dir"' EXIT
address="http://127.0.0.1:$dashboard_port"

# --working-dir ships this checkout: the job imports the code from it (not what the head has installed).
cupscale submit --address "$address" --wait --working-dir . -- \
  upscale "$PWD/examples/astronaut.png" -o "$output" --config cpu-demo --overwrite --cpus-per-actor 0.5 -q
cupscale jobs list --address "$address"
echo "wrote $output"
