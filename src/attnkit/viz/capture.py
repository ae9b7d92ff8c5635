"""Capture what attention layers look at, without slowing down what you do not look at.

    with capture(model) as cap:
        model(ids)
    cap.names                         # every attention layer that ran, in call order
    rec = cap["blocks.0.attn"]        # the last call of that layer (names as model.named_modules())
    rec.weights()                     # (B, H, Nq, Nk) probabilities, for short inputs
    rec.weights(rows=[5], heads=[0])  # only what a view needs: (B, 1, 1, Nk)
    rec.pooled(64)                    # (B, H, ceil(Nq/64), ceil(Nk/64)) block means, tile by tile

During the forward pass a capture only keeps references to each call's q and k (after RoPE; the
keys include a KV cache's), its mask, bias and scale: the layer still runs its fast backend and no
N x N matrix is built. Maps are computed on demand from those, by the reference formula
(``ak.attention_weights``), a block of query rows at a time, each block scored only against the
keys its mask may allow (``attnkit.viz.tiles``; the others are exact zeros), so a windowed map
costs time linear in N.

Three kinds of call are recorded. ``MultiHeadAttention`` gives an ``AttentionRecord``; so does
every attention call of a Hugging Face transformers model built with
``attn_implementation="attnkit"`` (``attnkit.integrations.transformers.observing``: q and k after
RoPE and the cache, the translated mask, the layer's scaling and softcap), named by
``model.named_modules()`` ("model.layers.0.self_attn").
``LongformerSelfAttention`` gives a ``LongformerRecord``: two ``AttentionRecord``s (the local pass
over every row, the global pass over the global tokens' rows) and the token roles, assembled into
the layer's map as HF's ``output_attentions`` describes it, made dense: a global token's row from
the global pass, padding rows 0, every other row from the local pass. Both kinds offer ``name``,
``shape``, ``weights`` and ``pooled`` (one pooling loop for both, ``pooled_map``).

Legend: B batch, Hq / Hkv query / key heads, Nq / Nk queries / keys, D head dim, b pooling block,
G the most global tokens a Longformer sample has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from ..bias import Bias, DenseBias
from ..functional import attention_weights
from ..masks import Mask
from ..nn import LongformerSelfAttention, MultiHeadAttention
from ..nn.longformer import GlobalRows, TokenRoles
from .tiles import key_columns, scatter_columns, tile_grid

ROW_BLOCK = 256  # query rows per on-demand step: b x Nk scores per head at a time
RECORDED = (MultiHeadAttention, LongformerSelfAttention)  # the layer types capture hooks

Selection = Sequence[int] | Tensor | None  # indices to keep; None = all


def _index(selection: Selection, n: int, what: str) -> Tensor:
    idx = torch.arange(n) if selection is None else torch.as_tensor(selection, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"{what}: expected indices in 0..{n - 1}, got {selection!r}")
    return idx


class AttentionMap(Protocol):
    """What ``pooled_map`` and the page need: the map's shape and selected rows of it on demand,
    dense (``weights``) or at the keys that may be non-zero (``scored``)."""

    @property
    def shape(self) -> tuple[int, int, int, int]: ...

    def weights(self, *, rows: Selection = None, heads: Selection = None, batch: Selection = None) -> Tensor: ...

    def scored(self, *, rows: Selection = None, heads: Selection = None, batch: Selection = None,
               min_cols: int = 0) -> tuple[Tensor | None, Tensor]: ...


class BlockPool:
    """Block means of an (Nq, Nk) map (per leading index), fed a few query rows at a time in any
    order: ``add(rows, w)`` with w (..., r, Nk), then ``result()`` (..., ceil(Nq/b), ceil(Nk/b)),
    entry (I, J) the mean over query block I x key block J (edge blocks average what they hold)."""

    def __init__(self, lead: tuple[int, ...], Nq: int, Nk: int, block: int):
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"pooled: block must be an int >= 1, got {block!r}")
        self.Nq, self.Nk, self.block = Nq, Nk, block
        self.nI, self.nJ = -(-Nq // block), -(-Nk // block)
        self.sums = torch.zeros(*lead, self.nI, self.nJ, dtype=torch.float64)

    def add(self, rows: Tensor, w: Tensor, cols: Tensor | None = None) -> None:
        """rows (r,) query indices; w (..., r, Nk) their probabilities, or (..., r, c) at keys
        ``cols`` (c,) only (every other key 0: ``AttentionRecord.scored``)."""
        w = w.double().cpu()
        if cols is None:
            w = nn.functional.pad(w, (0, self.nJ * self.block - self.Nk))
            col_sums = w.reshape(*w.shape[:-1], self.nJ, self.block).sum(-1)  # (..., r, nJ)
        else:
            col_sums = w.new_zeros(*w.shape[:-1], self.nJ).index_add_(-1, cols.cpu() // self.block, w)  # (..., r, nJ)
        self.sums.index_add_(-2, rows.cpu() // self.block, col_sums)

    def result(self) -> Tensor:
        b = self.block
        col_count = torch.full((self.nJ,), float(b), dtype=torch.float64)
        col_count[-1] = self.Nk - b * (self.nJ - 1)
        row_count = torch.bincount(torch.arange(self.Nq) // b, minlength=self.nI).double()  # (nI,)
        return self.sums / (row_count[:, None] * col_count[None, :])


def pooled_map(record: AttentionMap, block: int, *, heads: Selection = None, batch: Selection = None) -> Tensor:
    """Block means of ``record``'s map: (B', H', ceil(Nq/b), ceil(Nk/b)) (see ``BlockPool``).
    Computed one block of query rows and one head at a time, each block scored only against the
    keys its mask may allow (``AttentionRecord.scored``): never Nq x Nk in memory, and linear in
    N for a windowed mask."""
    B, Hq, Nq, Nk = record.shape
    heads, batch = _index(heads, Hq, "heads"), _index(batch, B, "batch")
    pools = [BlockPool((len(batch),), Nq, Nk, block) for _ in heads]
    dtype = torch.float32
    step = max(block, ROW_BLOCK // block * block)  # whole pooling blocks per step
    for pool, h in zip(pools, heads.tolist()):
        for r0 in range(0, Nq, step):
            rows = torch.arange(r0, min(Nq, r0 + step))
            cols, w = record.scored(rows=rows, heads=[h], batch=batch)  # w (B', 1, r, c)
            dtype = w.dtype
            pool.add(rows, w[:, 0], cols)
    return torch.stack([pool.result() for pool in pools], 1).to(dtype)  # (B', H', nI, nJ)


@dataclass(frozen=True)
class AttentionRecord:
    """One call of one attention layer: enough to recompute any part of its attention map,
    ``softmax(softcap(q k^T * scale) + bias)`` under ``mask`` (``ak.attention_weights``)."""

    name: str
    q: Tensor  # (B, Hq, Nq, D)
    k: Tensor  # (B, Hkv, Nk, D)
    mask: Mask | Tensor | None
    bias: Bias | Tensor | None
    scale: float | None  # None: 1/sqrt(D)
    softcap: float | None = None  # Gemma 2's logit soft-capping, tanh(s / c) * c; None: none
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # the tile grid, once

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, Hq, Nq, Nk) of the full map."""
        return self.q.shape[0], self.q.shape[1], self.q.shape[2], self.k.shape[2]

    def _dense_part(self, part: Mask | Bias | Tensor | None, rows: Tensor, cols: Tensor, heads: Tensor,
                    batch: Tensor) -> Tensor | None:
        """The mask or bias on (rows, cols) for the selected batch elements and heads:
        (B' or 1, H' or 1, r, c), or None."""
        if part is None:
            return None
        B, Hq, Nq, Nk = self.shape
        if isinstance(part, Tensor) and part.is_floating_point():
            part = DenseBias(part)
        if isinstance(part, Tensor):  # a bool mask tensor broadcastable to (B, Hq, Nq, Nk)
            dense = part.reshape((1,) * (4 - part.dim()) + tuple(part.shape)).expand(-1, -1, Nq, Nk)
            dense = dense[:, :, rows.to(dense.device)][..., cols.to(dense.device)]
        else:  # an attnkit mask or bias evaluates itself on the sub-grid
            dense = part.evaluate(rows.to(self.q.device), cols.to(self.q.device), Nq, Nk)
        dense = dense[batch.to(dense.device)] if dense.shape[0] > 1 else dense
        return dense[:, heads.to(dense.device)] if dense.shape[1] > 1 else dense

    def _grid(self) -> Tensor | None:
        """The mask's tile grid (``tiles.tile_grid``), built on first use and kept."""
        if "grid" not in self._memo:
            self._memo["grid"] = tile_grid(self.mask, self.shape[2], self.shape[3], self.q.device)
        return self._memo["grid"]

    def scored(self, *, rows: Selection = None, heads: Selection = None, batch: Selection = None,
               min_cols: int = 0) -> tuple[Tensor | None, Tensor]:
        """The selected rows' probabilities at only the keys the mask may let them see:
        (cols, w) with cols (c,) long ascending key indices (None: all Nk) and w (B', H', r, c);
        every key not in cols has probability exactly 0. ``min_cols``: at least that many keys
        (masked ones added, all 0), e.g. for a top-k. Costs r x c scores, not r x Nk
        (``attnkit.viz.tiles``)."""
        B, Hq, Nq, Nk = self.shape
        rows, heads, batch = _index(rows, Nq, "rows"), _index(heads, Hq, "heads"), _index(batch, B, "batch")
        cols = key_columns(self._grid(), rows, heads, batch, Nk, min_cols)
        keys = torch.arange(Nk) if cols is None else cols
        dev = self.q.device
        q = self.q[batch.to(dev)][:, heads.to(dev)][:, :, rows.to(dev)]  # (B', H', r, D)
        kv_head = heads * self.k.shape[1] // Hq  # the kv head each query head reads (GQA)
        k = self.k[batch.to(dev)][:, kv_head.to(dev)]  # (B', H', Nk, D)
        k = k if cols is None else k[:, :, cols.to(dev)]  # (B', H', c, D)
        mask = self._dense_part(self.mask, rows, keys, heads, batch)
        bias = self._dense_part(self.bias, rows, keys, heads, batch)
        return cols, attention_weights(q, k, mask=mask, bias=bias, scale=self.scale, softcap=self.softcap)

    def weights(self, *, rows: Selection = None, heads: Selection = None, batch: Selection = None) -> Tensor:
        """Attention probabilities (B', H', r, Nk) of the selected batch elements, heads and query
        rows (default all). Rows keep their place in the sequence (causal alignment intact).
        Only the keys the mask may allow are scored (``scored``); the rest are exact zeros."""
        cols, w = self.scored(rows=rows, heads=heads, batch=batch)
        return scatter_columns(cols, w, self.shape[3])

    def pooled(self, block: int, *, heads: Selection = None, batch: Selection = None) -> Tensor:
        """Block means (B', H', ceil(Nq/b), ceil(Nk/b)), tile by tile: see ``pooled_map``."""
        return pooled_map(self, block, heads=heads, batch=batch)


@dataclass(frozen=True)
class LongformerRecord:
    """One call of a ``LongformerSelfAttention``: its two attentions and the token roles.

    ``local`` covers every row with the local pattern; ``global_`` is the global pass, whose row s
    of sample b is the token at ``slots[b, s]`` (-1: a filler slot, a sample with fewer than G
    global tokens). The layer's map takes a global token's row from ``global_``, is 0 on padding
    rows (as HF zeroes them) and takes every other row from ``local``.
    """

    name: str
    local: AttentionRecord  # q, k (B, H, N, D), the local mask: map (B, H, N, N)
    global_: AttentionRecord | None  # q (B, H, G, D), k (B, H, N, D): map (B, H, G, N); None: no global token
    slots: Tensor | None  # (B, G) long: the position of each global_ row, -1 on filler slots
    roles: TokenRoles  # valid / is_global, (B, N) bool or None (every token real / no global token)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, N, N) of the full map."""
        return self.local.shape

    def weights(self, *, rows: Selection = None, heads: Selection = None, batch: Selection = None) -> Tensor:
        """Attention probabilities (B', H', r, N) of the selected batch elements, heads and query
        rows (default all), the ones the layer's output was computed with."""
        B, _, N, _ = self.shape
        rows, batch = _index(rows, N, "rows"), _index(batch, B, "batch")
        w = self.local.weights(rows=rows, heads=heads, batch=batch)  # (B', H', r, N)
        if self.global_ is not None:
            w = self._with_global_rows(w, rows, heads, batch)
        return self._padding_rows_zeroed(w, rows, batch)

    def scored(self, *, rows: Selection = None, heads: Selection = None, batch: Selection = None,
               min_cols: int = 0) -> tuple[Tensor | None, Tensor]:
        """(cols, w) as ``AttentionRecord.scored``: the local pass's keys for rows that are no
        global token; rows holding a global token's row see every key, so then cols is None."""
        B, _, N, _ = self.shape
        rows, batch = _index(rows, N, "rows"), _index(batch, B, "batch")
        if self.global_ is not None:
            slots = self.slots.to(rows.device)[batch.to(rows.device)]  # (B', G)
            if bool((slots[:, :, None] == rows[None, None, :]).any()):
                return None, self.weights(rows=rows, heads=heads, batch=batch)
        cols, w = self.local.scored(rows=rows, heads=heads, batch=batch, min_cols=min_cols)  # (B', H', r, c)
        return cols, self._padding_rows_zeroed(w, rows, batch)

    def _padding_rows_zeroed(self, w: Tensor, rows: Tensor, batch: Tensor) -> Tensor:
        """``w`` (B', H', r, ...) with the rows of padding tokens 0 (as HF zeroes them)."""
        if self.roles.valid is None:
            return w
        real = self.roles.valid.to(w.device)[batch.to(w.device)][:, rows.to(w.device)]  # (B', r)
        return w.masked_fill(~real[:, None, :, None], 0.0)

    def _with_global_rows(self, w: Tensor, rows: Tensor, heads: Selection, batch: Tensor) -> Tensor:
        """``w`` (B', H', r, N) with the global tokens' rows taken from the global pass; only the
        slots these rows hold are computed."""
        dev = w.device
        hit = self.slots.to(dev)[batch.to(dev)][:, None, :] == rows.to(dev)[None, :, None]  # (B', r, G)
        is_global = hit.any(-1)  # (B', r)
        if not bool(is_global.any()):
            return w
        slot = hit.to(torch.int8).argmax(-1)  # (B', r): each global row's slot (0 on other rows)
        needed = torch.unique(slot[is_global])  # (s,) sorted
        w_g = self.global_.weights(rows=needed, heads=heads, batch=batch)  # (B', H', s, N)
        pick = torch.searchsorted(needed, slot).clamp(max=len(needed) - 1)  # (B', r): index into needed
        w_g = w_g.gather(2, pick[:, None, :, None].expand(-1, w.shape[1], -1, w.shape[3]))  # (B', H', r, N)
        return torch.where(is_global[:, None, :, None], w_g, w)

    def pooled(self, block: int, *, heads: Selection = None, batch: Selection = None) -> Tensor:
        """Block means (B', H', ceil(N/b), ceil(N/b)), tile by tile: see ``pooled_map``."""
        return pooled_map(self, block, heads=heads, batch=batch)


def longformer_record(name: str, q: Tensor, k: Tensor, mask: Mask, roles: TokenRoles,
                      glob: GlobalRows | None) -> LongformerRecord:
    """The record of one Longformer call, from what the layer hands its observers."""
    local = AttentionRecord(name, q.detach(), k.detach(), mask, None, None)
    if glob is None:
        return LongformerRecord(name, local, None, None, roles)
    global_ = AttentionRecord(name, glob.q.detach(), glob.k.detach(), glob.mask, None, None)
    return LongformerRecord(name, local, global_, glob.idx.masked_fill(~glob.real, -1), roles)


Record = AttentionRecord | LongformerRecord


class Capture:
    """The records of one ``capture`` block, by layer name; a layer called twice (decoding) keeps all.

    ``root`` is the name given to the captured module itself when it is an attention layer (its
    class name, e.g. ``"MultiHeadAttention"``, since ``named_modules()`` calls it ``""``); ``""``
    still finds it.
    """

    def __init__(self, root: str = ""):
        self.records: dict[str, list[Record]] = {}
        self.root = root

    @property
    def names(self) -> list[str]:
        return list(self.records)

    def __getitem__(self, name: str) -> Record:
        name = self.root if name == "" else name
        if name not in self.records:
            raise KeyError(f"no attention call recorded for {name!r}; recorded: {self.names}")
        return self.records[name][-1]

    def __len__(self) -> int:
        return len(self.records)

    def _add(self, record: Record) -> None:
        self.records.setdefault(record.name, []).append(record)


def _observer(cap: Capture, name: str, module: nn.Module) -> Callable[..., None]:
    """The callable appended to ``module.observers``: it keeps references and computes no map."""
    if isinstance(module, LongformerSelfAttention):
        def observe_longformer(q, k, mask, roles, glob):
            cap._add(longformer_record(name, q, k, mask, roles, glob))
        return observe_longformer

    def observe(q, k, mask, bias, scale, v=None):  # softcap=c caps the scores: so do its maps; v not needed
        cap._add(AttentionRecord(name, q.detach(), k.detach(), mask, bias, scale, softcap=getattr(module, "softcap", None)))
    return observe


def _root_name(model: nn.Module) -> str:
    """The name a capture gives ``model`` itself: its class name, unless a submodule is already
    called that (then ``"<ClassName>"``, which no attribute path can be)."""
    name = type(model).__name__
    taken = {n for n, _ in model.named_modules()}
    return name if name not in taken else f"<{name}>"


HF_IMPLEMENTATION = "attnkit"  # transformers' attn_implementation whose calls a capture observes


def _transformers_implementations(model: nn.Module) -> set[str]:
    """The ``config._attn_implementation`` of every transformers model inside ``model`` (none: {})."""
    impls = set()
    for m in model.modules():
        impl = getattr(getattr(m, "config", None), "_attn_implementation", None)
        if isinstance(impl, str):
            impls.add(impl)
    return impls


def _no_layers_error(model: nn.Module, impls: set[str]) -> ValueError:
    hf = (f"This transformers model runs attn_implementation={sorted(impls)[0]!r}: " if impls else
          "For a Hugging Face transformers model: ")
    return ValueError(f"capture: no attnkit attention layers found in this model ({type(model).__name__}); capture "
                      "records attnkit.nn.MultiHeadAttention and attnkit.nn.LongformerSelfAttention layers, and the "
                      f"attention calls of transformers models built with attn_implementation={HF_IMPLEMENTATION!r}, "
                      "not torch.nn.MultiheadAttention or other attention code. " + hf +
                      f"build it with attn_implementation={HF_IMPLEMENTATION!r} (import attnkit.integrations."
                      f"transformers, then from_pretrained(..., attn_implementation={HF_IMPLEMENTATION!r}) or "
                      f"model.set_attn_implementation({HF_IMPLEMENTATION!r})). Otherwise build the model from "
                      "attnkit.nn (MultiHeadAttention.from_torch, LongformerSelfAttention.from_hf, "
                      "attnkit.pretrained.load_bert / load_llama) and capture that")


def _transformers_observer(cap: Capture, names: dict[nn.Module, str],
                           wanted: set[str] | None) -> Callable[..., None]:
    """The ``observing`` callback: each "attnkit" call of a module of this model (named by
    ``names``) becomes an ``AttentionRecord`` (references only, no map computed)."""
    def observe(call) -> None:
        name = names.get(call.module)
        if name is None or (wanted is not None and name not in wanted):
            return  # another model's call, or a layer not asked for
        cap._add(AttentionRecord(name, call.q.detach(), call.k.detach(), call.mask, call.bias, call.scale,
                                 call.softcap))
    return observe


def _chosen(model: nn.Module, root: str, found: dict[str, nn.Module], hf: bool,
            layers: Sequence[str] | None) -> list[str] | None:
    """The layer names asked for, checked (None: all)."""
    if layers is None:
        return None
    wanted = [root if name == "" else name for name in layers]
    known = set(found) | ({name for name, _ in model.named_modules() if name} if hf else set())
    unknown = [name for name in wanted if name not in known]
    if unknown:
        listed = list(found) + ([n for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
                                if hf else [])
        kinds = "MultiHeadAttention or LongformerSelfAttention" + (" or transformers module" if hf else "")
        raise ValueError(f"capture: no attnkit {kinds} named {unknown}; the model has {listed}; pass names from "
                         "that list, or layers=None for all")
    return wanted


@contextmanager
def capture(model: nn.Module, layers: Sequence[str] | None = None) -> Iterator[Capture]:
    """Record the attention calls of ``model`` (or only the named layers, by
    ``model.named_modules()`` names) while the block runs, keeping references to each call's q,
    k, mask, bias, scale and softcap; the layers still run their fast backends.

    Recorded: attnkit ``MultiHeadAttention`` and ``LongformerSelfAttention`` layers (through their
    ``observers``), and every attention call of a Hugging Face transformers model built with
    ``attn_implementation="attnkit"`` (through ``attnkit.integrations.transformers.observing``;
    e.g. ``cap["model.layers.0.self_attn"]``, q (B, Hq, Nq, D) and k (B, Hkv, Nk, D) after RoPE
    and the cache, the translated mask, Gemma 2's softcap).

    Layers are named as ``model.named_modules()`` names them (``"blocks.0.attn"``), except ``model``
    itself when it is an attention layer: named modules call it ``""``, a capture calls it by its
    class name (``capture(mha)`` records ``cap["MultiHeadAttention"]``; ``cap[""]`` and
    ``layers=[""]`` still mean it).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the model holds no attnkit attention layer and runs no transformers attention
            through "attnkit" (nothing could ever be recorded: build it with
            ``attn_implementation="attnkit"``), or ``layers`` names a module it does not have.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture: expected a torch nn.Module, got {type(model).__name__}")
    root = _root_name(model)
    found = {name or root: m for name, m in model.named_modules() if isinstance(m, RECORDED)}
    impls = _transformers_implementations(model)
    hf = HF_IMPLEMENTATION in impls
    if not found and not hf:
        raise _no_layers_error(model, impls)
    wanted = _chosen(model, root, found, hf, layers)
    cap = Capture(root)
    hooks = [(found[name], _observer(cap, name, found[name])) for name in (found if wanted is None else wanted)
             if name in found]
    with ExitStack() as stack:
        if hf:  # imported only here: `import attnkit.viz` does not import transformers
            from ..integrations.transformers import observing

            names = {m: name or root for name, m in model.named_modules()}
            stack.enter_context(observing(_transformers_observer(cap, names, None if wanted is None else set(wanted))))
        for module, observe in hooks:
            module.observers.append(observe)
            stack.callback(module.observers.remove, observe)
        yield cap
