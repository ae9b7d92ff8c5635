"""The one oracle: the textbook formula ``softmax(q k^T * scale + bias) v``, fully materialized.

Every test compares every other backend against this file. It favours being obviously right over
being fast: it builds the (B, Hq, Nq, Nk) score matrix, so its memory is O(Nq * Nk).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..bias import Bias
from ..masks import Mask
from .merge import softmax_of_scores
from .precision import compute_dtype, expand_kv


def scores(q: Tensor, k: Tensor, mask: Mask | None, bias: Bias | None, scale: float,
           upcast: bool = True) -> Tensor:
    """Masked, biased, scaled scores (B, Hq, Nq, Nk) in the compute dtype; -inf where masked.

    ``upcast=False`` computes in q's own dtype (the "naive" baseline of the numerics contract).
    """
    ct = compute_dtype(q.dtype) if upcast else q.dtype
    Nq, Nk = q.shape[2], k.shape[2]
    s = q.to(ct) @ expand_kv(k, q.shape[1]).to(ct).transpose(-1, -2) * scale  # (B, Hq, Nq, Nk)
    if bias is not None:
        s = s + bias.materialize(Nq, Nk, q.device).to(ct)
    if mask is not None:
        s = s.masked_fill(~mask.materialize(Nq, Nk, q.device), float("-inf"))
    return s


def attention_weights(q: Tensor, k: Tensor, mask: Mask | None, bias: Bias | None, scale: float) -> Tensor:
    """Probabilities (B, Hq, Nq, Nk) in the compute dtype; rows that may attend nowhere are 0."""
    return softmax_of_scores(scores(q, k, mask, bias, scale))[0]


def reference_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None, bias: Bias | None,
                        scale: float, dropout_p: float = 0.0, upcast: bool = True) -> tuple[Tensor, Tensor]:
    """out (B, Hq, Nq, Dv) in q's dtype and lse (B, Hq, Nq) in the compute dtype.

    Differentiable by plain autograd. Dropout applies to the probabilities (after the lse).
    ``upcast=False`` keeps half inputs in their dtype throughout (for the numerics contract).
    """
    s = scores(q, k, mask, bias, scale, upcast)  # (B, Hq, Nq, Nk)
    p, lse = softmax_of_scores(s)  # (B, Hq, Nq, Nk), (B, Hq, Nq)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    out = p @ expand_kv(v, q.shape[1]).to(s.dtype)  # (B, Hq, Nq, Dv)
    return out.to(q.dtype), lse
