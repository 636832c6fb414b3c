#!/usr/bin/env bash
# The GPU data-path check of issue 21, prepared to run in one call on a lent GPU machine:
#   scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else reports/gpu)
# It times the training loop against raw forward+backward (python -m cxr bench) for the two
# configurations the issue names and appends one JSON line each to OUT_DIR/bench.jsonl.
# Target: ratio >= 0.95. Needs only the checkout and a Python with requirements.txt installed
# (no data: bench trains on random tensors).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-reports/gpu}}"
mkdir -p "$out"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: this check is for a GPU machine"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
python -m cxr bench --arch resnet18 --image-size 112 --batch-size 64 --steps 50 --warmup 10 \
  --rounds 3 --json "$out/bench.jsonl"
python -m cxr bench --arch resnet152 --image-size 224 --batch-size 32 --steps 30 --warmup 5 \
  --rounds 3 --json "$out/bench.jsonl"
cat "$out/bench.jsonl"
