"""The dropout mask's generator (ops/dropout.py) and the oracle's dropout and softcap.

The keep mask is a pure function of (seed, b, h, i, j): checked word for word against Triton's
``tl.philox`` (in its interpreter), for its statistics, and as what the reference applies.
"""

import math
import os

import pytest
import torch

import attnkit as ak
from attnkit.ops import dropout as D
from attnkit.ops.reference import reference_attention

SEEDS = (0, 1, 12345, 2 ** 32 + 7, 2 ** 62 + 987654321)


def _triton_words(seed: int, c0, c1, c2, c3):
    """tl.philox's four words for uint32 counters, run in Triton's interpreter."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def kernel(out, c0p, c1p, c2p, c3p, seed, N: tl.constexpr):
        o = tl.arange(0, N)
        a, b, c, d = tl.philox(seed, tl.load(c0p + o).to(tl.uint32), tl.load(c1p + o).to(tl.uint32),
                               tl.load(c2p + o).to(tl.uint32), tl.load(c3p + o).to(tl.uint32))
        for lane, w in ((0, a), (1, b), (2, c), (3, d)):
            tl.store(out + o * 4 + lane, w.to(tl.int64))

    n = c0.numel()
    out = torch.zeros(n * 4, dtype=torch.int64)
    kernel[(1,)](out, c0, c1, c2, c3, seed, n)
    return (out & D.MASK32).view(n, 4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter (no CUDA)")
@pytest.mark.parametrize("seed", SEEDS)
def test_philox_equals_tritons_word_for_word(seed):
    g = torch.Generator().manual_seed(seed % 1000)
    c = [torch.randint(0, 2 ** 32, (64,), generator=g, dtype=torch.int64) for _ in range(4)]
    c[0][:4] = torch.tensor([0, 1, 2 ** 32 - 1, 2 ** 31])  # the edges of a word
    ours = torch.stack(D.philox4x32(*c, seed), -1)
    assert torch.equal(ours, _triton_words(seed, *c))


def test_mulhilo_gives_both_words_of_the_product():
    b = torch.tensor([0, 1, 2 ** 16, 2 ** 32 - 1, 123456789, 2 ** 31 + 5])
    for a in (D.PHILOX_ROUND_A, D.PHILOX_ROUND_B, 1, 2 ** 32 - 1):
        hi, lo = D._mulhilo(a, b)
        assert hi.tolist() == [(a * int(x)) >> 32 for x in b] and lo.tolist() == [(a * int(x)) % 2 ** 32 for x in b]


def test_words_are_a_function_of_the_position_only():
    """A tile's words equal the same positions' words in the whole matrix: what lets every backend
    regenerate the mask tile by tile, forward and backward."""
    full = D.dense_keep_mask(7, 0.3, 2, 3, 40, 50)
    rows, cols = torch.arange(13, 29)[:, None], torch.arange(5, 47)[None, :]
    tile = D.keep_mask(7, 0.3, D.batch_heads(2, 3), rows, cols)
    assert torch.equal(tile, full[:, :, 13:29, 5:47])
    assert not torch.equal(D.dense_keep_mask(8, 0.3, 2, 3, 40, 50), full)  # another seed, another mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_and_independence(p):
    keep = D.dense_keep_mask(2024, p, 2, 4, 128, 256).double()
    n = keep.numel()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(keep.mean().item() - (1 - p)) < 5 * sd
    for axis in (1, 2, 3):  # no head, row or column keeps systematically more
        means = keep.mean(dim=[d for d in range(4) if d != axis])
        per = n / means.numel()
        assert (means - (1 - p)).abs().max().item() < 6 * math.sqrt(p * (1 - p) / per)
    lanes = keep.view(2, 4, 128, 64, 4)  # the four words of one Philox call: not correlated
    corr = torch.corrcoef(lanes.reshape(-1, 4).T)
    assert (corr - torch.eye(4, dtype=corr.dtype)).abs().max().item() < 0.03


def test_threshold_edges():
    assert D.threshold(0.0) == 0
    assert D.threshold(0.5) == 2 ** 31
    assert D.threshold(1 - 1e-12) <= D.MASK32
    assert D.dense_keep_mask(3, 0.0, 1, 1, 8, 8).all()


def test_reference_applies_the_keep_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out, lse = reference_attention(q, k, v, mask=ak.causal(), bias=None, scale=0.3, dropout_p=0.25, dropout_seed=99)
    s = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~torch.ones(17, 17, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(s, -1)
    keep = D.dense_keep_mask(99, 0.25, 2, 3, 17, 17)
    assert torch.allclose(out, (p * keep / 0.75) @ v, atol=1e-12)
    assert torch.allclose(lse, torch.logsumexp(s, -1), atol=1e-12)  # before dropout


def test_dropout_is_reproducible_under_manual_seed():
    q, k, v = (torch.randn(1, 2, 33, 8, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(5)
    a = ak.attention(q, k, v, dropout_p=0.2, impl="reference")
    torch.manual_seed(5)
    b = ak.attention(q, k, v, dropout_p=0.2, impl="reference")
    c = ak.attention(q, k, v, dropout_p=0.2, impl="reference")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_softcap_in_the_oracle_is_tanh_before_bias_and_mask():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 9, 4, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    bias = torch.randn(2, 2, 9, 9, generator=g, dtype=torch.float64)
    out = ak.attention(q, k, v, mask=ak.causal(), bias=bias, softcap=2.0, scale=1.0)
    s = 2.0 * torch.tanh(q @ k.transpose(-1, -2) / 2.0) + bias
    s = s.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    assert torch.allclose(out, torch.softmax(s, -1) @ v, atol=1e-12)
    w = ak.attention_weights(q, k, mask=ak.causal(), bias=bias, softcap=2.0, scale=1.0)
    assert torch.allclose(w, torch.softmax(s, -1), atol=1e-12)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), "3"])
def test_softcap_refuses_non_positive_or_non_finite(bad):
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="softcap"):
        ak.attention(q, q, q, softcap=bad)


def test_sdpa_refuses_softcap_with_its_reason():
    q = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match="softcap=30.0: torch SDPA cannot cap"):
        ak.attention(q, q, q, softcap=30.0, impl="sdpa")
