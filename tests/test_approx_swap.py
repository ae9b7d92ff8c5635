"""attnkit.approx.replace_attention: cores into a trained model, weights kept, exact attention back."""

import pytest
import torch

import attnkit as ak
from attnkit.approx import LinearAttention, NystromAttention, replace_attention
from attnkit.nn import ALiBi, Encoder, FeedForward, MultiHeadAttention, PostNormBlock, TokenEmbeddings

E, H, V = 32, 4, 30


def encoder(positional=None, seed=0):
    torch.manual_seed(seed)
    blocks = [PostNormBlock(MultiHeadAttention(E, H, positional=positional), FeedForward(E, 64),
                            torch.nn.LayerNorm(E), torch.nn.LayerNorm(E)) for _ in range(2)]
    return Encoder(TokenEmbeddings(V, E), blocks).double().eval()


def test_an_exact_core_keeps_the_model_and_none_restores_it():
    model = encoder()
    ids = torch.randint(0, V, (2, 12))
    valid = torch.ones(2, 12, dtype=torch.long)
    valid[1, 9:] = 0
    exact = model(ids, valid)
    names = replace_attention(model, lambda layer: NystromAttention(num_landmarks=12, pinv_iterations=None))
    assert names == ["blocks.0.attn", "blocks.1.attn"]
    assert all(isinstance(m.attn.core, NystromAttention) for m in model.blocks)
    torch.testing.assert_close(model(ids, valid)[:, :9], exact[:, :9], rtol=1e-9, atol=1e-9)  # m >= N: exact
    replace_attention(model, lambda layer: LinearAttention())
    assert not torch.allclose(model(ids, valid), exact)
    replace_attention(model, None)
    assert torch.equal(model(ids, valid), exact)


def test_a_layer_the_core_cannot_serve_changes_nothing():
    model = encoder(positional=ALiBi(H))
    with pytest.raises(ValueError, match="additive bias"):
        replace_attention(model, lambda layer: LinearAttention())
    assert all(m.attn.core is None for m in model.blocks)
    with pytest.raises(TypeError, match="nn.Module"):
        replace_attention(encoder(), lambda layer: ak.approx.linear_attention)
    with pytest.raises(ValueError, match="no attnkit.nn.MultiHeadAttention"):
        replace_attention(torch.nn.Linear(2, 2), lambda layer: LinearAttention())
