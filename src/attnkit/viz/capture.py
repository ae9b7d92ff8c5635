"""Capture what attention layers look at, without slowing down what you do not look at.

    with capture(model) as cap:
        model(ids)
    cap.names                         # every attnkit MultiHeadAttention that ran, in call order
    rec = cap["blocks.0.attn"]        # the last call of that layer
    rec.weights()                     # (B, H, Nq, Nk) probabilities, for short inputs
    rec.weights(rows=[5], heads=[0])  # only what a view needs: (B, 1, 1, Nk)
    rec.pooled(64)                    # (B, H, ceil(Nq/64), ceil(Nk/64)) block means, tile by tile

During the forward pass a capture only keeps references to each call's q and k (after RoPE; the
keys include a KV cache's), its mask, bias and scale: the layer still runs its fast backend and no
N x N matrix is built. Maps are computed on demand from those, by the reference formula
(``ak.attention_weights``), a block of query rows at a time.

Legend: B batch, Hq / Hkv query / key heads, Nq / Nk queries / keys, D head dim, b pooling block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..bias import Bias, DenseBias
from ..functional import attention_weights
from ..masks import Mask
from ..nn import MultiHeadAttention

ROW_BLOCK = 256  # query rows per on-demand step: b x Nk scores per head at a time


def _index(selection: Sequence[int] | Tensor | None, n: int, what: str) -> Tensor:
    idx = torch.arange(n) if selection is None else torch.as_tensor(selection, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"{what}: expected indices in 0..{n - 1}, got {selection!r}")
    return idx


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

    def weights(self, *, rows: Sequence[int] | Tensor | None = None, heads: Sequence[int] | Tensor | None = None,
                batch: Sequence[int] | Tensor | None = None) -> Tensor:
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

    def pooled(self, block: int, *, heads: Sequence[int] | Tensor | None = None,
               batch: Sequence[int] | Tensor | None = None) -> Tensor:
        """Block means of the map: (B', H', ceil(Nq/b), ceil(Nk/b)), entry (I, J) the mean
        probability over query block I x key block J (edge blocks average what they hold).
        Computed one block of query rows and one head at a time: never Nq x Nk in memory."""
        if not isinstance(block, int) or block < 1:
            raise ValueError(f"pooled: block must be an int >= 1, got {block!r}")
        B, Hq, Nq, Nk = self.shape
        heads, batch = _index(heads, Hq, "heads"), _index(batch, B, "batch")
        nI, nJ = -(-Nq // block), -(-Nk // block)
        col_count = torch.full((nJ,), float(block)).double()
        col_count[-1] = Nk - block * (nJ - 1)
        out = torch.zeros(len(batch), len(heads), nI, nJ, dtype=torch.float64)
        step = max(block, ROW_BLOCK // block * block)  # whole pooling blocks per step
        for h_i, h in enumerate(heads.tolist()):
            for r0 in range(0, Nq, step):
                rows = torch.arange(r0, min(Nq, r0 + step))
                w = self.weights(rows=rows, heads=[h], batch=batch)[:, 0].double().cpu()  # (B', r, Nk)
                w = nn.functional.pad(w, (0, nJ * block - Nk))
                col_sums = w.reshape(w.shape[0], w.shape[1], nJ, block).sum(-1)  # (B', r, nJ)
                block_of_row = rows // block
                out[:, h_i].index_add_(1, block_of_row, col_sums)
        row_count = torch.bincount(torch.arange(Nq) // block, minlength=nI).double()  # (nI,)
        return (out / (row_count[:, None] * col_count[None, :])).to(self.q.dtype)


class Capture:
    """The records of one ``capture`` block, by layer name; a layer called twice (decoding) keeps all."""

    def __init__(self):
        self.records: dict[str, list[AttentionRecord]] = {}

    @property
    def names(self) -> list[str]:
        return list(self.records)

    def __getitem__(self, name: str) -> AttentionRecord:
        if name not in self.records:
            raise KeyError(f"no attention call recorded for {name!r}; recorded: {self.names}")
        return self.records[name][-1]

    def __len__(self) -> int:
        return len(self.records)


@contextmanager
def capture(model: nn.Module, layers: Sequence[str] | None = None) -> Iterator[Capture]:
    """Record the attention calls of ``model``'s attnkit ``MultiHeadAttention`` layers (or only the
    named ones, by ``model.named_modules()`` names) while the block runs."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)}
    wanted = list(found) if layers is None else list(layers)
    unknown = [name for name in wanted if name not in found]
    if unknown:
        raise ValueError(f"capture: no attnkit MultiHeadAttention named {unknown}; the model has {list(found)}")
    cap = Capture()
    hooks = []
    for name in wanted:
        def observe(q, k, mask, bias, scale, name=name):
            cap.records.setdefault(name, []).append(AttentionRecord(name, q.detach(), k.detach(), mask, bias, scale))
        found[name].observers.append(observe)
        hooks.append((found[name], observe))
    try:
        yield cap
    finally:
        for module, observe in hooks:
            module.observers.remove(observe)
