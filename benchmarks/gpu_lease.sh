#!/usr/bin/env bash
# Issue 14's GPU measurements in ONE device-tool call (a 15-minute lease is enough):
#   1. psi, 1M nodes / 20M nnz / d = 64 / L = 3: JAX formulations vs torch CSR, GB/s against
#      the card's peak (bench_gpu_smoothing.py);
#   2. SASRec and GRU4Rec train steps, AdamW and SEvo-AdamW: sevo_jax vs the PyTorch
#      re-implementation of the paper's code on the same card (bench_gpu_steps.py).
# Usage, here: mkdir -p .gpu && cp ../shared/data/amazon-beauty/Beauty.txt .gpu/ (.gpu/ is
# ignored); then the device tool's run with carry [".gpu"] and the command
#   bash benchmarks/gpu_lease.sh
# Logs and JSON go to $OUT (the tool brings them back). The machine's python3 has jax, flax,
# optax, orbax, scipy and torch; the library runs from the working tree (PYTHONPATH).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_lease}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BEAUTY=${BEAUTY:-.gpu/Beauty.txt}
SMOKE=${SMOKE:+--smoke}  # SMOKE=1: tiny sizes (a check of this script on any machine)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv \
  2>&1 | tee "$OUT/gpu.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())" \
  2>&1 | tee -a "$OUT/gpu.txt"
timeout 330 python3 benchmarks/bench_gpu_smoothing.py $SMOKE --json "$OUT/psi.json" 2>&1 \
  | tee "$OUT/psi.log" | grep -v Warning | tail -25
echo "bench_gpu_smoothing exit: ${PIPESTATUS[0]}"
timeout 240 python3 benchmarks/bench_gpu_steps.py $SMOKE --beauty "$BEAUTY" --json "$OUT/steps.json" 2>&1 \
  | tee "$OUT/steps.log" | grep -v Warning | tail -12
echo "bench_gpu_steps exit: ${PIPESTATUS[0]}"
