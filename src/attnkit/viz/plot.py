"""Static attention pictures with matplotlib (Agg: no display needed), saved as PNG, SVG or PDF.

    fig = plot_grid([[rec.weights()[0, h] for h in range(H)] for rec in records], tokens)
    save(fig, "maps.png")                       # the extension picks the format

- ``plot_map``: one (Nq, Nk) matrix, token labels on both axes (row = query, column = key);
- ``plot_grid``: a layers x heads grid of such matrices;
- ``plot_token``: the attention from one chosen query token, as bars over the keys;
- ``plot_mask``: the dense truth of any attnkit mask expression;
- ``plot_audit``: an ``attnkit.approx.audit`` report, error per layer and method.

This is the only module of attnkit that imports matplotlib, and only when a function is called.
Legend: Nq / Nk query / key tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..masks import Mask

FORMATS = (".png", ".svg", ".pdf")
LABEL_LIMIT = 64  # more tokens than this: axis labels are left out (they would overlap)


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("attnkit.viz plots need matplotlib: pip install matplotlib "
                          "(or pip install attnkit[viz])") from e
    matplotlib.use("Agg", force=False)  # no display; a no-op if a backend is already in use
    import matplotlib.pyplot as plt
    return plt


def _as_matrix(weights: Tensor, what: str) -> Tensor:
    if not isinstance(weights, Tensor) or weights.dim() != 2:
        got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"{what}: expected one (Nq, Nk) matrix, e.g. rec.weights()[b, h], got {got}")
    return weights.detach().float().cpu()


def _label(ax, tokens_q: Sequence[str] | None, tokens_k: Sequence[str] | None, Nq: int, Nk: int) -> None:
    for tokens, n, axis in ((tokens_q, Nq, "y"), (tokens_k, Nk, "x")):
        if tokens is None or n > LABEL_LIMIT:
            continue
        if len(tokens) != n:
            raise ValueError(f"{len(tokens)} token labels for an axis of {n}; give one label per token")
        ticks = list(range(n))
        if axis == "y":
            ax.set_yticks(ticks, [str(t) for t in tokens], fontsize=7)  # text, never markup
        else:
            ax.set_xticks(ticks, [str(t) for t in tokens], fontsize=7, rotation=90)


def plot_map(weights: Tensor, tokens: Sequence[str] | None = None, *, key_tokens: Sequence[str] | None = None,
             title: str | None = None, ax=None):
    """One attention matrix (Nq, Nk) as a heatmap; ``tokens`` label the rows (and the columns
    unless ``key_tokens`` is given). Returns the figure."""
    plt = _pyplot()
    w = _as_matrix(weights, "plot_map")
    fig = ax.figure if ax is not None else plt.figure(figsize=(5, 4.5))
    ax = ax if ax is not None else fig.add_subplot()
    image = ax.imshow(w.numpy(), cmap="viridis", vmin=0.0, interpolation="nearest", aspect="auto")
    _label(ax, tokens, key_tokens if key_tokens is not None else tokens, *w.shape)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title, fontsize=9)
    if ax is fig.axes[0] and len(fig.axes) == 1:
        fig.colorbar(image, ax=ax, fraction=0.046)
    return fig


def plot_grid(maps: Sequence[Sequence[Tensor]], tokens: Sequence[str] | None = None, *,
              layer_names: Sequence[str] | None = None, cell_inches: float = 1.6):
    """A layers x heads grid: ``maps[l][h]`` is the (Nq, Nk) matrix of head h in layer l."""
    plt = _pyplot()
    if not maps or not all(len(row) == len(maps[0]) and len(row) for row in maps):
        raise ValueError("plot_grid: expected a non-empty list of layers, each a list of the same number of "
                         "(Nq, Nk) head matrices")
    L, H = len(maps), len(maps[0])
    fig, axes = plt.subplots(L, H, figsize=(cell_inches * H + 1, cell_inches * L + 0.5), squeeze=False)
    small = tokens is not None and len(tokens) <= 16
    for l_i, row in enumerate(maps):
        for h, weights in enumerate(row):
            ax = axes[l_i][h]
            w = _as_matrix(weights, f"plot_grid[{l_i}][{h}]")
            ax.imshow(w.numpy(), cmap="viridis", vmin=0.0, interpolation="nearest", aspect="auto")
            if small:
                _label(ax, tokens, tokens, *w.shape)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
            if l_i == 0:
                ax.set_title(f"head {h}", fontsize=8)
            if h == 0:
                ax.set_ylabel(layer_names[l_i] if layer_names else f"layer {l_i}", fontsize=8)
    fig.tight_layout()
    return fig


def plot_token(weights: Tensor, tokens: Sequence[str], query: int, *, title: str | None = None):
    """Bars: how much query token ``query`` attends to each key (one row of a map)."""
    plt = _pyplot()
    w = _as_matrix(weights, "plot_token")
    if not 0 <= query < w.shape[0]:
        raise ValueError(f"plot_token: query must be in 0..{w.shape[0] - 1}, got {query}")
    row = w[query]
    fig = plt.figure(figsize=(max(4.0, 0.25 * len(row)), 3))
    ax = fig.add_subplot()
    ax.bar(range(len(row)), row.numpy(), color="tab:blue")
    if len(tokens) != len(row):
        raise ValueError(f"plot_token: {len(tokens)} token labels for {len(row)} keys")
    if len(row) <= LABEL_LIMIT:
        ax.set_xticks(range(len(row)), [str(t) for t in tokens], rotation=90, fontsize=7)
    ax.set_ylabel("attention weight")
    ax.set_title(title or f"attention from {str(tokens[query])!r}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_mask(mask: Mask, Nq: int, Nk: int | None = None, *, batch: int = 0, head: int = 0):
    """The dense truth of an attnkit mask (True = may attend) for one batch element and head."""
    plt = _pyplot()
    if not isinstance(mask, Mask):
        raise TypeError(f"plot_mask: expected an attnkit mask (ak.causal() & ...), got {type(mask).__name__}")
    Nk = Nq if Nk is None else Nk
    dense = mask.materialize(Nq, Nk)  # (Bm, Hm, Nq, Nk)
    picture = dense[min(batch, dense.shape[0] - 1), min(head, dense.shape[1] - 1)].to(torch.float32)
    fig = plt.figure(figsize=(4.5, 4.5 * Nq / max(Nk, 1) + 0.6))
    ax = fig.add_subplot()
    ax.imshow(picture.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_title(repr(mask), fontsize=8)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    fig.tight_layout()
    return fig


ERROR_FLOOR = 1e-12  # a log axis cannot show 0: smaller errors are drawn here


def _audit_series(report, method: str) -> tuple[list[int], list[float], list[float], list[float], int]:
    """(x, mean, best head, worst head, refused count) of one method over the report's layers."""
    xs, mean, lo, hi, refused = [], [], [], [], 0
    for i, layer in enumerate(report.layers):
        row = report.row(layer, method)
        if row.refused is not None:
            refused += 1
            continue
        errors = [max(e, ERROR_FLOOR) for e in row.rel_l2 if e == e]  # nan (x != x) left out
        if not errors:
            continue
        xs.append(i)
        mean.append(max(row.mean_rel_l2, ERROR_FLOOR))
        lo.append(min(errors))
        hi.append(max(errors))
    return xs, mean, lo, hi, refused


def plot_audit(report, path: str | Path, *, title: str | None = None) -> Path:
    """Draw an ``attnkit.approx.audit`` report: per layer (x) and method (one line each) the
    relative L2 error against exact attention, mean over heads, with a band from the best to the
    worst head (log scale; errors below 1e-12 drawn at 1e-12). The "exact" row (the layer's own
    rounding) is drawn only where it is not 0; a method refused on some layers says how many in its
    legend entry. Written to ``path`` (.png, .svg, .pdf); returns the path.

    Raises:
        TypeError: ``report`` is not an audit report (needs ``layers``, ``methods``, ``row``).
        ValueError: an unsupported extension (``save``).
    """
    if not all(hasattr(report, a) for a in ("layers", "methods", "row")):
        raise TypeError(f"plot_audit: expected an attnkit.approx.AuditReport, got {type(report).__name__}")
    plt = _pyplot()
    layers = report.layers
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(layers) + 3.0), 4.0))
    for method in report.methods:
        xs, mean, lo, hi, refused = _audit_series(report, method)
        if method == "exact" and all(m <= ERROR_FLOOR for m in mean):
            continue
        label = method + (f" (refused on {refused} of {len(layers)})" if refused else "")
        if not xs:
            ax.plot([], [], label=label)
            continue
        line, = ax.plot(xs, mean, marker="o", markersize=3, label=label,
                        linestyle="--" if method == "exact" else "-")
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), [str(n) for n in layers], rotation=90, fontsize=7)
    ax.set_ylabel("relative L2 error vs exact\n(mean over heads; band: best to worst head)", fontsize=8)
    ax.set_title(title or f"approximate attention on this model's q, k, v ({report.dtype}, {report.device})",
                 fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save(fig, path)


def save(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (.png, .svg or .pdf, from the extension) and close it."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ValueError(f"save: {path.name} has the extension {path.suffix!r}; expected one of {FORMATS}")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return path
