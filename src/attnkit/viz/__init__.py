"""attnkit.viz: looking at attention.

- ``capture(model)``: record each attention call's q, k, mask, bias, scale and softcap during a
  forward pass, from attnkit's layers or from any transformers model built with
  ``attn_implementation="attnkit"``; compute maps on demand (selected rows / heads, or
  block-pooled), scoring only the keys the mask may allow (``tiles``: linear in N for windows);
- analysis: ``attention_rollout``, ``head_entropy``, ``mean_attention_distance``,
  ``special_token_attention`` (plain torch);
- ``page.write_html``: the offline interactive page; ``plot``: matplotlib pictures (imported only
  when used). Nothing here imports transformers until a capture meets a transformers model.
"""

from .analysis import attention_rollout, head_entropy, mean_attention_distance, special_token_attention
from .capture import AttentionRecord, Capture, LongformerRecord, capture

__all__ = ["AttentionRecord", "Capture", "LongformerRecord", "attention_rollout", "capture", "head_entropy",
           "mean_attention_distance", "special_token_attention"]
