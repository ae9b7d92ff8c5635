"""An interactive attention page: one self-contained HTML file, no network, opened from disk.

    with capture(model) as cap:
        model(ids)
    write_html(cap, tokens, "maps.html")          # or html = render_html(cap, tokens)

The page has
- a head view: query tokens on the left, key tokens on the right, a line per link coloured by
  head (BertViz's picture); hover a token to see only its links, click to pin it. It opens on one
  head and each token's 3 strongest links (every head's every link at once is a tangle);
- a model view: layers x heads thumbnails of the maps, click one to enlarge it (token labels on
  both axes up to 64 tokens), with the head's statistics (entropy, mean attention distance,
  attention to special tokens);
- token text in its own direction: each label is an isolated run with dir=auto, so Arabic and
  Hebrew word pieces read right to left and never mix with the numbers beside them;
- attention rollout (Abnar & Zuidema 2020) as one more "layer" when the page shows several layers
  and the input is short enough (the page's note says which of the two left it out);
- notices at the top (``notices=``), e.g. that the caller cut the input short.

Long inputs (2,000+ tokens) stay usable because the page never holds N x N numbers: per query
token it keeps the ``top_k`` strongest keys of each head (all keys for short inputs), and the
thumbnails are block-pooled maps of at most ``overview`` x ``overview`` cells computed tile by tile
(``AttentionRecord.pooled``); the browser draws only the rows on screen. Building it scores each
block of query rows only against the keys its mask may allow (``attnkit.viz.tiles``): a windowed
model's page takes time linear in N, not N^2 (the rollout, dense by nature, stops at 2048 tokens).

Safety: token text and names travel as JSON inside the page and are put into the document with
``textContent`` only; ``<``, ``>`` and ``&`` are escaped in that JSON, and a Content-Security-Policy
allows no network access and no script other than the page's own (by its hash).

Legend: L layers, H heads, N tokens, k links kept per query token, M = ceil(N / block).
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import html as html_lib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from .analysis import attention_rollout, distance_rows, entropy_rows, special_flags, special_rows
from .capture import ROW_BLOCK, BlockPool, Capture

SHORT = 128  # up to this many tokens every link is kept and the thumbnails are the exact maps
DEFAULT_TOP_K = 8  # links kept per query token and head beyond SHORT tokens
ROLLOUT_LIMIT = 2048  # rollout multiplies dense N x N maps: above this many tokens it is skipped


@dataclass(frozen=True)
class MapSummary:
    """What the page keeps of one (N, N) attention map."""

    top_idx: Tensor  # (N, k) long: the k strongest keys of each query row, strongest first
    top_w: Tensor  # (N, k) float64: their probabilities
    pooled: Tensor  # (M, M) float64: block means


def _self_attention_records(cap: Capture, layers: Sequence[str] | None):
    """The last call of each chosen layer, in the order the model ran them (rollout needs it)."""
    names = cap.names if layers is None else list(layers)
    if not names:
        raise ValueError("no layer to show: the capture recorded no attention call (run the model inside "
                         f"`with capture(model):`) or layers=[] was given; recorded: {cap.names}")
    for name in names:
        cap[name]  # KeyError listing the recorded names
    if len(set(names)) != len(names):
        raise ValueError(f"layers: each layer once, got {names}")
    records = [cap[name] for name in sorted(names, key=cap.names.index)]
    for rec in records:
        B, H, Nq, Nk = rec.shape
        if Nq != Nk:
            raise ValueError(f"the last call of layer {rec.name!r} is not self-attention over one sequence (Nq={Nq}, "
                             f"Nk={Nk}): the page shows self-attention maps, so capture one full forward pass (for "
                             "a decoder with a KV cache: the prefill only) and leave cross-attention layers out with "
                             "layers=[...]")
    n = records[0].shape[2]
    other = [r.name for r in records if r.shape[2] != n]
    if other:
        raise ValueError(f"layers {other} saw a different number of tokens than {records[0].name!r} ({n}); capture "
                         "one forward pass per page")
    return records


def summarize_head(rec, head: int, *, batch: int, top_k: int, block: int, special: Tensor | None,
                   valid: Tensor | None = None, bar=None) -> tuple[MapSummary, tuple[float, float, float | None]]:
    """One head of one record: top-k links, pooled map and (entropy, distance, special share), all
    from one pass over the map, ROW_BLOCK query rows at a time (never N x N in memory), each block
    scored only at the keys its mask may allow (``rec.scored``; every other key is an exact 0), so
    a windowed map costs time linear in N. The statistics average the rows that count: real
    queries (``valid`` (N,) bool, None = all) for which this head attends somewhere, as
    ``attnkit.viz.analysis`` does. ``bar``: a progress bar advanced by the rows done."""
    N = rec.shape[2]
    k = min(top_k, N)
    top_idx = torch.empty(N, k, dtype=torch.long)
    top_w = torch.empty(N, k, dtype=torch.float64)
    totals = torch.zeros(3, dtype=torch.float64)  # entropy, distance, special summed over counted rows
    counted = 0.0
    pool = BlockPool((), N, N, block)
    for r0 in range(0, N, ROW_BLOCK):
        rows = torch.arange(r0, min(N, r0 + ROW_BLOCK))
        cols, w = rec.scored(rows=rows, heads=[head], batch=[batch], min_cols=k)  # w (1, 1, r, c)
        w = w.double().cpu()
        keys = torch.arange(N) if cols is None else cols  # (c,) the key each column holds
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"layer {rec.name!r}, head {head}: the attention map holds NaN or inf (rows "
                             f"{r0}..{int(rows[-1])}); the model's inputs or weights are not finite")
        pool.add(rows, w[0, 0], cols)
        vals, idx = w[0, 0].topk(k, dim=-1)  # (r, k)
        top_idx[rows], top_w[rows] = keys[idx], vals
        alive = (w[0, 0].sum(-1) > 0).double()  # (r,): rows that attend somewhere
        if valid is not None:
            alive = alive * valid[rows].double()
        totals[0] += (entropy_rows(w)[0, 0] * alive).sum()
        totals[1] += (distance_rows(w, rows, keys)[0, 0] * alive).sum()
        if special is not None:
            totals[2] += (special_rows(w, special[keys][None])[0, 0] * alive).sum()
        counted += float(alive.sum())
        if bar is not None:
            bar.update(len(rows))
    mean = (totals / max(counted, 1.0)).tolist()
    return MapSummary(top_idx, top_w, pool.result()), (mean[0], mean[1], mean[2] if special is not None else None)


def summarize_dense(m: Tensor, *, top_k: int, block: int) -> MapSummary:
    """A dense (N, N) map (rollout) -> the same summary."""
    vals, idx = m.double().topk(min(top_k, m.shape[-1]), dim=-1)
    pool = BlockPool((), m.shape[0], m.shape[1], block)
    pool.add(torch.arange(m.shape[0]), m)
    return MapSummary(idx, vals, pool.result())


def _rollout(records, batch: int, bar=None) -> Tensor:
    """(N, N) rollout of the layers' head-mean maps for one batch element (``bar``: a progress bar
    advanced by N rows per head map)."""
    per_layer = []
    for rec in records:
        _, H, N, _ = rec.shape
        mean = torch.zeros(N, N, dtype=torch.float64)
        for h in range(H):
            mean += rec.weights(heads=[h], batch=[batch])[0, 0].double().cpu()  # (N, N)
            if bar is not None:
                bar.update(N)
        per_layer.append((mean / H)[None, None])
    return attention_rollout(per_layer)[0]


# -- packing for the page ---------------------------------------------------------------------

def _b64(values: Tensor, bits: int) -> str:
    """Non-negative integers -> their unsigned little-endian ``bits``-bit bytes, base64 (the page
    reads them with Uint8Array / Uint16Array / Uint32Array)."""
    if sys.byteorder != "little":
        raise RuntimeError("attnkit.viz.page writes little-endian arrays; this machine is big-endian")
    v = values.round().long()
    assert int(v.min()) >= 0 and int(v.max()) < 2 ** bits, "value out of range for its unsigned type"
    signed = {8: torch.uint8, 16: torch.int16, 32: torch.int32}[bits]
    if bits > 8:
        v = torch.where(v >= 2 ** (bits - 1), v - 2 ** bits, v)  # same bits, read back as unsigned
    packed = v.to(signed).contiguous()
    raw = ctypes.string_at(packed.data_ptr(), packed.numel() * packed.element_size())  # its bytes, in one copy
    return base64.b64encode(raw).decode("ascii")


def _pack_maps(summaries: list[MapSummary], n: int) -> dict:
    """H summaries of one layer -> base64 arrays: idx (H, N, k) u16 (u32 beyond 65,536 tokens), w
    (H, N, k) u16 in units of 1/65535, pooled (H, M, M) u8 scaled to each map's max (``pooled_max``)."""
    idx = torch.stack([s.top_idx for s in summaries])
    w = torch.stack([s.top_w for s in summaries])
    pooled = torch.stack([s.pooled for s in summaries])
    top = pooled.flatten(1).amax(1).clamp(min=1e-30)  # (H,)
    idx_bits = 16 if n <= 65536 else 32
    return {"idx": _b64(idx, idx_bits), "idx_bits": idx_bits,
            "w": _b64(w.clamp(0, 1) * 65535, 16),
            "pooled": _b64(pooled / top[:, None, None] * 255, 8), "pooled_max": top.tolist()}


def _json_for_script(payload: dict) -> str:
    """JSON that cannot end its <script> element or open markup: ASCII only, with <, > and &
    written as \\u escapes (still valid JSON, parsed back to the same text)."""
    text = json.dumps(payload, ensure_ascii=True, allow_nan=False, separators=(",", ":"))  # ASCII: no U+2028
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(ch, esc)
    return text


def _asset(name: str) -> str:
    return resources.files("attnkit.viz").joinpath("assets", name).read_text(encoding="utf-8")


def _check_tokens(tokens: Sequence[str], n: int) -> list[str]:
    if isinstance(tokens, str) or len(tokens) != n:
        got = "a single string" if isinstance(tokens, str) else f"{len(tokens)} labels"
        raise ValueError(f"tokens: expected one label per position, {n} in all (padding included, e.g. '[PAD]'), "
                         f"got {got}")
    return [str(t) for t in tokens]


def _rollout_choice(rollout: bool | None, records, n: int) -> tuple[bool, str]:
    """Whether the page gets a rollout, and if not, the note that says why (the true reason)."""
    if rollout is not None:
        return bool(rollout), "" if rollout else "attention rollout is left out: rollout=False was given"
    reasons = []
    if len(records) < 2:
        reasons.append(f"it composes the maps of several layers and this page shows one ({records[0].name!r})")
    if n > ROLLOUT_LIMIT:
        reasons.append(f"it multiplies dense N x N maps and N = {n} > {ROLLOUT_LIMIT}")
    if not reasons:
        return True, ""
    return False, f"attention rollout is left out: {'; and '.join(reasons)} (rollout=True includes it anyway)"


def _progress_bar(total: int, enabled: bool, n: int):
    """A tqdm bar over the query rows of the maps summarized (``total``: maps x N), on stderr;
    tqdm leaves it out where stderr is not a terminal (disable=None), so logs and pipes get no
    carriage-return lines."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"attention page, {n} tokens", unit="row", file=sys.stderr, leave=False,
                disable=None if enabled else True)


def page_data(cap: Capture, tokens: Sequence[str], *, layers: Sequence[str] | None = None,
              heads: Sequence[int] | None = None, batch: int = 0, top_k: int | None = None,
              overview: int = 128, special: Sequence[int] | None = None, valid: Sequence[bool] | Tensor | None = None,
              rollout: bool | None = None, focus: int | None = None, title: str = "attention",
              notices: Sequence[str] = (), progress: bool = False) -> dict:
    """The page's JSON payload (see ``render_html`` for the arguments)."""
    records = _self_attention_records(cap, layers)
    B, H, N, _ = records[0].shape
    tokens = _check_tokens(tokens, N)
    if not 0 <= batch < B:
        raise ValueError(f"batch {batch} is out of range: the capture holds {B} sequences (0..{B - 1})")
    heads = list(range(H)) if heads is None else [int(h) for h in heads]
    bad = [h for h in heads if not 0 <= h < H]
    if bad or not heads or len(set(heads)) != len(heads):
        raise ValueError(f"heads: expected a non-empty list of distinct heads in 0..{H - 1}, got {heads}")
    if focus is not None and not 0 <= focus < N:
        raise ValueError(f"focus {focus} is out of range: {N} tokens (0..{N - 1})")
    if isinstance(overview, bool) or not isinstance(overview, int) or overview < 1:
        raise ValueError(f"overview: expected an int >= 1 (cells per side of a thumbnail), got {overview!r}")
    top_k = (N if N <= SHORT else DEFAULT_TOP_K) if top_k is None else int(top_k)
    if top_k < 1:
        raise ValueError(f"top_k: expected >= 1 links per token, got {top_k}")
    if isinstance(notices, str) or not all(isinstance(t, str) for t in notices):
        raise ValueError(f"notices: expected a list of strings (one notice each), got {notices!r}")
    block = -(-N // overview)
    flags = None if special is None else special_flags(list(special), 1, N)[0]  # (N,) bool
    rollout, note = _rollout_choice(rollout, records, N)
    if valid is not None:
        valid = torch.as_tensor(valid).bool().cpu()
        if tuple(valid.shape) != (N,):
            raise ValueError(f"valid: expected one flag per token of sequence {batch}, shape ({N},) (True = a real "
                             f"token, e.g. attention_mask[{batch}]), got {tuple(valid.shape)}")

    out_layers, stats = [], {"entropy": [], "distance": [], "special": [] if flags is not None else None}
    maps = len(records) * len(heads) + (sum(rec.shape[1] for rec in records) if rollout else 0)
    bar = _progress_bar(maps * N, progress, N)  # every summarized map's rows, then the rollout's head maps
    for rec in records:
        summaries, per_head = [], []
        for h in heads:
            summary, numbers = summarize_head(rec, h, batch=batch, top_k=top_k, block=block, special=flags,
                                              valid=valid, bar=bar)
            summaries.append(summary)
            per_head.append(numbers)
        out_layers.append({"name": rec.name or "(the model)", "index": cap.names.index(rec.name), "heads": heads,
                           **_pack_maps(summaries, N)})
        stats["entropy"].append([p[0] for p in per_head])
        stats["distance"].append([p[1] for p in per_head])
        if flags is not None:
            stats["special"].append([p[2] for p in per_head])
    if rollout:
        summary = summarize_dense(_rollout(records, batch, bar), top_k=top_k, block=block)
        shown = "all layers" if len(records) == len(cap.names) else f"layers {[r['index'] for r in out_layers]}"
        out_layers.append({"name": f"rollout over {shown}, all heads", "index": -1, "heads": [0], "rollout": True,
                           **_pack_maps([summary], N)})
    bar.close()
    return {"title": str(title), "tokens": tokens, "n": N, "k": min(top_k, N), "block": block, "m": -(-N // block),
            "layers": out_layers, "stats": stats, "focus": focus, "note": note, "notices": list(notices),
            "special": None if flags is None else flags.nonzero().flatten().tolist()}


def render_html(cap: Capture, tokens: Sequence[str], **options) -> str:
    """The page as one HTML string. Options:

    - ``layers``: record names to show (default every captured layer, in call order);
    - ``heads``: head indices (default all); ``batch``: which sequence of the batch (default 0);
    - ``top_k``: links kept per token and head (default all up to 128 tokens, else 8);
    - ``overview``: thumbnail cells per side (block-pooled beyond that many tokens; default 128);
    - ``special``: positions of special tokens ([CLS], [SEP]) for the special-attention statistic;
    - ``valid``: (N,) True at real tokens of that sequence (e.g. its attention_mask row): the
      statistics leave padding queries out;
    - ``rollout``: include attention rollout (default when the page shows two or more layers and
      N <= 2048; the page's note gives the reason when it is left out);
    - ``focus``: a token pinned when the page opens; ``title``: the page's title;
    - ``notices``: lines shown at the top of the page, e.g. that the input was cut short;
    - ``progress``: a tqdm progress bar on stderr while the maps are summarized, counting query
      rows (each shown head's map, then each head map the rollout needs: N rows apiece); only
      where stderr is a terminal, nothing is written to logs or pipes.
    """
    data = page_data(cap, tokens, **options)
    script = _asset("page.js")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; img-src data: blob:; "
           "connect-src 'none'; form-action 'none'; base-uri 'none'")
    parts = {"CSP": html_lib.escape(csp, quote=False),  # in a "..." attribute: no " in it
             "TITLE": html_lib.escape(data["title"].encode("utf-8", "replace").decode("utf-8")),
             "STYLE": _asset("page.css"), "DATA": _json_for_script(data), "SCRIPT": script}
    # one pass: text put in is never searched for placeholders again
    return re.sub(r"%(CSP|TITLE|STYLE|DATA|SCRIPT)%", lambda m: parts[m[1]], _asset("page.html"))


def write_html(cap: Capture, tokens: Sequence[str], path: str | Path, **options) -> Path:
    """Write ``render_html(cap, tokens, **options)`` to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"write_html: expected a path ending in .html, got {str(path)!r}")
    path.write_text(render_html(cap, tokens, **options), encoding="utf-8")
    return path
