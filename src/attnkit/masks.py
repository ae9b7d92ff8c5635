"""The attnkit mask language: small frozen objects that compose with ``&``, ``|`` and ``~``.

Legend: B batch, H heads, Nq queries, Nk keys. ``True`` means "may attend".

Positions. Query row ``i`` sits at *position* ``p = i + (Nk - Nq)`` in the key sequence
(bottom-right alignment, FlashAttention's convention): with a KV cache of Nk keys and Nq new
queries, the last query is the last key. Every mask below compares key index ``j`` with ``p``.

A mask can always ``materialize`` itself into its dense truth (what the reference checks kernels
against), and it can classify (query-block, key-block) tiles as EMPTY / PARTIAL / FULL from its
structure alone, without an Nq x Nk tensor: that is what lets a tiled kernel skip empty tiles and
run full tiles without an element-wise mask.

Every evaluation is 4-D and broadcastable to (B, H, rows, cols): leading sizes are 1 unless the
mask depends on the batch (padding, documents, per-sample global tokens) or on the head (a dense
tensor mask with a head dimension, per-head dilations).

Inside, a mask evaluates *index grids*: ``_evaluate(rows, cols, ...)`` takes integer tensors
broadcastable against each other (shape S once broadcast: (r, 1) and (1, c) for a grid, (P, BM, 1)
and (P, 1, BN) for P tiles at once) and returns bool (Bm, Hm, *S'), S' broadcastable to S. So
the block plan (``ops/block_plan.py``) evaluates every partial tile of a mask in one call.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

EMPTY, PARTIAL, FULL = 0, 1, 2  # tile kinds, ordered so that EMPTY < PARTIAL < FULL


def query_positions(rows: Tensor, Nq: int, Nk: int) -> Tensor:
    """Positions in key space of query rows (bottom-right alignment): ``p = i + Nk - Nq``."""
    return rows + (Nk - Nq)


@dataclass(frozen=True)
class Tiling:
    """Tile boundaries of an (Nq, Nk) problem cut into blocks of (block_q, block_k).

    The problem may be a *region* of a larger (NQ, NK) one (``Region``, context-parallel shards):
    local row i is global row ``row0 + row_step * i`` and local key j global key ``col0 +
    col_step * j``; masks classify tiles by those global indices. Defaults: the problem itself.
    """

    Nq: int
    Nk: int
    block_q: int
    block_k: int
    row0: int = 0
    row_step: int = 1
    col0: int = 0
    col_step: int = 1
    NQ: int | None = None  # the whole problem's sizes; None = (Nq, Nk)
    NK: int | None = None

    @property
    def n_q(self) -> int:
        return -(-self.Nq // self.block_q)

    @property
    def n_k(self) -> int:
        return -(-self.Nk // self.block_k)

    @property
    def full_q(self) -> int:
        return self.Nq if self.NQ is None else self.NQ

    @property
    def full_k(self) -> int:
        return self.Nk if self.NK is None else self.NK

    def row_index(self, device: torch.device | None = None) -> Tensor:
        """(Nq,) global row of each local query row."""
        return self.row0 + self.row_step * torch.arange(self.Nq, device=device)

    def col_index(self, device: torch.device | None = None) -> Tensor:
        """(Nk,) global key of each local key column."""
        return self.col0 + self.col_step * torch.arange(self.Nk, device=device)

    def bounds(self, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """First/last query *position* of each q block (nQ, 1) and first/last key of each k block
        (1, nK), in the whole problem (global indices grow with local ones: steps are >= 1)."""
        q0 = torch.arange(self.n_q, device=device) * self.block_q
        q1 = torch.clamp(q0 + self.block_q, max=self.Nq) - 1
        k0 = torch.arange(self.n_k, device=device) * self.block_k
        k1 = torch.clamp(k0 + self.block_k, max=self.Nk) - 1
        off = self.full_k - self.full_q
        q0, q1 = self.row0 + self.row_step * q0, self.row0 + self.row_step * q1
        k0, k1 = self.col0 + self.col_step * k0, self.col0 + self.col_step * k1
        return (q0 + off)[:, None], (q1 + off)[:, None], k0[None, :], k1[None, :]

    def pool_counts(self, flags: Tensor, block: int) -> tuple[Tensor, Tensor]:
        """Per-block count of True in ``flags`` (..., N) and the block sizes: (..., nblocks) each."""
        n = flags.shape[-1]
        nb = -(-n // block)
        padded = torch.nn.functional.pad(flags.to(torch.int32), (0, nb * block - n))
        counts = padded.view(*flags.shape[:-1], nb, block).sum(-1)
        sizes = torch.clamp(n - torch.arange(nb, device=flags.device) * block, max=block)
        return counts, sizes


def check_broadcastable(name: str, t: Tensor, target: tuple[int, int, int, int]) -> None:
    """A mask or bias must broadcast *to* (B, H, Nq, Nk) (torch's rules, aligned right)."""
    if t.dim() > 4:
        raise ValueError(f"{name} has {t.dim()} dims; expected at most 4 (B, H, Nq, Nk) = {target}, got {name} "
                         f"of shape {tuple(t.shape)}; drop or merge the extra leading dims")
    padded = (1,) * (4 - t.dim()) + tuple(t.shape)
    if any(s not in (1, n) for s, n in zip(padded, target)):
        raise ValueError(f"{name} of shape {tuple(t.shape)} cannot broadcast to (B, H, Nq, Nk) = {target}; "
                         "each dim must be 1 or the full size (dims align from the right, as in torch)")


VALUE_CHECKS_KEPT = 256  # tensors whose values were checked, remembered (and held) for the next calls
_values_checked: OrderedDict = OrderedDict()


def check_values_once(t: Tensor, what: tuple, check: Callable[[], None]) -> None:
    """Run ``check``, which reads ``t``'s values, once per tensor object, version and ``what`` (the
    sizes it checks against): on a GPU reading values waits for the device, which a call that
    reuses its lengths or indices should not pay every time. The tensor is held while remembered,
    so its id cannot pass to another tensor meanwhile; an in-place change moves its version and
    checks it again. While a CUDA graph is being captured
    nothing can be read back: the check is skipped (run the call once before capturing)."""
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    if t.is_inference():  # no version counter: checked every time
        check()
        return
    key = (id(t), t._version, what)  # the tensor is held while remembered: its id stays its own
    if key in _values_checked:
        _values_checked.move_to_end(key)
        return
    check()
    _values_checked[key] = t
    while len(_values_checked) > VALUE_CHECKS_KEPT:
        _values_checked.popitem(last=False)


CONTENT_KEY_MAX = 1024  # CPU tensors up to this many elements are keyed by content, larger ones by identity
UNCACHEABLE = "uncacheable"  # in a key: no cache may keep what was built from it (``tensor_key``)


def tensor_key(t: Tensor | None) -> tuple:
    """A tensor inside a mask, for ``Mask.structure_key``: a small CPU tensor (indices from a list,
    a few lengths) by its content, so the same values rebuilt each call compare equal; anything
    else by identity and version (data pointer, ``_version``, shape, strides): reading a device
    tensor's values would wait for the device, and hashing N values on the host each call is the
    cost a cache keyed by this is there to avoid. Whoever keeps such a key must keep the tensor
    alive with it (so its memory is not reused meanwhile); an in-place change moves its version.
    Writes that torch does not count (through ``.data``, a NumPy view from ``.numpy()`` or
    ``torch.from_numpy``, DLPack) do not: a buffer refilled that way must be a new tensor, or
    small enough to be keyed by content. An inference tensor (``torch.inference_mode``) has no
    version: its key holds ``UNCACHEABLE``, and nothing built from it is cached."""
    if t is None:
        return (None,)
    if t.device.type == "cpu" and t.numel() <= CONTENT_KEY_MAX and t.dtype in (torch.bool, torch.int64, torch.int32):
        return ("values", str(t.dtype), tuple(t.shape), t.detach().contiguous().numpy().tobytes())
    if t.is_inference():  # no version counter (torch.inference_mode): its identity says nothing of its values
        return (UNCACHEABLE,)
    return ("tensor", t.data_ptr(), t._version, tuple(t.shape), t.stride(), str(t.dtype), str(t.device))


def _kinds(full: Tensor, empty: Tensor) -> Tensor:
    """Tile kinds from two boolean tensors; full wins over partial, empty over everything."""
    return torch.where(empty, EMPTY, PARTIAL + full.to(torch.int8)).to(torch.int8)  # one pass


def _as4d(x: Tensor) -> Tensor:
    """(r, c) -> (1, 1, r, c); (Bm, r, c) -> (Bm, 1, r, c); 4-D passes through."""
    while x.dim() < 4:
        x = x.unsqueeze(0) if x.dim() < 3 else x.unsqueeze(1)
    return x


def _tile_offsets(start: Tensor, block: int, N: int) -> Tensor:
    """(P, block) indices start + 0..block-1, clamped to N - 1 (as the plan evaluates them)."""
    return (start[:, None] + torch.arange(block, device=start.device)).clamp(max=N - 1)


def _diagonal(q0: Tensor, k0: Tensor, Nq: int, Nk: int) -> Tensor:
    """(P, 1) a tile's key start minus its query position: all a shift-invariant mask's tile depends on."""
    return (k0 - query_positions(q0, Nq, Nk))[:, None].long()


def _per_tile(x: Tensor) -> Tensor:
    """(Bm, P, n) -> (P, Bm * n) int64: per-sample values laid side by side, one row per tile."""
    return x.transpose(0, 1).flatten(1).long()


def _per_tile_bits(flags: Tensor) -> Tensor:
    """(Bm, P, n) bool -> (P, Bm * ceil(n / 8)) int64: the flags' bytes read 8 to a word (no copy
    wider than the flags), so that grouping tiles sorts n / 8 words per tile instead of n flags."""
    Bm, P, n = flags.shape
    padded = torch.nn.functional.pad(flags, (0, -n % 8)).contiguous()  # (Bm, P, 8 * ceil(n / 8)) bool
    return padded.view(torch.uint8).view(torch.int64).transpose(0, 1).flatten(1)


class Mask:
    """Base of every attnkit mask. Subclasses implement ``_evaluate`` and ``_block_kinds``."""

    # -- what subclasses provide -------------------------------------------------------------
    def _evaluate(self, rows: Tensor, cols: Tensor, Nq: int, Nk: int) -> Tensor:
        """Bool (Bm, Hm, *S) for query rows ``rows`` and key columns ``cols``, integer tensors of
        one rank that broadcast to S (module docstring); the S dims may come back as 1 where the
        mask does not depend on them."""
        raise NotImplementedError

    def _block_kinds(self, tiling: Tiling, device: torch.device) -> Tensor:
        """int8 (Bm, Hm, nQ, nK) of EMPTY / PARTIAL / FULL, computed without Nq x Nk memory."""
        raise NotImplementedError

    def _tile_signature(self, q0: Tensor, k0: Tensor, bm: int, bn: int, Nq: int, Nk: int) -> Tensor:
        """(P, s) int64 for the BM x BN tiles starting at query rows q0 (P,) and keys k0 (P,): two
        tiles with equal signatures have equal truth, so the block plan evaluates and stores one
        of them (the band's edge tiles of a window are all alike, so are most tiles of a global
        row). This default names each tile by its place: no two share."""
        return torch.stack([q0, k0], 1).long()

    def check(self, B: int, H: int, Nq: int, Nk: int) -> None:
        """Raise ValueError if this mask cannot apply to a (B, H, Nq, Nk) problem."""

    def structure_key(self) -> tuple:
        """A hashable key, equal for masks built alike (same classes, windows, dilations, and
        tensors equal by ``tensor_key``) whether or not they are one object: what the block
        plan cache is keyed by. Reads no device tensor's values. This default walks the
        dataclass fields; the masks below spell theirs out (a call computes it every time)."""
        def part(x):
            if isinstance(x, Tensor):
                return tensor_key(x)
            if isinstance(x, Mask):
                return x.structure_key()
            return x if not isinstance(x, list) else tuple(x)
        return (type(self), *(part(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def is_top_left_causal(self, q0: int, k0: int, Nq: int, Nk: int) -> bool:
        """True if, on the tile starting at (query q0, key k0), this mask is exactly "key j' <= query
        i'" in tile coordinates, so a fused kernel's own ``is_causal`` can replace the mask."""
        return False

    # -- public API --------------------------------------------------------------------------
    def evaluate(self, rows: Tensor, cols: Tensor, Nq: int, Nk: int) -> Tensor:
        """The mask on a sub-grid: bool (Bm, Hm, len(rows), len(cols)), True = may attend."""
        truth = self._evaluate(rows[:, None], cols[None, :], Nq, Nk)  # (Bm, Hm, r or 1, c or 1)
        return truth.expand(*truth.shape[:2], len(rows), len(cols))

    def evaluate_grid(self, rows: Tensor, cols: Tensor, Nq: int, Nk: int) -> Tensor:
        """The mask on index grids: rows and cols integer tensors of one rank k >= 1 that broadcast
        to a shape S (rows (P, BM, 1) and cols (P, 1, BN) for P tiles), -> bool (Bm, Hm, *S)."""
        if rows.dim() != cols.dim() or rows.dim() < 1:
            raise ValueError(f"rows and cols must have one rank >= 1, got {rows.dim()} and {cols.dim()}")
        truth = self._evaluate(rows, cols, Nq, Nk)
        return truth.expand(*truth.shape[:2], *torch.broadcast_shapes(rows.shape, cols.shape))

    def block_kinds(self, Nq: int, Nk: int, block_q: int, block_k: int,
                    device: torch.device | str | None = None) -> Tensor:
        """Classify tiles: int8 (Bm, Hm, ceil(Nq/block_q), ceil(Nk/block_k)) of
        ``masks.EMPTY`` (nothing allowed), ``PARTIAL`` or ``FULL`` (everything allowed).

        Conservative: a tile reported PARTIAL may turn out full or empty, never the reverse.
        """
        tiling = Tiling(Nq, Nk, block_q, block_k)
        return _as4d(self._block_kinds(tiling, torch.device(device or "cpu")))

    def tile_signature(self, q0: Tensor, k0: Tensor, block_q: int, block_k: int, Nq: int, Nk: int) -> Tensor:
        """(P, s) int64 naming the truth of the block_q x block_k tiles that start at query rows
        ``q0`` (P,) and keys ``k0`` (P,): tiles with equal rows have equal truth (conservative:
        equal tiles may differ in signature). Computed from the mask's structure, per tile, not
        per pair (a window's depends on the tile's diagonal only)."""
        return self._tile_signature(q0.long(), k0.long(), block_q, block_k, Nq, Nk)

    def materialize(self, Nq: int, Nk: int, device: torch.device | str | None = None) -> Tensor:
        """The dense truth: bool (Bm, Hm, Nq, Nk), broadcastable to (B, H, Nq, Nk)."""
        dev = torch.device(device or "cpu")
        return self.evaluate(torch.arange(Nq, device=dev), torch.arange(Nk, device=dev), Nq, Nk)

    def to_ascii(self, Nq: int, Nk: int, batch: int = 0, head: int = 0,
                 allowed: str = "█", blocked: str = "·") -> str:
        """Draw the mask of one batch element and head: one line per query, one char per key."""
        dense = self.materialize(Nq, Nk)
        grid = dense[min(batch, dense.shape[0] - 1), min(head, dense.shape[1] - 1)]
        return "\n".join("".join(allowed if x else blocked for x in row) for row in grid.tolist())

    def __and__(self, other: Mask) -> Mask:
        return And(_check_mask(self), _check_mask(other))

    def __or__(self, other: Mask) -> Mask:
        return Or(_check_mask(self), _check_mask(other))

    def __invert__(self) -> Mask:
        return Not(self)


def _check_mask(m: object) -> Mask:
    if not isinstance(m, Mask):
        raise TypeError(f"masks compose only with other attnkit masks, got {type(m).__name__}; "
                        "wrap a bool tensor with ak.dense_mask(tensor)")
    return m


# -- primitives ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Causal(Mask):
    """Query i sees key j when ``j <= i + (Nk - Nq)`` (bottom-right aligned).

    Nq=3, Nk=5 (a cache of 2 keys, then 3 new tokens)::

        ███··
        ████·      <- rows are queries 0..2, columns keys 0..4
        █████

    i.e. query 0 sees keys 0..2, query 2 (the newest) sees all 5.
    """

    def _evaluate(self, rows, cols, Nq, Nk):
        return (cols <= query_positions(rows, Nq, Nk))[None, None]

    def _block_kinds(self, tiling, device):
        p_lo, p_hi, k_lo, k_hi = tiling.bounds(device)
        return _kinds(full=k_hi <= p_lo, empty=k_lo > p_hi)

    def _tile_signature(self, q0, k0, bm, bn, Nq, Nk):
        return _diagonal(q0, k0, Nq, Nk).clamp(-bn, bm)  # past these the tile is full / empty

    def structure_key(self):
        return (type(self),)  # the class itself: a subclass that evaluates otherwise is another key

    def is_top_left_causal(self, q0, k0, Nq, Nk):
        return k0 == q0 + (Nk - Nq)

    def __repr__(self) -> str:
        return "causal()"


@dataclass(frozen=True)
class SlidingWindow(Mask):
    """Key j is visible to query i when ``j - p = dilation * t`` with ``-left <= t <= right``,
    p = i + Nk - Nq. With ``dilation=1`` that is ``p - left <= j <= p + right``.

    ``dilation`` is one int for every head, or a tuple of one int per query head (Longformer's
    dilated window, Beltagy et al. 2020 section 3.1: heads with gaps of d - 1 keys see d times
    farther with the same number of keys).
    """

    left: int
    right: int
    dilation: int | tuple[int, ...] = 1

    def _dilations(self, device, dims: int = 2) -> Tensor:
        """(Hm, 1, ..., 1) long with ``dims`` trailing 1s: one dilation per head (Hm = 1 when shared)."""
        d = self.dilation if isinstance(self.dilation, tuple) else (self.dilation,)
        return torch.tensor(d, device=device).view(-1, *(1,) * dims)

    def _evaluate(self, rows, cols, Nq, Nk):
        delta = cols - query_positions(rows, Nq, Nk)  # (*S) key minus query position
        if self.dilation == 1:
            return ((delta >= -self.left) & (delta <= self.right))[None, None]
        dil = self._dilations(rows.device, delta.dim())  # (Hm, 1, ..., 1)
        ok = (delta >= -self.left * dil) & (delta <= self.right * dil) & (delta % dil == 0)
        return ok[None]  # (1, Hm, *S)

    def _block_kinds(self, tiling, device):
        p_lo, p_hi, k_lo, k_hi = tiling.bounds(device)
        if self.dilation == 1:
            full = (k_lo >= p_hi - self.left) & (k_hi <= p_lo + self.right)
            empty = (k_hi < p_lo - self.left) | (k_lo > p_hi + self.right)
            return _kinds(full, empty)
        dil = self._dilations(device)  # (Hm, 1, 1); a dilated tile is never full (gaps)
        empty = (k_hi < p_lo - self.left * dil) | (k_lo > p_hi + self.right * dil)
        return _kinds(torch.zeros_like(empty), empty)[None]  # (1, Hm, nQ, nK)

    def _tile_signature(self, q0, k0, bm, bn, Nq, Nk):
        reach = max(self.dilation) if isinstance(self.dilation, tuple) else self.dilation
        lo, hi = -self.left * reach - bn, self.right * reach + bm  # past these the tile is empty
        return _diagonal(q0, k0, Nq, Nk).clamp(lo, hi)

    def structure_key(self):
        return (type(self), self.left, self.right, self.dilation)

    def check(self, B, H, Nq, Nk):
        if isinstance(self.dilation, tuple) and len(self.dilation) != H:
            raise ValueError(f"sliding_window: {len(self.dilation)} per-head dilations for Hq={H} query "
                             "heads; give one per query head, or one int for all")

    def __repr__(self) -> str:
        dil = "" if self.dilation == 1 else f", dilation={self.dilation}"
        return f"sliding_window({self.left}, {self.right}{dil})"


@dataclass(frozen=True, eq=False)
class GlobalTokens(Mask):
    """Longformer global attention: global positions attend to every key, and every query
    attends to the global positions. ``flags`` is bool (Bm, Nk) or None with ``indices`` given."""

    indices: Tensor | None  # (G,) long positions shared by the batch, or None
    flags: Tensor | None  # (Bm, Nk) bool per-sample, or None

    def _flags(self, Nk: int, device) -> Tensor:
        if self.flags is not None:
            return self.flags.to(device)
        if self.indices.device.type == "cpu":  # checked without a device sync (validate checks the rest)
            self.check(1, 1, Nk, Nk)
        f = torch.zeros(1, Nk, dtype=torch.bool, device=device)
        f[0, self.indices.to(device)] = True
        return f

    def _both_flags(self, rows, cols, Nq, Nk):
        flags = self._flags(Nk, cols.device)  # (Bm, Nk)
        pos = query_positions(rows, Nq, Nk)
        q_flag = torch.where(pos[None] >= 0, flags[:, pos.clamp(min=0)], False)  # (Bm, *rows.shape)
        return q_flag, flags[:, cols]  # (Bm, *rows.shape), (Bm, *cols.shape)

    def _evaluate(self, rows, cols, Nq, Nk):
        q_flag, k_flag = self._both_flags(rows, cols, Nq, Nk)
        return (q_flag | k_flag)[:, None]  # (Bm, 1, *S)

    def _tile_signature(self, q0, k0, bm, bn, Nq, Nk):
        q_flag, k_flag = self._both_flags(_tile_offsets(q0, bm, Nq), _tile_offsets(k0, bn, Nk), Nq, Nk)
        return _per_tile_bits(torch.cat([q_flag, k_flag], -1))  # (P, Bm * ceil((BM + BN) / 64))

    def _block_kinds(self, tiling, device):
        q_flag, k_flag = self._both_flags(tiling.row_index(device), tiling.col_index(device),
                                          tiling.full_q, tiling.full_k)
        qc, qs = tiling.pool_counts(q_flag, tiling.block_q)  # (Bm, nQ)
        kc, ks = tiling.pool_counts(k_flag, tiling.block_k)  # (Bm, nK)
        full = (qc == qs)[:, :, None] | (kc == ks)[:, None, :]
        empty = (qc == 0)[:, :, None] & (kc == 0)[:, None, :]
        return _kinds(full, empty)

    def check(self, B, H, Nq, Nk):
        if self.indices is not None:
            check_values_once(self.indices, ("global_tokens", Nk), lambda: self._check_indices(Nk))
        else:
            Bm, n = self.flags.shape
            if n != Nk or Bm not in (1, B):
                raise ValueError(f"global_tokens: a bool mask of shape {tuple(self.flags.shape)} "
                                 f"does not fit B={B}, Nk={Nk}; expected (B, Nk) or (1, Nk)")

    def structure_key(self):
        return (type(self), tensor_key(self.indices), tensor_key(self.flags))

    def _check_indices(self, Nk: int) -> None:
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= Nk):
            raise ValueError(f"global_tokens: indices must lie in [0, Nk={Nk}), got "
                             f"min={int(self.indices.min())} max={int(self.indices.max())}")

    def __repr__(self) -> str:
        if self.indices is not None:
            return f"global_tokens({self.indices.tolist() if self.indices.numel() <= 8 else '...'})"
        return f"global_tokens(<bool {tuple(self.flags.shape)}>)"


@dataclass(frozen=True, eq=False)
class KeyPadding(Mask):
    """Key j of batch element b is visible when ``valid[b, j]`` (True = a real token)."""

    lengths: Tensor | None  # (B,) long, or None
    valid: Tensor | None  # (B, Nk) bool, or None

    def _valid(self, Nk: int, device) -> Tensor:
        if self.valid is not None:
            return self.valid.to(device)
        return torch.arange(Nk, device=device)[None, :] < self.lengths.to(device)[:, None]

    def _evaluate(self, rows, cols, Nq, Nk):
        return self._valid(Nk, cols.device)[:, cols][:, None]  # (B, 1, *cols.shape)

    def _tile_signature(self, q0, k0, bm, bn, Nq, Nk):
        return _per_tile_bits(self._valid(Nk, k0.device)[:, _tile_offsets(k0, bn, Nk)])  # (P, B * ceil(BN / 64))

    def _block_kinds(self, tiling, device):
        valid = self._valid(tiling.full_k, device)[:, tiling.col_index(device)]  # (B, Nk) of the region
        kc, ks = tiling.pool_counts(valid, tiling.block_k)  # (B, nK)
        full, empty = (kc == ks)[:, None, :], (kc == 0)[:, None, :]  # (B, 1, nK)
        return _kinds(full, empty).expand(-1, tiling.n_q, -1)

    def check(self, B, H, Nq, Nk):
        if self.lengths is not None:
            n = self.lengths.shape[0]
            if n not in (1, B):
                raise ValueError(f"key_padding: {n} lengths for batch size B={B}; give one per batch element")
            check_values_once(self.lengths, ("key_padding", Nk), lambda: self._check_lengths(Nk))
        elif self.valid.shape[-1] != Nk or self.valid.shape[0] not in (1, B):
            raise ValueError(f"key_padding: bool mask of shape {tuple(self.valid.shape)} does not fit "
                             f"B={B}, Nk={Nk}; expected (B, Nk) with True = real token")

    def structure_key(self):
        return (type(self), tensor_key(self.lengths), tensor_key(self.valid))

    def _check_lengths(self, Nk: int) -> None:
        lo, hi = int(self.lengths.min()), int(self.lengths.max())
        if lo < 0 or hi > Nk:
            raise ValueError(f"key_padding: lengths must lie in [0, Nk={Nk}], got min={lo} max={hi}")

    def __repr__(self) -> str:
        return "key_padding(lengths)" if self.lengths is not None else "key_padding(valid)"


@dataclass(frozen=True, eq=False)
class Document(Mask):
    """Packed sequences: query i and key j attend when they carry the same document id."""

    values: Tensor  # (Bm, Nk) integer document id of each key position

    def _query_values(self, rows: Tensor, Nq: int, Nk: int) -> Tensor:
        """Document id at each query's position: (Bm, *rows.shape); -1 before the first key."""
        vals = self.values.to(rows.device)
        pos = query_positions(rows, Nq, Nk)
        return torch.where(pos[None] >= 0, vals[:, pos.clamp(min=0)], -1)

    def _evaluate(self, rows, cols, Nq, Nk):
        q_doc = self._query_values(rows, Nq, Nk)  # (Bm, *rows.shape)
        k_doc = self.values.to(cols.device)[:, cols]  # (Bm, *cols.shape)
        return (q_doc == k_doc)[:, None]  # (Bm, 1, *S)

    def _tile_signature(self, q0, k0, bm, bn, Nq, Nk):
        q_doc = self._query_values(_tile_offsets(q0, bm, Nq), Nq, Nk)  # (Bm, P, BM)
        k_doc = self.values.to(k0.device)[:, _tile_offsets(k0, bn, Nk)]  # (Bm, P, BN)
        ids = torch.cat([q_doc, k_doc], -1)
        return _per_tile(ids - ids.amin(-1, keepdim=True))  # equal up to a shift of the ids: equal truth

    def _block_kinds(self, tiling, device):
        q_doc = self._query_values(tiling.row_index(device), tiling.full_q, tiling.full_k)  # (Bm, Nq)
        k_doc = self.values.to(device)[:, tiling.col_index(device)]  # (Bm, Nk)
        q_lo, q_hi = _block_min_max(q_doc, tiling.block_q)  # (Bm, nQ)
        k_lo, k_hi = _block_min_max(k_doc, tiling.block_k)  # (Bm, nK)
        q_lo, q_hi, k_lo, k_hi = q_lo[:, :, None], q_hi[:, :, None], k_lo[:, None, :], k_hi[:, None, :]
        empty = (q_hi < k_lo) | (k_hi < q_lo)
        full = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
        return _kinds(full, empty)

    def check(self, B, H, Nq, Nk):
        Bm, n = self.values.shape
        if n != Nk or Bm not in (1, B):
            raise ValueError(f"document: ids of shape {tuple(self.values.shape)} do not fit B={B}, "
                             f"Nk={Nk}; expected one id per key position, (Nk,) or (B, Nk)")
        if Nq > Nk:
            raise ValueError(f"document: Nq={Nq} > Nk={Nk} puts queries before the first key, so they "
                             "have no document; use Nq <= Nk")

    def structure_key(self):
        return (type(self), tensor_key(self.values))

    def __repr__(self) -> str:
        return f"document(<ids {tuple(self.values.shape)}>)"


def _block_min_max(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-block min and max of integer ids (Bm, N) -> (Bm, nblocks) each. The ragged last block
    is padded with copies of its last id (no read back from the device)."""
    n = x.shape[-1]
    nb = -(-n // block)
    if nb * block > n:
        x = torch.cat([x, x[:, -1:].expand(-1, nb * block - n)], 1)
    blocks = x.view(x.shape[0], nb, block)
    return blocks.amin(-1), blocks.amax(-1)


@dataclass(frozen=True, eq=False)
class Dense(Mask):
    """A user's bool tensor broadcastable to (B, H, Nq, Nk), True = may attend."""

    tensor: Tensor

    def _full(self, Nq: int, Nk: int) -> Tensor:
        t = self.tensor.reshape((1,) * (4 - self.tensor.dim()) + tuple(self.tensor.shape))  # align right
        return t.expand(*t.shape[:2], Nq, Nk)

    def _evaluate(self, rows, cols, Nq, Nk):
        full = self._full(Nq, Nk)  # (Bm, Hm, Nq, Nk), a view
        return full[:, :, rows.to(full.device), cols.to(full.device)].to(rows.device)  # (Bm, Hm, *S)

    def _block_kinds(self, tiling, device):
        t = self._full(tiling.full_q, tiling.full_k).to(device)
        if (tiling.NQ, tiling.NK) != (None, None):  # a region: its rows and columns only
            t = t[:, :, tiling.row_index(t.device)][:, :, :, tiling.col_index(t.device)]
        Bm, Hm = t.shape[:2]
        bq, bk, nq, nk = tiling.block_q, tiling.block_k, tiling.n_q, tiling.n_k
        pad = (0, nk * bk - tiling.Nk, 0, nq * bq - tiling.Nq)
        any_ = torch.nn.functional.pad(t, pad, value=False).view(Bm, Hm, nq, bq, nk, bk).any(5).any(3)
        all_ = torch.nn.functional.pad(t, pad, value=True).view(Bm, Hm, nq, bq, nk, bk).all(5).all(3)
        return _kinds(all_, ~any_)

    def check(self, B, H, Nq, Nk):
        check_broadcastable("mask", self.tensor, (B, H, Nq, Nk))

    def structure_key(self):
        return (type(self), tensor_key(self.tensor))

    def __repr__(self) -> str:
        return f"dense_mask(<bool {tuple(self.tensor.shape)}>)"


# -- composition -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Binary(Mask):
    """Shared by ``&`` and ``|``: two operands, both checked, both tile kinds as 4-D."""

    a: Mask
    b: Mask

    def _tile_signature(self, q0, k0, bm, bn, Nq, Nk):
        return torch.cat([self.a._tile_signature(q0, k0, bm, bn, Nq, Nk),
                          self.b._tile_signature(q0, k0, bm, bn, Nq, Nk)], 1)

    def _operand_kinds(self, tiling, device) -> tuple[Tensor, Tensor]:
        return _as4d(self.a._block_kinds(tiling, device)), _as4d(self.b._block_kinds(tiling, device))

    def check(self, B, H, Nq, Nk):
        self.a.check(B, H, Nq, Nk)
        self.b.check(B, H, Nq, Nk)


@dataclass(frozen=True)
class And(_Binary):
    def _evaluate(self, rows, cols, Nq, Nk):
        return self.a._evaluate(rows, cols, Nq, Nk) & self.b._evaluate(rows, cols, Nq, Nk)

    def _block_kinds(self, tiling, device):
        ka, kb = self._operand_kinds(tiling, device)
        return torch.minimum(ka, kb)  # EMPTY < PARTIAL < FULL: empty if either is, full if both are

    def structure_key(self):
        return (type(self), self.a.structure_key(), self.b.structure_key())

    def __repr__(self) -> str:
        return f"({self.a!r} & {self.b!r})"


@dataclass(frozen=True)
class Or(_Binary):
    def _evaluate(self, rows, cols, Nq, Nk):
        return self.a._evaluate(rows, cols, Nq, Nk) | self.b._evaluate(rows, cols, Nq, Nk)

    def _block_kinds(self, tiling, device):
        ka, kb = self._operand_kinds(tiling, device)
        return torch.maximum(ka, kb)  # full if either is, empty if both are

    def structure_key(self):
        return (type(self), self.a.structure_key(), self.b.structure_key())

    def __repr__(self) -> str:
        return f"({self.a!r} | {self.b!r})"


@dataclass(frozen=True)
class Not(Mask):
    a: Mask

    def _evaluate(self, rows, cols, Nq, Nk):
        return ~self.a._evaluate(rows, cols, Nq, Nk)

    def _tile_signature(self, q0, k0, bm, bn, Nq, Nk):
        return self.a._tile_signature(q0, k0, bm, bn, Nq, Nk)

    def _block_kinds(self, tiling, device):
        k = self.a._block_kinds(tiling, device)
        return (FULL - k).to(torch.int8)  # EMPTY <-> FULL, PARTIAL stays

    def check(self, B, H, Nq, Nk):
        self.a.check(B, H, Nq, Nk)

    def structure_key(self):
        return (type(self), self.a.structure_key())

    def __repr__(self) -> str:
        return f"~{self.a!r}"


@dataclass(frozen=True)
class Region(Mask):
    """``inner`` restricted to a region of its (NQ, NK) problem: local query row i is row ``row0 +
    row_step * i`` of the whole problem and local key j its key ``col0 + col_step * j`` (a
    context-parallel rank's shard of queries against a shard of keys: contiguous, zigzag chunks or
    striped, Brandon et al. 2023). The local problem's own sizes are ignored: ``inner`` is always
    evaluated on the whole problem, so a region of a causal mask stays causal in global positions.
    Tiles are classified through ``Tiling``'s region fields, never by materializing the region."""

    inner: Mask
    row0: int
    row_step: int
    col0: int
    col_step: int
    NQ: int
    NK: int

    def _rows(self, rows: Tensor) -> Tensor:
        return self.row0 + self.row_step * rows

    def _cols(self, cols: Tensor) -> Tensor:
        return self.col0 + self.col_step * cols

    def _evaluate(self, rows, cols, Nq, Nk):
        return self.inner._evaluate(self._rows(rows), self._cols(cols), self.NQ, self.NK)

    def _block_kinds(self, tiling, device):
        whole = Tiling(tiling.Nq, tiling.Nk, tiling.block_q, tiling.block_k,
                       row0=self.row0 + self.row_step * tiling.row0, row_step=self.row_step * tiling.row_step,
                       col0=self.col0 + self.col_step * tiling.col0, col_step=self.col_step * tiling.col_step,
                       NQ=self.NQ, NK=self.NK)
        return self.inner._block_kinds(whole, device)

    def _tile_signature(self, q0, k0, bm, bn, Nq, Nk):
        if self.row_step != 1 or self.col_step != 1:  # a strided tile is no run of the inner mask's rows
            return super()._tile_signature(q0, k0, bm, bn, Nq, Nk)
        # rows past the region's end are outside the local problem, which the block plan masks
        return self.inner._tile_signature(q0 + self.row0, k0 + self.col0, bm, bn, self.NQ, self.NK)

    def check(self, B, H, Nq, Nk):
        self.inner.check(B, H, self.NQ, self.NK)
        last_q, last_k = self.row0 + self.row_step * (Nq - 1), self.col0 + self.col_step * (Nk - 1)
        if min(self.row0, self.col0) < 0 or min(self.row_step, self.col_step) < 1 or last_q >= self.NQ \
                or last_k >= self.NK:
            raise ValueError(f"region: rows {self.row0}+{self.row_step}*i (i < {Nq}) and keys {self.col0}+"
                             f"{self.col_step}*j (j < {Nk}) must lie inside the whole ({self.NQ}, {self.NK}) "
                             "problem with steps >= 1")

    def structure_key(self):
        return (type(self), self.inner.structure_key(), self.row0, self.row_step, self.col0, self.col_step,
                self.NQ, self.NK)

    def __repr__(self) -> str:
        return (f"region({self.inner!r}, rows={self.row0}::{self.row_step}, keys={self.col0}::{self.col_step}, "
                f"of {self.NQ}x{self.NK})")


# -- constructors (the public spelling) ------------------------------------------------------

def causal() -> Mask:
    """Causal mask, bottom-right aligned: query i sees key j when ``j <= i + (Nk - Nq)``.

    For Nq=3, Nk=5::

        ███··
        ████·
        █████
    """
    return Causal()


def sliding_window(left: int, right: int | None = None, *, dilation: int | Sequence[int] = 1) -> Mask:
    """Local window: query at position p sees keys ``p - left .. p + right`` (``right=None``: = left).

    ``dilation=d`` spreads the window (Longformer's dilated sliding window): the query sees keys
    ``p + d*t`` for ``-left <= t <= right``, i.e. ``left`` and ``right`` count keys, not positions.
    A sequence of ints gives one dilation per query head.

    Combine with ``causal()`` for a causal window (``causal() & sliding_window(w)``).
    """
    right = left if right is None else right
    for name, w in (("left", left), ("right", right)):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"sliding_window: {name} must be an int, got {type(w).__name__}")
        if w < 0:
            raise ValueError(f"sliding_window: {name}={w} is negative; windows are (left, right) "
                             "counts >= 0 (use causal() & sliding_window(w) for a one-sided window)")
    return SlidingWindow(left, right, _parse_dilation(dilation))


def _parse_dilation(dilation: int | Sequence[int]) -> int | tuple[int, ...]:
    """An int >= 1 (every head), or a tuple of them (one per query head)."""
    values = dilation.tolist() if isinstance(dilation, Tensor) else dilation
    values = [values] if isinstance(values, int) else list(values) if isinstance(values, (list, tuple)) else None
    if not values or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in values):
        raise ValueError(f"sliding_window: dilation must be an int >= 1 or a sequence of them (one per "
                         f"query head), got {dilation!r}")
    return values[0] if isinstance(dilation, int) else tuple(values)


def _counts_or_flags(name: str, what: str, x: Tensor | Sequence[int]) -> tuple[Tensor | None, Tensor | None]:
    """Parse "1-D non-negative integers, or a bool (B, Nk) tensor": (integers, None) or (None, flags)."""
    t = torch.as_tensor(x)
    if t.numel() == 0:
        t = t.long().reshape(0)
    if t.dtype == torch.bool:
        if t.dim() != 2:
            raise ValueError(f"{name}: a bool tensor must be (B, Nk), got shape {tuple(t.shape)}")
        return None, t
    if t.is_floating_point() or t.dim() != 1:
        raise ValueError(f"{name}: expected {what} or a bool (B, Nk) tensor, "
                         f"got dtype={t.dtype} shape={tuple(t.shape)}")
    def no_negative() -> None:
        if t.numel() and int(t.min()) < 0:
            raise ValueError(f"{name}: {int(t.min())} is negative; expected {what}")
    if torch.compiler.is_compiling():
        pass  # reading values would break the graph: check(), run by the compiled call's op, refuses them
    elif not isinstance(x, Tensor):
        no_negative()
    else:  # a tensor a model keeps and passes every call: read once per tensor and version
        check_values_once(t, (name, "sign"), no_negative)
    return t.long(), None


def global_tokens(indices: Tensor | Sequence[int]) -> Mask:
    """Longformer global attention at these key positions (shared by the batch), or a bool
    tensor (B, Nk) with True at the global positions of each sample."""
    idx, flags = _counts_or_flags("global_tokens", "a 1-D list of integer positions (from 0)", indices)
    return GlobalTokens(indices=idx, flags=flags)


def key_padding(lengths_or_valid: Tensor | Sequence[int]) -> Mask:
    """Padding: either lengths (B,) (keys ``j < lengths[b]`` are real) or bool (B, Nk), True = real."""
    lengths, valid = _counts_or_flags("key_padding", "lengths (B,) of integers >= 0", lengths_or_valid)
    return KeyPadding(lengths=lengths, valid=valid)


def document(ids: Tensor | Sequence[int]) -> Mask:
    """Packed documents: integer ids (Nk,) or (B, Nk); tokens attend within their own document."""
    t = torch.as_tensor(ids)
    if t.is_floating_point() or t.dtype == torch.bool or t.dim() not in (1, 2):
        raise ValueError(f"document: expected integer ids of shape (Nk,) or (B, Nk), got "
                         f"dtype={t.dtype} shape={tuple(t.shape)}")
    return Document(values=t.long() if t.dim() == 2 else t.long()[None])  # (B or 1, Nk)


def dense_mask(tensor: Tensor) -> Mask:
    """Wrap a bool tensor broadcastable to (B, H, Nq, Nk) (True = may attend) as an attnkit mask."""
    if not isinstance(tensor, Tensor) or tensor.dtype != torch.bool:
        got = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
        raise TypeError(f"dense_mask: expected a bool tensor (True = may attend), got {got}; "
                        "for an additive float mask pass it as bias=")
    return Dense(tensor)
