"""transformers' mask description -> an attnkit mask, structurally where possible.

transformers (>= 4.53, ``masking_utils``) describes a layer's mask as a *mask function*
``f(batch_idx, head_idx, q_idx, kv_idx) -> bool`` composed from a few factories
(``causal_mask_function``, ``sliding_window_overlay(w)``, ``and_masks(...)``, ``padding_mask_function``,
``packed_sequence_mask_function``, ...), and hands it to the mask interface registered for the
model's ``attn_implementation`` together with the sizes, the offsets and the 2-D padding mask.
The interface of "attnkit" (``mask_interface``) reads that composition back:

===================================================  =====================================
transformers                                          attnkit
===================================================  =====================================
``causal_mask_function``                              ``causal()``
``bidirectional_mask_function``                       no mask
``sliding_window_overlay(w)`` (with causal)           ``sliding_window(w - 1, 0)``
``sliding_window_bidirectional_overlay(w)``           ``sliding_window(w, w)``
``and_masks`` / ``or_masks``                           ``&`` / ``|``
``packed_sequence_mask_function(ids)``                ``document(ids)``
2-D ``attention_mask`` (padding, left or right)       ``& key_padding(valid)``
===================================================  =====================================

so the backends see the structure (and skip what it rules out). Anything else (chunked or
blockwise overlays, a user's mask function, offsets that do not match attnkit's bottom-right
alignment) becomes an exact dense bool mask built by transformers' own ``sdpa_mask``: never
dropped, never approximated. ``Translation.how`` says which way a layer went.

Legend: B batch, Nq queries, Nk keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import masking_utils as mu

from ... import masks as ak_masks
from ...masks import Mask

FULL = "full"  # the marker of "every key": an operand of & and | that needs no mask


class Unknown(Exception):
    """A part of the mask function that has no structural attnkit equivalent."""


@dataclass(frozen=True)
class Translation:
    """An attnkit mask for one layer call and how it was obtained ("structural" or "dense: why")."""

    mask: Mask | None
    how: str


def _cells(fn) -> dict[str, object]:
    """The closure variables of a mask-function factory's inner function."""
    names = fn.__code__.co_freevars
    return {name: cell.cell_contents for name, cell in zip(names, fn.__closure__ or ())}


def _factory(fn) -> str:
    """'and_masks', 'sliding_window_overlay', ...: the masking_utils factory that made ``fn``."""
    if getattr(fn, "__module__", None) != mu.__name__:
        raise Unknown(f"mask function {getattr(fn, '__qualname__', fn)!r} is not one of transformers' masking_utils")
    return fn.__qualname__.split(".<locals>")[0]


def _combine(op: str, parts: list[object]) -> object:
    """& or | over translated parts, where FULL is the neutral (&) or absorbing (|) element."""
    if op == "&":
        parts = [p for p in parts if p is not FULL]
        if not parts:
            return FULL
    elif any(p is FULL for p in parts):
        return FULL
    out = parts[0]
    for p in parts[1:]:
        out = (out & p) if op == "&" else (out | p)
    return out


def _causal_window(parts: list[object]) -> list[object]:
    """``sliding_window_overlay(w) & causal``: transformers' overlay is open on the right and is
    only ever used under causal; as one attnkit mask that is ``sliding_window(w - 1, 0)``."""
    overlays = [p for p in parts if isinstance(p, _Overlay)]
    if not overlays:
        return parts
    if not any(isinstance(p, ak_masks.Causal) for p in parts):
        raise Unknown("sliding_window_overlay without causal_mask_function")
    rest = [p for p in parts if not isinstance(p, (_Overlay, ak_masks.Causal))]
    w = min(o.window for o in overlays)
    return [ak_masks.sliding_window(w - 1, 0)] + rest


@dataclass(frozen=True)
class _Overlay:
    window: int  # key j visible from query i when j > i - window (no bound on the right)


def _translate(fn, packed: Tensor | None) -> object:
    """The attnkit mask (or FULL, or an _Overlay inside and_masks) of one mask function."""
    if fn is mu.causal_mask_function:
        return ak_masks.causal()
    if fn is mu.bidirectional_mask_function:
        return FULL
    kind, cells = _factory(fn), _cells(fn)
    if kind in ("and_masks", "or_masks"):
        parts = [_translate(f, packed) for f in cells["mask_functions"]]
        if kind == "and_masks":
            return _combine("&", _causal_window(parts))
        if any(isinstance(p, _Overlay) for p in parts):
            raise Unknown("sliding_window_overlay inside or_masks")
        return _combine("|", parts)
    if kind == "sliding_window_overlay":
        return _Overlay(int(cells["sliding_window"]))
    if kind == "sliding_window_bidirectional_overlay":
        w = int(cells["sliding_window"])
        return ak_masks.sliding_window(w, w)
    if kind == "packed_sequence_mask_function":
        return ak_masks.document(cells["packed_sequence_mask"])
    if kind == "remap_positions_for_packed_sequence" and packed is not None:
        # positions restart at each packed sequence and rise by 1 inside it (find_packed_sequence_indices),
        # so inside one document the remapped offsets are the raw ones; the document mask does the rest
        return _translate(cells["mask_function"], packed)
    raise Unknown(f"{kind} has no structural attnkit equivalent")


def _packed_ids(fn) -> Tensor | None:
    """The packed-sequence ids anywhere in the composition (they license the position remap)."""
    try:
        kind, cells = _factory(fn), _cells(fn)
    except (Unknown, AttributeError):
        return None
    if kind == "packed_sequence_mask_function":
        return cells["packed_sequence_mask"]
    for f in cells.get("mask_functions", ()):
        found = _packed_ids(f)
        if found is not None:
            return found
    return None


def _padding(attention_mask: Tensor | None, kv_length: int, kv_offset: int) -> Mask | None:
    """``key_padding(valid)`` from transformers' 2-D mask (B, >= kv_offset + Nk), or None if all real."""
    if attention_mask is None:
        return None
    valid = mu.prepare_padding_mask(attention_mask.bool(), kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
    if bool(valid.all()):
        return None
    return ak_masks.key_padding(valid)


def _aligned(q_length: int, kv_length: int, q_offset: int, kv_offset: int) -> bool:
    """attnkit aligns queries bottom-right: query i sits at key position i + (Nk - Nq)."""
    return q_offset - kv_offset == kv_length - q_length


def _dense(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, device,
           why: str) -> Translation:
    """Exactly transformers' mask, as a dense (B, 1, Nq, Nk) bool attnkit mask."""
    dense = mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         allow_is_causal_skip=False, allow_is_bidirectional_skip=False, device=device)
    if dense is None:  # sdpa_mask found nothing to mask
        return Translation(None, f"dense: {why} (nothing masked)")
    return Translation(ak_masks.dense_mask(dense.to(torch.bool)), f"dense: {why}")


def translate(batch_size: int, q_length: int, kv_length: int, q_offset: int | Tensor = 0, kv_offset: int = 0,
              mask_function=mu.causal_mask_function, attention_mask: Tensor | None = None,
              device: torch.device | str = "cpu") -> Translation:
    """The attnkit mask of one call of transformers' mask interface (its arguments, same names).

    Returns a structural mask where the composition is known and the offsets match attnkit's
    bottom-right alignment, else the exact dense mask (``Translation.how`` says why).
    """
    q_offset = int(q_offset)
    args = (batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, device)
    try:
        structure = _translate(mask_function, _packed_ids(mask_function))
    except Unknown as why:
        return _dense(*args, str(why))
    if isinstance(structure, _Overlay):
        return _dense(*args, "a sliding-window overlay on its own")
    if structure is not FULL and not _aligned(q_length, kv_length, q_offset, kv_offset):
        return _dense(*args, f"offsets q={q_offset}, kv={kv_offset} for Nq={q_length}, Nk={kv_length} are not "
                             "bottom-right aligned")
    padding = _padding(attention_mask, kv_length, kv_offset)
    parts = [m for m in (None if structure is FULL else structure, padding) if m is not None]
    mask = _combine("&", parts) if parts else None
    return Translation(mask, "structural")
