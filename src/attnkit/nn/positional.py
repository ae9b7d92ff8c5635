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

``RopeScaling`` stretches RoPE past the pretraining context the ways released checkpoints do
(linear, dynamic NTK, YaRN, Llama 3.1), with transformers' numbers, and rotates part of the head.

Legend: B batch, N tokens, E model width, H heads, D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

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


# -- RoPE scaling: the frequencies of long-context checkpoints ------------------------------------

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_REQUIRED = {"default": (), "linear": ("factor",), "dynamic": ("factor", "max_position_embeddings"),
             "yarn": ("factor", "original_max_position_embeddings"),
             "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}
_POSITIVE = ("factor", "original_max_position_embeddings", "max_position_embeddings", "low_freq_factor",
             "high_freq_factor", "beta_fast", "beta_slow", "attention_factor")


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE's frequencies theta_i = base^(-2i/d) change for long contexts (d = rotary dim).

    ``rope_type`` and its numbers, with transformers' names (``rope_parameters`` / ``rope_scaling``):

    - ``"default"``: the original RoPE (Su et al. 2021, RoFormer).
    - ``"linear"``: theta_i / factor, i.e. positions divided by ``factor`` (position interpolation,
      Chen et al. 2023; kaiokendev).
    - ``"dynamic"``: NTK-aware scaling (bloc97, emozilla; transformers' "dynamic"): for a call whose
      largest position + 1 is L > ``max_position_embeddings`` = M the base becomes
      ``base * (factor * L / M - (factor - 1)) ** (d / (d - 2))``; otherwise the plain RoPE.
    - ``"yarn"``: YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension", eq. 17-23):
      high frequencies (more than ``beta_fast`` turns in the original context) are kept, low ones
      (fewer than ``beta_slow``) divided by ``factor``, a linear ramp between; cos and sin are
      multiplied by ``attention_factor`` (default ``0.1 ln(factor) + 1``, or DeepSeek's ratio of
      ``mscale`` / ``mscale_all_dim`` terms).
    - ``"llama3"``: Meta's Llama 3.1 rule: wavelengths above original/low_freq_factor divided by
      ``factor``, below original/high_freq_factor kept, a smooth blend between.

    ``partial_rotary_factor`` < 1 rotates only the first ``int(D * factor)`` features of a head
    (GPT-NeoX, Phi, Nemotron); the frequencies use that rotary dim d.
    ``max_position_embeddings`` is the config's (not a ``rope_parameters`` key); only "dynamic"
    needs it.

    Raises:
        ValueError: an unknown ``rope_type`` (naming the supported ones), a number its type needs
            missing, a number that is not positive, ``high_freq_factor <= low_freq_factor``.
    """

    rope_type: str = "default"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None
    low_freq_factor: float | None = None  # llama3
    high_freq_factor: float | None = None  # llama3
    beta_fast: float = 32.0  # yarn: more turns than this in the original context: kept
    beta_slow: float = 1.0  # yarn: fewer turns than this: interpolated (divided by factor)
    attention_factor: float | None = None  # yarn; None: from factor (and mscale / mscale_all_dim)
    mscale: float | None = None  # yarn (DeepSeek)
    mscale_all_dim: float | None = None  # yarn (DeepSeek)
    truncate: bool = True  # yarn: round the ramp's ends outward to whole pair indices
    partial_rotary_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r} is not supported; expected one of {list(ROPE_TYPES)}")
        missing = [key for key in _REQUIRED[self.rope_type] if getattr(self, key) is None]
        if missing:
            raise ValueError(f"rope_type={self.rope_type!r} needs {missing}, missing from the rope parameters "
                             "(max_position_embeddings is the model config's)")
        for key in (*_POSITIVE, "mscale", "mscale_all_dim", "partial_rotary_factor"):
            value = getattr(self, key)
            bad = not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            if value is not None and (bad or value < 0 or (value == 0 and key in _POSITIVE)):
                kind = "positive" if key in _POSITIVE else ">= 0"
                raise ValueError(f"rope parameter {key}={value!r}; expected a {kind} number")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor}; expected 0 < factor <= 1")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope_type='llama3': high_freq_factor={self.high_freq_factor} must exceed "
                             f"low_freq_factor={self.low_freq_factor} (Llama 3.1 uses 4.0 and 1.0)")

    @classmethod
    def from_dict(cls, params: Mapping, *, max_position_embeddings: int | None = None) -> RopeScaling:
        """A transformers ``rope_parameters`` / older ``rope_scaling`` dict -> ``RopeScaling``.

        Reads ``rope_type`` (or the older ``type``); ``rope_theta`` is RoPE's base, not read here.
        As transformers does, yarn and llama3 take ``original_max_position_embeddings`` from
        ``max_position_embeddings`` when the dict has none, yarn's ``factor: null`` means
        max / original (DeepSeek), and a null or 0 ``beta_fast`` / ``beta_slow`` means 32 / 1.

        Raises:
            TypeError: ``params`` is not a mapping.
            ValueError: see the class; also multimodal ``mrope_section``, which this does not compute.
        """
        if not isinstance(params, Mapping):
            raise TypeError(f"rope parameters: expected a dict like {{'rope_type': 'llama3', 'factor': 8.0, ...}}, "
                            f"got {type(params).__name__}")
        if params.get("mrope_section") is not None:
            raise ValueError("rope parameters have 'mrope_section' (multimodal RoPE); RotaryEmbedding does not "
                             "compute it")
        names = {f.name for f in fields(cls)} - {"rope_type", "max_position_embeddings"}
        values = {key: params[key] for key in names if params.get(key) is not None}
        values = {key: v for key, v in values.items() if not (key in ("beta_fast", "beta_slow") and v == 0)}
        rope_type = params.get("rope_type", params.get("type", "default"))
        original = values.setdefault("original_max_position_embeddings", max_position_embeddings) \
            if rope_type in ("yarn", "llama3") else None
        if rope_type == "yarn" and "factor" in params and values.get("factor") is None and original \
                and max_position_embeddings:
            values["factor"] = max_position_embeddings / original
        return cls(rope_type, max_position_embeddings=max_position_embeddings, **values)

    def attention_scaling(self) -> float:
        """The factor on cos and sin: YaRN's ``attention_factor`` (Peng et al. 2023, eq. 22:
        sqrt(1/t) = 0.1 ln(s) + 1), 1.0 for the other types."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def mscale(scale: float, weight: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0
        if self.mscale and self.mscale_all_dim:  # DeepSeek-V2/V3: a ratio of two such terms
            return float(mscale(self.factor, self.mscale) / mscale(self.factor, self.mscale_all_dim))
        return mscale(self.factor)


def _powers(base: float | Tensor, dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """base^(2i/d) for the d/2 pairs, (d/2,): theta_i = 1 / this. float32 as transformers computes it."""
    steps = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(dtype)
    return base ** (steps / dim)


def _llama3(inv_freq: Tensor, s: RopeScaling) -> Tensor:
    """Llama 3.1's rule (Meta, ``apply_scaling`` in llama-models): long wavelengths (> original /
    low_freq_factor) interpolated by ``factor``, short ones (< original / high_freq_factor) kept,
    and between them a blend that is linear in original / wavelength."""
    original = s.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)  # 0 .. 1 in the band
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    kept = torch.where(wavelen < original / s.high_freq_factor, inv_freq, blended)
    return torch.where(wavelen > original / s.low_freq_factor, inv_freq / s.factor, kept)


def _yarn(base: float, dim: int, s: RopeScaling, dtype: torch.dtype, device: torch.device) -> Tensor:
    """YaRN's "NTK-by-parts" frequencies (Peng et al. 2023, eq. 18-20): pair i keeps theta_i if it
    turns more than beta_fast times in the original context, takes theta_i / factor if fewer than
    beta_slow, and mixes the two by a linear ramp in i between (ends found from eq. 17 solved for i)."""

    def pair_index(turns: float) -> float:  # the i whose wavelength fits `turns` times in the original context
        return dim * math.log(s.original_max_position_embeddings / (turns * 2 * math.pi)) / (2 * math.log(base))
    low, high = pair_index(s.beta_fast), pair_index(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a step, not a division by zero
    ramp = ((torch.arange(dim // 2, dtype=dtype, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # the share of the original theta_i
    powers = _powers(base, dim, dtype, device)
    return 1.0 / (s.factor * powers) * (1 - keep) + 1.0 / powers * keep


def _ntk_base(base: float, dim: int, s: RopeScaling, seq_len: Tensor, dtype: torch.dtype) -> Tensor:
    """Dynamic NTK-aware base (bloc97; transformers' "dynamic") for a context of seq_len tokens, a
    0-dim tensor so the choice stays on the device (no host sync, traceable)."""
    L = torch.clamp(seq_len.to(dtype), min=s.max_position_embeddings)
    return base * ((s.factor * L / s.max_position_embeddings) - (s.factor - 1)) ** (dim / (dim - 2))


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
    - ``interleaved=True`` (GPT-J, the RoPE paper): feature 2i pairs with 2i + 1.

    ``rotary_dim`` < D rotates only the first rotary_dim features (GPT-J, NeoX, Phi, Nemotron
    partial rotary; ``scaling.partial_rotary_factor`` sets it to ``int(D * factor)``).
    ``scaling`` (``RopeScaling``) changes the frequencies for long contexts (linear, dynamic NTK,
    YaRN, Llama 3.1) and, for YaRN, multiplies cos and sin by its attention factor, as
    transformers does. Angles are computed in float32 as Llama/HF do (float64 for float64
    inputs), whatever the module's or the input's dtype, and the rotation in the input dtype.

    "dynamic" has no state: each call takes L = its largest position + 1 (over q's and k's
    positions). transformers keeps the frequencies of the longest call seen until a call shorter
    than ``max_position_embeddings`` resets them; the two agree on a fresh model and on a growing
    KV cache (prefill, then decoding), and differ only on a later call with
    max_position_embeddings <= L < the longest seen, which transformers serves stale frequencies.

    Raises:
        ValueError: rotary_dim odd, not in (0, head_dim], or not the one partial_rotary_factor
            gives; "dynamic" with rotary_dim < 4.   TypeError: ``scaling`` not a ``RopeScaling``.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, *, interleaved: bool = False,
                 rotary_dim: int | None = None, scaling: RopeScaling | None = None):
        super().__init__()
        scaling = RopeScaling() if scaling is None else scaling
        if not isinstance(scaling, RopeScaling):
            raise TypeError(f"RotaryEmbedding: scaling must be a RopeScaling (e.g. RopeScaling.from_dict("
                            f"config.rope_parameters)), got {type(scaling).__name__}")
        partial = int(head_dim * scaling.partial_rotary_factor)
        if rotary_dim is not None and scaling.partial_rotary_factor != 1.0 and rotary_dim != partial:
            raise ValueError(f"RotaryEmbedding: rotary_dim={rotary_dim} but scaling.partial_rotary_factor="
                             f"{scaling.partial_rotary_factor} gives {partial}; give one of them")
        rotary_dim = partial if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"RotaryEmbedding: rotary_dim must be even and in (0, head_dim={head_dim}], "
                             f"got {rotary_dim}")
        if scaling.rope_type == "dynamic" and rotary_dim < 4:
            raise ValueError(f"RotaryEmbedding: rope_type='dynamic' raises the base to d / (d - 2); rotary_dim="
                             f"{rotary_dim} needs to be at least 4")
        self.head_dim, self.rotary_dim, self.base, self.interleaved = head_dim, rotary_dim, float(base), interleaved
        self.scaling, self.attention_scaling = scaling, scaling.attention_scaling()

    @classmethod
    def from_rope_parameters(cls, head_dim: int, params: Mapping, *, max_position_embeddings: int | None = None,
                             interleaved: bool = False) -> RotaryEmbedding:
        """From a transformers ``rope_parameters`` dict: base ``rope_theta`` (default 10000) and
        ``RopeScaling.from_dict(params, max_position_embeddings=...)``. Raises as those do."""
        scaling = RopeScaling.from_dict(params, max_position_embeddings=max_position_embeddings)
        base = params.get("rope_theta")
        return cls(head_dim, 10000.0 if base is None else float(base), interleaved=interleaved, scaling=scaling)

    def inv_freq(self, dtype: torch.dtype, device: torch.device, seq_len: Tensor | int | None = None) -> Tensor:
        """theta_i, (rotary_dim/2,), for ``scaling``; computed as HF does in float32 (float64 for
        float64 inputs). ``seq_len`` (largest position + 1) matters only to "dynamic" (None: the plain
        RoPE). Not a buffer: ``model.to(bfloat16)`` must not round it."""
        s, d = self.scaling, self.rotary_dim
        if s.rope_type == "yarn":
            return _yarn(self.base, d, s, dtype, device)
        inv_freq = 1.0 / _powers(self.base, d, dtype, device)
        if s.rope_type == "linear":
            return inv_freq / s.factor
        if s.rope_type == "llama3":
            return _llama3(inv_freq, s)
        if s.rope_type == "dynamic" and seq_len is not None:
            seq_len = torch.as_tensor(seq_len, device=device)
            stretched = 1.0 / _powers(_ntk_base(self.base, d, s, seq_len, dtype), d, dtype, device)
            return torch.where(seq_len > s.max_position_embeddings, stretched, inv_freq)
        return inv_freq

    def cos_sin(self, positions: Tensor, dtype: torch.dtype,
                seq_len: Tensor | int | None = None) -> tuple[Tensor, Tensor]:
        """(..., N) positions -> cos, sin of shape (..., N, rotary_dim), laid out for this pairing and
        multiplied by the attention scaling (YaRN). ``seq_len``: see ``inv_freq`` (None: from these
        positions)."""
        work = torch.float64 if dtype == torch.float64 else torch.float32  # positions > 256 are not exact in bf16
        if seq_len is None:
            seq_len = _seq_len(positions)
        inv_freq = self.inv_freq(work, positions.device, seq_len)
        angles = positions.to(inv_freq.dtype)[..., None] * inv_freq  # (..., N, rotary_dim/2)
        angles = angles.repeat_interleave(2, -1) if self.interleaved else torch.cat([angles, angles], -1)
        cos, sin = angles.cos(), angles.sin()
        if self.attention_scaling != 1.0:  # YaRN: scales q.k by attention_scaling^2 (its 1/t)
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def _partner(self, x: Tensor) -> Tensor:
        """The feature each feature rotates with, signed: (-x2, x1) per pair."""
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack([-x2, x1], dim=-1).flatten(-2)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def apply(self, x: Tensor, positions: Tensor, *, seq_len: Tensor | int | None = None) -> Tensor:
        """x (B, H, N, D), positions (N,) or (B, N) -> x with its first rotary_dim features rotated.
        ``seq_len`` (dynamic only): the call's largest position + 1; None: from ``positions``."""
        B, N = x.shape[0], x.shape[-2]
        if x.shape[-1] != self.head_dim or positions.shape not in ((N,), (B, N), (1, N)):
            raise ValueError(f"RotaryEmbedding: expected x (B, H, N, {self.head_dim}) and positions (N,) or (B, N), "
                             f"got x {tuple(x.shape)} and positions {tuple(positions.shape)}")
        cos, sin = self.cos_sin(positions.to(x.device), x.dtype, seq_len)  # (B?, N, rotary_dim) each
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, N, rotary_dim): broadcast over heads
        rot, keep = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        rot = rot * cos + self._partner(rot) * sin
        return torch.cat([rot, keep], dim=-1) if keep.shape[-1] else rot

    def rotate(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        seq_len = None
        if self.scaling.rope_type == "dynamic":  # one set of frequencies for q and k, from the call's longest
            q_len, k_len = _seq_len(q_positions.to(q.device)), _seq_len(k_positions.to(q.device))
            seq_len = q_len if k_len is None else k_len if q_len is None else torch.maximum(q_len, k_len)
        return self.apply(q, q_positions, seq_len=seq_len), self.apply(k, k_positions, seq_len=seq_len)

    def forward(self, q: Tensor, k: Tensor, q_positions: Tensor, k_positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate q and k by their positions: q (B, Hq, Nq, D), k (B, Hkv, Nk, D) -> the same
        shapes and dtypes (``rotate``; ``apply`` rotates one tensor).

        Args:
            q, k: queries and keys, D = ``head_dim``; only the first ``rotary_dim`` features turn.
            q_positions, k_positions: integer positions (Nq,) / (B, Nq) and (Nk,) / (B, Nk).
                Angles are computed in float32 (float64 for float64 inputs); with "dynamic"
                scaling both use the frequencies for the largest of them.

        Raises:
            ValueError: D is not ``head_dim``, or positions are not (N,) / (B, N).
        """
        return self.rotate(q, k, q_positions, k_positions)

    def extra_repr(self) -> str:
        layout = "interleaved (GPT-J)" if self.interleaved else "half-split (Llama/NeoX)"
        scaled = "".join(f", {f.name}={getattr(self.scaling, f.name)!r}" for f in fields(RopeScaling)
                         if getattr(self.scaling, f.name) != f.default)  # only what differs from plain RoPE
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base:g}, {layout}{scaled}"


def _seq_len(positions: Tensor) -> Tensor | None:
    """The largest position + 1, a 0-dim tensor on the positions' device (None for no positions)."""
    return positions.max() + 1 if positions.numel() else None


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
           "RotaryEmbedding", "RopeScaling", "ROPE_TYPES", "ALiBi", "sinusoidal_table"]
