"""Input checks shared by the approximations: tensors as ``ak.attention`` takes them, and the part of
the mask language an approximation can honour (``ak.causal()``, ``ak.key_padding(...)``, joined
with ``&``). Anything else is refused with the reason: an approximation never mixes a positional
mask into its estimate, so it cannot apply a window, a document or a dense mask."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import _check_tensors, _normalize_mask, _real
from ..masks import And, Causal, KeyPadding, Mask


@dataclass(frozen=True)
class ApproxCall:
    """A validated approximation call.

    q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv): k and v repeated to the Hq query heads (GQA),
    all in ``dtype`` (float32, or float64 for float64 inputs: half inputs are accumulated in float32).
    ``key_valid`` (B, Nk) bool, True = a real key, or None; padded keys and values are 0 in k and v
    (any garbage there, a 1e20 or a NaN, never reaches a method); ``out_dtype`` the inputs' dtype.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    causal: bool
    key_valid: Tensor | None
    scale: float
    out_dtype: torch.dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype


def mask_parts(mask: Mask | None) -> list[Mask]:
    """The operands of a chain of ``&`` (a single mask is its own chain)."""
    if mask is None:
        return []
    if isinstance(mask, And):
        return mask_parts(mask.a) + mask_parts(mask.b)
    return [mask]


def _key_valid(parts: list[KeyPadding], B: int, Nk: int, device: torch.device) -> Tensor | None:
    valid = None
    for part in parts:
        part.check(B, 1, 1, Nk)
        v = part._valid(Nk, device).expand(B, Nk)  # (B, Nk) bool
        valid = v if valid is None else valid & v
    return valid


def prepare(method: str, q: object, k: object, v: object, *, mask: object, scale: object,
            causal_why_not: str | None = None) -> ApproxCall:
    """Validate an approximation's inputs.

    Args:
        method: the function's name, for messages.
        causal_why_not: None if the method supports ``ak.causal()``; else why it cannot.

    Raises:
        TypeError / ValueError: ``ak.attention``'s tensor errors; a mask outside
            ``causal() & key_padding(...)``; causal for a method that cannot be causal.
    """
    _check_tensors(q, k, v)
    mask = _normalize_mask(mask)
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    causal, padding = False, []
    for part in mask_parts(mask):
        if type(part) is Causal:
            causal = True
        elif isinstance(part, KeyPadding):
            padding.append(part)
        else:
            raise ValueError(f"{method}: mask {mask!r} contains {part!r}; an approximation takes only "
                             "ak.causal() and ak.key_padding(...) joined with &, because its estimate has no "
                             "per-pair mask. Use exact attention (ak.attention) for other masks")
    if causal and causal_why_not is not None:
        raise ValueError(f"{method} cannot be causal: {causal_why_not}")
    scale = 1.0 / math.sqrt(D) if scale is None else _real("scale", scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{method}: scale must be a finite number > 0, got {scale}")
    dtype = torch.promote_types(q.dtype, torch.float32)
    group = Hq // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (k, v))  # (B, Hq, Nk, D)
    key_valid = _key_valid(padding, B, Nk, q.device)
    if key_valid is not None:  # whatever padded positions hold never reaches a feature map or a gradient
        pad = ~key_valid[:, None, :, None]  # (B, 1, Nk, 1)
        k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
    return ApproxCall(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), causal=causal,
                      key_valid=key_valid, scale=scale, out_dtype=q.dtype)
