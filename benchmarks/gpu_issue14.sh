#!/usr/bin/env bash
# Issue 14's GPU measurements in one device call (about 6 minutes on an H200, at most ~8):
#   bash benchmarks/gpu_issue14.sh            # results under $OUT (the device tool's), else benchmarks/results/issue14
# Steps, each its own process under a hard `timeout` (a step past its soft limit starts no new case;
# issue14.json / issue14.md / issue14_rows.jsonl are rewritten after every row, so a killed step
# keeps what it measured):
#   tests       the gpu-marked tests: the case table on CUDA, no sync / CUDA graph, check_backend on CUDA
#   overhead    host overhead per call, N = 128 and 1024, mask reused and rebuilt, ratios to SDPA
#   plans       make_plan on CUDA, N = 4k..1M, beside Flex's compiled create_block_mask; cache hits
#   longformer  attnkit triton vs compiled Flex, fwd and fwd+bwd, N = 4k, 16k, 64k, 256k, 1M
#   profile     benchmarks/gpu_profile_call.py at N = 4096: torch.profiler tables, traces, the host path alone
# attnkit is not installed on the device machine: PYTHONPATH=src. What comes back from $OUT:
# issue14.json, issue14.md, issue14_rows.jsonl, issue14_pytest.log, issue14_log.txt, and the profile's
# host_N128.json, profile_longformer_N4096_{fwd,fwdbwd}.{txt,json}.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/issue14}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
log="$out/issue14_log.txt"
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1;
  "$py" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' 2>&1; } | tee -a "$log"

# step  hard limit (s)  soft limit (s): no new case after it
run_step() {
    local step=$1 hard=$2 soft=$3 t0=$SECONDS rc
    echo "== $step (soft ${soft} s, hard ${hard} s)" | tee -a "$log"
    timeout -k 10 "$hard" "$py" benchmarks/gpu.py --issue14 --step "$step" --limit-s "$soft" --out "$out" 2>&1 \
        | tee -a "$log" | tail -n 40
    rc=${PIPESTATUS[0]}
    echo "== $step exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
}

run_step tests 140 120
run_step overhead 60 40
run_step plans 110 90
run_step longformer 150 120
echo "== profile (hard 60 s): where a warm call's time goes, host and device" | tee -a "$log"
timeout -k 5 60 "$py" benchmarks/gpu_profile_call.py --out "$out" --n 4096 2>&1 | tee -a "$log" | tail -n 20
echo "== total $SECONDS s; results in $out" | tee -a "$log"
cat "$out/issue14.md" 2>/dev/null | tail -n 120
