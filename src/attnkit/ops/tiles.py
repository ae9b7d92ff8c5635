"""Tile kernels shared by the tiled and banded backends: one (query block, key block) -> a partial.

A *tile* here is q (..., r, D) against k/v (..., c, D/Dv) with an optional additive float tile
(broadcastable to (..., r, c)) holding the bias and -inf where the mask forbids. Forward kernels
return the partial ``(out, lse)`` that ``merge.merge`` combines; backward kernels take the
*final* out and lse of the whole row (FlashAttention-2's recompute) and return this tile's share
of dq, dk, dv.

- ``fused``: torch's CPU flash-attention kernel, which returns its log-sum-exp (CPU, Dv == D);
- ``math``: the same arithmetic with plain torch matmuls (any device, any Dv).
"""

from __future__ import annotations

import torch
from torch import Tensor

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


def math_tile(q: Tensor, k: Tensor, v: Tensor, tile: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """The same result with plain torch ops (any device); tile already sliced to this chunk."""
    ct = compute_dtype(q.dtype)
    s = q.to(ct) @ k.to(ct).transpose(-1, -2) * scale  # (B, H, r, c)
    if tile is not None:
        s = s + tile
    p, lse = softmax_of_scores(s)  # (B, H, r, c), (B, H, r)
    return p @ v.to(ct), lse  # (B, H, r, Dv)


def fused_tile_backward(dout, q, k, v, out, lse, delta, tile, scale, is_causal=False):
    """torch's CPU flash backward on one (q block, span), given the final out and lse.

    The kernel recomputes delta = rowsum(dout * out) itself from the final out it is given.
    """
    q, k, v, out = unit_stride(q), unit_stride(k), unit_stride(v), unit_stride(out)
    tile = None if tile is None else unit_stride(tile)
    return _cpu_flash_backward(dout.contiguous(), q, k, v, out, lse.contiguous(), 0.0, is_causal,
                               attn_mask=tile, scale=scale)


def math_tile_backward(dout, q, k, v, out, lse, delta, tile, scale):
    """P = exp(S - lse); dV = P^T dO; dS = P (dO V^T - delta); dQ = dS K s; dK = dS^T Q s."""
    ct = compute_dtype(q.dtype)
    q, k, v, dout = q.to(ct), k.to(ct), v.to(ct), dout.to(ct)
    s = q @ k.transpose(-1, -2) * scale  # (B, H, r, c)
    if tile is not None:
        s = s + tile
    p = torch.exp(s - lse.unsqueeze(-1))  # (B, H, r, c); 0 where masked or the row is empty
    ds = p * (dout @ v.transpose(-1, -2) - delta.unsqueeze(-1))  # (B, H, r, c)
    return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ dout


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


def use_fused(backend: str, kernel: str, q: Tensor, v: Tensor) -> bool:
    """Resolve a backend's ``kernel`` argument ("auto", "fused" or "math") for these inputs."""
    if kernel not in ("auto", "fused", "math"):
        raise ValueError(f"{backend} kernel={kernel!r}: choose 'auto', 'fused' or 'math'")
    if kernel == "fused" and not fused_available(q, v):
        raise ValueError(f"{backend} kernel='fused' needs CPU tensors with Dv == D, got device {q.device}, "
                         f"D={q.shape[-1]}, Dv={v.shape[-1]}; use kernel='math'")
    return fused_available(q, v) if kernel == "auto" else kernel == "fused"
