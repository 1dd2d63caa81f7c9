#!/usr/bin/env bash
# GPU machine check for gemext, in one call of at most ~9 minutes (the lent machines allow 10
# minutes a command and 15 minutes of device time a session, start-up included). No package
# registry is needed: torch + CUDA, pybind11, scikit-build-core, cmake and ninja are preinstalled.
# Run from the repository root:
#   bash benchmarks/gpu_check.sh [OUT_DIR] [BUDGET_SECONDS]     (defaults: benchmarks/out, 540)
# Steps, most important first; each gets at most its own limit and what is left of the budget, a
# failing or skipped step is reported and the next one still runs:
# 1. build and install gemext (CUDA kernels), print build_info and the device;
# 2. the CUDA tests: bitwise CPU/CUDA parity of every kernel (kernels/test_ops.py, kernels/test_von_op.py)
#    and the learner tests' cuda cases (test_contract.py, algorithms/: the `device` fixture);
# 3. the kernel table on the GPU at 1e7 and 1e8 weights against a device-to-device copy;
# 4. a 20-iteration GEM-BML+ sinusoid run on cuda against the same run on cpu (end to end);
# 5. per meta-iteration against the peers on the GPU (sinusoid, Omniglot shapes; k = 5);
# 6. the miniImageNet-shaped memory/time table (gem-bml+, maml, fomaml, reptile, imaml, and the
#    `higher` MAML peer when it imports) at 1, 5, 20 inner steps.
# `higher` is pure Python and the machine has no registry: to include its rows, fetch its wheel here
# first (`pip download --no-deps --only-binary=:all: -d .whl higher`, with .whl/ in
# .git/info/exclude) and carry .whl; this script installs any wheels found there.
# OUT_DIR receives only small summary files (gpu_check.log, kernels_cuda.md, peers.md,
# memory.csv, sinusoid.txt): the run folders stay in /tmp.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT="$(mkdir -p "${1:-benchmarks/out}" && cd "${1:-benchmarks/out}" && pwd)"
BUDGET="${2:-540}"
WORK="$(mktemp -d /tmp/gpu_check.XXXX)"
DEADLINE=$(( $(date +%s) + BUDGET ))
export PYTHONUNBUFFERED=1
status=0
exec > >(tee "$OUT/gpu_check.log") 2>&1

step() {  # step NAME SECONDS CMD...: run CMD within min(SECONDS, what is left), report its exit status
  local name="$1" want="$2"; shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  local limit=$(( want < left ? want : left ))
  if [ "$limit" -lt 15 ]; then echo "=== $name SKIPPED (budget spent)"; status=1; return; fi
  echo "=== $name (limit ${limit}s)"
  local t0; t0=$(date +%s)
  timeout "$limit" "$@"; local rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s"
  [ $rc -eq 0 ] || { echo "=== $name FAILED"; status=1; }
}

if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  step wheels 60 python -m pip install -q --no-index --no-deps --target "$WORK/site" "$ROOT"/.whl/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
step build 300 bash -c "pip install --no-build-isolation . 2>&1 | tail -2"
# from outside the tree, so the installed package (not ./gemext without its _C) is imported
cd "$WORK"
step info 60 python -c 'import gemext, json, torch; info = gemext.build_info(); print(json.dumps(info)); assert info["cuda"], "CUDA kernels not compiled"; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(), torch.__version__)'
step cuda-tests 210 python -m pytest -q -p no:cacheprovider --rootdir "$ROOT/python_tests" \
  "$ROOT/python_tests/kernels/test_ops.py" "$ROOT/python_tests/kernels/test_von_op.py" \
  "$ROOT/python_tests/test_contract.py" "$ROOT/python_tests/algorithms" -k cuda -rs
step kernels 90 python "$ROOT/benchmarks/bench_kernels.py" --device cuda --sizes 1e7,1e8 --tensors 10,200 \
  --out "$WORK/kernels"
cp "$WORK/kernels/kernels_cuda.md" "$OUT/" 2>/dev/null && cat "$OUT/kernels_cuda.md"
step train-cuda-vs-cpu 90 bash -c "
  for d in cpu cuda; do
    gemext train sinusoid --algo gem-bml+ --iterations 20 --eval-tasks 100 --device \$d --no-progress \
      --overwrite --out '$WORK/sinusoid-'\$d > '$WORK/sinusoid-'\$d.log 2>&1 || { tail -20 '$WORK/sinusoid-'\$d.log; exit 1; }
  done
  python - '$WORK' <<'PY' | tee '$OUT/sinusoid.txt'
import json, sys
a, b = (json.load(open(f'{sys.argv[1]}/sinusoid-{d}/metrics.json')) for d in ('cpu', 'cuda'))
print('MSE after 0/5/10 steps  cpu', [round(a['mse_by_step'][k], 4) for k in (0, 5, 10)],
      ' cuda', [round(b['mse_by_step'][k], 4) for k in (0, 5, 10)],
      ' train s cpu %.1f cuda %.1f' % (a['wall_s'], b['wall_s']))
PY"
step peers 120 python "$ROOT/benchmarks/bench_peers.py" --device cuda --tasks sinusoid,omniglot --steps 5 \
  --repeats 5 --algos gem-bml+,maml,fomaml,reptile,higher-maml,plain-maml --out "$WORK/peers"
cp "$WORK/peers/peers.md" "$OUT/" 2>/dev/null
step memory 240 gemext bench memory --task miniimagenet --algos gem-bml+,maml,fomaml,reptile,imaml,higher-maml \
  --inner-steps 1,5,20 --device cuda --repeats 2 --out "$WORK/memory-miniimagenet"
cp "$WORK/memory-miniimagenet/memory.csv" "$OUT/" 2>/dev/null && cat "$OUT/memory.csv"
echo "=== gpu_check: $([ $status -eq 0 ] && echo all steps passed || echo some steps FAILED or were skipped)"
exit $status
