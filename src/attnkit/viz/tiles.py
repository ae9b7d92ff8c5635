"""Which keys a mask allows for a block of query rows: what the on-demand maps score, and no more.

A map of a windowed model is mostly exact zeros: row i may only see the keys of its window. The
captured records (``capture.py``) therefore score a block of query rows only against the keys of
the tiles its mask leaves non-empty, and treat every other key as probability 0, which is what the
dense computation gives there (a masked score is -inf, its exp is 0, and the row's max and sum come
from the allowed keys alone). For ``sliding_window(w)`` a block of r rows scores about
r + 2w + 2 * TILE keys instead of all N, so a whole map costs O(N (r + w)), linear in N.

The grid comes from the mask's own structure (``Mask.block_kinds``, the classification the block
plan and the tiled kernels read: intervals for causal masks and windows, per-block counts for
global tokens and padding): no N x N tensor for structured masks. A tile is skipped only when the
mask rules it out for every selected sample and head.

Legend: B batch, H heads, Nq / Nk queries / keys, nQ / nK row / key tiles, r rows, c key columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..masks import EMPTY, Mask, dense_mask

TILE = 64  # query rows x keys per tile of the grid: the granularity at which keys are skipped


def tile_grid(mask: Mask | Tensor | None, Nq: int, Nk: int, device: torch.device | str) -> Tensor | None:
    """bool (Bm, Hm, ceil(Nq/TILE), ceil(Nk/TILE)): True where a TILE x TILE tile may hold an
    allowed (query, key) pair (Bm / Hm 1 where the mask does not depend on batch / head); None
    for no mask (every key counts). ``mask``: an attnkit mask or a bool tensor broadcastable to
    (B, H, Nq, Nk) (True = may attend)."""
    if mask is None:
        return None
    if isinstance(mask, Tensor):
        mask = dense_mask(mask)
    return mask.block_kinds(Nq, Nk, TILE, TILE, device) != EMPTY


def key_columns(grid: Tensor | None, rows: Tensor, heads: Tensor, batch: Tensor, Nk: int,
                min_cols: int = 0) -> Tensor | None:
    """The keys to score for query rows ``rows`` (r,) of samples ``batch`` and heads ``heads``:
    (c,) long ascending, every key the mask may allow any of them to see (whole tiles), plus the
    first masked keys when needed to make at least ``min_cols`` (e.g. a top-k that asks for more
    keys than a row may see: the extras are exact zeros, as in the dense map). None: all Nk keys
    (no mask, or nothing to skip)."""
    if grid is None:
        return None
    g = grid[batch.to(grid.device)] if grid.shape[0] > 1 else grid  # (B' or 1, Hm, nQ, nK)
    g = g[:, heads.to(grid.device)] if g.shape[1] > 1 else g  # (B' or 1, H' or 1, nQ, nK)
    blocks = torch.unique(rows.to(grid.device) // TILE)  # the row tiles these rows lie in
    seen = g[:, :, blocks].flatten(0, 2).any(0)  # (nK,) key tiles any of them may see
    if bool(seen.all()):
        return None
    cols = (seen.nonzero()[:, 0, None] * TILE + torch.arange(TILE, device=seen.device)).flatten()  # (c',)
    cols = cols[cols < Nk]
    if len(cols) < min(min_cols, Nk):
        rest = torch.ones(Nk, dtype=torch.bool, device=cols.device)
        rest[cols] = False
        extra = rest.nonzero()[:, 0][:min_cols - len(cols)]  # masked keys: exact zeros in the map
        cols = torch.cat([cols, extra]).sort().values
    return cols.cpu()


def scatter_columns(cols: Tensor | None, w: Tensor, Nk: int) -> Tensor:
    """(..., c) probabilities at keys ``cols`` -> the (..., Nk) rows, 0 elsewhere (``cols`` None:
    ``w`` already holds every key)."""
    if cols is None:
        return w
    full = w.new_zeros(*w.shape[:-1], Nk)
    full[..., cols.to(w.device)] = w
    return full
