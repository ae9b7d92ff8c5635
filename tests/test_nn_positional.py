"""Positional encodings: formulas, permutation (in)variance, RoPE's relative property, ALiBi."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnkit as ak
from attnkit import nn as aknn

E, H, V = 32, 4, 40


def close(got, want, tol=1e-5):
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * max(1.0, want.double().abs().max().item()), f"max error {err:.3g}"


# -- formulas ------------------------------------------------------------------------------------

def test_sinusoidal_is_the_papers_formula():
    pe = aknn.SinusoidalPositionalEncoding(16).encoding(torch.arange(50))
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert math.isclose(pe[pos, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(pe[pos, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)
    x = torch.zeros(1, 5, 16)
    close(aknn.SinusoidalPositionalEncoding(16)(x, offset=3)[0], pe[3:8])


def test_learned_table_and_its_limit():
    enc = aknn.LearnedPositionalEmbedding(10, 8)
    x = torch.randn(2, 4, 8)
    close(enc(x, offset=6), x + enc.weight[6:10])
    with pytest.raises(ValueError, match=r"positions 7..10 but the table has 10 rows"):
        enc(x, offset=7)


def _rope_complex(x: torch.Tensor, positions: torch.Tensor, base: float, interleaved: bool) -> torch.Tensor:
    """Independent RoPE: features as complex numbers z_i times exp(i * pos * theta_i)."""
    D = x.shape[-1]
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    rot = torch.polar(torch.ones_like(theta), positions.double()[:, None] * theta)  # (N, D/2)
    xd = x.double()
    if interleaved:
        z = torch.complex(xd[..., 0::2], xd[..., 1::2]) * rot
        return torch.stack([z.real, z.imag], -1).flatten(-2)
    z = torch.complex(xd[..., : D // 2], xd[..., D // 2:]) * rot
    return torch.cat([z.real, z.imag], -1)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_equals_complex_rotation(interleaved):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 11, 16, dtype=torch.float64)
    pos = torch.arange(5, 16)
    rope = aknn.RotaryEmbedding(16, base=500.0, interleaved=interleaved)
    close(rope.apply(x, pos), _rope_complex(x, pos, 500.0, interleaved), 1e-12)


def test_rope_partial_rotary_dim_keeps_the_rest():
    x = torch.randn(1, 2, 7, 16)
    out = aknn.RotaryEmbedding(16, rotary_dim=8).apply(x, torch.arange(7))
    assert torch.equal(out[..., 8:], x[..., 8:])
    close(out[..., :8], _rope_complex(x[..., :8], torch.arange(7), 10000.0, False))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_scores_depend_only_on_relative_position(interleaved):
    torch.manual_seed(1)
    rope = aknn.RotaryEmbedding(32, interleaved=interleaved)
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        return (rope.apply(q, torch.tensor([m])) * rope.apply(k, torch.tensor([n]))).sum().item()

    for m, n in ((3, 1), (10, 4), (0, 7)):
        for shift in (1, 17, 1000):
            assert math.isclose(score(m, n), score(m + shift, n + shift), rel_tol=1e-9, abs_tol=1e-9)
    assert not math.isclose(score(3, 1), score(3, 2), rel_tol=1e-3)  # and it does depend on m - n


def test_alibi_module_equals_dense_bias():
    torch.manual_seed(2)
    mha = aknn.MultiHeadAttention(E, H, positional=aknn.ALiBi(H), impl="tiled").eval()
    x = torch.randn(2, 9, E)
    q = mha._heads(mha.q_proj(x), H)
    k = mha._heads(mha.k_proj(x), H)
    v = mha._heads(mha.v_proj(x), H)
    slopes = ak.alibi_slopes(H)
    dist = (torch.arange(9)[None] - torch.arange(9)[:, None]).abs()  # (N, N)
    dense = -(slopes[:, None, None] * dist)  # (H, N, N)
    want = mha.out_proj(ak.attention(q, k, v, bias=dense, mask=ak.causal(), impl="reference").transpose(1, 2).flatten(2))
    close(mha(x, mask=ak.causal()), want)


# -- permutation: attention alone cannot see order ------------------------------------------------

def _encoder(absolute: nn.Module | None = None, attn_pos=None) -> aknn.Encoder:
    torch.manual_seed(3)
    blocks = [aknn.PostNormBlock(aknn.MultiHeadAttention(E, H, positional=attn_pos() if attn_pos else None),
                                 aknn.FeedForward(E, 64), nn.LayerNorm(E), nn.LayerNorm(E)) for _ in range(2)]
    return aknn.Encoder(aknn.TokenEmbeddings(V, E, positional=absolute), blocks).eval()


ENCODINGS = {
    "none": lambda: _encoder(),
    "sinusoidal": lambda: _encoder(aknn.SinusoidalPositionalEncoding(E)),
    "learned": lambda: _encoder(aknn.LearnedPositionalEmbedding(64, E)),
    "rope": lambda: _encoder(attn_pos=lambda: aknn.RotaryEmbedding(E // H)),
    "rope-interleaved": lambda: _encoder(attn_pos=lambda: aknn.RotaryEmbedding(E // H, interleaved=True)),
    "alibi": lambda: _encoder(attn_pos=lambda: aknn.ALiBi(H)),
}


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_permutation(name):
    """Without an encoding, permuting the tokens permutes the output; with one, it does not."""
    model = ENCODINGS[name]()
    torch.manual_seed(4)
    ids = torch.randint(0, V, (2, 12))
    perm = torch.randperm(12)
    with torch.no_grad():
        out, out_perm = model(ids), model(ids[:, perm])
    permutes = torch.allclose(out[:, perm], out_perm, atol=1e-5)
    assert permutes == (name == "none"), f"{name}: output {'permutes' if permutes else 'does not permute'}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_angles_stay_float32_in_half_precision_models(dtype):
    """A bf16/fp16 model must not round positions or frequencies: bf16 holds integers exactly only
    up to 256, so angles computed in it are off by radians at position 300."""
    torch.manual_seed(5)
    rope = aknn.RotaryEmbedding(64).to(dtype)  # model.to(dtype) must not change the rotation
    x = torch.randn(1, 2, 4096, 64)
    pos = torch.arange(4096)
    got = rope.apply(x.to(dtype), pos)
    want = _rope_complex(x.to(dtype).double(), pos, 10000.0, False)
    assert (got.double() - want).abs().max().item() < 0.05  # rounding of the data only


def test_alibi_plus_user_bias_stays_structured():
    torch.manual_seed(6)
    mha = aknn.MultiHeadAttention(E, H, positional=aknn.ALiBi(H), impl="tiled").eval()
    user = torch.randn(1, H, 9, 9)
    assert isinstance(mha._bias(user), ak.bias.SumBias)  # never summed into an N x N tensor here
    x = torch.randn(2, 9, E)
    q, k, v = (mha._heads(p(x), H) for p in (mha.q_proj, mha.k_proj, mha.v_proj))
    dense = user + ak.alibi(H).materialize(9, 9)
    want = mha.out_proj(ak.attention(q, k, v, bias=dense, impl="reference").transpose(1, 2).flatten(2))
    close(mha(x, bias=user), want)
