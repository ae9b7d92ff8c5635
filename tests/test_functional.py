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
    assert ak.explain(q, q, q, dropout_p=0.1, mask=ak.causal(), bias=ak.alibi(2)).chosen == "tiled"  # mask per tile
    assert list(ak.backends()) == ["sdpa", "triton", "banded", "tiled", "reference"]


def test_auto_prefers_tiled_when_the_mask_rules_out_most_tiles():
    q = torch.randn(1, 2, 4096, 16)
    assert ak.explain(q, q, q, mask=ak.sliding_window(256)).chosen == "banded"
    assert ak.explain(q, q, q, mask=ak.sliding_window(256) | ak.global_tokens([5])).chosen == "banded"
    assert ak.explain(q, q, q, mask=ak.sliding_window(2048)).chosen == "sdpa"  # window too wide for banded
    assert ak.explain(q, q, q, mask=ak.document(torch.arange(4096) // 1000)).chosen == "tiled"
    assert ak.explain(q, q, q, mask=ak.key_padding([4000])).chosen == "sdpa"  # nearly dense
    assert ak.explain(q, q, q, mask=ak.causal()).chosen == "sdpa"  # torch's own is_causal
    small = torch.randn(1, 2, 512, 16)
    assert ak.explain(small, small, small, mask=ak.sliding_window(64)).chosen == "sdpa"
    mid = torch.randn(1, 2, 1024, 16)
    assert ak.explain(mid, mid, mid, mask=ak.sliding_window(64)).chosen == "banded"
    b = torch.zeros(1, 2, 64, 64, requires_grad=True)
    x = torch.randn(1, 2, 64, 16)
    assert ak.explain(x, x, x, bias=b, return_lse=True).chosen == "reference"
