"""Launch the Triton kernels over a block plan, as a ``torch.library`` custom op with autograd.

``triton_attention`` -> ``_attention_op`` (one opaque node for ``torch.compile``) -> ``_forward``:
one ``_fwd`` launch over the plan's work items, then the split blocks' partials merged through
their lse (``merge.merge_groups``); the backward: ``_bwd_delta``, ``_bwd_dq``, ``_bwd_dkdv``, the
split partials summed, GQA's per-query-head dk/dv summed over each group.

Softcap and dropout run inside the kernels (``triton_attention``'s ``softcap`` / ``dropout_p`` /
``dropout_seed``; the op carries p, the seed and the cap, the backward draws the forward's keep
bits again from the same seed). Such a call's backward takes ``configs.REGULARIZED_BWD``'s blocks
on the GPU (the keep bits and the tanh need registers).

A call reads its plan from ``block_plan.cached_plan`` (keyed by the mask's structure, with the
mask's ``key_padding(lengths)`` left out and passed to the kernels as ``kv_len``), so a call that
hits the cache reads no tensor data back from the device before its launches.

Legend: B batch, Hq / Hkv query / kv heads, Nq / Nk queries / keys, D head dim, BM / BN block
sizes, S partial slots.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...bias import Alibi, Bias
from ...masks import Mask
from .. import dropout as _dropout
from ..block_plan import BlockPlan, Splits, cached_plan, split_key_lengths, structure_key
from ..merge import merge_groups
from . import configs, why_not
from .configs import DELTA_ROWS, Schedule, default_blocks
from .kernels import LOG2E, _bwd_delta, _bwd_dkdv, _bwd_dq, _fwd

LAUNCHED = ("_fwd", "_bwd_delta", "_bwd_dq", "_bwd_dkdv")  # the order of the op's ``launch`` list: (warps, stages) each

def _tile_strides(tiles: Tensor) -> tuple[int, int]:
    """Batch and head strides of the partial tiles, 0 where the mask broadcasts."""
    return (tiles.stride(0) if tiles.shape[0] > 1 else 0), (tiles.stride(1) if tiles.shape[1] > 1 else 0)


def _len_stride(kv_len: Tensor) -> int:
    """Batch stride of the key lengths: 0 where one length serves every sample."""
    return 1 if kv_len.shape[0] > 1 else 0


def launch_settings(blocks: tuple[int, int, int, int], D: int, dtype: torch.dtype, kind: str,
                    regularized: bool = False) -> list[int]:
    """[warps, stages] of each kernel of LAUNCHED, flat, from ``configs.launch_config`` (looked up
    per call: the tuning sweep patches it). blocks: the forward's and the backward's (BM, BN);
    regularized: dropout or softcap on (``configs.REGULARIZED_BWD``)."""
    out = []
    for kernel in LAUNCHED:
        bm, bn = (DELTA_ROWS, DELTA_ROWS) if kernel == "_bwd_delta" else blocks[:2] if kernel == "_fwd" else blocks[2:]
        config = configs.launch_config(kernel, bm, bn, D, dtype, kind, regularized)
        out += [config["num_warps"], config["num_stages"]]
    return out


def _launch(kernel: str, launch: list[int], q: Tensor) -> dict:
    """The launch keywords of ``kernel`` on the GPU (``launch_settings``); nothing in the interpreter."""
    if q.device.type != "cuda":
        return {}
    i = 2 * LAUNCHED.index(kernel)
    return {"num_warps": launch[i], "num_stages": launch[i + 1]}


def _tma_ready(*tensors: Tensor) -> bool:
    """Whether tensor descriptors can read these tensors: 16-byte aligned bases and row strides
    (TMA's rule). Where not, the kernels take their pointer path for this call (the same
    arithmetic, no N x N fallback). Where they can, sets triton's allocator (the scratch of the
    descriptors made inside kernels) on the tensors' device for this thread: triton keeps it in a
    context variable, and autograd runs a CUDA backward on its own worker thread."""
    if any(t.data_ptr() % 16 or (t.stride(2) * t.element_size()) % 16 for t in tensors):
        return False
    import triton

    device = tensors[0].device
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
    return True


_SMS: dict = {}
INTERPRETER_SMS = 3  # the "SMs" a persistent grid assumes in the interpreter: few programs, long loops


def _sm_count(q: Tensor) -> int:
    """Streaming multiprocessors of q's GPU (looked up once per device)."""
    if q.device.type != "cuda":
        return INTERPRETER_SMS
    if q.device not in _SMS:
        _SMS[q.device] = torch.cuda.get_device_properties(q.device).multi_processor_count
    return _SMS[q.device]


def _merge_slots(out: Tensor, lse: Tensor, po: Tensor, plse: Tensor, split: Splits, block: int) -> None:
    """Combine each split query block's partials (po (S, B*H, BM, D), plse (S, B*H, BM)) into its
    rows of out (B, H, Nq, D) / lse (B, H, Nq), contiguous, in place, through their lse."""
    B, H, Nq, D = out.shape
    G = split.gather.shape[0]
    merged, merged_lse = merge_groups(po, plse, split.gather)  # (G, B*H, BM, D), (G, B*H, BM)
    merged = merged.transpose(0, 1).reshape(B * H, G * block, D).index_select(1, split.keep)
    merged_lse = merged_lse.transpose(0, 1).reshape(B * H, G * block).index_select(1, split.keep)
    out.view(B * H, Nq, D)[:, split.rows] = merged.to(out.dtype)
    lse.view(B * H, Nq)[:, split.rows] = merged_lse


def _sum_slots(grad: Tensor, partial: Tensor, split: Splits, block: int) -> None:
    """Sum each split block's partial gradients (partial (S, B*H, block, D) float32) into its rows
    of grad (B, H, N, D), contiguous, in place, in a fixed order."""
    B, H, N, D = grad.shape
    G, K = split.gather.shape
    named = (split.gather >= 0).view(G, K, 1, 1, 1)
    parts = partial.index_select(0, split.gather.clamp(min=0).flatten()).view(G, K, *partial.shape[1:])
    total = torch.where(named, parts, 0.0).sum(1)  # (G, B*H, block, D)
    total = total.transpose(0, 1).reshape(B * H, G * block, D).index_select(1, split.keep)
    grad.view(B * H, N, D)[:, split.rows] = total.to(grad.dtype)




def _regularizers(dropout_p: float, dropout_seed: int, softcap: float | None) -> dict:
    """The kernels' dropout and softcap arguments: the Philox seed, the smallest kept word
    threshold = floor(p * 2**32) and keep_scale = 1 / (1 - p) (``ops/dropout.py``), the cap, and
    the constexprs that switch each on (off: the plain kernels, unchanged)."""
    return dict(seed=dropout_seed, threshold=_dropout.threshold(dropout_p), keep_scale=1.0 / (1.0 - dropout_p),
                softcap=1.0 if softcap is None else softcap, DROPOUT=dropout_p > 0, SOFTCAP=softcap is not None)


def _partials(split: Splits, BH: int, rows: int, D: int, device) -> Tensor:
    """(max(S, 1), B*H, rows, D) float32 for the split blocks' partials (never read unwritten)."""
    return torch.empty(max(split.slots.numel(), 1), BH, rows, D, dtype=torch.float32, device=device)


def _forward(q, k, v, plan: list[Tensor], slopes, kv_len, scale, block_m, block_n, has_alibi, schedule: Schedule,
             launch: list[int], regularizers: dict):
    """(out, lse) of the forward kernel over ``BlockPlan.forward_tensors``, split blocks merged.
    kv_len (B,) or (1,) int32 key lengths, or (0,) for none; schedule: its tma / warp_specialize;
    regularizers: ``_regularizers``'s dropout and softcap arguments."""
    kv_idx, kv_tile, tiles, q_work, *q_split = plan
    q_split = Splits(*q_split)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    po = _partials(q_split, B * H, block_m, D, q.device)
    plse = torch.empty(po.shape[:3], dtype=torch.float32, device=q.device)  # (S, B*H, BM)
    stb, sth = _tile_strides(tiles)
    items = q_work.shape[0]
    grid = (items, B * H) if not schedule.persistent else (min(items * B * H, schedule.persistent * _sm_count(q)),)
    _fwd[grid](
        q, k, v, out, lse, po, plse, q_work, kv_idx, kv_tile, tiles, slopes, kv_len,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), stb, sth, _len_stride(kv_len), H, H // k.shape[1], Nq, Nk, scale * LOG2E, B * H,
        items, BM=block_m, BN=block_n, D=D, HAS_ALIBI=has_alibi, IEEE=q.dtype == torch.float32,
        HAS_KV_LEN=kv_len.numel() > 0, TMA=schedule.tma and _tma_ready(k, v), WS=schedule.warp_specialize,
        PERSISTENT=schedule.persistent > 0, **regularizers, **_launch("_fwd", launch, q))
    if q_split.slots.numel():
        _merge_slots(out, lse, po, plse, q_split, block_m)
    return out, lse


def _backward(dout, q, k, v, out, lse, dlse, plan: list[Tensor], slopes, kv_len, scale, block_m, block_n,
              has_alibi, schedule: Schedule, launch: list[int], regularizers: dict):
    """(dq, dk, dv) of the backward kernels over ``BlockPlan.backward_tensors``, in the variants
    ``schedule`` names, with the forward's dropout (the same seed: the same keep bits) and softcap."""
    kv_idx, kv_tile, q_idx, q_tile, tiles, tiles_t, q_work, *rest = plan
    q_split, k_work, k_split = Splits(*rest[:4]), rest[4], Splits(*rest[5:])
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dout = dout.contiguous()
    # delta_i = rowsum(dO * O) - dlse_i: the lse's own gradient enters dS = P (dP - delta) through it
    out, dlse, lse = out.contiguous(), dlse.float().contiguous(), lse.contiguous()
    delta = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    fused_delta, atomic = schedule.delta == "fused", schedule.dq == "atomic"
    if not fused_delta:
        _bwd_delta[(-(-Nq // DELTA_ROWS), B * H)](out, dout, dlse, delta, Nq, D=D, BM=DELTA_ROWS,
                                                  **_launch("_bwd_delta", launch, q))
    group = schedule.gqa == "group" and Hkv != H  # one dk/dv program per kv head
    heads = Hkv if group else H
    dk_h = torch.empty(B, heads, Nk, D, dtype=q.dtype if heads == Hkv else torch.float32, device=q.device)
    dv_h = torch.empty_like(dk_h)
    pdk, pdv = (_partials(k_split, B * heads, block_n, D, q.device) for _ in range(2))
    tma = schedule.tma and _tma_ready(q, k, v, dout)
    common = dict(BM=block_m, BN=block_n, D=D, HAS_ALIBI=has_alibi, IEEE=q.dtype == torch.float32,
                  HAS_KV_LEN=kv_len.numel() > 0, TMA=tma, WS=schedule.warp_specialize, **regularizers)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    if atomic:  # dk/dv's kernel adds dQ too: float32, summed in whatever order the atomics land
        dq_acc, dq = torch.zeros(B, H, Nq, D, dtype=torch.float32, device=q.device), None
    else:
        dq, dq_acc = torch.empty_like(q), torch.empty(1, dtype=torch.float32, device=q.device)
        pdq = _partials(q_split, B * H, block_m, D, q.device)
        _bwd_dq[(q_work.shape[0], B * H)](
            q, k, v, out, dout, lse, dlse, delta, dq, pdq, q_work, kv_idx, kv_tile, tiles, slopes, kv_len,
            *strides, lse.stride(0), lse.stride(1), *_tile_strides(tiles), _len_stride(kv_len), H, H // Hkv, Nq, Nk,
            scale * LOG2E, scale, B * H, FUSED_DELTA=fused_delta, **common, **_launch("_bwd_dq", launch, q))
    _bwd_dkdv[(k_work.shape[0], B * heads)](
        q, k, v, dout, lse, delta, dk_h, dv_h, pdk, pdv, dq_acc, k_work, q_idx, q_tile, tiles_t, slopes, kv_len,
        *strides, dk_h.stride(0), dk_h.stride(1), dk_h.stride(2), lse.stride(0), lse.stride(1),
        *_tile_strides(tiles_t), _len_stride(kv_len), H, H // Hkv, Nq, Nk, scale * LOG2E, scale, B * heads,
        ATOMIC_DQ=atomic, GQA_GROUP=group, **common, **_launch("_bwd_dkdv", launch, q))
    if atomic:
        dq = dq_acc.to(q.dtype)
    elif q_split.slots.numel():
        _sum_slots(dq, pdq, q_split, block_m)
    if k_split.slots.numel():
        _sum_slots(dk_h, pdk, k_split, block_n)
        _sum_slots(dv_h, pdv, k_split, block_n)
    if heads != Hkv:  # each kv head's gradient is the sum over the query heads that read it
        dk_h = dk_h.view(B, Hkv, H // Hkv, Nk, D).sum(2).to(k.dtype)
        dv_h = dv_h.view(B, Hkv, H // Hkv, Nk, D).sum(2).to(v.dtype)
    return dq, dk_h, dv_h


# The op's inputs after q, k, v: the forward's plan (``BlockPlan.forward_tensors``), the backward's
# (``backward_tensors``: it may use other blocks), the ALiBi slopes and the key lengths.
@torch.library.custom_op("attnkit::triton_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, fwd_plan: list[Tensor], bwd_plan: list[Tensor], slopes: Tensor,
                  kv_len: Tensor, scale: float, block_m: int, block_n: int, b_block_m: int, b_block_n: int,
                  has_alibi: bool, schedule: str, launch: list[int], dropout_p: float, dropout_seed: int,
                  softcap: float | None) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, fwd_plan, slopes, kv_len, scale, block_m, block_n, has_alibi, Schedule.parse(schedule),
                    launch, _regularizers(dropout_p, dropout_seed, softcap))


@_attention_op.register_fake
def _(q, k, v, *rest):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("attnkit::triton_attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor,
                           plan: list[Tensor], slopes: Tensor, kv_len: Tensor, scale: float, block_m: int,
                           block_n: int, has_alibi: bool, schedule: str, launch: list[int], dropout_p: float,
                           dropout_seed: int, softcap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(dout, q, k, v, out, lse, dlse, plan, slopes, kv_len, scale, block_m, block_n, has_alibi,
                     Schedule.parse(schedule), launch, _regularizers(dropout_p, dropout_seed, softcap))


@_attention_backward_op.register_fake
def _(dout, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    (q, k, v, fwd_plan, bwd_plan, slopes, kv_len, scale, _, _, b_block_m, b_block_n, has_alibi, schedule, launch,
     dropout_p, dropout_seed, softcap) = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], slopes, kv_len, *bwd_plan)
    ctx.config = (scale, b_block_m, b_block_n, has_alibi, schedule, launch, dropout_p, dropout_seed, softcap)
    ctx.plan_sizes = (len(fwd_plan), len(bwd_plan))


def _autograd_backward(ctx, dout, dlse):
    q, k, v, out, lse, slopes, kv_len, *plan = ctx.saved_tensors
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv = _attention_backward_op(dout, q, k, v, out, lse, dlse, plan, slopes, kv_len, *ctx.config)
    n_fwd, n_bwd = ctx.plan_sizes  # the gradient's structure must follow the inputs': one None per plan tensor
    return (dq, dk, dv, [None] * n_fwd, [None] * n_bwd, *[None] * 13)  # slopes .. softcap: no gradient


_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check_plan(name: str, plan: BlockPlan, rest: Mask | None, Nq: int, Nk: int) -> None:
    """A plan given by the caller must be one for this call: a mask of the same structure
    (``structure_key``; its key_padding(lengths) aside) and the same sizes."""
    if plan.key != structure_key(rest) or (plan.Nq, plan.Nk) != (Nq, Nk):
        raise ValueError(f"{name} was built for mask {plan.mask!r} at (Nq, Nk) = ({plan.Nq}, {plan.Nk}); this call "
                         f"has mask {rest!r} at ({Nq}, {Nk}) (key_padding(lengths) aside): build it with "
                         "make_plan(mask, Nq, Nk, ...) for this call")


def _check_batch(plan: BlockPlan, kv_len: Tensor, B: int) -> None:
    """The mask's per-sample parts (key lengths, tiles) must have one entry or one per sample:
    the kernels index them by sample without a bound."""
    for name, n in (("key lengths", kv_len.shape[0]), ("partial tiles", plan.tiles.shape[0])):
        if n not in (0, 1, B):
            raise ValueError(f"mask {plan.mask!r} has {name} for {n} samples; this call has B={B}: give one per "
                             "batch element (or one for all)")


def _check_blocks(block_m: int, block_n: int) -> None:
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size}: expected a power of two >= 16 (tl.dot needs 16 on the GPU)")


def _plans_for(q: Tensor, k: Tensor, v: Tensor, mask, block_m, block_n, plan, plan_bwd,
               split_tiles, regularized: bool = False) -> tuple[BlockPlan, BlockPlan, Tensor, str]:
    """The forward's and the backward's plans. Given plans are checked. A missing forward plan
    comes from ``cached_plan`` at block_m x block_n (default ``default_blocks``). A missing
    backward plan is the forward's when a plan or block sizes were given (a ``plan=`` caller
    under torch.compile builds plans outside the graph: give ``plan_bwd=`` for other blocks);
    otherwise ``cached_plan`` at the backward's default blocks and the same split_tiles, built
    only when a gradient will be asked for. Also returns the key lengths the kernels read
    (``split_key_lengths``), (B,) or (1,) int32 on q's device, (0,) without, and the mask's kind
    for the config table (``configs.mask_kind`` of the mask without its key lengths). regularized
    (dropout or softcap on): the backward's default blocks are ``configs.REGULARIZED_BWD``'s."""
    D, Nq, Nk = q.shape[-1], q.shape[2], k.shape[2]
    rest, lengths = split_key_lengths(mask)
    kind = configs.mask_kind(rest)
    kv_len = (torch.empty(0, dtype=torch.int32, device=q.device) if lengths is None
              else lengths.to(device=q.device, dtype=torch.int32))
    chosen = plan is not None or block_m is not None or block_n is not None
    if plan is not None:
        if block_m is not None or block_n is not None or split_tiles is not None:
            raise ValueError("block_m, block_n and split_tiles are the plan's: give them to make_plan, not with plan=")
        _check_plan("plan", plan, rest, Nq, Nk)
    else:
        bm, bn = default_blocks(D, q.dtype, kind=kind)
        bm, bn = block_m or bm, block_n or bn
        _check_blocks(bm, bn)
        plan = cached_plan(rest, Nq, Nk, bm, bn, q.device, split_tiles)
    _check_batch(plan, kv_len, q.shape[0])
    if plan_bwd is not None:
        _check_plan("plan_bwd", plan_bwd, rest, Nq, Nk)
        _check_batch(plan_bwd, kv_len, q.shape[0])
        return plan, plan_bwd, kv_len, kind
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    bwd_blocks = default_blocks(D, q.dtype, backward=True, kind=kind, regularized=regularized)
    if not wants_grad or chosen or bwd_blocks == (plan.block_m, plan.block_n):
        return plan, plan, kv_len, kind
    return plan, cached_plan(rest, Nq, Nk, *bwd_blocks, q.device, split_tiles), kv_len, kind


def triton_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None = None, bias: Bias | None = None,
                     scale: float | None = None, block_m: int | None = None, block_n: int | None = None,
                     plan: BlockPlan | None = None, plan_bwd: BlockPlan | None = None,
                     split_tiles: int | None = None, schedule: Schedule | None = None, softcap: float | None = None,
                     dropout_p: float = 0.0, dropout_seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact attention with the Triton kernels -> (out (B, Hq, Nq, D), lse (B, Hq, Nq) float32).

    q (B, Hq, Nq, D), k / v (B, Hkv, Nk, D); ``mask`` any attnkit mask; ``bias`` None or ALiBi.
    ``plan`` / ``plan_bwd``: ``make_plan(mask, Nq, Nk, block_m, block_n, device)`` for the forward
    and the backward (which may use other blocks; given ``plan`` alone, the backward uses it too:
    on the GPU at D = 128 give ``plan_bwd`` at ``default_blocks(D, dtype, backward=True)``, the
    forward's blocks spill registers there). Without them plans come from ``cached_plan`` (built
    once per mask structure and sizes, so a mask rebuilt each call with the same windows, indices
    and tensors reuses its plan): at block_m x block_n for both passes when given, else at each
    pass's ``default_blocks``. A ``key_padding(lengths)`` factor of the mask is not in the plan:
    the kernels read the lengths with each call. ``schedule``: the kernel variants
    (``configs.Schedule``; default the config table's row for this head dim, dtype and mask kind).
    Launch settings (warps, stages) come from the table (``configs.launch_config``).

    ``softcap`` c > 0: the scores become c * tanh(q k^T * scale / c) before the bias and the mask
    (Gemma 2's attention logit soft-capping, Gemma Team 2024, sec. 2.2); None: no cap.
    ``dropout_p`` in [0, 1): dropout on the probabilities inside the kernels (FlashAttention, Dao
    et al. 2022, sec. 3.1 and appendix B): each tile draws its keep bits from Philox4x32-10 keyed
    by ``dropout_seed`` (an int in [0, 2**63); None: ``dropout.draw_seed()``) at its (b, query
    head, query row, key) positions, and the backward draws the same bits again; the same seed
    drops the same pairs as ``impl="reference"`` / ``"tiled"`` (``ops/dropout.py``). Kept
    probabilities are scaled by 1 / (1 - p); the lse is that of the scores before dropout.

    Raises:
        ValueError: the call is one the kernels cannot run (``why_not``), a given plan is for
            another mask structure or sizes, block sizes are not powers of two >= 16, softcap is
            not a finite number > 0, dropout_p is not in [0, 1) or dropout_seed not in [0, 2**63).
    """
    _check_regularizers(softcap, dropout_p, dropout_seed)
    reason = why_not(q, k, v, mask, bias, float(dropout_p), softcap)
    if reason is not None:
        raise ValueError(f"impl='triton' cannot run this call: {reason}")
    B, Hq, Nq, _ = q.shape
    for part in (mask, bias):  # ak.attention validates; a direct call must too (dilations per head, ...)
        if part is not None:
            part.check(B, Hq, Nq, k.shape[2])
    if schedule is not None and not isinstance(schedule, Schedule):
        raise TypeError(f"schedule={schedule!r}: expected an attnkit.ops.triton.configs.Schedule")
    return run_checked(q, k, v, mask, bias, scale, block_m, block_n, plan, plan_bwd, split_tiles, schedule,
                       softcap=None if softcap is None else float(softcap), dropout_p=float(dropout_p),
                       dropout_seed=dropout_seed)


def _check_regularizers(softcap, dropout_p, dropout_seed) -> None:
    """What ``ak.attention``'s validation checks, for a direct call of ``triton_attention``."""
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap={softcap!r}: expected a finite number > 0, or None for no capping")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p={dropout_p!r}: expected a number in [0, 1)")
    if dropout_seed is not None and not (isinstance(dropout_seed, int) and 0 <= dropout_seed < 2 ** 63):
        raise ValueError(f"dropout_seed={dropout_seed!r}: expected an int in [0, 2**63), or None to draw one")


_no_slopes: dict[torch.device, Tensor] = {}  # a placeholder per device, not a new tensor per call


def run_checked(q: Tensor, k: Tensor, v: Tensor, mask: Mask | None, bias: Bias | None, scale: float | None,
                block_m: int | None = None, block_n: int | None = None, plan: BlockPlan | None = None,
                plan_bwd: BlockPlan | None = None, split_tiles: int | None = None,
                schedule: Schedule | None = None, softcap: float | None = None, dropout_p: float = 0.0,
                dropout_seed: int | None = None) -> tuple[Tensor, Tensor]:
    """``triton_attention`` for a call ``why_not`` has passed already (the dispatcher checks once).
    dropout_p > 0 without a seed draws one (``dropout.draw_seed``)."""
    regularized = dropout_p > 0 or softcap is not None
    fwd, bwd, kv_len, kind = _plans_for(q, k, v, mask, block_m, block_n, plan, plan_bwd, split_tiles, regularized)
    D = q.shape[-1]
    if schedule is None:
        schedule = configs.default_schedule(D, q.dtype, kind)
    launch = launch_settings((fwd.block_m, fwd.block_n, bwd.block_m, bwd.block_n), D, q.dtype, kind, regularized)
    has_alibi = isinstance(bias, Alibi)
    if has_alibi:
        slopes = bias.slopes.detach().to(device=q.device, dtype=torch.float32)
    else:
        slopes = _no_slopes.get(q.device)
        if slopes is None:
            slopes = _no_slopes[q.device] = torch.zeros(1, dtype=torch.float32, device=q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if dropout_p > 0 and dropout_seed is None:
        dropout_seed = _dropout.draw_seed()
    return _attention_op(q.contiguous(), k.contiguous(), v.contiguous(), fwd.forward_tensors(),
                         bwd.backward_tensors(), slopes, kv_len, scale, fwd.block_m, fwd.block_n, bwd.block_m, bwd.block_n,
                         has_alibi, schedule.spec(), launch, float(dropout_p), int(dropout_seed or 0), softcap)
