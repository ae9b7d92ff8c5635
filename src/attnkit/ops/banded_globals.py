"""The global-token parts of the banded backend (Longformer, Beltagy et al. 2020, sec. 3.1).

``banded.py`` computes the band (each query against its window); this module adds what the
global tokens see:

- **global columns**: every query against the G global keys *outside* its window, merged into
  the band's partial (``merge``);
- **global rows**: the queries sitting at global positions against all Nk keys; their result
  replaces the band's.

With a softcap or dropout (``Extras``) both run on the math tile kernel; dropout's multiplier is
drawn for the parts' own (batch, query head, row, key) positions, the same bits the reference
draws (``ops/dropout.py``), in the forward and again in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .merge import attend_merged_into, merge
from .pattern import Pattern
from .tiles import dropout_tile, fused_tile, fused_tile_backward, math_tile, math_tile_backward


@dataclass(frozen=True)
class Extras:
    """A call's softcap and dropout (probability, seed); H its (expanded) query heads, for the
    Philox word b * H + h."""

    softcap: float | None = None
    dropout_p: float = 0.0
    seed: int = 0
    H: int = 1

    @property
    def math_only(self) -> bool:
        return self.softcap is not None or self.dropout_p > 0

    def multiplier(self, b: int, heads: Tensor, rows: Tensor, cols: Tensor, dtype) -> Tensor | None:
        """keep / (1 - p) (h, ...) of batch b, query heads ``heads`` (h,) and the call's query rows
        / key columns ``rows``, ``cols`` (broadcast together to the trailing dims ...); None
        without dropout."""
        if self.dropout_p == 0:
            return None
        bh = (b * self.H + heads).view(-1, *([1] * max(rows.dim(), cols.dim())))  # (h, 1, ...)
        return dropout_tile(self.seed, self.dropout_p, bh, rows, cols, dtype)


NO_EXTRAS = Extras()


@dataclass(frozen=True)
class GlobalPart:
    """Batch element b's global key columns and global query rows, with their additive tiles."""

    b: int
    cols: Tensor  # (G,) global key indices
    col_tile: Tensor | None  # (1 or H, Nq, G): -inf where the key is in the query's window or padding
    rows: Tensor  # (R,) query rows at global positions
    row_tile: Tensor | None  # (1, 1, 1, Nk): -inf at padding keys, or None


def global_parts(pattern: Pattern, valid: Tensor | None, B: int, Nq: int, Nk: int, dtype, device):
    """One GlobalPart per batch element (nothing without global tokens)."""
    flags = pattern.global_flags(Nk, device)  # (Bg, Nk)
    if flags is None:
        return []
    parts = []
    pos = torch.arange(Nq, device=device) + (Nk - Nq)  # query positions
    inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
    for b in range(B):
        g = flags[b if flags.shape[0] > 1 else 0]  # (Nk,)
        ok = None if valid is None else valid[b if valid.shape[0] > 1 else 0]  # (Nk,)
        cols = g.nonzero().squeeze(1)
        in_window = pattern.window.evaluate(torch.arange(Nq, device=device), cols, Nq, Nk)[0]  # (Hm, Nq, G)
        allowed = ~in_window if ok is None else ~in_window & ok[cols]
        rows = (g[pos.clamp(min=0)] & (pos >= 0)).nonzero().squeeze(1)
        row_tile = None if ok is None else torch.where(ok, 0.0, inf)[None, None, None]
        parts.append(GlobalPart(b, cols, torch.where(allowed, 0.0, inf), rows, row_tile))
    return parts


ROW_CHUNK_ELEMENTS = 1 << 20  # H x rows x Dv of one global-columns call (4 MB in fp32, near cache)


def _row_chunks(H: int, Nq: int, Dv: int):
    """Slices of query rows for the global-columns pass, so its partial stays small."""
    step = max(1, ROW_CHUNK_ELEMENTS // (H * Dv))
    return [slice(r0, min(r0 + step, Nq)) for r0 in range(0, Nq, step)]


def _col_multiplier(ex: Extras, p: GlobalPart, r: slice, dtype, device) -> Tensor | None:
    """(H, rows, G) dropout multiplier of query rows r against the global columns."""
    rows = torch.arange(r.start, r.stop, device=device)[:, None]
    return ex.multiplier(p.b, torch.arange(ex.H, device=device), rows, p.cols[None, :], dtype)


def _row_multiplier(ex: Extras, p: GlobalPart, Nk: int, dtype, device) -> Tensor | None:
    """(1, H, R, Nk) dropout multiplier of the global query rows against every key."""
    drop = ex.multiplier(p.b, torch.arange(ex.H, device=device), p.rows[:, None],
                         torch.arange(Nk, device=device)[None, :], dtype)
    return None if drop is None else drop[None]


def _attend_cols(out, lse, q, kc, vc, tile, scale: float, ex: Extras, drop: Tensor | None) -> None:
    """Merge the global columns into the partial (out (H, r, Dv), lse (H, r)), in place; with a cap
    or dropout through the math tile kernel and ``merge``."""
    if not ex.math_only:
        attend_merged_into(out, lse, q, kc, vc, tile, scale)
        return
    o, l = math_tile(q, kc, vc, tile.to(out.dtype), scale, ex.softcap, drop)  # (H, r, Dv), (H, r)
    o, l = merge(out, lse, o, l)
    out.copy_(o)
    lse.copy_(l)


def merge_globals(out, lse, q, k, v, parts: list[GlobalPart], scale: float, fused: bool,
                   ex: Extras = NO_EXTRAS) -> None:
    """In place: merge the global columns into the band result, then replace the global rows."""
    for p in parts:
        qb, kb, vb = q[p.b], k[p.b], v[p.b]  # (H, N, D)
        if p.cols.numel():
            kc, vc = kb[:, p.cols], vb[:, p.cols]  # (H, G, D)
            for r in _row_chunks(*out.shape[1:]):
                drop = _col_multiplier(ex, p, r, out.dtype, q.device)
                _attend_cols(out[p.b][:, r], lse[p.b][:, r], qb[:, r], kc, vc, p.col_tile[:, r], scale, ex, drop)
        if p.rows.numel():
            args = (qb[:, p.rows][None], kb[None], vb[None], p.row_tile, scale)
            if fused:
                o, l = fused_tile(*args)
            else:
                o, l = math_tile(*args, ex.softcap, _row_multiplier(ex, p, kb.shape[1], out.dtype, q.device))
            out[p.b][:, p.rows], lse[p.b][:, p.rows] = o[0], l[0]


def _tile_backward(fused: bool, ex: Extras, drop: Tensor | None, *args):
    """The fused or math tile backward of one global part (the math one with cap and dropout)."""
    return fused_tile_backward(*args) if fused else math_tile_backward(*args, ex.softcap, drop)


def globals_backward(dq, dk, dv, dout, dout_loc, q, k, v, out, lse_bwd, delta, delta_loc,
                      parts: list[GlobalPart], scale: float, fused: bool, ex: Extras = NO_EXTRAS) -> None:
    """In place: add the global columns' and rows' shares to dq, dk, dv."""
    ct = dq.dtype
    for p in parts:
        kb, vb = k[p.b], v[p.b]  # (H, Nk, D)
        if p.cols.numel():
            kc, vc = kb[:, p.cols][None], vb[:, p.cols][None]  # (1, H, G, D)
            for r in _row_chunks(*out.shape[1:]):
                at = lambda x: x[p.b][:, r][None]  # noqa: E731  (1, H, rows, ...)
                drop = _col_multiplier(ex, p, r, ct, q.device)
                g_q, g_k, g_v = _tile_backward(fused, ex, None if drop is None else drop[None], at(dout_loc), at(q),
                                               kc, vc, at(out), at(lse_bwd), at(delta_loc), p.col_tile[:, r][None],
                                               scale)
                dq[p.b][:, r] += g_q[0]
                dk[p.b][:, p.cols] += g_k[0]
                dv[p.b][:, p.cols] += g_v[0]
        if p.rows.numel():
            r = p.rows
            sel = lambda x: x[p.b][:, r][None]  # noqa: E731  (1, H, R, ...)
            g_q, g_k, g_v = _tile_backward(fused, ex, _row_multiplier(ex, p, kb.shape[1], ct, q.device), sel(dout),
                                           sel(q), kb[None], vb[None], sel(out), sel(lse_bwd), sel(delta),
                                           p.row_tile, scale)
            dq[p.b][:, r] += g_q[0]
            dk[p.b] += g_k[0]
            dv[p.b] += g_v[0]


def global_row_flags(parts: list[GlobalPart], B: int, Nq: int, device) -> Tensor:
    """(B, 1, Nq) bool: query rows at global positions."""
    flags = torch.zeros(B, 1, Nq, dtype=torch.bool, device=device)
    for p in parts:
        flags[p.b, 0, p.rows] = True
    return flags
