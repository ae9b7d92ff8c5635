"""The public functional API: ``attention``, ``attention_weights``, ``explain``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _dispatch
from ._validate import validate
from .bias import Bias
from .masks import Mask
from .ops import reference as _reference
from .ops.precision import compute_dtype, expand_kv


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | Tensor | None = None,
              bias: Bias | Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0,
              impl: str = "auto", return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Exact scaled dot-product attention ``softmax(q k^T * scale + bias) v`` under ``mask``.

    Args:
        q: (B, Hq, Nq, D) queries.
        k: (B, Hkv, Nk, D) keys; Hq must be a multiple of Hkv (GQA/MQA).
        v: (B, Hkv, Nk, Dv) values.
        mask: an attnkit mask (``ak.causal() & ak.sliding_window(128)``, ...) or a bool tensor
            broadcastable to (B, Hq, Nq, Nk); True = may attend.
        bias: additive float tensor broadcastable to (B, Hq, Nq, Nk), or a structured bias
            (``ak.alibi(slopes)``) that fast paths compute per tile.
        scale: score scale, default 1/sqrt(D).
        dropout_p: dropout on the attention probabilities (training), in [0, 1).
        impl: "auto", "reference", "sdpa", "banded" or "tiled". Explicit choices never fall back.
        return_lse: also return the log-sum-exp of the scores (natural log).

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype; with ``return_lse`` also lse (B, Hq, Nq) in float32
        (float64 for float64 inputs). A query that may attend to no key gets out = 0, lse = -inf.
    """
    call = validate(q, k, v, mask=mask, bias=bias, scale=scale, dropout_p=dropout_p, need_lse=return_lse)
    if q.shape[2] == 0 or k.shape[2] == 0:
        _dispatch.check_impl_name(impl)
        out, lse = _empty_attention(call.q, call.k, call.v)
    else:
        out, lse = _dispatch.choose(call, impl).run(call)
    if return_lse and call.lse_shift is not None:  # the rows validate shifted (DenseBias.stabilized)
        lse = lse + call.lse_shift.to(lse.dtype)
    return (out, lse) if return_lse else out


def _empty_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Nq = 0: an empty output; Nk = 0: every query sees no key, so out = 0 and lse = -inf (the
    rule for a row with nothing to attend to), as torch's SDPA gives. Written as (q k^T) v over the
    empty dimension so that autograd gives q, k, v zero gradients of their own shapes."""
    empty = q @ expand_kv(k, q.shape[1]).transpose(-1, -2)  # (B, Hq, Nq, Nk), one dim 0
    out = empty @ expand_kv(v, q.shape[1])  # (B, Hq, Nq, Dv): zeros, or nothing
    lse = torch.full(q.shape[:3], float("-inf"), dtype=compute_dtype(q.dtype), device=q.device)
    return out, lse


def attention_weights(q: Tensor, k: Tensor, v: Tensor | None = None, *, mask: Mask | Tensor | None = None,
                      bias: Bias | Tensor | None = None, scale: float | None = None) -> Tensor:
    """The attention probabilities (B, Hq, Nq, Nk) from the reference path (materialized).

    ``v`` is only used for shape checks and may be None. Rows that may attend nowhere are 0.
    """
    v_check = v if v is not None else k
    call = validate(q, k, v_check, mask=mask, bias=bias, scale=scale)
    return _reference.attention_weights(call.q, call.k, call.mask, call.bias, call.scale).to(q.dtype)


@dataclass(frozen=True)
class Explanation:
    """What ``impl="auto"`` would pick for a call and why each backend can or cannot run it."""

    chosen: str
    reasons: dict[str, str | None]
    shape: dict[str, int]

    def __str__(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.shape.items())
        lines = [f"call: {dims}", f"auto picks: {self.chosen}"]
        for name, reason in self.reasons.items():
            mark = "yes" if reason is None else "no "
            lines.append(f"  {name:<10} {mark}  {_dispatch.BACKENDS[name].summary}"
                         + ("" if reason is None else f"\n  {'':<10}      why not: {reason}"))
        return "\n".join(lines)


def backends() -> dict[str, str]:
    """Every backend ``impl`` can name, with a one-line summary, in auto's order of preference."""
    return {name: _dispatch.BACKENDS[name].summary for name in _dispatch.AUTO_ORDER}


def explain(q: Tensor, k: Tensor, v: Tensor, *, mask=None, bias=None, scale=None, dropout_p=0.0,
            return_lse: bool = False) -> Explanation:
    """List every backend with whether it can run this call and why not; prints nicely."""
    call = validate(q, k, v, mask=mask, bias=bias, scale=scale, dropout_p=dropout_p, need_lse=return_lse)
    return Explanation(_dispatch.choose(call, "auto").name, _dispatch.auto_reasons(call), call.shape)

