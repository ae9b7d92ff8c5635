"""Which keys each rank sends to which, and what each pair of shards computes: read from the mask.

Every rank builds the same plan from the same inputs (mask, layout, world size, N), so no rank asks
another what it needs. For each receiving rank r and sending rank s the plan keeps the keys of s
that some query of r may see, classified by the mask's own tile kinds over a ``masks.Region``
(``Mask.block_kinds`` with one key per tile: O(n), never an N x N tensor). A sliding window of W
needs W keys from each neighbour and nothing from the others, whatever N is; a causal mask needs
nothing from later positions. ``schedule="ring"`` ignores the mask and sends every key to every
rank (Ring Attention's traffic), for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bias import Bias, RegionBias
from ..masks import EMPTY, FULL, And, Causal, Dense, Document, GlobalTokens, KeyPadding, Mask, Not, Or, Region, SlidingWindow
from .layout import Run, runs

SCHEDULES = ("mask", "ring")
KEY_BLOCK = 64  # needed keys closer than this are sent as one segment (one message part, one local call)


@dataclass(frozen=True)
class Segment:
    """Keys ``local_start .. local_start + count - 1`` of the sender's shard: global run ``run``."""

    local_start: int
    run: Run


@dataclass(frozen=True)
class Pair:
    """Local queries ``q_start .. q_start + run.count - 1`` (global run ``q_run``) against keys
    ``k_start ..`` of a key buffer (global run ``k_run``), under ``mask`` (None: all pairs)."""

    q_start: int
    q_run: Run
    k_start: int
    k_run: Run
    mask: Mask | None


@dataclass(frozen=True)
class Plan:
    """The whole schedule. ``sends[s][r]``: segments s sends r (``[]``: nothing, never sent);
    ``pairs[r][s]``: what r computes against the keys it holds from s (its own when s == r), with
    ``k_start`` indexing the buffer the segments of ``sends[s][r]`` fill, in order."""

    world: int
    N: int
    compute: Mask | None  # the mask the pairs run with (see build)
    sends: tuple[tuple[tuple[Segment, ...], ...], ...]
    pairs: tuple[tuple[tuple[Pair, ...], ...], ...]

    def keys_sent(self, src: int, dst: int) -> int:
        return sum(seg.run.count for seg in self.sends[src][dst])


def region(mask: Mask, q: Run, k: Run, N: int) -> Region:
    return Region(mask, q.start, q.step, k.start, k.step, N, N)


def region_bias(bias: Bias | None, q: Run, k: Run, N: int) -> Bias | None:
    return None if bias is None else RegionBias(bias, q.start, q.step, k.start, k.step, N, N)


def _needed_keys(mask: Mask | None, queries: tuple[Run, ...], keys: Run, N: int) -> torch.Tensor:
    """(keys.count,) bool: the keys some query of ``queries`` may see. Each key is a (queries x 1)
    tile of the region, classified from the mask's structure: O(keys.count), never queries x keys
    (except for a dense mask, which holds N x N already)."""
    need = torch.zeros(keys.count, dtype=torch.bool)
    if mask is None:
        return ~need
    for q in queries:
        if q.count and keys.count:
            kinds = region(mask, q, keys, N).block_kinds(q.count, keys.count, q.count, 1)  # (Bm, Hm, 1, n_k)
            need |= (kinds != EMPTY).flatten(0, 2).any(0)
    return need


def _segments(need: torch.Tensor, run: Run, local_start: int, gap: int) -> list[Segment]:
    """The needed keys of ``run`` as segments of consecutive keys; gaps shorter than ``gap`` keys are
    sent too, so a dilated window or nearby global keys make one segment, not one per key."""
    idx = need.nonzero().flatten()  # (m,) needed keys, ascending
    if idx.numel() == 0:
        return []
    cut = ((idx[1:] - idx[:-1]) > gap).nonzero().flatten()  # a segment ends at idx[cut]
    firsts = torch.cat([idx[:1], idx[cut + 1]]).tolist()
    lasts = torch.cat([idx[cut], idx[-1:]]).tolist()
    return [Segment(local_start + f, run.sub(f, l - f + 1)) for f, l in zip(firsts, lasts)]


def pair_mask(mask: Mask | None, q: Run, k: Run, N: int, compute: Mask | None = None) -> Mask | None | str:
    """The mask of one pair of runs: None when every pair is allowed, "empty" when none is, a plain
    mask on a diagonal square (``_on_diagonal``: sdpa's causal kernel or banded can run it), else a
    ``Region``. ``mask`` classifies; the pair runs with ``compute`` (default: ``mask``), which must
    agree with it on every row whose result is kept (``global_rows.py``: the original mask, whose
    global rows are recomputed apart)."""
    if mask is None:
        return None
    compute = mask if compute is None else compute
    kinds = region(mask, q, k, N).block_kinds(q.count, k.count, q.count, k.count)  # (Bm, Hm, 1, 1): one tile
    if bool((kinds == EMPTY).all()):
        return "empty"
    if bool((kinds == FULL).all()):
        return None
    if q.step == k.step == 1 and q.start == k.start and q.count == k.count:
        local = _on_diagonal(compute, q.start, q.count, N)
        if local is not None:
            return local
    return region(compute, q, k, N)


def _on_diagonal(m: Mask, start: int, n: int, N: int) -> Mask | None:
    """The mask on the diagonal square [start, start + n)^2 of its (N, N) problem as a plain (n, n)
    mask (windows and causal as they are, positions and ids sliced), or None if some part cannot."""
    if isinstance(m, (Causal, SlidingWindow)):
        return m
    if isinstance(m, (And, Or)):
        a, b = _on_diagonal(m.a, start, n, N), _on_diagonal(m.b, start, n, N)
        return None if a is None or b is None else type(m)(a, b)
    if isinstance(m, Not):
        a = _on_diagonal(m.a, start, n, N)
        return None if a is None else Not(a)
    if isinstance(m, GlobalTokens):
        if m.flags is not None:
            return GlobalTokens(None, m.flags[:, start:start + n])
        idx = m.indices
        return GlobalTokens(idx[(idx >= start) & (idx < start + n)] - start, None)
    if isinstance(m, KeyPadding):
        if m.valid is not None:
            return KeyPadding(None, m.valid[:, start:start + n])
        return KeyPadding((m.lengths - start).clamp(0, n), None)
    if isinstance(m, Document):
        return Document(m.values[:, start:start + n])
    if isinstance(m, Dense):
        return Dense(m._full(N, N)[:, :, start:start + n, start:start + n])
    return None


def _local_starts(rs: tuple[Run, ...]) -> list[int]:
    return [sum(r.count for r in rs[:i]) for i in range(len(rs))]


def build(mask: Mask | None, layout: str, world: int, N: int, schedule: str = "mask",
          key_block: int = KEY_BLOCK, compute: Mask | None = None) -> Plan:
    """The plan every rank computes (identically) for a call. ``schedule="ring"`` sends every key.
    ``mask`` decides what is sent and which pairs run; the pairs run with ``compute`` (``pair_mask``)."""
    held = [runs(layout, r, world, N) for r in range(world)]
    starts = [_local_starts(h) for h in held]
    sends = [[() for _ in range(world)] for _ in range(world)]
    pairs = [[() for _ in range(world)] for _ in range(world)]
    for dst in range(world):
        for src in range(world):
            segs: list[Segment] = []
            for run, start in zip(held[src], starts[src]):
                if src == dst or schedule == "ring":
                    segs += [Segment(start, run)] if run.count else []
                else:
                    segs += _segments(_needed_keys(mask, held[dst], run, N), run, start, key_block)
            if src != dst:
                sends[src][dst] = tuple(segs)
            pairs[dst][src] = tuple(_pairs(mask, held[dst], starts[dst], segs, N, compute))
    return Plan(world, N, mask if compute is None else compute, tuple(map(tuple, sends)), tuple(map(tuple, pairs)))


def _pairs(mask: Mask | None, queries: tuple[Run, ...], q_starts: list[int], segs: list[Segment],
           N: int, compute: Mask | None) -> list[Pair]:
    """The non-empty (query run, key segment) pairs, keys indexed in the order the segments arrive."""
    out, k_start = [], 0
    for seg in segs:
        for q, q_start in zip(queries, q_starts):
            if q.count:
                m = pair_mask(mask, q, seg.run, N, compute)
                if m != "empty":
                    out.append(Pair(q_start, q, k_start, seg.run, m))
        k_start += seg.run.count
    return out
