"""ak.attention_weights and ak.explain."""

from __future__ import annotations

import torch

import attnkit as ak


def test_attention_weights_are_the_reference_probabilities():
    q, k, v = (torch.randn(2, 4, 9, 8, dtype=torch.float64) for _ in range(3))
    mask = ak.causal() & ak.key_padding([9, 4]) & ~ak.global_tokens([8])  # row 8 sees nothing
    w = ak.attention_weights(q, k, v, mask=mask, bias=ak.alibi(4))
    assert w.shape == (2, 4, 9, 9)
    assert torch.all(w[~mask.materialize(9, 9).expand_as(w)] == 0)
    sums = w.sum(-1)
    assert torch.allclose(sums[:, :, :8], torch.ones_like(sums[:, :, :8])) and torch.all(sums[:, :, 8] == 0)
    assert torch.allclose(w @ v, ak.attention(q, k, v, mask=mask, bias=ak.alibi(4), impl="reference"))
    scores = q @ k.transpose(-1, -2) / 8 ** 0.5 + ak.alibi(4).materialize(9, 9)  # the textbook formula
    expected = torch.softmax(scores.masked_fill(~mask.materialize(9, 9), float("-inf"))[:, :, 3], -1)
    assert torch.allclose(w[:, :, 3], expected)


def test_explain_names_the_choice_and_every_reason():
    q = torch.randn(1, 2, 16, 8)
    text = str(ak.explain(q, q, q, bias=ak.alibi(2)))
    assert "auto picks: tiled" in text and "why not: bias alibi" in text
    assert ak.explain(q, q, q, dropout_p=0.1).chosen == "sdpa"
    assert ak.explain(q, q, q, dropout_p=0.1, mask=ak.causal(), bias=ak.alibi(2)).chosen == "reference"
    assert list(ak.backends()) == ["sdpa", "tiled", "reference"]
