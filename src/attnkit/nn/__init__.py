"""attnkit.nn: modules with parameters and projections that call ``attnkit.attention`` for the math."""

from .longformer import LongformerSelfAttention

__all__ = ["LongformerSelfAttention"]
