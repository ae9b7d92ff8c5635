"""Approximate attention: different operations from ``attnkit.attention`` (which is exact), each with
its own function and a module that plugs into ``attnkit.nn.MultiHeadAttention(core=...)``.

    linear_attention     Katharopoulos et al. 2020 (phi = elu + 1), causal by chunks, recurrent decoding
    KernelState          the constant-size recurrent state of causal kernelized attention

Same ``(B, H, N, D)`` layout and the same mask vocabulary as ``ak.attention`` where a method allows it
(``ak.causal()``, ``ak.key_padding(...)``); any other mask is refused with the reason.
"""

from .kernelized import KernelState
from .linear import LinearAttention, elu_feature_map, linear_attention, relu_feature_map

__all__ = ["KernelState", "LinearAttention", "linear_attention", "elu_feature_map", "relu_feature_map"]
