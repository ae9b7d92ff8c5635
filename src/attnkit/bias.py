"""Additive attention biases: a dense float tensor, or structured ones computed tile by tile.

A bias is added to the scaled scores before the softmax: ``softmax(q k^T * scale + bias)``.
Like masks, a bias evaluates on a sub-grid of (query rows, key columns) and returns a tensor
broadcastable to (B, H, rows, cols), so tiled paths never build the full Nq x Nk matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .masks import check_broadcastable, check_values_once, query_positions


class Bias:
    """Base of additive biases. ``evaluate`` returns float (Bm, Hm, len(rows), len(cols))."""

    def evaluate(self, rows: Tensor, cols: Tensor, Nq: int, Nk: int) -> Tensor:
        raise NotImplementedError

    def materialize(self, Nq: int, Nk: int, device: torch.device | str | None = None) -> Tensor:
        """The dense bias (Bm, Hm, Nq, Nk)."""
        dev = torch.device(device or "cpu")
        return self.evaluate(torch.arange(Nq, device=dev), torch.arange(Nk, device=dev), Nq, Nk)

    def check(self, B: int, H: int, Nq: int, Nk: int) -> None:
        """Raise ValueError if the bias cannot apply to a (B, H, Nq, Nk) problem."""

    def requires_grad(self) -> bool:
        """True if a gradient must flow into this bias's parameters."""
        return False


@dataclass(frozen=True, eq=False)
class Alibi(Bias):
    """ALiBi (Press et al. 2022): ``bias[h, i, j] = -slopes[h] * |p_i - j|``, p_i = i + Nk - Nq.

    For causal attention (j <= p_i) this is the paper's ``slopes[h] * (j - p_i)``; the absolute
    value extends it symmetrically to bidirectional attention.
    """

    slopes: Tensor  # (H,) float

    def evaluate(self, rows, cols, Nq, Nk):
        dist = (cols[None, :] - query_positions(rows, Nq, Nk)[:, None]).abs()  # (r, c)
        slopes = self.slopes.to(device=rows.device)
        return -(slopes[:, None, None] * dist.to(slopes.dtype))[None]  # (1, H, r, c)

    def requires_grad(self) -> bool:
        return self.slopes.requires_grad

    def check(self, B, H, Nq, Nk):
        if self.slopes.shape[0] != H:
            raise ValueError(f"alibi: {self.slopes.shape[0]} slopes for Hq={H} query heads; give one per head "
                             "(ak.alibi_slopes(H) gives the paper's)")
        self.check_values()

    def check_values(self) -> None:
        """Finite slopes, read once per slopes tensor and version (``masks.check_values_once``)."""
        def finite() -> None:
            if not torch.isfinite(self.slopes).all():
                raise ValueError("alibi: slopes must be finite")
        check_values_once(self.slopes, ("alibi",), finite)

    def __repr__(self) -> str:
        return f"alibi(<{self.slopes.shape[0]} slopes>)"


@dataclass(frozen=True, eq=False)
class DenseBias(Bias):
    """A user's float tensor broadcastable to (B, H, Nq, Nk)."""

    tensor: Tensor

    def evaluate(self, rows, cols, Nq, Nk):
        t = self.tensor.reshape((1,) * (4 - self.tensor.dim()) + tuple(self.tensor.shape))  # align right
        t = t.expand(*t.shape[:2], Nq, Nk)
        return t[:, :, rows.to(t.device)][:, :, :, cols.to(t.device)].to(rows.device)

    def requires_grad(self) -> bool:
        return self.tensor.requires_grad

    def check(self, B, H, Nq, Nk):
        check_broadcastable("bias", self.tensor, (B, H, Nq, Nk))
        if torch.isnan(self.tensor).any():
            raise ValueError("bias contains NaN; an additive bias must be finite or -inf "
                             "(use a mask to forbid positions)")
        if torch.isposinf(self.tensor).any():
            raise ValueError("bias contains +inf, which makes the softmax undefined; an additive bias "
                             "must be finite or -inf")

    def __repr__(self) -> str:
        return f"bias(<{tuple(self.tensor.shape)}>)"


@dataclass(frozen=True, eq=False)
class SumBias(Bias):
    """Several biases added, e.g. ALiBi plus a user's tensor; evaluated tile by tile like its parts."""

    parts: tuple[Bias, ...]

    def evaluate(self, rows, cols, Nq, Nk):
        total = self.parts[0].evaluate(rows, cols, Nq, Nk)  # (Bm, Hm, r, c), broadcast over the parts
        for part in self.parts[1:]:
            total = total + part.evaluate(rows, cols, Nq, Nk)
        return total

    def requires_grad(self) -> bool:
        return any(part.requires_grad() for part in self.parts)

    def check(self, B, H, Nq, Nk):
        for part in self.parts:
            part.check(B, H, Nq, Nk)

    def __repr__(self) -> str:
        return " + ".join(repr(part) for part in self.parts)


@dataclass(frozen=True, eq=False)
class RegionBias(Bias):
    """``inner`` on a region of its (NQ, NK) problem: local row i is row ``row0 + row_step * i``,
    local key j key ``col0 + col_step * j`` (``masks.Region``'s counterpart, for context-parallel
    shards): ALiBi's distances stay global."""

    inner: Bias
    row0: int
    row_step: int
    col0: int
    col_step: int
    NQ: int
    NK: int

    def evaluate(self, rows, cols, Nq, Nk):
        return self.inner.evaluate(self.row0 + self.row_step * rows, self.col0 + self.col_step * cols,
                                   self.NQ, self.NK)

    def requires_grad(self) -> bool:
        return self.inner.requires_grad()

    def check(self, B, H, Nq, Nk):
        self.inner.check(B, H, self.NQ, self.NK)

    def __repr__(self) -> str:
        return f"region({self.inner!r}, rows={self.row0}::{self.row_step}, keys={self.col0}::{self.col_step})"


# -- rows whose scores are all huge ---------------------------------------------------------------

SHIFT_THRESHOLD = 2.0 ** 8  # |visible row max| of a bias beyond which its row is shifted to max 0:
# within it a float32 lse keeps 2^-16 absolute precision, as fine as an ordinary score of that size
# (at -1e4, the old BERT/GPT-2 padding value, the plain float32 formula is off by 5e-4)
ROW_CHUNK_ELEMENTS = 1 << 22  # bias entries evaluated at once when looking for the visible row max


@dataclass(frozen=True, eq=False)
class RowShiftedBias(Bias):
    """``base - shift[row]``: a bias with a constant taken off some rows (see ``row_stabilized``)."""

    base: Bias
    shift: Tensor  # (Bx, Hx, Nq)

    def evaluate(self, rows, cols, Nq, Nk):
        shift = self.shift.to(rows.device)[:, :, rows, None]  # (Bx, Hx, r, 1)
        return self.base.evaluate(rows, cols, Nq, Nk) - shift

    def requires_grad(self) -> bool:
        return self.base.requires_grad()

    def check(self, B, H, Nq, Nk):
        self.base.check(B, H, Nq, Nk)

    def __repr__(self) -> str:
        return repr(self.base)


def _may_be_huge(bias: Bias) -> bool:
    """True when a dense part of the bias holds a finite entry beyond SHIFT_THRESHOLD in magnitude.

    Structured biases are not searched: ALiBi's largest entry in a row is 0, at the query's own
    position, which a query sees under every mask but the rarest; looking would cost Nq x Nk
    evaluations on exactly the long sequences structured biases exist for.
    """
    if isinstance(bias, DenseBias):
        t = bias.tensor.detach()
        return bool((torch.isfinite(t) & (t.abs() > SHIFT_THRESHOLD)).any())
    if isinstance(bias, SumBias):
        return any(_may_be_huge(part) for part in bias.parts)
    return False


def _visible_row_max(bias: Bias, mask, Nq: int, Nk: int, device) -> Tensor:
    """(Bx, Hx, Nq) the max of each row of the bias over the keys the mask lets it see (-inf: none),
    evaluated a chunk of rows at a time (never all Nq x Nk at once)."""
    cols = torch.arange(Nk, device=device)
    parts, r0, step = [], 0, 1
    while r0 < Nq:
        rows = torch.arange(r0, min(Nq, r0 + step), device=device)
        b = bias.evaluate(rows, cols, Nq, Nk).detach()  # (Bb, Hb, r, Nk)
        if mask is not None:
            b = b.masked_fill(~mask.evaluate(rows, cols, Nq, Nk), float("-inf"))  # (Bx, Hx, r, Nk)
        parts.append(b.amax(-1))  # (Bx, Hx, r)
        r0 += len(rows)
        step = max(1, ROW_CHUNK_ELEMENTS // max(1, b.shape[0] * b.shape[1] * Nk))
    return torch.cat(parts, -1)


def row_stabilized(bias: Bias | None, mask, Nq: int, Nk: int, device) -> tuple[Bias | None, Tensor | None]:
    """The bias with each row whose visible scores are all huge moved to max 0, and the shift
    (Bx, Hx, Nq) to add back to the lse (None when no row needs it: the bias is returned as is).

    softmax(s + b) does not change when a row of b moves by a constant, but every kernel that keeps
    only the log-sum-exp does (FlashAttention's merge of partials, the backward's recompute
    P = exp(s - lse)): where every key a query may see has a bias of finfo.min (transformers'
    padding of a sample without real tokens, or a padded window), lse = m + log(l) rounds back to
    m and the row sums to its number of keys instead of 1. Shifted, the row's largest visible bias
    is 0 and every kernel sees ordinary scores; q k^T keeps its precision, which the plain formula
    in float32 (and at finfo.min even in float64) rounds away: the result is the exact
    softmax(q k^T * scale + bias) of real arithmetic. Only rows whose visible max exceeds
    SHIFT_THRESHOLD in magnitude move; looking for them costs one pass over the bias's entries, and,
    when a dense bias holds such values and a mask or other parts come with it, one pass over the
    Nq x Nk (mask, bias) pairs in chunks of rows; nothing more otherwise. The shift is detached: the
    output does not depend on it, and the lse's gradient reaches the bias through the shifted bias.
    """
    if bias is None or not _may_be_huge(bias):
        return bias, None
    if mask is None and isinstance(bias, DenseBias):
        t = bias.tensor.detach()
        m = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)).amax(-1)  # (Bb, Hb, Nqb)
    else:
        m = _visible_row_max(bias, mask, Nq, Nk, device)
    huge = torch.isfinite(m) & (m.abs() > SHIFT_THRESHOLD)
    if not bool(huge.any()):
        return bias, None
    shift = torch.where(huge, m, torch.zeros_like(m))
    return RowShiftedBias(bias, shift.expand(*shift.shape[:2], Nq) if shift.shape[-1] == 1 else shift), shift


def alibi_slopes(num_heads: int) -> Tensor:
    """The ALiBi paper's head slopes: a geometric sequence starting at 2^(-8/n), n the closest
    power of two <= num_heads, with the interleaved extension for other head counts."""
    if num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be >= 1, got {num_heads}")

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    n = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(n)
    if n < num_heads:
        slopes += power_of_two(2 * n)[0::2][: num_heads - n]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi(slopes: Tensor | int) -> Alibi:
    """Structured ALiBi bias. ``slopes``: (H,) per-head slopes, or an int H for the paper's slopes."""
    if isinstance(slopes, int) and not isinstance(slopes, bool):
        slopes = alibi_slopes(slopes)
    t = torch.as_tensor(slopes)
    if not t.is_floating_point() or t.dim() != 1:
        raise ValueError(f"alibi: expected float slopes of shape (H,), got dtype={t.dtype} shape={tuple(t.shape)}")
    bias = Alibi(t)
    if not torch.compiler.is_compiling():  # while dynamo traces, check() in the compiled call's op does it
        bias.check_values()
    return bias
