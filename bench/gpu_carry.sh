#!/usr/bin/env bash
# Make ./.whl, the packages the GPU machine lacks, small enough to travel beside the working tree (64 MiB together):
# ../shared/tools/gpu-wheels.sh's wheels, then Ray's wheel replaced by its files with the native binaries stripped of
# symbols, RLlib left out, in one tar.xz (45 MB -> ~20 MB). Run from the repository root; bench/gpu_site.sh unpacks it.
set -euo pipefail
bash ../shared/tools/gpu-wheels.sh
wheel=$(ls .whl/ray-*.whl)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && unzip -q "$OLDPWD/$wheel" && rm -rf ray/rllib \
  && strip ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet \
  && XZ_OPT="-9e -T2" tar -cJf "$OLDPWD/.whl/ray.tar.xz" .)
rm -f "$wheel"
du -sh .whl; ls .whl
