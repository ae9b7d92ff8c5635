"""attnkit.nn.MultiHeadAttention and the blocks against torch's own modules with the same weights,
and the KV cache against full recomputation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnkit as ak
from attnkit import nn as aknn

EXACT_IMPLS = ["reference", "sdpa", "tiled", "auto"]


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    assert not torch.isnan(got).any()
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= rtol * scale + 1e-7, f"max error {err:.3g} vs {rtol:g} * max|want| = {rtol * scale:.3g}"


# -- torch.nn.MultiheadAttention parity ------------------------------------------------------------

@pytest.mark.parametrize("impl", EXACT_IMPLS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_from_torch_self_attention(impl, batch_first):
    torch.manual_seed(0)
    E, H, B, N = 48, 6, 3, 17
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    ours = aknn.MultiHeadAttention.from_torch(mha, impl=impl).eval()
    x = torch.randn(B, N, E)
    xt = x if batch_first else x.transpose(0, 1)
    want = mha(xt, xt, xt, need_weights=False)[0]
    want = want if batch_first else want.transpose(0, 1)
    close(ours(x), want)


@pytest.mark.parametrize("impl", EXACT_IMPLS)
def test_from_torch_masks_and_gradients(impl):
    """key padding + causal: torch's key_padding_mask (True = ignore) and is_causal; grads too."""
    torch.manual_seed(1)
    E, H, B, N = 32, 4, 2, 13
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    ours = aknn.MultiHeadAttention.from_torch(mha, impl=impl).eval()
    x = torch.randn(B, N, E, requires_grad=True)
    lengths = torch.tensor([13, 9])
    pad = torch.arange(N)[None] >= lengths[:, None]  # (B, N) True = padding
    causal = torch.ones(N, N, dtype=torch.bool).triu(1)  # True = forbidden
    want = mha(x, x, x, key_padding_mask=pad, attn_mask=causal, need_weights=False)[0]
    got = ours(x, mask=ak.key_padding(lengths) & ak.causal())
    close(got, want)
    g = torch.randn_like(want)
    gx_want, = torch.autograd.grad(want, x, g)
    gx_got, = torch.autograd.grad(got, x, g)
    close(gx_got, gx_want)
    w_want = torch.autograd.grad(mha(x, x, x, need_weights=False)[0].sum(), mha.in_proj_weight)[0]
    w_got = torch.autograd.grad(ours(x).sum(), ours.q_proj.weight)[0]
    close(w_got, w_want[:E])


def test_from_torch_cross_attention_kdim_vdim_no_bias():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(40, 5, kdim=24, vdim=16, bias=False, batch_first=True).eval()
    ours = aknn.MultiHeadAttention.from_torch(mha).eval()
    x, mk, mv = torch.randn(2, 7, 40), torch.randn(2, 11, 24), torch.randn(2, 11, 16)
    want = mha(x, mk, mv, need_weights=False)[0]
    assert ours.q_proj.bias is None and ours.out_proj.bias is None
    close(ours(x, mk, mv), want)  # torch's mha(query, key, value) is attnkit's mha(x, memory, value)
    with pytest.raises(ValueError, match="same B, M"):
        ours(x, mk, mv[:, :5])


def test_cross_attention_matches_torch():
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(32, 4, kdim=20, vdim=20, batch_first=True).eval()
    ours = aknn.MultiHeadAttention.from_torch(mha).eval()
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 9, 20)
    pad = torch.tensor([[False] * 9, [False] * 6 + [True] * 3])
    want = mha(x, mem, mem, key_padding_mask=pad, need_weights=False)[0]
    close(ours(x, mem, mask=ak.key_padding(~pad)), want)


def test_from_torch_refuses_bias_kv():
    mha = nn.MultiheadAttention(16, 2, add_bias_kv=True)
    with pytest.raises(ValueError, match="add_bias_kv"):
        aknn.MultiHeadAttention.from_torch(mha)


def test_bad_shapes_explain_themselves():
    mha = aknn.MultiHeadAttention(32, 4)
    with pytest.raises(ValueError, match=r"expected x of shape \(B, N, E=32\)"):
        mha(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match="not divisible"):
        aknn.MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        aknn.MultiHeadAttention(32, 4, num_kv_heads=3)
    with pytest.raises(TypeError, match="AttentionPositional"):
        aknn.MultiHeadAttention(32, 4, positional=aknn.SinusoidalPositionalEncoding(32))


def test_gqa_equals_repeated_kv_heads():
    """num_kv_heads=2 equals a full MHA whose k/v projections repeat each kv head."""
    torch.manual_seed(4)
    gqa = aknn.MultiHeadAttention(32, 8, num_kv_heads=2, head_dim=8).eval()
    full = aknn.MultiHeadAttention(32, 8, head_dim=8).eval()
    with torch.no_grad():
        full.q_proj.load_state_dict(gqa.q_proj.state_dict())
        full.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for src, dst in ((gqa.k_proj, full.k_proj), (gqa.v_proj, full.v_proj)):
            w = src.weight.view(2, 8, 32).repeat_interleave(4, 0).reshape(64, 32)
            b = src.bias.view(2, 8).repeat_interleave(4, 0).reshape(64)
            dst.weight.copy_(w)
            dst.bias.copy_(b)
    x = torch.randn(2, 9, 32)
    close(gqa(x, mask=ak.causal()), full(x, mask=ak.causal()))


def test_dropout_only_while_training():
    torch.manual_seed(5)
    mha = aknn.MultiHeadAttention(32, 4, dropout=0.5, impl="reference")
    x = torch.randn(2, 9, 32)
    mha.eval()
    assert torch.equal(mha(x), mha(x))
    mha.train()
    assert not torch.allclose(mha(x), mha(x))


# -- blocks against torch.nn.TransformerEncoderLayer / DecoderLayer -----------------------------

def _copy_layer(layer: nn.Module, block: aknn.PostNormBlock | aknn.PreNormBlock) -> None:
    block.attn.load_state_dict(aknn.MultiHeadAttention.from_torch(layer.self_attn).state_dict())
    if getattr(layer, "multihead_attn", None) is not None:
        block.cross_attn.load_state_dict(aknn.MultiHeadAttention.from_torch(layer.multihead_attn).state_dict())
        block.norm_cross.load_state_dict(layer.norm2.state_dict())
        block.norm2.load_state_dict(layer.norm3.state_dict())
    else:
        block.norm2.load_state_dict(layer.norm2.state_dict())
    block.ffn.fc1.load_state_dict(layer.linear1.state_dict())
    block.ffn.fc2.load_state_dict(layer.linear2.state_dict())
    block.norm1.load_state_dict(layer.norm1.state_dict())


def _block(cls, E, H, F, cross=False):
    return cls(aknn.MultiHeadAttention(E, H), aknn.FeedForward(E, F, nn.GELU()), nn.LayerNorm(E), nn.LayerNorm(E),
               cross_attn=aknn.MultiHeadAttention(E, H) if cross else None,
               norm_cross=nn.LayerNorm(E) if cross else None)


@pytest.mark.parametrize("norm_first", [False, True])
def test_blocks_match_torch_encoder_layer(norm_first):
    torch.manual_seed(6)
    E, H, F = 32, 4, 64
    layer = nn.TransformerEncoderLayer(E, H, F, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=norm_first).eval()
    block = _block(aknn.PreNormBlock if norm_first else aknn.PostNormBlock, E, H, F).eval()
    _copy_layer(layer, block)
    x = torch.randn(2, 11, E)
    pad = torch.tensor([[False] * 11, [False] * 7 + [True] * 4])
    want = layer(x, src_key_padding_mask=pad)
    got = block(x, aknn.Context(mask=ak.key_padding(~pad)))
    keep = ~pad  # torch's fast path may zero padded rows; compare real tokens
    close(got[keep], want[keep])


@pytest.mark.parametrize("norm_first", [False, True])
def test_blocks_match_torch_decoder_layer(norm_first):
    torch.manual_seed(7)
    E, H, F = 32, 4, 64
    layer = nn.TransformerDecoderLayer(E, H, F, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=norm_first).eval()
    block = _block(aknn.PreNormBlock if norm_first else aknn.PostNormBlock, E, H, F, cross=True).eval()
    _copy_layer(layer, block)
    x, mem = torch.randn(2, 6, E), torch.randn(2, 9, E)
    want = layer(x, mem, tgt_is_causal=True, tgt_mask=nn.Transformer.generate_square_subsequent_mask(6))
    close(block(x, aknn.Context(mask=ak.causal(), memory=mem)), want)


def test_cross_block_needs_memory():
    block = _block(aknn.PreNormBlock, 16, 2, 32, cross=True)
    with pytest.raises(ValueError, match="pass memory"):
        block(torch.randn(1, 3, 16))
    with pytest.raises(ValueError, match="give both or neither"):
        aknn.PreNormBlock(aknn.MultiHeadAttention(16, 2), nn.Identity(), nn.Identity(), nn.Identity(),
                          cross_attn=aknn.MultiHeadAttention(16, 2))


def test_rmsnorm_matches_torch():
    torch.manual_seed(8)
    ours, theirs = aknn.RMSNorm(24, eps=1e-6), nn.RMSNorm(24, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    x = torch.randn(3, 5, 24)
    close(ours(x), theirs(x))


def test_swiglu_formula():
    torch.manual_seed(9)
    f = aknn.SwiGLU(16, 40)
    x = torch.randn(2, 3, 16)
    gate, up = x @ f.gate_proj.weight.T, x @ f.up_proj.weight.T
    want = (gate * torch.sigmoid(gate) * up) @ f.down_proj.weight.T
    close(f(x), want)


@pytest.mark.parametrize("impl", ["auto", "reference", "tiled"])
def test_softcap_caps_the_scores_before_the_mask(impl):
    """MultiHeadAttention(softcap=c): softmax(c * tanh(q k^T * scale / c) + mask) v, by hand."""
    torch.manual_seed(0)
    mha = aknn.MultiHeadAttention(32, 4, softcap=3.0, impl=impl).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64) * 4
    out = mha(x, mask=ak.causal())
    q, k, v = (p(x).view(2, 11, 4, 8).transpose(1, 2) for p in (mha.q_proj, mha.k_proj, mha.v_proj))
    s = 3.0 * torch.tanh(q @ k.transpose(-1, -2) / 8 ** 0.5 / 3.0)
    s = s.masked_fill(~torch.ones(11, 11, dtype=torch.bool).tril(), float("-inf"))
    want = mha.out_proj((torch.softmax(s, -1) @ v).transpose(1, 2).flatten(2))
    assert torch.allclose(out, want, atol=1e-10)
    plain = aknn.MultiHeadAttention(32, 4, impl=impl).double()
    plain.load_state_dict(mha.state_dict())
    assert (plain(x, mask=ak.causal()) - out).abs().max() > 1e-2  # the cap matters at these scores
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        aknn.MultiHeadAttention(32, 4, softcap=0.0)
