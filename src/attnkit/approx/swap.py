"""Put an approximation into a trained model: every attnkit ``MultiHeadAttention`` gets a core."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..nn.attention import MultiHeadAttention, _check_core_fits

CoreFactory = Callable[[MultiHeadAttention], nn.Module]


def replace_attention(model: nn.Module, make_core: CoreFactory | None) -> list[str]:
    """Give every ``attnkit.nn.MultiHeadAttention`` of ``model`` the core ``make_core(layer)``, in
    place, keeping its weights (the projections, positional module and caches stay the layer's);
    ``make_core=None`` puts exact attention back. Returns the names of the layers changed.

    Example: ``replace_attention(bert, lambda layer: PerformerAttention(layer.head_dim, 256))``
    swaps all-MiniLM-L6-v2's attention for FAVOR+ without retraining (``attnkit.approx.audit``
    measures what that costs per layer first). A layer's core is its own module, so give each layer
    a new core unless sharing is meant (Linformer's layerwise sharing).

    Raises:
        ValueError: no attnkit MultiHeadAttention in ``model``; a layer the core cannot serve
            (dropout, softcap or an ALiBi bias: see ``MultiHeadAttention(core=)``); nothing is
            changed then.
        TypeError: ``make_core`` is a core instance (or not callable) instead of a factory; it
            returned something other than an nn.Module.
    """
    if isinstance(make_core, nn.Module) or (make_core is not None and not callable(make_core)):
        raise TypeError(f"replace_attention: make_core must be a function layer -> core, called once per layer, "
                        f"got {type(make_core).__name__} instance; pass e.g. lambda layer: "
                        f"{type(make_core).__name__}(...) for a core per layer (or lambda layer: core to share one)")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)]
    if not layers:
        raise ValueError(f"replace_attention: {type(model).__name__} has no attnkit.nn.MultiHeadAttention; "
                         "Hugging Face models run attnkit through attn_implementation='attnkit', which keeps "
                         "exact attention (use attnkit.approx.audit to measure an approximation there)")
    cores = {}
    for name, layer in layers:
        core = None if make_core is None else make_core(layer)
        _check_core_fits(core, layer.dropout, layer.softcap, layer.positional)
        cores[name] = core
    for name, layer in layers:
        layer.core = cores[name]
    return [name for name, _ in layers]
