"""Transformer blocks: attention + feed-forward, each wrapped in a residual connection and a norm.

Two wirings, as two classes (compose, don't flag):

    PostNormBlock (Vaswani et al., BERT):   x = norm1(x + attn(x));        x = norm2(x + ffn(x))
    PreNormBlock  (GPT-2, Llama):           x = x + attn(norm1(x));        x = x + ffn(norm2(x))

Either takes an optional cross-attention sublayer (encoder-decoder), placed between the two:
``x = norm_c(x + cross(x, memory))`` or ``x = x + cross(norm_c(x), memory)``.

Legend: B batch, N tokens, M memory tokens, E model width, F feed-forward width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..bias import Bias
from ..masks import Mask
from .attention import KVCache, MemoryKVCache, MultiHeadAttention


class FeedForward(nn.Module):
    """``fc2(activation(fc1(x)))``: (B, N, E) -> (B, N, F) -> (B, N, E). BERT: nn.GELU() (exact)."""

    def __init__(self, embed_dim: int, hidden_dim: int, activation: nn.Module | None = None, *, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim, bias=bias)
        self.activation = nn.GELU() if activation is None else activation
        self.fc2 = nn.Linear(hidden_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # dropout on the output is the block's (one per sublayer)
        """x (B, N, E) -> (B, N, E) in x's dtype (any leading dims: (..., E) -> (..., E)).

        Raises:
            RuntimeError: x's last dim is not E (from nn.Linear).
        """
        return self.fc2(self.activation(self.fc1(x)))


class SwiGLU(nn.Module):
    """Shazeer (2020) gated feed-forward, as in Llama: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self, embed_dim: int, hidden_dim: int, *, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(embed_dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(embed_dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, N, E) -> (B, N, E) in x's dtype (any leading dims: (..., E) -> (..., E)).

        Raises:
            RuntimeError: x's last dim is not E (from nn.Linear).
        """
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nn.Module):
    """Zhang & Sennrich (2019): ``weight * x / sqrt(mean(x^2) + eps)``, no centering, no bias.

    Normalizes in float32 (as Llama does) and scales in the input dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, N, E) -> (B, N, E) (any leading dims), normalized over the last dim E.

        The mean of squares is taken in float32 (float64 for float64 x); the result is cast back
        to x's dtype, then scaled by ``weight`` (so it follows torch's type promotion of the two).

        Raises:
            RuntimeError: x's last dim is not ``dim`` (the weight does not broadcast).
        """
        work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        normed = work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


@dataclass
class BlockCache:
    """One block's decoding state: its self-attention keys/values and its memory's keys/values."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: MemoryKVCache = field(default_factory=MemoryKVCache)


@dataclass(frozen=True)
class Context:
    """What every block of a stack sees besides x: masks, biases, the encoder's memory."""

    mask: Mask | Tensor | None = None
    bias: Bias | Tensor | None = None
    memory: Tensor | None = None  # (B, M, E)
    memory_mask: Mask | Tensor | None = None  # over (N, M), e.g. ak.key_padding(source lengths)
    positions: Tensor | None = None  # (N,) or (B, N) positions of the new tokens (left padding)


class _Block(nn.Module):
    def __init__(self, attn: MultiHeadAttention, ffn: nn.Module, norm1: nn.Module, norm2: nn.Module, *,
                 cross_attn: MultiHeadAttention | None = None, norm_cross: nn.Module | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if (cross_attn is None) != (norm_cross is None):
            raise ValueError("cross_attn and norm_cross come together: give both or neither")
        self.attn, self.ffn, self.norm1, self.norm2 = attn, ffn, norm1, norm2
        self.cross_attn, self.norm_cross = cross_attn, norm_cross
        self.dropout = nn.Dropout(dropout)

    def _self(self, x: Tensor, ctx: Context, cache: BlockCache | None) -> Tensor:
        return self.dropout(self.attn(x, mask=ctx.mask, bias=ctx.bias, cache=cache and cache.self_attn,
                                      positions=ctx.positions))

    def _cross(self, x: Tensor, ctx: Context, cache: BlockCache | None) -> Tensor:
        if ctx.memory is None:
            raise ValueError("this block has cross-attention: pass memory (B, M, E), the encoder's output")
        return self.dropout(self.cross_attn(x, ctx.memory, mask=ctx.memory_mask, cache=cache and cache.cross_attn))


class PostNormBlock(_Block):
    """Residual then norm, after each sublayer (the original Transformer, BERT)."""

    def forward(self, x: Tensor, ctx: Context = Context(), cache: BlockCache | None = None) -> Tensor:
        """One post-norm block: x (B, N, E) -> (B, N, E) in x's dtype.

        Args:
            x: (B, N, E) the residual stream; with ``cache``, the N tokens after the cached ones.
            ctx: what every block of a stack shares: the self-attention ``mask`` / ``bias`` over
                (N, L + N) keys, per-token ``positions`` (N,) / (B, N), and for cross-attention the
                encoder's ``memory`` (B, M, E) and ``memory_mask`` over (N, M).
            cache: this block's ``BlockCache`` (KV-cache decoding), updated in place.

        Raises:
            ValueError: a block with cross-attention and no ``ctx.memory``; the attention layers'
                errors (shapes, masks, a bounded cache whose mask reaches a dropped key).
        """
        x = self.norm1(x + self._self(x, ctx, cache))  # (B, N, E)
        if self.cross_attn is not None:
            x = self.norm_cross(x + self._cross(x, ctx, cache))
        return self.norm2(x + self.dropout(self.ffn(x)))


class PreNormBlock(_Block):
    """Norm before each sublayer, residual stream untouched (GPT-2, Llama); add a final norm."""

    def forward(self, x: Tensor, ctx: Context = Context(), cache: BlockCache | None = None) -> Tensor:
        """One pre-norm block: x (B, N, E) -> (B, N, E) in x's dtype.

        Args:
            x: (B, N, E) the residual stream; with ``cache``, the N tokens after the cached ones.
            ctx: what every block of a stack shares: the self-attention ``mask`` / ``bias`` over
                (N, L + N) keys, per-token ``positions`` (N,) / (B, N), and for cross-attention the
                encoder's ``memory`` (B, M, E) and ``memory_mask`` over (N, M).
            cache: this block's ``BlockCache`` (KV-cache decoding), updated in place.

        Raises:
            ValueError: a block with cross-attention and no ``ctx.memory``; the attention layers'
                errors (shapes, masks, a bounded cache whose mask reaches a dropped key).
        """
        x = x + self._self(self.norm1(x), ctx, cache)  # (B, N, E)
        if self.cross_attn is not None:
            x = x + self._cross(self.norm_cross(x), ctx, cache)
        return x + self.dropout(self.ffn(self.norm2(x)))
