"""Every backend against the float64 reference on the shared case table, forward and backward."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit import _dispatch
from attnkit._validate import validate
from attnkit.ops.tiled import tiled_attention

from _numerics import check_backend
from cases import CASES, BY_NAME


def _public(impl):
    def make(case):
        mask, bias = case.make_mask(), case.make_bias()

        def run(q, k, v):
            return ak.attention(q, k, v, mask=mask, bias=bias, impl=impl, return_lse=True)
        return run, mask, bias
    return make


def _tiled(kernel, block_q, block_k):
    def make(case):
        mask, bias = case.make_mask(), case.make_bias()
        scale = case.D ** -0.5

        def run(q, k, v):
            return tiled_attention(q, k, v, mask=mask, bias=bias, scale=scale, block_q=block_q,
                                   block_k=block_k, kernel=kernel)
        return run, mask, bias
    return make


RUNNERS = {
    "sdpa": _public("sdpa"),
    "tiled": _public("tiled"),
    "tiled-fused-small": _tiled("auto", 16, 8),
    "tiled-math-small": _tiled("math", 16, 8),
    "tiled-fused-odd": _tiled("auto", 23, 13),
}


def _supported(runner: str, case, dtype) -> str | None:
    if not runner.startswith("sdpa"):
        return None
    q, k, v = case.inputs(dtype=dtype)
    call = validate(q, k, v, mask=case.make_mask(), bias=case.make_bias(), need_lse=True)
    return _dispatch.BACKENDS["sdpa"].why_not(call)


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fp32_forward_backward(runner, case):
    why = _supported(runner, case, torch.float32)
    if why:
        pytest.skip(why)
    run, mask, bias = RUNNERS[runner](case)
    check_backend(run, *case.inputs(seed=hash(case.name) % 1000), mask, bias, case.D ** -0.5, torch.float32)


HALF_CASES = ["dense-odd", "gqa-dense", "causal-nq>nk", "window-global", "padding-empty", "alibi-window-gqa",
              "documents-causal", "dense-bool"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("runner", ["sdpa", "tiled", "tiled-math-small"])
@pytest.mark.parametrize("name", HALF_CASES)
def test_half_forward_backward(name, runner, dtype):
    case = BY_NAME[name]
    why = _supported(runner, case, dtype)
    if why:
        pytest.skip(why)
    run, mask, bias = RUNNERS[runner](case)
    check_backend(run, *case.inputs(seed=3), mask, bias, case.D ** -0.5, dtype)


@pytest.mark.parametrize("runner", ["sdpa", "tiled-fused-small", "tiled-math-small"])
@pytest.mark.parametrize("name", ["causal-nq>nk", "longformer-mix", "alibi-causal", "dense-dv"])
def test_fp64(name, runner):
    case = BY_NAME[name]
    why = _supported(runner, case, torch.float64)
    if why:
        pytest.skip(why)
    run, mask, bias = RUNNERS[runner](case)
    check_backend(run, *case.inputs(seed=5), mask, bias, case.D ** -0.5, torch.float64)


@pytest.mark.parametrize("case", [c for c in CASES if c.mask is not None], ids=lambda c: c.name)
def test_tiled_mask_expression_equals_materialized(case):
    """tiled with the structured mask == reference with the same mask materialized densely."""
    q, k, v = case.inputs(seed=9, dtype=torch.float32)
    mask, bias = case.make_mask(), case.make_bias()
    dense = mask.materialize(case.Nq, case.Nk)  # a raw bool tensor through the public API
    bias_t = None if bias is None else bias.materialize(case.Nq, case.Nk)
    ref = ak.attention(q.double(), k.double(), v.double(), mask=dense,
                       bias=None if bias_t is None else bias_t.double(), impl="reference")
    got = ak.attention(q, k, v, mask=mask, bias=bias, impl="tiled")
    assert (got.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("impl", ["reference", "sdpa", "tiled"])
def test_rows_with_no_key_are_zero_with_zero_grads(impl):
    q, k, v = (torch.randn(2, 2, 9, 8, requires_grad=True) for _ in range(3))
    mask = ak.key_padding([9, 0]) & ~ak.causal()  # batch 1: nothing; batch 0: last row nothing
    out, lse = ak.attention(q, k, v, mask=mask, impl=impl, return_lse=True) if impl != "sdpa" else (
        ak.attention(q, k, v, mask=mask, impl=impl, return_lse=True))
    assert torch.all(out[1] == 0) and torch.all(out[0, :, -1] == 0)
    assert torch.isneginf(lse[1]).all() and torch.isneginf(lse[0, :, -1]).all()
    assert torch.isfinite(lse[0, :, :-1]).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[1] == 0) and torch.all(k.grad[1] == 0) and torch.all(v.grad[1] == 0)


@pytest.mark.parametrize("kernel", ["fused", "math"])
def test_tiled_lse_gradient(kernel):
    """A loss that uses the lse too: tiled's backward folds d lse into the row term."""
    case = BY_NAME["window-global"]
    q, k, v = (t.requires_grad_() for t in case.inputs(seed=1))
    mask = case.make_mask()
    out_r, lse_r = ak.attention(q, k, v, mask=mask, impl="reference", return_lse=True)
    g_ref = torch.autograd.grad((out_r.sum(-1) * lse_r).sum(), (q, k, v))
    out_t, lse_t = tiled_attention(q, k, v, mask=mask, bias=None, scale=case.D ** -0.5,
                                   block_q=32, block_k=16, kernel=kernel)
    g_t = torch.autograd.grad((out_t.sum(-1) * lse_t).sum(), (q, k, v))
    for a, b in zip(g_t, g_ref):
        assert (a - b).abs().max().item() < 1e-9


def test_sdpa_causal_alignment_is_bottom_right():
    """torch's is_causal is top-left; attnkit's sdpa backend must still be bottom-right for Nq != Nk."""
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    ours = ak.attention(q, k, v, mask=ak.causal(), impl="sdpa")
    truth = ak.attention(q, k, v, mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool(),
                         impl="reference")
    top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (ours - truth).abs().max() < 1e-6
    assert (top_left - truth).abs().max() > 1e-3  # the trap this guards against is real


def test_gradcheck_float64():
    case = BY_NAME["longformer-mix"]
    B, H, N, D = 1, 2, 21, 4
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = (ak.sliding_window(2) | ak.global_tokens([5])) & ak.key_padding([18])
    assert case.mask is not None
    for kernel in ("fused", "math"):
        f = lambda q, k, v: tiled_attention(q, k, v, mask=mask, bias=ak.alibi(2), scale=0.5,  # noqa: E731
                                            block_q=8, block_k=4, kernel=kernel)
        assert torch.autograd.gradcheck(f, (q, k, v))
    for impl in ("reference", "sdpa"):
        m = ak.causal()
        assert torch.autograd.gradcheck(lambda q, k, v: ak.attention(q, k, v, mask=m, impl=impl), (q, k, v))
