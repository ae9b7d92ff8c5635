"""Which dtype a backend computes in, and how its tensors are laid out (shared by backends)."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are computed in float32; float32 and float64 in themselves."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def expand_kv(x: Tensor, Hq: int) -> Tensor:
    """GQA/MQA: repeat each of the Hkv heads of (B, Hkv, N, D) Hq/Hkv times -> (B, Hq, N, D)."""
    Hkv = x.shape[1]
    return x if Hkv == Hq else x.repeat_interleave(Hq // Hkv, dim=1)


def reduce_kv_grad(g: Tensor, Hkv: int) -> Tensor:
    """The inverse of expand_kv for gradients: (B, Hq, N, D) summed per kv head -> (B, Hkv, N, D)."""
    B, Hq, N, D = g.shape
    return g if Hq == Hkv else g.view(B, Hkv, Hq // Hkv, N, D).sum(2)


def unit_stride(t: Tensor) -> Tensor:
    """``t`` itself when its last dimension is contiguous (stride 1), else a contiguous copy.

    torch's private CPU flash kernels (``_scaled_dot_product_flash_attention_for_cpu`` and its
    backward) read each row of D values as adjacent memory whatever ``t.stride(-1)`` says: a
    sliced (``x[..., ::2]``), transposed (``(B, H, D, N).transpose(-1, -2)``) or expanded
    (stride 0) last dimension gives them garbage. Every call into them goes through this; other
    strides (heads-strided ``(B, N, H, D).transpose(1, 2)`` views, broadcast batch or heads) they
    honour and are kept. The copy is part of autograd's graph.
    """
    return t if t.stride(-1) == 1 else t.contiguous()
