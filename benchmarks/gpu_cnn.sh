#!/usr/bin/env bash
# Issue 14 floor 5, for a lent GPU: Fashion-MNIST LeNet-5 with its model defaults, and ResNet-5 /
# VGG-8 with the authors' per-layer copy counts (--recommended: 50-800 copies per layer, weight
# noise on the first convs), each next to backprop in one `ulr train` command. Needs the
# Fashion-MNIST IDX files under $ULR_DATA_DIR (default .devdata/) and a CUDA torch. Prints each
# comparison table; the run directories (config, metrics per epoch, summary) go under $RUNS.
#   DEVICE=cpu EXTRA="--max-steps 2" PYTHON=.venv/bin/python bash benchmarks/gpu_cnn.sh  # dry run
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 ULR_DATA_DIR=${ULR_DATA_DIR:-.devdata}
DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-benchmarks/out/gpu-cnn}
EXTRA=${EXTRA:-}
rm -rf "$RUNS"; mkdir -p "$RUNS"
[ "$DEVICE" = cpu ] || nvidia-smi -L
train() {  # label, then ulr train options
    local label=$1; shift
    echo "== $label: ulr train --method ulr bp --data fashion-mnist $* --device $DEVICE $EXTRA"
    "${PYTHON:-python3}" -m ulr train --method ulr bp --data fashion-mnist "$@" \
        --device "$DEVICE" --threads 0 --no-plots --quiet --out "$RUNS/$label" $EXTRA
}
train lenet5 --model lenet5
train resnet5 --model resnet5 --recommended --epochs 5
train vgg8 --model vgg8 --recommended --epochs 5
