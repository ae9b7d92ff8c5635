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
tensor mask with a head dimension).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

EMPTY, PARTIAL, FULL = 0, 1, 2  # tile kinds, ordered so that EMPTY < PARTIAL < FULL


def query_positions(rows: Tensor, Nq: int, Nk: int) -> Tensor:
    """Positions in key space of query rows (bottom-right alignment): ``p = i + Nk - Nq``."""
    return rows + (Nk - Nq)


@dataclass(frozen=True)
class Tiling:
    """Tile boundaries of an (Nq, Nk) problem cut into blocks of (block_q, block_k)."""

    Nq: int
    Nk: int
    block_q: int
    block_k: int

    @property
    def n_q(self) -> int:
        return -(-self.Nq // self.block_q)

    @property
    def n_k(self) -> int:
        return -(-self.Nk // self.block_k)

    def bounds(self, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """First/last query *position* of each q block (nQ, 1) and first/last key of each k block (1, nK)."""
        q0 = torch.arange(self.n_q, device=device) * self.block_q
        q1 = torch.clamp(q0 + self.block_q, max=self.Nq) - 1
        k0 = torch.arange(self.n_k, device=device) * self.block_k
        k1 = torch.clamp(k0 + self.block_k, max=self.Nk) - 1
        off = self.Nk - self.Nq
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


def _kinds(full: Tensor, empty: Tensor) -> Tensor:
    """Tile kinds from two boolean tensors; full wins over partial, empty over everything."""
    kinds = torch.full(torch.broadcast_shapes(full.shape, empty.shape), PARTIAL, dtype=torch.int8,
                       device=full.device)
    kinds = kinds.masked_fill(full, FULL)
    return kinds.masked_fill(empty, EMPTY)


def _as4d(x: Tensor) -> Tensor:
    """(r, c) -> (1, 1, r, c); (Bm, r, c) -> (Bm, 1, r, c); 4-D passes through."""
    while x.dim() < 4:
        x = x.unsqueeze(0) if x.dim() < 3 else x.unsqueeze(1)
    return x


class Mask:
    """Base of every attnkit mask. Subclasses implement ``_evaluate`` and ``_block_kinds``."""

    # -- what subclasses provide -------------------------------------------------------------
    def _evaluate(self, rows: Tensor, cols: Tensor, Nq: int, Nk: int) -> Tensor:
        """Bool (Bm, Hm, len(rows), len(cols)) for query rows ``rows`` and key columns ``cols``."""
        raise NotImplementedError

    def _block_kinds(self, tiling: Tiling, device: torch.device) -> Tensor:
        """int8 (Bm, Hm, nQ, nK) of EMPTY / PARTIAL / FULL, computed without Nq x Nk memory."""
        raise NotImplementedError

    def check(self, B: int, H: int, Nq: int, Nk: int) -> None:
        """Raise ValueError if this mask cannot apply to a (B, H, Nq, Nk) problem."""

    def is_top_left_causal(self, q0: int, k0: int, Nq: int, Nk: int) -> bool:
        """True if, on the tile starting at (query q0, key k0), this mask is exactly "key j' <= query
        i'" in tile coordinates, so a fused kernel's own ``is_causal`` can replace the mask."""
        return False

    # -- public API --------------------------------------------------------------------------
    def evaluate(self, rows: Tensor, cols: Tensor, Nq: int, Nk: int) -> Tensor:
        """The mask on a sub-grid: bool (Bm, Hm, len(rows), len(cols)), True = may attend."""
        return _as4d(self._evaluate(rows, cols, Nq, Nk))

    def block_kinds(self, Nq: int, Nk: int, block_q: int, block_k: int,
                    device: torch.device | str | None = None) -> Tensor:
        """Classify tiles: int8 (Bm, Hm, ceil(Nq/block_q), ceil(Nk/block_k)) of
        ``masks.EMPTY`` (nothing allowed), ``PARTIAL`` or ``FULL`` (everything allowed).

        Conservative: a tile reported PARTIAL may turn out full or empty, never the reverse.
        """
        tiling = Tiling(Nq, Nk, block_q, block_k)
        return _as4d(self._block_kinds(tiling, torch.device(device or "cpu")))

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
        return cols[None, :] <= query_positions(rows, Nq, Nk)[:, None]

    def _block_kinds(self, tiling, device):
        p_lo, p_hi, k_lo, k_hi = tiling.bounds(device)
        return _kinds(full=k_hi <= p_lo, empty=k_lo > p_hi)

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

    def _dilations(self, device) -> Tensor:
        """(Hm, 1, 1) long: one dilation per head (Hm = 1 when shared)."""
        d = self.dilation if isinstance(self.dilation, tuple) else (self.dilation,)
        return torch.tensor(d, device=device).view(-1, 1, 1)

    def _evaluate(self, rows, cols, Nq, Nk):
        delta = cols[None, :] - query_positions(rows, Nq, Nk)[:, None]  # (r, c) key minus query pos
        if self.dilation == 1:
            return (delta >= -self.left) & (delta <= self.right)
        dil = self._dilations(rows.device)  # (Hm, 1, 1)
        ok = (delta >= -self.left * dil) & (delta <= self.right * dil) & (delta % dil == 0)
        return ok[None]  # (1, Hm, r, c)

    def _block_kinds(self, tiling, device):
        p_lo, p_hi, k_lo, k_hi = tiling.bounds(device)
        if self.dilation == 1:
            full = (k_lo >= p_hi - self.left) & (k_hi <= p_lo + self.right)
            empty = (k_hi < p_lo - self.left) | (k_lo > p_hi + self.right)
            return _kinds(full, empty)
        dil = self._dilations(device)  # (Hm, 1, 1); a dilated tile is never full (gaps)
        empty = (k_hi < p_lo - self.left * dil) | (k_lo > p_hi + self.right * dil)
        return _kinds(torch.zeros_like(empty), empty)[None]  # (1, Hm, nQ, nK)

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
        self.check(1, 1, Nk, Nk)
        f = torch.zeros(1, Nk, dtype=torch.bool, device=device)
        f[0, self.indices.to(device)] = True
        return f

    def _both_flags(self, rows, cols, Nq, Nk):
        flags = self._flags(Nk, cols.device)  # (Bm, Nk)
        pos = query_positions(rows, Nq, Nk)
        q_flag = torch.where(pos[None, :] >= 0, flags[:, pos.clamp(min=0)], False)  # (Bm, r)
        return q_flag, flags[:, cols]  # (Bm, r), (Bm, c)

    def _evaluate(self, rows, cols, Nq, Nk):
        q_flag, k_flag = self._both_flags(rows, cols, Nq, Nk)
        return q_flag[:, :, None] | k_flag[:, None, :]  # (Bm, r, c)

    def _block_kinds(self, tiling, device):
        q_flag, k_flag = self._both_flags(torch.arange(tiling.Nq, device=device),
                                          torch.arange(tiling.Nk, device=device), tiling.Nq, tiling.Nk)
        qc, qs = tiling.pool_counts(q_flag, tiling.block_q)  # (Bm, nQ)
        kc, ks = tiling.pool_counts(k_flag, tiling.block_k)  # (Bm, nK)
        full = (qc == qs)[:, :, None] | (kc == ks)[:, None, :]
        empty = (qc == 0)[:, :, None] & (kc == 0)[:, None, :]
        return _kinds(full, empty)

    def check(self, B, H, Nq, Nk):
        if self.indices is not None:
            if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= Nk):
                raise ValueError(f"global_tokens: indices must lie in [0, Nk={Nk}), got "
                                 f"min={int(self.indices.min())} max={int(self.indices.max())}")
        else:
            Bm, n = self.flags.shape
            if n != Nk or Bm not in (1, B):
                raise ValueError(f"global_tokens: a bool mask of shape {tuple(self.flags.shape)} "
                                 f"does not fit B={B}, Nk={Nk}; expected (B, Nk) or (1, Nk)")

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
        return self._valid(Nk, cols.device)[:, None, cols].expand(-1, len(rows), -1)  # (B, r, c)

    def _block_kinds(self, tiling, device):
        kc, ks = tiling.pool_counts(self._valid(tiling.Nk, device), tiling.block_k)  # (B, nK)
        full, empty = (kc == ks)[:, None, :], (kc == 0)[:, None, :]  # (B, 1, nK)
        return _kinds(full, empty).expand(-1, tiling.n_q, -1)

    def check(self, B, H, Nq, Nk):
        if self.lengths is not None:
            n = self.lengths.shape[0]
            if n not in (1, B):
                raise ValueError(f"key_padding: {n} lengths for batch size B={B}; give one per batch element")
            lo, hi = int(self.lengths.min()), int(self.lengths.max())
            if lo < 0 or hi > Nk:
                raise ValueError(f"key_padding: lengths must lie in [0, Nk={Nk}], got min={lo} max={hi}")
        elif self.valid.shape[-1] != Nk or self.valid.shape[0] not in (1, B):
            raise ValueError(f"key_padding: bool mask of shape {tuple(self.valid.shape)} does not fit "
                             f"B={B}, Nk={Nk}; expected (B, Nk) with True = real token")

    def __repr__(self) -> str:
        return "key_padding(lengths)" if self.lengths is not None else "key_padding(valid)"


@dataclass(frozen=True, eq=False)
class Document(Mask):
    """Packed sequences: query i and key j attend when they carry the same document id."""

    values: Tensor  # (Bm, Nk) integer document id of each key position

    def _query_values(self, rows: Tensor, Nq: int, Nk: int) -> Tensor:
        """Document id at each query's position: (Bm, len(rows)); -1 before the first key."""
        vals = self.values.to(rows.device)
        pos = query_positions(rows, Nq, Nk)
        return torch.where(pos[None, :] >= 0, vals[:, pos.clamp(min=0)], -1)

    def _evaluate(self, rows, cols, Nq, Nk):
        q_doc = self._query_values(rows, Nq, Nk)  # (Bm, r)
        k_doc = self.values.to(cols.device)[:, cols]  # (Bm, c)
        return q_doc[:, :, None] == k_doc[:, None, :]

    def _block_kinds(self, tiling, device):
        q_doc = self._query_values(torch.arange(tiling.Nq, device=device), tiling.Nq, tiling.Nk)  # (Bm, Nq)
        k_doc = self.values.to(device)
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

    def __repr__(self) -> str:
        return f"document(<ids {tuple(self.values.shape)}>)"


def _block_min_max(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-block min and max of integer ids (Bm, N) -> (Bm, nblocks) each."""
    n = x.shape[-1]
    nb = -(-n // block)
    pad = nb * block - n
    lo = torch.nn.functional.pad(x, (0, pad), value=int(x.max()) if n else 0)
    hi = torch.nn.functional.pad(x, (0, pad), value=int(x.min()) if n else 0)
    return lo.view(x.shape[0], nb, block).amin(-1), hi.view(x.shape[0], nb, block).amax(-1)


@dataclass(frozen=True, eq=False)
class Dense(Mask):
    """A user's bool tensor broadcastable to (B, H, Nq, Nk), True = may attend."""

    tensor: Tensor

    def _full(self, Nq: int, Nk: int) -> Tensor:
        t = self.tensor.reshape((1,) * (4 - self.tensor.dim()) + tuple(self.tensor.shape))  # align right
        return t.expand(*t.shape[:2], Nq, Nk)

    def _evaluate(self, rows, cols, Nq, Nk):
        full = self._full(Nq, Nk)
        tile = full[:, :, rows.to(full.device)][:, :, :, cols.to(full.device)]
        return tile.to(rows.device)

    def _block_kinds(self, tiling, device):
        t = self._full(tiling.Nq, tiling.Nk).to(device)
        Bm, Hm = t.shape[:2]
        bq, bk, nq, nk = tiling.block_q, tiling.block_k, tiling.n_q, tiling.n_k
        pad = (0, nk * bk - tiling.Nk, 0, nq * bq - tiling.Nq)
        any_ = torch.nn.functional.pad(t, pad, value=False).view(Bm, Hm, nq, bq, nk, bk).any(5).any(3)
        all_ = torch.nn.functional.pad(t, pad, value=True).view(Bm, Hm, nq, bq, nk, bk).all(5).all(3)
        return _kinds(all_, ~any_)

    def check(self, B, H, Nq, Nk):
        check_broadcastable("mask", self.tensor, (B, H, Nq, Nk))

    def __repr__(self) -> str:
        return f"dense_mask(<bool {tuple(self.tensor.shape)}>)"


# -- composition -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Binary(Mask):
    """Shared by ``&`` and ``|``: two operands, both checked, both tile kinds as 4-D."""

    a: Mask
    b: Mask

    def _operand_kinds(self, tiling, device) -> tuple[Tensor, Tensor]:
        return _as4d(self.a._block_kinds(tiling, device)), _as4d(self.b._block_kinds(tiling, device))

    def check(self, B, H, Nq, Nk):
        self.a.check(B, H, Nq, Nk)
        self.b.check(B, H, Nq, Nk)


@dataclass(frozen=True)
class And(_Binary):
    def _evaluate(self, rows, cols, Nq, Nk):
        return self.a.evaluate(rows, cols, Nq, Nk) & self.b.evaluate(rows, cols, Nq, Nk)

    def _block_kinds(self, tiling, device):
        ka, kb = self._operand_kinds(tiling, device)
        return _kinds(full=(ka == FULL) & (kb == FULL), empty=(ka == EMPTY) | (kb == EMPTY))

    def __repr__(self) -> str:
        return f"({self.a!r} & {self.b!r})"


@dataclass(frozen=True)
class Or(_Binary):
    def _evaluate(self, rows, cols, Nq, Nk):
        return self.a.evaluate(rows, cols, Nq, Nk) | self.b.evaluate(rows, cols, Nq, Nk)

    def _block_kinds(self, tiling, device):
        ka, kb = self._operand_kinds(tiling, device)
        return _kinds(full=(ka == FULL) | (kb == FULL), empty=(ka == EMPTY) & (kb == EMPTY))

    def __repr__(self) -> str:
        return f"({self.a!r} | {self.b!r})"


@dataclass(frozen=True)
class Not(Mask):
    a: Mask

    def _evaluate(self, rows, cols, Nq, Nk):
        return ~self.a.evaluate(rows, cols, Nq, Nk)

    def _block_kinds(self, tiling, device):
        k = self.a._block_kinds(tiling, device)
        return (FULL - k).to(torch.int8)  # EMPTY <-> FULL, PARTIAL stays

    def check(self, B, H, Nq, Nk):
        self.a.check(B, H, Nq, Nk)

    def __repr__(self) -> str:
        return f"~{self.a!r}"


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
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name}: {int(t.min())} is negative; expected {what}")
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
