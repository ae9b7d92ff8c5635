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

from .masks import check_broadcastable, query_positions


SHIFT_THRESHOLD = 2.0 ** 15  # |row max| of a dense bias beyond which its row is shifted to max 0;
# below it every value fits float16 (max 65504) and the lse keeps at least 2^-9 absolute precision


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

    def stabilized(self) -> tuple[Bias, Tensor | None]:
        """This bias with huge rows shifted, and the shift (see ``DenseBias.stabilized``)."""
        return self, None


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

    def stabilized(self) -> tuple[Bias, Tensor | None]:
        """The bias minus its row max on rows whose max is huge, and that shift (Bb, Hb, Nqb) or None.

        softmax(s + b) does not change when a row of b moves by a constant, but every kernel that
        keeps only the log-sum-exp (FlashAttention's merge of partials and its backward's
        recompute P = exp(s - lse)) does: where every key of a row has a bias of finfo.min (how
        transformers pads a sample with no real token), lse = m + log(l) rounds back to m and
        the row sums to Nk instead of 1. Shifted, such a row holds 0 at its max and the kernels
        see ordinary scores; the caller adds the shift back to the returned lse. Rows whose max
        stays within +-SHIFT_THRESHOLD are left bit for bit as given (no copy at all when every
        row is). The shift is detached: the output does not depend on it, and the gradient of the
        lse reaches the bias through the shifted bias.
        """
        t = self.tensor.reshape((1,) * (4 - self.tensor.dim()) + tuple(self.tensor.shape))  # (Bb, Hb, Nqb, Nkb)
        row_max = t.detach().amax(-1, keepdim=True)  # (Bb, Hb, Nqb, 1)
        huge = torch.isfinite(row_max) & (row_max.abs() > SHIFT_THRESHOLD)
        if not bool(huge.any()):
            return self, None
        shift = torch.where(huge, row_max, torch.zeros_like(row_max))
        return DenseBias(t - shift), shift.squeeze(-1)

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

    def stabilized(self) -> tuple[Bias, Tensor | None]:
        """Each part stabilized (``DenseBias.stabilized``); the shifts add up."""
        pairs = [part.stabilized() for part in self.parts]
        shifts = [shift for _, shift in pairs if shift is not None]
        if not shifts:
            return self, None
        total = shifts[0]
        for shift in shifts[1:]:
            total = total + shift
        return SumBias(tuple(part for part, _ in pairs)), total

    def check(self, B, H, Nq, Nk):
        for part in self.parts:
            part.check(B, H, Nq, Nk)

    def __repr__(self) -> str:
        return " + ".join(repr(part) for part in self.parts)


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
    if not torch.isfinite(t).all():
        raise ValueError("alibi: slopes must be finite")
    return Alibi(t)
