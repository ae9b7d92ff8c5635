"""Numbers about attention maps: attention rollout and per-head statistics.

All functions take attention probabilities as ``ak.attention_weights`` returns them, (B, H, Nq, Nk)
with rows summing to 1 (or to 0 for rows that may attend nowhere), and are plain torch: no plotting
library is needed.

- ``attention_rollout`` (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"):
  how much each input token flows into each position through all layers, with the residual
  connection modelled as ``0.5 * A + 0.5 * I`` per layer.
- ``head_entropy``: how spread each head's attention is (nats; 0 = one key, log n = uniform).
- ``mean_attention_distance``: how far each head looks, ``sum_j p_ij |pos_i - j|`` averaged.
- ``special_token_attention``: the share of attention that goes to given tokens ([CLS], [SEP]).

Legend: B batch, H heads, L layers, Nq / Nk query / key tokens (N for self-attention).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _check_probs(name: str, probs: Tensor) -> None:
    if not isinstance(probs, Tensor) or probs.dim() != 4 or not probs.is_floating_point():
        got = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"{name}: expected attention probabilities of shape (B, H, Nq, Nk) "
                         f"(ak.attention_weights), got {got}")


def _row_weights(probs: Tensor, query_valid: Tensor | None) -> Tensor:
    """(B, H, Nq) weights of the rows that count, per head: real queries for which this head
    attends somewhere (a row the head's mask or bias empties says nothing about the head)."""
    alive = probs.sum(-1) > 0  # (B, H, Nq)
    if query_valid is not None:
        if tuple(query_valid.shape) != (probs.shape[0], probs.shape[2]):
            raise ValueError(f"query_valid must be (B, Nq) = ({probs.shape[0]}, {probs.shape[2]}), got "
                             f"{tuple(query_valid.shape)}")
        alive = alive & query_valid.bool().to(probs.device)[:, None, :]
    return alive.to(probs.dtype)


def _row_mean(per_row: Tensor, weights: Tensor) -> Tensor:
    """(B, H, Nq) values averaged over the counted rows -> (B, H); 0 where no row counts."""
    return (per_row * weights).sum(-1) / weights.sum(-1).clamp(min=1)


def entropy_rows(probs: Tensor) -> Tensor:
    """Entropy (nats) of each attention row: (..., Nq, Nk) -> (..., Nq) float64; 0 log 0 = 0."""
    p = probs.double()
    return -torch.where(p > 0, p * p.clamp(min=1e-300).log(), torch.zeros_like(p)).sum(-1)


def distance_rows(probs: Tensor, query_positions: Tensor, key_positions: Tensor | None = None) -> Tensor:
    """``sum_j p_ij |pos_i - j|`` of each row: (..., r, Nk), positions (r,) -> (..., r) float64.
    ``key_positions`` (Nk,): the key each column holds (default 0..Nk-1; a map scored at some keys
    only, ``AttentionRecord.scored``)."""
    keys = torch.arange(probs.shape[-1]) if key_positions is None else key_positions
    keys = keys.to(probs.device)
    dist = (keys[None, :] - query_positions.to(probs.device)[:, None]).abs().double()  # (r, Nk)
    return (probs.double() * dist).sum(-1)


def special_rows(probs: Tensor, flags: Tensor) -> Tensor:
    """Attention mass on the flagged keys per row: (B, H, r, Nk), bool flags (B, Nk) -> (B, H, r)."""
    return (probs.double() * flags[:, None, None, :].to(probs.device)).sum(-1)


def special_flags(special: Tensor | Sequence[int], B: int, Nk: int, device: torch.device | None = None) -> Tensor:
    """Key positions (shared by the batch) or a bool (B, Nk) mask -> bool (B, Nk), checked."""
    flags = torch.as_tensor(special, device=device)
    if flags.dtype != torch.bool:
        if flags.dim() != 1 or (flags.numel() and (int(flags.min()) < 0 or int(flags.max()) >= Nk)):
            raise ValueError(f"special: expected key positions in 0..{Nk - 1} or a bool (B, Nk) mask, got {special!r}")
        flags = torch.zeros(Nk, dtype=torch.bool, device=device).index_fill_(0, flags.long(), True)
    flags = flags.reshape(-1, Nk).expand(B, Nk) if flags.dim() == 1 or flags.shape[0] == 1 else flags
    if tuple(flags.shape) != (B, Nk):
        raise ValueError(f"special: a bool mask must be (B, Nk) = ({B}, {Nk}), got {tuple(flags.shape)}")
    return flags


def head_entropy(probs: Tensor, query_valid: Tensor | None = None) -> Tensor:
    """Mean entropy (nats) of each head's attention rows -> (B, H).

    ``query_valid`` (B, Nq): 1 = a real query (padding rows are left out of the mean).
    """
    _check_probs("head_entropy", probs)
    return _row_mean(entropy_rows(probs), _row_weights(probs.double(), query_valid)).to(probs.dtype)


def mean_attention_distance(probs: Tensor, query_valid: Tensor | None = None) -> Tensor:
    """Mean over rows of ``sum_j p_ij |pos_i - j|`` in tokens -> (B, H).

    Query i sits at position ``i + Nk - Nq`` (attnkit's bottom-right alignment; i for Nq = Nk).
    """
    _check_probs("mean_attention_distance", probs)
    Nq, Nk = probs.shape[-2:]
    per_row = distance_rows(probs, torch.arange(Nq) + (Nk - Nq))  # (B, H, Nq)
    return _row_mean(per_row, _row_weights(probs, query_valid)).to(probs.dtype)


def special_token_attention(probs: Tensor, special: Tensor | Sequence[int],
                            query_valid: Tensor | None = None) -> Tensor:
    """Share of each head's attention that lands on the special keys -> (B, H), in [0, 1].

    ``special``: key positions (shared by the batch), or a bool (B, Nk) with True at special keys.
    """
    _check_probs("special_token_attention", probs)
    flags = special_flags(special, probs.shape[0], probs.shape[-1], probs.device)
    return _row_mean(special_rows(probs, flags), _row_weights(probs, query_valid)).to(probs.dtype)


def attention_rollout(layers: Sequence[Tensor], *, residual: float = 0.5, head_fusion: str = "mean") -> Tensor:
    """Attention rollout over L layers of self-attention maps, each (B, H, N, N) -> (B, N, N).

    Per layer: fuse heads (``mean``, ``max`` or ``min``), add the residual stream
    ``A' = (1 - residual) * A + residual * I``, renormalize rows; then multiply the layers,
    last layer on the left: ``R = A'_L ... A'_1``. Entry (i, j) is how much input token j
    contributes to position i at the top. Rows of R sum to 1.
    """
    if not layers:
        raise ValueError("attention_rollout: expected at least one layer's attention probabilities")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"attention_rollout: residual must lie in [0, 1], got {residual}")
    fuse = {"mean": lambda a: a.mean(1), "max": lambda a: a.amax(1), "min": lambda a: a.amin(1)}
    if head_fusion not in fuse:
        raise ValueError(f"attention_rollout: head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    rollout = None
    for i, probs in enumerate(layers):
        _check_probs(f"attention_rollout (layer {i})", probs)
        if probs.shape[-1] != probs.shape[-2] or (rollout is not None and probs.shape[-1] != rollout.shape[-1]):
            raise ValueError(f"attention_rollout: layer {i} has shape {tuple(probs.shape)}; every layer must be "
                             "self-attention over the same N tokens (B, H, N, N)")
        a = fuse[head_fusion](probs.double())  # (B, N, N)
        a = (1 - residual) * a + residual * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True).clamp(min=1e-300)
        rollout = a if rollout is None else a @ rollout  # (B, N, N)
    return rollout.to(layers[0].dtype)
