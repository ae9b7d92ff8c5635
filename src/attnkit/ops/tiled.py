"""Exact attention in tiles: FlashAttention-2's algorithm (Dao 2023) over any attnkit mask.

Forward, for each block of queries::

    out, lse = nothing
    for each span of key tiles the mask allows (empty tiles are never visited):
        out, lse = merge((out, lse), attend(q_block, k_span, v_span, mask only if partial))

Backward recomputes instead of storing probabilities: with the final ``out`` and ``lse`` saved,
each (query block, key span) pair contributes its share of ``dq``, ``dk``, ``dv`` independently
(P = exp(S - lse), dS = P * (dP - rowsum(dout * out))).

Consecutive key tiles of the same kind are fused into one span: FULL spans run with no mask at
all, PARTIAL spans get their (block_q x span) slice of the mask. Memory is O(N * block), never
Nq x Nk. Inside a span the work goes to a *tile kernel*:

- ``fused``: torch's CPU flash-attention kernel, which returns its log-sum-exp (CPU only);
- ``math``: the same arithmetic written with torch matmuls, chunked by ``block_k`` (any device).

Softcap and dropout run on the math kernel (torch's fused one has neither). Each math piece (query
rows q0..q1, keys k0..k1) caps its scores, ``c * tanh(s / c)``, and multiplies its probabilities by
the dropout multiplier ``keep / (1 - p)`` of exactly those (batch, query head, row, key)
positions, from the Philox mask of ``ops/dropout.py``; the backward draws the same multiplier
again (FlashAttention never stores the mask), so every pair keeps the bit the reference gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..bias import Bias
from ..masks import EMPTY, PARTIAL, Mask
from . import dropout as _dropout
from .block_plan import merged_kinds
from .merge import lse_for_recompute, merge
from .precision import compute_dtype, expand_kv, reduce_kv_grad, unit_stride
from .tiles import (dropout_tile, fused_tile, fused_tile_backward, math_tile, math_tile_backward,
                    upcast_for_partials, use_fused)

# Queries per block, largest first. Every call of torch's CPU flash backward touches all keys of
# its span, so big query blocks are cheaper for dense work (benchmarks/results/tiled_blocks_*.md);
# sparse masks want small blocks, which waste fewer keys.
BLOCK_Q_CHOICES = (8192, 2048, 512, 128)
WASTE_TOLERANCE = 1.2  # take the largest block visiting at most 1.2x the keys of the tightest
BLOCK_K = 256  # granularity at which the mask's tiles are classified
TILE_ELEMENTS = 1 << 21  # bound on a (block_q x span) additive tile handed to the fused kernel


@dataclass(frozen=True)
class Span:
    """Keys [k0, k1) seen by one query block; ``partial`` if the mask must be applied inside."""

    k0: int
    k1: int
    partial: bool


@dataclass(frozen=True)
class Plan:
    """Which key spans each query block visits, derived from the mask's tile kinds."""

    block_q: int
    Nq: int
    Nk: int
    spans: tuple[tuple[Span, ...], ...]  # one tuple per query block



def make_plan(mask: Mask | None, bias: Bias | None, Nq: int, Nk: int, block_q: int, block_k: int,
              device: torch.device) -> Plan:
    """Group each query block's non-empty key tiles into spans of equal kind.

    A tile is FULL for the plan only if it is FULL for every batch element and head; it is
    skipped only if it is EMPTY for all of them.
    """
    kinds = merged_kinds(mask, Nq, Nk, block_q, block_k, device).cpu()  # (nQ, nK), shared with the Triton plan
    spans = tuple(_spans_of_row(row, block_k, Nk) for row in kinds.tolist())
    return Plan(block_q, Nq, Nk, spans)


def plan_work(plan: Plan, mask: Mask | None, bias: Bias | None) -> float:
    """Estimated (query, key) pairs a plan computes: a diagonal causal span that the fused kernel
    runs with its own is_causal costs half its rectangle."""
    total = 0.0
    for qb, row in enumerate(plan.spans):
        q0 = qb * plan.block_q
        rows = min(plan.block_q, plan.Nq - q0)
        for sp in row:
            causal = (sp.partial and bias is None and mask is not None
                      and mask.is_top_left_causal(q0, sp.k0, plan.Nq, plan.Nk))
            total += rows * (sp.k1 - sp.k0) * (0.5 if causal else 1.0)
    return total


def choose_plan(mask: Mask | None, bias: Bias | None, Nq: int, Nk: int, block_k: int,
                device: torch.device) -> Plan:
    """The plan with the largest query block whose estimated work is at most WASTE_TOLERANCE x
    the least of the candidates (dense masks get big blocks, windows small ones)."""
    if mask is None:
        return make_plan(None, bias, Nq, Nk, BLOCK_Q_CHOICES[0], block_k, device)
    plans = [make_plan(mask, bias, Nq, Nk, bq, block_k, device) for bq in BLOCK_Q_CHOICES]
    works = [plan_work(p, mask, bias) for p in plans]
    return next(p for p, w in zip(plans, works) if w <= WASTE_TOLERANCE * min(works))


def work_fraction(mask: Mask | None, bias: Bias | None, Nq: int, Nk: int, device: torch.device) -> float:
    """Share of the Nq x Nk pairs tiled computes for this mask (1.0 without a mask)."""
    plan = choose_plan(mask, bias, Nq, Nk, BLOCK_K, device)
    return plan_work(plan, mask, bias) / max(1, Nq * Nk)


def _spans_of_row(kinds: list[int], block_k: int, Nk: int) -> tuple[Span, ...]:
    """Runs of consecutive non-empty tiles of the same kind -> spans of keys."""
    spans: list[Span] = []
    for j, kind in enumerate(kinds):
        if kind == EMPTY:
            continue
        k0, k1, partial = j * block_k, min((j + 1) * block_k, Nk), kind == PARTIAL
        if spans and spans[-1].k1 == k0 and spans[-1].partial == partial:
            spans[-1] = Span(spans[-1].k0, k1, partial)
        else:
            spans.append(Span(k0, k1, partial))
    return tuple(spans)


@dataclass(frozen=True)
class Problem:
    """Everything a tile needs besides the tensors: mask, bias, scale, the problem size, the cap
    and the dropout (probability and seed)."""

    mask: Mask | None
    bias: Bias | None
    scale: float
    Nq: int
    Nk: int
    softcap: float | None = None
    dropout_p: float = 0.0
    dropout_seed: int = 0

    def multiplier(self, q0: int, q1: int, piece: Span, B: int, H: int, dtype, device) -> Tensor | None:
        """(B, H, q1-q0, k1-k0) dropout multiplier keep / (1 - p) of rows q0..q1 and the piece's
        keys (H the expanded query heads), or None without dropout."""
        if self.dropout_p == 0:
            return None
        rows = torch.arange(q0, q1, device=device)[:, None]
        cols = torch.arange(piece.k0, piece.k1, device=device)[None, :]
        bh = _dropout.batch_heads(B, H, device)  # (B, H, 1, 1)
        return dropout_tile(self.dropout_seed, self.dropout_p, bh, rows, cols, dtype)

    def kernel_causal(self, q0: int, span: Span) -> bool:
        """A partial span the fused kernel can run with its own is_causal instead of a mask tile."""
        return (span.partial and self.bias is None and self.mask is not None
                and self.mask.is_top_left_causal(q0, span.k0, self.Nq, self.Nk))

    def additive(self, q0: int, q1: int, span: Span, dtype: torch.dtype, device) -> Tensor | None:
        """The (Bm, Hm, q1-q0, k1-k0) float tile of bias + (-inf where masked), or None."""
        need_mask = span.partial and self.mask is not None
        if not need_mask and self.bias is None:
            return None
        rows = torch.arange(q0, q1, device=device)
        cols = torch.arange(span.k0, span.k1, device=device)
        tile = torch.zeros((), dtype=dtype, device=device)
        if self.bias is not None:
            tile = self.bias.evaluate(rows, cols, self.Nq, self.Nk).to(dtype)
        if need_mask:
            allowed = self.mask.evaluate(rows, cols, self.Nq, self.Nk)
            tile = torch.where(allowed, tile, torch.tensor(float("-inf"), dtype=dtype, device=device))
        return tile


def _chunks(span: Span, size: int):
    """Split a span into pieces of at most ``size`` keys."""
    for c0 in range(span.k0, span.k1, size):
        yield Span(c0, min(c0 + size, span.k1), span.partial)


def _pieces(prob: Problem, q0: int, block_q: int, span: Span, fused: bool, block_k: int):
    """The calls one span becomes: block_k chunks for the math kernel; for the fused kernel the
    whole span unless it needs an additive tile, whose size TILE_ELEMENTS bounds."""
    if not fused:
        return _chunks(span, block_k)
    needs_tile = prob.bias is not None or (span.partial and not prob.kernel_causal(q0, span))
    return _chunks(span, max(block_k, TILE_ELEMENTS // block_q)) if needs_tile else (span,)


def _forward(q, k, v, prob: Problem, plan: Plan, fused: bool, block_k: int) -> tuple[Tensor, Tensor]:
    """q (B, Hq, Nq, D), k/v (B, Hq, Nk, D/Dv) with heads already expanded -> out, lse (fp32/64)."""
    ct = compute_dtype(q.dtype)
    B, H, Nq, _ = q.shape
    out = q.new_zeros(B, H, Nq, v.shape[-1], dtype=ct)
    lse = q.new_full((B, H, Nq), float("-inf"), dtype=ct)
    for qb, spans in enumerate(plan.spans):
        q0, q1 = qb * plan.block_q, min((qb + 1) * plan.block_q, Nq)
        acc_out, acc_lse = None, None
        for span in spans:
            for piece in _pieces(prob, q0, plan.block_q, span, fused, block_k):
                args = (q[:, :, q0:q1], k[:, :, piece.k0:piece.k1], v[:, :, piece.k0:piece.k1])
                if fused and prob.kernel_causal(q0, piece):
                    part = fused_tile(*args, None, prob.scale, is_causal=True)
                elif fused:
                    part = fused_tile(*args, prob.additive(q0, q1, piece, ct, q.device), prob.scale)
                else:
                    tile = prob.additive(q0, q1, piece, ct, q.device)
                    drop = prob.multiplier(q0, q1, piece, B, H, ct, q.device)
                    part = math_tile(*args, tile, prob.scale, prob.softcap, drop)
                acc_out, acc_lse = merge(acc_out, acc_lse, *part)
        if acc_out is not None:
            out[:, :, q0:q1], lse[:, :, q0:q1] = acc_out, acc_lse
    return out, lse


def _backward(dout, dlse, q, k, v, out, lse, prob: Problem, plan: Plan, fused: bool, block_k: int):
    """dq, dk, dv (compute dtype) for expanded heads; see the module docstring for the algebra."""
    ct = compute_dtype(q.dtype)
    q, k, v, dout, out = upcast_for_partials(fused, ct, q, k, v, dout, out)
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=q.device)
    dv = torch.zeros(v.shape, dtype=ct, device=q.device)
    lse_bwd = lse_for_recompute(lse)
    delta = (dout.to(ct) * out.to(ct)).sum(-1)  # (B, H, Nq): rowsum(dout * out)
    if dlse is not None:
        delta = delta - dlse.to(ct)  # d lse / d s = P, so it folds into the row term
        fused = False  # the fused kernel computes its own rowsum and cannot take dlse
    for qb, spans in enumerate(plan.spans):
        q0, q1 = qb * plan.block_q, min((qb + 1) * plan.block_q, q.shape[2])
        for span in spans:
            for piece in _pieces(prob, q0, plan.block_q, span, fused, block_k):
                a, b = piece.k0, piece.k1
                causal = fused and prob.kernel_causal(q0, piece)
                tile = None if causal else prob.additive(q0, q1, piece, ct, q.device)
                args = (dout[:, :, q0:q1], q[:, :, q0:q1], k[:, :, a:b], v[:, :, a:b],
                        out[:, :, q0:q1], lse_bwd[:, :, q0:q1], delta[:, :, q0:q1], tile, prob.scale)
                if fused:
                    g_q, g_k, g_v = fused_tile_backward(*args, is_causal=causal)
                else:
                    drop = prob.multiplier(q0, q1, piece, q.shape[0], q.shape[1], ct, q.device)
                    g_q, g_k, g_v = math_tile_backward(*args, prob.softcap, drop)
                dq[:, :, q0:q1] += g_q
                dk[:, :, a:b] += g_k
                dv[:, :, a:b] += g_v
    return dq, dk, dv


class _TiledFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prob, plan, fused, block_k):
        Hq, Hkv = q.shape[1], k.shape[1]
        ke, ve = expand_kv(k, Hq), expand_kv(v, Hq)
        out, lse = _forward(q, ke, ve, prob, plan, fused, block_k)
        out_q = out.to(q.dtype)
        ctx.save_for_backward(q, ke, ve, out_q, lse)
        ctx.cfg = (prob, plan, fused, block_k, Hkv)
        ctx.set_materialize_grads(False)
        return out_q, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, ke, ve, out, lse = ctx.saved_tensors
        prob, plan, fused, block_k, Hkv = ctx.cfg
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(dout, dlse, q, ke, ve, out, lse, prob, plan, fused, block_k)
        dk, dv = reduce_kv_grad(dk, Hkv), reduce_kv_grad(dv, Hkv)  # heads sharing a kv head
        return dq.to(q.dtype), dk.to(ke.dtype), dv.to(ve.dtype), None, None, None, None


def why_not(bias: Bias | None, dropout_p: float, softcap: float | None) -> str | None:
    """None if tiled can run the call, else the reason it cannot (dropout and softcap it runs)."""
    if bias is not None and bias.requires_grad() and torch.is_grad_enabled():
        return "bias requires grad: tiled does not compute the bias gradient (use impl='sdpa' or 'reference')"
    return None


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None, bias: Bias | None,
                    scale: float, block_q: int | None = None, block_k: int = BLOCK_K,
                    kernel: str = "auto", softcap: float | None = None, dropout_p: float = 0.0,
                    dropout_seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact attention, O(N * block) memory, visiting only tiles the mask allows.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv) in q's dtype,
    lse (B, Hq, Nq) in float32 (float64 for float64 inputs). ``kernel``: "auto", "fused", "math".
    ``block_q=None`` picks the query block from the mask's structure (``choose_plan``).
    ``softcap``: scores become ``softcap * tanh(s / softcap)`` (Gemma 2). ``dropout_p``: the
    probabilities are multiplied by the keep mask of ``ops/dropout.py`` for ``dropout_seed`` (one
    is drawn with ``dropout.draw_seed`` when None) over 1 - p; the lse is that before dropout.
    Both run on the math kernel.

    Raises:
        ValueError: a bad ``kernel``, or kernel="fused" with softcap / dropout or inputs torch's
            CPU flash kernel cannot take.
    """
    Nq, Nk = q.shape[2], k.shape[2]
    fused = use_fused("tiled", kernel, q, v, softcap, dropout_p)
    if dropout_p > 0 and dropout_seed is None:
        dropout_seed = _dropout.draw_seed()
    plan = (choose_plan(mask, bias, Nq, Nk, block_k, q.device) if block_q is None
            else make_plan(mask, bias, Nq, Nk, block_q, block_k, q.device))
    prob = Problem(mask, bias, scale, Nq, Nk, softcap, dropout_p, dropout_seed or 0)
    if fused:  # torch's CPU flash kernel needs stride(-1) == 1: copy once here, not per tile
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    return _TiledFunction.apply(q, k, v, prob, plan, fused, block_k)
