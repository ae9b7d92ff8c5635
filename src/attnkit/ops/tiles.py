"""Tile kernels shared by the tiled and banded backends: one (query block, key block) -> a partial.

A *tile* here is q (..., r, D) against k/v (..., c, D/Dv) with an optional additive float tile
(broadcastable to (..., r, c)) holding the bias and -inf where the mask forbids. Forward kernels
return the partial ``(out, lse)`` that ``merge.merge`` combines; backward kernels take the
*final* out and lse of the whole row (FlashAttention-2's recompute) and return this tile's share
of dq, dk, dv.

- ``fused``: torch's CPU flash-attention kernel, which returns its log-sum-exp (CPU, Dv == D);
- ``math``: the same arithmetic with plain torch matmuls (any device, any Dv).

Softcap and dropout are the math kernels' only (torch's fused kernel can do neither). With a cap
c the scaled score s is replaced by ``c * tanh(s / c)`` (Gemma 2, sec. 2.2) before the additive
tile. Dropout comes as a multiplier tile ``Z = keep / (1 - p)`` (broadcastable to (..., r, c),
``ops/dropout.py``; the caller draws it for the tile's real (batch, head, row, key) positions and
draws the same one again in the backward). With P the probabilities before dropout
(FlashAttention, Dao et al. 2022, appendix B, with dropout)::

    out = (P * Z) V                    lse = logsumexp of the scores before dropout
    dV = (P * Z)^T dO                  dP = (dO V^T) * Z
    dS = P * (dP - delta)              delta = rowsum(dO * out) - dlse   (as without dropout)
    d s_raw = dS * (1 - tanh(s_raw / c)^2)   with a cap; dQ = d s_raw K scale, dK = d s_raw^T Q scale

A partial over some keys is ``(P_part * Z) V`` normalized by its own row sum, so partials over
disjoint keys still merge exactly (``merge.merge`` is linear in the outs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dropout as _dropout
from .merge import mark_rows_without_keys, softmax_of_scores
from .precision import compute_dtype, unit_stride

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_cpu_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def rows_with_no_key(tile: Tensor | None) -> Tensor | None:
    """(Bm, Hm, r) True where every entry of an additive tile is -inf, or None if no such row."""
    if tile is None:
        return None
    dead = torch.isneginf(tile).all(-1)
    return dead if bool(dead.any()) else None


def fused_tile(q: Tensor, k: Tensor, v: Tensor, tile: Tensor | None, scale: float,
               is_causal: bool = False) -> tuple[Tensor, Tensor]:
    """torch's CPU flash kernel on one span. q (B, H, r, D), k/v (B, H, c, D/Dv) expanded heads."""
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)  # a no-op when the caller did it once
    tile = None if tile is None else unit_stride(tile)
    out, lse = _cpu_flash(q, k, v, 0.0, is_causal, attn_mask=tile, scale=scale)  # (B,H,r,Dv), (B,H,r)
    return mark_rows_without_keys(out.to(lse.dtype), lse, rows_with_no_key(tile))


def capped_scores(q: Tensor, k: Tensor, scale: float, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """(s, t): s = q k^T scale (B, H, r, c), capped to ``softcap * t`` with t = tanh(s / softcap)
    when a cap is given (t is what the backward needs; None without a cap)."""
    s = q @ k.transpose(-1, -2) * scale  # (B, H, r, c)
    if softcap is None:
        return s, None
    t = torch.tanh(s / softcap)
    return t * softcap, t


def math_tile(q: Tensor, k: Tensor, v: Tensor, tile: Tensor | None, scale: float,
              softcap: float | None = None, drop: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The same result with plain torch ops (any device); tile already sliced to this chunk.

    ``softcap`` caps the scores; ``drop`` (broadcastable to (B, H, r, c), compute dtype) is the
    dropout multiplier keep / (1 - p) of this tile. The lse is that of the undropped scores.
    """
    ct = compute_dtype(q.dtype)
    s, _ = capped_scores(q.to(ct), k.to(ct), scale, softcap)  # (B, H, r, c)
    if tile is not None:
        s = s + tile
    p, lse = softmax_of_scores(s)  # (B, H, r, c), (B, H, r)
    if drop is not None:
        p = p * drop
    return p @ v.to(ct), lse  # (B, H, r, Dv)


def fused_tile_backward(dout, q, k, v, out, lse, delta, tile, scale, is_causal=False):
    """torch's CPU flash backward on one (q block, span), given the final out and lse.

    The kernel recomputes delta = rowsum(dout * out) itself from the final out it is given.
    """
    q, k, v, out = unit_stride(q), unit_stride(k), unit_stride(v), unit_stride(out)
    tile = None if tile is None else unit_stride(tile)
    return _cpu_flash_backward(dout.contiguous(), q, k, v, out, lse.contiguous(), 0.0, is_causal,
                               attn_mask=tile, scale=scale)


def math_tile_backward(dout, q, k, v, out, lse, delta, tile, scale, softcap=None, drop=None):
    """P = exp(S - lse); dV = (P Z)^T dO; dS = P (Z dO V^T - delta), times 1 - tanh^2 under a
    cap; dQ = dS K s; dK = dS^T Q s (module docstring). ``drop`` is the forward's multiplier Z."""
    ct = compute_dtype(q.dtype)
    q, k, v, dout = q.to(ct), k.to(ct), v.to(ct), dout.to(ct)
    s, t = capped_scores(q, k, scale, softcap)  # (B, H, r, c)
    if tile is not None:
        s = s + tile
    p = torch.exp(s - lse.unsqueeze(-1))  # (B, H, r, c); 0 where masked or the row is empty
    dp = dout @ v.transpose(-1, -2)  # (B, H, r, c)
    p_kept = p
    if drop is not None:
        dp, p_kept = dp * drop, p * drop
    ds = p * (dp - delta.unsqueeze(-1))  # (B, H, r, c)
    if t is not None:
        ds = ds * (1 - t * t)  # d(c tanh(s / c)) / ds
    return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p_kept.transpose(-1, -2) @ dout


DROP_CHUNK_ELEMENTS = 1 << 20  # multiplier entries drawn per Philox call: bounds its int64 temporaries


def _words(seed: int, bh: Tensor, rows: Tensor, cols: Tensor, shape: torch.Size) -> Tensor:
    """``dropout.random_words`` (the Philox word of each (bh, row, col)) of the broadcast
    ``shape``, with one Philox call per group of 4 neighbouring keys instead of one per key when
    the keys run along the last dimension (a tile's keys, a window's slots): the words of groups
    base .. base + G - 1 are drawn for each row and the keys pick theirs out (same words, 2-4x
    fewer Philox calls). Falls back to ``random_words`` when that saves less than half."""
    cols = cols.to(torch.int64)
    group = cols >> 2
    base = group.amin(-1, keepdim=True)  # (..., 1)
    G = int((group - base).max()) + 1 if cols.numel() else 0
    if bh.shape[-1] != 1 or rows.shape[-1] != 1 or 2 * G > cols.shape[-1]:
        return _dropout.random_words(seed, bh, rows, cols).expand(shape)
    groups = base + torch.arange(G, device=cols.device)  # (..., G)
    zero = torch.zeros((), dtype=torch.int64, device=cols.device)
    words = torch.stack(_dropout.philox4x32(groups, rows, bh, zero, seed), -1).flatten(-2)  # (..., 4G)
    return words.expand(*shape[:-1], 4 * G).gather(-1, (cols - 4 * base).expand(shape))


def dropout_tile(seed: int, p: float, bh: Tensor, rows: Tensor, cols: Tensor, dtype: torch.dtype,
                 max_elements: int | None = None) -> Tensor:
    """``dropout.dropout_multiplier`` (keep / (1 - p) in ``dtype``, the broadcast shape of the
    int tensors bh, rows, cols), drawn in pieces of at most ``max_elements`` entries: Philox in
    torch int64 ops holds a dozen full-size int64 temporaries, which a whole (B, H, r, c) tile of
    a big query block would make gigabytes (``max_elements`` None: DROP_CHUNK_ELEMENTS)."""
    max_elements = DROP_CHUNK_ELEMENTS if max_elements is None else max_elements
    shape = torch.broadcast_shapes(bh.shape, rows.shape, cols.shape)
    numel = shape.numel()
    if numel <= max_elements:
        keep = _words(seed, bh, rows, cols, shape) >= _dropout.threshold(p)
        return keep.to(dtype) * (1.0 / (1.0 - p))
    bh, rows, cols = (t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape)) for t in (bh, rows, cols))
    dim = next(i for i, n in enumerate(shape) if n > 1)  # split the outermost dimension that varies
    step = max(1, shape[dim] * max_elements // numel)
    out = torch.empty(shape, dtype=dtype, device=cols.device)
    for i0 in range(0, shape[dim], step):
        n = min(step, shape[dim] - i0)
        part = [t.narrow(dim, i0, n) if t.shape[dim] > 1 else t for t in (bh, rows, cols)]
        out.narrow(dim, i0, n).copy_(dropout_tile(seed, p, *part, dtype, max_elements))
    return out


def upcast_for_partials(fused: bool, ct: torch.dtype, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The backward's inputs in the compute dtype when the fused kernel runs them.

    torch's CPU flash backward returns each call's dq, dk, dv in its input dtype: with half inputs
    every (query block, key span) partial would be rounded to fp16/bf16 before the partials are
    summed, an error the plain formula does not make (FlashAttention's test bound, 3x the naive
    error, failed on dk at 3.3x for Nq=1024, Nk=1023, bf16). In float32 the partials are summed
    in float32 and rounded once. The math kernel computes in float32 already.
    """
    if not fused or all(t.dtype == ct for t in tensors):
        return tensors
    return tuple(t.to(ct) for t in tensors)


def fused_available(q: Tensor, v: Tensor) -> bool:
    """The fused tile kernel is torch's CPU flash attention: CPU tensors with Dv == D only."""
    return q.device.type == "cpu" and q.shape[-1] == v.shape[-1]


def use_fused(backend: str, kernel: str, q: Tensor, v: Tensor, softcap: float | None = None,
              dropout_p: float = 0.0) -> bool:
    """Resolve a backend's ``kernel`` argument ("auto", "fused" or "math") for these inputs.

    Softcap and dropout run on the math kernel only ("auto" picks it).

    Raises:
        ValueError: an unknown ``kernel``; "fused" where torch's kernel cannot run the call.
    """
    if kernel not in ("auto", "fused", "math"):
        raise ValueError(f"{backend} kernel={kernel!r}: choose 'auto', 'fused' or 'math'")
    if kernel == "fused" and not fused_available(q, v):
        raise ValueError(f"{backend} kernel='fused' needs CPU tensors with Dv == D, got device {q.device}, "
                         f"D={q.shape[-1]}, Dv={v.shape[-1]}; use kernel='math'")
    if kernel == "fused" and (softcap is not None or dropout_p > 0):
        raise ValueError(f"{backend} kernel='fused' cannot apply softcap={softcap} / dropout_p={dropout_p}: "
                         "torch's CPU flash kernel has neither; use kernel='math' or 'auto'")
    if softcap is not None or dropout_p > 0:
        return False
    return fused_available(q, v) if kernel == "auto" else kernel == "fused"
