"""Dropout and softcap inside the fused Triton kernels (issue 16, items 2 and 3), in Triton's interpreter.

Dropout's keep mask is a pure function of (seed, b, query head, i, j) (``ops/dropout.py``): every
tile of the forward, dQ and dK/dV kernels draws its own bits from Philox, so for one seed the
kernels keep exactly the pairs the oracle keeps, and out, lse and dq/dk/dv equal
``reference_attention(..., dropout_seed=seed)`` within the numerics contract (tests/_numerics.py)
under any mask, ALiBi, GQA and Schedule. A wrong keep bit moves a probability by 1 / (1 - p): far
outside the contract. The keep bits are also read back exactly (q = 0, V = I).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import attnkit as ak
from _numerics import FLOOR, assert_close_to_oracle
from attnkit.ops import dropout as D
from attnkit.ops.reference import reference_attention

triton_ops = pytest.importorskip("attnkit.ops.triton.op", reason="needs triton")
from attnkit.ops.triton import why_not  # noqa: E402
from attnkit.ops.triton.configs import Schedule, interpreting  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and not interpreting(),
                                reason="needs CUDA or Triton's interpreter (TRITON_INTERPRET=1, set by conftest)")


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    mask: Callable[[], ak.Mask | None] = lambda: None
    alibi: bool = False


CASES = {c.name: c for c in [
    Case("dense", 1, 2, 2, 37, 37, 16),
    Case("causal-gqa-nq>nk", 1, 4, 2, 45, 30, 16, ak.causal),  # rows 0..14 see nothing
    Case("window|global&padding", 2, 2, 1, 40, 40, 16,  # sample 1: rows past 15 see nothing
         lambda: (ak.sliding_window(3) | ak.global_tokens([30])) & ak.key_padding([40, 12])),
    Case("alibi-causal-nq<nk", 1, 2, 2, 17, 50, 32, ak.causal, alibi=True),
]}
MODES = {"dropout": (0.3, None), "softcap": (0.0, 2.0), "both": (0.4, 1.5)}  # (p, cap)
RUNS = [("causal-gqa-nq>nk", mode) for mode in MODES] + [(name, "both") for name in CASES if name != "causal-gqa-nq>nk"]
SEED = 2 ** 40 + 12345  # both 32-bit halves of Philox's key non-zero


def _inputs(case: Case, seed: int = 0):
    """float64 q, k, v (big enough scores that a cap of 1.5-2 bites), an upstream gradient for out
    and one for lse."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.B, case.Hq, case.Nq, case.D, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(case.B, case.Hkv, case.Nk, case.D, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(case.B, case.Hkv, case.Nk, case.D, generator=g, dtype=torch.float64)
    g_out = torch.randn(case.B, case.Hq, case.Nq, case.D, generator=g, dtype=torch.float64)
    g_lse = torch.randn(case.B, case.Hq, case.Nq, generator=g, dtype=torch.float64)
    return (q, k, v), g_out, g_lse


def _results(run, qkv, dtype, g_out, g_lse):
    """out, lse and d(<out, g_out> + <finite lse, g_lse>) / d(q, k, v) of ``run`` in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in qkv]
    out, lse = run(*leaves)
    loss = (out.double() * g_out).sum() + (torch.where(torch.isfinite(lse), lse, 0.0).double() * g_lse).sum()
    return out.detach(), lse.detach(), torch.autograd.grad(loss, leaves)


def check(run, case: Case, p: float, cap: float | None, seed: int, dtype=torch.float32):
    """``run(q, k, v) -> (out, lse)`` in ``dtype`` against the float64 oracle with the same seed,
    within the numerics contract (2x the naive formula's error in ``dtype`` + floor, 3x for
    gradients), forward and backward through out and lse."""
    qkv, g_out, g_lse = _inputs(case)
    mask, bias = case.mask(), (ak.alibi(case.Hq) if case.alibi else None)

    def oracle(dt, upcast):
        return lambda q, k, v: reference_attention(q, k, v, mask=mask, bias=bias, scale=case.D ** -0.5,
                                                   dropout_p=p, softcap=cap, dropout_seed=seed, upcast=upcast)
    got = _results(run, qkv, dtype, g_out, g_lse)
    want = _results(oracle(torch.float64, True), qkv, torch.float64, g_out, g_lse)
    naive = _results(oracle(dtype, False), qkv, dtype, g_out, g_lse)
    assert got[0].dtype == dtype
    assert_close_to_oracle("out", got[0], want[0], naive[0], dtype)
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(want[1])), "lse: -inf rows differ from the oracle"
    fin = torch.isfinite(want[1])
    assert_close_to_oracle("lse", got[1][fin], want[1][fin], naive[1][fin], dtype)
    for name, a, o, n in zip(("dq", "dk", "dv"), got[2], want[2], naive[2]):
        assert_close_to_oracle(name, a, o, n, dtype, factor=3.0)


def _public(case: Case, p: float, cap: float | None, torch_seed: int):
    """ak.attention(impl="triton") with the seed torch's generator gives after manual_seed."""
    def run(q, k, v):
        torch.manual_seed(torch_seed)
        return ak.attention(q, k, v, mask=case.mask(), bias=ak.alibi(case.Hq) if case.alibi else None,
                            dropout_p=p, softcap=cap, impl="triton", return_lse=True)
    return run


@pytest.mark.parametrize("name, mode", RUNS, ids=[f"{n}-{m}" for n, m in RUNS])
def test_attention_equals_the_oracle_with_the_same_seed(name, mode):
    """ak.attention(impl="triton") draws its seed from torch's generator: the oracle given that
    seed keeps the same pairs, so out, lse and the gradients agree."""
    p, cap = MODES[mode]
    torch.manual_seed(77)
    seed = D.draw_seed()
    check(_public(CASES[name], p, cap, 77), CASES[name], p, cap, seed)


# One case where every switch changes something: GQA (gqa="group" walks both query heads of a kv
# head), per-head ALiBi slopes, dead rows (Nq > Nk under causal), key lengths, ragged blocks.
SCHEDULE_CASE = Case("schedules", 1, 4, 2, 40, 33, 16, lambda: ak.causal() & ak.key_padding([25]), alibi=True)
SCHEDULES = {
    "atomic-dq": dict(schedule=Schedule(dq="atomic")),
    "fused-delta": dict(schedule=Schedule(delta="fused")),
    "gqa-group": dict(schedule=Schedule(gqa="group")),
    "loads-persistent": dict(schedule=Schedule(tma=True, warp_specialize=True, persistent=1)),
    "split-32x16": dict(split_tiles=2, block_m=32, block_n=16),
}


@pytest.mark.parametrize("switch", list(SCHEDULES))
def test_each_schedule_switch_draws_the_same_bits(switch):
    """triton_attention with an explicit seed under each Schedule switch and split key lists: the
    same keep bits (bh = b * Hq + query head in every kernel) and the same cap derivative."""
    p, cap = MODES["both"]
    case = SCHEDULE_CASE

    def run(q, k, v):
        return triton_ops.triton_attention(q, k, v, mask=case.mask(), bias=ak.alibi(case.Hq), scale=case.D ** -0.5,
                                           softcap=cap, dropout_p=p, dropout_seed=SEED, **SCHEDULES[switch])
    check(run, case, p, cap, SEED)


def test_float16_within_the_numerics_contract():
    p, cap = MODES["both"]
    torch.manual_seed(5)
    seed = D.draw_seed()
    check(_public(CASES["window|global&padding"], p, cap, 5), CASES["window|global&padding"], p, cap, seed,
          dtype=torch.float16)


@pytest.mark.parametrize("seed, gqa", [(7, "sum"), (SEED, "group")])  # a seed that fits int32 and one that does not
def test_keep_bits_are_read_back_exactly(seed, gqa):
    """q = 0 makes every probability 1 / Nk; with V = I (Nk = D) out[i, j] = keep(i, j) / ((1 - p) Nk),
    and with dO = I (Nq = D) dV[j, i] = sum over the kv head's query heads of the same: the forward's
    and the dK/dV kernel's keep bits, bit for bit, against ``dropout.dense_keep_mask``."""
    B, Hq, Hkv, N, p = 2, 4, 2, 32, 0.3
    q = torch.zeros(B, Hq, N, N)
    k = torch.randn(B, Hkv, N, N)
    v = torch.eye(N).expand(B, Hkv, N, N).contiguous().requires_grad_()
    out, _ = triton_ops.triton_attention(q, k, v, dropout_p=p, dropout_seed=seed, schedule=Schedule(gqa=gqa))
    (dv,) = torch.autograd.grad(out, v, torch.eye(N).expand(B, Hq, N, N))
    keep = D.dense_keep_mask(seed, p, B, Hq, N, N)  # (B, Hq, Nq, Nk)
    unit = 1.0 / ((1 - p) * N)
    assert torch.equal((out / unit).round(), keep.float()) and (out / unit - keep.float()).abs().max() < 1e-4
    group = keep.float().view(B, Hkv, Hq // Hkv, N, N).sum(2).transpose(-1, -2)  # (B, Hkv, Nk, Nq)
    assert torch.equal((dv / unit).round(), group)
    assert 0.6 < keep.float().mean() < 0.8  # the mask is not trivially all kept


def test_a_call_without_a_seed_draws_it_from_torch():
    case = CASES["dense"]
    (q, k, v), _, _ = _inputs(case)
    q, k, v = (t.float() for t in (q, k, v))
    outs = []
    for s in (3, 3, 4):
        torch.manual_seed(s)
        outs.append(triton_ops.triton_attention(q, k, v, dropout_p=0.5)[0])
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    torch.manual_seed(3)
    want, _ = reference_attention(q.double(), k.double(), v.double(), mask=None, bias=None, scale=case.D ** -0.5,
                                  dropout_p=0.5)
    assert (outs[0].double() - want).abs().max() < 1e-5


def test_triton_keeps_the_pairs_tiled_keeps():
    """The same torch seed gives the same output on ``tiled`` (where it implements dropout)."""
    case = CASES["causal-gqa-nq>nk"]
    (q, k, v), _, _ = _inputs(case)
    q, k, v = (t.float() for t in (q, k, v))
    results = {}
    for impl in ("triton", "tiled"):
        if not ak.explain(q, k, v, mask=case.mask(), dropout_p=0.3, softcap=2.0).runnable[impl]:
            pytest.skip(f"{impl} does not run dropout with softcap here")
        torch.manual_seed(11)
        results[impl] = ak.attention(q, k, v, mask=case.mask(), dropout_p=0.3, softcap=2.0, impl=impl)
    assert (results["triton"] - results["tiled"]).abs().max() < 20 * FLOOR[torch.float32]


@pytest.mark.parametrize("kw, match", [
    (dict(softcap=0.0), "softcap=0.0: expected a finite number > 0"),
    (dict(softcap=float("inf")), "softcap=inf"),
    (dict(dropout_p=1.0), r"dropout_p=1.0: expected a number in \[0, 1\)"),
    (dict(dropout_p=0.1, dropout_seed=-1), r"dropout_seed=-1: expected an int in \[0, 2\*\*63\)"),
    (dict(dropout_p=0.1, dropout_seed=2 ** 63), "dropout_seed="),
])
def test_bad_arguments_are_refused(kw, match):
    q = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match=match):
        triton_ops.triton_attention(q, q, q, **kw)


def test_why_not_takes_dropout_and_softcap():
    q = torch.randn(1, 2, 16, 16)
    assert why_not(q, q, q, ak.causal(), ak.alibi(2), 0.5, 3.0) is None


@pytest.mark.parametrize("cap", [1e3, 1e6])
def test_a_large_softcap_keeps_float32_accuracy(cap):
    """Every score sits where tanh(x) ~ x: the kernels' tanh must not cancel there (it did: 8e-3 at
    softcap 1e6 from (1 - e) / (1 + e))."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=g, requires_grad=True) for _ in range(3))
    out = ak.attention(q, k, v, softcap=cap, mask=ak.causal(), impl="triton")
    ref = reference_attention(*(t.detach().double().requires_grad_() for t in (q, k, v)), mask=ak.causal(), bias=None,
                              scale=0.25, softcap=cap)[0]
    assert (out.double() - ref).abs().max() < 1e-6
