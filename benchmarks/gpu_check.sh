#!/usr/bin/env bash
# GPU machine check for gemext (no package registry needed: torch + CUDA 13, pybind11,
# scikit-build-core, cmake and ninja preinstalled). Run from the repository root:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. builds and installs gemext, prints build_info and the device;
# 2. the CUDA tests (bitwise CPU/CUDA parity of every kernel, gem_grad_ over tasks, von_step_);
# 3. a 20-iteration GEM-BML+ sinusoid run on cuda against the same run on cpu (end to end);
# 4. the kernel benchmark on the GPU up to 1e8 weights (vs device-to-device copy);
# 5. the miniImageNet-shaped memory/time table of gem-bml+, maml, fomaml, reptile, imaml and the
#    `higher` MAML peer (when higher is installed) at 1, 5, 20 inner steps.
# Each step has its own time limit; a failing step is reported and the next one still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT="$(mkdir -p "${1:-benchmarks/out}" && cd "${1:-benchmarks/out}" && pwd)"
status=0
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, report its exit status
  local name="$1" limit="$2"; shift 2
  echo "=== $name"
  timeout "$limit" "$@"; local rc=$?
  [ $rc -eq 0 ] || { echo "=== $name FAILED (exit $rc)"; status=1; }
}

step build 400 bash -c "pip install --no-build-isolation . 2>&1 | tail -2"
# from outside the tree, so the installed package (not ./gemext without its _C) is imported
cd /tmp
step info 60 python -c 'import gemext, json, torch; info = gemext.build_info(); print(json.dumps(info)); assert info["cuda"], "CUDA kernels not compiled"; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())'
step cuda-tests 300 python -m pytest -q -p no:cacheprovider --rootdir "$ROOT/python_tests" \
  "$ROOT/python_tests/test_ops.py" "$ROOT/python_tests/test_von_op.py" -k cuda -rs
step train-cuda-vs-cpu 300 bash -c "
  for d in cpu cuda; do
    gemext train sinusoid --algo gem-bml+ --iterations 20 --eval-tasks 100 --device \$d --no-progress \
      --overwrite --out '$OUT/sinusoid-'\$d > '$OUT/sinusoid-'\$d.log 2>&1 || exit 1
  done
  python - '$OUT' <<'PY'
import json, sys
a, b = (json.load(open(f'{sys.argv[1]}/sinusoid-{d}/metrics.json')) for d in ('cpu', 'cuda'))
print('MSE after 0/5/10 steps  cpu', [round(a['mse_by_step'][k], 4) for k in (0, 5, 10)],
      ' cuda', [round(b['mse_by_step'][k], 4) for k in (0, 5, 10)])
PY"
step kernels 600 python "$ROOT/benchmarks/bench_kernels.py" --device cuda --sizes 1e6,1e7,1e8 --tensors 10,200 \
  --out "$OUT" 2> "$OUT/kernels_cuda.log"
step memory 600 gemext bench memory --task miniimagenet --algos gem-bml+,maml,fomaml,reptile,imaml,higher-maml \
  --inner-steps 1,5,20 --device cuda --repeats 2 --out "$OUT/memory-miniimagenet"
cat "$OUT/memory-miniimagenet/memory.csv" 2>/dev/null
exit $status
