"""attnkit: self-attention end to end, one API and one mask language over several backends.

    import attnkit as ak
    out = ak.attention(q, k, v, mask=ak.causal() & ak.sliding_window(256))
"""

from .bias import Alibi, Bias, DenseBias, SumBias, alibi, alibi_slopes
from .functional import Explanation, attention, attention_weights, backends, explain
from .masks import (EMPTY, FULL, PARTIAL, Mask, causal, dense_mask, document, global_tokens,
                    key_padding, sliding_window)

__version__ = "0.1.0"

__all__ = [
    "attention", "attention_weights", "explain", "Explanation", "backends",
    "Mask", "causal", "sliding_window", "global_tokens", "key_padding", "document", "dense_mask",
    "EMPTY", "PARTIAL", "FULL",
    "Bias", "DenseBias", "SumBias", "Alibi", "alibi", "alibi_slopes",
]
