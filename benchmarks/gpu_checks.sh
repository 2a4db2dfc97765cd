#!/usr/bin/env bash
# The GPU checks in one run, for a short lease on a GPU machine: each step runs under its own time
# limit within an overall budget, and its log lands in OUTDIR (tarred after every step, so a run cut
# short keeps what it did).
#
#   bash benchmarks/gpu_checks.sh [OUTDIR] [BUDGET_SECONDS]     # defaults: runs/gpu-checks 540
#
# Steps, most wanted first: the memory benchmark on a random-init 1B model (its `fit` on CUDA has
# never finished: the packed layers' kernels compile and autotune first); quantization time at
# Llama-2-7B's layer shapes (GPTQ-clip, then `refresh`, then one module of each shape); the
# packed-layer benchmark on the 7B shapes; the CUDA kernel tests (none finished within 110 s so
# far). ALPACA names the calibration and training rows (default: the workplace's copy next to
# the repository).
set -u
OUTDIR=${1:-runs/gpu-checks}
BUDGET=${2:-540}
ALPACA=${ALPACA:-../shared/data/datasets/alpaca_5000/alpaca_5000.json}
START=$(date +%s)
LOGS=$(mktemp -d)  # logs only: they are tarred after every step
WORK=$(mktemp -d)  # artifacts and recipes
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
export PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, within what the budget leaves
  local name=$1 limit=$2 left
  shift 2
  left=$((BUDGET - ($(date +%s) - START) - 10))
  if ((left < 20)); then
    echo "$name: skipped, ${left}s of the budget left" | tee -a "$LOGS/steps.txt"
    return
  fi
  ((limit > left)) && limit=$left
  local t0
  t0=$(date +%s)
  timeout "$limit" "$@" >"$LOGS/$name.txt" 2>&1
  echo "$name: exit $? after $(($(date +%s) - t0))s (limit ${limit}s)" | tee -a "$LOGS/steps.txt"
  tar -czf "$OUTDIR/logs.tgz" -C "$LOGS" .
}

step environment 60 bash -c 'nvidia-smi -L; $PY -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"'
step memory 330 "$PY" benchmarks/memory.py --models llama-1b --shapes 4x256 --device cuda \
  --calibration "$ALPACA" --data "$ALPACA" --runs-dir "$WORK/bench-memory" --json "$OUTDIR/memory.json"
for log in $(find "$WORK/bench-memory" -name '*.log' 2>/dev/null); do  # the runs' own logs
  name=${log#"$WORK/bench-memory/"}
  cp "$log" "$LOGS/memory-${name//\//_}"
done
tar -czf "$OUTDIR/logs.tgz" -C "$LOGS" .
QUANTIZE=("$PY" -m projq_train.cli quantize --config benchmarks/quantize-llama2-7b-2layers.yaml
  --calibration.dataset "$ALPACA" --artifact_dir "$WORK/artifacts")
step quantize-gptq 100 "${QUANTIZE[@]}" --quant.method gptq
step quantize-refresh 160 "${QUANTIZE[@]}"
step module-time 120 "$PY" benchmarks/module_quant_time.py --device cuda
step packed-kernels 200 "$PY" benchmarks/packed_kernels.py --shapes 11008x4096 4096x11008 --tokens 1 512 4096 --json "$OUTDIR/kernels.json"
step kernel-tests 150 "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/test_triton_kernels.py
echo "total $(($(date +%s) - START))s; logs in $OUTDIR/logs.tgz"
