"""attnkit.viz.analysis against loops written from the definitions, on real attention maps."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit as ak
from attnkit.viz import attention_rollout, head_entropy, mean_attention_distance, special_token_attention


def maps(B=2, H=3, Nq=7, Nk=7, mask=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, Nq, 8, generator=g), torch.randn(B, H, Nk, 8, generator=g)
    return ak.attention_weights(q, k, mask=mask).double()


def test_entropy_from_the_definition_and_its_bounds():
    p = maps(mask=ak.causal())
    want = torch.zeros(2, 3, dtype=torch.float64)
    for b in range(2):
        for h in range(3):
            rows = [-sum(x * math.log(x) for x in p[b, h, i].tolist() if x > 0) for i in range(7)]
            want[b, h] = sum(rows) / 7
    assert torch.allclose(head_entropy(p), want, atol=1e-12)
    uniform = torch.full((1, 1, 4, 5), 0.2, dtype=torch.float64)
    assert math.isclose(head_entropy(uniform).item(), math.log(5), rel_tol=1e-12)
    one_hot = torch.eye(5, dtype=torch.float64)[None, None]
    assert head_entropy(one_hot).item() == 0.0


def test_padding_rows_and_dead_rows_are_left_out():
    lengths = torch.tensor([7, 4])
    p = maps(mask=ak.key_padding(lengths) & ak.causal())
    valid = torch.arange(7)[None] < lengths[:, None]  # (B, Nq): queries past the length are padding
    got = head_entropy(p, query_valid=valid)
    want = head_entropy(p[1:, :, :4, :4])  # sample 1 restricted to its real tokens
    assert torch.allclose(got[1], want[0], atol=1e-12)
    dead = p.clone()
    dead[:, :, 0] = 0  # a row that attends nowhere (out = 0 in attnkit) does not count
    assert torch.allclose(head_entropy(dead[:, :, 1:]), head_entropy(dead), atol=1e-12)


def test_mean_distance_uses_bottom_right_positions():
    p = maps(Nq=3, Nk=6, mask=ak.causal())
    want = torch.zeros(2, 3, dtype=torch.float64)
    for b in range(2):
        for h in range(3):
            want[b, h] = sum(p[b, h, i, j].item() * abs(i + 3 - j) for i in range(3) for j in range(6)) / 3
    assert torch.allclose(mean_attention_distance(p), want, atol=1e-12)
    diag = torch.eye(6, dtype=torch.float64)[None, None]
    assert mean_attention_distance(diag).item() == 0.0


def test_special_token_share():
    p = maps()
    got = special_token_attention(p, [0, 6])
    assert torch.allclose(got, (p[..., 0] + p[..., 6]).mean(-1), atol=1e-12)
    flags = torch.zeros(2, 7, dtype=torch.bool)
    flags[0, 0] = flags[1, 3] = True
    got = special_token_attention(p, flags)
    assert torch.allclose(got[0], p[0, :, :, 0].mean(-1)) and torch.allclose(got[1], p[1, :, :, 3].mean(-1))
    with pytest.raises(ValueError, match="key positions in 0..6"):
        special_token_attention(p, [7])


def test_rollout_from_the_paper():
    layers = [maps(seed=s) for s in range(3)]
    want = None
    for a in layers:
        a = 0.5 * a.mean(1) + 0.5 * torch.eye(7, dtype=torch.float64)
        a = a / a.sum(-1, keepdim=True)
        want = a if want is None else torch.bmm(a, want)
    got = attention_rollout(layers)
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(got.sum(-1), torch.ones(2, 7, dtype=torch.float64))
    assert torch.allclose(attention_rollout(layers[:1], residual=0.0), layers[0].mean(1))
    assert torch.allclose(attention_rollout(layers, residual=1.0), torch.eye(7, dtype=torch.float64).expand(2, 7, 7))


def test_bad_inputs_explain_themselves():
    with pytest.raises(ValueError, match=r"\(B, H, Nq, Nk\)"):
        head_entropy(torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="same N tokens"):
        attention_rollout([maps(), maps(Nq=5, Nk=5)])
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout([maps()], head_fusion="median")
