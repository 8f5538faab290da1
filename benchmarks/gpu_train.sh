#!/usr/bin/env bash
# GPU results for the training and memory benchmarks, as one script for a lent device. Needs
# the Fashion-MNIST IDX files under $ULR_DATA_DIR (default .devdata/) and a CUDA torch.
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 ULR_DATA_DIR=${ULR_DATA_DIR:-.devdata}
OUT=${OUT:-docs/results}
mkdir -p "$OUT"
nvidia-smi -L
python3 benchmarks/memory.py --device cuda --out "$OUT" 2>&1 | tail -12
python3 benchmarks/training.py --device cuda --suite fashion-mlp fashion-lenet --out "$OUT"
