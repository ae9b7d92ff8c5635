"""The block plan: a mask compiled into the tiles each program of a tiled kernel visits.

For an (Nq, Nk) problem cut into BLOCK_M x BLOCK_N tiles:

- the mask's tile kinds (``Mask.block_kinds``, from its structure: intervals for causal masks and
  windows, per-block counts for global tokens and padding, per-block min/max for document ids)
  merged over batch and heads (``merged_kinds``: a tile is skipped only if it is empty for every
  sample and head, and runs unmasked only if it is full for all of them); the tiled backend
  reads the same classification;
- for each query block, the list of key blocks to visit, in CSR form (``kv_ptr``, ``kv_idx``),
  and the transposed lists for the key-block-major backward (``q_ptr``, ``q_idx``);
- for each PARTIAL tile, its BLOCK_M x BLOCK_N truth, one bit per pair (``pack_bits``), per
  sample and head where the mask differs by them, evaluated by the mask on index grids for many
  tiles at once (``Mask.evaluate_grid``); tiles whose ``Mask.tile_signature`` agree share one
  stored truth (a window's edge tiles, a global row's tiles), so a Longformer mask stores tens
  of tiles, not thousands; a ragged last key block is partial;
- split work items (``split_work``): long lists cut into runs that are combined afterwards.

Everything is built with tensor ops on the device the plan is for: no Python loop over blocks and
nothing Nq x Nk (memory is nQ x nK bytes for the kinds plus the partial tiles' bits).

A ``key_padding(lengths)`` factor is *not* part of a plan (``split_key_lengths``): the kernels
read the lengths per call, so padding that changes every batch costs no new plan.

Plans are cached by the mask's *structure* (``structure_key``): two masks built alike (same
windows, same global indices, same tensors) share one plan, whether or not they are the same
object, and looking one up reads no tensor data from a device.

Legend: nQ / nK query / key blocks, T visited tiles, P partial tiles, U distinct ones, BM / BN block sizes, Bm / Hm
the mask's batch and head extents (1 where it broadcasts), W work items, S partial slots.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..masks import EMPTY, FULL, PARTIAL, UNCACHEABLE, And, KeyPadding, Mask


class Splits(NamedTuple):
    """Where the partials of split blocks go (``split_work``), worked out when the plan is built so
    that merging them reads nothing back from the device. G split blocks, S partial slots."""

    slots: Tensor  # (S,) int32: the block of each partial slot (its length sizes the buffers)
    gather: Tensor  # (G, K) int64: each split block's slots in order, -1 past its count
    keep: Tensor  # (R,) int64: the positions, among the G x block rows of the split blocks, inside N
    rows: Tensor  # (R,) int64: their row numbers


@dataclass(frozen=True)
class BlockPlan:
    """Which tiles each program visits, and the truth of the partial ones (module docstring)."""

    block_m: int
    block_n: int
    Nq: int
    Nk: int
    mask: Mask | None  # the mask it was built from, without its key_padding(lengths) factor
    key: tuple  # ``structure_key`` of that mask: a plan serves every mask with the same key
    kv_ptr: Tensor  # (nQ + 1,) int32: query block i visits kv_idx[kv_ptr[i]:kv_ptr[i + 1]]
    kv_idx: Tensor  # (T,) int32 key block indices, ascending within a block's list
    kv_tile: Tensor  # (T,) int32 partial tile id, -1 for a full tile
    q_ptr: Tensor  # (nK + 1,) int32: key block j is visited by q_idx[q_ptr[j]:q_ptr[j + 1]]
    q_idx: Tensor  # (T,) int32 query block indices
    q_tile: Tensor  # (T,) int32 partial tile id, -1 for a full tile
    tiles: Tensor  # (Bm, Hm, max(U, 1), BM, ceil(BN / 32)) int32 words: bit c % 32 of word c // 32 = may attend
    tiles_t: Tensor  # (Bm, Hm, max(U, 1), BN, ceil(BM / 32)): the same tiles transposed (keys x queries), for dk/dv
    # work items (split-KV, ``split_work``): row w = (block, start, end, slot) runs one block over
    # entries start..end of its list; slot -1 writes the block's result, slot s >= 0 a partial that
    # is combined afterwards with the other partials of its block (``Splits``)
    q_work: Tensor  # (W, 4) int32 over the query blocks' key lists: the forward and dq
    q_split: Splits  # where the query blocks' partials go
    k_work: Tensor  # (W', 4) int32 over the key blocks' query lists: dk, dv
    k_split: Splits

    def forward_tensors(self) -> list[Tensor]:
        """What the forward kernel and its merge read."""
        return [self.kv_idx, self.kv_tile, self.tiles, self.q_work, *self.q_split]

    def backward_tensors(self) -> list[Tensor]:
        """What the backward kernels and their sums read."""
        return [self.kv_idx, self.kv_tile, self.q_idx, self.q_tile, self.tiles, self.tiles_t,
                self.q_work, *self.q_split, self.k_work, *self.k_split]


# -- tile kinds ---------------------------------------------------------------------------------------

def merged_kinds(mask: Mask | None, Nq: int, Nk: int, bm: int, bn: int, device) -> Tensor:
    """(nQ, nK) int8 tile kinds merged over the mask's batch and heads: FULL only where full for
    every sample and head, EMPTY only where empty for all of them."""
    nQ, nK = -(-Nq // bm), -(-Nk // bn)
    if mask is None:
        return torch.full((nQ, nK), FULL, dtype=torch.int8, device=device)
    k4 = mask.block_kinds(Nq, Nk, bm, bn, device).to(device)  # (Bm, Hm, nQ, nK)
    if k4.shape[0] * k4.shape[1] == 1:
        return k4[0, 0].expand(nQ, nK).contiguous()
    lo, hi = k4.flatten(0, 1).amin(0), k4.flatten(0, 1).amax(0)  # EMPTY < PARTIAL < FULL
    kinds = torch.full((nQ, nK), PARTIAL, dtype=torch.int8, device=device)
    return kinds.masked_fill(lo == FULL, FULL).masked_fill(hi == EMPTY, EMPTY)


def kernel_kinds(mask: Mask | None, Nq: int, Nk: int, bm: int, bn: int, device) -> Tensor:
    """``merged_kinds`` with the ragged last key block PARTIAL: the kernels mask its keys past Nk
    through its tile bits."""
    kinds = merged_kinds(mask, Nq, Nk, bm, bn, device)
    if Nk % bn:
        last = kinds[:, -1]
        kinds[:, -1] = torch.where(last == FULL, torch.full_like(last, PARTIAL), last)
    return kinds


def _lists(kinds: Tensor, group: Tensor) -> tuple[Tensor, ...]:
    """The non-empty tiles as row-major lists (query block -> key blocks) and column-major lists
    (key block -> query blocks), CSR: (kv_ptr (nQ + 1,), kv_idx (T,), kv_tile (T,), q_ptr
    (nK + 1,), q_idx (T,), q_tile (T,)) int32. ``group`` (P,): the stored tile of each PARTIAL
    tile in row-major order (``partial_tiles``); a FULL tile's id is -1. One pass over the nQ x nK
    kinds; the column-major lists come from sorting the T visited tiles, not from the grid."""
    nQ, nK = kinds.shape
    rows, cols = (kinds != EMPTY).nonzero(as_tuple=True)  # (T,) row-major: ascending keys within a row
    partial = kinds[rows, cols] == PARTIAL  # (T,); the partial tiles in the same row-major order as group
    tile = torch.full(rows.shape, -1, dtype=torch.int32, device=kinds.device)
    tile[partial] = group.to(torch.int32)
    order = torch.argsort(cols * nQ + rows)  # column-major: ascending query blocks within a key block
    kv_ptr = torch.zeros(nQ + 1, dtype=torch.int32, device=kinds.device)
    kv_ptr[1:] = torch.bincount(rows, minlength=nQ).cumsum(0)
    q_ptr = torch.zeros(nK + 1, dtype=torch.int32, device=kinds.device)
    q_ptr[1:] = torch.bincount(cols, minlength=nK).cumsum(0)
    return (kv_ptr, cols.to(torch.int32), tile, q_ptr, rows[order].to(torch.int32), tile[order])


# -- partial tiles ------------------------------------------------------------------------------------

_GATHER_BITS = 0x0102040810204080  # times 8 bytes of 0/1 (one int64): byte i's bit lands at bit 56 + i


def pack_bits(truth: Tensor) -> Tensor:
    """(..., BN) bool -> (..., ceil(BN / 32)) int32 words, bit c % 32 of word c // 32 = truth[c].
    Bits rather than bytes: a tile of bytes costs the kernel a (BM, BN) gather of pointers, which
    spills registers; a bit tile is BM x ceil(BN / 32) word loads and register shifts. Packed 8
    at a time: 8 bools read as one little-endian int64, times ``_GATHER_BITS``, top byte = the 8
    bits in order; 4 such bytes are one int32 word."""
    bn = truth.shape[-1]
    nw = -(-bn // 32)
    padded = torch.nn.functional.pad(truth, (0, nw * 32 - bn)).contiguous()  # (..., nw * 32) bool
    if sys.byteorder != "little":  # the byte tricks below read memory little-endian
        bits = padded.to(torch.int64).unflatten(-1, (nw, 32)) << torch.arange(32, device=truth.device)
        words = bits.sum(-1)
        return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    eights = padded.view(torch.uint8).view(torch.int64)  # (..., nw * 4): 8 bools each
    octets = ((eights * _GATHER_BITS) >> 56) & 0xFF  # (..., nw * 4) the packed bytes
    return octets.to(torch.uint8).view(torch.int32)  # (..., nw)


def unpack_bits(words: Tensor, bn: int) -> Tensor:
    """The inverse of ``pack_bits``: (..., ceil(BN / 32)) int32 -> (..., BN) bool."""
    bits = (words.long()[..., None] >> torch.arange(32, device=words.device)) & 1  # (..., nw, 32)
    return bits.flatten(-2)[..., :bn].bool()


TILE_CHUNK_PAIRS = 1 << 22  # (query, key) pairs of partial tiles evaluated per mask call


def _tile_truth(mask: Mask | None, pq: Tensor, pk: Tensor, Nq: int, Nk: int, bm: int, bn: int) -> Tensor:
    """(Bm, Hm, p, BM, BN) bool truth of tiles (pq[i], pk[i]); False past Nq / Nk."""
    rows = (pq[:, None] * bm + torch.arange(bm, device=pq.device))[:, :, None]  # (p, BM, 1)
    cols = (pk[:, None] * bn + torch.arange(bn, device=pk.device))[:, None, :]  # (p, 1, BN)
    inside = (rows < Nq) & (cols < Nk)  # (p, BM, BN)
    if mask is None:
        return inside[None, None]
    return mask.evaluate_grid(rows.clamp(max=Nq - 1), cols.clamp(max=Nk - 1), Nq, Nk) & inside


def distinct_tiles(mask: Mask | None, pq: Tensor, pk: Tensor, Nq: int, Nk: int, bm: int,
                   bn: int) -> tuple[Tensor, Tensor]:
    """The partial tiles (query block pq (P,), key block pk (P,)) grouped by ``Mask.tile_signature``
    and their in-bounds extent: (first (U,), the index of one tile of each group; group (P,), each
    tile's group). Tiles of one group have equal truth, so only U are evaluated and stored."""
    q0, k0 = pq.long() * bm, pk.long() * bn
    extent = torch.stack([(Nq - q0).clamp(max=bm), (Nk - k0).clamp(max=bn)], 1)  # (P, 2) rows, keys inside
    sig = extent if mask is None else torch.cat([extent, mask.tile_signature(q0, k0, bm, bn, Nq, Nk)], 1)
    _, group = torch.unique(sig, dim=0, return_inverse=True)  # (P,) in [0, U)
    U = int(group.max()) + 1
    order = torch.arange(len(group), device=group.device)
    first = torch.full((U,), len(group), dtype=torch.long, device=group.device).scatter_reduce(
        0, group, order, "amin")
    return first, group


def partial_tiles(mask: Mask | None, pq: Tensor, pk: Tensor, Nq: int, Nk: int, bm: int,
                  bn: int) -> tuple[Tensor, Tensor, Tensor]:
    """The packed truth (``pack_bits``) of the distinct PARTIAL tiles among (pq, pk) (P,) each
    (``distinct_tiles``): (Bm, Hm, max(U, 1), BM, ceil(BN / 32)) and transposed (Bm, Hm, max(U, 1),
    BN, ceil(BM / 32)) int32, and each tile's id (P,) into them. Evaluated TILE_CHUNK_PAIRS pairs
    at a time, so memory stays bounded."""
    dev = pq.device
    if len(pq) == 0:
        truth = torch.zeros(1, 1, 1, bm, bn, dtype=torch.bool, device=dev)
        return pack_bits(truth), pack_bits(truth.transpose(-1, -2)), torch.zeros(0, dtype=torch.long, device=dev)
    first, group = distinct_tiles(mask, pq, pk, Nq, Nk, bm, bn)
    head = _tile_truth(mask, pq[first[:1]], pk[first[:1]], Nq, Nk, bm, bn)  # one tile: the (Bm, Hm) extents
    chunk = max(1, TILE_CHUNK_PAIRS // (bm * bn * head.shape[0] * head.shape[1]))
    parts, parts_t = [], []
    for a in range(0, len(first), chunk):  # one pass per chunk of tiles, not per block
        pick = first[a:a + chunk]
        truth = _tile_truth(mask, pq[pick], pk[pick], Nq, Nk, bm, bn)  # (Bm, Hm, u, BM, BN)
        parts.append(pack_bits(truth))
        parts_t.append(pack_bits(truth.transpose(-1, -2)))
    if len(parts) == 1:
        return parts[0].contiguous(), parts_t[0].contiguous(), group
    return torch.cat(parts, 2), torch.cat(parts_t, 2), group


# -- work items ---------------------------------------------------------------------------------------

SPLIT_MIN = 8  # a query block's key list is split only past max(SPLIT_MIN, 2 x the median list length)


def split_work(ptr: Tensor, split_tiles: int | None) -> tuple[Tensor, Tensor]:
    """Work items over CSR lists (split-KV, as flash-decoding): a block whose list is longer than
    ``split_tiles`` (default: max(SPLIT_MIN, 2 x the median length)) is cut into runs of that many
    tiles, each its own program, combined afterwards; so the few global query rows (forward, dq)
    and global key columns (dk, dv) that meet all N tokens do not leave one program running alone.
    Returns items (W, 4) int32 (block, start, end, slot; slot -1 = the whole list) in block order,
    and slots (S,) int32, the block of each partial slot, on ptr's device."""
    dev = ptr.device
    ptr = ptr.long()
    lengths = ptr[1:] - ptr[:-1]  # (nBlocks,)
    if split_tiles is None:
        median = int(lengths.float().median().ceil()) if len(lengths) else 0
        split_tiles = max(SPLIT_MIN, 2 * median)
    if split_tiles < 1:
        raise ValueError(f"split_tiles must be >= 1 tiles per program, got {split_tiles}")
    pieces = torch.where(lengths > split_tiles, -(-lengths // split_tiles), 1)  # (nBlocks,) items per block
    block = torch.repeat_interleave(torch.arange(len(lengths), device=dev), pieces)  # (W,)
    first = (pieces.cumsum(0) - pieces)[block]  # (W,) the block's first item
    start = ptr[block] + (torch.arange(len(block), device=dev) - first) * split_tiles
    end = torch.minimum(start + split_tiles, ptr[block + 1])
    end = torch.where(pieces[block] == 1, ptr[block + 1], end)  # a whole list, however short
    split = pieces[block] > 1  # (W,)
    slot = torch.where(split, split.long().cumsum(0) - 1, -1)
    items = torch.stack([block, start, end, slot], 1).to(torch.int32)  # (W, 4)
    return items, block[split].to(torch.int32)


def _splits(slots: Tensor, block: int, N: int) -> Splits:
    """``Splits`` of the partial slots ``slots`` (``split_work``) of blocks of ``block`` rows."""
    dev = slots.device
    blocks, group = torch.unique(slots.long(), return_inverse=True)  # (G,), (S,)
    counts = torch.bincount(group, minlength=len(blocks))  # (G,)
    width = int(counts.max()) if len(blocks) else 0
    gather = torch.full((len(blocks), width), -1, dtype=torch.long, device=dev)
    order = torch.argsort(group, stable=True)  # slots block by block, in their order
    first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # (S,) each sorted slot's block start
    gather[group[order], torch.arange(len(order), device=dev) - first] = order
    rows = (blocks[:, None] * block + torch.arange(block, device=dev)).flatten()  # (G * block,)
    keep = (rows < N).nonzero().squeeze(1)
    return Splits(slots, gather, keep, rows[keep])


# -- building and caching -----------------------------------------------------------------------------

def _and_factors(mask: Mask) -> list[Mask]:
    """The operands of a tree of ``&``, left to right."""
    return _and_factors(mask.a) + _and_factors(mask.b) if isinstance(mask, And) else [mask]


def split_key_lengths(mask: Mask | None) -> tuple[Mask | None, Tensor | None]:
    """mask = rest & key_padding(lengths) [& key_padding(lengths2) ...] -> (rest, lengths (B,)),
    the lengths of several such factors combined by their minimum (keys j < every length are
    visible); (mask, None) where the mask has no such factor (padding given as a bool mask, or
    under | or ~, stays in the tiles). The kernels apply the lengths themselves, per sample (keys
    j >= lengths[b] masked, key blocks past them skipped), so per-sample padding costs the plan no
    per-sample tiles and no rebuild. ``rest`` has no such factor left, so splitting it again
    changes nothing."""
    if mask is None:
        return None, None
    factors = _and_factors(mask)
    is_length = [isinstance(f, KeyPadding) and f.lengths is not None for f in factors]
    if not any(is_length):
        return mask, None
    lengths = [f.lengths for f, cut in zip(factors, is_length) if cut]
    combined = functools.reduce(torch.minimum, lengths)  # (B,) or (1,); the tensor itself when one
    kept = [f for f, cut in zip(factors, is_length) if not cut]
    return (functools.reduce(And, kept) if kept else None), combined


_builds = 0  # plans built since import (``plan_builds``)


def plan_builds() -> int:
    """How many plans ``make_plan`` has built in this process (tests count cache misses with it)."""
    return _builds


def make_plan(mask: Mask | None, Nq: int, Nk: int, block_m: int, block_n: int, device,
              split_tiles: int | None = None) -> BlockPlan:
    """The block plan of ``mask`` for an (Nq, Nk) problem (module docstring) on ``device``.

    A ``key_padding(lengths)`` factor is left out (``split_key_lengths``): pass the lengths to the
    kernels with each call. ``split_tiles``: see ``split_work``.
    """
    global _builds
    _builds += 1
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"make_plan: {name} must be an int >= 1 (rows / keys per tile), got {size!r}")
    device = torch.device(device)
    mask, _ = split_key_lengths(mask)
    kinds = kernel_kinds(mask, Nq, Nk, block_m, block_n, device)  # (nQ, nK)
    pq, pk = (kinds == PARTIAL).nonzero(as_tuple=True)  # (P,) each
    tiles, tiles_t, group = partial_tiles(mask, pq, pk, Nq, Nk, block_m, block_n)
    kv_ptr, kv_idx, kv_tile, q_ptr, q_idx, q_tile = _lists(kinds, group)
    q_work, q_slots = split_work(kv_ptr, split_tiles)
    k_work, k_slots = split_work(q_ptr, split_tiles)
    return BlockPlan(block_m, block_n, Nq, Nk, mask, structure_key(mask), kv_ptr, kv_idx, kv_tile, q_ptr, q_idx,
                     q_tile, tiles, tiles_t, q_work, _splits(q_slots, block_m, Nq), k_work,
                     _splits(k_slots, block_n, Nk))


def structure_key(mask: Mask | None) -> tuple:
    """``Mask.structure_key`` (None for no mask): equal for masks built alike, from the masks'
    structure and their tensors' ``masks.tensor_key`` (small CPU tensors by content, others by
    identity and version); costs a walk of the expression and no device read."""
    return (None,) if mask is None else mask.structure_key()


def _holds(key: tuple, marker: str) -> bool:
    """Whether ``marker`` is anywhere in a nested key tuple."""
    return any(x == marker if not isinstance(x, tuple) else _holds(x, marker) for x in key)


PLAN_CACHE_SIZE = 64  # plans, up to two per mask structure and sizes (forward and backward blocks)
PLAN_CACHE_BYTES = 1 << 30  # and at most this much held: the plans' tensors and their masks'
_plans: OrderedDict = OrderedDict()  # key -> plan
_plan_bytes: dict = {}  # key -> bytes the entry holds


def held_bytes(plan: BlockPlan) -> int:
    """Bytes a cached plan keeps alive: its own tensors and the tensors of the mask it holds (a
    dense mask rebuilt every call would otherwise pin PLAN_CACHE_SIZE of them)."""
    tensors = [t for t in (plan.kv_ptr, plan.kv_idx, plan.kv_tile, plan.q_ptr, plan.q_idx, plan.q_tile, plan.tiles,
                           plan.tiles_t, plan.q_work, *plan.q_split, plan.k_work, *plan.k_split)]
    tensors += _mask_tensors(plan.mask)
    return sum(t.numel() * t.element_size() for t in tensors)


def _mask_tensors(obj) -> list[Tensor]:
    """The tensors inside a mask expression."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mask) and dataclasses.is_dataclass(obj):
        return [t for f in dataclasses.fields(obj) for t in _mask_tensors(getattr(obj, f.name))]
    return []


def _cache_key(rest: Mask | None, Nq: int, Nk: int, block_m: int, block_n: int, device,
               split_tiles: int | None) -> tuple | None:
    """The cache's key for a mask without key-length factors; None when it may not be cached."""
    structure = structure_key(rest)
    if _holds(structure, UNCACHEABLE):  # an inference tensor: its values may change unseen
        return None
    return (structure, Nq, Nk, block_m, block_n, str(torch.device(device)), split_tiles)


def visited_tiles(mask: Mask | None, Nq: int, Nk: int, block_m: int, block_n: int, device) -> int:
    """How many tiles the kernels would visit for this mask: from the cached plan when there is
    one, else counted from the tile kinds alone (no partial tile evaluated, nothing cached), so a
    cost estimate (``_dispatch``) does not build a plan for a call that may not run on it."""
    rest, _ = split_key_lengths(mask)
    key = _cache_key(rest, Nq, Nk, block_m, block_n, device, None)
    plan = None if key is None else _plans.get(key)
    if plan is not None:
        return plan.kv_idx.numel()
    return int((kernel_kinds(rest, Nq, Nk, block_m, block_n, device) != EMPTY).sum())


def cached_plan(mask: Mask | None, Nq: int, Nk: int, block_m: int, block_n: int, device,
                split_tiles: int | None = None) -> BlockPlan:
    """``make_plan``, remembered for the last PLAN_CACHE_SIZE (mask structure, sizes) pairs holding
    at most PLAN_CACHE_BYTES together (``held_bytes``): a model that builds its mask anew in every
    forward, or calls attention with it in every layer, builds its plan once. The key leaves out a
    ``key_padding(lengths)`` factor (the kernels read it)."""
    rest, _ = split_key_lengths(mask)
    key = _cache_key(rest, Nq, Nk, block_m, block_n, device, split_tiles)
    if key is None:
        return make_plan(rest, Nq, Nk, block_m, block_n, device, split_tiles)
    plan = _plans.get(key)
    if plan is not None:
        _plans.move_to_end(key)
        return plan
    plan = make_plan(rest, Nq, Nk, block_m, block_n, device, split_tiles)
    _plans[key], _plan_bytes[key] = plan, held_bytes(plan)
    while len(_plans) > 1 and (len(_plans) > PLAN_CACHE_SIZE or sum(_plan_bytes.values()) > PLAN_CACHE_BYTES):
        _plan_bytes.pop(_plans.popitem(last=False)[0])  # the least recently used first; the newest stays
    return plan
