"""attnkit's Triton kernels beside torch SDPA (FLASH, cuDNN, EFFICIENT) and FlexAttention, on one GPU.

    python benchmarks/gpu.py                  # the whole table (several minutes on an H100)
    python benchmarks/gpu.py --quick          # small sizes only: a smoke test of the script
    python benchmarks/gpu.py --out DIR        # where the JSON and markdown go (default benchmarks/results)
    python benchmarks/gpu.py --tune           # sweep attnkit's block sizes, warps and stages instead
    python benchmarks/gpu.py --acceptance     # only the three cases of issue 6's acceptance
    python benchmarks/gpu.py --kinds longformer --ns 65536,131072   # a subset (one device call is 10 min)
    python benchmarks/gpu.py --issue14 --out DIR   # issue 14's tables in one short run (benchmarks/gpu_issue14.sh)

In one process, on the same bf16 inputs (B=1):
- dense and causal, H=16, D = 64 and 128, N = 1k, 4k, 16k: attnkit triton, SDPA FLASH / CUDNN /
  EFFICIENT (``sdpa_kernel``), FlexAttention compiled (causal: a causal block mask);
- the Longformer pattern (H=12, D=64, window of W=256 keys on each side, G=16 global tokens at the start),
  N = 4k, 16k, 64k, 256k, 1M: attnkit triton, FlexAttention compiled with the same block mask.

Before timing, every contender's output is checked against the float32 reference on 64 sampled
query rows (attnkit.viz.capture's row recomputation, which evaluates the mask on those rows), and
up to N = 4096 its gradients dq, dk, dv against the float32 reference's.
Timing: ``triton.testing.do_bench`` medians; forward, and forward+backward (``autograd.grad`` of
all three inputs). TFLOP/s count useful FLOPs only (anchors' convention: forward 4 B H D x pairs,
fwd+bwd 3.5x). Peak memory: ``max_memory_allocated`` above the inputs over one forward+backward
call, outside ``do_bench`` (whose L2-flush buffer would add 256 MiB). Each row is appended to a
.jsonl file as soon as it is measured, so a crash keeps what ran.
Block plans (attnkit) and block masks (Flex) are built once, outside the timing; their build
times are reported.

``--tune`` times attnkit alone on the acceptance cases (Longformer N=64k, dense D=128 N=16k,
causal D=64 N=16k) over TUNE_BLOCKS x TUNE_WARPS x TUNE_STAGES, every kernel launched with the
same warps and stages and the same blocks in both passes, output checked first; it writes
tune_*.json / .md with the forward and the backward (fwd+bwd minus fwd) times, fastest first, so
the forward's and the backward's best can be read apart. Its winners go into ``attnkit.ops.triton.configs.gpu_blocks``
and ``launch_config`` (and ``python -m attnkit.ops.triton_check`` must still pass).

``--issue14`` runs issue 14's measurements, step by step (``--step`` picks some; each step stops
starting new cases past its soft limit, ``ISSUE14_LIMITS_S``), writing as it goes to
``issue14.json`` (all steps' rows), ``issue14.md`` and ``issue14_rows.jsonl`` in ``--out``:
- ``tests``: the gpu-marked correctness tests first (the case table on CUDA, the no-sync /
  CUDA-graph test, ``check_backend`` on CUDA), pytest in a child process with a timeout;
- ``overhead``: host overhead, wall time per call at B=1, H=8, D=64, bf16, N = 128 and 1024
  (``host_overhead``): torch SDPA, ak auto and ak triton, causal and window+global, each with the
  mask reused across calls and rebuilt inside the loop as a model does; ratios to SDPA;
- ``plans``: the plan-build table on CUDA (``benchmarks/plan_build.py``'s cases, N = 4k..1M)
  beside FlexAttention's compiled ``create_block_mask`` for the same masks, and cache hits;
- ``longformer``: the Longformer fwd / fwd+bwd comparison with Flex at N = 4k..1M (``measure``).
``benchmarks/gpu_issue14.sh`` runs the four steps under ``timeout`` for one device call.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit as ak
from attnkit.bench.cpu import CommaList
from attnkit.cli._paths import OutputPathError, prepare_output_dir
from attnkit.ops.block_plan import make_plan
from attnkit.ops.triton import configs as triton_configs
from attnkit.ops.triton.configs import default_blocks
from attnkit.ops.triton.op import triton_attention
from attnkit.viz.capture import AttentionRecord



def _sibling(name: str):
    """A script beside this one, imported by path (``benchmarks/`` is no package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules[name]


plan_build = _sibling("plan_build")

W, G = 256, 16
CHECK_ROWS = 64
TOLERANCE = 0.05  # bf16 outputs against the float32 reference rows


def error_text(e: BaseException) -> str:
    """One line for the report, also for an exception without a message."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def longformer_mask():
    return ak.sliding_window(W) | ak.global_tokens(list(range(G)))


def useful_pairs(kind: str, N: int) -> float:
    if kind == "dense":
        return float(N) * N
    if kind == "causal":
        return N * (N + 1) / 2
    return N * (2 * W + 1) + 2 * G * N  # the anchors' count for the Longformer pattern


def reference_rows(q, k, v, mask, rows):
    """float32 reference for the sampled query rows: (B, H, r, D)."""
    rec = AttentionRecord("check", q.float(), k.float(), mask, None, None)
    w = rec.weights(rows=rows)  # (B, H, r, Nk)
    return w @ v.float()


def contenders(kind: str, N: int, D: int, H: int, dev):
    """name -> (forward fn(q, k, v) -> out, set-up seconds)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = None if kind == "dense" else ak.causal() if kind == "causal" else longformer_mask()
    out = {}
    t0 = time.perf_counter()
    plan = make_plan(mask, N, N, *default_blocks(D, torch.bfloat16), dev)
    bwd_blocks = default_blocks(D, torch.bfloat16, backward=True)
    plan_bwd = plan if bwd_blocks == (plan.block_m, plan.block_n) else make_plan(mask, N, N, *bwd_blocks, dev)
    torch.cuda.synchronize()
    out["attnkit triton"] = (lambda q, k, v: triton_attention(q, k, v, mask=mask, plan=plan, plan_bwd=plan_bwd)[0],
                             time.perf_counter() - t0)
    if kind in ("dense", "causal"):
        for name, be in (("sdpa FLASH", SDPBackend.FLASH_ATTENTION), ("sdpa CUDNN", SDPBackend.CUDNN_ATTENTION),
                         ("sdpa EFFICIENT", SDPBackend.EFFICIENT_ATTENTION)):
            def run(q, k, v, be=be):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=kind == "causal")
            out[name] = (run, 0.0)
    # one static graph per case: dynamic=False, and a fresh dynamo per case (measure), so no case
    # falls back to a dynamic-shape kernel or, past dynamo's recompile limit, to eager flex
    flex = torch.compile(flex_attention, dynamic=False)
    if kind == "longformer":
        def mod(b, h, qi, ki):
            return ((qi - ki).abs() <= W) | (qi < G) | (ki < G)
    elif kind == "causal":
        def mod(b, h, qi, ki):
            return qi >= ki
    else:
        mod = None
    t0 = time.perf_counter()
    # _compile=True: built tile by tile; without it torch materializes N x N int64 tensors (64 GiB at 64k)
    block_mask = None if mod is None else create_block_mask(mod, 1, None, N, N, device=dev, _compile=True)
    out["flex (compiled)"] = (lambda q, k, v: flex(q, k, v, block_mask=block_mask), time.perf_counter() - t0)
    return mask, out


GRAD_CHECK_N = 4096  # up to here the float32 reference's full backward fits comfortably


def reference_grads(q, k, v, mask, grad_out):
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = ak.attention(*leaves, mask=mask, impl="reference")
    return torch.autograd.grad(out, leaves, grad_out.float())


def check(fn, q, k, v, mask, rows, want, N) -> float:
    """Largest error of the output rows (and, up to GRAD_CHECK_N, of dq, dk, dv, relative to each
    gradient's largest entry); raises if past TOLERANCE."""
    got = fn(q, k, v)
    err = (got.detach()[:, :, rows.to(q.device)].float() - want).abs().max().item()
    if N <= GRAD_CHECK_N:
        grad_out = torch.randn_like(got)
        mine = torch.autograd.grad(got, (q, k, v), grad_out)
        for name, a, b in zip(("dq", "dk", "dv"), mine, reference_grads(q, k, v, mask, grad_out)):
            rel = ((a.float() - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()
            if not rel <= TOLERANCE:
                raise RuntimeError(f"{name} differs from the reference by {rel:.3g} (relative) > {TOLERANCE}: not timed")
    if not err <= TOLERANCE:
        raise RuntimeError(f"output differs from the reference by {err:.3g} > {TOLERANCE}: not timed")
    return err


def peak_gib(fn, q, k, v) -> float:
    """Memory above what is allocated now, over one forward+backward call."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(q, k, v)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def measure(kind: str, N: int, D: int, H: int, dev, rows_log: list, log_path: Path) -> None:
    from triton.testing import do_bench

    torch._dynamo.reset()  # each case compiles its own static flex graph (see contenders)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    rows = torch.linspace(0, N - 1, CHECK_ROWS).long()
    fwd_flops = 4 * H * D * useful_pairs(kind, N)
    try:
        mask, runs = contenders(kind, N, D, H, dev)
        want = reference_rows(q.detach(), k.detach(), v.detach(), mask, rows)
    except Exception as e:  # e.g. out of memory building a contender: reported, the run goes on
        runs, mask, want = {}, None, None
        entry = {"case": kind, "N": N, "D": D, "H": H, "contender": "(set-up)",
                 "error": error_text(e)}
        rows_log.append(entry)
        with log_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
    for name, (fn, setup_s) in runs.items():
        entry = {"case": kind, "N": N, "D": D, "H": H, "contender": name, "setup_s": round(setup_s, 3)}
        try:
            entry["max_err"] = check(fn, q, k, v, mask, rows, want, N)
            ms = do_bench(lambda: fn(q, k, v), warmup=25, rep=100, return_mode="median")
            grad_out = torch.randn(q.shape, device=dev, dtype=q.dtype)
            msb = do_bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out), warmup=10, rep=50,
                           return_mode="median")
            entry.update(fwd_ms=ms, fwd_tflops=fwd_flops / ms / 1e9, fwdbwd_ms=msb,
                         fwdbwd_tflops=3.5 * fwd_flops / msb / 1e9, peak_gib=peak_gib(fn, q, k, v))
        except Exception as e:  # a contender that cannot run this case is reported, not fatal
            entry["error"] = error_text(e)
        print(json.dumps(entry), flush=True)
        rows_log.append(entry)
        with log_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        torch.cuda.empty_cache()


def markdown(rows: list, device: str) -> str:
    lines = [f"# attnkit triton vs torch SDPA vs FlexAttention ({device}, bf16, B=1)", "",
             "| case | N | D | contender | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak GiB | max err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['N']} | {r['D']} | {r['contender']} | {r['error']} |||||")
            continue
        lines.append(f"| {r['case']} | {r['N']} | {r['D']} | {r['contender']} | {r['fwd_ms']:.3f} | "
                     f"{r['fwd_tflops']:.0f} | {r['fwdbwd_ms']:.3f} | {r['fwdbwd_tflops']:.0f} | "
                     f"{r['peak_gib']:.2f} | {r['max_err']:.1e} |")
    return "\n".join(lines) + "\n"


TUNE_BLOCKS = ((128, 64), (64, 64), (128, 128), (64, 128), (128, 32))
TUNE_WARPS = (4, 8)
TUNE_STAGES = (2, 3)


def tune_case(kind: str, N: int, D: int, H: int, dev, log_path: Path, dtype=torch.bfloat16) -> list:
    """attnkit at every (blocks, warps, stages): rows with fwd_ms and bwd_ms, or an error."""
    from triton.testing import do_bench

    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(q.shape, device=dev, dtype=q.dtype, generator=g)
    mask = None if kind == "dense" else ak.causal() if kind == "causal" else longformer_mask()
    rows = torch.linspace(0, N - 1, CHECK_ROWS).long()
    want = reference_rows(q.detach(), k.detach(), v.detach(), mask, rows)
    shipped = triton_configs.launch_config
    out = []
    for (bm, bn) in TUNE_BLOCKS:
        plan = make_plan(mask, N, N, bm, bn, dev)
        for warps in TUNE_WARPS:
            for stages in TUNE_STAGES:
                entry = {"case": kind, "N": N, "D": D, "H": H, "block_m": bm, "block_n": bn, "num_warps": warps,
                         "num_stages": stages}
                triton_configs.launch_config = lambda *a, w=warps, s=stages: {"num_warps": w, "num_stages": s}
                try:
                    def fn():
                        return triton_attention(q, k, v, mask=mask, plan=plan)[0]
                    err = (fn().detach()[:, :, rows.to(dev)].float() - want).abs().max().item()
                    if not err <= TOLERANCE:
                        raise RuntimeError(f"output differs from the reference by {err:.3g}")
                    fwd = do_bench(fn, warmup=10, rep=50, return_mode="median")
                    both = do_bench(lambda: torch.autograd.grad(fn(), (q, k, v), grad_out), warmup=5, rep=30,
                                    return_mode="median")
                    entry.update(max_err=err, fwd_ms=fwd, bwd_ms=both - fwd)
                except Exception as e:  # out of shared memory, registers, ...: reported
                    entry["error"] = error_text(e)
                finally:
                    triton_configs.launch_config = shipped
                print(json.dumps(entry), flush=True)
                with log_path.open("a") as f:
                    f.write(json.dumps(entry) + "\n")
                out.append(entry)
        torch.cuda.empty_cache()
    return out


def tune_markdown(rows: list, device: str) -> str:
    lines = [f"# attnkit triton tuning sweep ({device}, bf16, B=1)", ""]
    for case in dict.fromkeys((r["case"], r["N"], r["D"]) for r in rows):
        mine = [r for r in rows if (r["case"], r["N"], r["D"]) == case]
        ok = sorted((r for r in mine if "error" not in r), key=lambda r: r["fwd_ms"])
        lines += [f"## {case[0]} N={case[1]} D={case[2]}", "",
                  "| BM x BN | warps | stages | fwd ms | bwd ms |", "|---|---|---|---|---|"]
        lines += [f"| {r['block_m']} x {r['block_n']} | {r['num_warps']} | {r['num_stages']} | {r['fwd_ms']:.3f} | "
                  f"{r['bwd_ms']:.3f} |" for r in ok]
        lines += [f"| {r['block_m']} x {r['block_n']} | {r['num_warps']} | {r['num_stages']} | {r['error']} | |"
                  for r in mine if "error" in r]
        lines.append("")
    return "\n".join(lines)


KINDS = ("dense", "causal", "longformer")
LONGFORMER_NS = (4096, 16384, 65536, 262144, 1 << 20)


# -- issue 14: host overhead, plan builds, the Longformer table ---------------------------------------

OVERHEAD_NS = (128, 1024)
OVERHEAD_B, OVERHEAD_H, OVERHEAD_D = 1, 8, 64
WG_WINDOW, WG_GLOBALS = 64, (0, 1, 2, 3)
OVERHEAD_TOLERANCE = 0.05  # max |out - SDPA's| allowed before a contender is timed (bf16)
OVERHEAD_DTYPE = torch.bfloat16


def window_global_mask() -> ak.Mask:
    """The host-overhead table's structured mask: sliding_window(64) | global_tokens([0, 1, 2, 3])."""
    return ak.sliding_window(WG_WINDOW) | ak.global_tokens(list(WG_GLOBALS))


def overhead_contenders(q, k, v) -> dict:
    """name -> (call with the mask built once, call that builds its mask as a model does, the
    name of the SDPA contender computing the same function). Forward only, no autograd."""
    N, dev = q.shape[2], q.device
    causal, wg = ak.causal(), window_global_mask()
    wg_dense = wg.materialize(N, N, dev)  # (1, 1, N, N) bool

    def sdpa_causal():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def ak_call(impl, mask_of):
        return lambda: ak.attention(q, k, v, mask=mask_of(), impl=impl)
    return {
        "sdpa causal": (sdpa_causal, sdpa_causal, "sdpa causal"),
        "sdpa window+global (bool mask)": (
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=wg_dense),
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=window_global_mask().materialize(N, N, dev)),
            "sdpa window+global (bool mask)"),
        "ak auto causal": (ak_call("auto", lambda: causal), ak_call("auto", ak.causal), "sdpa causal"),
        "ak triton causal": (ak_call("triton", lambda: causal), ak_call("triton", ak.causal), "sdpa causal"),
        "ak triton window+global": (ak_call("triton", lambda: wg), ak_call("triton", window_global_mask),
                                    "sdpa window+global (bool mask)"),
        "ak auto window+global": (ak_call("auto", lambda: wg), ak_call("auto", window_global_mask),
                                  "sdpa window+global (bool mask)"),
    }


def _loop(fn, calls: int) -> None:
    for _ in range(calls):
        fn()


def per_call_ms(fn, device, rounds: int = 5, max_calls: int = 200, min_calls: int = 10,
                round_s: float = 0.15) -> tuple[float, int, list]:
    """Wall milliseconds per call: two warm-up calls (compiles, plans, caches), then ``rounds``
    loops of ``calls`` calls (as many as fit in ``round_s``, within [min_calls, max_calls]),
    synchronized around each loop and not per call, as a model's calls run back to back; the
    median of the loops' means, the calls per loop, and each loop's mean."""
    fn()
    est, _ = plan_build.wall_ms(fn, device)
    calls = max(min_calls, min(max_calls, int(round_s * 1e3 / max(est, 1e-3))))
    means = [plan_build.wall_ms(lambda: _loop(fn, calls), device)[0] / calls for _ in range(rounds)]
    return statistics.median(means), calls, [round(m, 5) for m in means]


def host_overhead(device, dtype=torch.bfloat16, ns=OVERHEAD_NS, on_row=print, deadline: float | None = None,
                  **timing) -> list:
    """The host-overhead rows: every contender of ``overhead_contenders`` at each N, mask reused
    and rebuilt; each output checked against its SDPA counterpart before it is timed. ``timing``
    goes to ``per_call_ms``. Ratios are added by ``overhead_ratios``."""
    rows = []
    for N in ns:
        g = torch.Generator(device=device).manual_seed(N)
        q, k, v = (torch.randn(OVERHEAD_B, OVERHEAD_H, N, OVERHEAD_D, device=device, dtype=dtype, generator=g)
                   for _ in range(3))
        with torch.no_grad():
            runs = overhead_contenders(q, k, v)
            want = {name: reused().float() for name, (reused, _, same) in runs.items() if name == same}
            for name, (reused, rebuilt, same) in runs.items():
                auto = ak.explain(q, k, v, mask=window_global_mask() if "window" in name else ak.causal()).chosen
                for mode, fn in (("reused", reused), ("rebuilt", rebuilt)):
                    row = {"step": "overhead", "contender": name, "mask_mode": mode, "N": N, "B": OVERHEAD_B,
                           "H": OVERHEAD_H, "D": OVERHEAD_D, "dtype": str(dtype).replace("torch.", ""),
                           "baseline": same}
                    if name.startswith("ak auto"):
                        row["auto_picks"] = auto
                    if deadline is not None and time.monotonic() > deadline:
                        row["error"] = "skipped: time limit"
                    else:
                        try:
                            err = (fn().float() - want[same]).abs().max().item()
                            row["max_err_vs_sdpa"] = err
                            if not err <= OVERHEAD_TOLERANCE:
                                raise RuntimeError(f"output differs from {same} by {err:.3g}: not timed")
                            ms, calls, means = per_call_ms(fn, device, **timing)
                            row.update(ms_per_call=ms, calls_per_loop=calls, loop_means_ms=means)
                        except Exception as e:  # reported, and the table goes on
                            row["error"] = error_text(e)
                    rows.append(row)
                    on_row(row)
    return overhead_ratios(rows)


def overhead_ratios(rows: list) -> list:
    """Adds to each timed row its ratio to SDPA causal and to the SDPA call of the same mask
    (same N and mask mode)."""
    ms = {(r["contender"], r["mask_mode"], r["N"]): r.get("ms_per_call") for r in rows}
    for r in rows:
        if r.get("ms_per_call") is None:
            continue
        for key, base in (("ratio_to_sdpa_causal", "sdpa causal"), ("ratio_to_sdpa_same_mask", r["baseline"])):
            b = ms.get((base, r["mask_mode"], r["N"]))
            r[key] = r["ms_per_call"] / b if b else None
    return rows


def overhead_markdown(rows: list) -> str:
    """The host-overhead table; ratios worked out here too, so a table written mid-run has them."""
    def ratio(x):
        return "-" if x is None else f"{x:.2f}x"

    def cell(r):
        if r is None:
            return ""
        if "error" in r:
            return r["error"]
        same = "" if r["baseline"] == "sdpa causal" else f", {ratio(r['ratio_to_sdpa_same_mask'])} same-mask SDPA"
        return f"{r['ms_per_call']:.4f} ms ({ratio(r['ratio_to_sdpa_causal'])}{same})"
    rows = overhead_ratios([dict(r) for r in rows])
    by = {(r["contender"], r["mask_mode"], r["N"]): r for r in rows}
    lines = [f"Wall time per call, B={OVERHEAD_B}, H={OVERHEAD_H}, D={OVERHEAD_D}, forward without autograd; "
             "median of the loop means, synchronized around each loop and not per call; (ratio to SDPA causal, and to SDPA with the same "
             "mask as a bool tensor). window+global = sliding_window(64) | global_tokens([0, 1, 2, 3]).", "",
             "| N | contender | auto picks | mask reused | mask rebuilt per call |", "|---|---|---|---|---|"]
    for name, _, N in dict.fromkeys((r["contender"], 0, r["N"]) for r in rows):
        reused, rebuilt = by.get((name, "reused", N)), by.get((name, "rebuilt", N))
        picks = (reused or rebuilt or {}).get("auto_picks", "")
        lines.append(f"| {N} | {name} | {picks} | {cell(reused)} | {cell(rebuilt)} |")
    return "\n".join(lines) + "\n"


ISSUE14_STEPS = ("tests", "overhead", "plans", "longformer")
ISSUE14_LIMITS_S = {"tests": 120, "overhead": 40, "plans": 90, "longformer": 120}  # soft: no new case after
GPU_TESTS = ("tests/test_triton.py", "tests/test_block_plan.py", "tests/test_numerics.py")
PLAN_NS = (4096, 16384, 65536, 262144, 1 << 20)
PLAN_MASKS = ("longformer", "docs512", "causal_window", "causal", "docs1", "docs8", "docs64")  # acceptance first
PLAN_CACHE_N = 65536
REPO = Path(__file__).resolve().parents[1]


class Issue14Report:
    """``issue14.json`` (meta and each step's rows), ``issue14.md`` and ``issue14_rows.jsonl`` in
    ``out``, rewritten after every row; a step run in another process adds to the same files."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        path = out / "issue14.json"
        self.doc = json.loads(path.read_text()) if path.exists() else {"meta": dict(meta), "steps": {}}
        self.doc["meta"].setdefault("runs", []).append(dict(meta))  # one entry per process (step)

    def start(self, step: str, **info) -> None:
        self.doc["steps"][step] = {"info": {"started": datetime.now(UTC).isoformat(timespec="seconds"), **info},
                                   "rows": []}
        self.write()

    def add(self, step: str, row: dict, log: bool = True) -> None:
        self.doc["steps"][step]["rows"].append(row)
        if log:
            with (self.out / "issue14_rows.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, **row}) + "\n")
        print(f"[{step}] {json.dumps(row)}", flush=True)
        self.write()

    def finish(self, step: str, rows: list | None = None, **info) -> None:
        if rows is not None:
            self.doc["steps"][step]["rows"] = rows
        self.doc["steps"][step]["info"].update(finished=datetime.now(UTC).isoformat(timespec="seconds"), **info)
        self.write()

    def write(self) -> None:
        (self.out / "issue14.json").write_text(json.dumps(self.doc, indent=1) + "\n")
        (self.out / "issue14.md").write_text(issue14_markdown(self.doc))


def issue14_markdown(doc: dict) -> str:
    meta, steps = doc["meta"], doc["steps"]
    lines = [f"# Issue 14 on {meta.get('device')}: {meta.get('date')}", "",
             f"torch {meta.get('torch')}, triton {meta.get('triton')}, attnkit {meta.get('attnkit_commit')}.", ""]
    for step in ISSUE14_STEPS:
        if step not in steps:
            continue
        info, rows = steps[step]["info"], steps[step]["rows"]
        lines += [f"## {step}", "", "`" + json.dumps(info) + "`", ""]
        if step == "tests":
            lines += ["```", *info.get("tail", "").splitlines()[-15:], "```", ""]
        elif step == "overhead" and rows:
            lines.append(overhead_markdown(rows))
        elif step == "plans" and rows:
            lines.append(plan_build.markdown({}, rows, body_only=True))
        elif step == "longformer" and rows:
            lines.append(markdown(rows, meta.get("device", "?")).split("\n", 2)[2])
    return "\n".join(lines) + "\n"


def run_child(cmd: list, env: dict, timeout_s: float) -> tuple:
    """(return code or "timeout", its stdout and stderr) of a command run in the repository, in its
    own process group: at the timeout, or if this process is stopped meanwhile, the whole group is
    killed (pytest-xdist's workers too), so nothing keeps the GPU busy under the next step."""
    child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        out = child.communicate(timeout=timeout_s)[0]
        return child.returncode, out
    except subprocess.TimeoutExpired:
        _kill_group(child)
        return "timeout", (child.communicate()[0] or "") + f"\n(stopped after {timeout_s} s)"
    finally:
        if child.poll() is None:
            _kill_group(child)


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def step_tests(report: Issue14Report, limit_s: float) -> None:
    """The gpu-marked tests of GPU_TESTS in a child pytest (5 workers where pytest-xdist is
    there), stopped after ``limit_s``; the log goes to issue14_pytest.log."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE", *GPU_TESTS]
    if importlib.util.find_spec("xdist") is not None:  # one worker per test: the 3 dtypes' case tables compile apart
        cmd += ["-n", "5"]
    env = {**os.environ}
    env["PYTHONPATH"] = str(REPO / "src") + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    report.start("tests", command=" ".join(cmd[1:]))
    t0 = time.monotonic()
    rc, text = run_child(cmd, env, limit_s)
    (report.out / "issue14_pytest.log").write_text(text)
    report.finish("tests", returncode=rc, wall_s=round(time.monotonic() - t0, 1), tail=text[-3000:])
    print(text[-3000:], flush=True)


def step_overhead(report: Issue14Report, device, limit_s: float) -> None:
    """``host_overhead`` at OVERHEAD_NS in bfloat16."""
    report.start("overhead", ns=list(OVERHEAD_NS), dtype=str(OVERHEAD_DTYPE))
    rows = host_overhead(device, OVERHEAD_DTYPE, ns=OVERHEAD_NS, on_row=lambda r: report.add("overhead", r),
                         deadline=time.monotonic() + limit_s)
    report.finish("overhead", rows)


def _raise_recompile_limits() -> None:
    """Flex's create_block_mask recompiles per mask_mod and once more when N goes dynamic; the
    default limit (8) would send the later masks to eager mode, which materializes N x N."""
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


def step_plans(report: Issue14Report, device, limit_s: float) -> None:
    """``plan_build.run`` on ``device`` at PLAN_NS for PLAN_MASKS, Flex beside, cache hits at PLAN_CACHE_N."""
    ns, masks = PLAN_NS, PLAN_MASKS
    report.start("plans", ns=list(ns), masks=list(masks))
    _raise_recompile_limits()
    rows = plan_build.run(ns, masks, plan_build.default_blocks(), torch.device(device), reps=5, budget_s=2.0,
                          flex=True, cache_n=PLAN_CACHE_N, cache_calls=200, on_row=lambda r: report.add("plans", r),
                          deadline=time.monotonic() + limit_s)
    report.finish("plans", rows)


def step_longformer(report: Issue14Report, device, limit_s: float) -> None:
    """``measure`` at each of LONGFORMER_NS (attnkit triton and compiled Flex, fwd and fwd+bwd);
    no new N past the limit."""
    ns = LONGFORMER_NS
    report.start("longformer", ns=list(ns))
    deadline, rows = time.monotonic() + limit_s, _Reported(report, "longformer")
    for N in ns:
        if time.monotonic() > deadline:
            rows.append({"case": "longformer", "N": N, "D": 64, "H": 12, "contender": "(all)",
                         "error": "skipped: time limit"})
            continue
        measure("longformer", N, 64, 12, device, rows, Path(os.devnull))  # rows reach the report as measured


class _Reported(list):
    """A list of rows that hands each appended row to the report (``measure`` appends them)."""

    def __init__(self, report: Issue14Report, step: str):
        super().__init__()
        self.report, self.step = report, step

    def append(self, row: dict) -> None:
        super().append(row)
        self.report.add(self.step, row)


def _exit_on_term(signum, frame) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def issue14(out: Path, steps=ISSUE14_STEPS, device=None, limits: dict | None = None) -> int:
    """Run the steps of issue 14 in order (module docstring)."""
    device = torch.device(device or "cuda")
    limits = {**ISSUE14_LIMITS_S, **(limits or {})}
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "steps": list(steps), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "attnkit_commit": plan_build._commit(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "cpu_model": plan_build.cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0]}
    report = Issue14Report(out, meta)
    signal.signal(signal.SIGTERM, _exit_on_term)  # `timeout` stops a step: its pytest child goes with it
    for step in steps:
        t0 = time.monotonic()
        print(f"== issue14 step {step} (soft limit {limits[step]} s)", flush=True)
        try:
            if step == "tests":
                step_tests(report, limits[step])
            elif step == "overhead":
                step_overhead(report, device, limits[step])
            elif step == "plans":
                step_plans(report, device, limits[step])
            elif step == "longformer":
                step_longformer(report, device, limits[step])
        except Exception as e:  # one step failing leaves the others to run
            report.doc["steps"].setdefault(step, {"info": {}, "rows": []})
            report.finish(step, error=error_text(e))
            print(f"issue14 step {step} failed: {error_text(e)}", flush=True)
        print(f"== issue14 step {step} took {time.monotonic() - t0:.1f} s", flush=True)
    print(issue14_markdown(report.doc), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; list options are comma-separated (``--ns 65536,131072``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N up to 4096 only")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"),
                   help="directory for the JSON, .jsonl and markdown; created if missing, before any case "
                        "(default benchmarks/results)")
    p.add_argument("--tune", action="store_true", help="sweep attnkit's blocks, warps and stages instead")
    p.add_argument("--acceptance", action="store_true",
                   help="only the issue's acceptance cases: Longformer N=65536, dense D=128 N=16384, causal D=64 N=16384")
    p.add_argument("--kinds", metavar="KIND,...", type=CommaList(str), default=KINDS,
                   help="subset of the cases, comma-separated, from {" + ",".join(KINDS) + "} (default all)")
    p.add_argument("--ns", metavar="N,...", type=CommaList(int), default=None,
                   help="sequence lengths, comma-separated, instead of each kind's defaults")
    p.add_argument("--ds", metavar="D,...", type=CommaList(int), default=(64, 128),
                   help="head dims of the dense and causal cases, comma-separated (default 64,128)")
    p.add_argument("--issue14", action="store_true",
                   help="issue 14's run instead: tests, host overhead, plan builds beside Flex, the Longformer table "
                        "(issue14.json / .md / _rows.jsonl in --out, written as it goes)")
    p.add_argument("--step", action="append", choices=ISSUE14_STEPS, default=None,
                   help="with --issue14: run only this step (repeat for several; default all, in order: "
                        + ", ".join(ISSUE14_STEPS) + ")")
    p.add_argument("--limit-s", type=float, default=None,
                   help="with --issue14: each step's soft time limit in seconds, after which it starts no new case "
                        f"(default per step: {ISSUE14_LIMITS_S})")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if unknown := sorted(set(args.kinds) - set(KINDS)):
        p.error(f"--kinds: unknown {unknown}; choose from {', '.join(KINDS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # before any work (and before the device check): rows are appended to it as they are measured
        out = prepare_output_dir(args.out, "--out")
    except OutputPathError as e:
        print(f"gpu.py: error: {e}", file=sys.stderr)
        return 2
    kinds = args.kinds
    ns = args.ns or None
    dense_n = ns or ((1024, 4096) if args.quick else (1024, 4096, 16384))
    lf_n = ns or ((4096,) if args.quick else LONGFORMER_NS)
    cases = [(kind, N, D, 16) for kind in ("dense", "causal") if kind in kinds
             for D in args.ds for N in dense_n]
    cases += [("longformer", N, 64, 12) for N in lf_n if "longformer" in kinds]
    if args.acceptance:
        cases = [("longformer", 65536, 64, 12), ("dense", 16384, 128, 16), ("causal", 16384, 64, 16)]
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device")
    if args.issue14:
        limits = None if args.limit_s is None else {step: args.limit_s for step in ISSUE14_STEPS}
        return issue14(out, tuple(args.step or ISSUE14_STEPS), limits=limits)
    dev = torch.device("cuda")
    device = torch.cuda.get_device_name(dev)
    rows: list = []
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M")
    log_path = out / f"gpu_{stamp}.jsonl"
    if args.tune:
        cases = ([("longformer", 4096, 64, 12)] if args.quick else
                 [("longformer", 65536, 64, 12), ("dense", 16384, 128, 16), ("causal", 16384, 64, 16)])
        rows = [r for case in cases for r in tune_case(*case, dev, out / f"tune_{stamp}.jsonl")]
        (out / f"tune_{stamp}.json").write_text(json.dumps({"device": device, "date": stamp, "rows": rows}, indent=1))
        (out / f"tune_{stamp}.md").write_text(tune_markdown(rows, device))
        print(tune_markdown(rows, device))
        return 0
    for kind, N, D, H in cases:
        measure(kind, N, D, H, dev, rows, log_path)
    meta = {"date": stamp, "device": device, "torch": torch.__version__, "triton": __import__("triton").__version__}
    (out / f"gpu_{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"gpu_{stamp}.md").write_text(markdown(rows, device))
    print(markdown(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
