"""How a sequence of N positions is sharded over P ranks (context parallelism).

A rank holds one or more *runs* of positions, in this order along its local sequence dim:

- ``contiguous``: rank r holds one block, ``[start_r, start_r + n_r)`` (torch.tensor_split sizes:
  the first ``N % P`` ranks hold one more). Causal attention is unbalanced: the last rank's
  queries see N keys, the first rank's N / P.
- ``zigzag``: the sequence is cut into 2P chunks and rank r holds chunks r and 2P - 1 - r (an
  early and a late one), so under a causal mask every rank computes about the same number of pairs
  (Llama 3's context parallelism, Dubey et al. 2024 section 3.3.2; ring-flash-attn's zigzag).
- ``striped``: rank r holds positions r, r + P, r + 2P, ... (Striped Attention, Brandon et al.
  2023): balanced for causal masks, and each key shard is a strided view of the sequence.

Sizes need not divide: N not divisible by P (or 2P) gives some ranks one more position per run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LAYOUTS = ("contiguous", "zigzag", "striped")


@dataclass(frozen=True)
class Run:
    """Positions ``start, start + step, ..., start + (count - 1) * step`` of the whole sequence."""

    start: int
    count: int
    step: int = 1

    def positions(self, device=None) -> Tensor:
        return self.start + self.step * torch.arange(self.count, device=device)

    def sub(self, first: int, count: int) -> Run:
        """The run's local items ``first .. first + count - 1`` as a run of its own."""
        return Run(self.start + self.step * first, count, self.step)


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a context-parallel layout; choose one of "
                         + ", ".join(repr(n) for n in LAYOUTS))
    return layout


def _split(total: int, parts: int) -> list[int]:
    """torch.tensor_split's sizes: the first ``total % parts`` parts hold one more."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def runs(layout: str, rank: int, world: int, N: int) -> tuple[Run, ...]:
    """The runs of positions rank ``rank`` of ``world`` holds of a sequence of N, in local order."""
    check_layout(layout)
    for name, x, lo in (("world", world, 1), ("N", N, 0)):
        if isinstance(x, bool) or not isinstance(x, int) or x < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {x!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, world={world}), got {rank!r}")
    if layout == "striped":
        return (Run(rank, len(range(rank, N, world)), world),)
    parts = world if layout == "contiguous" else 2 * world
    sizes = _split(N, parts)
    starts = [sum(sizes[:i]) for i in range(parts)]
    chunks = (rank,) if layout == "contiguous" else (rank, 2 * world - 1 - rank)
    return tuple(Run(starts[c], sizes[c]) for c in chunks)


def local_size(layout: str, rank: int, world: int, N: int) -> int:
    """How many positions rank ``rank`` holds."""
    return sum(r.count for r in runs(layout, rank, world, N))


def positions(layout: str, rank: int, world: int, N: int, device=None) -> Tensor:
    """(n_rank,) int64: the global position of each of the rank's local tokens, in local order
    (what RoPE and learned position tables need on a sharded sequence)."""
    return torch.cat([r.positions(device) for r in runs(layout, rank, world, N)])


def shard(x: Tensor, rank: int, world: int, *, dim: int = -2, layout: str = "zigzag") -> Tensor:
    """Rank ``rank``'s shard of a whole-sequence tensor, the sequence along ``dim`` (default -2:
    (B, H, N, D) attention inputs; use dim=1 for (B, N, E) activations or (B, N) token ids)."""
    idx = positions(layout, rank, world, x.shape[dim], device=x.device)
    return x.index_select(dim, idx)


def unshard(shards: list[Tensor], *, dim: int = -2, layout: str = "zigzag") -> Tensor:
    """The whole-sequence tensor from every rank's shard (``shards[r]`` from rank r), undoing ``shard``."""
    world = len(shards)
    if not world:
        raise ValueError("unshard: no shards given; pass one tensor per rank, rank 0 first")
    N = sum(s.shape[dim] for s in shards)
    for r, s in enumerate(shards):
        want = local_size(layout, r, world, N)
        if s.shape[dim] != want:
            raise ValueError(f"unshard: rank {r}'s shard has {s.shape[dim]} positions along dim {dim}; layout "
                             f"{layout!r} gives it {want} of N={N} over {world} ranks")
    idx = torch.cat([positions(layout, r, world, N, device=shards[0].device) for r in range(world)])
    joined = torch.cat(shards, dim)
    return joined.index_select(dim, torch.argsort(idx))
