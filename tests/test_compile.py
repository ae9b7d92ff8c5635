"""torch.compile of ak.attention runs (sdpa, tiled, banded) and gives the eager result."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak


@pytest.mark.parametrize("impl,mask", [("sdpa", None), ("sdpa", "causal"), ("tiled", "causal"),
                                       ("tiled", "window"), ("banded", "window"), ("banded", "longformer")])
def test_compiled_attention_matches_eager(impl, mask):
    torch._dynamo.reset()
    m = {None: None, "causal": ak.causal(), "window": ak.causal() & ak.sliding_window(8),
         "longformer": (ak.sliding_window(5) | ak.global_tokens([3, 30])) & ak.key_padding([37])}[mask]

    def f(q, k, v):
        return ak.attention(q, k, v, mask=m, impl=impl) * 2.0

    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    compiled = torch.compile(f)
    out = compiled(q, k, v)
    ref = f(q, k, v)
    assert (out - ref).abs().max() < 1e-5
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        assert (a - b).abs().max() < 1e-5


def test_compiled_decoder_lm_has_no_graph_break_and_matches_eager():
    """A model built from attnkit.nn (RoPE, GQA, SwiGLU, RMSNorm) compiles as one graph."""
    from torch import nn

    from attnkit import nn as aknn

    torch._dynamo.reset()
    torch.manual_seed(0)
    E, H = 32, 4
    blocks = [aknn.PreNormBlock(aknn.MultiHeadAttention(E, H, num_kv_heads=2, positional=aknn.RotaryEmbedding(8)),
                                aknn.SwiGLU(E, 64), aknn.RMSNorm(E), aknn.RMSNorm(E))]
    model = aknn.DecoderLM(aknn.TokenEmbeddings(50, E), blocks, aknn.RMSNorm(E), nn.Linear(E, 50)).eval()
    ids = torch.randint(0, 50, (2, 16))
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break is an error
    with torch.no_grad():
        assert (compiled(ids) - model(ids)).abs().max() < 1e-5
