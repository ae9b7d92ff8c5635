"""Approximate attention against exact attention on the CPU: time, memory, FLOPs, bytes and error.

    python benchmarks/approx_speed.py [--ns 1024,4096,16384,65536,131072] [--modes fwd,fwd+bwd]
        [--contenders sdpa,sdpa_causal,tiled_causal,banded_longformer,linear,linear_causal,
                      performer,performer_causal,linformer,nystrom]
        [--reps 3] [--case-budget-s 120] [--timeout 3600] [--mem-budget-gb 16]
        [--out-dir benchmarks/results] [--note "quiet machine"]

Problem (issue 17, "Measured"). fp32 on the CPU, B=1, H=8, D=Dv=64, q, k, v ~ N(0, 1) seeded per N
(the same inputs for every contender), modes ``fwd`` (under no_grad) and ``fwd+bwd`` (backward of a
fixed upstream gradient into q, k, v only: the Linformer E, F and the Performer features are
constants here, so their gradients are not computed or counted).

Contenders (name: call).
  exact, non-causal   sdpa               ``ak.attention(q, k, v, impl="sdpa")`` (torch SDPA)
                      banded_longformer  ``ak.attention(q, k, v, mask=ak.sliding_window(256) |
                                         ak.global_tokens(range(16)), impl="banded")``: the Longformer
                                         pattern, exact on its own pattern, an approximation of full attention
  exact, causal       sdpa_causal        ``ak.attention(q, k, v, mask=ak.causal(), impl="sdpa")``
                      tiled_causal       the same with ``impl="tiled"``
  approximations      linear / linear_causal        ``linear_attention`` (phi = elu + 1, F = D; causal by
                                                    chunks of C=128)
  (``attnkit.approx``) performer / performer_causal  ``performer_attention`` with F=256 orthogonal softmax
                                                    features (``orthogonal_random_features``, seeded; C=128)
                      linformer          ``linformer_attention`` with Kp=256, E, F ~ N(0, 1/Kp) of shape (Kp, N)
                      nystrom            ``nystrom_attention`` with m=64 landmarks, 6 pinv iterations

Method, per (N, mode, contender), each in a fresh ``python approx_speed.py --case JSON`` process:
  * start-up: one call of the contender at N=256 (thread pools, kernels: not in the measurement);
  * memory: gc + malloc_trim, then the peak-RSS mark is reset (``attnkit.bench.process``) right
    before the warm-up call; extra peak = VmHWM after the timed calls - RSS at the reset (the inputs,
    E, F and the feature rows are not in it);
  * time: one warm-up call, then up to ``--reps`` timed calls, fewer when the warm-up says they would
    take more than ``--case-budget-s``; when the warm-up alone took longer than that budget it is the
    one (cold) time reported ("calls" = 0 in the table): minutes-long calls are not repeated;
  * error: the warm-up output on 32 sampled query rows (both ends, the middle, random) against exact
    attention computed in float64 by ``ak.attention(impl="reference")`` for those rows only,
    O(rows * N): relative L2 error ``||out - exact||_F / ||exact||_F`` over the rows and heads.
    "exact" is full attention for the non-causal contenders (banded_longformer included: its error
    is the Longformer pattern's distance to full attention) and causal attention for the causal ones;
    exact contenders are also checked against their own definition (``check_err``, ~1e-7).

FLOPs (matrix products only, a multiply-add = 2; exp, elu, softmax and sums not counted):
  exact        4*B*H*D*P forward, P the allowed (query, key) pairs: N^2, N(N+1)/2 causal, the window
               plus global rows and columns for Longformer (``allowed_pairs``); forward + backward
               3.5x (a FlashAttention backward recomputes the scores: 2.5x).
  linear, performer (non-causal)   4*B*H*N*F*Dv + 2*B*H*N*F (state S = phi(K)^T V, phi(Q) S, normalizer
               phi(Q) z) + 4*B*H*N*D*F for the Performer's features Q W^T, K W^T (F = D for linear).
  causal (chunked, C)   the same + 2*B*H*N*C*(F + Dv) for the intra-chunk C x C scores and their
               product with V (exactly 2*B*H*(F + Dv) * sum of squared chunk sizes).
  linformer    8*B*H*N*Kp*D: E K, F V, Q (E K)^T, P (F V).
  nystrom      8*B*H*N*m*D (Q K~^T, Q~ K^T and their products with V) + 4*B*H*N*m*D for the landmarks
               (the code forms the segment means as dense (m, N) matrix products) + 48*B*H*m^3 for the
               6 pseudo-inverse iterations (4 m x m products each) + 2*B*H*m^2*(D + Dv).
  Backward of the approximations: each product counted again once per operand that needs a gradient
  (autograd keeps the intermediates, nothing is recomputed); ``flop_terms`` lists every product with
  that count, and tests/test_benchmark_approx_speed.py checks them against torch's FlopCounterMode.

Bytes: the minimum memory traffic of the method as this code runs it: inputs (q, k, v, and E, F /
W) + output + its largest materialized intermediate (``largest_intermediate``: the lse for the
fused exact kernels, or the (N, N) scores if torch's SDPA takes its math path, which the run probes
and records; the features phi(Q), phi(K) for linear / Performer (or the C x C chunk scores, whichever
is larger); the (N, Kp) scores for Linformer; the (N, m) and (m, N) attention factors for Nystrom);
forward + backward adds the backward's reads and writes (q, k, v, out, dout, dq, dk, dv and the
intermediate once more). Cases whose estimated peak (``estimate_bytes``) exceeds ``--mem-budget-gb``
are skipped; so is a case whose predicted call time (the same contender's at the previous N times
the FLOP ratio) exceeds ``--timeout``, and a child still running after ``--timeout`` is stopped.

Summary: per mode and causal / non-causal, the N from which each approximation is faster than the
fastest exact contender of its kind (sdpa non-causal; min(sdpa_causal, tiled_causal) causal; and,
separately, the Longformer pattern), from the measured rows, with a log-log interpolation of the
crossing between the two measured N around it (``crossovers``).

Results: ``<out-dir>/approx_speed_<YYYY-MM-DDTHHMM>.json`` (every raw time, the machine) and ``.md``,
rewritten after each case, so a killed run keeps what it measured. Cases run with N outer.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

import attnkit as ak
from attnkit.bench.cpu import (RESULT_TAG, CommaList, _limit_address_space, run_case_process, header,
                               measured_or_failed)
from attnkit.bench.process import peak_rss_mb, release_memory, reset_peak_rss
from attnkit.cli._paths import OutputPathError, prepare_output_dir

B, H, D = 1, 8, 64
WINDOW, GLOBALS = 256, 16  # Longformer: sliding_window(256) | global_tokens(first 16)
NS = (1024, 4096, 16384, 65536, 131072)
MODES = ("fwd", "fwd+bwd")
SAMPLED_ROWS = 32
STARTUP_N = 256
GB, MB = 1e9, 2 ** 20
FP32 = 4  # bytes


@dataclass(frozen=True)
class Dims:
    """Sizes of the problem and of the approximations: one set read by the calls and the formulas."""

    b: int = B
    h: int = H
    d: int = D
    dv: int = D
    window: int = WINDOW
    global_tokens: int = GLOBALS  # the first G positions
    features: int = 256  # Performer F
    proj_len: int = 256  # Linformer Kp
    landmarks: int = 64  # Nystrom m
    pinv_iterations: int = 6
    chunk: int = 128  # C of the causal kernelized forms


DIMS = Dims()


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "exact" or "approx"
    causal: bool
    call: str


CONTENDERS = {c.name: c for c in (
    Contender("sdpa", "exact", False, 'ak.attention(q, k, v, impl="sdpa")'),
    Contender("sdpa_causal", "exact", True, 'ak.attention(q, k, v, mask=ak.causal(), impl="sdpa")'),
    Contender("tiled_causal", "exact", True, 'ak.attention(q, k, v, mask=ak.causal(), impl="tiled")'),
    Contender("banded_longformer", "exact", False,
              'ak.attention(q, k, v, mask=ak.sliding_window(256) | ak.global_tokens(range(16)), impl="banded")'),
    Contender("linear", "approx", False, "linear_attention(q, k, v)  # elu + 1"),
    Contender("linear_causal", "approx", True, "linear_attention(q, k, v, mask=ak.causal(), chunk_size=128)"),
    Contender("performer", "approx", False, "performer_attention(q, k, v, W)  # W (256, 64) orthogonal"),
    Contender("performer_causal", "approx", True,
              "performer_attention(q, k, v, W, mask=ak.causal(), chunk_size=128)"),
    Contender("linformer", "approx", False, "linformer_attention(q, k, v, E, F)  # E, F (256, N)"),
    Contender("nystrom", "approx", False, "nystrom_attention(q, k, v, num_landmarks=64)"),
)}


# ---------------------------------------------------------------------------------------------
# FLOPs, bytes, memory estimates (pure functions of the contender, N and the sizes)
# ---------------------------------------------------------------------------------------------

def allowed_pairs(name: str, n: int, dims: Dims = DIMS) -> int:
    """(query, key) pairs an exact contender computes: N^2, N(N+1)/2 causal; for the Longformer
    pattern, the window |i - j| <= W plus the G global rows (all N keys) and global columns.

    Row i (not global) sees min(i + W, N - 1) - max(i - W, 0) + 1 window keys and the global keys
    g < i - W outside its window (the globals are the first G positions).
    """
    if name != "banded_longformer":
        return n * (n + 1) // 2 if CONTENDERS[name].causal else n * n
    W, G = dims.window, min(dims.global_tokens, n)
    i = torch.arange(G, n, dtype=torch.int64)  # the non-global rows
    window = torch.clamp(i + W, max=n - 1) - torch.clamp(i - W, min=0) + 1
    outside = torch.clamp(i - W, min=0, max=G)
    return G * n + int((window + outside).sum())


class Term(NamedTuple):
    """One matrix product of a method: its forward FLOPs, and how many of its operands need a
    gradient in fwd+bwd (the backward costs ``grads`` times ``flops``)."""

    what: str
    flops: float
    grads: int


def _kernelized_terms(name: str, n: int, dims: Dims) -> list[Term]:
    """linear / performer (kernelized.noncausal, kernelized.causal by chunks)."""
    bh, d, dv, C = dims.b * dims.h, dims.d, dims.dv, dims.chunk
    f = dims.features if name.startswith("performer") else d
    terms = [Term("features Q W^T, K W^T", 2 * 2 * bh * n * d * f, 1)] if name.startswith("performer") else []
    if not CONTENDERS[name].causal:
        return terms + [Term("state S = phi(K)^T V", 2 * bh * n * f * dv, 2),
                        Term("phi(Q) S", 2 * bh * n * f * dv, 2), Term("normalizer phi(Q) z", 2 * bh * n * f, 2)]
    sizes = [C] * (n // C) + ([n % C] if n % C else [])
    first, last, squares = sizes[0], sizes[-1], sum(c * c for c in sizes)
    return terms + [  # the first chunk reads the zero state (no gradient); the last update feeds nothing
        Term("intra-chunk phi(Q) phi(K)^T", 2 * bh * squares * f, 2),
        Term("intra-chunk A V", 2 * bh * squares * dv, 2),
        Term("phi(Q) S, chunk 1", 2 * bh * first * f * dv, 1), Term("phi(Q) S", 2 * bh * (n - first) * f * dv, 2),
        Term("phi(Q) z, chunk 1", 2 * bh * first * f, 1), Term("phi(Q) z", 2 * bh * (n - first) * f, 2),
        Term("state update phi(K)^T V", 2 * bh * (n - last) * f * dv, 2),
        Term("state update, last chunk", 2 * bh * last * f * dv, 0)]


def flop_terms(name: str, n: int, dims: Dims = DIMS) -> list[Term]:
    """The matrix products of an approximation at N = n (see the module docstring).

    Raises:
        ValueError: an exact contender (their FLOPs follow the 4*B*H*D*pairs convention: ``flops``).
    """
    bh, d, dv = dims.b * dims.h, dims.d, dims.dv
    if name in ("linear", "linear_causal", "performer", "performer_causal"):
        return _kernelized_terms(name, n, dims)
    if name == "linformer":
        kp = dims.proj_len
        return [Term("E K", 2 * bh * kp * n * d, 1), Term("F V", 2 * bh * kp * n * dv, 1),
                Term("Q (E K)^T", 2 * bh * n * kp * d, 2), Term("P (F V)", 2 * bh * n * kp * dv, 2)]
    if name == "nystrom":
        m = dims.landmarks
        return [Term("landmarks K~ = W_k K, Q~ = W_q Q (dense (m, N) means)", 2 * 2 * bh * m * n * d, 1),
                Term("Q K~^T", 2 * bh * n * m * d, 2), Term("Q~ K~^T", 2 * bh * m * m * d, 2),
                Term("Q~ K^T", 2 * bh * m * n * d, 2),
                Term(f"pinv, {dims.pinv_iterations} iterations x 4 (m, m) products",
                     dims.pinv_iterations * 4 * 2 * bh * m ** 3, 2),
                Term("softmax(Q~ K^T) V", 2 * bh * m * n * dv, 2), Term("Z (.)", 2 * bh * m * m * dv, 2),
                Term("softmax(Q K~^T) (.)", 2 * bh * n * m * dv, 2)]
    raise ValueError(f"no product terms for {name!r}; expected one of the approximations "
                     f"{[c for c, x in CONTENDERS.items() if x.kind == 'approx']}")


def flops(name: str, mode: str, n: int, dims: Dims = DIMS) -> float:
    """FLOPs of one call: exact 4*B*H*D*pairs forward (x3.5 with the backward); approximations the
    sum of their products forward, plus each product once per operand with a gradient backward."""
    if CONTENDERS[name].kind == "exact":
        fwd = 4.0 * dims.b * dims.h * dims.d * allowed_pairs(name, n, dims)
        return fwd * (3.5 if mode == "fwd+bwd" else 1.0)
    terms = flop_terms(name, n, dims)
    fwd = float(sum(t.flops for t in terms))
    return fwd + (sum(t.flops * t.grads for t in terms) if mode == "fwd+bwd" else 0.0)


def largest_intermediate(name: str, n: int, dims: Dims = DIMS, sdpa_math: bool = False) -> tuple[str, float]:
    """(description, fp32 elements) of the largest tensor the method materializes besides its
    inputs and output. ``sdpa_math``: torch's SDPA runs its math path, which forms (N, N) scores."""
    bh, C = dims.b * dims.h, dims.chunk
    if name in ("sdpa", "sdpa_causal") and sdpa_math:
        return "scores (B, H, N, N)", float(bh * n * n)
    if name in ("sdpa", "sdpa_causal", "tiled_causal"):
        return "lse (B, H, N)", float(bh * n)
    if name == "banded_longformer":
        return "partial out + lse (B, H, N, Dv + 1)", float(bh * n * (dims.dv + 1))
    if name == "linformer":
        return "scores (B, H, N, Kp)", float(bh * n * dims.proj_len)
    if name == "nystrom":
        return "softmax(Q K~^T), softmax(Q~ K^T) (B, H, N, m) each", float(2 * bh * n * dims.landmarks)
    f = dims.features if name.startswith("performer") else dims.d
    features = ("features phi(Q), phi(K) (B, H, N, F)", float(2 * bh * n * f))
    if CONTENDERS[name].causal and C * n > 2 * f * n:
        return "intra-chunk scores (B, H, N, C)", float(bh * n * C)
    return features


def _io_elements(name: str, n: int, dims: Dims) -> tuple[float, float]:
    """(input, output) fp32 elements: q, k, v (+ E, F for Linformer, W for the Performer); out."""
    bh = dims.b * dims.h
    extra = {"linformer": 2 * dims.proj_len * n, "performer": dims.features * dims.d,
             "performer_causal": dims.features * dims.d}.get(name, 0)
    return float(bh * n * (2 * dims.d + dims.dv) + extra), float(bh * n * dims.dv)


def traffic_bytes(name: str, mode: str, n: int, dims: Dims = DIMS, sdpa_math: bool = False) -> float:
    """Minimum memory traffic (bytes) of one call: inputs + output + the largest intermediate;
    fwd+bwd adds the backward's: inputs, output, dout, dq / dk / dv and the intermediate again."""
    inputs, out = _io_elements(name, n, dims)
    inter = largest_intermediate(name, n, dims, sdpa_math)[1]
    fwd = inputs + out + inter
    if mode != "fwd+bwd":
        return FP32 * fwd
    grads = dims.b * dims.h * n * (2 * dims.d + dims.dv)
    return FP32 * (fwd + inputs + 2 * out + grads + inter)


def estimate_bytes(name: str, mode: str, n: int, dims: Dims = DIMS, sdpa_math: bool = False) -> float:
    """Rough extra peak memory (bytes) of one call, the shape of its growth in N: output (+ gradients)
    plus the largest intermediate 4x forward (it and its temporaries: masked, exp'd, normalized) and
    6x forward + backward (autograd keeps the products' inputs: features, exp'd scores, chunk scores),
    plus the per-chunk (F, Dv) states the causal forms keep for backward. At N=4096 (2026-12-01) it
    was 0.9-2.2x the measured extra peak of the approximations; ``skip_reason`` scales a measured
    peak by its ratio when one exists."""
    out = _io_elements(name, n, dims)[1]
    inter = largest_intermediate(name, n, dims, sdpa_math)[1]
    if mode != "fwd+bwd":
        return FP32 * (out + 4 * inter)
    grads = dims.b * dims.h * n * (2 * dims.d + dims.dv)
    states = 0.0
    if CONTENDERS[name].kind == "approx" and CONTENDERS[name].causal:
        f = dims.features if name.startswith("performer") else dims.d
        states = 3 * math.ceil(n / dims.chunk) * dims.b * dims.h * f * dims.dv
    return FP32 * (2 * out + grads + 6 * inter + states)


# ---------------------------------------------------------------------------------------------
# Child side: the inputs, the calls, one case measured in this process
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One measurement: a contender at sequence length ``n`` in one mode."""

    name: str
    mode: str
    n: int
    reps: int = 3
    case_budget_s: float = 120.0
    seed: int = 0
    as_limit_gb: float = 0.0


def make_inputs(n: int, mode: str, seed: int = 0, dims: Dims = DIMS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Seeded fp32 q, k, v (B, H, N, D / Dv) (requires_grad in fwd+bwd) and dout (B, H, N, Dv)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + n)
    grad = mode == "fwd+bwd"
    q, k = (torch.randn(dims.b, dims.h, n, dims.d, generator=gen).requires_grad_(grad) for _ in range(2))
    v = torch.randn(dims.b, dims.h, n, dims.dv, generator=gen).requires_grad_(grad)
    return q, k, v, torch.randn(dims.b, dims.h, n, dims.dv, generator=gen)


def exact_mask(name: str, dims: Dims = DIMS) -> ak.Mask | None:
    """The mask a contender is exact for (None: full attention)."""
    if name == "banded_longformer":
        return ak.sliding_window(dims.window) | ak.global_tokens(list(range(dims.global_tokens)))
    return ak.causal() if CONTENDERS[name].causal else None


def make_call(name: str, n: int, seed: int = 0, dims: Dims = DIMS) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``fn(q, k, v) -> out`` for a contender at N = n; its constants (E, F, W) built here, seeded."""
    gen = torch.Generator().manual_seed(seed + 17)
    mask = exact_mask(name, dims)
    impl = {"sdpa": "sdpa", "sdpa_causal": "sdpa", "tiled_causal": "tiled", "banded_longformer": "banded"}.get(name)
    if impl is not None:
        return lambda q, k, v: ak.attention(q, k, v, mask=mask, impl=impl)
    if name.startswith("linear"):
        from attnkit.approx.linear import linear_attention
        return lambda q, k, v: linear_attention(q, k, v, mask=mask, chunk_size=dims.chunk)
    if name.startswith("performer"):
        from attnkit.approx.performer import orthogonal_random_features, performer_attention
        W = orthogonal_random_features(dims.features, dims.d, generator=gen)  # (F, D)
        return lambda q, k, v: performer_attention(q, k, v, W, mask=mask, chunk_size=dims.chunk)
    if name == "linformer":
        from attnkit.approx.linformer import linformer_attention
        E, F = (torch.randn(dims.proj_len, n, generator=gen) / math.sqrt(dims.proj_len) for _ in range(2))
        return lambda q, k, v: linformer_attention(q, k, v, E, F)
    if name == "nystrom":
        from attnkit.approx.nystrom import nystrom_attention
        return lambda q, k, v: nystrom_attention(q, k, v, num_landmarks=dims.landmarks,
                                                 pinv_iterations=dims.pinv_iterations)
    raise ValueError(f"unknown contender {name!r}; expected one of {list(CONTENDERS)}")


def make_step(fn: Callable[[Tensor, Tensor, Tensor], Tensor], q: Tensor, k: Tensor, v: Tensor, dout: Tensor,
              mode: str) -> Callable[[], Tensor]:
    """One call: a no_grad forward, or forward + backward of ``dout`` into q, k, v; returns out."""
    def fwd() -> Tensor:
        with torch.no_grad():
            return fn(q, k, v)

    def fwd_bwd() -> Tensor:
        q.grad = k.grad = v.grad = None
        out = fn(q, k, v)
        out.backward(dout)
        return out.detach()

    return fwd_bwd if mode == "fwd+bwd" else fwd


def sample_rows(n: int, seed: int = 0) -> Tensor:
    """About SAMPLED_ROWS query rows: both ends, the middle and seeded random rows, sorted."""
    fixed = {r for r in (0, 1, n // 2, n - 2, n - 1) if 0 <= r < n}
    extra = torch.randperm(n, generator=torch.Generator().manual_seed(seed + n)).tolist()
    rows = sorted(fixed | set([r for r in extra if r not in fixed][: max(0, SAMPLED_ROWS - len(fixed))]))
    return torch.tensor(rows, dtype=torch.long)


def exact_rows(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, mask: ak.Mask | None) -> Tensor:
    """Exact attention of the query ``rows`` in float64, (B, H, R, Dv): ``ak.attention(impl="reference")``
    on those rows and the mask's truth for them, O(R * N), never N x N."""
    n = k.shape[2]
    truth = None if mask is None else mask.evaluate(rows, torch.arange(n), n, n)  # (1, 1, R, N)
    with torch.no_grad():
        return ak.attention(q.detach()[:, :, rows].double(), k.detach().double(), v.detach().double(),
                            mask=truth, impl="reference")


def rel_l2(got: Tensor, ref: Tensor) -> float:
    """||got - ref||_F / ||ref||_F in float64 (inf when ref is 0 and got is not)."""
    diff = (got.double() - ref.double()).norm().item()
    scale = ref.double().norm().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def errors(name: str, q: Tensor, k: Tensor, v: Tensor, rows: Tensor, out_rows: Tensor) -> dict:
    """rel_err against exact attention of the contender's kind (full / causal), and check_err
    against the contender's own exact definition (exact contenders only)."""
    kind_mask = ak.causal() if CONTENDERS[name].causal else None
    ref = exact_rows(q, k, v, rows, kind_mask)
    got = {"rel_err": rel_l2(out_rows, ref), "max_abs_err": (out_rows.double() - ref).abs().max().item()}
    if CONTENDERS[name].kind == "exact":  # its own definition differs from full attention only for Longformer
        got["check_err"] = (rel_l2(out_rows, exact_rows(q, k, v, rows, exact_mask(name)))
                            if name == "banded_longformer" else got["rel_err"])
    return got


def timed_calls(step: Callable[[], Tensor], reps: int, budget_s: float,
                keep: Callable[[Tensor], object]) -> tuple[float, list[float], object]:
    """Warm-up call (its output goes to ``keep``; the rest is freed at once), then up to ``reps``
    timed calls while they fit ``budget_s`` by the warm-up's time; none when the warm-up alone
    took longer. Returns (warm-up s, [timed s], keep(out))."""
    t0 = time.perf_counter()
    out = step()
    warm = time.perf_counter() - t0
    kept = keep(out)
    del out
    times = []
    for _ in range(0 if warm > budget_s else max(1, min(reps, int(budget_s // max(warm, 1e-9))))):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return warm, times, kept


def measure(case: Case) -> dict:
    """Run ``case`` in this process: start-up call, memory reset, warm-up and timed calls, errors."""
    small = make_inputs(STARTUP_N, case.mode, case.seed)
    make_step(make_call(case.name, STARTUP_N, case.seed), *small, case.mode)()  # start-up outside
    del small
    q, k, v, dout = make_inputs(case.n, case.mode, case.seed)
    fn = make_call(case.name, case.n, case.seed)
    rows = sample_rows(case.n, case.seed)
    release_memory()
    reset_peak_rss()
    base = peak_rss_mb()
    warm, times, out_rows = timed_calls(make_step(fn, q, k, v, dout, case.mode), case.reps, case.case_budget_s,
                                        keep=lambda out: out[:, :, rows].clone())
    peak = peak_rss_mb()
    return {"warmup_s": warm, "times_s": times, "baseline_rss_mb": base, "peak_rss_mb": peak,
            "extra_peak_mb": peak - base, "threads": torch.get_num_threads(),
            **errors(case.name, q, k, v, rows, out_rows)}


def child_main(case_json: str) -> int:
    """The child process: measure one case, print its result as one tagged JSON line."""
    case = Case(**json.loads(case_json))
    _limit_address_space(case.as_limit_gb)
    print(RESULT_TAG + json.dumps(measured_or_failed(measure, case)), flush=True)
    return 0


def sdpa_kernels(n: int = 64) -> dict[str, list[str]]:
    """The aten attention kernels ``ak.attention(impl="sdpa")`` runs, per mode and causal, probed at
    a small N (e.g. ``_scaled_dot_product_flash_attention_for_cpu``); [] means torch's math path
    (matmul + softmax, (N, N) scores)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if "attention" in name:
                self.names.add(name)
            return func(*args, **(kwargs or {}))

    found = {}
    for name in ("sdpa", "sdpa_causal"):
        for mode in MODES:
            with Seen() as seen:
                make_step(make_call(name, n), *make_inputs(n, mode), mode)()
            found[f"{name} {mode}"] = sorted(seen.names)
    return found


# ---------------------------------------------------------------------------------------------
# Parent side: skips, one child per case, rows, crossovers, the results files
# ---------------------------------------------------------------------------------------------

def run_child(case: Case, timeout_s: float) -> dict:
    """Run ``case`` in a fresh Python process; its result (status ok / oom / timeout / error)."""
    return run_case_process([sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(asdict(case))],
                            timeout_s)


def call_seconds(row: dict) -> float | None:
    """The row's time per call (s): the median of the timed calls, or the warm-up if none ran."""
    if row.get("status") != "ok":
        return None
    return statistics.median(row["times_s"]) if row["times_s"] else row["warmup_s"]


def predicted_gb(case: Case, previous: dict | None, sdpa_math: bool = False) -> tuple[float, str]:
    """(GB, how): the extra peak of ``case`` predicted from the same contender and mode at a smaller
    N (its measured extra peak times the ratio of ``estimate_bytes``), or ``estimate_bytes`` alone."""
    need = estimate_bytes(case.name, case.mode, case.n, sdpa_math=sdpa_math)
    if previous is None or previous["status"] != "ok" or not previous.get("extra_peak_mb"):
        return need / GB, "estimated"
    then = estimate_bytes(case.name, case.mode, previous["N"], sdpa_math=sdpa_math)
    return (previous["extra_peak_mb"] * MB * need / then / GB,
            f"predicted from N={previous['N']}'s {previous['extra_peak_mb']:.0f} MB")


def skip_reason(case: Case, previous: dict | None, mem_budget_gb: float, timeout_s: float,
                sdpa_math: bool = False) -> str | None:
    """Why ``case`` is not run, or None. ``previous``: the row of the same contender and mode at
    the last smaller N. Skipped: a predicted extra peak over the memory budget (``predicted_gb``), a
    smaller N that did not finish, a call predicted (time there x the FLOP ratio) past the timeout."""
    need, how = predicted_gb(case, previous, sdpa_math)
    if need > mem_budget_gb:
        return f"{how}: {need:.1f} GB extra peak, over the {mem_budget_gb:g} GB budget (--mem-budget-gb)"
    if previous is None:
        return None
    if previous["status"] == "skipped":
        return f"N={previous['N']} was skipped"
    if previous["status"] != "ok":
        return f"N={previous['N']} ended '{previous['status']}'"
    predicted = call_seconds(previous) * flops(case.name, case.mode, case.n) / previous["flops"]
    if predicted > timeout_s:
        return (f"predicted {predicted:.0f} s a call (N={previous['N']}: {call_seconds(previous):.1f} s, times the "
                f"FLOP ratio), over the {timeout_s:g} s limit (--timeout)")
    return None


def make_row(case: Case, result: dict, sdpa_math: bool = False) -> dict:
    """One output row: the case, its result, time per call, FLOPs, bytes and their rates."""
    c = CONTENDERS[case.name]
    fl = flops(case.name, case.mode, case.n)
    nbytes = traffic_bytes(case.name, case.mode, case.n, sdpa_math=sdpa_math)
    row = {"contender": case.name, "kind": c.kind, "causal": c.causal, "mode": case.mode, "N": case.n,
           "call": c.call, "flops": fl, "bytes": nbytes, "flop_per_byte": fl / nbytes,
           "intermediate": largest_intermediate(case.name, case.n, sdpa_math=sdpa_math)[0],
           "estimate_gb": estimate_bytes(case.name, case.mode, case.n, sdpa_math=sdpa_math) / GB, **result}
    sec = call_seconds(row)
    row["seconds"] = sec
    row["gflops"] = fl / sec / 1e9 if sec else None
    return row


def exact_baseline(causal: bool) -> tuple[str, ...]:
    """The exact contenders an approximation of this kind is timed against (the fastest of them)."""
    return ("sdpa_causal", "tiled_causal") if causal else ("sdpa",)


def crossovers(rows: Sequence[dict]) -> list[dict]:
    """Per mode and approximation: the N from which it is faster than the fastest exact contender
    of its kind (``baseline`` "exact": ``exact_baseline``; "longformer": banded_longformer, for the
    non-causal ones), over the N where both were measured.

    ``faster_from``: the smallest such N with the approximation faster there and at every larger
    common N (None: not faster at the largest); ``interpolated``: log-log interpolation of the time
    ratio between the common N just below ``faster_from`` and it (None when faster at every N);
    ``ratio_at_max`` / ``rel_err_at_max``: approximation / baseline time and the approximation's
    error at the largest common N; ``fastest_exact``: the baseline that was fastest, per N.
    """
    secs = {(r["mode"], r["contender"], r["N"]): call_seconds(r) for r in rows}
    errs = {(r["mode"], r["contender"], r["N"]): r.get("rel_err") for r in rows}
    out = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for name in dict.fromkeys(r["contender"] for r in rows if r["kind"] == "approx"):
            causal = CONTENDERS[name].causal
            for base, names in (("exact", exact_baseline(causal)),
                                *(() if causal else (("longformer", ("banded_longformer",)),))):
                row = _crossing(mode, name, base, names, secs)
                row["rel_err_at_max"] = errs.get((mode, name, row["common_ns"][-1])) if row["common_ns"] else None
                out.append(row)
    return out


def _crossing(mode: str, name: str, base: str, names: tuple[str, ...], secs: dict) -> dict:
    """One approximation against one baseline set (see ``crossovers``)."""
    ns = sorted({n for (m, c, n) in secs if m == mode and c == name})
    points = []  # (N, approx s, best exact s, best exact name)
    for n in ns:
        a = secs.get((mode, name, n))
        exact = [(secs[(mode, e, n)], e) for e in names if secs.get((mode, e, n))]
        if a and exact:
            points.append((n, a, *min(exact)))
    row = {"mode": mode, "approx": name, "baseline": base, "common_ns": [p[0] for p in points],
           "faster_from": None, "interpolated": None, "ratio_at_max": None, "fastest_exact": {}}
    if not points:
        return row
    row["ratio_at_max"] = points[-1][1] / points[-1][2]
    row["fastest_exact"] = {p[0]: p[3] for p in points}
    i = len(points)
    while i > 0 and points[i - 1][1] < points[i - 1][2]:
        i -= 1
    if i < len(points):
        row["faster_from"] = points[i][0]
        if i > 0:
            (n0, a0, e0, _), (n1, a1, e1, _) = points[i - 1], points[i]
            r0, r1 = math.log(a0 / e0), math.log(a1 / e1)  # r0 >= 0 > r1
            row["interpolated"] = math.exp(math.log(n0) + (math.log(n1) - math.log(n0)) * r0 / (r0 - r1))
    return row


def _fmt(x: float | None, digits: int = 3) -> str:
    """A number for the tables: integers from 100 up, ``digits`` significant digits below."""
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.{digits}g}"


def _crossover_cell(c: dict) -> str:
    if not c["common_ns"]:
        return "no common N"
    if c["faster_from"] is None:
        return f"not faster up to N={c['common_ns'][-1]}"
    if c["interpolated"] is None:
        return f"faster at every N measured (from {c['faster_from']})"
    return f"N={c['faster_from']} (interpolated ~{c['interpolated']:.0f})"


def sdpa_summary(kernels: dict[str, list[str]]) -> str:
    """One sentence on the torch SDPA kernels the probe saw."""
    if all(any("flash" in k for k in found) for found in kernels.values()):
        return "torch SDPA ran its CPU flash kernel (no (N, N) scores) in every mode"
    return "torch SDPA kernels: " + "; ".join(f"{what}: {', '.join(found) or 'math path'}"
                                               for what, found in kernels.items())


def _intro(head: dict) -> list[str]:
    s = head["settings"]
    return [f"# Approximate attention vs exact on the CPU, {head['date']}", "",
            f"{head['cpu_model']}, {head['cpu_count']} CPUs, torch {head['torch_version']} ({head['torch_num_threads']} "
            f"threads), attnkit {head['attnkit_version']}. {head.get('note') or ''}", "",
            f"fp32, B={s['B']}, H={s['H']}, D=Dv={s['D']}, q, k, v ~ N(0, 1). Performer F={s['features']} "
            f"orthogonal softmax features, Linformer Kp={s['proj_len']} (E, F ~ N(0, 1/Kp)), Nystrom m={s['landmarks']}, "
            f"causal chunks C={s['chunk']}, Longformer window {s['window']} + {s['global_tokens']} global tokens; "
            f"{sdpa_summary(head['sdpa_kernels'])}. Time: median of the timed calls after a warm-up (calls = 0: "
            "the warm-up alone, when it took longer than the case budget). Memory: extra peak RSS over the RSS "
            "before the warm-up (MB = 2^20 bytes), each case in its own process. FLOPs (matrix products) and bytes "
            "(minimum traffic: inputs, output, the largest intermediate): see the script's docstring. Error: "
            f"relative L2 error of the output on {SAMPLED_ROWS} sampled rows against exact full (non-causal) or "
            "causal attention in float64 (for banded_longformer: the pattern against full attention, its own "
            "exactness in brackets). vs exact: time / the fastest exact contender of the same kind "
            "(sdpa; causal: sdpa_causal or tiled_causal) at that N."]


def markdown(head: dict, rows: Sequence[dict]) -> str:
    """The results: machine and method, the crossovers, one table per mode, notes."""
    lines = _intro(head) + ["", "## Crossovers: approximation faster than exact from N", "",
                            "| mode | approximation | against | from N | time ratio at largest N | its rel err there "
                            "| fastest exact |", "|---|---|---|---|---|---|---|"]
    for c in crossovers(rows):
        against = "Longformer pattern (banded)" if c["baseline"] == "longformer" else " or ".join(
            exact_baseline(CONTENDERS[c["approx"]].causal))
        fastest = sorted(set(c["fastest_exact"].values()))
        fastest = fastest[0] if len(fastest) == 1 else ", ".join(f"{n}: {e}" for n, e in c["fastest_exact"].items())
        lines.append(f"| {c['mode']} | {c['approx']} | {against} | {_crossover_cell(c)} | {_fmt(c['ratio_at_max'])}x "
                     f"| {_fmt(c['rel_err_at_max'], 2)} | {fastest or '-'} |")
    secs = {(r["mode"], r["contender"], r["N"]): call_seconds(r) for r in rows}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        lines += ["", f"## {mode}", "", "| N | contender | median ms | calls | vs exact | extra peak MB | GFLOP "
                  "| GFLOP/s | MB moved | FLOP/byte | rel L2 err | largest intermediate |", "|" + "---|" * 12]
        for r in (r for r in rows if r["mode"] == mode):
            ok = r["status"] == "ok"
            base = [secs[k] for k in ((mode, e, r["N"]) for e in exact_baseline(r["causal"])) if secs.get(k)]
            vs = f"{_fmt(r['seconds'] / min(base))}x" if ok and base else "-"
            err = _fmt(r.get("rel_err"), 2) + (f" ({_fmt(r['check_err'], 2)})" if ok and
                                               r["contender"] == "banded_longformer" else "")
            lines.append(f"| {r['N']} | {r['contender']} | {_fmt(r['seconds'] * 1e3) if ok else r['status']} | "
                         f"{len(r['times_s']) if ok else '-'} | {vs} | {_fmt(r.get('extra_peak_mb'))} | "
                         f"{_fmt(r['flops'] / 1e9)} | {_fmt(r['gflops'])} | {_fmt(r['bytes'] / MB)} | "
                         f"{_fmt(r['flop_per_byte'])} | {err if ok else '-'} | {r['intermediate']} |")
    notes = [f"- N={r['N']} {r['mode']} {r['contender']}: {r['status']}: {r.get('reason')}"
             for r in rows if r["status"] != "ok"]
    notes += [f"- N={r['N']} {r['mode']} {r['contender']}: an exact contender off its definition: check_err "
              f"{r['check_err']:.2g}" for r in rows if r["status"] == "ok" and (r.get("check_err") or 0) > 1e-4]
    return "\n".join(lines + (["", "Notes:", *notes] if notes else [])) + "\n"


def write_results(stem: Path, head: dict, rows: Sequence[dict]) -> None:
    """(Re)write ``stem.json`` and ``stem.md``."""
    doc = {"header": head, "rows": list(rows), "crossovers": crossovers(rows)}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(head, rows))


def format_row(r: dict) -> str:
    what = f"N={r['N']:>6} {r['mode']:<7} {r['contender']:<17}"
    if r["status"] != "ok":
        return f"{what} {r['status']}: {r.get('reason')}"
    return (f"{what} {r['seconds'] * 1e3:10.1f} ms x{len(r['times_s'])}  {r['gflops']:6.1f} GFLOP/s  "
            f"extra peak {r['extra_peak_mb']:8.1f} MB  rel err {r['rel_err']:.2e}")


def run(args: argparse.Namespace) -> list[dict]:
    """Every (N, mode, contender) case, N outer; the results rewritten after each."""
    kernels = sdpa_kernels()
    sdpa_math = any(not found for found in kernels.values())
    head = header()
    head.update(note=args.note, sdpa_kernels=kernels, settings={**asdict(DIMS), "B": B, "H": H, "D": D,
                "dtype": "float32", "device": "cpu", "sampled_rows": SAMPLED_ROWS},
                options={k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k != "case"})
    stem = Path(args.out_dir) / f"approx_speed_{_dt.datetime.now():%Y-%m-%dT%H%M}"
    rows: list[dict] = []
    last: dict[tuple[str, str], dict] = {}
    for n in args.ns:
        for mode in args.modes:
            for name in args.contenders:
                case = Case(name, mode, n, args.reps, args.case_budget_s, as_limit_gb=args.as_limit_gb)
                reason = skip_reason(case, last.get((name, mode)), args.mem_budget_gb, args.timeout, sdpa_math)
                result = {"status": "skipped", "reason": reason} if reason else run_child(case, args.timeout)
                rows.append(make_row(case, result, sdpa_math))
                last[(name, mode)] = rows[-1]
                write_results(stem, head, rows)
                print(format_row(rows[-1]), flush=True)
    print(f"wrote {stem}.json and {stem}.md", flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ns", metavar="N,...", type=CommaList(int), default=NS,
                   help=f"sequence lengths, comma-separated (default {','.join(map(str, NS))})")
    p.add_argument("--modes", metavar="MODE,...", type=CommaList(str), default=MODES,
                   help=f"from {{{','.join(MODES)}}} (default both)")
    p.add_argument("--contenders", metavar="C,...", type=CommaList(str), default=tuple(CONTENDERS),
                   help=f"from {{{','.join(CONTENDERS)}}} (default all)")
    p.add_argument("--reps", type=int, default=3, help="timed calls per case at most, after one warm-up (default 3)")
    p.add_argument("--case-budget-s", type=float, default=120.0,
                   help="fewer timed calls when the warm-up says they would take longer than this; none when the "
                        "warm-up alone did (its time is then reported) (default 120)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds before a case's process is stopped; also skips a case predicted to take longer "
                        "(default 3600)")
    p.add_argument("--mem-budget-gb", type=float, default=16.0,
                   help="skip cases whose estimated extra peak exceeds this (default 16)")
    p.add_argument("--as-limit-gb", type=float, default=0.0,
                   help="address-space limit of each case's process, so running out is a row (default 0: none)")
    p.add_argument("--note", default="", help="a line about the machine for the results (e.g. quiet, shared)")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the JSON / markdown go (created)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (JSON) in this process
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for what, got, allowed in (("mode", args.modes, MODES), ("contender", args.contenders, tuple(CONTENDERS))):
        if bad := [x for x in got if x not in allowed]:
            p.error(f"unknown {what}(s) {bad}; choose from {list(allowed)}")
    if bad := [n for n in args.ns if n < 1]:
        p.error(f"--ns: sequence lengths must be >= 1, got {bad}")
    if args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.case is not None:
        return child_main(args.case)
    try:  # before any case: the results are written after each one
        prepare_output_dir(args.out_dir, "--out-dir")
    except OutputPathError as e:
        print(f"approx_speed.py: error: {e}", file=sys.stderr)
        return 2
    print(f"approximate vs exact attention: N {list(args.ns)}, modes {list(args.modes)}, contenders "
          f"{list(args.contenders)}, torch {torch.__version__} ({torch.get_num_threads()} threads)", flush=True)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
