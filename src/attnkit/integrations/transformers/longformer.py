"""Longformer attention (Beltagy et al., 2020) inside transformers models, in one call.

- ``swap_longformer_attention(model)``: every transformers ``LongformerSelfAttention`` of a
  ``LongformerModel`` (``LongformerForMaskedLM``, ... any module holding them) becomes attnkit's
  (``DropInLongformerSelfAttention``, an ``attnkit.nn.LongformerSelfAttention`` that takes the
  arguments ``LongformerLayer`` passes and returns HF's tuple). Same outputs; the windowed pass
  runs on attnkit's backends (``banded`` is O(N·W)), ``attnkit.viz.capture`` records the layers.
- ``swap_encoder_attention(model, window=w, global_tokens=[0])``: every BERT-style self-attention
  (``BertSelfAttention``, ``RobertaSelfAttention`` and their copies) attends with
  ``ak.sliding_window(w) | ak.global_tokens(g)`` and the model's padding, with the layer's own
  query / key / value weights: a Longformer-style sparse version of a pretrained encoder, no new
  weights (Longformer's global tokens share the local projections here; there are no
  ``*_global`` layers to use).

Both change ``model`` in place and return it. Only this package imports transformers.

Legend: B batch, N tokens (after LongformerModel pads N to a multiple of the window), E hidden
size, H heads, D head dim, W = 2w + 1 the two-sided window, G the most global tokens a sample has.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...functional import attention, attention_weights
from ...masks import Mask, dense_mask, global_tokens, key_padding, sliding_window
from ...nn.longformer import LongformerPass, LongformerSelfAttention, TokenRoles, normalized_roles

PROBS_ROWS = 256  # output_attentions: query rows per reference step (r x N scores per head at a time)
BLOCKED = -1e4  # an additive mask entry at or below this is "no attention" (HF: -10000 or finfo.min)


# -- LongformerModel -------------------------------------------------------------------------------

class DropInLongformerSelfAttention(LongformerSelfAttention):
    """attnkit's ``LongformerSelfAttention`` called as transformers' ``LongformerLayer`` calls its
    ``attention.self``; built by ``from_hf(hf_module, impl=..., share_weights=...)``."""

    layer_id: int = 0

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                is_index_masked: Tensor | None = None, is_index_global_attn: Tensor | None = None,
                is_global_attn: bool | None = None, output_attentions: bool = False) -> tuple[Tensor, ...]:
        """HF's layer call, HF's return.

        Args:
            hidden_states: (B, N, E).
            attention_mask: LongformerModel's extended mask (B, N), float: 0 local, negative
                (-10000 or finfo.min) padding, positive (+10000 or finfo.max) global. Read only
                where ``is_index_masked`` / ``is_index_global_attn`` are not given.
            is_index_masked: (B, N) bool, True = padding (LongformerModel's own padding to a
                multiple of the window included). is_index_global_attn: (B, N) bool, True = global.
            is_global_attn: False means no token is global (HF then ignores is_index_global_attn).
            output_attentions: also return the probabilities in HF's layout (see Returns).

        Returns:
            ``(out,)`` with out (B, N, E); with output_attentions ``(out, local)`` and, when a token
            is global, ``(out, local, global_)``: local (B, N, H, G + W) holds row i's probability
            for each global slot, then for keys i - w .. i + w (0 outside the sequence, on padding
            and on global keys, which the first G columns hold); global tokens' and padding rows
            are 0. global_ (B, H, G, N): each global token's row, slots in position order. Both
            come from the reference formula (``ak.attention_weights``) a block of rows at a time,
            before dropout. Unlike HF, a sample's unused slots (it has fewer than G globals) get
            0 rows in global_, where HF puts a meaningless uniform row.

        Raises:
            TypeError / ValueError: hidden_states not (B, N, E); masks not (B, N) or, when the
                flags are missing, attention_mask missing or not floating point.
        """
        B, N = self._check_hidden(hidden_states)
        roles = _layer_roles(attention_mask, is_index_masked, is_index_global_attn, is_global_attn, B, N,
                             hidden_states.device)
        done = self._attend(hidden_states, roles)
        if not output_attentions:
            return (done.out,)
        local = hf_local_probs(done, self.one_sided_attn_window_size)
        if not is_global_attn:
            return done.out, local
        return done.out, local, hf_global_probs(done, self.num_heads, N)


def _flags(name: str, t: Tensor, B: int, N: int, device: torch.device) -> Tensor:
    if not isinstance(t, Tensor) or tuple(t.shape) != (B, N):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a bool tensor (B, N) = ({B}, {N}) like hidden_states, got {got}")
    return t.to(device=device, dtype=torch.bool)


def _layer_roles(attention_mask: Tensor | None, is_index_masked: Tensor | None,
                 is_index_global_attn: Tensor | None, is_global_attn: bool | None, B: int, N: int,
                 device: torch.device) -> TokenRoles:
    """Token roles from LongformerEncoder's arguments; the flags win, the extended mask fills in."""
    if (is_index_masked is None or is_index_global_attn is None) and attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or not attention_mask.is_floating_point():
            got = attention_mask.dtype if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise TypeError(f"attention_mask: expected LongformerModel's extended float mask (B, N) (0 local, "
                            f"< 0 padding, > 0 global), got {got}; or pass is_index_masked= and "
                            f"is_index_global_attn=")
        is_index_masked = attention_mask < 0 if is_index_masked is None else is_index_masked
        is_index_global_attn = attention_mask > 0 if is_index_global_attn is None else is_index_global_attn
    valid = None if is_index_masked is None else ~_flags("is_index_masked", is_index_masked, B, N, device)
    is_global = None
    if is_index_global_attn is not None and is_global_attn is not False:
        is_global = _flags("is_index_global_attn", is_index_global_attn, B, N, device)
    return normalized_roles(valid, is_global)


def hf_local_probs(done: LongformerPass, w: int) -> Tensor:
    """HF's ``attentions`` entry of a layer: (B, N, H, G + 2w + 1) (see the forward's Returns)."""
    B, H, N, _ = done.q.shape
    dev, roles, glob = done.q.device, done.roles, done.glob
    offsets = torch.arange(-w, w + 1, device=dev)  # (W,)
    blocks = []
    for r0 in range(0, N, PROBS_ROWS):
        rows = torch.arange(r0, min(N, r0 + PROBS_ROWS), device=dev)  # (r,)
        p = attention_weights(done.q[:, :, rows], done.k, mask=done.mask, rows=rows)  # (B, H, r, N)
        cols = rows[:, None] + offsets  # (r, W)
        shown = ((cols >= 0) & (cols < N)).expand(B, -1, -1)  # (B, r, W)
        if roles.is_global is not None:  # a global key's probability sits in the first G columns
            shown = shown & ~roles.is_global[:, cols.clamp(0, N - 1)]
        win = p.gather(3, cols.clamp(0, N - 1).expand(B, H, -1, -1)) * shown[:, None]  # (B, H, r, W)
        if glob is not None:
            g_cols = p.gather(3, glob.idx[:, None, None, :].expand(B, H, len(rows), -1))  # (B, H, r, G)
            win = torch.cat([g_cols * glob.real[:, None, None, :], win], 3)  # (B, H, r, G + W)
        blocks.append(win)
    probs = torch.cat(blocks, 2)  # (B, H, N, G + W)
    hidden = roles.is_global if roles.valid is None else ~roles.valid
    if roles.valid is not None and roles.is_global is not None:
        hidden = hidden | roles.is_global
    if hidden is not None:  # HF: padding rows and global rows (computed by the global pass) are 0
        probs = probs.masked_fill(hidden[:, None, :, None], 0.0)
    return probs.transpose(1, 2)  # (B, N, H, G + W)


def hf_global_probs(done: LongformerPass, H: int, N: int) -> Tensor:
    """HF's ``global_attentions`` entry of a layer: (B, H, G, N), 0 rows on unused slots."""
    glob = done.glob
    if glob is None:  # is_global_attn said yes but every global token is padding
        return done.q.new_zeros(done.q.shape[0], H, 0, N)
    p = attention_weights(glob.q, glob.k, mask=glob.mask)  # (B, H, G, N)
    return p * glob.real[:, None, :, None]


def swap_longformer_attention(model: nn.Module, *, impl: str = "auto") -> nn.Module:
    """Replace every transformers ``LongformerSelfAttention`` in ``model`` by attnkit's.

    Each becomes a ``DropInLongformerSelfAttention`` that shares the layer's weights (the six
    ``nn.Linear`` submodules are the same objects: no copy, same state-dict keys, so
    ``save_pretrained`` / ``load_state_dict`` and an existing optimizer keep working) and keeps
    its window, dropout, layer_id and train/eval mode. ``impl`` picks the attnkit backend of the
    windowed pass (``"auto"``: attnkit's choice; ``"banded"``: O(N·W)). Hooks registered on the
    replaced modules are not carried over. Source: Beltagy et al. 2020, "Longformer: The
    Long-Document Transformer", section 3.1 (sliding window + global attention).

    Returns:
        ``model``, changed in place (a second call changes nothing).

    Raises:
        ValueError: ``model`` holds no transformers ``LongformerSelfAttention`` (for BERT / RoBERTa
            use ``swap_encoder_attention``), or is one itself (use
            ``DropInLongformerSelfAttention.from_hf``); ``impl`` not a backend.
    """
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention as HFSelfAttention

    if isinstance(model, HFSelfAttention):
        raise ValueError("swap_longformer_attention replaces layers inside a model; for a lone transformers "
                         "LongformerSelfAttention use DropInLongformerSelfAttention.from_hf(module, "
                         "share_weights=True)")
    targets = [name for name, m in model.named_modules() if isinstance(m, HFSelfAttention)]
    swapped = any(isinstance(m, DropInLongformerSelfAttention) for m in model.modules())
    if not targets and not swapped:  # a second call on a swapped model changes nothing
        raise ValueError(f"swap_longformer_attention: {type(model).__name__} holds no transformers "
                         f"LongformerSelfAttention; for BERT/RoBERTa-style encoders use "
                         f"swap_encoder_attention(model, window=...)")
    for name in targets:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        old = getattr(owner, attr)
        new = DropInLongformerSelfAttention.from_hf(old, impl=impl, share_weights=True)
        new.layer_id = getattr(old, "layer_id", 0)
        setattr(owner, attr, new)
    return model


# -- BERT / RoBERTa-style encoders -----------------------------------------------------------------

@dataclass(frozen=True)
class EncoderPattern:
    """The pattern a swapped encoder layer attends with: ``sliding_window(window)`` (``window``
    keys on each side) ``| global_tokens(...)``, ``& key_padding`` from the model's mask."""

    window: int
    global_positions: tuple[int, ...]  # shared by the batch; a call's global_attention_mask replaces them
    impl: str = "auto"

    def mask(self, attention_mask: object, global_attention_mask: object, B: int, N: int,
             device: torch.device) -> Mask:
        mask = sliding_window(self.window)
        flags = _global_flags(self.global_positions, global_attention_mask, B, N, device)
        if flags is not None:
            mask = mask | global_tokens(flags)
        padding = _padding_mask(attention_mask, B, N, device)
        return mask if padding is None else mask & padding


def _global_flags(positions: tuple[int, ...], per_call: object, B: int, N: int,
                  device: torch.device) -> Tensor | list[int] | None:
    """The call's global_attention_mask (B, N) (nonzero = global), else the fixed positions."""
    if per_call is not None:
        if not isinstance(per_call, Tensor) or tuple(per_call.shape) != (B, N):
            got = tuple(per_call.shape) if isinstance(per_call, Tensor) else type(per_call).__name__
            raise ValueError(f"global_attention_mask must be a tensor (B, N) = ({B}, {N}) (nonzero = global "
                             f"token), got {got}")
        return per_call.to(device) != 0
    if positions and max(positions) >= N:
        raise ValueError(f"global token position {max(positions)} is past the N={N} tokens of this batch; "
                         f"swap with global_tokens below N, or pass global_attention_mask= (B, N) per call")
    return list(positions) or None


def _allowed_from_additive(m: Tensor) -> Tensor:
    """A float mask of 0 (attend) and large negatives (blocked) -> bool, True = may attend."""
    allowed, blocked = m == 0, m <= BLOCKED
    if not bool((allowed | blocked).all()):
        bad = m[~(allowed | blocked)][0].item()
        raise ValueError(f"attention_mask holds {bad!r}: an additive mask must be 0 (attend) or <= {BLOCKED} "
                         f"(blocked); other values are a bias, which the windowed layers do not carry")
    return allowed


def _padding_mask(attention_mask: object, B: int, N: int, device: torch.device) -> Mask | None:
    """The model's mask as an attnkit mask: ``key_padding`` when every query row agrees (what
    transformers builds from a 0/1 attention_mask), else the dense 4-D mask itself; with
    ``attn_implementation="attnkit"`` the attnkit mask transformers' mask interface built."""
    from . import LayerMask  # attn_implementation="attnkit": the model's mask, already an attnkit mask

    if attention_mask is None:
        return None
    if isinstance(attention_mask, LayerMask):
        return attention_mask.mask
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask: a {type(attention_mask).__name__} is not supported (flex_attention's "
                        f"BlockMask?); load the model with attn_implementation='eager', 'sdpa' or 'attnkit'")
    m = attention_mask.to(device)
    if m.dim() == 2 and tuple(m.shape) == (B, N):  # flash-attention style: 1 = real token
        valid = m != 0
    elif m.dim() == 4 and tuple(m.shape[2:]) == (N, N) and m.shape[0] in (1, B):
        allowed = m if m.dtype == torch.bool else _allowed_from_additive(m)  # (B or 1, 1 or H, N, N)
        if m.shape[1] != 1 or not bool((allowed == allowed[:, :, :1]).all()):
            return dense_mask(allowed)  # not a padding mask: kept whole (materialized)
        valid = allowed[:, 0, 0].expand(B, N)
    else:
        raise ValueError(f"attention_mask has shape {tuple(m.shape)}; expected transformers' 4-D mask "
                         f"(B, 1, N, N) = ({B}, 1, {N}, {N}) or a 2-D (B, N) padding mask")
    return None if bool(valid.all()) else key_padding(valid)


class WindowedSelfAttention:
    """Mixin put in front of a transformers BERT-style self-attention class by
    ``swap_encoder_attention``: same module, same weights, attnkit's windowed attention."""

    attnkit_pattern: EncoderPattern

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, cache: object = None,
                **kwargs) -> tuple[Tensor, Tensor | None]:
        """transformers' call (``BertSelfAttention.forward`` in 5.x) and return ``(out, weights)``:
        out (B, N, H * D); weights (B, H, N, N) from the reference formula when the call has
        ``output_attentions=True`` (before dropout), else None. ``global_attention_mask`` (B, N)
        (nonzero = global), passed to the model's forward, reaches here through its ``**kwargs``
        and replaces the swap's global positions for that call. Other kwargs are ignored, as HF's
        eager path ignores them, except a relative position bias, which is refused.

        Raises:
            NotImplementedError: a KV cache (decoder use); a relative position bias (``position_bias``).
            ValueError / TypeError: see ``swap_encoder_attention``'s per-call errors.
        """
        if cache is not None or kwargs.get("past_key_values") is not None:
            raise NotImplementedError("swap_encoder_attention makes bidirectional encoder layers; a KV cache "
                                      "(decoder use) is not supported")
        if kwargs.get("position_bias") is not None or kwargs.get("rel_pos") is not None:
            raise NotImplementedError(f"{type(self).__name__} is given a relative position bias (LayoutLMv3, "
                                      "DeBERTa-style), which swap_encoder_attention does not add; it swaps "
                                      "BERT/RoBERTa-style layers without one")
        B, N, _ = hidden_states.shape
        pattern = self.attnkit_pattern
        mask = pattern.mask(attention_mask, kwargs.get("global_attention_mask"), B, N, hidden_states.device)
        q, k, v = (self._attnkit_heads(proj(hidden_states)) for proj in (self.query, self.key, self.value))
        dropout_p = self.dropout.p if self.training else 0.0
        out = attention(q, k, v, mask=mask, scale=self.scaling, dropout_p=dropout_p,
                        impl=pattern.impl)  # (B, H, N, D)
        weights = attention_weights(q, k, mask=mask, scale=self.scaling) if kwargs.get("output_attentions") else None
        return out.transpose(1, 2).reshape(B, N, -1), weights  # (B, N, H * D)

    def _attnkit_heads(self, t: Tensor) -> Tensor:
        B, N, _ = t.shape
        return t.reshape(B, N, self.num_attention_heads, self.attention_head_size).transpose(1, 2)  # (B, H, N, D)

    def extra_repr(self) -> str:
        p = self.attnkit_pattern
        return f"attnkit: sliding_window({p.window}) | global_tokens({list(p.global_positions)}), impl={p.impl!r}"


@functools.cache
def _windowed_class(cls: type) -> type:
    return type(f"Windowed{cls.__name__}", (WindowedSelfAttention, cls),
                {"__module__": __name__, "__doc__": f"{cls.__name__} attending with attnkit's windowed mask."})


ENCODER_ATTRS = ("query", "key", "value", "num_attention_heads", "attention_head_size", "scaling", "dropout")


def _is_encoder_self_attention(m: nn.Module) -> bool:
    base = next((c for c in type(m).__mro__ if c.__module__.startswith("transformers.")), None)  # HF's class
    return (base is not None and base.__name__.endswith("SelfAttention")
            and all(hasattr(m, a) for a in ENCODER_ATTRS) and isinstance(m.dropout, nn.Dropout))


def _check_swap_args(window: int, global_tokens: Sequence[int], impl: str) -> tuple[int, ...]:
    from ...functional import backends

    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window={window!r}: expected an int >= 0, the keys seen on each side "
                         f"(Longformer's attention_window=512 is window=256)")
    positions = tuple(global_tokens)
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in positions):
        raise ValueError(f"global_tokens={global_tokens!r}: expected positions as ints >= 0 (e.g. [0] for "
                         f"[CLS]); pass per-sample global tokens as global_attention_mask= (B, N) per call")
    if impl != "auto" and impl not in backends():
        raise ValueError(f"impl={impl!r} is not a backend; choose 'auto' or one of {sorted(backends())}")
    return tuple(sorted(set(positions)))


def swap_encoder_attention(model: nn.Module, *, window: int, global_tokens: Sequence[int] = (0,),
                           impl: str = "auto") -> nn.Module:
    """Make every BERT-style self-attention of ``model`` attend Longformer-style, without new weights.

    Each transformers self-attention module with ``query`` / ``key`` / ``value`` layers
    (``BertSelfAttention``, ``RobertaSelfAttention``, ...; 5.x signature) keeps its identity,
    weights and mode; only its forward changes (its class becomes a subclass of its own class,
    so transformers' ``output_attentions`` recording and isinstance checks still see it). It then
    attends with ``ak.sliding_window(window) | ak.global_tokens(g)``, and-ed with the padding in
    the model's attention mask, scale and dropout as before. Calling it again replaces the pattern.

    Args:
        window: keys seen on each side (``window >= N - 1``: full attention, the original model).
        global_tokens: positions shared by every sample that attend to and are attended by all
            (default ``(0,)``, the [CLS] token; ``()`` for none). Per call, ``model(...,
            global_attention_mask=g)`` with g (B, N), nonzero = global, replaces them (BERT and
            RoBERTa pass their forward's extra kwargs down to the layers).
        impl: attnkit backend (``"auto"``; ``"banded"`` is O(N·W) for window | global | padding).

    Returns:
        ``model``, changed in place. Whole-object pickling of it fails (the subclasses are made
        at run time); save it with ``save_pretrained`` / ``state_dict`` as usual.

    Raises:
        ValueError: bad window / global_tokens / impl; no such layer in model; a causal or decoder
            layer (``is_causal`` / ``config.is_decoder``: the pattern is bidirectional).
        Per call: ValueError for a global position >= N, a global_attention_mask not (B, N), or an
        additive mask with values other than 0 / <= -1e4; TypeError for a flex ``BlockMask``.

    Source: Beltagy et al. 2020, "Longformer", section 3 (and 5: initializing from RoBERTa).
    """
    positions = _check_swap_args(window, global_tokens, impl)
    layers = [(n, m) for n, m in model.named_modules() if _is_encoder_self_attention(m)]
    if not layers:
        raise ValueError(f"swap_encoder_attention: {type(model).__name__} holds no transformers BERT-style self-"
                         f"attention (a *SelfAttention module with {', '.join(ENCODER_ATTRS)}); for "
                         f"LongformerModel use swap_longformer_attention")
    for name, m in layers:
        if getattr(m, "is_causal", False) or getattr(getattr(m, "config", None), "is_decoder", False):
            raise ValueError(f"{name or type(m).__name__} is a causal/decoder self-attention; "
                             f"swap_encoder_attention makes bidirectional windows (encoders only)")
    pattern = EncoderPattern(window, positions, impl)
    for _, m in layers:
        if not isinstance(m, WindowedSelfAttention):
            m.__class__ = _windowed_class(type(m))
        m.attnkit_pattern = pattern
    return model
