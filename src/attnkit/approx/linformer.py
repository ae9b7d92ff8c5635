"""Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity"): keys and values
projected along the sequence axis to Kp rows by learned E, F (Kp x Nmax), eq. 7:

    head = softmax(q (E K)^T * scale) (F V)        scores (Nq, Kp) instead of (Nq, Nk): O(Nq Kp)

Parameter sharing (paper sec. 4): *headwise* (one E, F for all heads: ``num_heads=None``),
*key-value* (F = E: ``share_kv=True``) and *layerwise* (one ``LinformerProjection`` instance passed to
the ``LinformerAttention`` of several layers; the paper's layerwise sharing also shares heads and
key/value, which is ``LinformerProjection(..., share_kv=True)`` shared by every layer).

Non-causal only: every projected row mixes all positions, future ones included.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._inputs import prepare

_CAUSAL_WHY_NOT = ("each projected key / value row E K, F V is a weighted sum over all Nk positions, so "
                   "every query would see the future through it; use linear_attention or exact "
                   "attention (ak.attention) for causal models")


def _check_projection(name: str, P: object, Hq: int, Nk: int, device: torch.device) -> None:
    """P: (Kp, Nmax) or (Hq, Kp, Nmax), floating, on q's device, Nmax >= Nk."""
    if not isinstance(P, Tensor) or not P.is_floating_point():
        what = f"a {P.dtype} tensor" if isinstance(P, Tensor) else type(P).__name__
        raise TypeError(f"linformer_attention: {name} must be a floating-point tensor, got {what}")
    if P.dim() not in (2, 3) or (P.dim() == 3 and P.shape[0] != Hq) or P.shape[-2] < 1:
        raise ValueError(f"linformer_attention: {name} has shape {tuple(P.shape)}; expected (Kp, Nmax) shared by "
                         f"the heads or (Hq={Hq}, Kp, Nmax) one per query head, with Kp >= 1")
    if P.device != device:
        raise ValueError(f"linformer_attention: {name} is on {P.device} but q is on {device}; move them together")
    if Nk > P.shape[-1]:
        raise ValueError(f"linformer_attention: Nk={Nk} keys but {name} projects at most Nmax={P.shape[-1]} "
                         f"positions; build the projection with max_len >= {Nk}, or shorten / split the "
                         "sequence (Linformer's projection has a fixed length)")


def _valid_first(k: Tensor, v: Tensor, key_valid: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's valid keys moved to the front, in order, and the padded ones zeroed behind them.

    k (B, H, Nk, D), v (B, H, Nk, Dv), key_valid (B, Nk) bool -> k, v of the same shapes. E's column j
    stands for position j, so the valid key of rank r must meet column r wherever the padding sits
    (left, right, between tokens), as in the row's unpadded call."""
    order = torch.argsort((~key_valid).to(torch.uint8), dim=-1, stable=True)  # (B, Nk): valid first
    pad = ~key_valid.gather(-1, order)[:, None, :, None]  # (B, 1, Nk, 1): True = padded
    k, v = (t.gather(2, order[:, None, :, None].expand_as(t)) for t in (k, v))
    return k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)  # masked_fill: no NaN * 0 from garbage


def linformer_attention(q: Tensor, k: Tensor, v: Tensor, E: Tensor, F: Tensor | None = None, *, mask=None,
                        scale: float | None = None) -> Tensor:
    """Linformer attention: softmax(q (E K)^T * scale) (F V) (Wang et al. 2020, eq. 7).

    Inputs shorter than the projection (Nk < Nmax) use the leading columns ``E[..., :Nk]``,
    ``F[..., :Nk]``, as the ``linformer`` package (and fairseq's ``compress_k.weight[:, :T]``) do.

    Padded keys (``ak.key_padding``) are zeroed before projecting, so they add nothing to E K and F V,
    and each row's valid keys meet E's leading columns in order (the valid key of rank r is projected
    by column r), so a padded batch row gives exactly what its unpadded keys give alone, wherever the
    padding sits (left, right, between tokens). The Kp projected rows all
    stay in the softmax (Linformer has no per-key mask), so with E = F = identity a padded position
    is a zero key with a zero value that still takes weight: padding is exact only against the
    unpadded Linformer call, not against exact masked attention.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv); float16/bfloat16/float32/float64,
            computed in float32 (float64 for float64 inputs). Hq % Hkv == 0 (GQA: k, v repeated).
        E: (Kp, Nmax) shared by the heads, or (Hq, Kp, Nmax) one per query head; Nmax >= Nk. Cast to
            the compute dtype (gradients flow back to it).
        F: the value projection, E's shape; None means F = E (key-value sharing).
        mask: None or ``ak.key_padding(...)``. ``ak.causal()`` is refused.
        scale: score scale, default 1/sqrt(D).

    Returns:
        (B, Hq, Nq, Dv) in q's dtype.

    Raises:
        TypeError / ValueError: ``ak.attention``'s tensor errors; a mask other than ``key_padding``;
            causal (the projection mixes future keys into every row); E or F not a floating tensor
            of shape (Kp, Nmax) / (Hq, Kp, Nmax) on q's device; F's shape differing from E's;
            Nk > Nmax (the projection is too short).
    """
    call = prepare("linformer_attention", q, k, v, mask=mask, scale=scale, causal_why_not=_CAUSAL_WHY_NOT)
    Hq, Nk = call.q.shape[1], call.k.shape[2]
    _check_projection("E", E, Hq, Nk, q.device)
    if F is None:
        F = E
    else:
        _check_projection("F", F, Hq, Nk, q.device)
        if F.shape != E.shape:
            raise ValueError(f"linformer_attention: F has shape {tuple(F.shape)} but E has {tuple(E.shape)}; "
                             "they project keys and values to the same Kp rows, so give them one shape")
    k_, v_ = call.k, call.v  # (B, Hq, Nk, D / Dv)
    if call.key_valid is not None:
        k_, v_ = _valid_first(k_, v_, call.key_valid)
    E_ = E[..., :Nk].to(call.dtype)  # (Kp, Nk) or (Hq, Kp, Nk)
    F_ = F[..., :Nk].to(call.dtype)
    k_proj, v_proj = E_ @ k_, F_ @ v_  # (B, Hq, Kp, D), (B, Hq, Kp, Dv): matmul broadcasts over B (and Hq)
    s = call.q @ k_proj.transpose(-1, -2) * call.scale  # (B, Hq, Nq, Kp)
    return (torch.softmax(s, dim=-1) @ v_proj).to(call.out_dtype)  # (B, Hq, Nq, Dv)


class LinformerProjection(nn.Module):
    """The learned sequence projections E (key) and F (value) of Linformer (Wang et al. 2020, eq. 7,
    sharing options of sec. 4), (Kp, Nmax) each, or (Hq, Kp, Nmax) with ``num_heads``.

    Args:
        max_len: Nmax, the longest key sequence the layer will take (longer ones are refused).
        proj_len: Kp, the projected length ("k" in the paper).
        num_heads: None: one E, F shared by all heads (headwise sharing); H: one per query head,
            shape (H, Kp, Nmax).
        share_kv: key-value sharing: F is E (one parameter; ``F`` is None).

    Init: N(0, 1/Kp), the random projection of the paper's Theorems 1-2 (R with i.i.d. N(0, 1/k)
    entries, a Johnson-Lindenstrauss map, E^T E ~ I). The ``linformer`` package draws U(-1/sqrt(Kp),
    1/sqrt(Kp)) (std 1/sqrt(3 Kp)); fairseq's example uses xavier_uniform with gain 1/sqrt(2)
    (std 1/sqrt(Kp + Nmax)). Re-initialize ``E`` / ``F`` in place for either.

    Layerwise sharing: pass one instance to several ``LinformerAttention`` modules; the parameters
    are then one tensor (``model.parameters()`` yields it once; gradients of all layers add up).
    """

    def __init__(self, max_len: int, proj_len: int, *, num_heads: int | None = None, share_kv: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        sizes = {"max_len": max_len, "proj_len": proj_len, "num_heads": 1 if num_heads is None else num_heads}
        for name, n in sizes.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"LinformerProjection: {name} must be an int >= 1, got {n!r}")
        self.max_len, self.proj_len, self.num_heads, self.share_kv = max_len, proj_len, num_heads, share_kv
        shape = (proj_len, max_len) if num_heads is None else (num_heads, proj_len, max_len)
        self.E = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.F = None if share_kv else nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """E, F ~ N(0, 1/Kp) (see the class docstring)."""
        with torch.no_grad():
            for P in (self.E, self.F):
                if P is not None:
                    P.normal_(0.0, 1.0 / math.sqrt(self.proj_len))

    def extra_repr(self) -> str:
        heads = "shared" if self.num_heads is None else self.num_heads
        return f"max_len={self.max_len}, proj_len={self.proj_len}, num_heads={heads}, share_kv={self.share_kv}"


class LinformerAttention(nn.Module):
    """Linformer (Wang et al. 2020, eq. 7) as the attention core of
    ``attnkit.nn.MultiHeadAttention(core=...)``: q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D / Dv) ->
    (B, Hq, Nq, Dv).

    ``LinformerAttention(projection)`` uses the given ``LinformerProjection`` (share one instance
    between layers for layerwise sharing); ``LinformerAttention.build(max_len, proj_len, ...)`` makes
    its own. Non-causal, no decoding state: see ``linformer_attention``.
    """

    def __init__(self, projection: LinformerProjection):
        super().__init__()
        if not isinstance(projection, LinformerProjection):
            raise TypeError(f"LinformerAttention takes a LinformerProjection, got {type(projection).__name__}; "
                            "use LinformerAttention.build(max_len, proj_len, ...) to make one")
        self.projection = projection

    @classmethod
    def build(cls, max_len: int, proj_len: int, *, num_heads: int | None = None, share_kv: bool = False,
              device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "LinformerAttention":
        """A core with its own ``LinformerProjection(max_len, proj_len, num_heads=, share_kv=)``."""
        return cls(LinformerProjection(max_len, proj_len, num_heads=num_heads, share_kv=share_kv,
                                       device=device, dtype=dtype))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, mask=None, scale: float | None = None,
                cache: object = None) -> Tensor:
        """q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D / Dv) -> (B, Hq, Nq, Dv); see ``linformer_attention``.

        Raises:
            TypeError: a ``cache`` (Linformer has no recurrent or causal form to decode with);
                ``linformer_attention``'s errors.
        """
        if cache is not None:
            raise TypeError(f"LinformerAttention: cache={type(cache).__name__} given, but Linformer has no "
                            "recurrent or causal form (its projection mixes all positions), so it cannot "
                            "decode token by token; use LinearAttention or exact attention for decoding")
        return linformer_attention(q, k, v, self.projection.E, self.projection.F, mask=mask, scale=scale)
