"""Llama-style decoder weights (Hugging Face names) -> an ``attnkit.nn.DecoderLM``.

Covers the Llama family as ``transformers.LlamaForCausalLM`` computes it: RMSNorm pre-norm blocks,
RoPE in the half-split ("rotate_half") layout with its long-context scalings (``rope_type`` linear,
dynamic, yarn, llama3: Llama 3.x, CodeLlama, YaRN fine-tunes), grouped-query attention, SwiGLU
feed-forward, an optional tied LM head; and Mistral's sliding-window attention.

The model is composed from attnkit parts, one HF module per part::

    model.embed_tokens                        -> embeddings.tokens       TokenEmbeddings (no absolute positions)
    model.layers.i.input_layernorm            -> blocks.i.norm1          RMSNorm
    model.layers.i.self_attn.{q,k,v,o}_proj   -> blocks.i.attn.{q,k,v,out}_proj   MultiHeadAttention + RoPE
    model.layers.i.post_attention_layernorm   -> blocks.i.norm2          RMSNorm
    model.layers.i.mlp.{gate,up,down}_proj    -> blocks.i.ffn.*          SwiGLU
    model.norm, lm_head                       -> norm, lm_head

Anything the config asks for that these parts do not compute (other RoPE types such as longrope,
partial rotary, activations, per-layer attention types) is refused with a ``CheckpointError``
rather than loaded approximately.

Legend: E hidden size, Hq / Hkv query / kv heads, D head dim, I intermediate size, V vocabulary,
W sliding window (keys a query sees, itself included, HF's convention).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..functional import backends
from ..masks import Mask, causal, sliding_window
from ..nn import (
    DecoderLM,
    MultiHeadAttention,
    PreNormBlock,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TokenEmbeddings,
)
from ..nn.positional import RopeScaling
from ._checkpoint import CheckpointError, config_value, load_checked, read_safetensors

_ACTIVATIONS = ("silu", "swish")  # the same function in transformers' ACT2FN


@dataclass(frozen=True)
class LlamaArchitecture:
    """The numbers a Llama-style checkpoint's config fixes (``llama_architecture(config)`` reads them)."""

    vocab_size: int  # V
    hidden_size: int  # E
    num_layers: int
    num_heads: int  # Hq
    num_kv_heads: int  # Hkv
    head_dim: int  # D
    intermediate_size: int  # I
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling = RopeScaling()  # linear, dynamic, yarn, llama3 (default: none)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q, k, v and o projections (Llama's rule: all four or none)
    mlp_bias: bool = False
    sliding_window: int | None = None  # W (Mistral); None = full causal attention
    attention_dropout: float = 0.0


# -- config -> architecture ------------------------------------------------------------------------

def _config_dict(config) -> dict:
    """A transformers ``PretrainedConfig`` (``.to_dict()``) or a plain mapping -> dict."""
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"config: expected a transformers PretrainedConfig (e.g. LlamaConfig) or a dict, "
                    f"got {type(config).__name__}")


def _optional(cfg: Mapping, key: str, kind: type, default):
    """config[key] checked like ``config_value``, or ``default`` when absent or null."""
    return default if cfg.get(key) is None else config_value(cfg, key, kind)


def _rope_dict(cfg: Mapping) -> dict:
    """One RoPE dict with its base, from transformers 5.x ``rope_parameters`` or older ``rope_theta`` +
    ``rope_scaling``; ``rope_scaling`` wins and top-level values fill gaps, as in transformers."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise CheckpointError(f"config rope parameters = {params!r}; expected a dict like "
                              "{'rope_type': 'default', 'rope_theta': 10000.0}")
    if any(isinstance(value, Mapping) for value in params.values()):  # per-layer-type dicts (Gemma 3, ...)
        raise CheckpointError(f"config['rope_parameters'] = {dict(params)} has no 'rope_theta' of its own: one RoPE "
                              "per layer type; load_llama builds every layer alike and expected "
                              "{'rope_type': ..., 'rope_theta': ...}")
    params = dict(params)
    params.setdefault("rope_theta", _optional(cfg, "rope_theta", float, 10000.0))  # transformers' default base
    if cfg.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    if cfg.get("original_max_position_embeddings") is not None:  # top level wins (transformers, for Phi-3)
        params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    return params


def _rope(cfg: Mapping) -> tuple[float, RopeScaling]:
    """RoPE's base and scaling (default, linear, dynamic, yarn, llama3), read as transformers reads them.

    Partial rotary is refused: transformers' Llama ignores ``partial_rotary_factor`` for the plain
    RoPE (it rotates the whole head) and fails for the scaled ones, so there are no logits to match.
    """
    params = _rope_dict(cfg)
    rope_type = params.get("rope_type", params.get("type", "default"))
    try:
        scaling = RopeScaling.from_dict(params, max_position_embeddings=_optional(
            cfg, "max_position_embeddings", int, None))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"config rope parameters {params} (rope_type={rope_type!r}): {err}") from None
    if scaling.partial_rotary_factor != 1.0:
        raise CheckpointError(f"config has partial_rotary_factor={scaling.partial_rotary_factor}; Llama rotates the "
                              "whole head (transformers' LlamaForCausalLM ignores the factor for the plain RoPE and "
                              "fails for scaled ones), so load_llama supports only 1.0. For a model that rotates part "
                              "of each head build RotaryEmbedding(head_dim, scaling=RopeScaling(...)) directly")
    return config_value(params, "rope_theta", float), scaling


def _sliding_window(cfg: Mapping) -> int | None:
    """W from Mistral's ``sliding_window`` (None / absent: full attention); per-layer mixes are refused."""
    window = None if cfg.get("use_sliding_window") is False else _optional(cfg, "sliding_window", int, None)
    if window is not None and window < 1:
        raise CheckpointError(f"config['sliding_window'] = {window}; expected an int >= 1 or null")
    layer_types = set(cfg.get("layer_types") or ())
    expected = {"sliding_attention" if window else "full_attention"}
    if layer_types and layer_types != expected:
        raise CheckpointError(f"config['layer_types'] = {sorted(layer_types)}; load_llama builds every layer "
                              f"alike and expected only {sorted(expected)}")
    return window


def llama_architecture(config) -> LlamaArchitecture:
    """Read and check a Llama-style config (``LlamaConfig``, ``MistralConfig`` or their dict)."""
    cfg = _config_dict(config)
    act = cfg.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"config['hidden_act'] = {act!r}; Llama's SwiGLU needs 'silu', the only "
                              "activation load_llama supports")
    hidden, heads = config_value(cfg, "hidden_size"), config_value(cfg, "num_attention_heads")
    rope_theta, rope_scaling = _rope(cfg)
    head_dim = _optional(cfg, "head_dim", int, None)
    if head_dim is None:
        if hidden % heads:
            raise CheckpointError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads} and "
                                  "the config gives no head_dim")
        head_dim = hidden // heads
    return LlamaArchitecture(
        vocab_size=config_value(cfg, "vocab_size"), hidden_size=hidden,
        num_layers=config_value(cfg, "num_hidden_layers"), num_heads=heads,
        num_kv_heads=_optional(cfg, "num_key_value_heads", int, heads), head_dim=head_dim,
        intermediate_size=config_value(cfg, "intermediate_size"),
        rms_norm_eps=_optional(cfg, "rms_norm_eps", float, 1e-6), rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=_optional(cfg, "tie_word_embeddings", bool, False),
        attention_bias=_optional(cfg, "attention_bias", bool, False),
        mlp_bias=_optional(cfg, "mlp_bias", bool, False), sliding_window=_sliding_window(cfg),
        attention_dropout=_optional(cfg, "attention_dropout", float, 0.0))


# -- architecture -> attnkit model -----------------------------------------------------------------

def _mask(arch: LlamaArchitecture) -> Mask:
    """HF's causal mask, with Mistral's window: key j visible to query i when i - W < j <= i."""
    if arch.sliding_window is None:
        return causal()
    return causal() & sliding_window(arch.sliding_window - 1, 0)


def _block(arch: LlamaArchitecture, impl: str) -> PreNormBlock:
    E = arch.hidden_size
    attn = MultiHeadAttention(E, arch.num_heads, num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                              bias=arch.attention_bias, out_bias=arch.attention_bias,
                              dropout=arch.attention_dropout, impl=impl,
                              positional=RotaryEmbedding(arch.head_dim, base=arch.rope_theta,
                                                         scaling=arch.rope_scaling))
    ffn = SwiGLU(E, arch.intermediate_size, bias=arch.mlp_bias)
    return PreNormBlock(attn, ffn, RMSNorm(E, arch.rms_norm_eps), RMSNorm(E, arch.rms_norm_eps))


def build_llama(arch: LlamaArchitecture, *, impl: str = "auto") -> DecoderLM:
    """An attnkit ``DecoderLM`` with Llama's structure and fresh (untrained) weights, float32.

    With a sliding window W the KV cache keeps W keys (the mask reaches W - 1 back), so decoding
    memory stays O(W).
    """
    if impl != "auto" and impl not in backends():
        raise ValueError(f"impl={impl!r}: expected 'auto' or one of {sorted(backends())}")
    E, V = arch.hidden_size, arch.vocab_size
    lm_head = nn.Linear(E, V, bias=False)
    embeddings = TokenEmbeddings(V, E)
    if arch.tie_word_embeddings:
        lm_head.weight = embeddings.tokens.weight  # one (V, E) parameter, as HF ties them
    return DecoderLM(embeddings, [_block(arch, impl) for _ in range(arch.num_layers)], RMSNorm(E, arch.rms_norm_eps),
                     lm_head, mask=_mask(arch), cache_window=arch.sliding_window)


# -- checkpoint names -----------------------------------------------------------------------------

_LAYER_PARTS = {
    "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.out_proj", "mlp.gate_proj": "ffn.gate_proj", "mlp.up_proj": "ffn.up_proj",
    "mlp.down_proj": "ffn.down_proj", "input_layernorm": "norm1", "post_attention_layernorm": "norm2",
}
_SKIPPED = re.compile(r".*rotary_emb\.(inv_freq|original_inv_freq)$")  # recomputed from the rope parameters


def hf_names(model: DecoderLM) -> dict[str, str]:
    """Every HF checkpoint key the model expects -> the model's parameter name (tied head left out)."""
    names = {"model.embed_tokens.weight": "embeddings.tokens.weight", "model.norm.weight": "norm.weight"}
    if model.lm_head.weight is not model.embeddings.tokens.weight:
        names["lm_head.weight"] = "lm_head.weight"
    params = dict(model.named_parameters())
    for i in range(len(model.blocks)):
        for hf, ours in _LAYER_PARTS.items():
            for kind in ("weight", "bias"):
                if f"blocks.{i}.{ours}.{kind}" in params:
                    names[f"model.layers.{i}.{hf}.{kind}"] = f"blocks.{i}.{ours}.{kind}"
    return names


def _check_present(model: DecoderLM, state: Mapping[str, Tensor], names: Mapping[str, str]) -> None:
    """Name the missing HF keys and their expected shapes (before load_checked, which uses our names)."""
    params = dict(model.named_parameters())
    missing = [f"{key!r} (expected shape {tuple(params[ours].shape)})" for key, ours in names.items()
               if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} key(s) the config calls for: "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}; "
                              "the weights and config do not belong together")


def _check_tied_head(model: DecoderLM, state: Mapping[str, Tensor]) -> None:
    """With tied embeddings a checkpoint may still carry lm_head.weight; it must equal embed_tokens."""
    head, table = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if head is None or table is None or model.lm_head.weight is not model.embeddings.tokens.weight:
        return
    if head.shape != table.shape or not torch.equal(head, table):
        raise CheckpointError(f"config says tie_word_embeddings=True but checkpoint key 'lm_head.weight' "
                              f"{tuple(head.shape)} differs from 'model.embed_tokens.weight' {tuple(table.shape)}; "
                              "set tie_word_embeddings=False in the config if the head is separate")


def _read_state(state_dict) -> Mapping[str, Tensor]:
    if isinstance(state_dict, (str, os.PathLike)):
        return read_safetensors(Path(state_dict))
    if isinstance(state_dict, Mapping):
        return state_dict
    raise TypeError(f"state_dict: expected a mapping of tensors or a path to a .safetensors file, "
                    f"got {type(state_dict).__name__}")


def load_llama(state_dict: Mapping[str, Tensor] | str | os.PathLike, config, *, impl: str = "auto") -> DecoderLM:
    """Llama-style weights -> an attnkit ``DecoderLM`` (float32, eval mode) computing the same logits.

    Args:
        state_dict: HF-named tensors (e.g. ``LlamaForCausalLM.state_dict()``), or the path of a
            ``.safetensors`` file. Pickled files (.bin, .pt) are refused, never unpickled.
        config: a transformers ``LlamaConfig`` / ``MistralConfig`` (any ``PretrainedConfig``) or
            its dict (config.json). Both transformers 5.x ``rope_parameters`` and the older
            ``rope_theta`` / ``rope_scaling`` are read; rope_type default, linear, dynamic, yarn
            and llama3 are computed as transformers does (``attnkit.nn.positional.RopeScaling``).
        impl: the attention backend of every layer (``attnkit.backends()`` or "auto").

    Raises ``CheckpointError`` naming the key and both shapes when the weights do not fit the config,
    and when the config asks for something load_llama does not compute (another rope_type, partial
    rotary, non-SiLU MLP) or its rope parameters are incomplete (naming the missing key).
    The model is float32 on the CPU, built without a random initialization; weights read from a
    file become its parameters without a second copy, a caller's state dict is copied. Call
    ``.to(dtype/device)`` on the result for other precisions.
    """
    arch = llama_architecture(config)
    with torch.device("meta"):  # shapes only: no random init, no second copy of the weights
        model = build_llama(arch, impl=impl)
    from_file = not isinstance(state_dict, Mapping)
    state = _read_state(state_dict)
    names = hf_names(model)
    _check_present(model, state, names)
    _check_tied_head(model, state)

    def rename(key: str) -> str | None:
        if _SKIPPED.match(key) or (key == "lm_head.weight" and key not in names):
            return None
        return names.get(key, f"<unmatched> {key}")  # load_checked reports it by its checkpoint key

    load_checked(model, state, rename, assign=True, copy=not from_file)  # a caller's tensors are copied
    return model.eval()


__all__ = ["LlamaArchitecture", "build_llama", "hf_names", "llama_architecture", "load_llama"]
