#!/usr/bin/env bash
# Issue 15's GPU run in one device call (at most ISSUE15_BUDGET_S = 540 s, 9 minutes, on an H200):
#   bash benchmarks/gpu_issue15.sh            # results under $OUT (the device tool's), else benchmarks/results/issue15
# Steps, each its own process under a hard `timeout`, with a soft limit inside (no new candidate or case
# after it; issue15.json / issue15.md / issue15_rows.jsonl are rewritten after every row, so a killed step
# keeps what it measured). A step's hard limit is cut to the budget left; a step with under MIN_STEP_S
# left is skipped.
#   tests       the gpu-marked tests (gpu.py's GPU_TESTS: the case table per dtype and Schedule on CUDA)  150 s
#   tune        --tune's sweep per pass on the acceptance cases (dense D=128 16k, causal D=64 16k,
#               Longformer 64k; set ISSUE15_NS=1048576 for 1M), each slice's candidates compiled ahead
#               in up to 12 worker processes (killed with the step): rows, and tune_table.py of the winners  240 s
#   compare     those cases side by side: attnkit shipped / with tune_table.py's rows, SDPA FLASH / cuDNN,
#               compiled Flex; fwd and fwd+bwd TFLOP/s                                                 120 s
#   longformer  issue 14's Longformer table with Flex (N = 4k..1M), with what time is left
# Last, a short summary table (gpu.py --issue15 --summary). attnkit is not installed on the device
# machine: PYTHONPATH=src. What comes back from $OUT (6 files): issue15.json, issue15.md,
# issue15_rows.jsonl, issue15_pytest.log, issue15_log.txt, tune_table.py.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/issue15}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
budget="${ISSUE15_BUDGET_S:-540}"
reserve=25     # kept back from each step's hard limit: timeout's 10 s before SIGKILL, and the summary
min_step=30    # a step given less than this is skipped
ns_arg=()
[ -n "${ISSUE15_NS:-}" ] && ns_arg=(--ns "$ISSUE15_NS")
log="$out/issue15_log.txt"
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1;
  "$py" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1; } | tee -a "$log"

# step  hard limit (s)  soft margin (s): the soft limit is the hard one less the margin (what a
# candidate or case started just before it may still take, and the process's start)
run_step() {
    local step=$1 hard=$2 margin=$3 t0=$SECONDS left soft rc
    left=$((budget - SECONDS - reserve))
    [ "$hard" -gt "$left" ] && hard=$left
    soft=$((hard - margin))
    if [ "$hard" -lt "$min_step" ] || [ "$soft" -lt 10 ]; then
        echo "== $step skipped: $((budget - SECONDS)) s of the ${budget} s budget left" | tee -a "$log"
        return
    fi
    echo "== $step (soft ${soft} s, hard ${hard} s)" | tee -a "$log"
    timeout -k 10 "$hard" "$py" benchmarks/gpu.py --issue15 --step "$step" --limit-s "$soft" ${ns_arg[@]+"${ns_arg[@]}"} \
        --out "$out" 2>&1 | tee -a "$log" | tail -n 30
    rc=${PIPESTATUS[0]}
    echo "== $step exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
}

run_step tests 150 15
run_step tune 240 35
run_step compare 120 40
run_step longformer "$budget" 30
echo "== total $SECONDS s; results in $out" | tee -a "$log"
if ! summary=$("$py" benchmarks/gpu.py --issue15 --summary --out "$out" 2>&1); then  # the step lines at least
    summary="$(printf '%s\n' "$summary" | tail -n 3)
$(grep '^== ' "$log")"
fi
printf '%s\n' "$summary" | tee -a "$log"
