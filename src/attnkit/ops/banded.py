"""Longformer attention (Beltagy et al. 2020) exactly, in O(N·W + N·G) time and memory.

The masks it runs are ``window [| global_tokens(g)] [& key_padding(...)]`` where ``window`` is
``sliding_window(left, right, dilation=d)``, optionally ``& causal()`` (see ``pattern.py``).
Every allowed (query, key) pair is computed exactly once, in one of three parts:

- **band**: query row i against the keys of its window (global keys in the window included);
- **global columns**: every query against the G global keys *outside* its window;
- **global rows**: the queries sitting at global positions against all N keys; their result
  replaces the other two.

Band and columns are partials ``(out, lse)`` over disjoint keys, combined by ``merge.merge``.
The two global parts live in ``banded_globals.py``.

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

**Softcap and dropout** run every part on the math tile kernel (torch's fused one has neither;
``tiles.py`` has the algebra). Dropout's keep bits are those of ``ops/dropout.py`` at each pair's
*original* coordinates, so every allowed pair keeps exactly the bit the reference gives it: in the
band, row a of block b of a residue class is query row ``i0 + d * (b*c + a)`` and window slot t is
key ``rho + d * (b*c + lo + t)`` (``Origin``), and head h of batch b draws with the word
``b * Hq + h`` (h the query head, GQA already expanded); the global columns and rows draw theirs
for their query rows and global keys directly. The backward draws the same multipliers again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dropout as _dropout
from .banded_globals import (NO_EXTRAS, Extras, global_parts, global_row_flags, globals_backward,
                             merge_globals)
from .merge import lse_for_recompute
from .pattern import Pattern, parse
from .precision import compute_dtype, expand_kv, reduce_kv_grad, unit_stride
from .tiles import fused_tile, fused_tile_backward, math_tile, math_tile_backward, upcast_for_partials, use_fused

PIECE_ELEMENTS = 1 << 22  # heads x blocks x c x S per kernel call: bounds the window-gradient buffers
# (2026-11-23, N=16384, H=12, fwd+bwd: 2^24 -> 2.73 s, 403 MB extra; 2^22 -> 1.96 s, 242 MB; 2^20 -> 2.09 s)


@dataclass(frozen=True)
class Origin:
    """Where a band subproblem sits in the call: its query heads (h,) and residue class (sub-row
    i is query row ``row0 + d * i``, sub-key j is key ``key0 + d * j``)."""

    heads: Tensor
    row0: int = 0
    key0: int = 0
    d: int = 1


def block_size(lo: int, hi: int) -> int:
    """Rows per query block: about an eighth of the window span, within 16..64.

    Smaller blocks waste fewer keys (each block reads c - 1 keys beyond any one row's window);
    bigger ones feed the kernel larger matrices. 64 measured best for a 513-key window on the
    2-core CPU (2026-11-23, torch's CPU flash kernel alone, N=16384, H=12: 379 ms against 404
    for c=32, 490 for 128, 487 for 256).
    """
    c = 16
    while c < 64 and c * 8 < hi - lo + 1:
        c *= 2
    return c


@dataclass(frozen=True)
class BandGeometry:
    """Row i sees keys i+lo .. i+hi; block b (rows b*c ..) reads the key window [b*c+lo, b*c+lo+S)."""

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

    def window_range(self, b0: int, b1: int) -> tuple[int, int]:
        """Keys [a, e) the windows of blocks b0..b1-1 cover (may reach outside [0, nk))."""
        return b0 * self.c + self.lo, (b1 - 1) * self.c + self.lo + self.S

    def pad_rows(self, x: Tensor, value: float = 0.0) -> Tensor:
        """(..., nq, ...) rows -> nb*c rows, padded at the end (their results are dropped); no copy
        when nq is a multiple of c. ``x`` is (B, h, nq, D) or (B, h, nq)."""
        extra = self.nb * self.c - self.nq
        if extra == 0:
            return x
        return F.pad(x, (0, 0, 0, extra) if x.dim() == 4 else (0, extra), value=value)

    def regular_blocks(self, valid_b: Tensor | None, device) -> Tensor:
        """(nb,) bool: the block's whole window is inside the sequence and holds no padding."""
        start = torch.arange(self.nb, device=device) * self.c + self.lo
        end = start + self.S
        inside = (start >= 0) & (end <= self.nk)
        if valid_b is None:
            return inside
        cum = F.pad(valid_b.to(torch.int32).cumsum(0), (1, 0))  # (nk + 1,)
        return inside & ((cum[end.clamp(0, self.nk)] - cum[start.clamp(0, self.nk)]) == self.S)

    def band_tile(self, dtype, device) -> Tensor:
        """(1, 1, c, S) additive tile: 0 where row a may see window slot t (a <= t <= a+hi-lo)."""
        a = torch.arange(self.c, device=device)[:, None]
        t = torch.arange(self.S, device=device)[None, :]
        allowed = (t >= a) & (t <= a + (self.hi - self.lo))
        return torch.where(allowed, 0.0, float("-inf")).to(dtype)[None, None]

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


def _padded_range(x: Tensor, a: int, e: int, nk: int, value=0) -> Tensor:
    """Rows [a, e) of x (h, nk, ...) or (nk,), zero (``value``) outside [0, nk): a new tensor."""
    lo_k, hi_k = min(max(a, 0), nk), min(max(e, 0), nk)
    front, back = lo_k - a, e - a - (lo_k - a) - (hi_k - lo_k)
    if x.dim() == 1:
        return F.pad(x[lo_k:hi_k], (front, back), value=value)
    return F.pad(x[:, lo_k:hi_k], (0, 0, front, back)).contiguous()


def _windows(x: Tensor, geo: BandGeometry, b0: int, b1: int) -> Tensor:
    """Key windows (h, b1-b0, S, D) of blocks b0..b1 from keys x (h, nk, D) with rows contiguous:
    an overlapping strided view of x itself when the windows lie inside the sequence, else of a
    zero-padded copy of just their range."""
    a, e = geo.window_range(b0, b1)
    if a < 0 or e > geo.nk:
        x, a = _padded_range(x, a, e, geo.nk), 0
    h, _, D = x.shape
    return x.as_strided((h, b1 - b0, geo.S, D), (x.stride(0), geo.c * D, D, 1), x.storage_offset() + a * D)


def _piece_tile(geo: BandGeometry, band: Tensor, valid_b: Tensor | None, b0: int, b1: int,
                regular: bool) -> Tensor:
    """The additive tile of blocks b0..b1: the shared band tile, plus -inf at keys outside the
    sequence or padding for irregular blocks -> (1, 1 or n, c, S)."""
    if regular:
        return band
    a, e = geo.window_range(b0, b1)
    real = torch.ones(geo.nk, dtype=torch.bool, device=band.device) if valid_b is None else valid_b
    ok = _padded_range(real, a, e, geo.nk, value=False)  # (e - a,)
    ok_win = ok.as_strided((b1 - b0, geo.S), (geo.c, 1))  # (n, S)
    return band + torch.where(ok_win, 0.0, float("-inf")).to(band.dtype)[None, :, None, :]  # (1, n, c, S)


def _rows_contiguous(x: Tensor) -> Tensor:
    """(B, h, n, D) with each row's D values adjacent and rows D apart (what _windows views)."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


def _valid_at(valid: Tensor | None, b: int) -> Tensor | None:
    return None if valid is None else valid[b if valid.shape[0] > 1 else 0]


def _band_multiplier(ex: Extras, origin: Origin, geo: BandGeometry, b: int, b0: int, b1: int,
                     dtype, device) -> Tensor | None:
    """(h, n, c, S) dropout multiplier of blocks b0..b1 of batch b: row a of block blk is sub-row
    blk*c + a, window slot t sub-key blk*c + lo + t, mapped to the call's rows and keys."""
    if ex.dropout_p == 0:
        return None
    c, n = geo.c, b1 - b0
    sub_rows = torch.arange(b0 * c, b1 * c, device=device).view(n, c, 1)
    starts = torch.arange(b0, b1, device=device) * c + geo.lo
    sub_keys = starts.view(n, 1, 1) + torch.arange(geo.S, device=device).view(1, 1, geo.S)
    rows, cols = origin.row0 + origin.d * sub_rows, origin.key0 + origin.d * sub_keys
    return ex.multiplier(b, origin.heads, rows, cols, dtype)


def _band_forward(q, k, v, valid, geo: BandGeometry, scale: float, fused: bool, out: Tensor, lse: Tensor,
                  ex: Extras = NO_EXTRAS, origin: Origin | None = None) -> None:
    """Write the band partial of q (B, h, nq, D), k/v (B, h, nk, D/Dv) into out (B, h, nq, Dv) and
    lse (B, h, nq) (which may be views of bigger tensors); ``origin`` places dropout's bits."""
    B, h, _, D = q.shape
    c, Dv = geo.c, v.shape[-1]
    qp, k, v = geo.pad_rows(q), _rows_contiguous(k), _rows_contiguous(v)
    band = geo.band_tile(lse.dtype, q.device)
    for b in range(B):
        valid_b = _valid_at(valid, b)
        q_blocks = qp[b].reshape(h, geo.nb, c, D)
        for b0, b1, regular in geo.runs(geo.regular_blocks(valid_b, q.device), h, PIECE_ELEMENTS):
            tile = _piece_tile(geo, band, valid_b, b0, b1, regular)
            args = (q_blocks[:, b0:b1], _windows(k[b], geo, b0, b1), _windows(v[b], geo, b0, b1))
            if fused:
                o, l = fused_tile(*args, tile, scale)  # (h, n, c, Dv), (h, n, c)
            else:
                drop = _band_multiplier(ex, origin, geo, b, b0, b1, lse.dtype, q.device)
                o, l = math_tile(*args, tile, scale, ex.softcap, drop)
            r0, r1 = b0 * c, min(b1 * c, geo.nq)
            out[b, :, r0:r1] = o.reshape(h, -1, Dv)[:, :r1 - r0]
            lse[b, :, r0:r1] = l.reshape(h, -1)[:, :r1 - r0]


def _fold(acc: Tensor, win: Tensor, geo: BandGeometry, b0: int, b1: int) -> None:
    """Overlap-add window gradients win (h, n, S, D) of blocks b0..b1 into keys acc (h, nk, D)."""
    h, n, S, D = win.shape
    m, c = S // geo.c, geo.c
    a, e = geo.window_range(b0, b1)
    local = acc.new_zeros(h, n - 1 + m, c, D)  # keys [a, e) in blocks of c
    win = win.view(h, n, m, c, D)
    for tau in range(m):  # window slot block tau of block b is key block b + tau
        local[:, tau:tau + n] += win[:, :, tau]
    lo_k, hi_k = min(max(a, 0), geo.nk), min(max(e, 0), geo.nk)
    acc[:, lo_k:hi_k] += local.view(h, -1, D)[:, lo_k - a:hi_k - a]


def _band_backward(dout, q, k, v, out, lse_bwd, delta, valid, geo: BandGeometry, scale: float,
                   fused: bool, dq: Tensor, dk: Tensor, dv: Tensor, ex: Extras = NO_EXTRAS,
                   origin: Origin | None = None) -> None:
    """Add the band's share of the gradients into dq (B, h, nq, D), dk (B, h, nk, D) and
    dv (B, h, nk, Dv) (views allowed), given the final out and lse (FlashAttention-2 backward)."""
    B, h, _, D = q.shape
    c = geo.c
    k, v = _rows_contiguous(k), _rows_contiguous(v)
    dop, qp, op = geo.pad_rows(dout), geo.pad_rows(q), geo.pad_rows(out)
    lsep = geo.pad_rows(lse_bwd, value=float("inf"))  # padded rows: P = exp(s - inf) = 0
    deltap = geo.pad_rows(delta)
    band = geo.band_tile(dq.dtype, q.device)
    for b in range(B):
        valid_b = _valid_at(valid, b)
        blocks = lambda x: x[b].reshape(h, geo.nb, c, *x.shape[3:])  # noqa: E731  (h, nb, c, ...)
        for b0, b1, regular in geo.runs(geo.regular_blocks(valid_b, q.device), h, PIECE_ELEMENTS):
            tile = _piece_tile(geo, band, valid_b, b0, b1, regular)
            sl = slice(b0, b1)
            args = (blocks(dop)[:, sl], blocks(qp)[:, sl], _windows(k[b], geo, b0, b1),
                    _windows(v[b], geo, b0, b1), blocks(op)[:, sl], blocks(lsep)[:, sl],
                    blocks(deltap)[:, sl], tile, scale)
            if fused:
                g_q, g_k, g_v = fused_tile_backward(*args)
            else:
                drop = _band_multiplier(ex, origin, geo, b, b0, b1, dq.dtype, q.device)
                g_q, g_k, g_v = math_tile_backward(*args, ex.softcap, drop)
            r0, r1 = b0 * c, min(b1 * c, geo.nq)
            dq[b, :, r0:r1] += g_q.reshape(h, -1, D)[:, :r1 - r0]
            _fold(dk[b], g_k, geo, b0, b1)
            _fold(dv[b], g_v, geo, b0, b1)


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


def _origin(heads: Tensor | slice, r: Residue, H: int, device) -> Origin:
    """The call's query heads and the residue class's first row / key of a band subproblem."""
    return Origin(torch.arange(H, device=device)[heads], r.rows.start, r.keys.start, r.rows.step or 1)


def _band_all(q, k, v, valid, pattern: Pattern, scale: float, fused: bool,
              ex: Extras = NO_EXTRAS) -> tuple[Tensor, Tensor]:
    """The band partial of every head: out (B, H, Nq, Dv), lse (B, H, Nq), compute dtype."""
    B, H, Nq, _ = q.shape
    ct = compute_dtype(q.dtype)
    out = q.new_zeros(B, H, Nq, v.shape[-1], dtype=ct)
    lse = q.new_full((B, H, Nq), float("-inf"), dtype=ct)
    for heads, r, geo in _subproblems(pattern, Nq, k.shape[2], H):
        sub_valid = None if valid is None else valid[:, r.keys]
        args = (q[:, heads, r.rows], k[:, heads, r.keys], v[:, heads, r.keys], sub_valid, geo, scale, fused)
        extra = (ex, _origin(heads, r, H, q.device))
        if isinstance(heads, slice):  # out[:, heads, r.rows] is a view: write in place
            _band_forward(*args, out[:, heads, r.rows], lse[:, heads, r.rows], *extra)
        else:
            o, l = out[:, heads, r.rows], lse[:, heads, r.rows]  # copies, filled, written back
            _band_forward(*args, o, l, *extra)
            out[:, heads, r.rows], lse[:, heads, r.rows] = o, l
    return out, lse


def _band_all_backward(dout, q, k, v, out, lse_bwd, delta, valid, pattern: Pattern, scale: float,
                       fused: bool, ex: Extras = NO_EXTRAS) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (compute dtype) of the band part, every head."""
    ct = compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=q.device)
    dv = torch.zeros(v.shape, dtype=ct, device=q.device)
    for heads, r, geo in _subproblems(pattern, q.shape[2], k.shape[2], q.shape[1]):
        rows = lambda x: x[:, heads, r.rows]  # noqa: E731
        keys = lambda x: x[:, heads, r.keys]  # noqa: E731
        sub_valid = None if valid is None else valid[:, r.keys]
        args = (rows(dout), rows(q), keys(k), keys(v), rows(out), rows(lse_bwd), rows(delta), sub_valid,
                geo, scale, fused)
        extra = (ex, _origin(heads, r, q.shape[1], q.device))
        if isinstance(heads, slice):  # views: accumulate in place
            _band_backward(*args, rows(dq), keys(dk), keys(dv), *extra)
        else:
            g_q, g_k, g_v = rows(dq), keys(dk), keys(dv)  # copies, accumulated, written back
            _band_backward(*args, g_q, g_k, g_v, *extra)
            dq[:, heads, r.rows], dk[:, heads, r.keys], dv[:, heads, r.keys] = g_q, g_k, g_v
    return dq, dk, dv


# -- autograd and the entry point --------------------------------------------------------------

class _BandedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pattern, scale, fused, ex):
        Hkv = k.shape[1]
        ke, ve = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
        B, _, Nq, _ = q.shape
        valid = pattern.key_valid(ke.shape[2], q.device)
        parts = global_parts(pattern, valid, B, Nq, ke.shape[2], compute_dtype(q.dtype), q.device)
        out, lse = _band_all(q, ke, ve, valid, pattern, scale, fused, ex)
        merge_globals(out, lse, q, ke, ve, parts, scale, fused, ex)
        out_q = out.to(q.dtype)
        ctx.save_for_backward(q, ke, ve, out_q, lse)
        ctx.cfg = (pattern, scale, fused, Hkv, valid, parts, ex)
        ctx.set_materialize_grads(False)
        return out_q, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        pattern, scale, fused, Hkv, valid, parts, ex = ctx.cfg
        ct = compute_dtype(q.dtype)
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        q, k, v, dout, out = upcast_for_partials(fused, ct, q, k, v, dout, out)
        delta = (dout.to(ct) * out.to(ct)).sum(-1)  # (B, H, Nq): rowsum(dout * out)
        if dlse is not None:
            delta = delta - dlse.to(ct)  # d lse / d s = P folds into the row term
            fused = False  # the fused backward computes its own rowsum and cannot take dlse
        lse_bwd = lse_for_recompute(lse)
        global_rows = global_row_flags(parts, q.shape[0], q.shape[2], q.device)  # (B, 1, Nq)
        dout_loc = dout.masked_fill(global_rows[..., None], 0.0)  # global rows: only the rows part
        delta_loc = delta.masked_fill(global_rows, 0.0)
        dq, dk, dv = _band_all_backward(dout_loc, q, k, v, out, lse_bwd, delta_loc, valid, pattern, scale, fused,
                                        ex)
        globals_backward(dq, dk, dv, dout, dout_loc, q, k, v, out, lse_bwd, delta, delta_loc, parts, scale,
                          fused, ex)
        dk, dv = reduce_kv_grad(dk, Hkv), reduce_kv_grad(dv, Hkv)
        dtype = ctx.saved_tensors[0].dtype
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None, None, None, None


def why_not(mask, bias, dropout_p: float, softcap: float | None = None) -> str | None:
    """None if banded can run the call, else the reason it cannot (dropout and softcap it runs)."""
    if bias is not None:
        return f"bias {bias!r}: banded takes no additive bias (use impl='tiled')"
    parsed = parse(mask)
    return parsed if isinstance(parsed, str) else None


def banded_attention(q: Tensor, k: Tensor, v: Tensor, *, mask, scale: float, kernel: str = "auto",
                     softcap: float | None = None, dropout_p: float = 0.0,
                     dropout_seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact Longformer attention in O(N·W + N·G) memory and time.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), mask of the family in ``pattern.py``
    -> out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32 (float64 for float64 inputs).
    ``kernel``: "auto" (torch's CPU flash kernel where it applies, else math), "fused" or "math".
    ``softcap``: scores become ``softcap * tanh(s / softcap)`` (Gemma 2). ``dropout_p``: the
    probabilities are multiplied by the keep mask of ``ops/dropout.py`` for ``dropout_seed`` (one
    is drawn with ``dropout.draw_seed`` when None) over 1 - p; the lse is that before dropout.
    Both run on the math kernel.

    Raises:
        ValueError: a mask outside the family, a bad ``kernel``, or kernel="fused" with softcap /
            dropout or inputs torch's CPU flash kernel cannot take.
    """
    pattern = parse(mask)
    if isinstance(pattern, str):
        raise ValueError(f"banded cannot run mask {mask!r}: {pattern}")
    fused = use_fused("banded", kernel, q, v, softcap, dropout_p)
    if dropout_p > 0 and dropout_seed is None:
        dropout_seed = _dropout.draw_seed()
    ex = Extras(softcap, dropout_p, dropout_seed or 0, q.shape[1])
    if fused:  # torch's CPU flash kernel needs stride(-1) == 1 (k, v are re-laid per block anyway)
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    return _BandedFunction.apply(q, k, v, pattern, scale, fused, ex)
