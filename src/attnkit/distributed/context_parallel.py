"""Exact context-parallel attention: each rank holds a shard of the sequence and receives only the
keys and values its queries may see.

Ring Attention (Liu et al. 2023) and its descendants (ring-flash-attn, Megatron's and PyTorch's
context parallelism) pass every key shard around a ring of P ranks and merge the partial results
through their log-sum-exps. Here each rank reads the mask's block structure (``plan.build``) and
exchanges only the key blocks some query of the receiver may see (a sliding window: the
neighbours' edges only; a causal mask: nothing from later positions), with every transfer posted at
once (``batch_isend_irecv``) so it runs while the rank computes its own keys first.

Forward, on rank r (legend: B batch, Hq / Hkv heads, n = N / P local positions, D head dim)::

    post sends of r's needed key blocks to every rank that needs them, and receives of r's
    for each source s (r first): for each non-empty (query run, key segment) pair:
        (out_p, lse_p) = ak.attention(q_run, k_seg, v_seg, mask=Region(mask, run, seg), return_lse=True)
        (out, lse) = merge((out, lse), (out_p, lse_p))          # ops/merge.py, exact

Backward (FlashAttention-2's recomputation, Dao 2023, per pair): the keys are exchanged again, each
pair's partial is recomputed with autograd, and its gradient flows from the merged output by

    w_p = exp(lse_p - lse),   d out_p = w_p dout,   d lse_p = w_p (<dout, out_p - out> + dlse)

(the merge's derivative); dk and dv of another rank's keys are sent home and added there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .._dispatch import check_impl_name
from .._validate import _normalize_bias, _normalize_mask, validate
from ..bias import row_stabilized
from ..bias import Bias
from ..functional import attention
from ..masks import UNCACHEABLE, Mask
from ..ops.block_plan import _holds, structure_key
from ..ops.merge import finite_or_zero, merge
from ..ops.precision import compute_dtype
from .comm import DEFAULT_TIMEOUT_S, CommStats, Exchange, check_same_everywhere, digest, world_of
from .global_rows import GlobalRows, frozen, global_rows, replace_rows, without_global_rows
from .layout import LAYOUTS, check_layout, local_size, positions
from .plan import KEY_BLOCK, SCHEDULES, Plan, Segment, build, region_bias

TAG_KV, TAG_KV_BACKWARD, TAG_GRAD = 11, 12, 13
TAG_GLOBAL_Q, TAG_GLOBAL_PARTIAL, TAG_GLOBAL_DOUT, TAG_GLOBAL_DQ = 21, 22, 23, 24
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class _Call:
    """Everything a call's forward and backward share besides the tensors."""

    plan: Plan
    rank: int
    group: object
    bias: Bias | None
    scale: float | None
    softcap: float | None
    impl: str
    timeout_s: float
    stats: CommStats | None
    shapes: tuple[int, int, int, int]  # B, Hkv, D, Dv
    mask: Mask | None  # the whole mask (the plan's pairs may hold it without its global query rows)
    rows: GlobalRows | None  # global query rows, reduced apart (global_rows.py), or None
    key_positions: Tensor  # (n,) this rank's positions


def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | Tensor | None = None,
                               bias: Bias | Tensor | None = None, scale: float | None = None,
                               softcap: float | None = None, group=None, layout: str = "zigzag",
                               schedule: str = "mask", impl: str = "auto", return_lse: bool = False,
                               timeout_s: float = DEFAULT_TIMEOUT_S, stats: CommStats | None = None,
                               key_block: int = KEY_BLOCK) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention over a sequence sharded across the ranks of ``group``; call it on every rank.

    Equal to ``ak.attention`` on the whole sequence (the numerics contract), forward and backward.

    Args:
        q: (B, Hq, n, D) this rank's queries: the positions ``layout`` gives it of a whole sequence of
            N = the sum of every rank's n (``attnkit.distributed.shard`` cuts a whole tensor).
        k, v: (B, Hkv, n, D) / (B, Hkv, n, Dv) the same positions' keys and values (self-attention;
            Hq % Hkv == 0, GQA).
        mask: any attnkit mask (or bool tensor) of the *whole* (N, N) problem, the same on every
            rank; True = may attend. A bool tensor or ``dense_mask`` holds N x N on every rank.
        bias: additive, of the whole problem: a structured bias (``ak.alibi``) or a float tensor
            broadcastable to (B, Hq, N, N); one that requires grad is refused.
        scale, softcap, impl: as ``ak.attention`` (impl is the backend of each rank's local work).
        group: the process group (None: the default one). gloo takes CPU tensors, nccl CUDA ones.
        layout: "zigzag" (default; balanced for causal masks), "contiguous" or "striped"
            (``attnkit.distributed.layout``).
        schedule: "mask" (send only the key blocks some query of the receiver may see) or "ring"
            (every key shard to every rank, as Ring Attention's traffic; for comparison).
        return_lse: also return lse (B, Hq, n), natural log, in float32 (float64 for float64).
        timeout_s: how long any wait for a peer may take before ``ContextParallelError``.
        stats: a ``CommStats`` to add this call's bytes and messages to (forward and backward).
        key_block: keys per block when deciding what to send (the slack at a window's edge).

    Returns:
        out (B, Hq, n, Dv) in q's dtype (rows in this rank's local order); with return_lse also lse.

    Raises:
        ContextParallelError: torch.distributed not initialized; a peer raised, died or timed out.
        ValueError / TypeError: shapes, dtypes, mask, bias, layout or schedule that differ across ranks
            (named, with every rank's value) or do not fit; n not the layout's share of N; a bias
            that requires grad; impl="banded" (a shard pair's mask is a Region; "auto" uses banded
            where it can); key_block < 1; timeout_s not > 0. Everything a rank can check alone is
            checked before it sends anything, so such an error leaves the group usable.
    """
    rank, world = world_of(group)
    _check_local_call(q, k, v, scale, softcap, layout, schedule, impl, timeout_s, key_block)
    mask_n, bias_n = _normalize_mask(mask), _normalize_bias(bias, q)
    if bias_n is not None and bias_n.requires_grad():
        raise ValueError("context_parallel_attention: the bias requires grad, which the distributed backward "
                         "does not return; detach it, or use ak.attention on one device")
    N = _agreed_length(q, k, v, mask_n, bias_n, scale, softcap, layout, schedule, key_block, group, rank, world,
                       timeout_s)
    for check in (mask_n, bias_n):
        if check is not None:
            check.check(q.shape[0], q.shape[1], N, N)
    bias_n, shift = row_stabilized(bias_n, mask_n, N, N, q.device)  # rows whose visible bias is all huge
    plan, rows, held = _schedule(mask_n, layout, world, N, schedule, key_block)
    call = _Call(plan, rank, group, bias_n, scale, softcap, impl, timeout_s, stats,
                 (k.shape[0], k.shape[1], k.shape[3], v.shape[3]), plan.compute, rows, held[rank].to(q.device))
    out, lse = _ContextParallel.apply(q, k, v, call)
    if shift is not None:  # the partials merged with the shifted rows; the lse returned is the true one
        mine = shift if shift.shape[-1] == 1 else shift[:, :, call.key_positions.to(shift.device)]
        lse = lse + mine.to(lse.dtype).clamp(torch.finfo(lse.dtype).min, torch.finfo(lse.dtype).max)
    return (out, lse) if return_lse else out


def _check_local_call(q, k, v, scale, softcap, layout, schedule, impl, timeout_s, key_block) -> None:
    """Everything a rank can check alone, before it sends anything (a rank that raises later would
    leave messages in flight and the group unusable)."""
    validate(q, k, v, scale=scale, softcap=softcap)  # shapes, dtypes, scale, softcap: ak.attention's checks
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"context_parallel_attention: q holds {q.shape[2]} positions but k {k.shape[2]}; it is "
                         "self-attention over one sharded sequence (the same positions for q, k and v)")
    check_layout(layout)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: choose 'mask' (mask-aware) or 'ring' (every key to every rank)")
    check_impl_name(impl)
    if impl == "banded":
        raise ValueError("impl='banded' cannot run a shard pair: its mask is a Region of yours, outside the "
                         "Longformer family banded parses; use impl='auto' (it takes banded for the diagonal "
                         "squares it can run) or 'tiled'")
    if isinstance(key_block, bool) or not isinstance(key_block, int) or key_block < 1:
        raise ValueError(f"key_block must be an int >= 1 (keys), got {key_block!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
        raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")


def _agreed_length(q, k, v, mask, bias, scale, softcap, layout, schedule, key_block, group, rank, world,
                   timeout_s) -> int:
    """Check every rank called alike (one all-gather) and return N; raise, the same on every rank."""
    fields = {"batch size B": q.shape[0], "query heads Hq": q.shape[1], "kv heads Hkv": k.shape[1],
              "head dim D": q.shape[3], "value dim Dv": v.shape[3], "dtype": _DTYPES.index(q.dtype),
              "mask (checksum)": digest(mask), "bias (checksum)": digest(bias), "scale": -1.0 if scale is None else float(scale),
              "softcap": -1.0 if softcap is None else float(softcap), "layout": LAYOUTS.index(layout),
              "schedule": SCHEDULES.index(schedule), "key_block": key_block, "n": q.shape[2]}
    device = q.device if q.device.type == "cuda" else "cpu"
    table = check_same_everywhere(group, rank, world, fields, device, timeout_s, per_rank=("n",),
                                  names={"dtype": _DTYPES, "layout": LAYOUTS, "schedule": SCHEDULES})
    sizes = [int(row["n"]) for row in table]
    N = sum(sizes)
    want = [local_size(layout, r, world, N) for r in range(world)]
    if sizes != want:
        raise ValueError(f"context_parallel_attention: the ranks hold {sizes} positions, but layout {layout!r} "
                         f"shards N={N} over {world} ranks as {want}; cut the sequence with "
                         f"attnkit.distributed.shard(x, rank, world, layout={layout!r})")
    return N


SCHEDULE_CACHE_SIZE = 32  # schedules kept (with their masks): one per mask structure, layout and N
_schedules: OrderedDict = OrderedDict()


def _schedule(mask: Mask | None, layout: str, world: int, N: int, schedule: str,
              key_block: int) -> tuple[Plan, GlobalRows | None, list[Tensor]]:
    """The plan, the global query rows and every rank's positions, built once per mask structure
    (``Mask.structure_key``: a model's layers share one) and kept with the mask that made them. The
    key names small CPU tensors (lengths, indices) by content: the plan is built from a copy of them
    (``frozen``), so a later call with equal values reuses it even if the first tensor was refilled."""
    key = (structure_key(mask), layout, world, N, schedule, key_block)
    if key in _schedules:
        _schedules.move_to_end(key)
        return _schedules[key][1]
    mask = frozen(mask)  # the plan's pairs read the mask later: not a tensor the caller may refill
    main, tokens = without_global_rows(mask, N)  # both schedules compute alike; "ring" only sends every key
    held = [positions(layout, r, world, N) for r in range(world)]
    made = (build(main, layout, world, N, schedule, key_block, compute=mask), global_rows(tokens, held, N), held)
    if not _holds(key, UNCACHEABLE):
        _schedules[key] = (mask, made)  # the mask holds the tensors the key names
        while len(_schedules) > SCHEDULE_CACHE_SIZE:
            _schedules.popitem(last=False)
    return made


class _ContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, call: _Call):
        q_rows = _post_global_queries(q, call)
        out, lse, pair_lses = _forward(q, k, v, call)
        q_global = None
        if call.rows is not None:
            q_global = _global_queries(q, q_rows, call)
            out, lse = _global_forward(q_global, k, v, out, lse, call)
        ctx.save_for_backward(q, k, v, out, lse, q_global, *pair_lses)
        ctx.call = call
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, dlse: Tensor | None):
        q, k, v, out, lse, q_global, *pair_lses = ctx.saved_tensors
        call = ctx.call
        extra = None
        if call.rows is not None:  # the global rows' gradients flow through their own partials only
            extra = _post_global_douts(dout, dlse, out, lse, call)
            mine = call.rows.local[call.rank]
            dout = replace_rows(dout, mine, torch.zeros_like(dout[:, :, :len(mine)]))
            dlse = None if dlse is None else dlse.index_fill(2, mine.to(dlse.device), 0.0)
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, call, iter(pair_lses))
        if call.rows is not None:
            _global_backward(q_global, k, v, extra, call, dq, dk, dv)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _pack(k: Tensor, v: Tensor, segs: tuple[Segment, ...]) -> Tensor:
    """The segments' keys and values as one flat buffer (k's then v's), in the segments' order."""
    ks = [k[:, :, s.local_start:s.local_start + s.run.count] for s in segs]  # (B, Hkv, c, D) each
    vs = [v[:, :, s.local_start:s.local_start + s.run.count] for s in segs]
    return torch.cat([torch.cat(ks, 2).flatten(), torch.cat(vs, 2).flatten().to(k.dtype)])


def _unpack(buf: Tensor, m: int, call: _Call) -> tuple[Tensor, Tensor]:
    B, Hkv, D, Dv = call.shapes
    nk = B * Hkv * m * D
    return buf[:nk].view(B, Hkv, m, D), buf[nk:].view(B, Hkv, m, Dv)


def _buffer(m: int, call: _Call, dtype, device) -> Tensor:
    B, Hkv, D, Dv = call.shapes
    return torch.empty(B * Hkv * m * (D + Dv), dtype=dtype, device=device)


def _post_kv(k: Tensor, v: Tensor, call: _Call, tag: int) -> Exchange:
    """Send this rank's needed key blocks to each rank that needs them; receive its own."""
    plan, rank = call.plan, call.rank
    ex = Exchange(call.group, rank, call.timeout_s, call.stats, "keys/values", tag)
    sends = {dst: _pack(k, v, segs) for dst, segs in enumerate(plan.sends[rank]) if segs}
    recvs = {src: _buffer(plan.keys_sent(src, rank), call, k.dtype, k.device)
             for src in range(plan.world) if src != rank and plan.sends[src][rank]}
    ex.post(sends, recvs)
    return ex


def _sources(call: _Call) -> list[int]:
    """This rank first (its keys need no transfer), then the others by ring distance."""
    return [(call.rank - d) % call.plan.world for d in range(call.plan.world)]


def _keys_from(src: int, k: Tensor, v: Tensor, ex: Exchange, call: _Call) -> tuple[Tensor, Tensor] | None:
    if src == call.rank:
        return k, v
    if not call.plan.sends[src][call.rank]:
        return None
    return _unpack(ex.recv(src), call.plan.keys_sent(src, call.rank), call)


def _partial(q: Tensor, kk: Tensor, vv: Tensor, pair, call: _Call, need_lse: bool = True):
    """One pair's (out, lse): q's rows of the pair's query run against its key segment."""
    qs = q[:, :, pair.q_start:pair.q_start + pair.q_run.count]
    ks = kk[:, :, pair.k_start:pair.k_start + pair.k_run.count]
    vs = vv[:, :, pair.k_start:pair.k_start + pair.k_run.count]
    return attention(qs, ks, vs, mask=pair.mask, bias=region_bias(call.bias, pair.q_run, pair.k_run, call.plan.N),
                     scale=call.scale, softcap=call.softcap, impl=call.impl, return_lse=need_lse)


def _forward(q: Tensor, k: Tensor, v: Tensor, call: _Call) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(out, lse) of this rank's rows, and each pair's lse (B, Hq, r) in order, for the backward."""
    ex = _post_kv(k, v, call, TAG_KV)
    pair_lses = []
    ct = compute_dtype(q.dtype)
    B, Hq, n, _ = q.shape
    out = torch.zeros(B, Hq, n, v.shape[3], dtype=ct, device=q.device)
    lse = torch.full((B, Hq, n), float("-inf"), dtype=ct, device=q.device)
    for src in _sources(call):
        kv = _keys_from(src, k, v, ex, call)
        for pair in call.plan.pairs[call.rank][src] if kv is not None else ():
            o, l = _partial(q, kv[0], kv[1], pair, call)
            pair_lses.append(l.to(ct))
            rows = slice(pair.q_start, pair.q_start + pair.q_run.count)
            out[:, :, rows], lse[:, :, rows] = merge(out[:, :, rows], lse[:, :, rows], o.to(ct), l.to(ct))
    ex.finish()
    return out.to(q.dtype), lse, pair_lses


def _backward(q, k, v, out, lse, dout, dlse, call: _Call, pair_lses) -> tuple[Tensor, Tensor, Tensor]:
    plan, rank = call.plan, call.rank
    ex = _post_kv(k, v, call, TAG_KV_BACKWARD)
    ct = compute_dtype(q.dtype)
    grads = Exchange(call.group, rank, call.timeout_s, call.stats, "dk/dv", TAG_GRAD)
    grads.post({}, {dst: _buffer(plan.keys_sent(rank, dst), call, ct, q.device)
                    for dst, segs in enumerate(plan.sends[rank]) if segs})
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)
    dk, dv = torch.zeros(k.shape, dtype=ct, device=k.device), torch.zeros(v.shape, dtype=ct, device=v.device)
    for src in _sources(call):
        kv = _keys_from(src, k, v, ex, call)
        if kv is None:
            continue
        gk, gv = (dk, dv) if src == rank else (torch.zeros(kv[0].shape, dtype=ct, device=k.device),
                                               torch.zeros(kv[1].shape, dtype=ct, device=v.device))
        for pair in plan.pairs[rank][src]:
            _pair_backward(q, kv, out, lse, dout, dlse, pair, call, dq, gk, gv, next(pair_lses))
        if src != rank:  # send this source's key gradients home as soon as they are complete
            grads.post({src: torch.cat([gk.flatten(), gv.flatten()])}, {})
    for dst, segs in enumerate(plan.sends[rank]):
        if segs:
            gk, gv = _unpack(grads.recv(dst), plan.keys_sent(rank, dst), call)
            start = 0
            for s in segs:
                c = s.run.count
                dk[:, :, s.local_start:s.local_start + c] += gk[:, :, start:start + c]
                dv[:, :, s.local_start:s.local_start + c] += gv[:, :, start:start + c]
                start += c
    ex.finish()
    grads.finish()
    return dq, dk, dv


def _pair_backward(q, kv, out, lse, dout, dlse, pair, call: _Call, dq, gk, gv, lse_p: Tensor) -> None:
    """Add one pair's share of dq, dk, dv (module docstring): the gradient of the merged output
    reaches the pair's partial as d out_p = w dout and d lse_p = w (<dout, out_p - out> + dlse).

    The out_p part is the backward of a plain recomputed call (any backend: torch's fused kernels
    give no lse gradient). The lse_p part adds d lse_p[i] * P[i, j] to the pair's score gradients,
    P its own softmax: dq += scale * d lse_p * (P k) and dk += scale * P^T (d lse_p * q), one more
    call whose values are the keys. With softcap the scores' derivative is no longer one factor,
    so autograd takes both outputs of a call that returns the lse."""
    ct = dq.dtype
    rows = slice(pair.q_start, pair.q_start + pair.q_run.count)
    cols = slice(pair.k_start, pair.k_start + pair.k_run.count)
    at_zero = _at_zero(pair)
    with torch.enable_grad():
        qs = q[:, :, rows].detach().requires_grad_()
        ks = kv[0][:, :, cols].detach().requires_grad_()
        vs = kv[1][:, :, cols].detach().requires_grad_()
        if call.softcap is None:
            o = _partial(qs, ks, vs, at_zero, call, need_lse=False)
        else:
            o, l = _partial(qs, ks, vs, at_zero, call)
    w = torch.exp(lse_p - finite_or_zero(lse[:, :, rows]))  # (B, Hq, r): 0 where lse_p = -inf
    d_out = dout[:, :, rows].to(ct)
    d_lse = w * (d_out * (o.detach().to(ct) - out[:, :, rows].to(ct))).sum(-1)  # (B, Hq, r)
    if dlse is not None:
        d_lse = d_lse + w * dlse[:, :, rows].to(ct)
    g_out = (w.unsqueeze(-1) * d_out).to(o.dtype)
    if call.softcap is None:
        dqs, dks, dvs = torch.autograd.grad(o, (qs, ks, vs), g_out, allow_unused=True)
        dqs, dks = _lse_share(qs.detach(), ks.detach(), d_lse, at_zero, call, dqs, dks)
    else:
        dqs, dks, dvs = torch.autograd.grad((o, l), (qs, ks, vs), (g_out, d_lse.to(l.dtype)), allow_unused=True)
    for acc, g, sl in ((dq, dqs, rows), (gk, dks, cols), (gv, dvs, cols)):
        if g is not None:
            acc[:, :, sl] += g.to(ct)


def _lse_share(qs: Tensor, ks: Tensor, d_lse: Tensor, pair, call: _Call, dqs, dks) -> tuple[Tensor, Tensor]:
    """dq and dk plus the lse's share: d lse_p[i] * P[i, j] added to the score gradients."""
    scale = call.scale if call.scale is not None else qs.shape[-1] ** -0.5
    with torch.enable_grad():
        values = ks.clone().requires_grad_()  # (B, Hkv, c, D) the keys as values: P k
        pk = _partial(qs, ks, values, pair, call, need_lse=False)  # (B, Hq, r, D)
    g = scale * d_lse.unsqueeze(-1)  # (B, Hq, r, 1)
    (dk_extra,) = torch.autograd.grad(pk, values, (g * qs.to(g.dtype)).to(pk.dtype))  # P^T (scale d_lse q)
    dq_extra = g * pk.detach().to(g.dtype)
    dqs = dq_extra if dqs is None else dqs + dq_extra.to(dqs.dtype)
    dks = dk_extra if dks is None else dks + dk_extra.to(dks.dtype)
    return dqs, dks


def _at_zero(pair):
    """The pair with its query and key starts at 0 (for tensors already sliced to it)."""
    return replace(pair, q_start=0, k_start=0)


# -- global query rows (global_rows.py): gathered once, attended where the keys are, reduced home --

def _rows_exchange(call: _Call, what: str, tag: int, mine: Tensor | None, width: int, dtype, device,
                   to_owners: Tensor | None = None) -> Exchange:
    """Post one global-rows message per peer. With ``mine`` (B, Hq, G_rank, width): send this rank's
    rows to every peer and receive each peer's. With ``to_owners`` (B, Hq, G, width): send each
    owner its rows and receive this rank's rows from every peer."""
    rows, rank, world = call.rows, call.rank, call.plan.world
    B, Hq = (mine if mine is not None else to_owners).shape[:2]
    ex = Exchange(call.group, rank, call.timeout_s, call.stats, what, tag)
    count = [len(rows.local[r]) for r in range(world)]
    if mine is not None:
        sends = {r: mine.contiguous().flatten() for r in range(world) if r != rank and count[rank]}
        recvs = {r: torch.empty(B * Hq * count[r] * width, dtype=dtype, device=device)
                 for r in range(world) if r != rank and count[r]}
    else:
        sends = {r: to_owners[:, :, rows.index[r].to(device)].contiguous().flatten()
                 for r in range(world) if r != rank and count[r]}
        recvs = {r: torch.empty(B * Hq * count[rank] * width, dtype=dtype, device=device)
                 for r in range(world) if r != rank and count[rank]}
    ex.post(sends, recvs)
    return ex


def _gathered(own: Tensor, ex: Exchange, call: _Call) -> Tensor:
    """(B, Hq, G, width): every rank's global rows, this rank's ``own`` and the peers' received."""
    rows = call.rows
    B, Hq, _, width = own.shape
    whole = own.new_zeros(B, Hq, rows.count, width)
    for r in range(call.plan.world):
        idx = rows.index[r].to(own.device)
        if len(idx):
            part = own if r == call.rank else ex.recv(r).view(B, Hq, len(idx), width)
            whole[:, :, idx] = part
    ex.finish()
    return whole


def _post_global_queries(q: Tensor, call: _Call) -> Exchange | None:
    if call.rows is None:
        return None
    mine = q[:, :, call.rows.local[call.rank].to(q.device)]  # (B, Hq, G_rank, D)
    return _rows_exchange(call, "global query rows", TAG_GLOBAL_Q, mine, q.shape[3], q.dtype, q.device)


def _global_queries(q: Tensor, ex: Exchange, call: _Call) -> Tensor:
    return _gathered(q[:, :, call.rows.local[call.rank].to(q.device)], ex, call)  # (B, Hq, G, D)


def _global_partial(q_global: Tensor, k: Tensor, v: Tensor, call: _Call) -> tuple[Tensor, Tensor]:
    """The G global rows against this rank's keys under the whole mask and bias, evaluated on the
    (G, n) grid (G is small): (out (B, Hq, G, Dv), lse (B, Hq, G))."""
    N, pos, cols = call.plan.N, call.rows.positions.to(k.device), call.key_positions
    mask = None if call.mask is None else call.mask.evaluate(pos, cols, N, N)  # (Bm, Hm, G, n) bool
    bias = None if call.bias is None else call.bias.evaluate(pos, cols, N, N)  # (Bb, Hb, G, n)
    return attention(q_global, k, v, mask=mask, bias=bias, scale=call.scale, softcap=call.softcap,
                     impl=call.impl, return_lse=True)


def _global_forward(q_global, k, v, out, lse, call: _Call) -> tuple[Tensor, Tensor]:
    """Replace this rank's global rows of (out, lse) by the merge of every rank's partial."""
    ct = lse.dtype
    o, l = _global_partial(q_global, k, v, call)
    both = torch.cat([o.to(ct), l.to(ct).unsqueeze(-1)], -1)  # (B, Hq, G, Dv + 1)
    ex = _rows_exchange(call, "global rows' partials", TAG_GLOBAL_PARTIAL, None, both.shape[3], ct, q_global.device,
                        to_owners=both)
    mine = call.rows.index[call.rank].to(q_global.device)
    acc_o, acc_l = both[:, :, mine, :-1], both[:, :, mine, -1]
    B, Hq = q_global.shape[:2]
    for r in range(call.plan.world):
        if r != call.rank and len(mine):
            part = ex.recv(r).view(B, Hq, len(mine), both.shape[3])
            acc_o, acc_l = merge(acc_o, acc_l, part[..., :-1], part[..., -1])
    ex.finish()
    local = call.rows.local[call.rank]
    return replace_rows(out, local, acc_o), replace_rows(lse, local, acc_l)


def _post_global_douts(dout, dlse, out, lse, call: _Call):
    """Send this rank's global rows' (dout, out, lse, dlse) to every peer; (exchange, own rows)."""
    ct = lse.dtype
    idx = call.rows.local[call.rank].to(dout.device)
    d_lse = torch.zeros_like(lse) if dlse is None else dlse.to(ct)
    own = torch.cat([dout.to(ct), out.to(ct), lse.unsqueeze(-1), d_lse.unsqueeze(-1)], -1)[:, :, idx]
    return _rows_exchange(call, "global rows' output gradients", TAG_GLOBAL_DOUT, own, own.shape[3], ct,
                          dout.device), own


def _global_backward(q_global, k, v, extra, call: _Call, dq, dk, dv) -> None:
    """Add the global rows' share of dq (summed at the owner), dk and dv (this rank's keys)."""
    ct, Dv = dq.dtype, v.shape[3]
    whole = _gathered(extra[1], extra[0], call)  # (B, Hq, G, 2 Dv + 2)
    d_out, out, lse, d_lse = whole[..., :Dv], whole[..., Dv:2 * Dv], whole[..., -2], whole[..., -1]
    dqg = dkk = dvv = None
    if k.shape[2]:  # a rank holding no keys adds nothing (and its empty lse has no graph)
        with torch.enable_grad():
            qg, kk, vv = (t.detach().requires_grad_() for t in (q_global, k, v))
            o, l = _global_partial(qg, kk, vv, call)
        w = torch.exp(l.detach().to(ct) - finite_or_zero(lse))  # (B, Hq, G)
        g_lse = w * ((d_out * (o.detach().to(ct) - out)).sum(-1) + d_lse)
        dqg, dkk, dvv = torch.autograd.grad((o, l), (qg, kk, vv), ((w.unsqueeze(-1) * d_out).to(o.dtype),
                                                                  g_lse.to(l.dtype)), allow_unused=True)
    dk += 0 if dkk is None else dkk.to(ct)
    dv += 0 if dvv is None else dvv.to(ct)
    dqg = torch.zeros_like(q_global, dtype=ct) if dqg is None else dqg.to(ct)
    ex = _rows_exchange(call, "global rows' dq", TAG_GLOBAL_DQ, None, dqg.shape[3], ct, dq.device, to_owners=dqg)
    mine = call.rows.index[call.rank].to(dq.device)
    total = dqg[:, :, mine]
    B, Hq = dq.shape[:2]
    for r in range(call.plan.world):
        if r != call.rank and len(mine):
            total = total + ex.recv(r).view(B, Hq, len(mine), dqg.shape[3])
    ex.finish()
    local = call.rows.local[call.rank].to(dq.device)
    dq.index_add_(2, local, total)
