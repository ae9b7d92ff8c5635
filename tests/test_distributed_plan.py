"""The context-parallel schedule (``attnkit.distributed.plan``, ``layout``, ``global_rows``), checked
in one process against the dense truth: every pair a rank's queries may attend is covered exactly
once, by keys it holds or receives; nothing a mask rules out is sent; a window's traffic does not
grow with N. (The multi-process exchange itself: tests/test_distributed.py.)"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.distributed import layout as L
from attnkit.distributed.global_rows import without_global_rows
from attnkit.distributed.plan import build


def _masks(N):
    return {
        "none": None, "causal": ak.causal(), "window": ak.sliding_window(5, 2),
        "causal_window": ak.causal() & ak.sliding_window(9), "dilated": ak.sliding_window(3, dilation=3),
        "window|global": ak.sliding_window(4) | ak.global_tokens([1, N // 2]),
        "document": ak.document(torch.arange(N) // 13), "padding": ak.causal() & ak.key_padding(torch.tensor([N - 9, N // 3])),
    }


@pytest.mark.parametrize("layout", L.LAYOUTS)
@pytest.mark.parametrize("world,N", [(2, 53), (3, 40), (4, 67), (4, 5)])
def test_layouts_cover_the_sequence_once(layout, world, N):
    held = [L.positions(layout, r, world, N) for r in range(world)]
    assert torch.equal(torch.sort(torch.cat(held)).values, torch.arange(N))
    assert [len(h) for h in held] == [L.local_size(layout, r, world, N) for r in range(world)]
    x = torch.randn(2, N, 3)
    parts = [L.shard(x, r, world, dim=1, layout=layout) for r in range(world)]
    assert torch.equal(L.unshard(parts, dim=1, layout=layout), x)


def test_zigzag_balances_causal_work():
    """Under a causal mask each zigzag rank's queries see about the same number of keys; contiguous
    ranks see up to 2P - 1 times more on the last rank."""
    N, world = 4096, 4
    work = {lay: [int(sum(p + 1 for p in L.positions(lay, r, world, N).tolist())) for r in range(world)]
            for lay in ("zigzag", "contiguous", "striped")}
    assert max(work["zigzag"]) / min(work["zigzag"]) < 1.01
    assert max(work["striped"]) / min(work["striped"]) < 1.01
    assert max(work["contiguous"]) / min(work["contiguous"]) > 6


@pytest.mark.parametrize("layout", L.LAYOUTS)
@pytest.mark.parametrize("world,N", [(2, 37), (4, 67)])
@pytest.mark.parametrize("name", list(_masks(40)))
@pytest.mark.parametrize("schedule", ["mask", "ring"])
def test_pairs_cover_the_mask_exactly_once(layout, world, N, name, schedule):
    mask = _masks(N)[name]
    main = without_global_rows(mask, N)[0] if schedule == "mask" else mask
    plan = build(main, layout, world, N, schedule, key_block=4)
    truth = torch.ones(1, 1, N, N, dtype=torch.bool) if main is None else main.materialize(N, N)
    for dst in range(world):
        rows = L.positions(layout, dst, world, N)
        covered = torch.zeros(truth.shape[0], truth.shape[1], len(rows), N, dtype=torch.int32)
        local = {int(p): i for i, p in enumerate(rows)}
        for src in range(world):
            segs = plan.sends[src][dst] if src != dst else None
            available = (torch.cat([s.run.positions() for s in segs]) if segs else torch.empty(0, dtype=torch.long)) \
                if src != dst else L.positions(layout, src, world, N)
            for pair in plan.pairs[dst][src]:
                keys = pair.k_run.positions()
                assert torch.equal(available[pair.k_start:pair.k_start + len(keys)], keys)  # the buffer holds them
                qs = pair.q_run.positions()
                assert torch.equal(rows[pair.q_start:pair.q_start + len(qs)], qs)
                allowed = torch.ones(1, 1, len(qs), len(keys), dtype=torch.bool) if pair.mask is None \
                    else pair.mask.materialize(len(qs), len(keys))
                r_idx = torch.tensor([local[int(p)] for p in qs])
                covered[:, :, r_idx[:, None], keys[None, :]] += allowed.expand(covered.shape[0], covered.shape[1], -1, -1).int()
        want = truth[:, :, rows].expand_as(covered).int()
        assert torch.equal(covered, want), f"rank {dst}: pairs cover {int(covered.sum())} of {int(want.sum())}"


@pytest.mark.parametrize("layout", L.LAYOUTS)
@pytest.mark.parametrize("name", ["causal", "window", "causal_window", "window|global", "document", "padding"])
def test_nothing_the_mask_rules_out_is_sent(layout, name):
    """Every key sent is one some query of the receiver may see, up to the joined gaps (< key_block)."""
    N, world = 67, 4
    mask = _masks(N)[name]
    main = without_global_rows(mask, N)[0]
    plan = build(main, layout, world, N, "mask", key_block=1)
    truth = main.materialize(N, N).any(0).any(0)  # (N, N) over the batch and heads
    for dst in range(world):
        seen = truth[L.positions(layout, dst, world, N)].any(0)  # (N,) keys some query of dst sees
        for src in range(world):
            if src != dst:
                sent = torch.zeros(N, dtype=torch.bool)
                for seg in plan.sends[src][dst]:
                    sent[seg.run.positions()] = True
                assert torch.equal(sent, seen & torch.isin(torch.arange(N), L.positions(layout, src, world, N)))


def test_window_traffic_does_not_grow_with_N():
    W = 24
    for world in (2, 4):
        counts = []
        for N in (512, 4096, 32768):
            plan = build(ak.sliding_window(W), "contiguous", world, N)
            counts.append([plan.keys_sent(s, d) for s in range(world) for d in range(world) if s != d])
        assert counts[0] == counts[1] == counts[2]
        assert max(counts[0]) == W  # exactly the window's edge from each neighbour
        ring = build(ak.sliding_window(W), "contiguous", world, 32768, "ring")
        assert ring.keys_sent(0, 1) == 32768 // world


def test_causal_contiguous_sends_nothing_backwards():
    plan = build(ak.causal(), "contiguous", 4, 400)
    for src in range(4):
        for dst in range(src):
            assert plan.sends[src][dst] == ()  # a later rank's keys are in every earlier query's future
        for dst in range(src + 1, 4):
            assert plan.keys_sent(src, dst) == 100


def test_global_rows_leave_the_main_plan():
    """window | global: the main plan feeds global keys but not global query rows, so a rank holding
    a global token receives O(W + G) keys, not the whole sequence."""
    N, world = 4096, 4
    mask = ak.sliding_window(16) | ak.global_tokens([3, 2000])
    full = build(mask, "contiguous", world, N)
    main = build(without_global_rows(mask, N)[0], "contiguous", world, N)
    assert full.keys_sent(3, 0) == N // world  # rank 0 holds global row 3: it would need everything
    assert main.keys_sent(3, 0) == 0 and main.keys_sent(1, 0) == 16 + 1  # the window edge and global key 2000


def test_layout_errors():
    with pytest.raises(ValueError, match="layout='ring'"):
        L.runs("ring", 0, 2, 10)
    with pytest.raises(ValueError, match="unshard: rank 0"):
        L.unshard([torch.zeros(1, 5, 2), torch.zeros(1, 3, 2)], dim=1, layout="contiguous")


@pytest.mark.parametrize("name", ["causal", "window", "window|global", "document", "padding", "dilated"])
def test_pair_mask_equals_the_region_truth(name):
    """pair_mask's shortcuts (None when full, causal() on a diagonal square, "empty") agree with the
    mask's truth on the pair's rows and keys, for runs in every relative position."""
    from attnkit.distributed.layout import Run
    from attnkit.distributed.plan import pair_mask
    N = 60
    mask = _masks(N)[name]
    truth = mask.materialize(N, N)
    runs = [Run(0, 8), Run(5, 8), Run(10, 8), Run(40, 8), Run(10, 20), Run(3, 9, 4), Run(1, 10, 5)]
    for q in runs:
        for k in runs:
            want = truth[:, :, q.positions()][:, :, :, k.positions()]
            got = pair_mask(mask, q, k, N)
            if got == "empty":
                assert not want.any(), (q, k)
                continue
            got = torch.ones(1, 1, q.count, k.count, dtype=torch.bool) if got is None else got.materialize(q.count, k.count)
            assert torch.equal(*torch.broadcast_tensors(got, want)), (q, k)
