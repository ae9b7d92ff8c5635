"""Longformer attention on the CPU: attnkit against FlexAttention, HF transformers and dense SDPA.

    python benchmarks/longformer_cpu.py [--ns 4096,16384,65536] [--attnkit-only-ns 131072]
        [--reps 3] [--modes fwd,fwd+bwd] [--out-dir benchmarks/results]
        [--contenders banded,tiled,flex,hf,attnkit_module,sdpa_dense_mask]

Problem (one process, the same inputs for every contender). fp32, B=1, H=12, D=64, the Longformer
pattern: a one-sided window W=256 (query i sees key j when |i - j| <= W, 2W+1 keys) plus G=16
global tokens, by default at the first G positions as the anchors have them (``--globals spread``:
``round(linspace(0, N-1, G))``, where FlexAttention's block mask turns every query block's 16 global
key blocks into partial blocks): a global query sees every key and every query sees the global keys.

Contenders.
  banded           ``ak.attention(q, k, v, mask=sliding_window(W) | global_tokens(idx), impl="banded")``
  tiled            the same call with ``impl="tiled"``
  flex             ``torch.compile(flex_attention)`` with a block mask from ``torch.compile(create_block_mask)``
                   (mask_mod ``|q-k| <= W | is_global[q] | is_global[k]``); block-mask build time and first
                   (compiling) call time are recorded apart from the timed calls
  sdpa_dense_mask  ``F.scaled_dot_product_attention`` with the (N, N) bool mask of the pattern
  hf               transformers' ``LongformerSelfAttention`` (hidden 768, 12 heads, attention_window=2W,
                   eval) on hidden states x (B, N, 768) with the extended mask LongformerModel builds
                   (0 local, +finfo.max global); it includes its q/k/v projections
  attnkit_module   ``attnkit.nn.LongformerSelfAttention.from_hf(hf)`` on the same x, globals passed
                   as ``global_indices``
The first four take q, k, v (B, H, N, D); the last two take x. N in ``--attnkit-only-ns`` runs only
banded, tiled and attnkit_module.

Method, for every (mode, N, contender):
  * Correctness first. For 32 sampled query rows (both ends, rows around and at global positions,
    random rows) the exact output is computed in float64 from the materialized attnkit mask rows,
    O(rows * N), never N x N: softmax(q_i k^T / sqrt(D)) v over the allowed keys (for fwd+bwd also
    dq_i); for hf/attnkit_module the same through the module's projections (global rows through
    query_global/key_global/value_global, as HF does). The warm-up call's output is compared with it;
    a contender over the tolerance is recorded "wrong" and not timed. Gradients of the module
    contenders (dx) are not checked.
  * Time: one warm-up call (the checked one), then up to ``--reps`` timed calls, fewer when the
    warm-up says they would take more than ``--case-budget-s``; the median is reported.
    fwd runs under ``torch.no_grad()``; fwd+bwd backpropagates a fixed upstream gradient into
    q, k, v (attention contenders) or into x and the weights (module contenders).
  * Memory: glibc is asked to return freed memory (malloc_trim), the peak-RSS high-water mark is reset
    (``attnkit.bench.process.reset_peak_rss``) right BEFORE THE WARM-UP call, and
    ``extra peak = peak RSS after the timed calls - RSS at the reset``. Inputs, compiled code and the
    masks built beforehand are not in it; ``mask_mb`` records the dense (N, N) mask (sdpa) or block
    mask (flex) held as an input, and the memory ratios add it.
  * FLOPs: useful work only, ``4*B*H*D*(N*(2W+1) + 2*G*N)`` forward, x3.5 forward+backward; the
    projections of hf/attnkit_module are not counted. The fp32 GEMM ceiling is the median of
    2048^3 matmuls (``2*2048^3`` FLOPs each), measured at the start and the end; the larger counts.
Outputs: ``<out-dir>/longformer_cpu_<YYYY-MM-DDTHHMM>.json`` (every raw time, memory, machine) and
``.md``, rewritten after each measurement so a killed run keeps what it measured. ``--out-dir`` is
created if missing (or refused, if it cannot be) before anything is measured. List options are
comma-separated.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import attnkit as ak
from attnkit.bench.cpu import CommaList, cpu_model
from attnkit.bench.process import peak_rss_mb, release_memory, reset_peak_rss
from attnkit.cli._paths import OutputPathError, prepare_output_dir

B, H, D, W, G = 1, 12, 64, 256, 16
HIDDEN = H * D
SCALE = D ** -0.5
CONTENDERS = ("banded", "tiled", "flex", "hf", "attnkit_module", "sdpa_dense_mask")
ATTNKIT = ("banded", "tiled", "attnkit_module")
MODES = ("fwd", "fwd+bwd")
SAMPLED_ROWS = 32
CHUNK = 16384  # key columns per step of the float64 reference
TOL = 1e-4  # max |out - float64 reference| allowed, times max(1, max|reference|)
MB = 2 ** 20
FLOP_FORMULA = ("useful FLOPs = 4*B*H*D*(N*(2W+1) + 2*G*N) forward, x3.5 forward+backward "
                "(projections of hf/attnkit_module not counted)")
MEMORY_METHOD = ("extra peak = VmHWM after the timed calls - RSS at the reset; malloc_trim + "
                 "reset_peak_rss right before the warm-up call")


class Skip(Exception):
    """A case that is not run, with the reason as its message."""


# ---------------------------------------------------------------------------------------------
# The pattern, the shared inputs and the float64 reference rows
# ---------------------------------------------------------------------------------------------

GLOBAL_LAYOUTS = {
    "prefix": "the first G positions (as ../shared/anchors measured FlexAttention and HF)",
    "spread": "round(linspace(0, N-1, G)): position 0, the last and 14 evenly spaced between",
}
GLOBALS = "prefix"  # set from --globals


def global_positions(n: int) -> Tensor:
    """G global positions: the first G (``prefix``) or spread over the sequence (``spread``)."""
    if GLOBALS == "prefix":
        return torch.arange(G)
    return torch.linspace(0, n - 1, G).round().long()


def pattern_rows(rows: Tensor, is_global: Tensor) -> Tensor:
    """The pattern written out for some query rows: bool (len(rows), N)."""
    cols = torch.arange(is_global.numel())
    near = (rows[:, None] - cols[None, :]).abs() <= W  # (r, N)
    return near | is_global[rows][:, None] | is_global[None, :]


def attnkit_mask(gidx: Tensor) -> ak.Mask:
    """The pattern in attnkit's mask language."""
    return ak.sliding_window(W) | ak.global_tokens(gidx)


def sample_rows(n: int, gidx: Tensor, seed: int) -> Tensor:
    """About SAMPLED_ROWS query rows: both ends, the window edges, at and next to global tokens,
    and random rows."""
    g = gidx.tolist()
    fixed = [0, 1, W, W + 1, n - 1, n - 2, n - 1 - W, g[1], g[1] + 1, g[1] - W - 1, g[G // 2], g[-2] + W]
    fixed = {r for r in fixed if 0 <= r < n}
    gen = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, n, (SAMPLED_ROWS,), generator=gen).tolist()
    rows = sorted(fixed | set(extra[: max(0, SAMPLED_ROWS - len(fixed))]))
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class Problem:
    """The inputs of one N, shared by every contender, and the rows their outputs are checked on."""

    n: int
    gidx: Tensor  # (G,) long global positions
    is_global: Tensor  # (N,) bool
    q: Tensor  # (B, H, N, D) fp32, requires_grad (fwd runs under no_grad)
    k: Tensor
    v: Tensor
    dout: Tensor  # (B, H, N, D) upstream gradient of the attention contenders
    x: Tensor  # (B, N, HIDDEN) hidden states of the module contenders, requires_grad
    dx_out: Tensor  # (B, N, HIDDEN) upstream gradient of the module contenders
    rows: Tensor  # (R,) sampled query rows
    allowed: list[Tensor] = field(default_factory=list)  # per sampled row: its allowed key columns


def make_problem(n: int, seed: int = 0) -> Problem:
    """Seeded inputs for N; checks that attnkit's mask and the written-out pattern agree."""
    gen = torch.Generator().manual_seed(seed + n)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    gidx = global_positions(n)
    is_global = torch.zeros(n, dtype=torch.bool)
    is_global[gidx] = True
    q, k, v = (randn(B, H, n, D).requires_grad_(True) for _ in range(3))
    p = Problem(n, gidx, is_global, q, k, v, randn(B, H, n, D), randn(B, n, HIDDEN).requires_grad_(True),
                randn(B, n, HIDDEN), sample_rows(n, gidx, seed))
    ours = attnkit_mask(gidx).evaluate(p.rows, torch.arange(n), n, n)[0, 0]  # (R, N)
    if not torch.equal(ours, pattern_rows(p.rows, is_global)):
        raise RuntimeError("attnkit's mask and the written-out Longformer pattern disagree; fix the script")
    p.allowed = [row.nonzero().flatten() for row in ours]
    return p


def _chunks(cols: Tensor) -> list[tuple[slice, Tensor]]:
    """Column chunks of at most CHUNK keys, with their slice in ``cols``."""
    return [(slice(s, s + CHUNK), cols[s:s + CHUNK]) for s in range(0, cols.numel(), CHUNK)]


def attention_reference(p: Problem) -> dict[str, Tensor]:
    """Exact float64 out and dq of the sampled rows, each (R, H, D)."""
    q, k, v = (t.detach()[0] for t in (p.q, p.k, p.v))  # (H, N, D)
    outs, dqs = [], []
    for i, cols in zip(p.rows.tolist(), p.allowed):
        q_i, do_i = q[:, i].double() * SCALE, p.dout[0, :, i].double()  # (H, D)
        chunks = _chunks(cols)
        s = torch.cat([torch.einsum("hd,hcd->hc", q_i, k[:, c].double()) for _, c in chunks], -1)
        dp = torch.cat([torch.einsum("hd,hcd->hc", do_i, v[:, c].double()) for _, c in chunks], -1)
        prob = torch.softmax(s, -1)  # (H, |cols|)
        ds = prob * (dp - (prob * dp).sum(-1, keepdim=True))  # softmax backward, (H, |cols|)
        outs.append(sum(torch.einsum("hc,hcd->hd", prob[:, sl], v[:, c].double()) for sl, c in chunks))
        dqs.append(SCALE * sum(torch.einsum("hc,hcd->hd", ds[:, sl], k[:, c].double()) for sl, c in chunks))
    return {"out": torch.stack(outs), "dq": torch.stack(dqs)}


def module_reference(p: Problem, hf: torch.nn.Module) -> dict[str, Tensor]:
    """Exact float64 output rows (R, H, D) of HF's LongformerSelfAttention, computed in x space:
    score_j = x_j . (Wk_h^T q_h) + bk_h . q_h and out_h = (sum_j p_j x_j) Wv_h^T + bv_h."""
    lin = {name: (getattr(hf, name).weight.detach().double(), getattr(hf, name).bias.detach().double())
           for name in ("query", "key", "value", "query_global", "key_global", "value_global")}
    x = p.x.detach()[0]  # (N, HIDDEN)
    outs = []
    for i, cols in zip(p.rows.tolist(), p.allowed):
        kind = "_global" if p.is_global[i] else ""  # global rows use HF's *_global projections
        (wq, bq), (wk, bk), (wv, bv) = (lin[n + kind] for n in ("query", "key", "value"))
        q_i = ((wq @ x[i].double() + bq) * SCALE).view(H, D)
        a = torch.einsum("hd,hde->he", q_i, wk.view(H, D, HIDDEN))  # (H, HIDDEN)
        c0 = (q_i * bk.view(H, D)).sum(-1, keepdim=True)  # (H, 1)
        chunks = _chunks(cols)
        s = torch.cat([a @ x[c].double().T + c0 for _, c in chunks], -1)  # (H, |cols|)
        prob = torch.softmax(s, -1)
        x_bar = sum(prob[:, sl] @ x[c].double() for sl, c in chunks)  # (H, HIDDEN)
        outs.append(torch.einsum("he,hde->hd", x_bar, wv.view(H, D, HIDDEN)) + bv.view(H, D))
    return {"out": torch.stack(outs)}


def max_errors(p: Problem, family: str, out: Tensor, mode: str, ref: dict[str, Tensor]) -> dict:
    """max |contender - reference| on the sampled rows: out, and dq for attention fwd+bwd."""
    if family == "attention":
        got = out[0, :, p.rows].transpose(0, 1).double()  # (R, H, D)
    else:
        got = out[0, p.rows].view(-1, H, D).double()
    errs = {"max_abs_err": (got - ref["out"]).abs().max().item(),
            "ref_max_abs": ref["out"].abs().max().item()}
    if family == "attention" and mode == "fwd+bwd":
        dq = p.q.grad[0, :, p.rows].transpose(0, 1).double()
        errs["max_abs_err_dq"] = (dq - ref["dq"]).abs().max().item()
        errs["ref_max_abs_dq"] = ref["dq"].abs().max().item()
    return errs


def wrong_reason(errs: dict) -> str | None:
    """Why the checked output is wrong, or None when it is within TOL."""
    for err, mag in (("max_abs_err", "ref_max_abs"), ("max_abs_err_dq", "ref_max_abs_dq")):
        if err in errs:
            tol = TOL * max(1.0, errs[mag])
            if not errs[err] <= tol:  # also catches NaN
                return f"{err}={errs[err]:.3g} over the tolerance {tol:.3g} on {SAMPLED_ROWS} sampled rows"
    return None


class ReferenceRows:
    """The float64 reference rows of one Problem, computed on first use per family."""

    def __init__(self, p: Problem, ctx: Context):
        self.p, self.ctx, self.cache = p, ctx, {}

    def get(self, family: str) -> dict[str, Tensor]:
        if family not in self.cache:
            self.cache[family] = (attention_reference(self.p) if family == "attention"
                                  else module_reference(self.p, hf_module(self.ctx)))
        return self.cache[family]


# ---------------------------------------------------------------------------------------------
# Contenders: each builder returns a Runner for one (N, mode) or raises Skip
# ---------------------------------------------------------------------------------------------

@dataclass
class Runner:
    """One call of a contender (returns its output) and what was learned while building it."""

    step: Callable[[], Tensor]
    family: str  # "attention" (q, k, v) or "module" (x)
    info: dict = field(default_factory=dict)


@dataclass
class Context:
    """State shared across cases: options, modules and compiled functions built once."""

    args: argparse.Namespace
    hf: torch.nn.Module | None = None
    ak_module: torch.nn.Module | None = None
    flex: Callable | None = None
    block_mask: Callable | None = None
    flex_no_bwd: str | None = None  # why FlexAttention fwd+bwd is skipped, once it failed
    hf_bwd_ms: dict[int, float] = field(default_factory=dict)  # measured hf fwd+bwd medians by N


def attention_step(fn: Callable[[Tensor, Tensor, Tensor], Tensor], p: Problem, mode: str) -> Callable[[], Tensor]:
    """One call of ``fn(q, k, v)``: a no_grad forward, or forward + backward of p.dout into q, k, v."""
    def fwd() -> Tensor:
        with torch.no_grad():  # detached too: FlexAttention refuses inputs that require grad on CPU
            return fn(p.q.detach(), p.k.detach(), p.v.detach())

    def fwd_bwd() -> Tensor:
        p.q.grad = p.k.grad = p.v.grad = None
        out = fn(p.q, p.k, p.v)
        out.backward(p.dout)
        return out.detach()

    return fwd_bwd if mode == "fwd+bwd" else fwd


def module_step(module: torch.nn.Module, fn: Callable[[Tensor], Tensor], p: Problem,
                mode: str) -> Callable[[], Tensor]:
    """One call of ``fn(x)``: a no_grad forward, or forward + backward into x and the weights."""
    def fwd() -> Tensor:
        with torch.no_grad():
            return fn(p.x.detach())

    def fwd_bwd() -> Tensor:
        p.x.grad = None
        module.zero_grad(set_to_none=True)
        out = fn(p.x)
        out.backward(p.dx_out)
        return out.detach()

    return fwd_bwd if mode == "fwd+bwd" else fwd


def build_attnkit(impl: str) -> Callable[[Problem, str, Context], Runner]:
    """Builder of ``ak.attention(..., impl=impl)`` with the pattern as an attnkit mask."""
    def build(p: Problem, mode: str, ctx: Context) -> Runner:
        mask = attnkit_mask(p.gidx)
        fn = lambda q, k, v: ak.attention(q, k, v, mask=mask, impl=impl)  # noqa: E731
        return Runner(attention_step(fn, p, mode), "attention", {"impl": impl})
    return build


def _tensor_mb(obj) -> float:
    """Size in MB of the tensors in a (nested) tuple."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size() / MB
    return sum(_tensor_mb(o) for o in obj) if isinstance(obj, (tuple, list)) else 0.0


def build_flex(p: Problem, mode: str, ctx: Context) -> Runner:
    """Compiled FlexAttention; builds the block mask and makes the first (compiling) call here."""
    if mode == "fwd+bwd" and ctx.flex_no_bwd:
        raise Skip(ctx.flex_no_bwd)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if ctx.flex is None:  # static shapes: one specialized kernel per N, as a user would get
        ctx.flex = torch.compile(flex_attention, dynamic=False)
        ctx.block_mask = torch.compile(create_block_mask, dynamic=False)  # no N x N mask in memory
    is_global = p.is_global

    def mask_mod(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx).abs() <= W) | is_global[q_idx] | is_global[kv_idx]

    t0 = time.perf_counter()
    bm = ctx.block_mask(mask_mod, None, None, p.n, p.n, "cpu")
    info = {"block_mask_build_s": time.perf_counter() - t0, "mask_mb": _tensor_mb(bm.as_tuple())}
    step = attention_step(lambda q, k, v: ctx.flex(q, k, v, block_mask=bm), p, mode)
    t0 = time.perf_counter()
    try:
        step()
    except NotImplementedError as e:  # FlexAttention has no CPU backward (torch 2.13)
        if mode != "fwd+bwd":
            raise
        ctx.flex_no_bwd = f"FlexAttention has no CPU backward (tried at N={p.n}): {e}"[:300]
        raise Skip(ctx.flex_no_bwd) from None
    info["first_call_s"] = time.perf_counter() - t0
    return Runner(step, "attention", info)


def build_sdpa(p: Problem, mode: str, ctx: Context) -> Runner:
    """torch SDPA with the dense (N, N) bool mask, where it fits."""
    if p.n > ctx.args.sdpa_max_n:
        raise Skip(f"dense (N, N) mask: {p.n ** 2 / 1e9:.1f} GB as bool and ~4x that as the float mask "
                   f"SDPA makes of it; run only up to N={ctx.args.sdpa_max_n} (--sdpa-max-n)")
    dense = torch.cat([pattern_rows(r, p.is_global) for r in torch.arange(p.n).split(2048)])  # (N, N)
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)  # noqa: E731
    return Runner(attention_step(fn, p, mode), "attention", {"mask_mb": dense.numel() / MB})


def hf_module(ctx: Context) -> torch.nn.Module:
    """transformers' LongformerSelfAttention with seeded weights, built once."""
    if ctx.hf is None:
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention
        cfg = LongformerConfig(hidden_size=HIDDEN, num_attention_heads=H, attention_window=[2 * W],
                               attention_probs_dropout_prob=0.0)
        torch.manual_seed(0)
        ctx.hf = LongformerSelfAttention(cfg, layer_id=0).eval()
    return ctx.hf


def hf_bwd_skip_reason(n: int, ctx: Context) -> str | None:
    """Why hf fwd+bwd is not run at N, or None when it is."""
    if n <= ctx.args.hf_bwd_max_n:
        return None
    reason = f"HF fwd+bwd runs only up to N={ctx.args.hf_bwd_max_n} (--hf-bwd-max-n) to keep the run short"
    if ctx.hf_bwd_ms:
        n0 = max(ctx.hf_bwd_ms)
        est = ctx.hf_bwd_ms[n0] * n / n0 / 1e3
        reason += f"; linear from N={n0} it would take >= {est:.1f} s per call, 2+ calls"
    return reason


def build_hf(p: Problem, mode: str, ctx: Context) -> Runner:
    """HF LongformerSelfAttention called the way LongformerModel calls its layers."""
    if p.n % (2 * W):
        raise Skip(f"HF needs N to be a multiple of 2W={2 * W} (LongformerModel pads to it)")
    if mode == "fwd+bwd" and (reason := hf_bwd_skip_reason(p.n, ctx)):
        raise Skip(reason)
    m = hf_module(ctx)
    ext = torch.zeros(B, p.n)  # LongformerModel's extended mask: 0 local, +finfo.max global
    ext[:, p.gidx] = torch.finfo(torch.float32).max
    is_global = ext > 0

    def fn(x: Tensor) -> Tensor:
        return m(x, attention_mask=ext, is_index_masked=ext < 0, is_index_global_attn=is_global,
                 is_global_attn=True)[0]

    return Runner(module_step(m, fn, p, mode), "module")


def build_attnkit_module(p: Problem, mode: str, ctx: Context) -> Runner:
    """attnkit.nn.LongformerSelfAttention.from_hf(hf) on the same x and global positions."""
    if ctx.ak_module is None:
        from attnkit.nn import LongformerSelfAttention  # raises ImportError until it exists
        ctx.ak_module = LongformerSelfAttention.from_hf(hf_module(ctx), impl=ctx.args.module_impl).eval()
    m = ctx.ak_module
    fn = lambda x: m(x, global_indices=p.gidx)  # noqa: E731
    impl = ctx.args.module_impl
    if impl == "auto":  # what auto picks for the local rows' call (shapes only; empty is never touched)
        shape_only = torch.empty(B, H, p.n, D)
        impl = f"auto ({ak.explain(shape_only, shape_only, shape_only, mask=attnkit_mask(p.gidx)).chosen})"
    return Runner(module_step(m, fn, p, mode), "module", {"impl": impl})


BUILDERS: dict[str, Callable[[Problem, str, Context], Runner]] = {
    "banded": build_attnkit("banded"), "tiled": build_attnkit("tiled"), "flex": build_flex,
    "hf": build_hf, "attnkit_module": build_attnkit_module, "sdpa_dense_mask": build_sdpa,
}


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

def useful_flops(n: int, mode: str) -> float:
    """Useful FLOPs of one call (see FLOP_FORMULA)."""
    fwd = 4.0 * B * H * D * (n * (2 * W + 1) + 2 * G * n)
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def measure(runner: Runner, p: Problem, mode: str, ref: dict[str, Tensor], args) -> dict:
    """Warm-up (checked against the reference), then timed calls; times and memory."""
    release_memory()
    reset_peak_rss()
    base = peak_rss_mb()
    t0 = time.perf_counter()
    out = runner.step()
    warmup_ms = (time.perf_counter() - t0) * 1e3
    result = {"warmup_ms": warmup_ms, "baseline_rss_mb": base, **max_errors(p, runner.family, out, mode, ref)}
    del out
    if (reason := wrong_reason(result)) is not None:
        return {**result, "status": "wrong", "reason": reason}
    reps = max(1, min(args.reps, int(args.case_budget_s * 1e3 / warmup_ms)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        runner.step()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = peak_rss_mb()
    return {**result, "times_ms": times, "median_ms": statistics.median(times),
            "peak_rss_mb": peak, "extra_peak_mb": peak - base}


def failure(e: BaseException) -> dict:
    """Status and reason of a case that raised."""
    msg = f"{type(e).__name__}: {e}".strip()[:400]
    if isinstance(e, Skip):
        return {"status": "skipped", "reason": str(e)}
    oom = isinstance(e, MemoryError) or any(w in msg.lower() for w in ("out of memory", "can't allocate",
                                                                      "bad_alloc", "not enough memory"))
    return {"status": "oom" if oom else "error", "reason": msg}


def run_case(name: str, p: Problem, mode: str, ctx: Context, refs: ReferenceRows) -> dict:
    """Build, check and time one contender at (N, mode); a row whatever happens."""
    row = {"contender": name, "N": p.n, "mode": mode, "status": "ok", "reason": None}
    try:
        if p.n in ctx.args.attnkit_only_ns and name not in ATTNKIT:
            raise Skip(f"N={p.n} runs attnkit contenders only (--attnkit-only-ns)")
        runner = BUILDERS[name](p, mode, ctx)
        row.update(runner.info)
        ref = refs.get(runner.family)
        row.update(measure(runner, p, mode, ref, ctx.args))
    except Exception as e:  # noqa: BLE001 - every failure becomes a row; the suite goes on
        row.update(failure(e))
    finally:
        p.q.grad = p.k.grad = p.v.grad = p.x.grad = None
        release_memory()
    fl = useful_flops(p.n, mode)
    med = row.get("median_ms")
    row["useful_flops"] = fl
    row["gflops"] = fl / (med * 1e-3) / 1e9 if med else None
    if name == "hf" and mode == "fwd+bwd" and med:
        ctx.hf_bwd_ms[p.n] = med
    return row


def gemm_ceiling(reps: int = 7, n: int = 2048) -> dict:
    """fp32 GEMM throughput: median of ``reps`` n^3 matmuls after two warm-ups."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b, a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"n": n, "times_ms": [t * 1e3 for t in times], "median_ms": med * 1e3, "gflops": 2 * n ** 3 / med / 1e9}


# ---------------------------------------------------------------------------------------------
# Ratios and output files
# ---------------------------------------------------------------------------------------------

def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def _memory(row: dict | None) -> float | None:
    """Extra peak plus the mask the contender holds as an input (MB)."""
    if not row or row.get("status") != "ok":
        return None
    return row["extra_peak_mb"] + row.get("mask_mb", 0.0)


def ratios(rows: Sequence[dict], ceiling: float | None) -> dict:
    """Per (N, mode) the ratios the acceptance asks for, and banded's time growth with N."""
    by = {(r["N"], r["mode"], r["contender"]): r for r in rows}
    t = lambda n, mode, c: by.get((n, mode, c), {}).get("median_ms")  # noqa: E731
    per_n = []
    for n, mode in sorted({(r["N"], r["mode"]) for r in rows}, key=lambda x: (MODES.index(x[1]), x[0])):
        gf = by.get((n, mode, "banded"), {}).get("gflops")
        per_n.append({"N": n, "mode": mode,
                      "banded_speedup_vs_flex": _ratio(t(n, mode, "flex"), t(n, mode, "banded")),
                      "banded_speedup_vs_hf": _ratio(t(n, mode, "hf"), t(n, mode, "banded")),
                      "banded_speedup_vs_tiled": _ratio(t(n, mode, "tiled"), t(n, mode, "banded")),
                      "banded_mem_over_sdpa_mem": _ratio(_memory(by.get((n, mode, "banded"))),
                                                         _memory(by.get((n, mode, "sdpa_dense_mask")))),
                      "banded_fraction_of_gemm": _ratio(gf, ceiling),
                      "attnkit_module_speedup_vs_hf": _ratio(t(n, mode, "hf"), t(n, mode, "attnkit_module"))})
    growth = []
    for mode in MODES:
        ns = sorted(n for (n, m, c), r in by.items() if m == mode and c == "banded" and r.get("median_ms"))
        for n0, n1 in zip(ns, ns[1:]):
            growth.append({"mode": mode, "N0": n0, "N1": n1, "n_ratio": n1 / n0,
                           "banded_time_ratio": t(n1, mode, "banded") / t(n0, mode, "banded")})
    return {"per_n": per_n, "banded_growth": growth}


def machine() -> dict:
    """Machine and software description."""
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {"date": _dt.datetime.now().isoformat(timespec="seconds"), "hostname": platform.node(),
            "platform": platform.platform(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": tf_version,
            "attnkit": ak.__version__}


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    if pct:
        return f"{100 * x:.1f}%"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _notes(r: dict) -> str:
    """Extra facts for the table: build/compile times, mask size, impl."""
    parts = []
    if "block_mask_build_s" in r:
        parts.append(f"block mask {r['block_mask_build_s']:.1f} s")
    if "first_call_s" in r:
        parts.append(f"first call {r['first_call_s']:.1f} s")
    if r.get("mask_mb"):
        parts.append(f"mask {r['mask_mb']:.0f} MB")
    if r.get("impl") and r["contender"] == "attnkit_module":
        parts.append(f"impl={r['impl']}")
    return ", ".join(parts)


def markdown(doc: dict) -> str:
    """The results as markdown: machine, method, one table per mode, ratios, what did not run."""
    m, s, rows = doc["machine"], doc["settings"], doc["rows"]
    ceiling = doc["gemm_ceiling_gflops"]
    lines = [f"# Longformer pattern on the CPU, {m['date']}", "",
             f"{m['cpu_model']}, {m['cpu_count']} CPUs, {m['platform']}; torch {m['torch']} "
             f"({m['torch_threads']} threads), transformers {m['transformers']}, attnkit {m['attnkit']}.",
             f"fp32, B={B}, H={H}, D={D}, W={W} (one-sided), G={G} globals at {s['global_positions']}. "
             f"{s['flop_formula']}. fp32 GEMM 2048^3 ceiling: {_fmt(ceiling)} GFLOP/s. Memory: {s['memory_method']}. "
             f"Time: median of the timed calls after one checked warm-up. Error: max |out - float64 reference| "
             f"over {SAMPLED_ROWS} sampled rows (dq too for attention fwd+bwd)."]
    if s["banded_impl"] != "banded":
        lines.append(f"\n**The 'banded' rows ran impl={s['banded_impl']!r} (testing only).**")
    for mode in MODES:
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        lines += ["", f"## {mode}", "", "| N | contender | median ms | reps | extra peak MB | useful GFLOP/s "
                  "| of GEMM | max abs err | notes |", "|---|---|---|---|---|---|---|---|---|"]
        for r in mrows:
            if r["status"] != "ok":
                lines.append(f"| {r['N']} | {r['contender']} | {r['status']} | | | | | "
                             f"{_fmt(r.get('max_abs_err'))} | {_notes(r)} |")
                continue
            err = max(r["max_abs_err"], r.get("max_abs_err_dq", 0.0))
            lines.append(f"| {r['N']} | {r['contender']} | {_fmt(r['median_ms'])} | {len(r['times_ms'])} | "
                         f"{_fmt(r['extra_peak_mb'])} | {_fmt(r['gflops'])} | {_fmt(_ratio(r['gflops'], ceiling), True)} "
                         f"| {err:.1e} | {_notes(r)} |")
    rat = doc["ratios"]
    lines += ["", "## Ratios (speedup = other's time / banded's time; memory includes held masks)", "",
              "| N | mode | banded vs flex | banded vs hf | banded vs tiled | banded mem / sdpa mem "
              "| banded of GEMM | attnkit_module vs hf |", "|---|---|---|---|---|---|---|---|"]
    for g in rat["per_n"]:
        x = lambda key: f"{_fmt(g[key])}x" if g[key] is not None else "-"  # noqa: E731
        lines.append(f"| {g['N']} | {g['mode']} | {x('banded_speedup_vs_flex')} | {x('banded_speedup_vs_hf')} | "
                     f"{x('banded_speedup_vs_tiled')} | {_fmt(g['banded_mem_over_sdpa_mem'])} | "
                     f"{_fmt(g['banded_fraction_of_gemm'], True)} | {x('attnkit_module_speedup_vs_hf')} |")
    if rat["banded_growth"]:
        lines.append("")
    for g in rat["banded_growth"]:
        lines.append(f"- {g['mode']}: t_banded({g['N1']}) / t_banded({g['N0']}) = "
                     f"{g['banded_time_ratio']:.2f} (N grows {g['n_ratio']:g}x; linear = {g['n_ratio']:g})")
    notes = [f"- N={r['N']} {r['mode']} {r['contender']}: {r['status']}: {r['reason']}"
             for r in rows if r["status"] != "ok"]
    return "\n".join(lines + (["", "## Not measured", ""] + notes if notes else [])) + "\n"


def write_results(stem: Path, doc: dict) -> None:
    """(Re)write ``stem.json`` and ``stem.md``."""
    import json
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))


# ---------------------------------------------------------------------------------------------
# Driver and CLI
# ---------------------------------------------------------------------------------------------

def format_row(r: dict) -> str:
    """One progress line for a finished case."""
    what = f"N={r['N']:>6} {r['mode']:<7} {r['contender']:<15}"
    if r["status"] != "ok":
        return f"{what} {r['status']}: {r['reason']}"
    err = max(r["max_abs_err"], r.get("max_abs_err_dq", 0.0))
    extra = f"  ({_notes(r)})" if _notes(r) else ""
    return (f"{what} {r['median_ms']:10.1f} ms x{len(r['times_ms'])}  {r['gflops']:6.1f} GFLOP/s  "
            f"extra peak {r['extra_peak_mb']:7.0f} MB  err {err:.1e}{extra}")


def limit_address_space(gb: float) -> None:
    """Cap virtual memory so running out raises (a row "oom") instead of the OOM killer ending the run."""
    if gb > 0:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = int(gb * 1e9) if hard == resource.RLIM_INFINITY else min(int(gb * 1e9), hard)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        except (ValueError, OSError):
            pass


def default_as_limit_gb() -> float:
    """85% of the machine's memory (0 = no limit where unknown)."""
    try:
        return 0.85 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 0.0


def run(args: argparse.Namespace) -> dict:
    """Measure every (mode, N, contender), writing the results after each; the final document."""
    start = time.perf_counter()
    layout = "" if GLOBALS == "prefix" else f"{GLOBALS}_"
    stem = Path(args.out_dir) / f"longformer_cpu_{layout}{_dt.datetime.now():%Y-%m-%dT%H%M}"
    ctx = Context(args)
    BUILDERS["banded"] = build_attnkit(args.banded_impl)
    gemm = [gemm_ceiling()]
    print(f"fp32 GEMM 2048^3: {gemm[0]['gflops']:.1f} GFLOP/s", flush=True)
    doc = {"machine": machine(), "settings": {
        "dtype": "float32", "device": "cpu", "B": B, "H": H, "D": D, "W": W, "G": G, "hidden": HIDDEN,
        "global_positions": GLOBAL_LAYOUTS[GLOBALS], "ns": list(args.ns), "attnkit_only_ns": list(args.attnkit_only_ns),
        "modes": list(args.modes), "contenders": list(args.contenders), "reps": args.reps,
        "case_budget_s": args.case_budget_s, "banded_impl": args.banded_impl, "module_impl": args.module_impl,
        "flop_formula": FLOP_FORMULA, "memory_method": MEMORY_METHOD, "sampled_rows": SAMPLED_ROWS,
        "tolerance": f"{TOL} * max(1, max|reference|)", "as_limit_gb": args.as_limit_gb},
        "gemm": gemm, "gemm_ceiling_gflops": gemm[0]["gflops"], "rows": [], "ratios": {}}
    for mode in args.modes:
        for n in [*args.ns, *args.attnkit_only_ns]:
            t0 = time.perf_counter()
            p = make_problem(n)
            refs = ReferenceRows(p, ctx)
            print(f"N={n} {mode}: inputs ready in {time.perf_counter() - t0:.1f} s", flush=True)
            for name in args.contenders:
                doc["rows"].append(run_case(name, p, mode, ctx, refs))
                doc["ratios"] = ratios(doc["rows"], doc["gemm_ceiling_gflops"])
                write_results(stem, doc)
                print(format_row(doc["rows"][-1]), flush=True)
            del p, refs
            release_memory()
    gemm.append(gemm_ceiling())
    doc["gemm_ceiling_gflops"] = max(g["gflops"] for g in gemm)
    doc["ratios"] = ratios(doc["rows"], doc["gemm_ceiling_gflops"])
    doc["total_s"] = time.perf_counter() - start
    write_results(stem, doc)
    print(f"fp32 GEMM 2048^3 at the end: {gemm[1]['gflops']:.1f} GFLOP/s", flush=True)
    print(f"wrote {stem}.json and {stem}.md ({doc['total_s']:.0f} s)", flush=True)
    return doc


def _choices(names: Sequence[str]) -> str:
    return "{" + ",".join(names) + "}"  # as argparse shows choices


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; list options are comma-separated (``--ns 4096,16384``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ns", metavar="N,...", type=CommaList(int), default=(4096, 16384, 65536),
                   help="sequence lengths for every contender, comma-separated (default 4096,16384,65536)")
    p.add_argument("--attnkit-only-ns", metavar="N,...", type=CommaList(int), default=(131072,),
                   help=f"sequence lengths for the attnkit contenders only ({', '.join(ATTNKIT)}), "
                        "comma-separated (default 131072)")
    p.add_argument("--reps", type=int, default=3, help="timed calls per case at most (after one warm-up)")
    p.add_argument("--case-budget-s", type=float, default=15.0,
                   help="fewer timed calls when the warm-up says they would take longer than this")
    p.add_argument("--modes", metavar="MODE,...", type=CommaList(str), default=MODES,
                   help=f"passes, comma-separated, from {_choices(MODES)} (default {','.join(MODES)})")
    p.add_argument("--contenders", metavar="NAME,...", type=CommaList(str), default=CONTENDERS,
                   help=f"comma-separated, from {_choices(CONTENDERS)} (default all)")
    p.add_argument("--out-dir", default="benchmarks/results",
                   help="where the JSON/markdown go; created if missing, before any measurement "
                        "(default benchmarks/results)")
    p.add_argument("--sdpa-max-n", type=int, default=16384, help="largest N for the dense-mask SDPA")
    p.add_argument("--hf-bwd-max-n", type=int, default=16384, help="largest N for HF forward+backward")
    p.add_argument("--module-impl", default="auto", help="impl of attnkit_module (from_hf(..., impl=))")
    p.add_argument("--banded-impl", default="banded", help="impl of the 'banded' rows (testing aid; recorded)")
    p.add_argument("--as-limit-gb", type=float, default=default_as_limit_gb(),
                   help="address-space limit of this process, so running out of memory is a row (0: none)")
    p.add_argument("--globals", choices=list(GLOBAL_LAYOUTS), default="prefix",
                   help="where the G global tokens sit: " + "; ".join(f"{k}: {v}" for k, v in GLOBAL_LAYOUTS.items()))
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parsed options (sets GLOBALS); unknown contender or mode names are an argparse error."""
    p = build_parser()
    args = p.parse_args(argv)
    global GLOBALS
    GLOBALS = args.globals
    for name, got, allowed in (("contender", args.contenders, CONTENDERS), ("mode", args.modes, MODES)):
        if bad := [x for x in got if x not in allowed]:
            p.error(f"unknown {name}(s) {bad}; choose from {list(allowed)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # before any work: a path that cannot be used is refused now, not after the first case
        prepare_output_dir(args.out_dir, "--out-dir")
    except OutputPathError as e:
        print(f"longformer_cpu.py: error: {e}", file=sys.stderr)
        return 2
    limit_address_space(args.as_limit_gb)
    print(f"Longformer CPU benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"N={list(args.ns)} (+{list(args.attnkit_only_ns)} attnkit only), modes {list(args.modes)}", flush=True)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
