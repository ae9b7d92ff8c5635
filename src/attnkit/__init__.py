"""attnkit: self-attention end to end, one API and one mask language over several backends.

    import attnkit as ak
    out = ak.attention(q, k, v, mask=ak.causal() & ak.sliding_window(256))
"""

from .bias import Alibi, Bias, DenseBias, SumBias, alibi, alibi_slopes
from .functional import Explanation, MaterializationWarning, attention, attention_weights, backends, explain
from .masks import (EMPTY, FULL, PARTIAL, Mask, causal, dense_mask, document, global_tokens,
                    key_padding, sliding_window)

__version__ = "0.1.0"

SUBPACKAGES = ("nn", "viz", "pretrained", "bench", "cli", "ops", "approx", "distributed")


def __getattr__(name: str):
    """Subpackages load on first use, like torch's: ``import attnkit; attnkit.pretrained.load_bert``
    works, and ``import attnkit`` alone stays light (no matplotlib, tokenizers or triton)."""
    if name in SUBPACKAGES:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")

__all__ = [
    "attention", "attention_weights", "explain", "Explanation", "backends", "MaterializationWarning",
    "Mask", "causal", "sliding_window", "global_tokens", "key_padding", "document", "dense_mask",
    "EMPTY", "PARTIAL", "FULL",
    "Bias", "DenseBias", "SumBias", "Alibi", "alibi", "alibi_slopes",
]
