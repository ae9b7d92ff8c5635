"""The banded (Longformer) backend beyond the shared case table: which masks it recognizes, what it
refuses and why, dilation's dense truth, lse gradients, block geometry edge cases."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.ops import banded
from attnkit.ops.pattern import parse
from attnkit.ops.reference import reference_attention


def qkv(B=1, H=2, N=40, D=8, Dv=None, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(N * 31 + H)
    make = lambda d: torch.randn(B, H, N, d, generator=g, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return make(D), make(D), make(Dv or D)


# -- the mask family -----------------------------------------------------------------------------

def test_parse_normalizes_causal_and_intersections():
    p = parse(ak.causal() & ak.sliding_window(5, 3))
    assert (p.window.left, p.window.right) == (5, 0)
    p = parse(ak.sliding_window(5, 3) & ak.sliding_window(2, 7) & ak.key_padding([4]))
    assert (p.window.left, p.window.right) == (2, 3) and len(p.paddings) == 1
    p = parse(ak.key_padding([4]) & (ak.global_tokens([1]) | (ak.sliding_window(4) & ak.causal())))
    assert p.global_tokens is not None and (p.window.left, p.window.right) == (4, 0)


@pytest.mark.parametrize("mask, reason", [
    (None, "no mask: banded needs a sliding window"),
    (ak.causal(), "no sliding_window in the mask"),
    (ak.sliding_window(3) & ak.document([0] * 20 + [1] * 20), "document.* is not part of the Longformer family"),
    (ak.sliding_window(3) | ak.causal(), "banded takes '|' only with global_tokens"),
    (ak.causal() & (ak.sliding_window(3) | ak.global_tokens([0])), "is not part of the Longformer family"),
    (ak.sliding_window(3, dilation=2) & ak.sliding_window(2), "different dilations"),
    (~ak.sliding_window(3), "is not part of the Longformer family"),
])
def test_refuses_masks_outside_the_family_and_says_why(mask, reason):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"impl='banded' cannot run this call: .*" + reason):
        ak.attention(q, k, v, mask=mask, impl="banded")
    assert ak.explain(q, k, v, mask=mask).chosen != "banded"


def test_refuses_bias_and_dropout_and_bad_kernels():
    q, k, v = qkv()
    mask = ak.sliding_window(3)
    with pytest.raises(ValueError, match="banded takes no additive bias"):
        ak.attention(q, k, v, mask=mask, bias=ak.alibi(2), impl="banded")
    with pytest.raises(ValueError, match="kernel=.fused. cannot apply softcap=None / dropout_p=0.1"):
        banded.banded_attention(q, k, v, mask=mask, scale=0.5, kernel="fused", dropout_p=0.1)
    q, k, v = qkv(Dv=6)
    with pytest.raises(ValueError, match="banded kernel='fused' needs CPU tensors with Dv == D"):
        banded.banded_attention(q, k, v, mask=mask, scale=0.5, kernel="fused")
    with pytest.raises(ValueError, match="banded kernel='fast': choose 'auto', 'fused' or 'math'"):
        banded.banded_attention(q, k, v, mask=mask, scale=0.5, kernel="fast")


# -- dilation ------------------------------------------------------------------------------------

def test_dilated_window_truth_is_the_papers():
    """Query at position p sees p + d*t for -left <= t <= right, per head."""
    m = ak.sliding_window(2, 1, dilation=(1, 3)).materialize(30, 30)  # (1, 2, 30, 30)
    i, j = torch.meshgrid(torch.arange(30), torch.arange(30), indexing="ij")
    for h, d in enumerate((1, 3)):
        t = j - i
        want = (t % d == 0) & (t >= -2 * d) & (t <= 1 * d)
        assert torch.equal(m[0, h], want)


def test_dilation_arguments_are_checked():
    with pytest.raises(ValueError, match="dilation must be an int >= 1 or a sequence of them"):
        ak.sliding_window(3, dilation=0)
    q, k, v = qkv(H=2)
    with pytest.raises(ValueError, match="3 per-head dilations for Hq=2 query heads"):
        ak.attention(q, k, v, mask=ak.sliding_window(3, dilation=(1, 2, 3)))


@pytest.mark.parametrize("N", [1, 2, 7, 64, 65])
def test_dilated_heads_against_reference(N):
    q, k, v = qkv(H=4, N=N, grad=True)
    mask = (ak.sliding_window(2, 3, dilation=[1, 2, 5, 2]) | ak.global_tokens([N // 2])) & ak.key_padding([N])
    out, lse = ak.attention(q, k, v, mask=mask, impl="banded", return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, mask=mask, bias=None, scale=8 ** -0.5)
    assert torch.allclose(out, ref, atol=1e-12) and torch.allclose(lse, ref_lse, atol=1e-12)
    g = torch.autograd.grad((out.sin().sum() + lse.sum()), (q, k, v))
    g_ref = torch.autograd.grad((ref.sin().sum() + ref_lse.sum()), (q, k, v))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-12)


# -- gradients through lse, kernels, geometry ------------------------------------------------------

@pytest.mark.parametrize("kernel", ["auto", "math"])
def test_lse_gradient_matches_reference(kernel):
    """A loss on lse (as ring attention or a custom merge has) flows back exactly."""
    q, k, v = qkv(B=2, H=2, N=97, grad=True, dtype=torch.float32)
    mask = (ak.sliding_window(9) | ak.global_tokens([0, 50])) & ak.key_padding([97, 70])
    out, lse = banded.banded_attention(q, k, v, mask=mask, scale=0.3, kernel=kernel)
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), mask=mask, bias=None, scale=0.3)
    w = torch.randn_like(lse)
    g = torch.autograd.grad((out.square().sum() + (lse * w).sum()), (q, k, v))
    g_ref = torch.autograd.grad((ref.square().sum() + (ref_lse * w.double()).sum()), (q, k, v))
    for a, b in zip(g, g_ref):
        assert (a.double() - b).abs().max() < 1e-4


def test_fused_and_math_kernels_agree():
    q, k, v = qkv(B=2, H=3, N=300, D=16, dtype=torch.float32)
    mask = (ak.sliding_window(40, 7) | ak.global_tokens([3, 299])) & ak.key_padding([300, 123])
    a, la = banded.banded_attention(q, k, v, mask=mask, scale=0.25, kernel="fused")
    b, lb = banded.banded_attention(q, k, v, mask=mask, scale=0.25, kernel="math")
    assert (a - b).abs().max() < 1e-5 and (la - lb).abs().max() < 1e-5


def test_many_pieces_and_irregular_runs():
    """Force tiny kernel calls so runs are cut and irregular blocks sit between regular ones."""
    q, k, v = qkv(B=2, H=2, N=200, grad=True)
    valid = torch.ones(2, 200, dtype=torch.bool)
    valid[0, 60:63] = False  # padding holes in the middle: irregular blocks inside the sequence
    valid[1, 150:] = False
    mask = (ak.sliding_window(6, 2) | ak.global_tokens([100])) & ak.key_padding(valid)
    old = banded.PIECE_ELEMENTS
    banded.PIECE_ELEMENTS = 1
    try:
        out = ak.attention(q, k, v, mask=mask, impl="banded")
    finally:
        banded.PIECE_ELEMENTS = old
    ref, _ = reference_attention(q, k, v, mask=mask, bias=None, scale=8 ** -0.5)
    assert torch.allclose(out, ref, atol=1e-12)


@pytest.mark.parametrize("Nq, Nk, left, right", [(1, 300, 10, 0), (5, 300, 0, 0), (300, 1, 3, 3),
                                                 (10, 20, 0, 50), (20, 10, 50, 0), (33, 33, 1000, 1000)])
def test_geometry_edges(Nq, Nk, left, right):
    """Decoding (one query, many keys), zero-width windows, windows beyond either end."""
    g = torch.Generator().manual_seed(Nq + Nk)
    q = torch.randn(1, 2, Nq, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, Nk, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = ak.sliding_window(left, right)
    out, lse = ak.attention(q, k, v, mask=mask, impl="banded", return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, mask=mask, bias=None, scale=8 ** -0.5)
    assert torch.allclose(out, ref, atol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))

