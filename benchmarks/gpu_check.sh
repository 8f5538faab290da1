#!/usr/bin/env bash
# The device check, as one script: CUDA tests, then the GPU benchmarks. Run from the repo root
# on a machine with a CUDA torch (no install needed: PYTHONPATH=src). Results go to $OUT (or
# docs/results when OUT is unset).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-docs/results}
mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  tests/estimator/test_likelihood_ratio.py 2>&1 | tee "$OUT/cuda-tests.txt" | tail -5
python3 benchmarks/speed.py --device cuda --batch 256 --copies 32 --repeats 20 --out "$OUT" \
  2>&1 | tail -20
