"""Positional information, because attention alone is permutation-invariant.

Two kinds, by where they act:

- **absolute** encodings add a vector per position to the token embeddings (B, N, E) before the
  first block: ``SinusoidalPositionalEncoding`` (Vaswani et al. 2017, fixed) and
  ``LearnedPositionalEmbedding`` (BERT/GPT-2, a trained table). Call ``enc(x, offset)`` with the
  first token's position, or with per-token positions (N,) / (B, N) (left-padded batches).
- **attention-side** encodings act inside each attention layer and depend only on the distance
  between a query and a key: ``RotaryEmbedding`` (Su et al. 2021, rotates q and k) and ``ALiBi``
  (Press et al. 2022, a per-head linear distance bias, passed to ``attnkit.attention`` as the
  structured ``ak.alibi`` so it is computed per tile and never as an N x N matrix). Both implement
  ``AttentionPositional``, the small interface ``MultiHeadAttention(positional=...)`` calls.

Legend: B batch, N tokens, E model width, H heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..bias import Bias, alibi, alibi_slopes


def _positions(offset: int | Tensor, B: int, n: int, device: torch.device) -> Tensor:
    """``offset`` int (position of the first token) or integer positions (N,) / (B, N) -> (B?, N)."""
    if isinstance(offset, Tensor):
        if offset.is_floating_point() or offset.shape not in ((n,), (B, n), (1, n)):
            raise ValueError(f"positions must be integers of shape (N,) or (B, N) = ({B}, {n}), got "
                             f"{offset.dtype} {tuple(offset.shape)}")
        if offset.numel() and int(offset.min()) < 0:
            raise ValueError(f"positions must be >= 0, got a minimum of {int(offset.min())}")
        return offset.to(device)
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise ValueError(f"offset must be an int >= 0 (the position of the first token) or a tensor of positions, "
                         f"got {offset!r}")
    return torch.arange(offset, offset + n, device=device)


def _check_tokens(name: str, x: Tensor, width: int) -> None:
    if x.dim() != 3 or x.shape[-1] != width:
        raise ValueError(f"{name}: expected x of shape (B, N, E) with E={width}, got {tuple(x.shape)}")


# -- absolute encodings: (B, N, E) -> (B, N, E) ---------------------------------------------------

class SinusoidalPositionalEncoding(nn.Module):
    """``PE[p, 2i] = sin(p / base^(2i/E))``, ``PE[p, 2i+1] = cos(p / base^(2i/E))``, added to x.

    Computed from the positions on each call (no table, no maximum length). Even E only, as in the
    paper's interleaving of sines and cosines.
    """

    def __init__(self, embed_dim: int, base: float = 10000.0):
        super().__init__()
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"SinusoidalPositionalEncoding: embed_dim must be even and >= 2, got {embed_dim}")
        self.embed_dim, self.base = embed_dim, float(base)

    def encoding(self, positions: Tensor) -> Tensor:
        """(..., N) integer positions -> (..., N, E) float32 encodings."""
        i = torch.arange(0, self.embed_dim, 2, device=positions.device, dtype=torch.float64)
        angles = positions.to(torch.float64)[..., None] / self.base ** (i / self.embed_dim)  # (..., N, E/2)
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2).float()  # sin, cos interleaved

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """x (B, N, E) -> x + PE (B, N, E) in x's dtype (the encodings are computed in float64).

        Args:
            x: (B, N, E) token embeddings.
            offset: the position of the first token (int >= 0, e.g. a KV cache's length), or
                integer positions (N,) / (B, N) per token (left-padded batches).

        Raises:
            ValueError: x not (B, N, E); offset negative, not an int, or positions of another shape.
        """
        _check_tokens("SinusoidalPositionalEncoding", x, self.embed_dim)
        return x + self.encoding(_positions(offset, x.shape[0], x.shape[1], x.device)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, base={self.base:g}"


class LearnedPositionalEmbedding(nn.Module):
    """A trained (max_positions, E) table added to x (BERT, GPT-2). ``weight`` is the table."""

    def __init__(self, max_positions: int, embed_dim: int):
        super().__init__()
        self.max_positions, self.embed_dim = max_positions, embed_dim
        self.weight = nn.Parameter(torch.empty(max_positions, embed_dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor, offset: int | Tensor = 0) -> Tensor:
        """x (B, N, E) -> x + weight[positions] (B, N, E) in x's dtype.

        Args:
            x: (B, N, E) token embeddings.
            offset: the position of the first token (int >= 0, e.g. a KV cache's length), or
                integer positions (N,) / (B, N) per token (left-padded batches).

        Raises:
            ValueError: x not (B, N, E); a position at or beyond ``max_positions``; a bad offset.
        """
        _check_tokens("LearnedPositionalEmbedding", x, self.embed_dim)
        positions = _positions(offset, x.shape[0], x.shape[1], x.device)  # (B?, N)
        if positions.numel() and int(positions.max()) >= self.max_positions:
            raise ValueError(f"LearnedPositionalEmbedding: positions {int(positions.min())}..{int(positions.max())} "
                             f"but the table has {self.max_positions} rows; shorten the input or use a relative "
                             "encoding (RoPE, ALiBi)")
        return x + self.weight[positions].to(x.dtype)

    def extra_repr(self) -> str:
        return f"max_positions={self.max_positions}, embed_dim={self.embed_dim}"


# -- attention-side encodings ------------------------------------------------------------------------

class AttentionPositional(nn.Module):
    """What ``MultiHeadAttention`` asks of a positional module: rotate q and k, and/or a bias.

    ``q_positions`` / ``k_positions`` are the absolute positions of the rows, (N,) or per sample
    (B, N) (left-padded batches), so a KV cache hands in ``offset + arange(n)`` for new tokens.
    The defaults do nothing.
    """

    def rotate(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        """q (B, Hq, Nq, D), k (B, Hkv, Nk, D) -> rotated q, k (same shapes)."""
        return q, k

    def forward(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        """``rotate``: q (B, Hq, Nq, D), k (B, Hkv, Nk, D) -> q, k with positions applied (same
        shapes and dtypes). ``q_positions`` (Nq,) / (B, Nq), ``k_positions`` (Nk,) / (B, Nk) are
        integer positions. This base class returns q and k unchanged."""
        return self.rotate(q, k, q_positions, k_positions)

    def bias(self) -> Bias | None:
        """A structured bias for ``attnkit.attention`` (bottom-right aligned), or None."""
        return None


class RotaryEmbedding(AttentionPositional):
    """RoPE (Su et al., RoFormer): rotate each pair of q/k features by ``position * theta_i``,
    ``theta_i = base^(-2i/rotary_dim)``, so ``q_m . k_n`` depends only on ``m - n``.

    Two pairings of the features, both used by real checkpoints:

    - ``interleaved=False`` (Llama, GPT-NeoX, "rotate_half"): feature i pairs with i + rotary_dim/2;
    - ``interleaved=True`` (GPT-J, the RoFormer paper): feature 2i pairs with 2i + 1.

    ``rotary_dim`` < D rotates only the first rotary_dim features (GPT-J, NeoX partial rotary).
    Angles are computed in float32 as Llama/HF do (float64 for float64 inputs), whatever the
    module's or the input's dtype, and the rotation in the input dtype.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, *, interleaved: bool = False,
                 rotary_dim: int | None = None):
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"RotaryEmbedding: rotary_dim must be even and in (0, head_dim={head_dim}], "
                             f"got {rotary_dim}")
        self.head_dim, self.rotary_dim, self.base, self.interleaved = head_dim, rotary_dim, float(base), interleaved

    def inv_freq(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """theta_i = base^(-2i/rotary_dim), (rotary_dim/2,), computed as Llama/HF do in float32
        (float64 for float64 inputs). Not a buffer: ``model.to(bfloat16)`` must not round it."""
        steps = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device=device).to(dtype)
        return 1.0 / (self.base ** (steps / self.rotary_dim))

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(..., N) positions -> cos, sin of shape (..., N, rotary_dim), laid out for this pairing."""
        work = torch.float64 if dtype == torch.float64 else torch.float32  # positions > 256 are not exact in bf16
        inv_freq = self.inv_freq(work, positions.device)
        angles = positions.to(inv_freq.dtype)[..., None] * inv_freq  # (..., N, rotary_dim/2)
        angles = angles.repeat_interleave(2, -1) if self.interleaved else torch.cat([angles, angles], -1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _partner(self, x: Tensor) -> Tensor:
        """The feature each feature rotates with, signed: (-x2, x1) per pair."""
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack([-x2, x1], dim=-1).flatten(-2)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def apply(self, x: Tensor, positions: Tensor) -> Tensor:
        """x (B, H, N, D), positions (N,) or (B, N) -> x with its first rotary_dim features rotated."""
        B, N = x.shape[0], x.shape[-2]
        if x.shape[-1] != self.head_dim or positions.shape not in ((N,), (B, N), (1, N)):
            raise ValueError(f"RotaryEmbedding: expected x (B, H, N, {self.head_dim}) and positions (N,) or (B, N), "
                             f"got x {tuple(x.shape)} and positions {tuple(positions.shape)}")
        cos, sin = self.cos_sin(positions.to(x.device), x.dtype)  # (B?, N, rotary_dim) each
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, N, rotary_dim): broadcast over heads
        rot, keep = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        rot = rot * cos + self._partner(rot) * sin
        return torch.cat([rot, keep], dim=-1) if keep.shape[-1] else rot

    def rotate(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.apply(q, q_positions), self.apply(k, k_positions)

    def forward(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate q and k by their positions: q (B, Hq, Nq, D), k (B, Hkv, Nk, D) -> the same
        shapes and dtypes (``rotate``; ``apply`` rotates one tensor).

        Args:
            q, k: queries and keys, D = ``head_dim``; only the first ``rotary_dim`` features turn.
            q_positions, k_positions: integer positions (Nq,) / (B, Nq) and (Nk,) / (B, Nk).
                Angles are computed in float32 (float64 for float64 inputs).

        Raises:
            ValueError: D is not ``head_dim``, or positions are not (N,) / (B, N).
        """
        return self.rotate(q, k, q_positions, k_positions)

    def extra_repr(self) -> str:
        layout = "interleaved (GPT-J)" if self.interleaved else "half-split (Llama/NeoX)"
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base:g}, {layout}"


class ALiBi(AttentionPositional):
    """ALiBi (Press et al. 2022): no position embedding; each head h adds ``-slope_h * |i - j|`` to
    its scores. ``slopes`` default to the paper's geometric sequence for ``num_heads``.

    i and j are array indices (query i at ``i + Nk - Nq``, bottom-right aligned), not the positions
    handed to ``rotate``: exact for unpadded rows and rows padded on one side, not for padding
    between real tokens, which ``Encoder`` / ``DecoderLM`` remove before attention (or refuse, with
    a KV cache)."""

    def __init__(self, num_heads: int, slopes: Tensor | None = None):
        super().__init__()
        slopes = alibi_slopes(num_heads) if slopes is None else torch.as_tensor(slopes, dtype=torch.float32)
        if slopes.shape != (num_heads,):
            raise ValueError(f"ALiBi: expected {num_heads} slopes (one per query head), got shape {tuple(slopes.shape)}")
        self.num_heads = num_heads
        self.register_buffer("slopes", slopes)  # (H,)

    def bias(self) -> Bias:
        """The structured ``ak.alibi(slopes)`` bias (-slope_h * |i - j| per head, never N x N)."""
        return alibi(self.slopes)

    def forward(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        """q (B, H, Nq, D), k (B, Hkv, Nk, D) -> q, k unchanged (same shapes and dtypes).

        ALiBi does not touch q and k: its positions enter the scores through ``bias()``, which
        ``MultiHeadAttention`` adds to the user's bias (H must equal the layer's query heads).
        ``q_positions`` / ``k_positions`` are accepted for the common interface and not read.
        """
        return self.rotate(q, k, q_positions, k_positions)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


def sinusoidal_table(num_positions: int, embed_dim: int, base: float = 10000.0) -> Tensor:
    """The (num_positions, E) sinusoidal table, e.g. to initialize a learned one."""
    return SinusoidalPositionalEncoding(embed_dim, base).encoding(torch.arange(num_positions))


__all__ = ["SinusoidalPositionalEncoding", "LearnedPositionalEmbedding", "AttentionPositional",
           "RotaryEmbedding", "ALiBi", "sinusoidal_table"]
