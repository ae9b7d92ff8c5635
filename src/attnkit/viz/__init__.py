"""attnkit.viz: looking at attention. So far the analysis functions (plain torch); the plotting
and page views, which import matplotlib, are to come in their own modules of this package."""

from .analysis import attention_rollout, head_entropy, mean_attention_distance, special_token_attention

__all__ = ["attention_rollout", "head_entropy", "mean_attention_distance", "special_token_attention"]
