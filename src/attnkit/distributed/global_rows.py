"""Longformer's global query rows, reduced instead of fed every key (issue 18, mask-aware traffic).

A global token's query row sees every key of the sequence. Fed like the other rows, its rank would
receive every key shard: O(N) traffic for a handful of rows. Instead (Beltagy et al. 2020's global
attention, computed where the keys live):

- the main schedule runs with each ``global_tokens(g)`` replaced by "every query sees the global
  keys" (``key_padding`` of the global keys; global queries see only what their other terms give
  them), which equals the mask on every row that is not global, so only window edges and global
  keys travel;
- the global rows' queries (B, Hq, G, D) are sent once to every rank; each rank attends them to its
  own keys under the full mask and returns the partial (out, lse) to the row's owner, which merges
  the P partials (``ops/merge.py``) and overwrites its rows: O(G·D) per rank each way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ..masks import And, GlobalTokens, KeyPadding, Mask, Not, Or, tensor_key


def frozen(mask: Mask | None) -> Mask | None:
    """The mask with each tensor a cache key names by content (``masks.tensor_key``: small CPU
    integer or bool tensors) copied, so what was built from it cannot change if the caller refills
    the original in place; other tensors are keyed by identity and version, and kept."""
    if mask is None:
        return None
    changes = {}
    for f in dataclasses.fields(mask):
        x = getattr(mask, f.name)
        if isinstance(x, Mask):
            changes[f.name] = frozen(x)
        elif isinstance(x, Tensor) and tensor_key(x)[0] == "values":
            changes[f.name] = x.clone()
    return dataclasses.replace(mask, **changes) if changes else mask


def without_global_rows(mask: Mask | None, N: int) -> tuple[Mask | None, list[GlobalTokens]]:
    """The mask of an (N, N) problem with every ``global_tokens`` replaced by "every query sees the
    global keys" (a ``KeyPadding`` whose valid keys are the global ones), and the ones replaced."""
    found: list[GlobalTokens] = []

    def walk(m: Mask) -> Mask:
        if isinstance(m, GlobalTokens):
            found.append(m)
            return KeyPadding(lengths=None, valid=m._flags(N, torch.device("cpu")))  # (Bm, N) bool
        if isinstance(m, (And, Or)):
            return type(m)(walk(m.a), walk(m.b))
        if isinstance(m, Not):
            return Not(walk(m.a))
        return m

    return (None, found) if mask is None else (walk(mask), found)


@dataclass(frozen=True)
class GlobalRows:
    """The global query positions (G,) sorted, and for each rank the ones it holds: ``local[r]``
    their indices in r's shard, ``index[r]`` their places among the G."""

    positions: Tensor
    local: tuple[Tensor, ...]
    index: tuple[Tensor, ...]

    @property
    def count(self) -> int:
        return int(self.positions.numel())


def global_rows(tokens: list[GlobalTokens], shard_positions: list[Tensor], N: int) -> GlobalRows | None:
    """Where the global query rows are (a union over the batch and over every ``global_tokens``)."""
    if not tokens:
        return None
    flags = torch.zeros(N, dtype=torch.bool)
    for t in tokens:
        flags |= t._flags(N, torch.device("cpu")).any(0)
    pos = flags.nonzero().flatten()
    if pos.numel() == 0:
        return None
    local, index = [], []
    for held in shard_positions:
        is_global = flags[held]  # (n_r,)
        local.append(is_global.nonzero().flatten())
        index.append(torch.searchsorted(pos, held[is_global]))
    return GlobalRows(pos, tuple(local), tuple(index))


def replace_rows(t: Tensor, local: Tensor, values: Tensor) -> Tensor:
    """t with rows ``local`` (along dim 2) replaced by ``values``."""
    return t.index_copy(2, local.to(t.device), values.to(t.dtype))
