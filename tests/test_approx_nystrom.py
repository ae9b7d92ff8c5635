"""Nyström attention (attnkit.approx.nystrom_attention / NystromAttention): with m = N landmarks it is
exact softmax attention (exact pseudo-inverse, or enough iterations); the iterative pseudo-inverse
against torch.linalg.pinv; segments over valid tokens only (appending padding changes nothing, and
equals dropping the padded tokens), N not a multiple of m and fewer valid tokens than landmarks
against a dense re-derivation of eq. 14-16; refusals; GQA; gradients; half precision; parity with the
``nystrom-attention`` package and its documented differences; ``MultiHeadAttention(core=...)``."""

import math

import pytest
import torch
import torch.nn.functional as Fn

import attnkit as ak
from attnkit.approx.nystrom import NystromAttention, iterative_pinv, nystrom_attention
from attnkit.nn import MultiHeadAttention

F64 = torch.float64


def qkv(B=2, Hq=3, Hkv=3, Nq=16, Nk=16, D=8, Dv=5, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=dtype))


def exact(q, k, v, valid=None):
    mask = None if valid is None else ak.key_padding(valid)
    return ak.attention(q, k, v, mask=mask, impl="reference")


def dense_nystrom(q, k, v, m, valid=None, pinv=torch.linalg.pinv):
    """Eq. 14-16 row by row with explicit segment bounds: the valid tokens of rank
    ceil(s L / m) <= r < ceil((s + 1) L / m) form segment s; empty segments are left out."""
    B, Nq, Nk = q.shape[0], q.shape[2], k.shape[2]
    q = q / math.sqrt(q.shape[-1])
    outs = []
    for b in range(B):
        kv_idx = torch.arange(Nk) if valid is None else valid[b].nonzero()[:, 0]
        q_idx = kv_idx if Nq == Nk else torch.arange(Nq)

        def landmarks(x, idx):
            bounds = [math.ceil(s * len(idx) / m) for s in range(m + 1)]
            return torch.stack([x[:, idx[a:c]].mean(1) for a, c in zip(bounds, bounds[1:]) if c > a], dim=1)

        kb, vb = k[b][:, kv_idx], v[b][:, kv_idx]  # (H, L, D)
        k_land, q_land = landmarks(k[b], kv_idx), landmarks(q[b], q_idx)  # (H, m', D)
        s1 = torch.softmax(q[b] @ k_land.mT, -1)
        s2 = torch.softmax(q_land @ k_land.mT, -1)
        s3 = torch.softmax(q_land @ kb.mT, -1)
        outs.append(s1 @ pinv(s2) @ s3 @ vb)
    return torch.stack(outs)


# -- exactness ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("Nq,Nk", [(16, 16), (20, 12)])
def test_m_equal_to_n_with_exact_pinv_is_softmax_attention(Nq, Nk):
    q, k, v = qkv(Nq=Nq, Nk=Nk)
    got = nystrom_attention(q, k, v, num_landmarks=Nk, pinv_iterations=None)
    torch.testing.assert_close(got, exact(q, k, v), rtol=1e-9, atol=1e-9)


def test_m_equal_to_n_converges_to_softmax_attention_with_iterations():
    q, k, v = qkv(Nq=32, Nk=32)
    want = exact(q, k, v)
    err6 = (nystrom_attention(q, k, v, num_landmarks=32) - want).abs().max()
    torch.testing.assert_close(nystrom_attention(q, k, v, num_landmarks=32, pinv_iterations=30), want,
                               rtol=1e-9, atol=1e-9)
    assert err6 > 1e-4  # 6 iterations have not converged on this cond ~1e4 matrix: the 30 did the work


def test_iterative_pinv_matches_linalg_pinv():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(4 * torch.eye(8, dtype=F64) + 0.5 * torch.randn(3, 2, 8, 8, generator=g, dtype=F64), -1)
    assert torch.linalg.cond(a).max() < 10  # well-conditioned: 6 iterations converge
    torch.testing.assert_close(iterative_pinv(a, 6), torch.linalg.pinv(a), rtol=1e-10, atol=1e-10)
    rect = torch.softmax(torch.randn(2, 9, 5, generator=g, dtype=F64) * 3, -1)  # (n, p), full column rank
    torch.testing.assert_close(iterative_pinv(rect, 40), torch.linalg.pinv(rect), rtol=1e-8, atol=1e-8)
    # zero rows / columns (empty landmarks): the zero-padded pinv of the rest, and a zero matrix gives 0
    padded = torch.zeros(3, 2, 11, 11, dtype=F64)
    padded[..., :8, 3:] = a  # rows 8.. and columns ..3 are zero
    want = torch.zeros_like(padded)
    want[..., 3:, :8] = torch.linalg.pinv(a)
    torch.testing.assert_close(iterative_pinv(padded, 6), want, rtol=1e-10, atol=1e-10)
    assert iterative_pinv(torch.zeros(4, 4)).abs().max() == 0
    with pytest.raises(ValueError, match="pinv_iterations"):
        iterative_pinv(a, 0)


# -- segments and padding --------------------------------------------------------------------------------

@pytest.mark.parametrize("Nq,Nk,m", [(13, 13, 4), (10, 10, 4), (9, 13, 4), (16, 16, 4)])
@pytest.mark.parametrize("iterations", [6, None])
def test_segments_match_dense_formula(Nq, Nk, m, iterations):
    q, k, v = qkv(Nq=Nq, Nk=Nk)
    valid = torch.rand(2, Nk, generator=torch.Generator().manual_seed(3)) > 0.2
    pinv = torch.linalg.pinv if iterations is None else (lambda a: iterative_pinv(a, iterations))
    for mask in (None, valid):
        got = nystrom_attention(q, k, v, num_landmarks=m, mask=None if mask is None else ak.key_padding(mask),
                                pinv_iterations=iterations)
        torch.testing.assert_close(got, dense_nystrom(q, k, v, m, mask, pinv), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("Nq", [13, 7])
def test_appending_padding_never_changes_outputs(Nq):
    Nk, extra = 13, 6
    q, k, v = qkv(Nq=Nq, Nk=Nk)
    valid = torch.rand(2, Nk, generator=torch.Generator().manual_seed(1)) > 0.3
    base = nystrom_attention(q, k, v, num_landmarks=4, mask=ak.key_padding(valid))
    junk = qkv(Nq=extra, Nk=extra, seed=5)
    k2, v2 = (torch.cat([t, 1e3 * j], dim=2) for t, j in zip((k, v), junk[1:]))
    q2 = torch.cat([q, 1e3 * junk[0]], dim=2) if Nq == Nk else q  # self-attention: padded tokens, not keys only
    valid2 = torch.cat([valid, torch.zeros(2, extra, dtype=torch.bool)], dim=1)
    got = nystrom_attention(q2, k2, v2, num_landmarks=4, mask=ak.key_padding(valid2))
    torch.testing.assert_close(got[:, :, :Nq], base, rtol=1e-12, atol=1e-12)
    if Nq == Nk:  # the package's conv residual on v sees zeros at padded positions, appended or not
        core = NystromAttention(4, residual_kernel=5, num_heads=3).double()
        got = core(q2, k2, v2, mask=ak.key_padding(valid2))[:, :, :Nq]
        torch.testing.assert_close(got, core(q, k, v, mask=ak.key_padding(valid)), rtol=1e-12, atol=1e-12)
        assert (got - base).abs().max() > 1e-3  # the residual is there


def test_padding_equals_dropping_the_padded_tokens():
    q, k, v = qkv(B=2, Nq=15, Nk=15)
    valid = torch.rand(2, 15, generator=torch.Generator().manual_seed(2)) > 0.4
    got = nystrom_attention(q, k, v, num_landmarks=3, mask=ak.key_padding(valid))
    for b in range(2):
        idx = valid[b].nonzero()[:, 0]
        alone = nystrom_attention(*(t[b:b + 1, :, idx] for t in (q, k, v)), num_landmarks=3)
        torch.testing.assert_close(got[b:b + 1, :, idx], alone, rtol=1e-12, atol=1e-12)


def test_fewer_valid_tokens_than_landmarks():
    q, k, v = qkv(B=3, Nq=12, Nk=12)
    lengths = torch.tensor([12, 5, 0])
    valid = torch.arange(12)[None] < lengths[:, None]
    got = nystrom_attention(q, k, v, num_landmarks=8, mask=ak.key_padding(lengths), pinv_iterations=None)
    assert torch.isfinite(got).all() and got[2].abs().max() == 0  # no valid key: 0, as ak.attention
    # L = 5 <= m: every token is its own landmark, so the exact-pinv result is exact attention
    torch.testing.assert_close(got[1], exact(q, k, v, valid)[1], rtol=1e-9, atol=1e-9)
    # and the 3 empty landmarks contaminate nothing: iterative, m = 8 on L = 5 equals m = 5
    it8 = nystrom_attention(q, k, v, num_landmarks=8, mask=ak.key_padding(lengths))
    it5 = nystrom_attention(*(t[1:2, :, :5] for t in (q, k, v)), num_landmarks=5)
    torch.testing.assert_close(it8[1:2, :, :5], it5, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(it8).all() and it8[2].abs().max() == 0


# -- refusals, GQA, gradients, precision ------------------------------------------------------------------

def test_refusals():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="cannot be causal.*landmark"):
        nystrom_attention(q, k, v, num_landmarks=4, mask=ak.causal())
    with pytest.raises(ValueError, match="cannot be causal"):
        NystromAttention(4)(q, k, v, mask=ak.causal() & ak.key_padding([3, 4]))
    for mask in (ak.sliding_window(2), ak.document([0] * 8 + [1] * 8), ak.key_padding([3, 4]) & ak.sliding_window(1)):
        with pytest.raises(ValueError, match="only"):
            nystrom_attention(q, k, v, num_landmarks=4, mask=mask)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="num_landmarks"):
            nystrom_attention(q, k, v, num_landmarks=bad)
        with pytest.raises(ValueError, match="pinv_iterations"):
            NystromAttention(4, pinv_iterations=bad)
    with pytest.raises(ValueError, match="no recurrent form"):
        NystromAttention(4)(q, k, v, cache=object())
    with pytest.raises(ValueError, match="residual_kernel"):
        NystromAttention(4, residual_kernel=4, num_heads=3)
    with pytest.raises(ValueError, match="num_heads"):
        NystromAttention(4, residual_kernel=3)
    with pytest.raises(ValueError, match="self-attention"):
        NystromAttention(4, residual_kernel=3, num_heads=3)(*qkv(Nq=5, Nk=16))


def test_gqa_equals_repeated_heads():
    q, k, v = qkv(Hq=6, Hkv=2, Nq=11, Nk=11)
    mask = ak.key_padding([11, 7])
    got = nystrom_attention(q, k, v, num_landmarks=3, mask=mask)
    want = nystrom_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), num_landmarks=3, mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("iterations", [6, None])
def test_gradcheck(iterations):
    q, k, v = (t.requires_grad_() for t in qkv(B=2, Hq=2, Hkv=1, Nq=7, Nk=7, D=4, Dv=3))
    mask = ak.key_padding([7, 5])
    assert torch.autograd.gradcheck(
        lambda q, k, v: nystrom_attention(q, k, v, num_landmarks=3, mask=mask, pinv_iterations=iterations), (q, k, v),
        fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    # scores of std 16: exp() in half precision would overflow
    q, k, v = (4 * t.to(dtype) for t in qkv(B=1, Hq=2, Hkv=2, Nq=1024, Nk=1024, D=32, Dv=32, dtype=torch.float32))
    mask = ak.key_padding([1000])
    got = nystrom_attention(q, k, v, num_landmarks=32, mask=mask)
    assert got.dtype == dtype and torch.isfinite(got).all()
    want = nystrom_attention(q.float(), k.float(), v.float(), num_landmarks=32, mask=mask)  # the same inputs
    torch.testing.assert_close(got.float(), want, rtol=0.01, atol=0.02)  # the output's rounding only


# -- the nystrom-attention package ------------------------------------------------------------------------

def package(heads, m, residual=False, seed=0):
    na = pytest.importorskip("nystrom_attention")
    torch.manual_seed(seed)
    return na.NystromAttention(dim=16, dim_head=8, heads=heads, num_landmarks=m, residual=residual,
                               residual_conv_kernel=5).double()


def through_package_weights(p, x, core, mask=None, front=0):
    """p's projections around attnkit's core; ``front`` zero tokens prepended as the package does."""
    x = Fn.pad(x, (0, 0, front, 0))
    q, k, v = (t.unflatten(-1, (p.heads, -1)).transpose(1, 2) for t in p.to_qkv(x).chunk(3, dim=-1))
    out = core(q, k, v, mask=None if mask is None else ak.key_padding(mask))
    return p.to_out(out.transpose(1, 2).flatten(2))[:, front:]


def per_matrix_package_pinv(x, iters=6):
    """The package's moore_penrose_iter_pinv with ||A||_1 ||A||_inf per matrix (paper, Algorithm 1)
    instead of torch.max over the whole batch and all heads."""
    a = x.abs()
    z = x.mT / (a.sum(-1).amax(-1) * a.sum(-2).amax(-1))[..., None, None]
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - (xz @ (15 * eye - (xz @ (7 * eye - xz)))))
    return z


def test_package_parity_single_matrix():
    p, x = package(1, 4), torch.randn(1, 24, 16, dtype=F64)
    torch.testing.assert_close(through_package_weights(p, x, NystromAttention(4)), p(x), rtol=1e-10, atol=1e-10)


def test_package_parity_batched_differs_only_by_the_pinv_start(monkeypatch):
    p, x = package(3, 4, residual=True), torch.randn(2, 24, 16, dtype=F64)
    ours = NystromAttention(4, residual_kernel=5, num_heads=3).double()
    with torch.no_grad():
        ours.residual.copy_(p.res_conv.weight)
    got = through_package_weights(p, x, ours)
    assert (got - p(x)).abs().max() > 1e-6  # the package scales Z0 by one max over the batch and heads
    monkeypatch.setattr("nystrom_attention.nystrom_attention.moore_penrose_iter_pinv", per_matrix_package_pinv)
    torch.testing.assert_close(got, p(x), rtol=1e-10, atol=1e-10)


def test_package_front_padding_documented(monkeypatch):
    """N % m != 0, no mask: the package prepends unmasked zero tokens; attnkit uses unequal segments."""
    monkeypatch.setattr("nystrom_attention.nystrom_attention.moore_penrose_iter_pinv", per_matrix_package_pinv)
    p, x = package(2, 4), torch.randn(2, 22, 16, dtype=F64)
    core = NystromAttention(4)
    torch.testing.assert_close(through_package_weights(p, x, core, front=2), p(x), rtol=1e-10, atol=1e-10)
    assert (through_package_weights(p, x, core) - p(x)).abs().max() > 1e-3


def test_package_padding_documented(monkeypatch):
    """With a mask the package's segments are runs of positions: equal when every run holds the same
    number of valid tokens; a run of padding only (a uniform row in its softmax) changes its outputs."""
    monkeypatch.setattr("nystrom_attention.nystrom_attention.moore_penrose_iter_pinv", per_matrix_package_pinv)
    p, x, core = package(2, 4), torch.randn(2, 24, 16, dtype=F64), NystromAttention(4)
    g = torch.Generator().manual_seed(0)
    valid = torch.stack([torch.randperm(6, generator=g) < 4 for _ in range(8)]).view(2, 24)  # 4 of each 6
    got, want = through_package_weights(p, x, core, valid), p(x, mask=valid)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-7, atol=1e-7)  # the package's eps = 1e-8
    tail = torch.arange(24)[None].expand(2, -1) < 17  # the last run of 6 positions is all padding
    ours, theirs = through_package_weights(p, x, core, tail), p(x, mask=tail)
    torch.testing.assert_close(ours[:, :17], through_package_weights(p, x[:, :17], core), rtol=1e-12, atol=1e-12)
    assert (theirs[:, :17] - ours[:, :17]).abs().max() > 1e-3


# -- as MultiHeadAttention's core -------------------------------------------------------------------------

def test_multihead_attention_core_with_every_token_a_landmark_is_exact():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, num_kv_heads=2).double()
    approx = MultiHeadAttention(16, 4, num_kv_heads=2, core=NystromAttention(16, pinv_iterations=None)).double()
    approx.load_state_dict(mha.state_dict())
    x, mask = torch.randn(2, 10, 16, dtype=F64), ak.key_padding([10, 6])
    torch.testing.assert_close(approx(x, mask=mask), mha(x, mask=mask), rtol=1e-9, atol=1e-9)
    assert "num_landmarks=16" in repr(approx)
