#!/usr/bin/env bash
# One prepared GPU check for a single-GPU machine (H100/H200; no network; under 10 minutes).
# Assumes jax (CUDA), flax, optax, orbax, chex, torch (and optionally timm) are installed; runs this
# checkout's msd_jax (on PYTHONPATH), installs nothing. Measures the card's bf16 matmul peak
# (JAX and torch), then msd_jax's MSD step (bf16 compute) and the PyTorch step (bf16 autocast; timm
# blocks if importable) for ViT-S/16 and ViT-B/16 at 224 px: images/s, MFU, device memory.
# Prints a table and writes JSON.
#
#   bash benchmarks/gpu_check.sh [OUT.json]                      # on the GPU machine
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh /tmp/g.json  # tiny, on a CPU (checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check.json}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${GPU_CHECK_DRY_RUN:-0}" = "0" ]; then
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
  python -c "import jax; print('jax', jax.__version__, jax.devices())"
fi
exec timeout 570 python benchmarks/gpu_check.py "$OUT"
