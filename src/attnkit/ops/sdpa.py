"""torch's ``scaled_dot_product_attention`` as an attnkit backend.

It expresses: no mask, ``causal()`` and dense masks/biases (bool or float tensors); any other
attnkit mask is materialized into a bool tensor first (what every SDPA user does with a padding
mask), which ``impl="auto"`` allows only while that tensor stays small. torch's
``is_causal`` is aligned top-left, attnkit's bottom-right: they agree only when Nq == Nk, so any
other causal call passes the (Nq, Nk) mask explicitly. torch's public SDPA returns no
log-sum-exp; when one is asked for on the CPU, torch's CPU flash kernel (the same kernel SDPA
dispatches to) is called directly, which returns it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bias import Bias, DenseBias, RowShiftedBias
from ..masks import Causal, Dense, Mask
from .merge import mark_rows_without_keys
from .precision import compute_dtype, expand_kv, unit_stride


def why_not(q: Tensor, k: Tensor, v: Tensor, mask: Mask | None, bias: Bias | None, dropout_p: float,
            need_lse: bool, softcap: float | None = None) -> str | None:
    """None if this backend can run the call, else the reason it cannot."""
    if softcap is not None:
        return (f"softcap={softcap}: torch SDPA cannot cap the scores (tanh comes before the softmax, inside the "
                "kernel); use impl='tiled', 'banded' or 'triton'")
    if bias is not None and _dense_tensor(bias) is None:
        return f"bias {bias!r} is structured; torch SDPA needs it materialized (impl='tiled' computes it per tile)"
    if not need_lse:
        return _bias_precision_why_not(q, bias)
    if q.device.type != "cpu":
        return "return_lse: torch SDPA returns no log-sum-exp on this device (impl='tiled' does)"
    if q.shape[-1] != v.shape[-1]:
        return f"return_lse with Dv={v.shape[-1]} != D={q.shape[-1]}: torch's CPU kernel that returns the lse needs Dv == D"
    if dropout_p > 0:
        return "return_lse with dropout: torch's kernel that returns the lse is called without dropout"
    wants_grad = any(t.requires_grad for t in (q, k, v)) or (bias is not None and bias.requires_grad())
    if torch.is_grad_enabled() and wants_grad:
        return ("return_lse under autograd: torch's kernel returns an lse with no gradient "
                "(impl='tiled' differentiates it)")
    return None


def _dense_tensor(bias: Bias) -> Tensor | None:
    """The user's tensor behind a dense bias (also one validate row-shifted), else None."""
    if isinstance(bias, RowShiftedBias):
        bias = bias.base
    return bias.tensor if isinstance(bias, DenseBias) else None


def _bias_precision_why_not(q: Tensor, bias: Bias | None) -> str | None:
    """torch's public SDPA takes a float mask only in q's dtype: a wider bias with half inputs would
    be rounded, and values past the half type's range (65504 for float16) become inf and NaN.
    attnkit adds a float bias in float32 (the compute dtype), so this path refuses such a call.
    (The lse path calls torch's CPU kernel with the bias in float32 and is not affected.)"""
    if bias is None or q.dtype not in (torch.float16, torch.bfloat16) or _dense_tensor(bias).dtype == q.dtype:
        return None
    return (f"bias is {_dense_tensor(bias).dtype} but q is {q.dtype}: torch SDPA adds a float mask in q's dtype, which would "
            f"round this bias and turn values past {torch.finfo(q.dtype).max:.0f} into inf; attnkit keeps the "
            f"bias's precision (scores in float32) with impl='tiled' or 'reference', or cast the bias to {q.dtype} "
            "yourself to use sdpa")


AUTO_MATERIALIZE_LIMIT = 1 << 24  # elements of a materialized mask auto accepts (16 MiB of bool)
AUTO_DENSITY_LIMIT = 0.5  # below this share of tiles to compute, auto prefers tiled
AUTO_SMALL_MASK = 1 << 14  # B*Nq*Nk up to this: sdpa with a materialized mask, no tile analysis


def needs_materializing(q: Tensor, k: Tensor, mask: Mask | None) -> bool:
    """True if torch SDPA can take this mask only as a materialized (.., Nq, Nk) tensor."""
    return not (mask is None or isinstance(mask, Dense) or _causal_without_mask(q, k, mask))


def drops_on_cpu(q: Tensor, dropout_p: float) -> bool:
    """True if torch SDPA would run this call with dropout on the CPU, where only its math path
    takes dropout: it builds the (B, Hq, Nq, Nk) probabilities (measured 2026-11-30, torch 2.13,
    2-core VM, B=1, H=12, N=4096, D=64: 30 s and 2.56 GB peak RSS with dropout_p=0.1, against
    2.9 s and 248 MB without)."""
    return dropout_p > 0 and q.device.type == "cpu"


def _causal_without_mask(q: Tensor, k: Tensor, mask: Mask | None) -> bool:
    """Causal calls torch expresses without a mask tensor: Nq == Nk (``is_causal``), or one query
    (a decoding step: bottom-right aligned, it sees every key)."""
    return isinstance(mask, Causal) and (q.shape[2] == k.shape[2] or (q.shape[2] == 1 and k.shape[2] >= 1))


def auto_why_not(q: Tensor, k: Tensor, mask: Mask | None, work_fraction: Callable[[], float]) -> str | None:
    """Why ``auto`` should not pick sdpa although it could run: the mask must be materialized and
    either is large or rules out much of the matrix (``work_fraction()``: the share of (query,
    key) pairs a tiled plan computes, asked only when needed), which tiled skips and SDPA computes
    anyway."""
    if not needs_materializing(q, k, mask):
        return None
    n = q.shape[0] * q.shape[2] * k.shape[2]
    if n <= AUTO_SMALL_MASK:  # decoding steps, short sequences: tiling cannot pay for itself
        return None
    if n > AUTO_MATERIALIZE_LIMIT:
        return (f"mask {mask!r} would be materialized as {n:,} bools (B*Nq*Nk) for torch SDPA; "
                "auto prefers a backend that skips the masked-out pairs (banded, tiled)")
    fraction = work_fraction()
    if fraction < AUTO_DENSITY_LIMIT:
        return (f"mask {mask!r} leaves {fraction:.0%} of the tiles to compute; torch SDPA would "
                "compute all of them, so auto prefers banded or tiled")
    return None


def _attn_mask(q: Tensor, k: Tensor, mask: Mask | None, bias: Bias | None) -> tuple[Tensor | None, bool]:
    """torch's (attn_mask, is_causal) for the call: None, a bool (True = may attend) or an additive
    float tensor in the compute dtype, each (Bm, Hm, Nq, Nk)."""
    Nq, Nk = q.shape[2], k.shape[2]
    if isinstance(mask, Causal) and Nq == Nk and bias is None:
        return None, True
    if isinstance(mask, Causal) and Nq == 1 and Nk >= 1:  # a decoding step: the one query sees every key
        mask = None
    allowed = None if mask is None else mask.materialize(Nq, Nk, q.device)  # (Bm, Hm, Nq, Nk)
    if bias is None:
        return allowed, False
    add = bias.materialize(Nq, Nk, q.device).to(compute_dtype(q.dtype))
    return (add if allowed is None else add.masked_fill(~allowed, float("-inf"))), False


def _open_rows_without_keys(attn_mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Rows (Bm, Hm, Nq) that may attend nowhere, and a mask that lets them see every key instead
    (their output is zeroed afterwards): no kernel then meets an all -inf row in either pass."""
    if attn_mask is None:
        return None, None
    if attn_mask.dtype == torch.bool:
        dead = ~attn_mask.any(-1)
        return (dead, attn_mask | dead.unsqueeze(-1)) if bool(dead.any()) else (None, attn_mask)
    dead = torch.isneginf(attn_mask).all(-1)
    return (dead, attn_mask.masked_fill(dead.unsqueeze(-1), 0.0)) if bool(dead.any()) else (None, attn_mask)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None, bias: Bias | None,
                   scale: float, dropout_p: float = 0.0, need_lse: bool = False) -> tuple[Tensor, Tensor | None]:
    """out (B, Hq, Nq, Dv), and lse (B, Hq, Nq) when ``need_lse`` (else None)."""
    attn_mask, is_causal = _attn_mask(q, k, mask, bias)
    dead, attn_mask = _open_rows_without_keys(attn_mask)
    if need_lse:
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            zero = torch.zeros((), dtype=compute_dtype(q.dtype))
            attn_mask = torch.where(attn_mask, zero, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(  # needs stride(-1) == 1
            unit_stride(q), unit_stride(expand_kv(k, q.shape[1])), unit_stride(expand_kv(v, q.shape[1])), 0.0, is_causal,
            attn_mask=attn_mask, scale=scale)
    else:
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)  # torch's fused kernels want the bias in q's dtype
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                             is_causal=is_causal, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        lse = None
    if lse is None:
        return (out if dead is None else out.masked_fill(dead.unsqueeze(-1), 0.0)), None
    return mark_rows_without_keys(out, lse, dead)
