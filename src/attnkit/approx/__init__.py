"""Approximate attention: different operations from ``attnkit.attention`` (which is exact), each with
its own function and a module (an attention "core") that plugs into
``attnkit.nn.MultiHeadAttention(core=...)``.

    linear_attention     Katharopoulos et al. 2020: phi(q).phi(k) with phi = elu + 1 (or any feature
                         map); non-causal, causal by chunks, recurrent decoding (KernelState)
    performer_attention  Choromanski et al. 2020 (FAVOR+): positive orthogonal random features for the
                         softmax kernel (or ReLU); non-causal, causal by chunks, recurrent decoding
    linformer_attention  Wang et al. 2020: keys and values projected along the sequence by learned
                         E, F (non-causal)
    nystrom_attention    Xiong et al. 2021: segment-mean landmarks and an iterative pseudo-inverse
                         (non-causal)
    replace_attention    put a core into every attnkit MultiHeadAttention of a trained model
    audit                every approximation on every attention layer's real q, k, v against exact:
                         per layer and head errors, time and memory (``attnkit.viz.plot.plot_audit``)

Same ``(B, H, N, D)`` layout and the same mask vocabulary as ``ak.attention`` where a method allows it
(``ak.causal()``, ``ak.key_padding(...)``); any other mask is refused with the reason.
"""

from .audit import AuditReport, AuditRow, audit
from .kernelized import KernelState
from .linear import LinearAttention, elu_feature_map, linear_attention, relu_feature_map
from .linformer import LinformerAttention, LinformerProjection, linformer_attention
from .performer import (PerformerAttention, orthogonal_random_features, performer_attention, performer_features,
                        relu_features, softmax_features)
from .nystrom import NystromAttention, iterative_pinv, nystrom_attention
from .swap import replace_attention

__all__ = ["audit", "AuditReport", "AuditRow", "KernelState", "LinearAttention", "linear_attention", "elu_feature_map", "relu_feature_map",
           "LinformerAttention", "LinformerProjection", "linformer_attention",
           "NystromAttention", "iterative_pinv", "nystrom_attention",
           "PerformerAttention", "performer_attention", "orthogonal_random_features", "performer_features",
           "relu_features", "softmax_features", "replace_attention"]
