"""Capture what attention layers look at, without slowing down what you do not look at.

    with capture(model) as cap:
        model(ids)
    cap.names                         # every attnkit attention layer that ran, in call order
    rec = cap["blocks.0.attn"]        # the last call of that layer (names as model.named_modules())
    rec.weights()                     # (B, H, Nq, Nk) probabilities, for short inputs
    rec.weights(rows=[5], heads=[0])  # only what a view needs: (B, 1, 1, Nk)
    rec.pooled(64)                    # (B, H, ceil(Nq/64), ceil(Nk/64)) block means, tile by tile

During the forward pass a capture only keeps references to each call's q and k (after RoPE; the
keys include a KV cache's), its mask, bias and scale: the layer still runs its fast backend and no
N x N matrix is built. Maps are computed on demand from those, by the reference formula
(``ak.attention_weights``), a block of query rows at a time.

Two kinds of layer are recorded. ``MultiHeadAttention`` gives an ``AttentionRecord``.
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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from ..bias import Bias, DenseBias
from ..functional import attention_weights
from ..masks import Mask
from ..nn import LongformerSelfAttention, MultiHeadAttention
from ..nn.longformer import GlobalRows, TokenRoles

ROW_BLOCK = 256  # query rows per on-demand step: b x Nk scores per head at a time
RECORDED = (MultiHeadAttention, LongformerSelfAttention)  # the layer types capture hooks

Selection = Sequence[int] | Tensor | None  # indices to keep; None = all


def _index(selection: Selection, n: int, what: str) -> Tensor:
    idx = torch.arange(n) if selection is None else torch.as_tensor(selection, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"{what}: expected indices in 0..{n - 1}, got {selection!r}")
    return idx


class AttentionMap(Protocol):
    """What ``pooled_map`` needs: the map's shape and selected rows of it on demand."""

    @property
    def shape(self) -> tuple[int, int, int, int]: ...

    def weights(self, *, rows: Selection = None, heads: Selection = None, batch: Selection = None) -> Tensor: ...


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

    def add(self, rows: Tensor, w: Tensor) -> None:
        """rows (r,) query indices; w (..., r, Nk) their probabilities."""
        w = nn.functional.pad(w.double().cpu(), (0, self.nJ * self.block - self.Nk))
        col_sums = w.reshape(*w.shape[:-1], self.nJ, self.block).sum(-1)  # (..., r, nJ)
        self.sums.index_add_(-2, rows.cpu() // self.block, col_sums)

    def result(self) -> Tensor:
        b = self.block
        col_count = torch.full((self.nJ,), float(b), dtype=torch.float64)
        col_count[-1] = self.Nk - b * (self.nJ - 1)
        row_count = torch.bincount(torch.arange(self.Nq) // b, minlength=self.nI).double()  # (nI,)
        return self.sums / (row_count[:, None] * col_count[None, :])


def pooled_map(record: AttentionMap, block: int, *, heads: Selection = None, batch: Selection = None) -> Tensor:
    """Block means of ``record``'s map: (B', H', ceil(Nq/b), ceil(Nk/b)) (see ``BlockPool``).
    Computed one block of query rows and one head at a time: never Nq x Nk in memory."""
    B, Hq, Nq, Nk = record.shape
    heads, batch = _index(heads, Hq, "heads"), _index(batch, B, "batch")
    pools = [BlockPool((len(batch),), Nq, Nk, block) for _ in heads]
    dtype = torch.float32
    step = max(block, ROW_BLOCK // block * block)  # whole pooling blocks per step
    for pool, h in zip(pools, heads.tolist()):
        for r0 in range(0, Nq, step):
            rows = torch.arange(r0, min(Nq, r0 + step))
            w = record.weights(rows=rows, heads=[h], batch=batch)[:, 0]  # (B', r, Nk)
            dtype = w.dtype
            pool.add(rows, w)
    return torch.stack([pool.result() for pool in pools], 1).to(dtype)  # (B', H', nI, nJ)


@dataclass(frozen=True)
class AttentionRecord:
    """One call of one attention layer: enough to recompute any part of its attention map."""

    name: str
    q: Tensor  # (B, Hq, Nq, D)
    k: Tensor  # (B, Hkv, Nk, D)
    mask: Mask | Tensor | None
    bias: Bias | Tensor | None
    scale: float | None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, Hq, Nq, Nk) of the full map."""
        return self.q.shape[0], self.q.shape[1], self.q.shape[2], self.k.shape[2]

    def _dense_part(self, part: Mask | Bias | Tensor | None, rows: Tensor, heads: Tensor,
                    batch: Tensor) -> Tensor | None:
        """The mask or bias on (rows, all keys) for the selected batch elements and heads:
        (B' or 1, H' or 1, r, Nk), or None."""
        if part is None:
            return None
        B, Hq, Nq, Nk = self.shape
        if isinstance(part, Tensor) and part.is_floating_point():
            part = DenseBias(part)
        if isinstance(part, Tensor):  # a bool mask tensor broadcastable to (B, Hq, Nq, Nk)
            dense = part.reshape((1,) * (4 - part.dim()) + tuple(part.shape)).expand(-1, -1, Nq, Nk)
            dense = dense[:, :, rows.to(dense.device)]
        else:  # an attnkit mask or bias evaluates itself on the sub-grid
            dense = part.evaluate(rows.to(self.q.device), torch.arange(Nk, device=self.q.device), Nq, Nk)
        dense = dense[batch.to(dense.device)] if dense.shape[0] > 1 else dense
        return dense[:, heads.to(dense.device)] if dense.shape[1] > 1 else dense

    def weights(self, *, rows: Selection = None, heads: Selection = None, batch: Selection = None) -> Tensor:
        """Attention probabilities (B', H', r, Nk) of the selected batch elements, heads and query
        rows (default all). Rows keep their place in the sequence (causal alignment intact)."""
        B, Hq, Nq, Nk = self.shape
        rows, heads, batch = _index(rows, Nq, "rows"), _index(heads, Hq, "heads"), _index(batch, B, "batch")
        dev = self.q.device
        q = self.q[batch.to(dev)][:, heads.to(dev)][:, :, rows.to(dev)]  # (B', H', r, D)
        kv_head = heads * self.k.shape[1] // Hq  # the kv head each query head reads (GQA)
        k = self.k[batch.to(dev)][:, kv_head.to(dev)]  # (B', H', Nk, D)
        mask = self._dense_part(self.mask, rows, heads, batch)
        bias = self._dense_part(self.bias, rows, heads, batch)
        return attention_weights(q, k, mask=mask, bias=bias, scale=self.scale)

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
        if self.roles.valid is not None:
            real = self.roles.valid.to(w.device)[batch.to(w.device)][:, rows.to(w.device)]  # (B', r)
            w = w.masked_fill(~real[:, None, :, None], 0.0)
        return w

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

    def observe(q, k, mask, bias, scale):
        cap._add(AttentionRecord(name, q.detach(), k.detach(), mask, bias, scale))
    return observe


def _root_name(model: nn.Module) -> str:
    """The name a capture gives ``model`` itself: its class name, unless a submodule is already
    called that (then ``"<ClassName>"``, which no attribute path can be)."""
    name = type(model).__name__
    taken = {n for n, _ in model.named_modules()}
    return name if name not in taken else f"<{name}>"


@contextmanager
def capture(model: nn.Module, layers: Sequence[str] | None = None) -> Iterator[Capture]:
    """Record the calls of ``model``'s attnkit ``MultiHeadAttention`` and ``LongformerSelfAttention``
    layers (or only the named ones, by ``model.named_modules()`` names) while the block runs.

    Layers are named as ``model.named_modules()`` names them (``"blocks.0.attn"``), except ``model``
    itself when it is an attention layer: named modules call it ``""``, a capture calls it by its
    class name (``capture(mha)`` records ``cap["MultiHeadAttention"]``; ``cap[""]`` and
    ``layers=[""]`` still mean it).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: the model holds no attnkit attention layer (nothing could ever be recorded), or
            ``layers`` names one it does not have.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture: expected a torch nn.Module, got {type(model).__name__}")
    root = _root_name(model)
    found = {name or root: m for name, m in model.named_modules() if isinstance(m, RECORDED)}
    if not found:
        raise ValueError(f"capture: no attnkit attention layers found in this model ({type(model).__name__}); "
                         "capture records attnkit.nn.MultiHeadAttention and attnkit.nn.LongformerSelfAttention "
                         "layers, not torch.nn.MultiheadAttention or other attention code. Build the model from "
                         "attnkit.nn (MultiHeadAttention.from_torch, LongformerSelfAttention.from_hf, "
                         "attnkit.pretrained.load_bert / load_llama) and capture that")
    wanted = list(found) if layers is None else [root if name == "" else name for name in layers]
    unknown = [name for name in wanted if name not in found]
    if unknown:
        raise ValueError(f"capture: no attnkit MultiHeadAttention or LongformerSelfAttention named {unknown}; "
                         f"the model has {list(found)}; pass names from that list, or layers=None for all")
    cap = Capture(root)
    hooks = [(found[name], _observer(cap, name, found[name])) for name in wanted]
    for module, observe in hooks:
        module.observers.append(observe)
    try:
        yield cap
    finally:
        for module, observe in hooks:
            module.observers.remove(observe)
