"""Linear attention (attnkit.approx.linear_attention) and the kernelized core it shares with the
Performer: the chunked causal form, the quadratic form of the same features and the recurrent
form agree; causality, padding, GQA, gradients, half precision at N = 65536; the reference
package's formula (performer-pytorch's linear_attention / causal_linear_attention_noncuda);
``MultiHeadAttention(core=LinearAttention())`` and ``DecoderLM.generate`` with a constant-size state."""

import pytest
import torch

import attnkit as ak
from attnkit.approx import KernelState, LinearAttention, elu_feature_map, linear_attention, relu_feature_map
from attnkit.approx import kernelized
from attnkit.nn import (ALiBi, DecoderLM, FeedForward, MultiHeadAttention, PreNormBlock, RMSNorm,
                        RotaryEmbedding, TokenEmbeddings)

F64 = torch.float64


def qkv(B=2, Hq=3, Hkv=3, Nq=37, Nk=37, D=8, Dv=5, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=dtype))


def squared(x):  # a custom feature map with F != D
    return torch.cat([x.relu(), (-x).relu(), torch.ones_like(x[..., :1])], dim=-1) ** 2


FEATURE_MAPS = [elu_feature_map, relu_feature_map, squared]


@pytest.mark.parametrize("phi", FEATURE_MAPS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("Nq,Nk", [(37, 37), (20, 37), (37, 20), (1, 9)])
@pytest.mark.parametrize("chunk", [1, 5, 16, 128])
def test_causal_chunks_equal_quadratic_form(phi, Nq, Nk, chunk):
    q, k, v = qkv(Nq=Nq, Nk=Nk)
    valid = torch.rand(2, Nk, generator=torch.Generator().manual_seed(1)) > 0.25
    want = kernelized.quadratic(phi(q), phi(k), v, causal=True, key_valid=valid)  # (B, H, Nq, Dv)
    got = linear_attention(q, k, v, mask=ak.causal() & ak.key_padding(valid), feature_map=phi, chunk_size=chunk)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("phi", FEATURE_MAPS, ids=lambda f: f.__name__)
def test_recurrent_form_equals_quadratic_form(phi):
    q, k, v = qkv(Nq=23, Nk=23)
    want = kernelized.quadratic(phi(q), phi(k), v, causal=True)
    state, outs = KernelState(), []
    for n0, n1 in ((0, 1), (1, 6), (6, 7), (7, 23)):  # token by token and by pieces, as decoding does
        outs.append(linear_attention(q[:, :, n0:n1], k[:, :, n0:n1], v[:, :, n0:n1], mask=ak.causal(),
                                     feature_map=phi, chunk_size=4, state=state))
    torch.testing.assert_close(torch.cat(outs, dim=2), want, rtol=1e-12, atol=1e-12)
    assert state.position == 23 and state.S.shape == (2, 3, phi(q).shape[-1], 5)


def test_noncausal_equals_quadratic_form_and_the_paper_formula():
    q, k, v = qkv(Nq=11, Nk=19)
    pq, pk = elu_feature_map(q), elu_feature_map(k)
    A = pq @ pk.transpose(-1, -2)  # (B, H, Nq, Nk): phi(q_i).phi(k_j), eq. 4
    want = (A @ v) / A.sum(-1, keepdim=True)
    torch.testing.assert_close(linear_attention(q, k, v), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernelized.quadratic(pq, pk, v, causal=False), want, rtol=1e-12, atol=1e-12)


def test_changing_future_tokens_never_changes_earlier_outputs():
    q, k, v = qkv(Nq=40, Nk=40)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 25:] = torch.randn_like(t[:, :, 25:]) * 3
    a = linear_attention(q, k, v, mask=ak.causal(), chunk_size=8)
    b = linear_attention(q2, k2, v2, mask=ak.causal(), chunk_size=8)
    assert torch.equal(a[:, :, :25], b[:, :, :25])
    assert not torch.allclose(linear_attention(q, k, v)[:, :, :25], linear_attention(q2, k2, v2)[:, :, :25])


@pytest.mark.parametrize("causal", [False, True])
def test_appending_padded_keys_never_changes_outputs(causal):
    q, k, v = qkv(Nq=17, Nk=17)
    extra = qkv(Nq=6, Nk=6, seed=3)
    kp, vp = torch.cat([k, 50 * extra[1]], dim=2), torch.cat([v, 50 * extra[2]], dim=2)
    qp = torch.cat([q, extra[0]], dim=2)
    base = ak.causal() if causal else None
    want = linear_attention(q, k, v, mask=base)
    padded = ak.key_padding(torch.tensor([17, 17]))
    got = linear_attention(qp, kp, vp, mask=padded if base is None else base & padded)[:, :, :17]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_row_that_sees_no_key_is_zero_not_nan():
    q, k, v = qkv(Nq=5, Nk=5)
    out = linear_attention(q, k, v, mask=ak.key_padding(torch.tensor([0, 5])))
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out.isfinite().all()
    out = linear_attention(q, k, v, mask=ak.causal() & ak.key_padding(torch.tensor([0, 3])))
    assert out.isfinite().all() and torch.equal(out[0], torch.zeros_like(out[0]))


def test_gqa_equals_repeated_heads():
    q, k, v = qkv(Hq=6, Hkv=2)
    want = linear_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), mask=ak.causal())
    torch.testing.assert_close(linear_attention(q, k, v, mask=ak.causal()), want, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    q, k, v = (t.requires_grad_() for t in qkv(B=1, Hq=2, Hkv=2, Nq=7, Nk=9, D=3, Dv=2))
    mask = ak.key_padding(torch.tensor([8]))
    mask = ak.causal() & mask if causal else mask
    assert torch.autograd.gradcheck(lambda a, b, c: linear_attention(a, b, c, mask=mask, chunk_size=3), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_causal_at_64k_is_finite(dtype):
    q, k, v = qkv(B=1, Hq=1, Hkv=1, Nq=65536, Nk=65536, D=16, Dv=16, dtype=torch.float32)
    q, k, v = (4 * q).to(dtype), (4 * k).to(dtype), (100 * v).to(dtype)  # large values: a half sum would overflow
    out = linear_attention(q, k, v, mask=ak.causal(), chunk_size=512)
    assert out.dtype == dtype and out.isfinite().all()
    ref = linear_attention(q[:, :, -300:].double(), k.double(), v.double(), mask=ak.causal())  # last rows, float64
    torch.testing.assert_close(out[:, :, -300:].double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_parity_with_performer_pytorch_formulas():
    pp = pytest.importorskip("performer_pytorch.performer_pytorch")
    q, k, v = qkv(B=2, Hq=2, Hkv=2, Nq=64, Nk=64, D=8, dtype=torch.float32)
    pq, pk = elu_feature_map(q), elu_feature_map(k)
    torch.testing.assert_close(linear_attention(q, k, v), pp.linear_attention(pq, pk, v), rtol=1e-5, atol=1e-5)
    # its causal CPU path: cumulative sums in chunks of 128 with eps = 1e-6 in the denominator
    theirs = pp.causal_linear_attention_noncuda(pq, pk, v, chunk_size=16)
    torch.testing.assert_close(linear_attention(q, k, v, mask=ak.causal(), chunk_size=16), theirs, rtol=1e-4, atol=1e-4)


def test_errors_say_what_to_do():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="only ak.causal"):
        linear_attention(q, k, v, mask=ak.sliding_window(4))
    with pytest.raises(ValueError, match="mask=ak.causal"):
        linear_attention(q, k, v, state=KernelState())
    with pytest.raises(ValueError, match="unknown feature_map"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match=r"\(B, H, N, F\)"):
        linear_attention(q, k, v, feature_map=lambda x: x.sum(-1))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, mask=ak.causal(), chunk_size=0)
    state = KernelState()
    linear_attention(q, k, v, mask=ak.causal(), state=state)
    with pytest.raises(ValueError, match="reset"):
        linear_attention(q[:1], k[:1], v[:1], mask=ak.causal(), state=state)
    with pytest.raises(ValueError, match="no score scale"):
        LinearAttention()(q, k, v, scale=0.5)


# -- the core inside MultiHeadAttention and DecoderLM --------------------------------------------------

E, H, V = 32, 4, 40


def decoder(seed=0, **attn):
    torch.manual_seed(seed)
    blocks = [PreNormBlock(MultiHeadAttention(E, H, core=LinearAttention(chunk_size=4), **attn),
                           FeedForward(E, 64), RMSNorm(E), RMSNorm(E)) for _ in range(2)]
    return DecoderLM(TokenEmbeddings(V, E), blocks, RMSNorm(E), torch.nn.Linear(E, V, bias=False)).double().eval()


def test_mha_core_is_projections_around_linear_attention():
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, num_kv_heads=2, core=LinearAttention()).double()
    x = torch.randn(2, 9, E, dtype=F64)
    q = mha.q_proj(x).view(2, 9, H, 8).transpose(1, 2)
    k, v = (p(x).view(2, 9, 2, 8).transpose(1, 2) for p in (mha.k_proj, mha.v_proj))
    want = mha.out_proj(linear_attention(q, k, v, mask=ak.causal()).transpose(1, 2).flatten(2))
    torch.testing.assert_close(mha(x, mask=ak.causal()), want, rtol=1e-12, atol=1e-12)


def test_generate_with_constant_state_equals_recomputing():
    model = decoder(positional=RotaryEmbedding(E // H))
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, :2] = False  # left padding
    fast = model.generate(ids, 12, attention_mask=valid)
    slow = model.generate(ids, 12, attention_mask=valid, use_cache=False)
    assert torch.equal(fast, slow)
    cache = model.new_cache()
    assert all(isinstance(c.self_attn, KernelState) for c in cache)
    model(ids[:, :1], cache=cache)
    size = [c.self_attn.S.numel() + c.self_attn.z.numel() for c in cache]
    with torch.no_grad():
        for t in range(1, 6):
            model(ids[:, t:t + 1], cache=cache)
    assert [c.self_attn.S.numel() + c.self_attn.z.numel() for c in cache] == size  # O(1) per step
    assert cache[0].self_attn.position == 6


def test_core_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="additive bias"):
        MultiHeadAttention(E, H, positional=ALiBi(H), core=LinearAttention())
    with pytest.raises(ValueError, match="dropout"):
        MultiHeadAttention(E, H, dropout=0.1, core=LinearAttention())
    with pytest.raises(TypeError, match="nn.Module"):
        MultiHeadAttention(E, H, core=linear_attention)
    mha = MultiHeadAttention(E, H, core=LinearAttention())
    with pytest.raises(ValueError, match="no additive bias"):
        mha(torch.randn(1, 4, E), bias=torch.zeros(1, 1, 4, 4))
    with pytest.raises(TypeError, match="KVCache"):
        mha(torch.randn(1, 4, E), cache=object())


def test_training_step_reaches_every_projection():
    model = decoder().train()
    ids = torch.randint(0, V, (2, 10))
    model(ids).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
