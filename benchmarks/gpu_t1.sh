#!/usr/bin/env bash
# One command for the GPU run of issue #8: install the project (make install), train a VGG16 T1
# market on the GPU (or load it when already trained), slice all 10 (model, class) pairs with the
# Ray slice job, pack the T1 target sets, and write benchmarks/results/gpu_t1.json.
#
#   bash benchmarks/gpu_t1.sh                       # full width, 8 training epochs (fewer than the
#                                                   # CPU markets' defaults, to fit 10 minutes)
#   WIDTH=0.0625 EPOCHS=1 FRACTION=0.1 bash benchmarks/gpu_t1.sh   # the CPU smoke run
#
# Needs ../shared/data (or SNP_DATA_ROOT). Prints the total seconds, install included.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
make install
if [ -z "${SNP_DATA_ROOT:-}" ] && [ -d ../shared/data ]; then
    export SNP_DATA_ROOT="$(cd ../shared/data && pwd)"
fi
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
.venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
.venv/bin/python benchmarks/gpu_t1.py --width "${WIDTH:-1.0}" --epochs "${EPOCHS:-8}" \
    --train-fraction "${FRACTION:-1.0}" --k "${K:-10}" --preset "${PRESET:-quick}" \
    --targets "${TARGETS:-5}" --root "${ROOT:-runs/gpu-t1}" --out "${OUT:-benchmarks/results/gpu_t1.json}" "$@"
echo "gpu_t1.sh: total ${SECONDS}s wall, install included (started $(date -d @"$start" +%T))"
