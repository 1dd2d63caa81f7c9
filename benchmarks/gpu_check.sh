#!/usr/bin/env bash
# GPU machine check for gemext's CUDA kernels (no package registry needed: torch + CUDA 13,
# pybind11, scikit-build-core, cmake and ninja preinstalled). Run from the repository root:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Builds and installs gemext, prints build_info, runs the CUDA tests (bitwise CPU/CUDA parity),
# then the kernel benchmark on the GPU up to 1e8 weights; the table comes last.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/out}"
mkdir -p "$OUT"

pip install --no-build-isolation . 2>&1 | tail -2
python -c 'import gemext, json; info = gemext.build_info(); print(json.dumps(info)); assert info["cuda"], "CUDA kernels not compiled"'
python -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())'

# run from outside the tree so the installed package (not the sources) is tested
(cd python_tests && python -m pytest -q -p no:cacheprovider test_ops.py -k cuda -rs)

python benchmarks/bench_kernels.py --device cuda --sizes 1e6,1e7,1e8 --tensors 10,200 \
  --out "$OUT" 2> "$OUT/kernels_cuda.log"
