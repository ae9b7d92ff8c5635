"""Property-based cases: random shapes and random mask expressions (tiled) and random Longformer
masks (banded), against the reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnkit as ak
from attnkit.ops.reference import reference_attention
from attnkit.ops.tiled import tiled_attention

from test_masks import assert_kinds_consistent


@st.composite
def primitive_masks(draw, B: int, Nq: int, Nk: int):
    kind = draw(st.sampled_from(["causal", "window", "global", "padding", "document"]))
    if kind == "causal":
        return ak.causal()
    if kind == "window":
        return ak.sliding_window(draw(st.integers(0, 9)), draw(st.integers(0, 9)))
    if kind == "global":
        return ak.global_tokens(draw(st.lists(st.integers(0, Nk - 1), min_size=0, max_size=3, unique=True)))
    if kind == "padding":
        return ak.key_padding(draw(st.lists(st.integers(0, Nk), min_size=B, max_size=B)))
    cuts = sorted(draw(st.lists(st.integers(1, Nk), max_size=3)))
    return ak.document(torch.bucketize(torch.arange(Nk), torch.tensor(cuts, dtype=torch.long), right=True))


@st.composite
def mask_expressions(draw, B: int, Nq: int, Nk: int, depth: int = 2):
    if depth == 0 or draw(st.booleans()):
        m = draw(primitive_masks(B, Nq, Nk))
    else:
        a = draw(mask_expressions(B, Nq, Nk, depth - 1))
        b = draw(mask_expressions(B, Nq, Nk, depth - 1))
        m = draw(st.sampled_from([a & b, a | b]))
    return ~m if draw(st.integers(0, 5)) == 0 else m


@st.composite
def problems(draw):
    B, Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    Nk = draw(st.integers(1, 70))
    Nq = draw(st.integers(1, Nk if draw(st.booleans()) else 70))
    D = draw(st.sampled_from([4, 8, 16]))
    mask = draw(mask_expressions(B, Nq, Nk))
    if isinstance(mask, ak.masks.Document) or "document" in repr(mask):
        Nq = min(Nq, Nk)  # documents need every query at a key position
    blocks = (draw(st.integers(1, 33)), draw(st.integers(1, 33)))
    bias = ak.alibi(Hkv * group) if draw(st.booleans()) else None
    return B, Hkv * group, Hkv, Nq, Nk, D, mask, bias, blocks, draw(st.integers(0, 2 ** 16))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(["fused", "math"]))
def test_tiled_matches_reference_on_random_expressions(problem, kernel):
    B, Hq, Hkv, Nq, Nk, D, mask, bias, (bq, bk), seed = problem
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64, requires_grad=True)
    out_r, lse_r = reference_attention(q, k, v, mask=mask, bias=bias, scale=D ** -0.5)
    out_t, lse_t = tiled_attention(q, k, v, mask=mask, bias=bias, scale=D ** -0.5,
                                   block_q=bq, block_k=bk, kernel=kernel)
    assert (out_t - out_r).abs().max() < 1e-10
    assert torch.equal(torch.isneginf(lse_t), torch.isneginf(lse_r))
    grad = torch.randn_like(out_r)
    g_r = torch.autograd.grad(out_r, (q, k, v), grad)
    g_t = torch.autograd.grad(out_t, (q, k, v), grad)
    for a, b in zip(g_t, g_r):
        assert torch.isfinite(a).all() and (a - b).abs().max() < 1e-9
    assert_kinds_consistent(mask, Nq, Nk, bq, bk)
    with torch.no_grad():  # torch SDPA (materializing mask and bias) agrees too
        dense_bias = None if bias is None else bias.materialize(Nq, Nk).double()
        out_s = ak.attention(q, k, v, mask=mask, bias=dense_bias, impl="sdpa")
    assert (out_s - out_r).abs().max() < 1e-10


@st.composite
def longformer_problems(draw):
    """Random members of banded's mask family: windows of any width (wider than N too), dilation
    shared or per head, causal, global tokens per batch or per sample, key padding."""
    B, Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Hq, Nk = Hkv * group, draw(st.integers(1, 90))
    Nq = draw(st.integers(1, Nk if draw(st.booleans()) else 90))
    dil = draw(st.one_of(st.integers(1, 4), st.lists(st.integers(1, 4), min_size=Hq, max_size=Hq)))
    mask = ak.sliding_window(draw(st.integers(0, 40)), draw(st.integers(0, 40)), dilation=dil)
    if draw(st.booleans()):
        mask = ak.causal() & mask
    if draw(st.booleans()):
        if draw(st.booleans()):
            mask = mask | ak.global_tokens(draw(st.lists(st.integers(0, Nk - 1), max_size=4, unique=True)))
        else:
            g = torch.Generator().manual_seed(draw(st.integers(0, 99)))
            mask = mask | ak.global_tokens(torch.rand(B, Nk, generator=g) < 0.1)
    if draw(st.booleans()):
        mask = mask & ak.key_padding(draw(st.lists(st.integers(0, Nk), min_size=B, max_size=B)))
    return B, Hq, Hkv, Nq, Nk, draw(st.sampled_from([4, 8])), mask, draw(st.integers(0, 2 ** 16))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(longformer_problems(), st.sampled_from(["fused", "math"]))
def test_banded_matches_reference_on_random_longformer_masks(problem, kernel):
    from attnkit.ops.banded import banded_attention
    B, Hq, Hkv, Nq, Nk, D, mask, seed = problem
    dtype = torch.float32 if kernel == "fused" else torch.float64  # the CPU flash kernel: no fp64
    tol = 1e-5 if kernel == "fused" else 1e-10
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype, requires_grad=True)
    out_r, lse_r = reference_attention(q.double(), k.double(), v.double(), mask=mask, bias=None, scale=D ** -0.5)
    out_b, lse_b = banded_attention(q, k, v, mask=mask, scale=D ** -0.5, kernel=kernel)
    assert (out_b.double() - out_r).abs().max() < tol
    assert torch.equal(torch.isneginf(lse_b), torch.isneginf(lse_r))
    grad = torch.randn_like(out_r)
    g_r = torch.autograd.grad(out_r, (q, k, v), grad)
    g_b = torch.autograd.grad(out_b, (q, k, v), grad.to(dtype))
    for a, b in zip(g_b, g_r):
        assert torch.isfinite(a).all() and (a.double() - b).abs().max() < 10 * tol
