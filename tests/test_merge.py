"""Partials over disjoint keys merge into attention over their union (ops/merge.py)."""

from __future__ import annotations

import torch

from attnkit.ops.merge import merge, merge_groups


def _partial(q, k, v, keys):
    """(out (H, N, D), lse (H, N)) of q over the keys in ``keys`` only; nothing seen: 0, -inf."""
    H, N, _ = q.shape
    if not keys:
        return q.new_zeros(H, N, v.shape[-1]), q.new_full((H, N), float("-inf"))
    s = q @ k[:, keys].transpose(1, 2)  # (H, N, |keys|)
    return torch.softmax(s, -1) @ v[:, keys], torch.logsumexp(s, -1)


def test_merge_groups_is_attention_over_each_groups_keys():
    torch.manual_seed(0)
    H, N, Nk, D = 3, 5, 40, 8
    q, k, v = (torch.randn(H, n, D, dtype=torch.float64) for n in (N, Nk, Nk))
    # six partials in four groups: group 2 is one partial that saw nothing, group 3 two of them
    subsets = [list(range(7)), list(range(7, 20)), list(range(20, 21)), [], list(range(21, 40)), []]
    group = torch.tensor([0, 0, 1, 2, 1, 3])
    gather = torch.tensor([[0, 1], [2, 4], [3, -1], [5, -1]])  # each group's partials, -1 past them
    outs, lses = zip(*(_partial(q, k, v, keys) for keys in subsets))
    outs = torch.stack(outs + (torch.full_like(outs[0], float("nan")),))  # a slot no group names:
    lses = torch.stack(lses + (torch.full_like(lses[0], float("nan")),))  # never read
    out, lse = merge_groups(outs, lses, gather)  # (4, H, N, D), (4, H, N)
    for g in range(3):
        keys = sorted(x for keys, gg in zip(subsets, group.tolist()) if gg == g for x in keys)
        want, want_lse = _partial(q, k, v, keys)
        torch.testing.assert_close(out[g], want)
        torch.testing.assert_close(lse[g], want_lse)
    assert torch.equal(out[3], torch.zeros_like(out[3])) and torch.isneginf(lse[3]).all()
    # and it agrees with merging one pair at a time
    acc, acc_lse = merge(None, None, outs[2], lses[2])
    acc, acc_lse = merge(acc, acc_lse, outs[4], lses[4])
    torch.testing.assert_close(out[1], acc)
    torch.testing.assert_close(lse[1], acc_lse)


def test_merge_groups_keeps_large_scores_finite():
    """Scores of 1e4 would overflow exp(lse): the merge works relative to each group's max."""
    lses = torch.tensor([[1e4], [1e4 + 1.0], [-1e4]])  # (S=3, N=1)
    outs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[5.0, 5.0]]])  # (3, 1, 2)
    out, lse = merge_groups(outs, lses, torch.tensor([[0, 1], [2, -1]]))
    w = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    torch.testing.assert_close(out[0, 0], w)
    torch.testing.assert_close(lse[0], torch.tensor([1e4 + 1.0 + torch.log1p(torch.exp(torch.tensor(-1.0))).item()]))
    torch.testing.assert_close(out[1], outs[2])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
