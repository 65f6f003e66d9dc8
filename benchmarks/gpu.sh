#!/usr/bin/env bash
# The GPU run of issue 24, one command: bash benchmarks/gpu.sh [SHAPE] (default llama-2-7b).
# Sized for one large GPU (an 80-141 GB H100/H200) in under 10 minutes; with several GPUs the device
# map spreads the model over all of them and the data-parallel step uses one process per GPU.
#   1. benchmarks/scale.py on --device cuda: the random-weight checkpoint, then run (AURA, project
#      stack, transport) with the model placed by accelerate over every visible GPU (--device-map
#      auto), collection vs a plain layer-by-layer forward, bake beside its floor, verify on the GPU,
#      eval --preset quick, GGUF export; peaks, wall times, plan's predictions.
#   2. the same AURA recipe data-parallel: torchrun, one process per GPU (nccl, statistics gathered
#      over gloo), and its patch compared with step 1's single-process patch.
# Results: benchmarks/results/gpu-SHAPE.json and the logs beside the work folder.
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPE="${1:-llama-2-7b}"
WORK="${WORK:-/tmp/patcher-gpu-$SHAPE}"
NGPU="$(python -c 'import torch; print(torch.cuda.device_count())')"
if [ "$NGPU" -lt 1 ]; then echo "no CUDA GPU visible: this script is for a GPU machine" >&2; exit 1; fi
export PYTHONPATH="$PWD" TOKENIZERS_PARALLELISM=false
mkdir -p benchmarks/results "$WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

python benchmarks/scale.py --shape "$SHAPE" --work "$WORK" --device cuda --keep-checkpoint \
  --run-flags "--device-map auto" --verify-flags "" --eval-flags "--device-map auto" \
  --json "benchmarks/results/gpu-$SHAPE.json"

# Data-parallel: one process per GPU over the same recipe; rank 0 writes.
START=$(date +%s)
torchrun --standalone --nproc_per_node "$NGPU" -m patcher.cli compute "$WORK/aura.toml" --out "$WORK/dp-aura" \
  --overwrite --device cuda --checkpoint-every 0 2>&1 | tail -n 5
echo "data-parallel compute on $NGPU GPU(s): $(( $(date +%s) - START )) s"
python - "$WORK" <<'PY'
import sys
from pathlib import Path

from safetensors.torch import load_file

work = Path(sys.argv[1])
a, b = load_file(work / "dp-aura/patch.safetensors"), load_file(work / "patch-aura/patcher/patch.safetensors")
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
print(f"data-parallel patch vs single process (--device-map auto): {len(a)} tensors, max abs difference {diff:.3g}")
PY
rm -rf "$WORK/model" "$WORK"/out-* "$WORK"/baked-* "$WORK"/patch-* "$WORK/dp-aura"
