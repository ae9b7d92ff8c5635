"""Attention dropout as a pure function of (seed, position): the same keep mask in every backend.

FlashAttention (Dao et al. 2022, sec. 3.1 and appendix B) never stores the dropout mask: each
tile draws its bits from a counter-based generator (Philox4x32-10, Salmon et al. 2011, "Parallel
random numbers: as easy as 1, 2, 3") keyed by a seed, with the element's position as the
counter, and the backward draws the same bits again. attnkit does the same, and fixes the
counter layout so that the reference, ``tiled``, ``banded`` and the Triton kernels keep exactly
the same (query, key) pairs for one seed:

    counter = (c0, c1, c2, c3) = (j // 4, i, b * Hq + h, 0)       key = (seed & 0xffffffff, seed >> 32)
    r = Philox4x32-10(counter, key)[j % 4]                          (an unsigned 32-bit integer)
    keep(b, h, i, j) = r >= threshold(p),   threshold(p) = floor(p * 2**32)

for batch b, query head h (of Hq), query row i and key column j. One Philox call gives the four
words of four neighbouring keys (FlashAttention also uses all four). The rounds are Triton's
``tl.philox`` (``triton/language/random.py``), so a kernel calls ``tl.philox(seed, j >> 2, i, bh,
0)`` and picks lane ``j & 3``; ``philox4x32`` below is the same arithmetic in torch int64 ops and
a test checks it against Triton's, word for word.

A kept probability is scaled by 1 / (1 - p) (inverted dropout, as ``torch.nn.functional.dropout``)
and the log-sum-exp is that of the scores before dropout. The seed of a call is drawn from torch's
CPU generator (``draw_seed``), so ``torch.manual_seed`` makes a training step reproducible.

Legend: B batch, Hq query heads, Nq queries, Nk keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key, per round
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57  # the round multipliers
PHILOX_ROUNDS = 10
SEED_BITS = 63  # seeds are non-negative int64, so they pass to a kernel as one int64 argument


def draw_seed() -> int:
    """A fresh seed from torch's default CPU generator (``torch.manual_seed`` fixes it)."""
    return int(torch.randint(0, 2 ** SEED_BITS - 1, (), dtype=torch.int64))


def threshold(p: float) -> int:
    """The smallest 32-bit word that is kept: floor(p * 2**32); p in [0, 1)."""
    return min(int(p * 2 ** 32), MASK32)


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of the 64-bit products of the 32-bit constant ``a`` and the words
    ``b`` (int64 tensors with values in [0, 2**32)). The product can pass 2**63: int64 multiplication
    wraps modulo 2**64, which keeps all 64 bits, and the arithmetic shift's sign bits are masked off."""
    prod = b * a
    return (prod >> 32) & MASK32, prod & MASK32


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, seed: int,
               rounds: int = PHILOX_ROUNDS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 (Salmon et al. 2011, Fig. 2) on int64 tensors of 32-bit words, broadcast
    together; the key is (seed's low word, seed's high word). Returns four int64 tensors of words
    in [0, 2**32), equal to ``tl.philox(seed, c0, c1, c2, c3)`` with uint32 counters."""
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    c0, c1, c2, c3 = torch.broadcast_tensors(*(c.to(torch.int64) & MASK32 for c in (c0, c1, c2, c3)))
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b.bitwise_xor_(c1).bitwise_xor_(k0), lo_b, hi_a.bitwise_xor_(c3).bitwise_xor_(k1), lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def random_words(seed: int, bh: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The 32-bit word (int64) of each (bh, row, col), broadcast together: the module's counter
    layout. ``bh`` = b * Hq + h, ``rows`` query positions, ``cols`` key positions (int tensors)."""
    cols = cols.to(torch.int64)
    words = philox4x32(cols >> 2, rows, bh, torch.zeros((), dtype=torch.int64, device=cols.device), seed)
    lane = cols & 3
    out = words[3]
    for i in (2, 1, 0):
        out = torch.where(lane == i, words[i], out)
    return out


def keep_mask(seed: int, p: float, bh: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """bool, broadcast of (bh, rows, cols): True where the probability is kept."""
    return random_words(seed, bh, rows, cols) >= threshold(p)


def batch_heads(B: int, Hq: int, device: torch.device | str | None = None) -> Tensor:
    """(B, Hq, 1, 1) int64: b * Hq + h, the counter word of each (batch, query head)."""
    return (torch.arange(B, device=device)[:, None] * Hq + torch.arange(Hq, device=device)[None, :])[:, :, None, None]


def dropout_multiplier(seed: int, p: float, bh: Tensor, rows: Tensor, cols: Tensor, dtype: torch.dtype) -> Tensor:
    """keep / (1 - p) in ``dtype``, broadcast of (bh, rows, cols): what the probabilities are
    multiplied by (inverted dropout)."""
    keep = keep_mask(seed, p, bh, rows, cols)
    return keep.to(dtype) * (1.0 / (1.0 - p))


def dense_keep_mask(seed: int, p: float, B: int, Hq: int, Nq: int, Nk: int,
                    device: torch.device | str | None = None, row_offset: int = 0) -> Tensor:
    """(B, Hq, Nq, Nk) bool: the whole keep mask of a call (for the reference and for tests).
    ``row_offset`` shifts the query positions (rows ``row_offset .. row_offset + Nq - 1``)."""
    rows = torch.arange(row_offset, row_offset + Nq, device=device)[:, None]
    cols = torch.arange(Nk, device=device)[None, :]
    return keep_mask(seed, p, batch_heads(B, Hq, device), rows, cols)
