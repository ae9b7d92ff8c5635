"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): softmax's exp(q.k) replaced
by phi(q).phi(k) with phi(x) = elu(x) + 1 (eq. 7), or any non-negative feature map.

Non-causal and causal (by chunks) in O(N), and the recurrent form for decoding: ``LinearAttention``
as the core of ``attnkit.nn.MultiHeadAttention`` decodes with a ``KernelState`` of constant size.
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as Fn
from torch import Tensor, nn

from . import kernelized
from ._inputs import prepare
from .kernelized import KernelState

FeatureMap = Callable[[Tensor], Tensor]


def elu_feature_map(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al. 2020, eq. 7): (..., D) -> (..., D)."""
    return Fn.elu(x) + 1.0


def relu_feature_map(x: Tensor) -> Tensor:
    """phi(x) = relu(x) >= 0: (..., D) -> (..., D). A row of all-negative coordinates sees nothing."""
    return Fn.relu(x)


FEATURE_MAPS: dict[str, FeatureMap] = {"elu": elu_feature_map, "relu": relu_feature_map}


def feature_map_named(feature_map: str | FeatureMap) -> FeatureMap:
    """A feature map by name ("elu", "relu") or the callable itself.

    Raises:
        ValueError: an unknown name.  TypeError: neither a name nor a callable.
    """
    if callable(feature_map):
        return feature_map
    if isinstance(feature_map, str):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature_map {feature_map!r}; expected one of {sorted(FEATURE_MAPS)} or a "
                             "callable (B, H, N, D) -> (B, H, N, F) with values >= 0")
        return FEATURE_MAPS[feature_map]
    raise TypeError(f"feature_map must be a name or a callable, got {type(feature_map).__name__}")


def _features(phi: FeatureMap, x: Tensor, what: str) -> Tensor:
    out = phi(x)
    if not isinstance(out, Tensor) or out.dim() != 4 or out.shape[:3] != x.shape[:3]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"feature map returned {shape} for {what} of shape {tuple(x.shape)}; expected "
                         "(B, H, N, F): the same B, H, N, any F")
    return out.to(x.dtype)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, mask=None, feature_map: str | FeatureMap = "elu",
                     chunk_size: int = 128, state: KernelState | None = None) -> Tensor:
    """Linear attention: out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j).

    Katharopoulos et al. 2020, eq. 4-6 (non-causal), 8-9 (causal, by chunks of ``chunk_size`` rows).

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv); float16/bfloat16/float32/float64,
            accumulated in float32 (float64 for float64 inputs). Hq % Hkv == 0.
        mask: None, ``ak.causal()``, ``ak.key_padding(...)`` or both joined with ``&``. Padded keys
            leave numerator and normalizer; causal is bottom-right aligned as in ``ak.attention``.
        feature_map: "elu" (elu + 1, the paper's), "relu", or a callable (B, H, N, D) -> (B, H, N, F)
            with values >= 0, applied to q and k alike.
        chunk_size: C, rows per chunk of the causal form (memory O(N C + F Dv) per head).
        state: a ``KernelState`` to continue from and update in place (causal only): recurrent decoding.

    Returns:
        (B, Hq, Nq, Dv) in q's dtype. A query that sees no key gets 0.

    Raises:
        ValueError / TypeError: bad tensors; a mask outside ``causal() & key_padding()``; ``state``
            without a causal mask; a feature map returning the wrong shape.
    """
    call = prepare("linear_attention", q, k, v, mask=mask, scale=None)
    if state is not None and not call.causal:
        raise ValueError("linear_attention: state= is the causal recurrent form; pass mask=ak.causal() too")
    phi = feature_map_named(feature_map)
    phi_q, phi_k = _features(phi, call.q, "q"), _features(phi, call.k, "k")  # (B, H, N, F)
    if call.causal:
        out = kernelized.causal(phi_q, phi_k, call.v, key_valid=call.key_valid, chunk_size=chunk_size, state=state)
    else:
        out = kernelized.noncausal(phi_q, phi_k, call.v, key_valid=call.key_valid)
    return out.to(call.out_dtype)  # (B, Hq, Nq, Dv)


class LinearAttention(nn.Module):
    """Linear attention (Katharopoulos et al. 2020, eq. 4-9) as the attention core of
    ``attnkit.nn.MultiHeadAttention(core=...)``: q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D / Dv) ->
    (B, Hq, Nq, Dv).

    ``new_cache()`` gives the constant-size ``KernelState`` that ``DecoderLM.generate`` decodes with.
    No parameters; ``feature_map`` and ``chunk_size`` as in ``linear_attention``.

    Raises:
        ValueError: chunk_size not an int >= 1; an unknown feature map name.
        TypeError: a feature map that is neither a name nor a callable.
    """

    def __init__(self, feature_map: str | FeatureMap = "elu", chunk_size: int = 128):
        super().__init__()
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"LinearAttention: chunk_size must be an int >= 1 (rows per chunk of the causal form), "
                             f"got {chunk_size!r}")
        self.feature_map, self.chunk_size = feature_map_named(feature_map), chunk_size
        self._name = feature_map if isinstance(feature_map, str) else getattr(feature_map, "__name__", "custom")

    def new_cache(self) -> KernelState:
        """An empty constant-size decoding state (S (B, H, F, Dv), z (B, H, F) once filled)."""
        return KernelState()

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, mask=None, scale: float | None = None,
                cache: KernelState | None = None) -> Tensor:
        """q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D / Dv) -> (B, Hq, Nq, Dv); see ``linear_attention``.

        Raises:
            ValueError: an explicit ``scale`` (the feature map has none); ``linear_attention``'s errors.
        """
        if scale is not None:
            raise ValueError(f"LinearAttention: scale={scale} given, but phi(q).phi(k) has no score scale; "
                             "leave the attention's scale at None")
        return linear_attention(q, k, v, mask=mask, feature_map=self.feature_map, chunk_size=self.chunk_size,
                                state=cache)

    def extra_repr(self) -> str:
        return f"feature_map={self._name}, chunk_size={self.chunk_size}"
