"""attnkit inside Hugging Face transformers: ``attn_implementation="attnkit"`` for any model that
uses transformers' attention interface (Llama, Mistral, Qwen2, Gemma 2, BERT, RoBERTa, ...).

    import attnkit.integrations.transformers          # registers "attnkit" (register() again is a no-op)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnkit")

Two registrations, both transformers' own extension points:

- ``AttentionMaskInterface["attnkit"]``: the model's mask, as transformers describes it (a mask
  function, sizes, offsets, the 2-D padding mask), becomes an attnkit mask *structurally* (causal,
  sliding-window layers, bidirectional encoders, padding left or right, packed sequences ->
  ``document``; ``_masks.py``), or, for anything else, the exact dense mask. Never dropped.
- ``AttentionInterface["attnkit"]``: the layer's q, k, v (B, H, N, D), with GQA kept as Hkv heads,
  go to ``ak.attention`` with that mask, the layer's ``scaling``, its ``dropout`` (training) and
  ``softcap`` (Gemma 2's ``attn_logit_softcapping``); ``auto`` picks the backend.

Caches and ``generate`` work: transformers appends to the cache before the attention call, and
the mask interface is given the cache's offsets (bottom-right aligned as attnkit's masks are).
The attention weights are not returned (``output_attentions`` gives none, as with sdpa); use
``attnkit.viz.capture(model)``, which records the layers' calls through ``observing``.
``explain_model(model, inputs)`` says, per layer, how its mask was translated and which backend
``auto`` picks and why.

transformers' Longformer does not use the attention interface: ``swap_longformer_attention(model)``
puts attnkit's Longformer attention in its place, and ``swap_encoder_attention(model, window=...)``
makes a BERT/RoBERTa encoder attend Longformer-style with its own weights (``longformer.py``).

Legend: B batch, Hq / Hkv query / key-value heads, Nq / Nk queries / keys, D head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ...functional import Explanation, attention, explain
from ...masks import Mask, causal, dense_mask
from ._masks import Translation, translate

NAME = "attnkit"
Observer = Callable[["AttentionCall"], None]
_observers: contextvars.ContextVar[tuple[Observer, ...]] = contextvars.ContextVar("attnkit_hf_observers", default=())


@dataclass(frozen=True)
class AttentionCall:
    """One attention call through "attnkit", as observers see it (references, nothing copied).

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) after RoPE and the cache; ``mask`` the
    attnkit mask and ``how`` its translation ("structural", "dense: <why>", "none"); ``bias`` a
    float tensor a caller passed as a 4-D additive mask, else None; ``scale`` and ``softcap`` as
    given to ``ak.attention``."""

    module: nn.Module
    q: Tensor
    k: Tensor
    v: Tensor
    mask: Mask | None
    bias: Tensor | None
    scale: float | None
    softcap: float | None
    how: str


@dataclass(frozen=True)
class LayerMask:
    """What the mask interface hands the attention function: the attnkit mask and how it was made."""

    mask: Mask | None
    how: str
    size: tuple[int, int, int]  # (B, Nq, Nk) it was made for

    def _not_a_tensor(self, *_: object, **__: object):
        raise TypeError("this model uses attnkit's mask as a tensor: its attention code does not go through "
                        "transformers' attention interface, so attn_implementation='attnkit' cannot run it; "
                        "use 'sdpa' or 'eager' (attnkit.integrations.transformers works with models whose "
                        "attention calls ALL_ATTENTION_FUNCTIONS: Llama, Mistral, Qwen2, Gemma, BERT, ...)")

    __add__ = __radd__ = __mul__ = __rmul__ = __getitem__ = to = _not_a_tensor

    ndim = 4  # generate() builds masks ahead for compileable (static) caches and hands them back to the
    # model, whose mask creation then reads ``attention_mask.ndim``: as a prepared 4-D mask it is passed through


def mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                   mask_function=None, attention_mask: Tensor | LayerMask | None = None, device="cpu",
                   **_: object) -> LayerMask:
    """transformers' mask interface for "attnkit" (the signature of ``masking_utils.sdpa_mask``)."""
    if isinstance(attention_mask, LayerMask):  # built ahead by generate() for this very step
        if attention_mask.size != (batch_size, q_length, kv_length):
            raise ValueError(f"attnkit: a prepared mask for (B, Nq, Nk) = {attention_mask.size} came back for "
                             f"{(batch_size, q_length, kv_length)}; pass the 2-D padding mask instead")
        return attention_mask
    kw = {} if mask_function is None else {"mask_function": mask_function}
    t: Translation = translate(batch_size, q_length, kv_length, q_offset, kv_offset, attention_mask=attention_mask,
                               device=device, **kw)
    return LayerMask(t.mask, t.how, (batch_size, q_length, kv_length))


def _as_mask(attention_mask: object, module: nn.Module, q: Tensor,
             is_causal: bool | None = None) -> tuple[Mask | None, Tensor | None, str]:
    """(mask, bias, how) for ak.attention from what the model passed as attention_mask."""
    if isinstance(attention_mask, LayerMask):
        return attention_mask.mask, None, attention_mask.how
    if attention_mask is None:  # a model that builds no mask: is_causal (the call's, else the module's) says
        causal_call = getattr(module, "is_causal", False) if is_causal is None else is_causal
        if causal_call and q.shape[2] > 1:
            return causal(), None, "structural: no mask given, is_causal"
        return None, None, "none"
    if isinstance(attention_mask, Tensor) and attention_mask.dtype == torch.bool:
        return dense_mask(attention_mask), None, "dense: a 4-D bool mask was passed in"
    if isinstance(attention_mask, Tensor) and attention_mask.is_floating_point():
        return None, attention_mask, "bias: a 4-D additive mask was passed in"  # exact as a bias
    raise TypeError(f"attnkit attention got attention_mask of type {type(attention_mask).__name__}; expected the "
                    "mask attnkit's mask interface builds, None, or a 4-D bool / additive float tensor")


UNSUPPORTED_KWARGS = ("sinks",)  # meaningful arguments some models pass that attnkit does not compute


def _with_position_bias(bias: Tensor | None, position_bias: object) -> Tensor | None:
    """T5-style relative position bias (B or 1, Hq, Nq, Nk), added to the scores like a 4-D float mask."""
    if position_bias is None:
        return bias
    if not isinstance(position_bias, Tensor) or not position_bias.is_floating_point():
        raise TypeError(f"attnkit attention: position_bias must be a float tensor, got {type(position_bias).__name__}")
    return position_bias if bias is None else bias + position_bias


def _attention_sinks(out: Tensor, lse: Tensor, s_aux: Tensor) -> Tensor:
    """GPT-OSS's attention sinks: one extra logit per head in each row's softmax denominator, that
    attends to nothing. With the row's log-sum-exp: out * exp(lse) / (exp(lse) + exp(sink)) =
    out * sigmoid(lse - sink). out (B, Hq, Nq, Dv), lse (B, Hq, Nq), s_aux (Hq,)."""
    weight = torch.sigmoid(lse - s_aux.to(lse.dtype).reshape(1, -1, 1))  # (B, Hq, Nq); 0 where lse = -inf
    return out * weight[..., None].to(out.dtype)


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: object,
                      scaling: float | None = None, dropout: float = 0.0, softcap: float | None = None,
                      **kwargs: object) -> tuple[Tensor, None]:
    """transformers' attention interface for "attnkit".

    Args:
        module: the calling attention layer (its ``is_causal`` is read when no mask is given).
        query: (B, Hq, Nq, D); key: (B, Hkv, Nk, D); value: (B, Hkv, Nk, Dv), after RoPE and the cache.
        attention_mask: what ``mask_interface`` built (``LayerMask``), None, or a 4-D bool / float tensor.
        scaling: the score scale (None: 1/sqrt(D)); dropout: attention dropout (transformers passes 0
            in eval); softcap: Gemma 2's logit soft-capping (None: none).
        kwargs: transformers' other keyword arguments. Honoured: ``is_causal`` (when no mask is given),
            ``position_bias`` (T5's relative bias, added to the scores), ``s_aux`` (GPT-OSS's attention
            sinks, through the lse); ``attnkit_impl`` picks a backend ("auto"). Refused with a
            TypeError: ``sinks`` and any other argument that would change the result.

    Returns:
        (out (B, Nq, Hq, Dv) contiguous, None): transformers' layout; no attention weights.
    """
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise TypeError(f"attnkit attention: {type(module).__name__} passes {name}=, which attnkit does not "
                            f"compute; run this model with attn_implementation='sdpa' or 'eager'")
    mask, bias, how = _as_mask(attention_mask, module, query, kwargs.get("is_causal"))
    bias = _with_position_bias(bias, kwargs.get("position_bias"))
    sinks = kwargs.get("s_aux")
    impl = kwargs.get("attnkit_impl", "auto")
    observers = _observers.get()
    if observers:
        call = AttentionCall(module=module, q=query, k=key, v=value, mask=mask, bias=bias, scale=scaling,
                             softcap=softcap, how=how)
        for observe in observers:
            observe(call)
    out = attention(query, key, value, mask=mask, bias=bias, scale=scaling, dropout_p=dropout, softcap=softcap,
                    impl=impl, return_lse=sinks is not None)  # (B, Hq, Nq, Dv)
    if sinks is not None:
        out = _attention_sinks(*out, sinks)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register "attnkit" with transformers' attention and mask interfaces (idempotent); returns the name."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_interface)
    return NAME


@contextlib.contextmanager
def observing(callback: Observer) -> Iterator[None]:
    """Call ``callback(call: AttentionCall)`` for every attention call that runs through "attnkit"
    inside the block, before it runs. It receives references; keep them only as long as needed."""
    token = _observers.set(_observers.get() + (callback,))
    try:
        yield
    finally:
        _observers.reset(token)


@dataclass(frozen=True)
class LayerExplanation:
    """One attention call of a model: the layer's name, the mask's translation and ``ak.explain``."""

    name: str
    mask: str
    explanation: Explanation

    def __str__(self) -> str:
        return f"{self.name}: mask {self.mask}\n" + str(self.explanation)


def explain_model(model: nn.Module, *args: object, **kwargs: object) -> list[LayerExplanation]:
    """Run ``model(*args, **kwargs)`` once (no grad) and explain every attention call it makes
    through "attnkit": which backend auto picks for each layer and why, and how its mask was
    translated. The model must use ``attn_implementation="attnkit"``.

    Raises:
        ValueError: the model does not run its attention through "attnkit" (no call was seen).
    """
    names = {m: n for n, m in model.named_modules()}
    found: list[LayerExplanation] = []

    def record(c: AttentionCall) -> None:
        v = c.k.new_empty(c.k.shape)  # explain reads shapes and dtypes only
        how = c.how if c.mask is None else f"{c.mask!r} ({c.how})"
        found.append(LayerExplanation(names.get(c.module, type(c.module).__name__), how,
                                      explain(c.q, c.k, v, mask=c.mask, bias=c.bias, scale=c.scale, softcap=c.softcap)))

    with observing(record), torch.no_grad():
        model(*args, **kwargs)
    if not found:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise ValueError(f"explain_model saw no attention call through {NAME!r}; the model runs "
                         f"attn_implementation={impl!r}. Build or set it with attn_implementation={NAME!r}")
    return found


def load_pretrained(folder, *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(model, tokenizer) from a local checkpoint folder, offline, with ``attn_implementation="attnkit"``:
    transformers' ``AutoModel`` / ``AutoTokenizer`` with ``local_files_only=True`` and
    ``use_safetensors=True`` (pickled weights are never loaded). The model is in eval mode.

    Raises:
        OSError / ValueError: transformers' own, for a folder it cannot read (no config, no
            tokenizer files, no safetensors weights).
    """
    from transformers import AutoModel, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, attn_implementation=NAME, local_files_only=True, use_safetensors=True,
                                      dtype=dtype).eval()
    return model, tokenizer


register()

from .longformer import swap_encoder_attention, swap_longformer_attention  # noqa: E402  (after register)

__all__ = ["NAME", "AttentionCall", "LayerMask", "LayerExplanation", "attention_forward", "explain_model", "mask_interface",
           "load_pretrained", "observing", "register", "swap_encoder_attention", "swap_longformer_attention", "translate"]
