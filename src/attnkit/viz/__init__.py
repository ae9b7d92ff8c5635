"""attnkit.viz: looking at attention.

- ``capture(model)``: record each attnkit attention layer's q, k, mask and bias during a forward
  pass; compute maps on demand (selected rows / heads, or block-pooled, tile by tile);
- analysis: ``attention_rollout``, ``head_entropy``, ``mean_attention_distance``,
  ``special_token_attention`` (plain torch).

The plotting and page views, which import matplotlib, are to come in their own modules here.
"""

from .analysis import attention_rollout, head_entropy, mean_attention_distance, special_token_attention
from .capture import AttentionRecord, Capture, LongformerRecord, capture

__all__ = ["AttentionRecord", "Capture", "LongformerRecord", "attention_rollout", "capture", "head_entropy",
           "mean_attention_distance", "special_token_attention"]
