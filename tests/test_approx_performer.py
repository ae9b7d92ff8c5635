"""The Performer's FAVOR+ (attnkit.approx.performer): the random features (unbiased, orthogonal ones
with a lower error), the chunked causal form against the quadratic form of the same features, an
unstabilized float64 formula and the recurrent form; causality, padding (numerator and normalizer),
large norms and half precision at N = 65536, gradients, GQA, the module's redraw / freeze /
state_dict, convergence to exact softmax attention as F grows, and parity with performer-pytorch
(same projection matrix) with its documented differences."""

import functools
import math
import warnings

import pytest
import torch

import attnkit as ak
from attnkit.approx import KernelState, kernelized
from attnkit.approx.performer import (PerformerAttention, orthogonal_random_features, performer_attention,
                                      performer_features, relu_features, softmax_features)
from attnkit.nn import MultiHeadAttention

F64 = torch.float64


def qkv(B=2, Hq=2, Hkv=2, Nq=23, Nk=23, D=8, Dv=5, dtype=F64, seed=0, norm=None):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype)
    if norm is not None:
        q, k = (norm * t / t.norm(dim=-1, keepdim=True) for t in (q, k))
    return q, k, torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=dtype)


def features(F=12, D=8, seed=1, dtype=F64, **kw):
    return orthogonal_random_features(F, D, generator=torch.Generator().manual_seed(seed), dtype=dtype, **kw)


def raw_softmax_features(x, W, scale):
    """The paper's phi(x) = exp(W x - |x|^2 / 2) / sqrt(F) on x sqrt(scale), unstabilized (float64)."""
    x = x * math.sqrt(scale)
    return torch.exp(x @ W.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(W.shape[0])


def dense_estimate(pq, pk, v, causal):
    """row-normalized (phi(q) phi(k)^T) v with the causal mask, as an explicit N x N matrix."""
    A = pq @ pk.transpose(-1, -2)  # (B, H, Nq, Nk)
    if causal:
        Nq, Nk = A.shape[-2:]
        A = A.masked_fill(torch.ones(Nq, Nk, dtype=torch.bool).triu(Nk - Nq + 1), 0.0)
    return (A @ v) / A.sum(-1, keepdim=True)


# -- the random features -------------------------------------------------------------------------------

def test_orthogonal_blocks_and_row_lengths():
    W = features(F=20, D=8, scaling="sqrt_d")  # 3 blocks: 8 + 8 + 4 rows
    for block in (W[:8], W[8:16], W[16:]):
        torch.testing.assert_close(block @ block.T, 8 * torch.eye(len(block), dtype=F64))
    assert not torch.allclose(W[:8], W[8:16])  # independent blocks
    norms = features(F=4000, D=8).norm(dim=1)  # chi_8: E[r^2] = 8
    assert abs((norms ** 2).mean().item() - 8) < 0.4 and norms.std() > 0.5
    iid = features(F=4000, D=8, orthogonal=False)
    assert abs(iid.var().item() - 1) < 0.05 and (iid[:8] @ iid[:8].T - 8 * torch.eye(8, dtype=F64)).abs().max() > 1


def ensemble(x, y, T, orthogonal=True, scaling="norms", seed=0):
    """T independent draws of D rows each: the kernel estimate of every draw, (P, T)."""
    P, D = x.shape
    W = orthogonal_random_features(D * T, D, generator=torch.Generator().manual_seed(seed), orthogonal=orthogonal,
                                   scaling=scaling, dtype=F64)  # T blocks, each an independent draw
    (px, sx), (py, sy) = softmax_features(x, W), softmax_features(y, W)
    rows = px * py * torch.exp(sx + sy)[:, None] * W.shape[0]  # (P, D T): exp(w.x - |x|^2/2) exp(w.y - |y|^2/2)
    return rows.reshape(P, T, D).mean(-1)


def pairs(P=16, D=4, r=0.5, seed=0, near=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(P, D, generator=g, dtype=F64)
    x = r * x / x.norm(dim=-1, keepdim=True)
    y = torch.randn(P, D, generator=g, dtype=F64)
    y = r * y / y.norm(dim=-1, keepdim=True) if near is None else x + near * y
    return x, y


def test_favor_plus_is_unbiased():
    """Lemma 1: the mean of phi(x).phi(y) over draws is exp(x.y) (rows N(0, I): "norms" scaling)."""
    x, y = pairs(r=0.7)
    exact = torch.exp((x * y).sum(-1))
    for orthogonal in (True, False):
        mean = ensemble(x, y, 50_000, orthogonal=orthogonal).mean(-1)
        assert (mean / exact - 1).abs().max() < 0.025, orthogonal  # standard error ~0.4 %
    # the test resolves a bias of this size: rows of fixed length sqrt(D) are not Gaussian (biased)
    assert (ensemble(x, y, 50_000, scaling="sqrt_d").mean(-1) / exact - 1).abs().max() > 0.04


def test_orthogonal_features_have_a_lower_error_than_iid():
    """Theorem 2. For positive features the gain is second order in |x + y| (the linear term's
    variance is the same for orthogonal and iid rows), so it is modest at small norms: ~11 % here."""
    x, y = pairs(r=0.5, near=0.1)
    exact = torch.exp((x * y).sum(-1))
    z2, n2 = ((x + y) ** 2).sum(-1), (x * x).sum(-1) + (y * y).sum(-1)
    mse_iid_exact = ((torch.exp(2 * z2 - n2) - exact ** 2) / 4).mean()  # Var of one row / D rows, closed form
    mse = {o: ((ensemble(x, y, 50_000, orthogonal=o) - exact[:, None]) ** 2).mean() for o in (True, False)}
    assert abs(mse[False] / mse_iid_exact - 1) < 0.05  # the sampled iid error is the formula's
    assert mse[True] < 0.94 * mse_iid_exact and mse[True] < 0.95 * mse[False]


def test_relu_features_are_the_generalized_kernel():
    x = torch.randn(3, 7, 8, dtype=F64)
    W = features(F=10)
    want = (torch.relu(x @ W.T) + 1e-3) / math.sqrt(10)
    torch.testing.assert_close(relu_features(x, W), want)


# -- attention: chunked == quadratic == recurrent; causality; padding ---------------------------------

@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("Nq,Nk", [(23, 23), (9, 23)])
@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_causal_chunks_equal_the_quadratic_form_and_the_paper_formula(kernel, Nq, Nk, chunk):
    q, k, v = qkv(Nq=Nq, Nk=Nk)
    W, scale = features(), 0.3
    got = performer_attention(q, k, v, W, mask=ak.causal(), kernel=kernel, scale=scale, chunk_size=chunk)
    pq, pk, s = performer_features(q, k, W, kernel=kernel, scale=scale)
    want = kernelized.quadratic(pq, pk, v, causal=True, key_logscale=s)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    if kernel == "softmax":  # the unstabilized formula of the paper, independent of kernelized
        paper = dense_estimate(raw_softmax_features(q, W, scale), raw_softmax_features(k, W, scale), v, True)
        torch.testing.assert_close(got, paper, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_noncausal_equals_the_paper_formula(kernel):
    q, k, v = qkv(Nq=11, Nk=19, norm=3.0)
    W = features()
    got = performer_attention(q, k, v, W, kernel=kernel)
    pq, pk = ((raw_softmax_features(q, W, 8 ** -0.5), raw_softmax_features(k, W, 8 ** -0.5)) if kernel == "softmax"
              else (relu_features(q * 8 ** -0.25, W), relu_features(k * 8 ** -0.25, W)))
    torch.testing.assert_close(got, dense_estimate(pq, pk, v, False), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_recurrent_decoding_equals_the_chunked_form(kernel):
    q, k, v = qkv(Nq=23, Nk=23, norm=4.0)
    core = PerformerAttention(8, 12, kernel=kernel, seed=0, chunk_size=5).double().eval()
    want = core(q, k, v, mask=ak.causal())
    state, outs = core.new_cache(), []
    for n0, n1 in [(0, 10)] + [(t, t + 1) for t in range(10, 23)]:  # a prompt, then token by token
        outs.append(core(q[:, :, n0:n1], k[:, :, n0:n1], v[:, :, n0:n1], mask=ak.causal(), cache=state))
    torch.testing.assert_close(torch.cat(outs, dim=2), want, rtol=1e-10, atol=1e-10)
    assert isinstance(state, KernelState) and state.position == 23 and state.S.shape == (2, 2, 12, 5)


def test_changing_future_tokens_never_changes_earlier_outputs():
    q, k, v = qkv(Nq=40, Nk=40, dtype=torch.float32, norm=5.0)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 25:] = 10 * torch.randn_like(t[:, :, 25:])  # larger future keys: a new maximum scale
    W = features(dtype=torch.float32)
    a = performer_attention(q, k, v, W, mask=ak.causal(), chunk_size=8)
    b = performer_attention(q2, k2, v2, W, mask=ak.causal(), chunk_size=8)
    assert torch.equal(a[:, :, :25], b[:, :, :25])
    assert not torch.allclose(performer_attention(q, k, v, W)[:, :, :25], performer_attention(q2, k2, v2, W)[:, :, :25])


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_leave_the_numerator_and_the_normalizer(kernel, causal):
    q, k, v = qkv(Nq=17, Nk=17)
    pad_q, pad_k, pad_v = qkv(Nq=6, Nk=6, seed=3)
    kp, vp = torch.cat([k, pad_k], dim=2), torch.cat([v, 50 * pad_v], dim=2)  # (B, H, 23, .)
    W = features()
    if causal:  # self-attention: padded tokens appended to the queries too; the real rows must not change
        qp, mask, rows = torch.cat([q, pad_q], dim=2), ak.causal() & ak.key_padding(torch.tensor([17, 17])), 17
        want = performer_attention(q, k, v, W, mask=ak.causal(), kernel=kernel)
    else:
        qp, mask, rows = q, ak.key_padding(torch.tensor([17, 17])), 17
        want = performer_attention(q, k, v, W, kernel=kernel)
    got = performer_attention(qp, kp, vp, W, mask=mask, kernel=kernel, chunk_size=4)[:, :, :rows]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # zeroing only the padded values (performer-pytorch's Attention) keeps them in the normalizer
    vz = vp.clone()
    vz[:, :, 17:] = 0
    only_v = performer_attention(qp, kp, vz, W, mask=ak.causal() if causal else None, kernel=kernel)[:, :, :rows]
    if causal:
        torch.testing.assert_close(only_v, want)  # causal rows never see the appended keys anyway
    else:  # each row shrunk by its real keys' share of the normalizer: den_real / (den_real + den_padded)
        share = (only_v * want).sum(-1, keepdim=True) / (want * want).sum(-1, keepdim=True)  # (B, H, Nq, 1)
        torch.testing.assert_close(only_v, want * share, rtol=1e-10, atol=1e-10)
        assert share.max() < 0.999


def test_bool_padding_in_the_middle_and_a_row_with_no_key():
    q, k, v = qkv(Nq=9, Nk=9)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, 3:6] = False
    valid[1, :4] = False  # causal: rows 0..3 of batch 1 see no key
    W = features()
    out = performer_attention(q, k, v, W, mask=ak.causal() & ak.key_padding(valid), chunk_size=2)
    pq, pk = raw_softmax_features(q, W, 8 ** -0.5), raw_softmax_features(k, W, 8 ** -0.5)
    want = dense_estimate(pq, pk * valid[:, None, :, None], v, True)
    torch.testing.assert_close(out[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1, :, 4:], want[1, :, 4:], rtol=1e-10, atol=1e-10)
    assert out[1, :, :4].eq(0).all()


# -- numerics: large norms, half precision, gradients ----------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_large_norms_stay_finite_and_accurate_in_float32(causal):
    """|q| = |k| = 30: the unstabilized features reach exp(-100) and their products 1e-80, which
    float32 cannot hold; the stabilized ones match the float64 formula."""
    q, k, v = qkv(Nq=50, Nk=50, D=16, dtype=torch.float32, norm=30.0)
    W = features(F=32, D=16, dtype=torch.float32)
    out = performer_attention(q, k, v, W, mask=ak.causal() if causal else None, chunk_size=8)
    paper = dense_estimate(raw_softmax_features(q.double(), W.double(), 0.25),
                           raw_softmax_features(k.double(), W.double(), 0.25), v.double(), causal)
    assert out.isfinite().all()
    torch.testing.assert_close(out.double(), paper, rtol=1e-4, atol=1e-4)
    unstabilized = raw_softmax_features(k, W, 0.25) @ raw_softmax_features(q, W, 0.25).transpose(-1, -2)
    assert (unstabilized == 0).any()  # what the stabilizer avoids


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_causal_at_64k_is_finite_and_accurate(dtype):
    q, k, v = qkv(B=1, Hq=1, Hkv=1, Nq=65536, Nk=65536, D=16, Dv=16, dtype=torch.float32, seed=2)
    # small q, k: every key weighs about the same, so sum_j phi(k_j) v_j ~ 65536 * 200 / sqrt(F): past float16's 65504
    q, k, v = (0.3 * q).to(dtype), (0.3 * k).to(dtype), (200 + 50 * v).to(dtype)
    W = features(F=32, D=16, dtype=torch.float32)
    out = performer_attention(q, k, v, W, mask=ak.causal(), chunk_size=256)
    assert out.dtype == dtype and out.isfinite().all()
    ref = performer_attention(q[:, :, -200:].double(), k.double(), v.double(), W, mask=ak.causal())  # float64
    torch.testing.assert_close(out[:, :, -200:].double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(kernel, causal):
    q, k, v = (t.requires_grad_() for t in qkv(B=1, Hq=2, Hkv=2, Nq=6, Nk=7, D=4, Dv=3, norm=2.0))
    W = features(F=6, D=4)
    mask = ak.key_padding(torch.tensor([6]))
    mask = ak.causal() & mask if causal else mask
    fn = functools.partial(performer_attention, projection=W, mask=mask, kernel=kernel, chunk_size=3)
    assert torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c), (q, k, v))


def test_gqa_equals_repeated_heads():
    q, k, v = qkv(Hq=4, Hkv=2)
    W = features()
    for mask in (None, ak.causal()):
        want = performer_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), W, mask=mask)
        torch.testing.assert_close(performer_attention(q, k, v, W, mask=mask), want, rtol=0, atol=0)


def test_error_against_exact_attention_shrinks_as_features_grow():
    errors = []
    for F in (16, 64, 256, 1024):
        err = 0.0
        for seed in range(4):
            q, k, v = qkv(B=2, Hq=2, Hkv=2, Nq=32, Nk=32, D=16, Dv=8, dtype=torch.float32, seed=seed)
            q, k = 0.5 * q, 0.5 * k
            exact = ak.attention(q, k, v, impl="reference")
            W = orthogonal_random_features(F, 16, generator=torch.Generator().manual_seed(100 + seed))
            err += ((performer_attention(q, k, v, W) - exact).norm() / exact.norm()).item() / 4
        errors.append(err)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 4, errors  # ~1/sqrt(F): 8x from 16 to 1024


# -- the module ------------------------------------------------------------------------------------------

def test_module_redraw_freeze_interval_and_state_dict():
    core = PerformerAttention(8, 12, seed=0, redraw_interval=3)
    assert core.projection.shape == (12, 8) and "projection" in core.state_dict()
    assert PerformerAttention(16).num_features == int(16 * math.log(16))  # performer-pytorch's default
    before = core.projection.clone()
    core.redraw()
    assert not torch.equal(before, core.projection)
    q, k, v = qkv(D=8, dtype=torch.float32)
    changed = []
    for _ in range(7):  # training: each draw serves 3 calls
        before = core.projection.clone()
        core(q, k, v)
        changed.append(not torch.equal(before, core.projection))
    assert changed == [False, False, False, True, False, False, True]
    core.eval()
    before = core.projection.clone()
    for _ in range(5):
        core(q, k, v)
    assert torch.equal(before, core.projection)  # eval mode neither redraws nor counts
    core.train().freeze()
    for _ in range(5):
        core(q, k, v)
    assert torch.equal(before, core.projection) and core.frozen
    core.unfreeze()
    for _ in range(3):
        core(q, k, v)
    assert not torch.equal(before, core.projection)
    clone = PerformerAttention(8, 12, seed=1)
    clone.load_state_dict(core.state_dict())
    assert torch.equal(clone.projection, core.projection)
    torch.testing.assert_close(clone.eval()(q, k, v), core.eval()(q, k, v), rtol=0, atol=0)


def test_mha_core_is_projections_around_performer_attention():
    torch.manual_seed(0)
    core = PerformerAttention(8, 16, seed=0)
    mha = MultiHeadAttention(32, 4, num_kv_heads=2, core=core).double().eval()
    x = torch.randn(2, 9, 32, dtype=F64)
    q = mha.q_proj(x).view(2, 9, 4, 8).transpose(1, 2)
    k, v = (p(x).view(2, 9, 2, 8).transpose(1, 2) for p in (mha.k_proj, mha.v_proj))
    want = mha.out_proj(performer_attention(q, k, v, core.projection, mask=ak.causal()).transpose(1, 2).flatten(2))
    torch.testing.assert_close(mha(x, mask=ak.causal()), want, rtol=1e-12, atol=1e-12)
    cache = mha.new_cache()
    steps = [mha(x[:, t:t + 1], mask=ak.causal(), cache=cache) for t in range(9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), want, rtol=1e-10, atol=1e-10)


def test_errors_say_what_to_do():
    q, k, v = qkv()
    W = features()
    with pytest.raises(ValueError, match=r"\(F, D=8\)"):
        performer_attention(q, k, v, W[:, :4])
    with pytest.raises(ValueError, match="unknown kernel"):
        performer_attention(q, k, v, W, kernel="cos")
    with pytest.raises(ValueError, match="mask=ak.causal"):
        performer_attention(q, k, v, W, state=KernelState())
    with pytest.raises(ValueError, match="only ak.causal"):
        performer_attention(q, k, v, W, mask=ak.sliding_window(3))
    with pytest.raises(ValueError, match="unknown scaling"):
        orthogonal_random_features(8, 4, scaling="unit")
    with pytest.raises(ValueError, match="num_features"):
        orthogonal_random_features(0, 4)
    with pytest.raises(ValueError, match="not both"):
        PerformerAttention(8, generator=torch.Generator(), seed=0)
    with pytest.raises(ValueError, match="redraw_interval"):
        PerformerAttention(8, redraw_interval=0)


# -- parity with performer-pytorch (same projection matrix) ----------------------------------------------

@pytest.fixture
def pp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("performer_pytorch.performer_pytorch")


def theirs(pp, D, W, **kw):
    fa = pp.FastAttention(D, W.shape[0], **kw)
    fa.projection_matrix.copy_(W)
    return fa


def test_parity_with_performer_pytorch_noncausal(pp, monkeypatch):
    q, k, v = qkv(B=2, Hq=2, Hkv=2, Nq=64, Nk=64, D=16, Dv=16, dtype=torch.float32)
    W = features(F=32, D=16, dtype=torch.float32)
    ours = performer_attention(q, k, v, W)
    # ReLU: relu(W x) + 1e-3 on x = q D^-1/4, the same formula: equal
    torch.testing.assert_close(performer_attention(q, k, v, W, kernel="relu"),
                               theirs(pp, 16, W, generalized_attention=True)(q, k, v), rtol=1e-5, atol=1e-5)
    # softmax: its features add eps = 1e-4 after a per-head maximum over every key, ratio * (exp(a - max) + eps)
    default = theirs(pp, 16, W)(q, k, v)
    monkeypatch.setattr(pp, "softmax_kernel", functools.partial(pp.softmax_kernel, eps=0.0))
    torch.testing.assert_close(ours, theirs(pp, 16, W)(q, k, v), rtol=1e-5, atol=1e-5)  # without eps: equal
    # with it, keys far below the head's maximum become ~eps: a bias of order 0.1 at these sizes
    assert (default - ours).abs().max() > 1e-2


def test_performer_pytorch_causal_path_and_its_leak(pp, monkeypatch):
    q, k, v = qkv(B=2, Hq=2, Hkv=2, Nq=64, Nk=64, D=16, Dv=16, dtype=torch.float32)
    W = features(F=32, D=16, dtype=torch.float32)
    fa = theirs(pp, 16, W, causal=True)  # without fast_transformers' CUDA kernel: causal_linear_attention_noncuda
    assert fa.causal_linear_fn is pp.causal_linear_attention_noncuda
    ours = performer_attention(q, k, v, W, mask=ak.causal(), chunk_size=16)
    k2 = k.clone()
    k2[:, :, 40:] *= 4  # future keys with a larger norm move its per-head maximum
    leak = (fa(q, k, v) - fa(q, k2, v))[:, :, :40].abs().max()
    assert leak > 1e-2  # its earlier outputs change through eps: the stabilizer sees the future
    assert torch.equal(ours[:, :, :40], performer_attention(q, k2, v, W, mask=ak.causal(), chunk_size=16)[:, :, :40])
    monkeypatch.setattr(pp, "softmax_kernel", functools.partial(pp.softmax_kernel, eps=0.0))
    fa.causal_linear_fn = functools.partial(pp.causal_linear_attention_noncuda, eps=0.0)
    torch.testing.assert_close(ours, fa(q, k, v), rtol=1e-4, atol=1e-5)  # both eps removed: equal


def test_performer_pytorch_padding_keeps_padded_keys_in_the_normalizer(pp):
    """Its Attention(context_mask=) zeroes the padded values only (v.masked_fill_), so the output
    differs from the same attention without the padded keys; ours equals it."""
    D, N, P = 16, 20, 7
    W = features(F=32, D=D, dtype=torch.float32)
    attn = pp.Attention(D, heads=1, dim_head=D, nb_features=32, generalized_attention=True).eval()
    attn.fast_attention.projection_matrix.copy_(W)
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out):
            lin.weight.copy_(torch.eye(D))
        attn.to_out.bias.zero_()
    x = torch.randn(1, 5, D)
    ctx = torch.cat([torch.randn(1, N, D), 3 * torch.randn(1, P, D)], dim=1)
    valid = torch.arange(N + P)[None] < N
    with torch.no_grad():
        got = attn(x, context=ctx, context_mask=valid)
        unpadded = attn(x, context=ctx[:, :N])
    q, kv = x[:, None], ctx[:, None]  # (1, 1, N, D): identity projections, k = v = context
    ours = performer_attention(q, kv, kv, W, mask=ak.key_padding(valid), kernel="relu")[:, 0]
    torch.testing.assert_close(ours, unpadded, rtol=1e-5, atol=1e-5)
    assert (got - unpadded).abs().max() > 1e-2
    vz = kv.clone()
    vz[:, :, N:] = 0  # what it computes: every key in the normalizer, padded values zero
    torch.testing.assert_close(performer_attention(q, kv, vz, W, kernel="relu")[:, 0], got, rtol=1e-5, atol=1e-5)


def test_redraw_schedule_against_performer_pytorch(pp):
    """Its ProjectionUpdater redraws at calls n+1, 2n+2, ... (the redrawing call is not counted); ours
    at n+1, 2n+1, ...: every draw serves exactly n training calls."""
    fa = pp.FastAttention(8, 12)
    updater = pp.ProjectionUpdater(torch.nn.Sequential(fa, torch.nn.Linear(1, 1)), 3).train()
    core = PerformerAttention(8, 12, seed=0, redraw_interval=3).train()
    q, k, v = qkv(D=8, dtype=torch.float32)
    theirs_at, ours_at = [], []
    for call in range(1, 11):
        before = fa.projection_matrix.clone(), core.projection.clone()
        updater.redraw_projections()
        core(q, k, v)
        theirs_at += [call] if not torch.equal(before[0], fa.projection_matrix) else []
        ours_at += [call] if not torch.equal(before[1], core.projection) else []
    assert theirs_at == [4, 8] and ours_at == [4, 7, 10]
