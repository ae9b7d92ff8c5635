"""attnkit's Triton kernels beside torch SDPA (FLASH, cuDNN, EFFICIENT) and FlexAttention, on one GPU.

    python benchmarks/gpu.py                  # the whole table (several minutes on an H100)
    python benchmarks/gpu.py --quick          # small sizes only: a smoke test of the script
    python benchmarks/gpu.py --out DIR        # where the JSON and markdown go (default benchmarks/results)
    python benchmarks/gpu.py --tune           # sweep attnkit's Triton configs per pass (--limit-s: soft limit)
    python benchmarks/gpu.py --acceptance     # only the three cases of issue 6's acceptance
    python benchmarks/gpu.py --kinds longformer --ns 65536,131072   # a subset (one device call is 10 min)
    python benchmarks/gpu.py --issue14 --out DIR   # issue 14's tables in one short run (benchmarks/gpu_issue14.sh)
    python benchmarks/gpu.py --issue15 --out DIR   # tests, tune, compare, longformer (benchmarks/gpu_issue15.sh)

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

``--tune`` (issue 15) times attnkit alone, each pass apart, on the acceptance cases (bf16, B=1: dense
D=128 N=16k H=16, causal D=64 N=16k H=16, Longformer D=64 H=12 at N=64k, or the N of ``--ns``, e.g.
1048576). Candidates: forward blocks TUNE_FWD_BLOCKS x warps x stages x tma; backward blocks
TUNE_BWD_BLOCKS x warps x stages x {plain, delta="fused", dq="atomic"} x tma. A candidate is applied
as the library would apply a pasted row: ``table_rows`` puts it into ``configs.TABLE`` at (pass,
"half", D, mask kind) for the call (and restores the table afterwards, also on error), the call gets
explicit plans (``make_plan`` at the candidate's blocks for its pass, the shipped row's for the
other) and the table's ``schedule=``. The forward is timed alone; the backward as fwd+bwd minus fwd
of the same call (forward at the shipped row). Before timing, each candidate is checked: its output
on 64 sampled rows against the float32 reference (TOLERANCE); for the backward also dq on those rows
against the float32 reference (``reference_dq_rows``) and dk, dv against the shipped row's (each
relative to the reference's largest entry; the shipped row's own only checked finite). Order: the
shipped row first, then ``prior`` (rows estimated to fit sm_90's shared memory first, the shipped
row's neighbours first). The soft limit (``--limit-s``, default TUNE_LIMIT_S) is shared by the (case, pass) slices
(TUNE_SHARE, leftovers passed on); no candidate starts after its slice's deadline. Then the shipped
row is timed again (spread = the difference of its two times, at least MIN_SPREAD of it) and the
fastest candidate again (counted at its slower time): it wins when that beats the shipped mean by
more than the spread. An error (compile failure, out of shared memory, a wrong result) is a row; a
broken CUDA context stops the sweep. Rows are written as they come (``tune_rows.jsonl``,
``tune.json``, ``tune.md`` fastest first per case and pass) with ``tune_table.py``: each winner as a
``configs.TABLE`` row, ``source="timed: <device>, <UTC date>, benchmarks/gpu.py --tune, <ms> vs
shipped <ms>"``, to paste into configs.py (and ``ROWS`` to import).

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

``--issue15`` runs issue 15's steps the same way (``--step``, ``--limit-s`` per step, ISSUE15_LIMITS_S),
writing ``issue15.json`` / ``.md`` / ``_rows.jsonl`` / ``_pytest.log`` and ``tune_table.py`` in ``--out``:
- ``tests``: the gpu-marked tests of GPU_TESTS (the case table per dtype and Schedule on CUDA);
- ``tune``: the ``--tune`` sweep above, its rows in issue15.json, its winners in tune_table.py; the
  switches whose bf16 case-table test failed in ``tests`` are left out (``failed_switches``);
- ``compare``: the three acceptance cases side by side (``measure``): attnkit with the shipped rows,
  attnkit with tune_table.py's ROWS in the table ("attnkit triton (tuned)"), SDPA FLASH and cuDNN,
  compiled Flex; fwd and fwd+bwd TFLOP/s;
- ``longformer``: issue 14's Longformer table, with the time left.
``--issue15 --summary`` prints the short tables of a run (no GPU); ``benchmarks/gpu_issue15.sh``
runs the four steps under ``timeout`` in one device call of at most 9 minutes and prints them last.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import re
import runpy
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit as ak
from attnkit.bench.cpu import CommaList
from attnkit.cli._paths import OutputPathError, prepare_output_dir
from attnkit.ops.block_plan import make_plan
from attnkit.ops.triton import configs as triton_configs
from attnkit.ops.triton.configs import Config, Schedule, default_blocks
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


def case_mask(kind: str):
    """The attnkit mask of a case: none (dense), ``ak.causal()`` or the Longformer pattern."""
    return None if kind == "dense" else ak.causal() if kind == "causal" else longformer_mask()


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


def reference_dq_rows(q, k, v, mask, rows, grad_out, scale: float | None = None):
    """float32 dq (B, H, r, D) of the sampled query rows for the loss sum(out * grad_out), from
    those rows' probabilities alone (FlashAttention-2, Algorithm 2): dq_i = scale sum_j
    P_ij (dP_ij - delta_i) k_j with dP_ij = dO_i . v_j and delta_i = dO_i . out_i. (dk and dv need
    every row's probabilities: no such shortcut.) q, k, v (B, H, N, D), rows (r,) long."""
    p = AttentionRecord("check", q.float(), k.float(), mask, None, None).weights(rows=rows)  # (B, H, r, Nk)
    vf = v.float()
    out = p @ vf  # (B, H, r, D)
    dout = grad_out[:, :, rows.to(grad_out.device)].float()  # (B, H, r, D)
    dp = dout @ vf.transpose(-1, -2)  # (B, H, r, Nk)
    delta = (dout * out).sum(-1, keepdim=True)  # (B, H, r, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return scale * (p * (dp - delta)) @ k.float()  # (B, H, r, D)


@contextmanager
def table_rows(rows: dict):
    """``attnkit.ops.triton.configs.TABLE`` with ``rows`` ((pass, dtype class, D, mask kind) ->
    Config) in place inside the block; afterwards the table holds exactly what it held before,
    also when the block raises (the same dict object: the library reads it per call)."""
    table = triton_configs.TABLE
    saved = dict(table)
    try:
        table.update(rows)
        yield table
    finally:
        table.clear()
        table.update(saved)


def attnkit_contender(mask, N: int, D: int, dev, rows: dict | None = None):
    """(fn(q, k, v) -> out, set-up seconds) of attnkit's Triton kernels as the library runs them
    with ``rows`` in ``configs.TABLE`` (``table_rows``; none: the shipped table): plans built here at
    the blocks the table gives the mask's kind, and every call made with the rows in place (the
    launch settings and the schedule are looked up per call)."""
    kind, rows = triton_configs.mask_kind(mask), rows or {}
    t0 = time.perf_counter()
    with table_rows(rows):
        fwd_blocks = default_blocks(D, torch.bfloat16, kind=kind)
        bwd_blocks = default_blocks(D, torch.bfloat16, backward=True, kind=kind)
    plan = make_plan(mask, N, N, *fwd_blocks, dev)
    plan_bwd = plan if bwd_blocks == fwd_blocks else make_plan(mask, N, N, *bwd_blocks, dev)
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()

    def run(q, k, v):
        with table_rows(rows) if rows else nullcontext():  # the shipped contender: the library's call as is
            return triton_attention(q, k, v, mask=mask, plan=plan, plan_bwd=plan_bwd)[0]
    return run, time.perf_counter() - t0


SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
SDPA_NAMES = {"FLASH_ATTENTION": "sdpa FLASH", "CUDNN_ATTENTION": "sdpa CUDNN", "EFFICIENT_ATTENTION": "sdpa EFFICIENT"}


def _no_tuned_row(q, k, v):
    raise RuntimeError("no tuned row for this case (D, mask kind): the shipped rows were the fastest measured")


def contenders(kind: str, N: int, D: int, H: int, dev, tuned: dict | None = None, sdpa=SDPA_BACKENDS):
    """name -> (forward fn(q, k, v) -> out, set-up seconds). ``tuned``: TABLE rows (a tune_table.py's
    ROWS) for an "attnkit triton (tuned)" contender beside the shipped one (None: no such contender;
    rows that miss this case's keys: a row saying so); ``sdpa``: the SDPBackend names timed (dense,
    causal)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = case_mask(kind)
    out = {"attnkit triton": attnkit_contender(mask, N, D, dev)}
    if tuned is not None:
        mine = {key: row for key, row in tuned.items()
                if key[1:] == (triton_configs.dtype_class(torch.bfloat16), D, triton_configs.mask_kind(mask))}
        out["attnkit triton (tuned)"] = attnkit_contender(mask, N, D, dev, mine) if mine else (_no_tuned_row, 0.0)
    if kind in ("dense", "causal"):
        for name in sdpa:
            def run(q, k, v, be=getattr(SDPBackend, name)):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=kind == "causal")
            out[SDPA_NAMES[name]] = (run, 0.0)
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


def measure(kind: str, N: int, D: int, H: int, dev, rows_log: list, log_path: Path, **contender_kw) -> None:
    """Every contender of one case (``contenders``, which takes ``contender_kw``): checked, then
    timed fwd and fwd+bwd; each row appended to ``rows_log`` and ``log_path`` as it is measured."""
    from triton.testing import do_bench

    torch._dynamo.reset()  # each case compiles its own static flex graph (see contenders)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    rows = torch.linspace(0, N - 1, CHECK_ROWS).long()
    fwd_flops = 4 * H * D * useful_pairs(kind, N)
    try:
        mask, runs = contenders(kind, N, D, H, dev, **contender_kw)
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


# -- tuning (issue 15): each pass's candidates timed on the acceptance cases; winners as TABLE rows --

TUNE_CASES = (("dense", 16384, 128, 16), ("causal", 16384, 64, 16), ("longformer", 65536, 64, 12))
TUNE_FWD_BLOCKS = ((128, 64), (128, 128), (64, 64), (64, 128))
TUNE_FWD_WARPS = (4, 8)
TUNE_FWD_STAGES = (2, 3, 4)
TUNE_BWD_BLOCKS = ((64, 128), (64, 64), (128, 64), (128, 128))
TUNE_BWD_WARPS = (4, 8)
TUNE_BWD_STAGES = (1, 2, 3)
TUNE_BWD_SCHEDULES = ({}, {"delta": "fused"}, {"dq": "atomic"})  # plain, delta in _bwd_dq, dq by atomics
TUNE_TMA = (False, True)
MAIN_KERNEL = {"fwd": "_fwd", "bwd": "_bwd_dkdv"}  # whose (warps, stages) a candidate's label shows
TUNE_LIMIT_S = 240.0  # --tune's default soft limit: no candidate starts after it
TUNE_SHARE = {"fwd": 1.0, "bwd": 2.0}  # each slice's part of the limit: a backward candidate compiles 3 kernels
TUNE_WARMUP_MS, TUNE_REP_MS = 10, 60  # do_bench per timing: each candidate compiles anew, compiles dominate
MIN_SPREAD = 0.01  # the spread counted is at least this fraction of the shipped time (two medians may agree by chance)
SMEM_BYTES = 227 * 1024  # sm_90's shared memory per block (H100, H200): candidates estimated above go last
CANDIDATE_SOURCE = "benchmarks/gpu.py --tune: a candidate being timed"


@dataclass(frozen=True)
class Candidate:
    """One pass's TABLE row to time (``config``); ``shipped``: the row the table holds now."""

    pass_: str
    config: Config
    shipped: bool = False

    def label(self) -> str:
        c = self.config
        warps, stages = c.launch[MAIN_KERNEL[self.pass_]]
        return f"{c.block_m}x{c.block_n} {warps}w {stages}s {c.schedule.spec() or 'plain'}"


def sweep_configs(pass_: str, shipped: Config) -> list[Config]:
    """Every candidate row of ``pass_`` (TUNE_FWD_* x TUNE_TMA; TUNE_BWD_* x TUNE_BWD_SCHEDULES x
    TUNE_TMA): the backward's candidates give _bwd_dq and _bwd_dkdv the same (warps, stages) and keep
    the shipped row's _bwd_delta launch; the switches not swept (gqa, warp_specialize) stay the
    shipped row's."""
    if pass_ == "fwd":
        return [Config(bm, bn, {"_fwd": (w, s)}, replace(shipped.schedule, tma=t), CANDIDATE_SOURCE)
                for (bm, bn), w, s, t in itertools.product(TUNE_FWD_BLOCKS, TUNE_FWD_WARPS, TUNE_FWD_STAGES, TUNE_TMA)]
    delta = shipped.launch["_bwd_delta"]
    return [Config(bm, bn, {"_bwd_delta": delta, "_bwd_dq": (w, s), "_bwd_dkdv": (w, s)},
                   replace(shipped.schedule, **{"dq": "separate", "delta": "kernel", "tma": t, **switches}),
                   CANDIDATE_SOURCE)
            for (bm, bn), w, s, switches, t in itertools.product(TUNE_BWD_BLOCKS, TUNE_BWD_WARPS, TUNE_BWD_STAGES,
                                                                   TUNE_BWD_SCHEDULES, TUNE_TMA)]


def _same_choices(a: Config, b: Config) -> bool:
    return (a.block_m, a.block_n, a.launch, a.schedule) == (b.block_m, b.block_n, b.launch, b.schedule)


def distance(pass_: str, config: Config, shipped: Config) -> int:
    """How many choices differ from the shipped row: the blocks, warps, stages, each switch."""
    (w, s), (w0, s0) = config.launch[MAIN_KERNEL[pass_]], shipped.launch[MAIN_KERNEL[pass_]]
    return (int((config.block_m, config.block_n) != (shipped.block_m, shipped.block_n)) + int(w != w0) + int(s != s0)
            + sum(getattr(config.schedule, f.name) != getattr(shipped.schedule, f.name) for f in fields(Schedule)))


def smem_estimate(pass_: str, config: Config, D: int, elem_bytes: int = 2) -> int:
    """Rough shared memory (bytes) of the pass's largest kernel: the tiles it holds once plus
    ``stages`` copies of those it streams (forward: Q held, K and V streamed; dk/dv: K, V held, Q and
    dO streamed; dq: the other way round). No softmax or layout scratch: a prior, not a limit."""
    stages = config.launch[MAIN_KERNEL[pass_]][1]
    bm, bn = config.block_m, config.block_n
    if pass_ == "fwd":
        return elem_bytes * D * (bm + 2 * stages * bn)
    return elem_bytes * D * max(2 * bn + 2 * stages * bm, 2 * bm + 2 * stages * bn)


def prior(pass_: str, config: Config, shipped: Config, D: int) -> tuple:
    """The sweep's order (a cheap guess, no GPU): rows estimated to fit sm_90's shared memory
    first; among them the shipped row's neighbours first (fewest choices changed: the shipped rows
    compile without spills, so a neighbour most likely does too, and each choice's effect shows
    alone before a budget cut); then the larger estimated shared memory first (the shipped rows use
    little of Hopper's 227 KiB: deeper pipelines and larger tiles are where its headroom goes)."""
    smem = smem_estimate(pass_, config, D)
    return smem > SMEM_BYTES, distance(pass_, config, shipped), -smem, Candidate(pass_, config).label()


def excluded(config: Config, exclude) -> bool:
    """Whether the row turns on a switch of ``exclude`` ((field, value) pairs of Schedule)."""
    return any(getattr(config.schedule, name) == value for name, value in exclude)


def candidates(pass_: str, shipped: Config, D: int, exclude=()) -> list[Candidate]:
    """The shipped row first, then ``sweep_configs`` without it and without the rows that turn on
    a switch of ``exclude`` ((field, value) pairs), in ``prior``'s order."""
    swept = sorted((c for c in sweep_configs(pass_, shipped) if not _same_choices(c, shipped)
                    and not excluded(c, exclude)), key=lambda c: prior(pass_, c, shipped, D))
    return [Candidate(pass_, shipped, shipped=True), *(Candidate(pass_, c) for c in swept)]


# The GPU tests' ids of the switches the sweep turns on (tests/test_triton.py, test_case_table_on_the_gpu)
SWITCH_TESTS = {"atomic-dq": ("dq", "atomic"), "fused-delta": ("delta", "fused"), "tma": ("tma", True)}


def failed_switches(pytest_text: str, dtype: str = "bfloat16") -> list:
    """The (field, value) switches whose case-table test failed (or errored) on the GPU in
    ``dtype``, from pytest's -rfE summary: the sweep leaves them out (a kernel that faults breaks
    the CUDA context, and every later candidate with it)."""
    failed = re.findall(r"^(?:FAILED|ERROR) \S*test_case_table_on_the_gpu\[torch\." + dtype + r"-([\w-]+)\]",
                        pytest_text, re.M)
    return [SWITCH_TESTS[name] for name in dict.fromkeys(failed) if name in SWITCH_TESTS]


class TuneBudget:
    """A soft time limit shared by the (case, pass) slices still to run, in proportion to TUNE_SHARE
    (a slice that ends early leaves its time to the later ones); ``lost``: why no candidate may start
    any more (the CUDA context broke)."""

    def __init__(self, passes: list, limit_s: float, clock=time.monotonic):
        self.left, self.clock = list(passes), clock
        self.end = clock() + limit_s
        self.lost: str | None = None

    def deadline(self, pass_: str) -> float:
        """When the next slice, one of ``pass_``, starts its last candidate (called as it starts)."""
        now, shares = self.clock(), sum(TUNE_SHARE[p] for p in self.left)
        self.left.remove(pass_)
        return now + max(0.0, self.end - now) * TUNE_SHARE[pass_] / shares


class TuneInputs:
    """One case's inputs (B=1, fixed seed), its float32 reference rows, its plans by blocks and the
    shipped rows, shared by all its candidates."""

    def __init__(self, case: str, N: int, D: int, H: int, dev, dtype=torch.bfloat16):
        self.case, self.N, self.D, self.H, self.dev, self.dtype = case, N, D, H, torch.device(dev), dtype
        g = torch.Generator(device=self.dev).manual_seed(0)
        self.q, self.k, self.v = (torch.randn(1, H, N, D, device=self.dev, dtype=dtype, generator=g).requires_grad_()
                                  for _ in range(3))
        self.grad_out = torch.randn(1, H, N, D, device=self.dev, dtype=dtype, generator=g)
        self.mask = case_mask(case)
        self.kind = triton_configs.mask_kind(self.mask)
        self.rows = torch.linspace(0, N - 1, CHECK_ROWS).long()
        q, k, v = (t.detach() for t in (self.q, self.k, self.v))
        self.want = reference_rows(q, k, v, self.mask, self.rows)  # (1, H, r, D)
        self.want_dq = reference_dq_rows(q, k, v, self.mask, self.rows, self.grad_out)  # (1, H, r, D)
        self.shipped = {p: triton_configs.lookup(p, D, dtype, self.kind) for p in triton_configs.PASSES}
        self.shipped_grads = None  # (dk, dv) of the shipped backward, once it has run
        self._plans: dict = {}

    def key(self, pass_: str) -> tuple:
        return pass_, triton_configs.dtype_class(self.dtype), self.D, self.kind

    def info(self, pass_: str) -> dict:
        return {"case": self.case, "N": self.N, "D": self.D, "H": self.H,
                "dtype": str(self.dtype).replace("torch.", ""), "mask_kind": self.kind, "pass": pass_}

    def plan(self, config: Config):
        blocks = (config.block_m, config.block_n)
        if blocks not in self._plans:
            self._plans[blocks] = make_plan(self.mask, self.N, self.N, *blocks, self.dev)
        return self._plans[blocks]

    def call(self, cand: Candidate):
        """(fn() -> out, schedule): one call as the library makes it with the candidate's row in
        TABLE (call inside ``table_rows``): explicit plans, at the candidate's blocks for its pass
        and the shipped row's for the other, and the table's schedule (``default_schedule``: one per
        call, so a backward candidate's tma reaches the forward too)."""
        rows = {**self.shipped, cand.pass_: cand.config}
        plan, plan_bwd = self.plan(rows["fwd"]), self.plan(rows["bwd"])
        schedule = triton_configs.default_schedule(self.D, self.dtype, self.kind)

        def fn():
            return triton_attention(self.q, self.k, self.v, mask=self.mask, plan=plan, plan_bwd=plan_bwd,
                                    schedule=schedule)[0]
        return fn, schedule


def relative_err(a, b) -> float:
    """max |a - b| / max |b| in float32 (NaN stays NaN)."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()


def check_candidate(cand: Candidate, case: TuneInputs, fn) -> dict:
    """The checks before timing; raises on a miss (NaN misses). The output's sampled rows against the
    float32 reference (max abs error <= TOLERANCE). The backward also: dq on the sampled rows against
    the float32 reference (``reference_dq_rows``), and dk, dv against the shipped row's (each
    relative to the reference's largest entry, <= TOLERANCE); the shipped row's own dk, dv are only
    checked finite (as is every candidate's when the shipped backward failed)."""
    out = fn()
    errs = {"max_err": (out.detach()[:, :, case.rows.to(out.device)].float() - case.want).abs().max().item()}
    if cand.pass_ == "bwd":
        dq, dk, dv = torch.autograd.grad(out, (case.q, case.k, case.v), case.grad_out)
        errs["dq_rows_err"] = relative_err(dq[:, :, case.rows.to(dq.device)], case.want_dq)
        if cand.shipped and case.shipped_grads is None:
            case.shipped_grads = (dk.detach(), dv.detach())
        if case.shipped_grads is not None and not cand.shipped:
            errs["dk_vs_shipped"] = relative_err(dk, case.shipped_grads[0])
            errs["dv_vs_shipped"] = relative_err(dv, case.shipped_grads[1])
        elif not (torch.isfinite(dk).all() and torch.isfinite(dv).all()):
            raise RuntimeError("dk or dv is not finite: not timed")
    for name, err in errs.items():
        if not err <= TOLERANCE:
            raise RuntimeError(f"{name} = {err:.3g} > {TOLERANCE}: not timed")
    return errs


def _bench(fn) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench``, L2 flushed between calls)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, return_mode="median")


def time_pass(pass_: str, fn, case: TuneInputs) -> dict:
    """"ms": the forward alone, or the backward as fwd+bwd minus fwd, both timed on this call
    (the forward at the shipped row, with the call's schedule)."""
    if pass_ == "fwd":
        ms = _bench(fn)
        return {"ms": ms, "fwd_ms": ms}
    both = _bench(lambda: torch.autograd.grad(fn(), (case.q, case.k, case.v), case.grad_out))
    fwd = _bench(fn)
    return {"ms": both - fwd, "fwd_ms": fwd, "fwdbwd_ms": both}


def describe(cand: Candidate, case: TuneInputs) -> dict:
    c = cand.config
    return {"label": cand.label(), "shipped": cand.shipped, "block_m": c.block_m, "block_n": c.block_n,
            "launch": {k: list(v) for k, v in c.launch.items()}, "schedule": c.schedule.spec(),
            "distance": distance(cand.pass_, c, case.shipped[cand.pass_]),
            "smem_est_kib": smem_estimate(cand.pass_, c, case.D) // 1024}


def run_candidate(cand: Candidate, case: TuneInputs, rank: int, repeat: bool = False) -> dict:
    """One candidate's row, with its row in TABLE: checked (``check_candidate``), then timed
    (``time_pass``). An error (compile failure, out of shared memory, a wrong result) is the row's
    "error"; "check_s" includes the compile."""
    row = {**case.info(cand.pass_), **describe(cand, case), "rank": rank, **({"repeat": True} if repeat else {})}
    try:
        with table_rows({case.key(cand.pass_): cand.config}):
            fn, schedule = case.call(cand)
            row["schedule_run"] = schedule.spec()
            t0 = time.perf_counter()
            row.update(check_candidate(cand, case, fn))
            row["check_s"] = round(time.perf_counter() - t0, 2)
            row.update(time_pass(cand.pass_, fn, case))
    except Exception as e:  # compile failure, out of resources, a wrong result: the row says so
        row["error"] = error_text(e)
    return row


def device_ok(dev) -> bool:
    """Whether the device still runs work (an illegal address in a kernel breaks the CUDA context
    for the rest of the process: every later candidate would fail)."""
    if torch.device(dev).type != "cuda":
        return True
    try:
        torch.ones(1, device=dev).add_(1).item()
        return True
    except Exception:
        return False


def tune_pass(pass_: str, case: TuneInputs, budget: TuneBudget, on_row, exclude=()) -> list:
    """Time one pass's candidates on one case, shipped row first, while its slice of ``budget``
    lasts (soft: no candidate starts past the deadline; one row counts those not tried); then,
    past the deadline too (compiled by then, quick), the shipped row again (its two timings give
    the spread) and the fastest candidate again (a winner must be fast both times, ``pick_winner``).
    Each row goes to ``on_row`` as it is measured; one row counts the candidates left out for
    turning on a switch of ``exclude``."""
    cands, deadline, rows = candidates(pass_, case.shipped[pass_], case.D, exclude), budget.deadline(pass_), []

    def emit(row: dict) -> dict:
        rows.append(row)
        on_row(row)
        return row
    if left_out := sum(excluded(c, exclude) for c in sweep_configs(pass_, case.shipped[pass_])):
        emit({**case.info(pass_), "label": f"({left_out} left out)", "skipped": left_out,
              "error": "skipped: " + ", ".join(f"{k}={v}" for k, v in exclude) + " failed the GPU tests"})
    for rank, cand in enumerate(cands):
        if budget.lost or budget.clock() > deadline:
            emit({**case.info(pass_), "label": f"({len(cands) - rank} not tried)", "skipped": len(cands) - rank,
                  "error": f"skipped: {budget.lost or 'time limit'}"})
            break
        row = emit(run_candidate(cand, case, rank))
        if "error" in row and not device_ok(case.dev):
            budget.lost = f"the CUDA context broke at {case.case} {pass_} {row['label']}"
        if case.dev.type == "cuda" and not budget.lost:
            torch.cuda.empty_cache()
    timed = {r["rank"]: r for r in rows if "ms" in r}
    if 0 in timed and not budget.lost:
        emit(run_candidate(cands[0], case, 0, repeat=True))
        best = min((r for rank, r in timed.items() if rank), key=lambda r: r["ms"], default=None)
        if best is not None and best["ms"] < timed[0]["ms"]:
            emit(run_candidate(cands[best["rank"]], case, best["rank"], repeat=True))
    return rows


def _print_row(row: dict) -> None:
    print(json.dumps(row), flush=True)


def tune_case(kind: str, N: int, D: int, H: int, dev, on_row=_print_row, budget: TuneBudget | None = None,
              dtype=torch.bfloat16, exclude=()) -> list:
    """Both passes of one case on the same inputs, the forward first (``tune_pass``); ``budget``
    holds the soft time limit (default none); ``exclude``: switches left out."""
    budget = budget or TuneBudget(list(triton_configs.PASSES), float("inf"))
    try:
        case = TuneInputs(kind, N, D, H, dev, dtype)
    except Exception as e:  # out of memory at N = 1M, say: reported, the sweep goes on
        row = {"case": kind, "N": N, "D": D, "H": H, "pass": "(set-up)", "label": "(set-up)", "error": error_text(e)}
        on_row(row)
        for pass_ in triton_configs.PASSES:  # this case's share goes to the later ones
            budget.deadline(pass_)
        return [row]
    return [row for pass_ in triton_configs.PASSES for row in tune_pass(pass_, case, budget, on_row, exclude)]


def tune(cases, dev, limit_s: float, on_row=_print_row, dtype=torch.bfloat16, exclude=()) -> list:
    """``tune_case`` on each of ``cases`` ((kind, N, D, H), ...) within one soft limit."""
    budget = TuneBudget([p for _ in cases for p in triton_configs.PASSES], limit_s)
    return [row for case in cases
            for row in tune_case(*case, dev, on_row=on_row, budget=budget, dtype=dtype, exclude=exclude)]


def pick_winner(rows: list) -> dict:
    """One (case, pass)'s verdict from its rows: the shipped row's time (the mean of its two
    timings), the spread (their difference, at least MIN_SPREAD of the time), the fastest other
    candidate at the slower of its two timings, and whether that beats the shipped time by more
    than the spread. No second timing of either: no winner."""
    ok = [r for r in rows if "ms" in r]
    shipped = [r["ms"] for r in ok if r["shipped"]]
    firsts = [r for r in ok if not r["shipped"] and not r.get("repeat")]
    verdict = {"shipped_ms": statistics.mean(shipped) if shipped else None, "shipped_times": shipped,
               "spread_ms": None, "best": None, "best_ms": None, "wins": False}
    if len(shipped) >= 2:
        verdict["spread_ms"] = max(max(shipped) - min(shipped), MIN_SPREAD * verdict["shipped_ms"])
    if not firsts:
        return {**verdict, "why": "no other candidate was timed"}
    best = min(firsts, key=lambda r: r["ms"])
    again = [r["ms"] for r in ok if r.get("repeat") and not r["shipped"] and r["label"] == best["label"]]
    verdict.update(best=best, best_ms=max([best["ms"], *again]))
    if not shipped:
        return {**verdict, "why": "the shipped row was not timed"}
    if verdict["spread_ms"] is None or not again:
        return {**verdict, "why": "not timed twice (the run stopped first)"}
    if verdict["best_ms"] < verdict["shipped_ms"] - verdict["spread_ms"]:
        return {**verdict, "wins": True, "why": "beats the shipped row by more than the spread"}
    return {**verdict, "why": "within the spread of the shipped row, or slower"}


def _slices(rows: list) -> dict:
    """(case, N, D, H, pass) -> its rows, in the order they came."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["case"], r["N"], r["D"], r["H"], r.get("pass", "?")), []).append(r)
    return out


def row_config(row: dict, source: str) -> Config:
    """The TABLE row a tuning row measured."""
    return Config(row["block_m"], row["block_n"], {k: tuple(v) for k, v in row["launch"].items()},
                  Schedule.parse(row["schedule"]), source)


def tune_winners(rows: list, device: str, date: str) -> dict:
    """(pass, dtype class, D, mask kind) -> (Config, comment) of each (case, pass) whose fastest
    candidate won (``pick_winner``), its source "timed: <device>, <date>, benchmarks/gpu.py --tune,
    <ms> vs shipped <ms>"; a later case of the same key replaces an earlier one."""
    out = {}
    for (case, N, D, H, pass_), mine in _slices(rows).items():
        verdict = pick_winner(mine)
        if not verdict["wins"]:
            continue
        best = verdict["best"]
        key = (pass_, "float32" if best.get("dtype") == "float32" else "half", D, best["mask_kind"])
        source = (f"timed: {device}, {date}, benchmarks/gpu.py --tune, {verdict['best_ms']:.3f} ms vs shipped "
                  f"{verdict['shipped_ms']:.3f} ms")
        what = "fwd" if pass_ == "fwd" else "bwd = fwd+bwd - fwd"
        comment = (f"{case} N={N} H={H} D={D} {best.get('dtype', 'bfloat16')} B=1, {what}: {best['label']}, spread "
                   f"{verdict['spread_ms']:.3f} ms")
        out[key] = (row_config(best, source), comment)
    return out


def _py(value) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def config_text(config: Config) -> str:
    """``config`` as Python source, as configs.py writes its rows."""
    launch = ", ".join(f'"{k}": ({w}, {s})' for k, (w, s) in config.launch.items())
    switches = ", ".join(f"{f.name}={_py(getattr(config.schedule, f.name))}" for f in fields(Schedule)
                         if getattr(config.schedule, f.name) != f.default)
    return (f"Config({config.block_m}, {config.block_n}, {{{launch}}}, schedule=Schedule({switches}),\n"
            f"           source={_py(config.source)})")


def tune_table_text(rows: list, device: str, date: str) -> str:
    """tune_table.py: the winners' TABLE rows as Python, to paste into configs.TABLE (and importable:
    ``ROWS``, which the issue-15 compare step applies in-process)."""
    lines = [f'"""TABLE rows timed by benchmarks/gpu.py --tune on {device}, {date}.', "",
             "Paste the entries of ROWS into TABLE in src/attnkit/ops/triton/configs.py. Each beat the shipped row of",
             "its (pass, dtype class, D, mask kind) by more than the measured spread, checked first; each comment says",
             "the case it was measured on (a sparse row: the Longformer pattern only; a half row: bfloat16 only).",
             "One Schedule serves a call: with a forward row that turns a switch on, the backward runs with the",
             "forward's tma / warp_specialize (configs.default_schedule); --issue15's compare times the rows",
             'together."""',
             "", "from attnkit.ops.triton.configs import Config, Schedule", "", "ROWS = {"]
    for (pass_, dclass, D, kind), (config, comment) in tune_winners(rows, device, date).items():
        lines += [f"    # {comment}", f'    ("{pass_}", "{dclass}", {D}, "{kind}"): {config_text(config)},']
    return "\n".join(lines + ["}", ""])


def load_tuned(path: Path) -> dict | None:
    """ROWS of a tune_table.py (None where there is no such file)."""
    return runpy.run_path(str(path))["ROWS"] if Path(path).exists() else None


TUNE_NOTE = ("Each (case, pass): the shipped row first, then candidates by a prior (neighbours of the shipped "
             "row first) until the time limit; each checked before timing (output rows against the float32 "
             "reference; backward: dq rows against the float32 reference, dk and dv against the shipped row's). "
             "fwd: the forward alone; bwd: fwd+bwd minus fwd of the same call (forward at the shipped row). "
             "do_bench medians. The shipped row is timed first and again at the end: spread = their difference "
             f"(at least {MIN_SPREAD:.0%}); the fastest candidate is timed again and counted at its slower "
             "time; it wins when that beats the shipped mean by more than the spread.")


def _launch_text(row: dict) -> str:
    launch = row.get("launch", {})
    if row.get("pass") == "bwd":
        return " ".join(f"{k.removeprefix('_bwd_')} {w}/{s}" for k, (w, s) in launch.items())
    return " ".join(f"{w}/{s}" for w, s in launch.values())


def tune_markdown(rows: list, device: str, title: bool = True) -> str:
    """Per (case, pass): the verdict, then the timed rows fastest first (``x``: the shipped mean over
    this row's time), then errors and the rows not tried."""
    lines = [f"# attnkit triton tuning sweep ({device}, B=1)", ""] if title else []
    lines += [TUNE_NOTE, ""]
    for (case, N, D, H, pass_), mine in _slices(rows).items():
        verdict = pick_winner(mine)
        base = verdict["shipped_ms"]
        lines += [f"### {case} N={N} D={D} H={H}: {pass_}", ""]
        if base is not None:
            times = ", ".join(f"{t:.3f}" for t in verdict["shipped_times"])
            spread = "?" if verdict["spread_ms"] is None else f"{verdict['spread_ms']:.3f}"
            best = ("" if verdict["best"] is None
                    else f"; fastest other {verdict['best']['label']} at {verdict['best_ms']:.3f} ms")
            lines += [f"shipped {base:.3f} ms (timed {times}; spread {spread} ms){best}: "
                      f"**{'winner' if verdict['wins'] else 'no winner'}** ({verdict['why']}).", ""]
        lines += ["| # | blocks | warps/stages | schedule | ms | x shipped | checks | compile+check s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in mine if "ms" in r), key=lambda r: r["ms"]):
            name = (r["label"].split(" ")[0] + (" (shipped)" if r["shipped"] else "")
                    + (" (again)" if r.get("repeat") else ""))
            checks = ", ".join(f"{k} {r[k]:.1e}" for k in ("max_err", "dq_rows_err", "dk_vs_shipped", "dv_vs_shipped")
                               if k in r)
            ratio = f"{base / r['ms']:.2f}" if base and r["ms"] > 0 else "-"
            lines.append(f"| {r['rank']} | {name} | {_launch_text(r)} | {r['schedule'] or 'plain'} | {r['ms']:.3f} | "
                         f"{ratio} | {checks} | {r.get('check_s', '')} |")
        lines += [f"| {r.get('rank', '')} | {r['label']} | {_launch_text(r)} | {r.get('schedule') or ''} | "
                  f"{r['error']} | | | |" for r in mine if "error" in r]
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


class StepReport:
    """``<name>.json`` (meta and each step's rows), ``<name>_rows.jsonl`` and the files ``render``
    makes of the document (file name -> text: ``<name>.md``, ...) in ``out``, rewritten after every
    row; a step run in another process adds to the same files."""

    def __init__(self, out: Path, meta: dict, name: str = "issue14", render=None):
        self.out, self.name = out, name
        self.render = render or (lambda doc: {f"{name}.md": issue14_markdown(doc)})
        path = out / f"{name}.json"
        self.doc = json.loads(path.read_text()) if path.exists() else {"meta": dict(meta), "steps": {}}
        self.doc["meta"].setdefault("runs", []).append(dict(meta))  # one entry per process (step)

    def start(self, step: str, **info) -> None:
        self.doc["steps"][step] = {"info": {"started": datetime.now(UTC).isoformat(timespec="seconds"), **info},
                                   "rows": []}
        self.write()

    def add(self, step: str, row: dict, log: bool = True) -> None:
        self.doc["steps"][step]["rows"].append(row)
        if log:
            with (self.out / f"{self.name}_rows.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, **row}) + "\n")
        print(f"[{step}] {json.dumps(row)}", flush=True)
        self.write()

    def finish(self, step: str, rows: list | None = None, **info) -> None:
        if rows is not None:
            self.doc["steps"][step]["rows"] = rows
        self.doc["steps"][step]["info"].update(finished=datetime.now(UTC).isoformat(timespec="seconds"), **info)
        self.write()

    def write(self) -> None:
        (self.out / f"{self.name}.json").write_text(json.dumps(self.doc, indent=1) + "\n")
        for file, text in self.render(self.doc).items():
            (self.out / file).write_text(text)


def _step_markdown(step: str, info: dict, rows: list, device: str) -> list:
    """One step's section of a report's markdown."""
    lines = [f"## {step}", "", "`" + json.dumps(info) + "`", ""]
    if step == "tests":
        lines += ["```", *info.get("tail", "").splitlines()[-15:], "```", ""]
    elif step == "overhead" and rows:
        lines.append(overhead_markdown(rows))
    elif step == "plans" and rows:
        lines.append(plan_build.markdown({}, rows, body_only=True))
    elif step in ("longformer", "compare") and rows:
        lines.append(markdown(rows, device).split("\n", 2)[2])
    elif step == "tune" and rows:
        lines.append(tune_markdown(rows, device, title=False))
    return lines


def report_markdown(doc: dict, title: str, steps) -> str:
    meta = doc["meta"]
    lines = [f"# {title} on {meta.get('device')}: {meta.get('date')}", "",
             f"torch {meta.get('torch')}, triton {meta.get('triton')}, attnkit {meta.get('attnkit_commit')}.", ""]
    for step in steps:
        if step in doc["steps"]:
            lines += _step_markdown(step, doc["steps"][step]["info"], doc["steps"][step]["rows"],
                                    meta.get("device", "?"))
    return "\n".join(lines) + "\n"


def issue14_markdown(doc: dict) -> str:
    return report_markdown(doc, "Issue 14", ISSUE14_STEPS)


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


def step_tests(report: StepReport, limit_s: float) -> None:
    """The gpu-marked tests of GPU_TESTS in a child pytest (5 workers where pytest-xdist is
    there), stopped after ``limit_s``; the log goes to <report name>_pytest.log."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE", *GPU_TESTS]
    if importlib.util.find_spec("xdist") is not None:  # one worker per test: the 3 dtypes' case tables compile apart
        cmd += ["-n", "5"]
    env = {**os.environ}
    env["PYTHONPATH"] = str(REPO / "src") + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    report.start("tests", command=" ".join(cmd[1:]))
    t0 = time.monotonic()
    rc, text = run_child(cmd, env, limit_s)
    (report.out / f"{report.name}_pytest.log").write_text(text)
    report.finish("tests", returncode=rc, wall_s=round(time.monotonic() - t0, 1), tail=text[-3000:])
    print(text[-3000:], flush=True)


def step_overhead(report: StepReport, device, limit_s: float) -> None:
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


def step_plans(report: StepReport, device, limit_s: float) -> None:
    """``plan_build.run`` on ``device`` at PLAN_NS for PLAN_MASKS, Flex beside, cache hits at PLAN_CACHE_N."""
    ns, masks = PLAN_NS, PLAN_MASKS
    report.start("plans", ns=list(ns), masks=list(masks))
    _raise_recompile_limits()
    rows = plan_build.run(ns, masks, plan_build.default_blocks(), torch.device(device), reps=5, budget_s=2.0,
                          flex=True, cache_n=PLAN_CACHE_N, cache_calls=200, on_row=lambda r: report.add("plans", r),
                          deadline=time.monotonic() + limit_s)
    report.finish("plans", rows)


def _measure_cases(report: StepReport, step: str, cases, device, limit_s: float, **contender_kw) -> None:
    """``measure`` on each (kind, N, D, H) of ``cases`` in order, its rows reaching the report as they
    are measured; no new case past the soft limit."""
    deadline, rows = time.monotonic() + limit_s, _Reported(report, step)
    for kind, N, D, H in cases:
        if time.monotonic() > deadline:
            rows.append({"case": kind, "N": N, "D": D, "H": H, "contender": "(all)", "error": "skipped: time limit"})
            continue
        measure(kind, N, D, H, device, rows, Path(os.devnull), **contender_kw)
    report.finish(step)


def step_longformer(report: StepReport, device, limit_s: float) -> None:
    """``measure`` at each of LONGFORMER_NS (attnkit triton and compiled Flex, fwd and fwd+bwd);
    no new N past the limit."""
    report.start("longformer", ns=list(LONGFORMER_NS))
    _measure_cases(report, "longformer", [("longformer", N, 64, 12) for N in LONGFORMER_NS], device, limit_s)


class _Reported(list):
    """A list of rows that hands each appended row to the report (``measure`` appends them)."""

    def __init__(self, report: StepReport, step: str):
        super().__init__()
        self.report, self.step = report, step

    def append(self, row: dict) -> None:
        super().append(row)
        self.report.add(self.step, row)


def _exit_on_term(signum, frame) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def run_meta(device: torch.device, steps) -> dict:
    """What a report records of the run: date, versions, devices."""
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "steps": list(steps), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "attnkit_commit": plan_build._commit(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "cpu_model": plan_build.cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0]}


def run_steps(report: StepReport, steps, limits: dict, runners: dict) -> None:
    """``runners[step](soft limit)`` for each step in order; a step that raises is recorded and the
    next one runs; SIGTERM (``timeout``) stops the process as an exception, so its children go too."""
    signal.signal(signal.SIGTERM, _exit_on_term)
    for step in steps:
        t0 = time.monotonic()
        print(f"== {report.name} step {step} (soft limit {limits[step]} s)", flush=True)
        try:
            runners[step](limits[step])
        except Exception as e:  # one step failing leaves the others to run
            report.doc["steps"].setdefault(step, {"info": {}, "rows": []})
            report.finish(step, error=error_text(e))
            print(f"{report.name} step {step} failed: {error_text(e)}", flush=True)
        print(f"== {report.name} step {step} took {time.monotonic() - t0:.1f} s", flush=True)


def issue14(out: Path, steps=ISSUE14_STEPS, device=None, limits: dict | None = None) -> int:
    """Run the steps of issue 14 in order (module docstring)."""
    device = torch.device(device or "cuda")
    limits = {**ISSUE14_LIMITS_S, **(limits or {})}
    report = StepReport(out, run_meta(device, steps))
    run_steps(report, steps, limits, {"tests": lambda s: step_tests(report, s),
                                      "overhead": lambda s: step_overhead(report, device, s),
                                      "plans": lambda s: step_plans(report, device, s),
                                      "longformer": lambda s: step_longformer(report, device, s)})
    print(issue14_markdown(report.doc), flush=True)
    return 0


# -- issue 15: the tests, the tuning sweep, the acceptance cases with the winners, in one device call -

ISSUE15_STEPS = ("tests", "tune", "compare", "longformer")
# soft limits (no new candidate / case after them); gpu_issue15.sh's hard ones: 150, 240, 120 s, then what is left
ISSUE15_LIMITS_S = {"tests": 135, "tune": 205, "compare": 80, "longformer": 60}
COMPARE_SDPA = ("FLASH_ATTENTION", "CUDNN_ATTENTION")


def acceptance_cases(longformer_n: int | None = None, quick: bool = False) -> list:
    """TUNE_CASES (issue 15's acceptance: dense D=128 16k, causal D=64 16k, Longformer 64k), the
    Longformer at ``longformer_n`` where given; all at N=4096 with ``quick``."""
    cases = [(kind, 4096 if quick else N, D, H) for kind, N, D, H in TUNE_CASES]
    return [(kind, longformer_n if kind == "longformer" and longformer_n else N, D, H) for kind, N, D, H in cases]


def _tune_table_file(doc: dict) -> dict:
    """tune_table.py of a report whose "tune" step has run (dated by the step's UTC start)."""
    tune = doc["steps"].get("tune")
    if tune is None:
        return {}
    return {"tune_table.py": tune_table_text(tune["rows"], doc["meta"].get("device", "?"),
                                             tune["info"].get("started", "?")[:10])}


def issue15_render(doc: dict) -> dict:
    return {"issue15.md": report_markdown(doc, "Issue 15", ISSUE15_STEPS), **_tune_table_file(doc)}


def tune_render(doc: dict) -> dict:
    rows = doc["steps"].get("tune", {}).get("rows", [])
    return {"tune.md": tune_markdown(rows, doc["meta"].get("device", "?")), **_tune_table_file(doc)}


def step_tune(report: StepReport, device, limit_s: float, cases) -> None:
    """``tune`` on ``cases``, each row into the report as it is measured (the report's render
    rewrites tune_table.py with it); the switches whose bf16 GPU test failed in the report's tests
    step (``failed_switches``) are left out."""
    log = report.out / f"{report.name}_pytest.log"
    ran = "tests" in report.doc["steps"] and log.exists()
    exclude = failed_switches(log.read_text(errors="replace")) if ran else []
    report.start("tune", cases=[list(c) for c in cases], limit_s=limit_s, left_out=[[k, v] for k, v in exclude])
    tune(cases, device, limit_s, on_row=lambda r: report.add("tune", r), exclude=exclude)
    rows = report.doc["steps"]["tune"]["rows"]
    report.finish("tune", winners=[list(key) for key in tune_winners(rows, "", "")])


def step_compare(report: StepReport, device, limit_s: float, cases) -> None:
    """``measure`` on the acceptance cases with COMPARE_SDPA, compiled Flex, attnkit's shipped rows
    and, from ``tune_table.py`` in the report's folder (the tune step's), attnkit with its ROWS."""
    tuned = load_tuned(report.out / "tune_table.py")
    report.start("compare", cases=[list(c) for c in cases], sdpa=list(COMPARE_SDPA),
                 tuned_rows=None if tuned is None else [list(key) for key in tuned])
    _measure_cases(report, "compare", cases, device, limit_s, tuned=tuned, sdpa=COMPARE_SDPA)


def issue15(out: Path, steps=ISSUE15_STEPS, device=None, limits: dict | None = None,
            longformer_n: int | None = None) -> int:
    """Run the steps of issue 15 in order (module docstring), writing issue15.json / .md /
    _rows.jsonl / _pytest.log and tune_table.py in ``out``."""
    device = torch.device(device or "cuda")
    limits = {**ISSUE15_LIMITS_S, **(limits or {})}
    cases = acceptance_cases(longformer_n)
    report = StepReport(out, run_meta(device, steps), "issue15", issue15_render)
    run_steps(report, steps, limits, {"tests": lambda s: step_tests(report, s),
                                      "tune": lambda s: step_tune(report, device, s, cases),
                                      "compare": lambda s: step_compare(report, device, s, cases),
                                      "longformer": lambda s: step_longformer(report, device, s)})
    return 0


def _pytest_result(info: dict) -> str:
    lines = [line.strip(" =") for line in info.get("tail", "").splitlines()
             if re.search(r"\b(passed|failed|errors?|no tests ran)\b", line)]
    return lines[-1] if lines else str(info.get("error", ""))


def _tflops(row: dict | None) -> str:
    if row is None:
        return ""
    if "error" in row:
        return "error" if not row["error"].startswith("skipped") else "skipped"
    return f"{row['fwd_tflops']:.0f} / {row['fwdbwd_tflops']:.0f}"


def issue15_summary(doc: dict | None, log: str = "") -> str:
    """The short tables gpu_issue15.sh prints last: how each step ended (the script's log lines
    "== STEP exit RC after S s"), the tests' count, each (case, pass)'s tuning verdict, and the
    compare step's TFLOP/s (fwd / fwd+bwd) per case and contender."""
    doc = doc or {"meta": {}, "steps": {}}
    meta, steps = doc["meta"], doc["steps"]
    ended = {m[1]: m[2] for m in re.finditer(r"^== (\w+) (exit \S+ after \d+ s|skipped: [^\n]*)$", log, re.M)}
    lines = [f"# Issue 15 summary: {meta.get('device', '?')}, {meta.get('date', '?')}, attnkit "
             f"{meta.get('attnkit_commit', '?')}", "", "| step | ended | result |", "|---|---|---|"]
    for step in ISSUE15_STEPS:
        info, rows = steps.get(step, {}).get("info", {}), steps.get(step, {}).get("rows", [])
        timed, errors = sum("error" not in r for r in rows), sum("error" in r for r in rows)
        result = {"tests": _pytest_result(info),
                  "tune": f"{timed} rows timed, {errors} errors or skips, {len(info.get('winners', []))} winners",
                  }.get(step, f"{timed} rows timed, {errors} errors or skips")
        lines.append(f"| {step} | {ended.get(step, 'not run' if step not in steps else '?')} | "
                     f"{result if step in steps else ''} |")
    tune_rows = steps.get("tune", {}).get("rows", [])
    if tune_rows:
        lines += ["", "| tune: case | pass | shipped ms (spread) | fastest other | its ms | verdict |",
                  "|---|---|---|---|---|---|"]
        for (case, N, D, H, pass_), mine in _slices(tune_rows).items():
            v = pick_winner(mine)
            shipped = "-" if v["shipped_ms"] is None else f"{v['shipped_ms']:.3f} ({v['spread_ms'] or 0:.3f})"
            best = v["best"]["label"] if v["best"] else "-"
            best_ms = "-" if v["best_ms"] is None else f"{v['best_ms']:.3f}"
            lines.append(f"| {case} {N} D={D} | {pass_} | {shipped} | {best} | {best_ms} | "
                         f"{'WINNER' if v['wins'] else v.get('why', '')} |")
    compare = steps.get("compare", {}).get("rows", [])
    if compare:
        names = list(dict.fromkeys(r["contender"] for r in compare if r["contender"] != "(all)"))
        by = {(r["case"], r["N"], r["contender"]): r for r in compare}
        lines += ["", "| compare TFLOP/s fwd / fwd+bwd | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for case, N, D in dict.fromkeys((r["case"], r["N"], r["D"]) for r in compare):
            whole = by.get((case, N, "(all)"))
            cells = [_tflops(by.get((case, N, name), whole)) for name in names]
            lines.append(f"| {case} N={N} D={D} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_issue15_summary(out: Path) -> int:
    path, log = out / "issue15.json", out / "issue15_log.txt"
    doc = json.loads(path.read_text()) if path.exists() else None
    print(issue15_summary(doc, log.read_text(errors="replace") if log.exists() else ""), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; list options are comma-separated (``--ns 65536,131072``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N up to 4096 only (with --tune: every case at N=4096)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"),
                   help="directory for the JSON, .jsonl and markdown; created if missing, before any case "
                        "(default benchmarks/results)")
    p.add_argument("--tune", action="store_true",
                   help="sweep attnkit's Triton configs per pass on issue 15's acceptance cases instead (tune.json, "
                        "tune.md, tune_rows.jsonl and tune_table.py in --out, written as it goes)")
    p.add_argument("--acceptance", action="store_true",
                   help="only the issue's acceptance cases: Longformer N=65536, dense D=128 N=16384, causal D=64 N=16384")
    p.add_argument("--kinds", metavar="KIND,...", type=CommaList(str), default=KINDS,
                   help="subset of the cases, comma-separated, from {" + ",".join(KINDS) + "} (default all)")
    p.add_argument("--ns", metavar="N,...", type=CommaList(int), default=None,
                   help="sequence lengths, comma-separated, instead of each kind's defaults (with --tune or "
                        "--issue15: one N, the Longformer case's, e.g. 1048576)")
    p.add_argument("--ds", metavar="D,...", type=CommaList(int), default=(64, 128),
                   help="head dims of the dense and causal cases, comma-separated (default 64,128)")
    p.add_argument("--issue14", action="store_true",
                   help="issue 14's run instead: tests, host overhead, plan builds beside Flex, the Longformer table "
                        "(issue14.json / .md / _rows.jsonl in --out, written as it goes)")
    p.add_argument("--issue15", action="store_true",
                   help="issue 15's run instead: tests, tune, compare, longformer (issue15.json / .md / _rows.jsonl / "
                        "_pytest.log and tune_table.py in --out, written as it goes; benchmarks/gpu_issue15.sh)")
    p.add_argument("--step", action="append", choices=tuple(dict.fromkeys(ISSUE14_STEPS + ISSUE15_STEPS)),
                   default=None, help="with --issue14 / --issue15: run only this step (repeat for several; default "
                                      f"all, in order: {', '.join(ISSUE14_STEPS)} / {', '.join(ISSUE15_STEPS)})")
    p.add_argument("--limit-s", type=float, default=None,
                   help="soft time limit in seconds, after which no new case or candidate starts: with --tune the "
                        f"whole sweep's (default {TUNE_LIMIT_S:.0f}); with --issue14 / --issue15 each step's (default "
                        f"per step: {ISSUE14_LIMITS_S} / {ISSUE15_LIMITS_S})")
    p.add_argument("--summary", action="store_true",
                   help="with --issue15: print the short summary of --out's issue15.json and issue15_log.txt and "
                        "stop (no GPU needed)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if unknown := sorted(set(args.kinds) - set(KINDS)):
        p.error(f"--kinds: unknown {unknown}; choose from {', '.join(KINDS)}")
    if args.issue14 + args.issue15 + args.tune > 1:
        p.error("--tune, --issue14 and --issue15 are separate runs: give one")
    mode_steps = ISSUE14_STEPS if args.issue14 else ISSUE15_STEPS if args.issue15 else ()
    if wrong := sorted(set(args.step or ()) - set(mode_steps)):
        p.error(f"--step {', '.join(wrong)}: " + (f"not a step of this run; choose from {', '.join(mode_steps)}"
                                                  if mode_steps else "only with --issue14 or --issue15"))
    if (args.tune or args.issue15) and args.ns and len(args.ns) > 1:
        p.error(f"--ns {','.join(map(str, args.ns))}: --tune and --issue15 take one N (the Longformer case's; each "
                "case's winners make one TABLE row)")
    if args.summary and not args.issue15:
        p.error("--summary goes with --issue15")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # before any work (and before the device check): rows are appended to it as they are measured
        out = prepare_output_dir(args.out, "--out")
    except OutputPathError as e:
        print(f"gpu.py: error: {e}", file=sys.stderr)
        return 2
    if args.summary:
        return print_issue15_summary(out)
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
    if args.issue15:
        limits = None if args.limit_s is None else {step: args.limit_s for step in ISSUE15_STEPS}
        return issue15(out, tuple(args.step or ISSUE15_STEPS), limits=limits, longformer_n=ns[0] if ns else None)
    dev = torch.device("cuda")
    device = torch.cuda.get_device_name(dev)
    if args.tune:
        report = StepReport(out, run_meta(dev, ["tune"]), "tune", tune_render)
        step_tune(report, dev, TUNE_LIMIT_S if args.limit_s is None else args.limit_s,
                  acceptance_cases(ns[0] if ns else None, quick=args.quick))
        for text in tune_render(report.doc).values():
            print(text, flush=True)
        return 0
    rows: list = []
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M")
    log_path = out / f"gpu_{stamp}.jsonl"
    for kind, N, D, H in cases:
        measure(kind, N, D, H, dev, rows, log_path)
    meta = {"date": stamp, "device": device, "torch": torch.__version__, "triton": __import__("triton").__version__}
    (out / f"gpu_{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"gpu_{stamp}.md").write_text(markdown(rows, device))
    print(markdown(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
