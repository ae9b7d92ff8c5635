"""attnkit.nn: modules with parameters and projections that call ``attnkit.attention`` for the math.

- attention: ``MultiHeadAttention`` (self/cross, GQA, KV cache), ``KVCache``, ``MemoryKVCache``
- positional: sinusoidal, learned, ``RotaryEmbedding`` (both layouts; ``RopeScaling``: linear, dynamic,
  yarn, llama3, partial rotary), ``ALiBi``
- block: ``FeedForward``, ``SwiGLU``, ``RMSNorm``, ``PreNormBlock``, ``PostNormBlock``
- models: ``TokenEmbeddings``, ``Encoder``, ``DecoderLM`` (``generate``), ``EncoderDecoder``
- longformer: ``LongformerSelfAttention`` (HF drop-in)
"""

from .attention import KVCache, MemoryKVCache, MultiHeadAttention
from .block import BlockCache, Context, FeedForward, PostNormBlock, PreNormBlock, RMSNorm, SwiGLU
from .longformer import LongformerSelfAttention
from .models import DecoderLM, Encoder, EncoderDecoder, TokenEmbeddings, generate_tokens, sample_next
from .positional import (ROPE_TYPES, ALiBi, AttentionPositional, LearnedPositionalEmbedding, RopeScaling,
                         RotaryEmbedding, SinusoidalPositionalEncoding, sinusoidal_table)

__all__ = [
    "MultiHeadAttention", "KVCache", "MemoryKVCache",
    "SinusoidalPositionalEncoding", "LearnedPositionalEmbedding", "AttentionPositional", "RotaryEmbedding",
    "RopeScaling", "ROPE_TYPES", "ALiBi", "sinusoidal_table",
    "FeedForward", "SwiGLU", "RMSNorm", "PreNormBlock", "PostNormBlock", "BlockCache", "Context",
    "TokenEmbeddings", "Encoder", "DecoderLM", "EncoderDecoder", "generate_tokens", "sample_next",
    "LongformerSelfAttention",
]
