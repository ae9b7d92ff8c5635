"""Linformer (attnkit.approx.linformer): E = F = identity is exact softmax attention; padded keys are
excluded (a padded row equals its unpadded call); shorter inputs use E's leading columns, longer
ones and causal masks are refused; GQA, gradients, half precision; parity with the ``linformer``
package through ``MultiHeadAttention(core=LinformerAttention)``; parameter sharing and state_dict."""

import math

import pytest
import torch

import attnkit as ak
from attnkit.approx.linformer import LinformerAttention, LinformerProjection, linformer_attention
from attnkit.nn import MultiHeadAttention

F64 = torch.float64


def qkv(B=2, Hq=3, Hkv=3, Nq=9, Nk=9, D=8, Dv=5, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=dtype))


def proj(*shape, seed=1, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) / math.sqrt(shape[-2])


def exact(q, k, v, **kw):
    return ak.attention(q, k, v, impl="reference", **kw)


@pytest.mark.parametrize("Nq", [9, 4])
@pytest.mark.parametrize("per_head", [False, True])
def test_identity_projection_is_exact_softmax_attention(Nq, per_head):
    q, k, v = qkv(Nq=Nq)
    eye = torch.eye(9, dtype=F64)
    E = eye.expand(3, 9, 9) if per_head else eye
    torch.testing.assert_close(linformer_attention(q, k, v, E, E.clone()), exact(q, k, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linformer_attention(q, k, v, E, scale=0.3), exact(q, k, v, scale=0.3),
                               rtol=1e-12, atol=1e-12)
    # a permutation of the keys is also exact (softmax attention is permutation-invariant over keys)
    perm = eye[torch.randperm(9, generator=torch.Generator().manual_seed(2))]
    torch.testing.assert_close(linformer_attention(q, k, v, perm), exact(q, k, v), rtol=1e-12, atol=1e-12)


def test_paper_formula_with_leading_columns_for_shorter_inputs():
    q, k, v = qkv(Nk=6)
    E, F = proj(4, 10), proj(4, 10, seed=2)  # Nmax = 10 > Nk = 6
    Es, Fs = E[:, :6], F[:, :6]
    K, V = torch.einsum("rn,bhnd->bhrd", Es, k), torch.einsum("rn,bhnd->bhrd", Fs, v)  # eq. 7: E K, F V
    want = torch.softmax(torch.einsum("bhid,bhrd->bhir", q, K) / math.sqrt(8), dim=-1) @ V
    torch.testing.assert_close(linformer_attention(q, k, v, E, F), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linformer_attention(q, k, v, Es, Fs), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_head", [False, True])
def test_padded_keys_are_excluded(per_head):
    q, k, v = qkv(Nk=9)
    E = proj(3, 5, 12) if per_head else proj(5, 12)
    F = proj(*E.shape, seed=3)
    lengths = torch.tensor([9, 6])
    got = linformer_attention(q, k, v, E, F, mask=ak.key_padding(lengths))
    for b, n in enumerate(lengths.tolist()):  # each padded row equals its unpadded call
        want = linformer_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], E, F)
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-12, atol=1e-12)
    # appending padded keys (garbage, even inf / nan) changes nothing
    junk = torch.full((2, 3, 3, 8), float("inf"), dtype=F64), torch.full((2, 3, 3, 5), float("nan"), dtype=F64)
    k2, v2 = torch.cat([k, junk[0]], dim=2), torch.cat([v, junk[1]], dim=2)
    valid = torch.arange(12)[None, :] < lengths[:, None]  # (B, 12) bool
    torch.testing.assert_close(linformer_attention(q, k2, v2, E, F, mask=ak.key_padding(valid)), got,
                               rtol=1e-12, atol=1e-12)


def test_all_keys_padded_gives_zero():
    q, k, v = qkv()
    out = linformer_attention(q, k, v, proj(4, 9), mask=ak.key_padding(torch.tensor([0, 9])))
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0


def test_longer_inputs_refused():
    q, k, v = qkv(Nk=11)
    with pytest.raises(ValueError, match=r"Nk=11 .* Nmax=10.*max_len >= 11"):
        linformer_attention(q, k, v, proj(4, 10))
    with pytest.raises(ValueError, match=r"F .* Nmax=10"):
        linformer_attention(q, k, v, proj(4, 11), proj(4, 10))


@pytest.mark.parametrize("mask", [ak.causal(), ak.causal() & ak.key_padding(torch.tensor([9, 5]))])
def test_causal_refused_with_reason(mask):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="cannot be causal.*future"):
        linformer_attention(q, k, v, proj(4, 9), mask=mask)


def test_other_masks_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="only.*causal.*key_padding"):
        linformer_attention(q, k, v, proj(4, 9), mask=ak.sliding_window(2))


def test_bad_projections_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"\(Hq=3, Kp, Nmax\)"):
        linformer_attention(q, k, v, proj(2, 4, 9))  # 2 heads for Hq = 3
    with pytest.raises(ValueError, match="same Kp rows"):
        linformer_attention(q, k, v, proj(4, 9), proj(5, 9))
    with pytest.raises(TypeError, match="floating-point"):
        linformer_attention(q, k, v, torch.ones(4, 9, dtype=torch.long))


@pytest.mark.parametrize("per_head", [False, True])
def test_gqa_and_per_head_projections_match_single_head_calls(per_head):
    q, k, v = qkv(Hq=4, Hkv=2)
    E, F = (proj(4, 3, 9), proj(4, 3, 9, seed=2)) if per_head else (proj(3, 9), proj(3, 9, seed=2))
    got = linformer_attention(q, k, v, E, F)
    for h in range(4):  # query head h reads kv head h // 2 and, per head, E[h], F[h]
        one = slice(h, h + 1), slice(h // 2, h // 2 + 1)
        want = linformer_attention(q[:, one[0]], k[:, one[1]], v[:, one[1]], *((E[h], F[h]) if per_head else (E, F)))
        torch.testing.assert_close(got[:, one[0]], want, rtol=1e-12, atol=1e-12)
    want = linformer_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), E, F)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    q, k, v = qkv(B=2, Hq=2, Hkv=1, Nq=4, Nk=5, D=3, Dv=2)
    E, F = proj(2, 3, 7), proj(2, 3, 7, seed=2)
    args = [t.clone().requires_grad_() for t in (q, k, v, E, F)]
    mask = ak.key_padding(torch.tensor([5, 3]))
    assert torch.autograd.gradcheck(lambda *a: linformer_attention(*a, mask=mask), args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_finite_in_their_dtype(dtype):
    q, k, v = (t * 30 for t in qkv(Nq=64, Nk=64, D=16, Dv=16, dtype=torch.float32))  # large scores
    E = proj(16, 128, dtype=torch.float32)
    out = linformer_attention(q.to(dtype), k.to(dtype), v.to(dtype), E)
    assert out.dtype == dtype and torch.isfinite(out).all()
    want = linformer_attention(*(t.to(dtype).float() for t in (q, k, v)), E)  # same inputs in fp32
    torch.testing.assert_close(out.float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


# -- parity with the linformer package (lucidrains) ---------------------------------------------------

@pytest.mark.parametrize("share_kv,one_kv_head", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("n", [16, 11])
def test_parity_with_linformer_package(share_kv, one_kv_head, n):
    lf = pytest.importorskip("linformer")
    torch.manual_seed(0)
    ref = lf.LinformerSelfAttention(32, seq_len=16, k=6, heads=4, one_kv_head=one_kv_head, share_kv=share_kv).eval()
    core = LinformerAttention.build(16, 6, share_kv=share_kv)
    mha = MultiHeadAttention(32, 4, num_kv_heads=1 if one_kv_head else 4, bias=False, out_bias=True, core=core)
    with torch.no_grad():  # the package's proj_k is (seq_len, k) = E^T; share_kv also shares to_k for values
        mha.q_proj.weight.copy_(ref.to_q.weight)
        mha.k_proj.weight.copy_(ref.to_k.weight)
        mha.v_proj.weight.copy_((ref.to_k if share_kv else ref.to_v).weight)
        mha.out_proj.weight.copy_(ref.to_out.weight)
        mha.out_proj.bias.copy_(ref.to_out.bias)
        core.projection.E.copy_(ref.proj_k.T)
        if not share_kv:
            core.projection.F.copy_(ref.proj_v.T)
    x = torch.randn(2, n, 32)
    torch.testing.assert_close(mha(x), ref(x), rtol=1e-5, atol=1e-5)


# -- the modules --------------------------------------------------------------------------------------

def test_module_is_the_function_and_init_std():
    core = LinformerAttention.build(9, 4, num_heads=3)
    q, k, v = qkv(dtype=torch.float32)
    torch.testing.assert_close(core(q, k, v), linformer_attention(q, k, v, core.projection.E, core.projection.F))
    big = LinformerProjection(2048, 64, share_kv=True)
    assert big.F is None and big.E.shape == (64, 2048)
    assert abs(big.E.std().item() * math.sqrt(64) - 1) < 0.02 and abs(big.E.mean().item()) < 0.01


def test_layerwise_sharing_shares_parameters():
    shared = LinformerProjection(9, 4)
    layers = torch.nn.ModuleList([LinformerAttention(shared), LinformerAttention(shared)])
    assert layers[0].projection.E is layers[1].projection.E
    assert len(list(layers.parameters())) == 2  # E and F, once
    q, k, v = qkv(dtype=torch.float32)
    (layers[0](q, k, v).sum() + layers[1](q * 2, k, v).square().sum()).backward()
    g0 = torch.autograd.grad(linformer_attention(q, k, v, shared.E, shared.F).sum(), shared.E)[0]
    g1 = torch.autograd.grad(linformer_attention(q * 2, k, v, shared.E, shared.F).square().sum(), shared.E)[0]
    torch.testing.assert_close(shared.E.grad, g0 + g1)  # both layers' gradients reach the one tensor


@pytest.mark.parametrize("kw", [dict(), dict(num_heads=3, share_kv=True)])
def test_state_dict_round_trip(kw):
    torch.manual_seed(0)
    a = LinformerAttention.build(9, 4, **kw)
    torch.manual_seed(1)
    b = LinformerAttention.build(9, 4, **kw)
    q, k, v = qkv(dtype=torch.float32)
    assert not torch.allclose(a(q, k, v), b(q, k, v))
    assert set(a.state_dict()) == ({"projection.E"} if kw else {"projection.E", "projection.F"})
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(q, k, v), a(q, k, v), rtol=0, atol=0)


def test_cache_and_bad_arguments_refused():
    core = LinformerAttention.build(9, 4)
    q, k, v = qkv(dtype=torch.float32)
    with pytest.raises(TypeError, match="no recurrent or causal form"):
        core(q, k, v, cache=object())
    with pytest.raises(TypeError, match="LinformerProjection"):
        LinformerAttention(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="proj_len must be an int >= 1"):
        LinformerProjection(9, 0)
