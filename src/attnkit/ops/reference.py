"""The one oracle: the textbook formula ``softmax(q k^T * scale + bias) v``, fully materialized.

With ``softcap`` c the scores are capped before the bias and mask, ``c * tanh(q k^T * scale / c)``
(Gemma 2's attention logit soft-capping, Gemma Team 2024, sec. 2.2). Dropout multiplies the
probabilities by the keep mask of ``ops/dropout.py`` over 1 - p (so every backend drops the same
pairs for one seed); the log-sum-exp is that of the scores before dropout.

Every test compares every other backend against this file. It favours being obviously right over
being fast: it builds the (B, Hq, Nq, Nk) score matrix, so its memory is O(Nq * Nk).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..bias import Bias
from ..masks import Mask
from . import dropout as _dropout
from .merge import softmax_of_scores
from .precision import compute_dtype, expand_kv


def cap(s: Tensor, softcap: float | None) -> Tensor:
    """``softcap * tanh(s / softcap)``, or s itself without a cap."""
    return s if softcap is None else torch.tanh(s / softcap) * softcap


def scores(q: Tensor, k: Tensor, mask: Mask | None, bias: Bias | None, scale: float,
           upcast: bool = True, softcap: float | None = None) -> Tensor:
    """Masked, biased, scaled (and capped) scores (B, Hq, Nq, Nk) in the compute dtype; -inf where masked.

    ``upcast=False`` computes in q's own dtype (the "naive" baseline of the numerics contract).
    """
    ct = compute_dtype(q.dtype) if upcast else q.dtype
    Nq, Nk = q.shape[2], k.shape[2]
    s = cap(q.to(ct) @ expand_kv(k, q.shape[1]).to(ct).transpose(-1, -2) * scale, softcap)  # (B, Hq, Nq, Nk)
    if bias is not None:
        s = s + bias.materialize(Nq, Nk, q.device).to(ct)
    if mask is not None:
        s = s.masked_fill(~mask.materialize(Nq, Nk, q.device), float("-inf"))
    return s


def attention_weights(q: Tensor, k: Tensor, mask: Mask | None, bias: Bias | None, scale: float,
                      softcap: float | None = None) -> Tensor:
    """Probabilities (B, Hq, Nq, Nk) in the compute dtype; rows that may attend nowhere are 0."""
    return softmax_of_scores(scores(q, k, mask, bias, scale, softcap=softcap))[0]


def reference_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None, bias: Bias | None,
                        scale: float, dropout_p: float = 0.0, upcast: bool = True, softcap: float | None = None,
                        dropout_seed: int | None = None) -> tuple[Tensor, Tensor]:
    """out (B, Hq, Nq, Dv) in q's dtype and lse (B, Hq, Nq) in the compute dtype.

    Differentiable by plain autograd. Dropout applies to the probabilities (after the lse), with
    the keep mask of ``dropout.dense_keep_mask(dropout_seed, ...)`` (a seed is drawn when None).
    ``upcast=False`` keeps half inputs in their dtype throughout (for the numerics contract).
    """
    s = scores(q, k, mask, bias, scale, upcast, softcap)  # (B, Hq, Nq, Nk)
    p, lse = softmax_of_scores(s)  # (B, Hq, Nq, Nk), (B, Hq, Nq)
    if dropout_p > 0:
        seed = _dropout.draw_seed() if dropout_seed is None else dropout_seed
        B, Hq, Nq, Nk = p.shape
        keep = _dropout.dense_keep_mask(seed, dropout_p, B, Hq, Nq, Nk, p.device)  # (B, Hq, Nq, Nk)
        p = p * keep.to(p.dtype) * (1.0 / (1.0 - dropout_p))
    out = p @ expand_kv(v, q.shape[1]).to(s.dtype)  # (B, Hq, Nq, Dv)
    return out.to(q.dtype), lse
