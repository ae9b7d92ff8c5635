"""Longformer attention (Beltagy et al. 2020) exactly, in O(N·W + N·G) time and memory.

The masks it runs are ``window [| global_tokens(g)] [& key_padding(...)]`` where ``window`` is
``sliding_window(left, right, dilation=d)``, optionally ``& causal()`` (see ``pattern.py``).
Every allowed (query, key) pair is computed exactly once, in one of three parts:

- **band**: query row i against the keys of its window (global keys in the window included);
- **global columns**: every query against the G global keys *outside* its window;
- **global rows**: the queries sitting at global positions against all N keys; their result
  replaces the other two.

Band and columns are partials ``(out, lse)`` over disjoint keys, combined by ``merge.merge``.

**The band.** Queries are cut into blocks of ``c`` rows. With row coordinates (row i sees keys
``i + lo .. i + hi``), block b sees the key window ``[b*c + lo, b*c + lo + S)``, S a multiple of
c: every block has the same relative shape, so (1) the windows are an overlapping strided *view*
of the keys (nothing copied), and (2) one (c, S) mask tile, ``a <= t <= a + hi - lo`` for row a
and window slot t, serves every block whose window lies inside the sequence and holds no padding
("regular" blocks). The few others ("irregular": the sequence ends, padding) get their own tiles.
Blocks become the *heads* dimension of one fused-kernel call (torch's CPU flash attention) per
run of blocks, so the work is O(N · S) with S ≈ 2W + c.

A dilated window (dilation d) is d ordinary bands: queries and keys whose position has the same
residue mod d only meet each other (``_residue_classes``). Heads with different dilations run as
separate groups.

**Backward** recomputes (FlashAttention-2): each part takes the *final* out and lse and returns
its share of dq, dk, dv; the band's window gradients (blocks x S keys) are folded back onto the
keys by overlap-add (``_fold``). Global rows give their gradient only through the rows part
(the other parts see dout = 0 there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .merge import lse_for_recompute, merge_into
from .pattern import Pattern, parse
from .precision import compute_dtype, expand_kv, reduce_kv_grad
from .tiles import fused_available, fused_tile, fused_tile_backward, math_tile, math_tile_backward

PIECE_ELEMENTS = 1 << 24  # bound on heads x blocks x c x S per kernel call (scores, window grads)


def block_size(lo: int, hi: int) -> int:
    """Rows per query block: about an eighth of the window span, within 16..64.

    Smaller blocks waste fewer keys (each block reads c - 1 keys beyond any one row's window);
    bigger ones feed the kernel larger matrices. 64 measured best for a 513-key window on the
    2-core CPU (2026-11-23: 416 ms vs 437 (c=32) / 433 (c=128) at N=16384, H=12).
    """
    c = 16
    while c < 64 and c * 8 < hi - lo + 1:
        c *= 2
    return c


@dataclass(frozen=True)
class BandGeometry:
    """Where each query block's key window sits. Row coordinates: row i sees keys i+lo .. i+hi.

    Keys are padded in front by ``pad_front`` so that window b starts at padded index
    ``s0 + b*c`` with s0 a multiple of c (for the overlap-add in ``_fold``).
    """

    nq: int
    nk: int
    lo: int
    hi: int
    c: int

    @property
    def nb(self) -> int:
        return -(-self.nq // self.c)

    @property
    def S(self) -> int:
        return -(-(self.hi - self.lo + self.c) // self.c) * self.c

    @property
    def pad_front(self) -> int:
        return -self.lo if self.lo <= 0 else (-self.lo) % self.c

    @property
    def s0(self) -> int:
        return self.pad_front + self.lo

    @property
    def n_padded(self) -> int:
        return max(self.s0 + (self.nb - 1) * self.c + self.S, self.pad_front + self.nk)

    def pad_rows(self, x: Tensor) -> Tensor:
        """(..., nq, D) -> (..., nb*c, D), zero rows at the end (their results are dropped)."""
        return F.pad(x, (0, 0, 0, self.nb * self.c - self.nq))

    def pad_keys(self, x: Tensor) -> Tensor:
        """(..., nk, D) -> (..., n_padded, D) contiguous, zeros around (masked as invalid)."""
        n_back = self.n_padded - self.pad_front - self.nk
        return F.pad(x, (0, 0, self.pad_front, n_back)).contiguous()

    def key_ok(self, valid: Tensor | None, Bv: int, device) -> Tensor:
        """(Bv, n_padded) bool: a real key (inside the sequence and not padding)."""
        ok = torch.zeros(Bv, self.n_padded, dtype=torch.bool, device=device)
        ok[:, self.pad_front:self.pad_front + self.nk] = True if valid is None else valid
        return ok

    def regular_blocks(self, ok: Tensor) -> Tensor:
        """(nb,) bool: every key of the block's window is real, for (1, n_padded) ``ok``."""
        cum = F.pad(ok.to(torch.int32).cumsum(-1), (1, 0))[0]  # (n_padded + 1,)
        start = self.s0 + torch.arange(self.nb, device=ok.device) * self.c
        return (cum[start + self.S] - cum[start]) == self.S

    def band_tile(self, dtype, device) -> Tensor:
        """(1, 1, c, S) additive tile: 0 where row a may see window slot t (a <= t <= a+hi-lo)."""
        a = torch.arange(self.c, device=device)[:, None]
        t = torch.arange(self.S, device=device)[None, :]
        allowed = (t >= a) & (t <= a + (self.hi - self.lo))
        return torch.where(allowed, 0.0, float("-inf")).to(dtype)[None, None]

    def windows(self, x: Tensor, b0: int, b1: int) -> Tensor:
        """Overlapping strided view (h, b1-b0, S, D) of padded keys x (h, n_padded, D): no copy."""
        h, _, D = x.shape
        return x.as_strided((h, b1 - b0, self.S, D), (x.stride(0), self.c * D, D, 1),
                            x.storage_offset() + (self.s0 + b0 * self.c) * D)

    def runs(self, regular: Tensor, heads: int, max_elements: int):
        """Consecutive blocks of equal regularity, cut so that heads*n*c*S <= max_elements:
        yields (b0, b1, is_regular)."""
        per_call = max(1, max_elements // (heads * self.c * self.S))
        flags = regular.tolist()
        b0 = 0
        while b0 < self.nb:
            b1 = b0 + 1
            while b1 < self.nb and flags[b1] == flags[b0] and b1 - b0 < per_call:
                b1 += 1
            yield b0, b1, flags[b0]
            b0 = b1


def _piece_tile(geo: BandGeometry, band: Tensor, ok_b: Tensor, b0: int, b1: int, regular: bool) -> Tensor:
    """The additive tile of blocks b0..b1: the shared band tile, plus -inf at unreal keys for
    irregular blocks -> (1, 1 or n, c, S)."""
    if regular:
        return band
    ok_win = ok_b.as_strided((b1 - b0, geo.S), (geo.c, 1), ok_b.storage_offset() + geo.s0 + b0 * geo.c)
    return band + torch.where(ok_win, 0.0, float("-inf")).to(band.dtype)[None, :, None, :]  # (1, n, c, S)


def _band_forward(q, k, v, valid, geo: BandGeometry, scale: float, fused: bool) -> tuple[Tensor, Tensor]:
    """out (B, h, nq, Dv), lse (B, h, nq) in the compute dtype for q (B, h, nq, D), k/v (B, h, nk, .)."""
    ct = compute_dtype(q.dtype)
    B, h = q.shape[:2]
    c, Dv = geo.c, v.shape[-1]
    qp, kp, vp = geo.pad_rows(q), geo.pad_keys(k), geo.pad_keys(v)
    ok = geo.key_ok(valid, valid.shape[0] if valid is not None else 1, q.device)
    band = geo.band_tile(ct, q.device)
    out = q.new_zeros(B, h, geo.nb * c, Dv, dtype=ct)
    lse = q.new_full((B, h, geo.nb * c), float("-inf"), dtype=ct)
    for b in range(B):
        ok_b = ok[b if ok.shape[0] > 1 else 0]
        q_blocks = qp[b].view(h, geo.nb, c, -1)  # (h, nb, c, D)
        for b0, b1, regular in geo.runs(geo.regular_blocks(ok_b[None]), h, PIECE_ELEMENTS):
            tile = _piece_tile(geo, band, ok_b, b0, b1, regular)
            args = (q_blocks[:, b0:b1], geo.windows(kp[b], b0, b1), geo.windows(vp[b], b0, b1))
            o, l = (fused_tile if fused else math_tile)(*args, tile, scale)  # (h, n, c, Dv), (h, n, c)
            out[b, :, b0 * c:b1 * c] = o.reshape(h, -1, Dv)
            lse[b, :, b0 * c:b1 * c] = l.reshape(h, -1)
    return out[:, :, :geo.nq], lse[:, :, :geo.nq]


def _fold(acc: Tensor, win: Tensor, geo: BandGeometry, b0: int) -> None:
    """Overlap-add window gradients win (h, n, S, D) into padded keys acc (h, n_padded, D)."""
    h, n, S, D = win.shape
    m, c = S // geo.c, geo.c
    blocks = acc.view(h, -1, c, D)  # (h, n_padded / c, c, D)
    first = geo.s0 // c + b0
    win = win.view(h, n, m, c, D)
    for tau in range(m):
        blocks[:, first + tau:first + tau + n] += win[:, :, tau]


def _band_backward(dout, q, k, v, out, lse_bwd, delta, valid, geo: BandGeometry, scale: float,
                   fused: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dq (B, h, nq, D), dk (B, h, nk, D), dv (B, h, nk, Dv) of the band, in the compute dtype."""
    ct = compute_dtype(q.dtype)
    B, h = q.shape[:2]
    c, D, Dv = geo.c, q.shape[-1], v.shape[-1]
    qp, kp, vp = geo.pad_rows(q), geo.pad_keys(k), geo.pad_keys(v)
    dop, op = geo.pad_rows(dout), geo.pad_rows(out)
    lsep = F.pad(lse_bwd, (0, geo.nb * c - geo.nq), value=float("inf"))  # padded rows: P = 0
    deltap = F.pad(delta, (0, geo.nb * c - geo.nq))
    ok = geo.key_ok(valid, valid.shape[0] if valid is not None else 1, q.device)
    band = geo.band_tile(ct, q.device)
    dq = torch.zeros(B, h, geo.nb * c, D, dtype=ct, device=q.device)
    dk = torch.zeros(B, h, geo.n_padded, D, dtype=ct, device=q.device)
    dv = torch.zeros(B, h, geo.n_padded, Dv, dtype=ct, device=q.device)
    for b in range(B):
        ok_b = ok[b if ok.shape[0] > 1 else 0]
        blocks = lambda x: x[b].view(h, geo.nb, c, *x.shape[3:])  # noqa: E731  (h, nb, c, ...)
        for b0, b1, regular in geo.runs(geo.regular_blocks(ok_b[None]), h, PIECE_ELEMENTS):
            tile = _piece_tile(geo, band, ok_b, b0, b1, regular)
            sl = slice(b0, b1)
            args = (blocks(dop)[:, sl], blocks(qp)[:, sl], geo.windows(kp[b], b0, b1),
                    geo.windows(vp[b], b0, b1), blocks(op)[:, sl], lsep[b].view(h, geo.nb, c)[:, sl],
                    deltap[b].view(h, geo.nb, c)[:, sl], tile, scale)
            g_q, g_k, g_v = (fused_tile_backward if fused else math_tile_backward)(*args)
            dq[b, :, b0 * c:b1 * c] = g_q.reshape(h, -1, D)
            _fold(dk[b], g_k.to(ct), geo, b0)
            _fold(dv[b], g_v.to(ct), geo, b0)
    keys = slice(geo.pad_front, geo.pad_front + geo.nk)
    return dq[:, :, :geo.nq], dk[:, :, keys], dv[:, :, keys]


# -- dilation: residue classes and head groups -------------------------------------------------

@dataclass(frozen=True)
class Residue:
    """Queries ``rows`` and keys ``keys`` (strided slices) whose positions share one residue mod
    the dilation; inside the class, sub-row i sees sub-keys ``i + lo .. i + hi``."""

    rows: slice
    keys: slice
    lo: int
    hi: int


def _residue_classes(Nq: int, Nk: int, left: int, right: int, d: int) -> list[Residue]:
    """Query row i sits at position p = i + Nk - Nq and sees keys p + d*t, -left <= t <= right:
    only keys j = p (mod d). Class rho holds rows with p = rho (mod d) and keys rho, rho+d, ..."""
    off = Nk - Nq
    classes = []
    for rho in range(min(d, Nk)):
        i0 = (rho - off) % d  # first row whose position is rho mod d
        if i0 >= Nq:
            continue
        m0 = (i0 + off - rho) // d  # sub-key index of sub-row 0's own position
        classes.append(Residue(slice(i0, None, d), slice(rho, None, d), m0 - left, m0 + right))
    return classes


def _geometry(nq: int, nk: int, lo: int, hi: int) -> BandGeometry | None:
    """The band's geometry with the window clipped to the keys that exist (None: it sees none)."""
    lo, hi = max(lo, -(nq - 1)), min(hi, nk - 1)
    return None if lo > hi or nq == 0 or nk == 0 else BandGeometry(nq, nk, lo, hi, block_size(lo, hi))


def _head_groups(dilations: list[int]) -> list[tuple[int, Tensor | slice]]:
    """Heads sharing a dilation: [(d, heads)], heads a slice when it is all of them."""
    if len(set(dilations)) == 1:
        return [(dilations[0], slice(None))]
    return [(d, torch.tensor([h for h, x in enumerate(dilations) if x == d])) for d in sorted(set(dilations))]


def _subproblems(pattern: Pattern, Nq: int, Nk: int, H: int):
    """Every (heads, residue class, geometry) the band splits into."""
    w = pattern.window
    for d, heads in _head_groups(pattern.dilations(H)):
        for r in _residue_classes(Nq, Nk, w.left, w.right, d):
            geo = _geometry(len(range(Nq)[r.rows]), len(range(Nk)[r.keys]), r.lo, r.hi)
            if geo is not None:
                yield heads, r, geo


def _band_all(q, k, v, valid, pattern: Pattern, scale: float, fused: bool) -> tuple[Tensor, Tensor]:
    """The band partial of every head: out (B, H, Nq, Dv), lse (B, H, Nq), compute dtype."""
    B, H, Nq, _ = q.shape
    ct = compute_dtype(q.dtype)
    out = q.new_zeros(B, H, Nq, v.shape[-1], dtype=ct)
    lse = q.new_full((B, H, Nq), float("-inf"), dtype=ct)
    for heads, r, geo in _subproblems(pattern, Nq, k.shape[2], H):
        sub_valid = None if valid is None else valid[:, r.keys]
        o, l = _band_forward(q[:, heads, r.rows], k[:, heads, r.keys], v[:, heads, r.keys], sub_valid,
                             geo, scale, fused)
        out[:, heads, r.rows], lse[:, heads, r.rows] = o, l
    return out, lse


def _band_all_backward(dout, q, k, v, out, lse_bwd, delta, valid, pattern: Pattern, scale: float,
                       fused: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (compute dtype) of the band part, every head."""
    ct = compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=q.device)
    dv = torch.zeros(v.shape, dtype=ct, device=q.device)
    for heads, r, geo in _subproblems(pattern, q.shape[2], k.shape[2], q.shape[1]):
        rows = lambda x: x[:, heads, r.rows]  # noqa: E731
        keys = lambda x: x[:, heads, r.keys]  # noqa: E731
        sub_valid = None if valid is None else valid[:, r.keys]
        g_q, g_k, g_v = _band_backward(rows(dout), rows(q), keys(k), keys(v), rows(out), rows(lse_bwd),
                                       rows(delta), sub_valid, geo, scale, fused)
        dq[:, heads, r.rows] += g_q
        dk[:, heads, r.keys] += g_k
        dv[:, heads, r.keys] += g_v
    return dq, dk, dv


# -- global rows and columns -------------------------------------------------------------------

@dataclass(frozen=True)
class GlobalPart:
    """Batch element b's global key columns and global query rows, with their additive tiles."""

    b: int
    cols: Tensor  # (G,) global key indices
    col_tile: Tensor | None  # (1 or H, Nq, G): -inf where the key is in the query's window or padding
    rows: Tensor  # (R,) query rows at global positions
    row_tile: Tensor | None  # (1, 1, 1, Nk): -inf at padding keys, or None


def _global_parts(pattern: Pattern, valid: Tensor | None, B: int, Nq: int, Nk: int, dtype, device):
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


def _merge_globals(out, lse, q, k, v, parts: list[GlobalPart], scale: float, fused: bool) -> None:
    """In place: merge the global columns into the band result, then replace the global rows."""
    for p in parts:
        qb, kb, vb = q[p.b], k[p.b], v[p.b]  # (H, N, D)
        tile_kernel = fused_tile if fused else math_tile
        if p.cols.numel():
            o, l = tile_kernel(qb[None], kb[:, p.cols][None], vb[:, p.cols][None], p.col_tile[None], scale)
            lse[p.b] = merge_into(out[p.b], lse[p.b], o[0], l[0])  # o (1, H, Nq, Dv)
        if p.rows.numel():
            o, l = tile_kernel(qb[:, p.rows][None], kb[None], vb[None], p.row_tile, scale)
            out[p.b][:, p.rows], lse[p.b][:, p.rows] = o[0], l[0]


def _globals_backward(dq, dk, dv, dout, dout_loc, q, k, v, out, lse_bwd, delta, delta_loc,
                      parts: list[GlobalPart], scale: float, fused: bool) -> None:
    """In place: add the global columns' and rows' shares to dq, dk, dv."""
    for p in parts:
        qb, kb, vb = q[p.b], k[p.b], v[p.b]
        tile_backward = fused_tile_backward if fused else math_tile_backward
        if p.cols.numel():
            at_b = lambda x: x[p.b][None]  # noqa: E731  (1, H, Nq, ...)
            g_q, g_k, g_v = tile_backward(at_b(dout_loc), qb[None], kb[:, p.cols][None], vb[:, p.cols][None],
                                          at_b(out), at_b(lse_bwd), at_b(delta_loc), p.col_tile[None], scale)
            dq[p.b] += g_q[0]
            dk[p.b][:, p.cols] += g_k[0]
            dv[p.b][:, p.cols] += g_v[0]
        if p.rows.numel():
            r = p.rows
            sel = lambda x: x[p.b][:, r][None]  # noqa: E731  (1, H, R, ...)
            g_q, g_k, g_v = tile_backward(
                sel(dout), sel(q), kb[None], vb[None], sel(out), sel(lse_bwd), sel(delta), p.row_tile, scale)
            dq[p.b][:, r] += g_q[0]
            dk[p.b] += g_k[0]
            dv[p.b] += g_v[0]


def _global_row_flags(parts: list[GlobalPart], B: int, Nq: int, device) -> Tensor:
    """(B, 1, Nq) bool: query rows at global positions."""
    flags = torch.zeros(B, 1, Nq, dtype=torch.bool, device=device)
    for p in parts:
        flags[p.b, 0, p.rows] = True
    return flags


# -- autograd and the entry point --------------------------------------------------------------

class _BandedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, fused):
        Hkv = k.shape[1]
        ke, ve = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
        B, _, Nq, _ = q.shape
        valid = pattern.key_valid(ke.shape[2], q.device)
        parts = _global_parts(pattern, valid, B, Nq, ke.shape[2], compute_dtype(q.dtype), q.device)
        out, lse = _band_all(q, ke, ve, valid, pattern, scale, fused)
        _merge_globals(out, lse, q, ke, ve, parts, scale, fused)
        out_q = out.to(q.dtype)
        ctx.save_for_backward(q, ke, ve, out_q, lse)
        ctx.cfg = (pattern, scale, fused, Hkv, valid, parts)
        ctx.set_materialize_grads(False)
        return out_q, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        pattern, scale, fused, Hkv, valid, parts = ctx.cfg
        ct = compute_dtype(q.dtype)
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        delta = (dout.to(ct) * out.to(ct)).sum(-1)  # (B, H, Nq): rowsum(dout * out)
        if dlse is not None:
            delta = delta - dlse.to(ct)  # d lse / d s = P folds into the row term
            fused = False  # the fused backward computes its own rowsum and cannot take dlse
        lse_bwd = lse_for_recompute(lse)
        global_rows = _global_row_flags(parts, q.shape[0], q.shape[2], q.device)  # (B, 1, Nq)
        dout_loc = dout.masked_fill(global_rows[..., None], 0.0)  # global rows: only the rows part
        delta_loc = delta.masked_fill(global_rows, 0.0)
        dq, dk, dv = _band_all_backward(dout_loc, q, k, v, out, lse_bwd, delta_loc, valid, pattern, scale, fused)
        _globals_backward(dq, dk, dv, dout, dout_loc, q, k, v, out, lse_bwd, delta, delta_loc, parts, scale, fused)
        dk, dv = reduce_kv_grad(dk, Hkv), reduce_kv_grad(dv, Hkv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def why_not(mask, bias, dropout_p: float) -> str | None:
    """None if banded can run the call, else the reason it cannot."""
    if dropout_p > 0:
        return f"dropout_p={dropout_p}: banded does not implement dropout (use impl='sdpa' or 'reference')"
    if bias is not None:
        return f"bias {bias!r}: banded takes no additive bias (use impl='tiled')"
    parsed = parse(mask)
    return parsed if isinstance(parsed, str) else None


def banded_attention(q: Tensor, k: Tensor, v: Tensor, *, mask, scale: float,
                     kernel: str = "auto") -> tuple[Tensor, Tensor]:
    """Exact Longformer attention in O(N·W + N·G) memory and time.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), mask of the family in ``pattern.py``
    -> out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32 (float64 for float64 inputs).
    ``kernel``: "auto" (torch's CPU flash kernel where it applies, else math), "fused" or "math".
    """
    pattern = parse(mask)
    if isinstance(pattern, str):
        raise ValueError(f"banded cannot run mask {mask!r}: {pattern}")
    if kernel not in ("auto", "fused", "math"):
        raise ValueError(f"banded kernel={kernel!r}: choose 'auto', 'fused' or 'math'")
    fused = fused_available(q, v) if kernel == "auto" else kernel == "fused"
    if fused and not fused_available(q, v):
        raise ValueError(f"banded kernel='fused' needs CPU tensors with Dv == D, got device {q.device}, "
                         f"D={q.shape[-1]}, Dv={v.shape[-1]}; use kernel='math'")
    return _BandedFunction.apply(q, k, v, pattern, scale, fused)
