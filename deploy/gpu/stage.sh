#!/usr/bin/env bash
# Builds the CUDA binaries on a machine without a GPU and stages them with the environment
# script and the PyTorch reference under the git-ignored .gpu/, for check.sh on the GPU
# machine (device tool: carry [".gpu"]). Run from anywhere in the checkout:
#   bash deploy/gpu/stage.sh
# Needs the pinned CUDA build environment (../shared/gpu/README.md); CARGO_TARGET_DIR
# defaults to /work/target-cuda so the CPU build's target/ is left alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
shared=../shared
# shellcheck disable=SC1090
source "${RINGTUNE_CUDA_ENV:-$HOME/.cache/ringtune-cuda/cuda-env.sh}"
target="${CARGO_TARGET_DIR:-/work/target-cuda}"
export CARGO_TARGET_DIR="$target"
cargo build --release --features ringtune-model/cuda --example gpu_check -p ringtune-model
cargo build --release --features nccl --example nccl_smoke -p ringtune-collectives
cargo build --release --features cuda,nccl -p ringtune
mkdir -p .gpu
for b in examples/gpu_check examples/nccl_smoke ringtune; do
  name=$(basename "$b")
  rm -f ".gpu/$name"
  cp "$target/release/$b" ".gpu/$name"
  strip ".gpu/$name"
done
rm -f .gpu/gpu-env.sh .gpu/gpu_peft_bench.py
cp "$shared/gpu/gpu-env.sh" "$shared/bench/gpu_peft_bench.py" .gpu/
echo "staged at commit $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with uncommitted changes)'):"
ls -l .gpu
echo "total: $(du -sh .gpu | cut -f1) (the device tool carries at most 64 MiB)"
