"""The mask language: dense truth, tile classification consistent with it, ASCII, composition."""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit.masks import EMPTY, FULL

from cases import CASES


def assert_kinds_consistent(mask, Nq, Nk, bq, bk):
    """FULL tiles are all True and EMPTY tiles all False in the materialized mask."""
    dense = mask.materialize(Nq, Nk)  # (Bm, Hm, Nq, Nk)
    kinds = mask.block_kinds(Nq, Nk, bq, bk)  # (Bm, Hm, nQ, nK)
    Bm, Hm = torch.broadcast_shapes(dense.shape[:2], kinds.shape[:2])
    dense, kinds = dense.expand(Bm, Hm, Nq, Nk), kinds.expand(Bm, Hm, -1, -1)
    for i in range(kinds.shape[2]):
        for j in range(kinds.shape[3]):
            tile = dense[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            kind = kinds[:, :, i, j]
            assert torch.all(tile.flatten(2).all(-1)[kind == FULL]), f"tile {i},{j} FULL but not all True"
            assert torch.all(~tile.flatten(2).any(-1)[kind == EMPTY]), f"tile {i},{j} EMPTY but has True"
    return kinds


@pytest.mark.parametrize("case", [c for c in CASES if c.mask is not None], ids=lambda c: c.name)
@pytest.mark.parametrize("blocks", [(16, 8), (7, 13), (64, 64)])
def test_block_kinds_agree_with_dense_truth(case, blocks):
    assert_kinds_consistent(case.make_mask(), case.Nq, case.Nk, *blocks)


def test_block_kinds_are_tight_for_structured_masks():
    """Not just conservative: a causal/window mask finds its empty and full tiles exactly."""
    kinds = ak.causal().block_kinds(64, 64, 16, 16)[0, 0]
    assert kinds.tolist() == [[1, 0, 0, 0], [2, 1, 0, 0], [2, 2, 1, 0], [2, 2, 2, 1]]
    kinds = ak.sliding_window(16).block_kinds(128, 128, 16, 16)[0, 0]
    assert int((kinds == EMPTY).sum()) == 8 * 8 - (8 + 2 * 7)  # a band of 3 tile diagonals
    assert torch.equal(torch.diagonal(kinds), torch.full((8,), FULL, dtype=torch.int8))


def test_causal_is_bottom_right_aligned():
    assert ak.causal().to_ascii(3, 5, allowed="#", blocked=".") == "###..\n####.\n#####"
    assert ak.causal().to_ascii(3, 3, allowed="#", blocked=".") == "#..\n##.\n###"


def test_sliding_window_and_global_ascii():
    m = ak.sliding_window(1) | ak.global_tokens([0])
    assert m.to_ascii(4, 4, allowed="x", blocked=".") == "xxxx\nxxx.\nxxxx\nx.xx"
    assert ak.sliding_window(0, 1).to_ascii(3, 3, allowed="x", blocked=".") == "xx.\n.xx\n..x"


def test_composition_matches_boolean_algebra():
    Nq, Nk = 23, 31
    a, b = ak.causal(), ak.sliding_window(3, 5)
    c = ak.document(torch.arange(Nk) // 7)
    A, Bd, C = (m.materialize(Nq, Nk) for m in (a, b, c))
    assert torch.equal((a & b).materialize(Nq, Nk), A & Bd)
    assert torch.equal((a | ~c).materialize(Nq, Nk), A | ~C)
    assert torch.equal((~(a & b) | c).materialize(Nq, Nk), ~(A & Bd) | C)


def test_key_padding_lengths_equal_bool_form():
    lengths = torch.tensor([5, 0, 9])
    valid = torch.arange(9)[None, :] < lengths[:, None]
    assert torch.equal(ak.key_padding(lengths).materialize(4, 9), ak.key_padding(valid).materialize(4, 9))
    assert ak.key_padding(lengths).materialize(4, 9).shape == (3, 1, 4, 9)


def test_global_tokens_per_sample_and_shared_agree():
    flags = torch.zeros(2, 12, dtype=torch.bool)
    flags[:, [2, 7]] = True
    assert torch.equal(ak.global_tokens(flags).materialize(12, 12)[1],
                       ak.global_tokens([2, 7]).materialize(12, 12)[0])


def test_document_rows_follow_query_positions():
    ids = torch.tensor([0, 0, 1, 1, 1])
    m = ak.document(ids).materialize(2, 5)[0, 0]  # queries sit at positions 3 and 4
    assert m.tolist() == [[False, False, True, True, True]] * 2


def test_mask_and_tensor_do_not_compose_silently():
    with pytest.raises(TypeError, match="compose only with other attnkit masks"):
        ak.causal() & torch.ones(3, 3, dtype=torch.bool)


def test_repr_reads_like_the_expression():
    assert repr(ak.causal() & ak.sliding_window(4)) == "(causal() & sliding_window(4, 4))"


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(ak.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert ak.alibi_slopes(12).shape == (12,)  # interleaved extension beyond a power of two
    bias = ak.alibi(torch.tensor([0.5])).materialize(2, 4)[0, 0]  # queries at positions 2 and 3
    assert bias.tolist() == [[-1.0, -0.5, 0.0, -0.5], [-1.5, -1.0, -0.5, 0.0]]
