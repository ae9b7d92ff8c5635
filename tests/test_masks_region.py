"""masks.Region / bias.RegionBias: a mask (bias) restricted to a region of its whole problem, as
context-parallel shards use it. Its truth is the whole mask's rows and columns; its tile kinds
agree with that truth for contiguous and strided regions; backends run it exactly."""

from __future__ import annotations

import itertools

import pytest
import torch

import attnkit as ak
from attnkit.bias import RegionBias
from attnkit.masks import EMPTY, FULL, Region

N = 37
REGIONS = [((0, 1, 10), (0, 1, 37)), ((5, 1, 13), (7, 1, 11)), ((3, 4, 8), (2, 5, 7)), ((20, 1, 17), (30, 1, 7)),
           ((1, 2, 18), (1, 3, 12)), ((36, 1, 1), (0, 1, 37))]


def _masks():
    g = torch.Generator().manual_seed(3)
    return {
        "causal": ak.causal(), "window": ak.sliding_window(3, 2), "dilated": ak.sliding_window(2, 1, dilation=2),
        "causal_window": ak.causal() & ak.sliding_window(4), "window|global": ak.sliding_window(2) | ak.global_tokens([0, 17]),
        "document": ak.document(torch.tensor([0] * 10 + [1] * 15 + [2] * 12)),
        "key_padding": ak.key_padding(torch.tensor([30, 22])), "not_causal": ~ak.causal(),
        "dense": ak.dense_mask(torch.rand(2, 1, N, N, generator=g) > 0.5),
        "longformer": (ak.sliding_window(3) | ak.global_tokens([5])) & ak.key_padding(torch.tensor([33, 20])),
    }


MASKS = _masks()


def _truth(mask, rows, cols):
    full = mask.materialize(N, N)
    return full[:, :, rows][:, :, :, cols]


@pytest.mark.parametrize("name", list(MASKS))
def test_region_truth_and_kinds_match_the_whole_mask(name):
    mask = MASKS[name]
    for (r0, rs, nq), (c0, cs, nk) in REGIONS:
        region = Region(mask, r0, rs, c0, cs, N, N)
        rows, cols = r0 + rs * torch.arange(nq), c0 + cs * torch.arange(nk)
        want = _truth(mask, rows, cols)
        got = region.materialize(nq, nk)
        assert torch.equal(*torch.broadcast_tensors(got, want)), (name, r0, rs, c0, cs)
        for bq, bk in [(4, 3), (8, 8), (nq, nk), (nq, 1)]:
            kinds = region.block_kinds(nq, nk, bq, bk)
            Bm, Hm = torch.broadcast_shapes(kinds.shape[:2], want.shape[:2])
            truth, kinds = want.expand(Bm, Hm, nq, nk), kinds.expand(Bm, Hm, -1, -1)
            for i, j in itertools.product(range(kinds.shape[2]), range(kinds.shape[3])):
                tile = truth[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].flatten(2)
                assert not ((kinds[:, :, i, j] == EMPTY) & tile.any(-1)).any(), (name, bq, bk, i, j)
                assert not ((kinds[:, :, i, j] == FULL) & ~tile.all(-1)).any(), (name, bq, bk, i, j)


@pytest.mark.parametrize("name", ["causal", "window|global", "document", "longformer", "dense"])
@pytest.mark.parametrize("impl", ["tiled", "auto"])
def test_backends_run_a_region_exactly(name, impl):
    """The tiled backend reads the region's block plan (tile signatures included); the result and
    gradients equal the reference on the region's materialized truth and ALiBi's global distances."""
    mask, g = MASKS[name], torch.Generator().manual_seed(0)
    slopes = ak.alibi_slopes(2)
    for (r0, rs, nq), (c0, cs, nk) in REGIONS[:5]:
        q = torch.randn(2, 2, nq, 8, dtype=torch.float64, generator=g, requires_grad=True)
        k = torch.randn(2, 2, nk, 8, dtype=torch.float64, generator=g, requires_grad=True)
        v = torch.randn(2, 2, nk, 8, dtype=torch.float64, generator=g, requires_grad=True)
        rows, cols = r0 + rs * torch.arange(nq), c0 + cs * torch.arange(nk)
        bias = RegionBias(ak.alibi(slopes), r0, rs, c0, cs, N, N)
        want_bias = ak.alibi(slopes).materialize(N, N)[:, :, rows][:, :, :, cols]
        got = ak.attention(q, k, v, mask=Region(mask, r0, rs, c0, cs, N, N), bias=bias, impl=impl)
        want = ak.attention(q, k, v, mask=ak.dense_mask(_truth(mask, rows, cols)), bias=want_bias, impl="reference")
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        g1 = torch.autograd.grad(got.sum(), (q, k, v))
        g2 = torch.autograd.grad(want.sum(), (q, k, v))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_region_outside_the_problem_is_refused():
    region = Region(ak.causal(), 30, 1, 0, 1, N, N)
    with pytest.raises(ValueError, match="inside the whole"):
        region.check(1, 1, 10, 5)  # rows 30..39 of 37


@pytest.mark.parametrize("mask", [ak.sliding_window(20) | ak.global_tokens([5, 200, 333]),
                                  ak.document(torch.arange(400) // 90), ak.key_padding(torch.tensor([290]))],
                         ids=["longformer", "document", "key_padding"])
def test_region_with_many_tiles_groups_them_by_the_whole_mask(mask):
    """A region larger than the tiled backend's blocks: its partial tiles are grouped by the inner
    mask's tile signature at global positions (local ones would merge tiles that differ)."""
    g = torch.Generator().manual_seed(1)
    (r0, nq), (c0, nk) = (130, 200), (61, 339)
    q = torch.randn(1, 2, nq, 8, dtype=torch.float64, generator=g)
    k = torch.randn(1, 2, nk, 8, dtype=torch.float64, generator=g)
    v = torch.randn(1, 2, nk, 8, dtype=torch.float64, generator=g)
    truth = mask.materialize(400, 400)[:, :, r0:r0 + nq, c0:c0 + nk]
    got = ak.attention(q, k, v, mask=Region(mask, r0, 1, c0, 1, 400, 400), impl="tiled")
    want = ak.attention(q, k, v, mask=ak.dense_mask(truth), impl="reference")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mask", [ak.sliding_window(20) | ak.global_tokens([5, 200, 333]),
                                  ak.document(torch.arange(400) // 90), ak.causal() & ak.key_padding(torch.tensor([290]))],
                         ids=["longformer", "document", "causal_padding"])
def test_region_tile_signatures_group_only_equal_tiles(mask):
    """The block plan (Triton's) stores one truth per group of tiles with equal signature: in a region
    those must be tiles with equal truth at their global positions."""
    from attnkit.ops.block_plan import distinct_tiles
    (r0, nq), (c0, nk), bm, bn = (130, 200), (61, 339), 16, 16
    region = Region(mask, r0, 1, c0, 1, 400, 400)
    truth = mask.materialize(400, 400)[:, :, r0:r0 + nq, c0:c0 + nk]
    pq, pk = torch.meshgrid(torch.arange(-(-nq // bm)), torch.arange(-(-nk // bn)), indexing="ij")
    pq, pk = pq.flatten(), pk.flatten()
    first, group = distinct_tiles(region, pq, pk, nq, nk, bm, bn)
    padded = torch.nn.functional.pad(truth, (0, bn, 0, bm))
    tile = lambda i: padded[:, :, pq[i] * bm:(pq[i] + 1) * bm, pk[i] * bn:(pk[i] + 1) * bn]  # noqa: E731
    for i in range(len(group)):
        assert torch.equal(tile(i), tile(int(first[group[i]]))), f"tile {i} grouped with a different one"
    assert len(first) < len(group)  # the signatures do group tiles (else the test shows nothing)
