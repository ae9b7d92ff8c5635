"""Fused exact attention in Triton: FlashAttention-2 (Dao 2023) over any attnkit mask.

The mask never reaches the kernel as an expression. On the host it becomes a *block plan*:

- the mask's tile kinds (``Mask.block_kinds``) at BLOCK_M x BLOCK_N, merged over batch and heads
  (a tile is skipped only if it is empty for every sample and head, and runs unmasked only if it
  is full for all of them);
- for each query block, the list of key blocks to visit, in CSR form (``kv_ptr``, ``kv_idx``),
  and the transposed lists for the key-block-major backward (``q_ptr``, ``q_idx``);
- for each PARTIAL tile, its BLOCK_M x BLOCK_N truth (``tiles``, one bit per pair, packed in
  int32 words along the keys, per sample and head where the mask differs by them), evaluated by
  the mask itself: a partial tile is masked by BM x ceil(BN / 32) word loads and shifts, a full
  tile is never masked, an empty tile is never visited. A ragged last key block is partial
  (its keys past Nk are masked out in its tile);
- a ``key_padding(lengths)`` factor of the mask (``split_key_lengths``) stays out of the tiles:
  the kernels mask keys j >= lengths[b] on the tiles that cross it (``kv_len``).

So causal, windows, global tokens, padding, documents and any combination run the same kernel;
ALiBi is computed in the kernel from its slopes (``-slope_h * |p_i - j|``, p_i = i + Nk - Nq).

Kernels (``_fwd``, ``_bwd_delta``, ``_bwd_dq``, ``_bwd_dkdv``): online softmax in the log2 domain
with fp32 accumulators; the backward recomputes P from the saved lse (rows that attend nowhere
have lse = -inf, out = 0, and get zero gradients); dk/dv works on transposed (key x query) tiles.
GQA: each query head reads kv head h // (Hq/Hkv); dk/dv are computed per query head and summed
over each group. The forward and the backward may use plans of different block sizes
(``gpu_blocks``). ``attnkit.ops.triton_check`` compiles every configuration for sm_90 without a
GPU and reads its registers and spills.

``triton_attention`` is a ``torch.library`` custom op with autograd, so ``torch.compile`` sees one
opaque node. Without a CUDA device the kernels run in Triton's interpreter when
``TRITON_INTERPRET=1`` is set before triton is first imported (slow: tests at small sizes).

Legend: B batch, Hq / Hkv query / kv heads, Nq / Nk queries / keys, D head dim, BM / BN block
sizes, nQ / nK query / key blocks, T visited tiles, P partial tiles, Bm / Hm the mask's batch and
head extents (1 where it broadcasts).
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..bias import Alibi, Bias
from ..masks import EMPTY, FULL, PARTIAL, And, KeyPadding, Mask
from .merge import merge_groups

try:  # optional: attnkit imports and runs without triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

LOG2E = 1.4426950408889634
# The kernels may read module globals only as constexprs (the interpreter does not enforce this).
LOG2E_K = tl.constexpr(LOG2E) if tl is not None else LOG2E

HEAD_DIMS = (16, 32, 64, 128)
MAX_BH = 65535  # grid axis 1 is B * Hq: CUDA's limit on gridDim.y
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Triton's interpreter runs the kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_blocks(D: int, dtype: torch.dtype, backward: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) on the GPU, large tiles whose kernels compile without register spills
    on sm_90 (``python -m attnkit.ops.triton_check``). Forward: 128 x 64. Backward: 64 x 128 (the
    dk/dv kernel holds 128 keys and walks 64-row query blocks, as FlashAttention-2's backward;
    at 128 x 64 it spills), 64 x 64 at D = 128. float32: 32 x 32 (its IEEE dots run on the FMA
    units and hold twice the bytes). Chosen from compiled register counts, not yet from timings."""
    if dtype == torch.float32:
        return 32, 32
    if not backward:
        return 128, 64
    return (64, 64) if D >= 128 else (64, 128)


def default_blocks(D: int, dtype: torch.dtype, backward: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 16 x 16 in the interpreter (tests), ``gpu_blocks`` otherwise."""
    if interpreting():
        return 16, 16
    return gpu_blocks(D, dtype, backward)


def launch_config(kernel: str, block_m: int, block_n: int, D: int, dtype: torch.dtype) -> dict:
    """num_warps / num_stages of one kernel launch: 8 warps for 128-row tiles, D = 128, the dk/dv
    kernel and float32 (with 4 they run out of registers and spill, ``triton_check``), 4 otherwise;
    two pipeline stages. Not yet tuned by timing on a GPU."""
    big = max(block_m, block_n) >= 128 or D >= 128 or kernel == "_bwd_dkdv" or dtype == torch.float32
    return {"num_warps": 8 if big else 4, "num_stages": 2}


def why_not(q: Tensor, k: Tensor, v: Tensor, mask: Mask | None, bias: Bias | None, dropout_p: float) -> str | None:
    """Why ``impl="triton"`` cannot run this call, or None."""
    if triton is None:
        return "triton is not installed (pip install triton; it needs Linux)"
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreting()):
        return (f"tensors on {q.device.type}: the Triton kernels run on a CUDA device "
                "(or on the CPU in Triton's interpreter with TRITON_INTERPRET=1, slowly)")
    if dropout_p > 0:
        return f"dropout_p={dropout_p}: the Triton kernels do not implement dropout (use impl='sdpa' or 'reference')"
    if bias is not None and not isinstance(bias, Alibi):
        return f"bias {bias!r}: the Triton kernels compute ALiBi only (use impl='tiled' for other biases)"
    if bias is not None and bias.requires_grad() and torch.is_grad_enabled():
        return "the ALiBi slopes require grad: the Triton kernels do not compute their gradient"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype}: the Triton kernels take float16, bfloat16 or float32"
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return ("bfloat16 in Triton's interpreter: its tl.dot misreads bfloat16 operands (seen with triton 3.9: "
                "errors of 1e10); bfloat16 runs on the GPU, float16 and float32 here")
    D, Dv = q.shape[-1], v.shape[-1]
    if D != Dv or D not in HEAD_DIMS:
        return (f"head dims D={D}, Dv={Dv}: the Triton kernels need D == Dv in {HEAD_DIMS}; pad the head dim to "
                "the next of these, or use impl='sdpa' or 'tiled'")
    if q.shape[1] % k.shape[1]:
        return f"Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}"
    if q.shape[0] * q.shape[1] > MAX_BH:
        return (f"B*Hq = {q.shape[0] * q.shape[1]} > {MAX_BH}: the kernels run one grid row per sequence and head, "
                "and CUDA allows 65535; split the batch")
    return None


# -- the block plan ---------------------------------------------------------------------------------

class Splits(NamedTuple):
    """Where the partials of split blocks go (``split_work``), worked out when the plan is built so
    that merging them reads nothing back from the device. G split blocks, S partial slots."""

    slots: Tensor  # (S,) int32 on the host: the block of each partial slot (its length sizes the buffers)
    gather: Tensor  # (G, K) int64: each split block's slots in order, -1 past its count
    keep: Tensor  # (R,) int64: the positions, among the G x block rows of the split blocks, inside N
    rows: Tensor  # (R,) int64: their row numbers


def _splits(slots: Tensor, block: int, N: int, device) -> Splits:
    """``Splits`` of the partial slots ``slots`` (``split_work``) of blocks of ``block`` rows."""
    blocks, group = torch.unique(slots.long(), return_inverse=True)  # (G,), (S,)
    counts = torch.bincount(group, minlength=len(blocks))  # (G,)
    gather = torch.full((len(blocks), int(counts.max()) if len(blocks) else 0), -1, dtype=torch.long)
    order = torch.argsort(group, stable=True)  # slots block by block, in their order
    first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # (S,) each sorted slot's block start
    gather[group[order], torch.arange(len(order)) - first] = order
    rows = (blocks[:, None] * block + torch.arange(block)).flatten()  # (G * block,)
    keep = (rows < N).nonzero().squeeze(1)
    return Splits(slots, gather.to(device), keep.to(device), rows[keep].to(device))


@dataclass(frozen=True)
class BlockPlan:
    """Which tiles each program visits, and the truth of the partial ones (module docstring)."""

    block_m: int
    block_n: int
    Nq: int
    Nk: int
    mask: Mask | None  # the mask it was built from (a plan is only valid for that mask and sizes)
    kv_ptr: Tensor  # (nQ + 1,) int32: query block i visits kv_idx[kv_ptr[i]:kv_ptr[i + 1]]
    kv_idx: Tensor  # (T,) int32 key block indices
    kv_tile: Tensor  # (T,) int32 partial tile id, -1 for a full tile
    q_ptr: Tensor  # (nK + 1,) int32: key block j is visited by q_idx[q_ptr[j]:q_ptr[j + 1]]
    q_idx: Tensor  # (T,) int32 query block indices
    q_tile: Tensor  # (T,) int32 partial tile id, -1 for a full tile
    # tiles hold the mask without its key_padding(lengths) factor, which the kernels apply from kv_len
    tiles: Tensor  # (Bm, Hm, max(P, 1), BM, ceil(BN / 32)) int32 words: bit c % 32 of word c // 32 = may attend
    tiles_t: Tensor  # (Bm, Hm, max(P, 1), BN, ceil(BM / 32)): the same tiles transposed (keys x queries), for dk/dv
    # work items (split-KV, ``split_work``): row w = (block, start, end, slot) runs one block over
    # entries start..end of its list; slot -1 writes the block's result, slot s >= 0 a partial that
    # is combined afterwards with the other partials of its block (``Splits``)
    kv_len: Tensor  # (B,) or (1,) int32: keys j >= kv_len[b] are padding (``split_key_lengths``); (0,) if none
    q_work: Tensor  # (W, 4) int32 over the query blocks' key lists: the forward and dq
    q_split: Splits  # where the query blocks' partials go
    k_work: Tensor  # (W', 4) int32 over the key blocks' query lists: dk, dv
    k_split: Splits

    def forward_tensors(self) -> list[Tensor]:
        """What the forward kernel and its merge read (``_forward``)."""
        return [self.kv_idx, self.kv_tile, self.tiles, self.kv_len, self.q_work, *self.q_split]

    def backward_tensors(self) -> list[Tensor]:
        """What the backward kernels and their sums read (``_backward``)."""
        return [self.kv_idx, self.kv_tile, self.q_idx, self.q_tile, self.tiles, self.tiles_t, self.kv_len,
                self.q_work, *self.q_split, self.k_work, *self.k_split]


def _kinds(mask: Mask | None, Nq: int, Nk: int, bm: int, bn: int, device) -> Tensor:
    """(nQ, nK) int8 tile kinds merged over the mask's batch and heads; the ragged last key block
    is PARTIAL (its keys past Nk must be masked)."""
    nQ, nK = -(-Nq // bm), -(-Nk // bn)
    if mask is None:
        kinds = torch.full((nQ, nK), FULL, dtype=torch.int8, device=device)
    else:
        k4 = mask.block_kinds(Nq, Nk, bm, bn, device).to(device)  # (Bm, Hm, nQ, nK)
        all_full = (k4 == FULL).flatten(0, 1).all(0)
        all_empty = (k4 == EMPTY).flatten(0, 1).all(0)
        kinds = torch.full((nQ, nK), PARTIAL, dtype=torch.int8, device=device)
        kinds = kinds.masked_fill(all_full, FULL).masked_fill(all_empty, EMPTY)
    if Nk % bn:
        last = kinds[:, -1]
        kinds[:, -1] = torch.where(last == FULL, torch.full_like(last, PARTIAL), last)
    return kinds


def _csr(kinds: Tensor, tile_id: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row-major lists of the non-empty tiles: (ptr (rows + 1,), idx (T,), tile (T,)) int32."""
    visit = kinds != EMPTY
    rows, cols = visit.nonzero(as_tuple=True)
    ptr = torch.zeros(kinds.shape[0] + 1, dtype=torch.int32, device=kinds.device)
    ptr[1:] = visit.sum(1).cumsum(0)
    return ptr, cols.to(torch.int32), tile_id[rows, cols].to(torch.int32)


def pack_bits(truth: Tensor) -> Tensor:
    """(..., BN) bool -> (..., ceil(BN / 32)) int32 words, bit c % 32 of word c // 32 = truth[c].
    Bits rather than bytes: a tile of bytes costs the kernel a (BM, BN) gather of pointers, which
    spills registers; a bit tile is BM x ceil(BN / 32) word loads and register shifts."""
    bn = truth.shape[-1]
    nw = -(-bn // 32)
    bits = torch.nn.functional.pad(truth.long(), (0, nw * 32 - bn)).unflatten(-1, (nw, 32))
    words = (bits << torch.arange(32, device=truth.device)).sum(-1)  # (..., nw) in [0, 2^32)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_bits(words: Tensor, bn: int) -> Tensor:
    """The inverse of ``pack_bits``: (..., ceil(BN / 32)) int32 -> (..., BN) bool."""
    bits = (words.long()[..., None] >> torch.arange(32, device=words.device)) & 1  # (..., nw, 32)
    return bits.flatten(-2)[..., :bn].bool()


def _partial_tiles(mask: Mask | None, kinds: Tensor, Nq: int, Nk: int, bm: int, bn: int) -> tuple[Tensor, Tensor]:
    """The packed truth (``pack_bits``) of the PARTIAL tiles, in row-major tile order, as
    (Bm, Hm, max(P, 1), BM, ceil(BN / 32)) and transposed, (Bm, Hm, max(P, 1), BN, ceil(BM / 32))
    int32; positions past Nq / Nk are 0. Evaluated one query block at a time (BM x its partial keys)."""
    dev = kinds.device
    pq, pk = (kinds == PARTIAL).nonzero(as_tuple=True)
    if pq.numel() == 0:
        return (torch.zeros(1, 1, 1, bm, -(-bn // 32), dtype=torch.int32, device=dev),
                torch.zeros(1, 1, 1, bn, -(-bm // 32), dtype=torch.int32, device=dev))
    parts, parts_t = [], []
    for qb in torch.unique_consecutive(pq).tolist():
        kbs = pk[pq == qb]  # (p,)
        rows = qb * bm + torch.arange(bm, device=dev)  # (BM,)
        cols = (kbs[:, None] * bn + torch.arange(bn, device=dev)[None, :]).flatten()  # (p * BN,)
        inside = (rows < Nq)[:, None] & (cols < Nk)[None, :]  # (BM, p * BN)
        if mask is None:
            truth = inside[None, None]
        else:
            truth = mask.evaluate(rows.clamp(max=Nq - 1), cols.clamp(max=Nk - 1), Nq, Nk).to(dev) & inside
        truth = truth.reshape(*truth.shape[:2], bm, len(kbs), bn).permute(0, 1, 3, 2, 4)  # (Bm, Hm, p, BM, BN)
        parts.append(pack_bits(truth))
        parts_t.append(pack_bits(truth.transpose(-1, -2)))
    Bm = max(p.shape[0] for p in parts)
    Hm = max(p.shape[1] for p in parts)
    return tuple(torch.cat([p.expand(Bm, Hm, -1, -1, -1) for p in ps], 2).contiguous() for ps in (parts, parts_t))


SPLIT_MIN = 8  # a query block's key list is split only past max(SPLIT_MIN, 2 x the median list length)


def split_work(ptr: Tensor, split_tiles: int | None) -> tuple[Tensor, Tensor]:
    """Work items over CSR lists (split-KV, as flash-decoding): a block whose list is longer than
    ``split_tiles`` (default: max(SPLIT_MIN, 2 x the median length)) is cut into runs of that many
    tiles, each its own program, combined afterwards; so the few global query rows (forward, dq)
    and global key columns (dk, dv) that meet all N tokens do not leave one program running alone.
    Returns items (W, 4) int32 (block, start, end, slot; slot -1 = the whole list) and slots (S,)
    int32, the block of each partial slot."""
    ptr = ptr.long().cpu()
    lengths = ptr[1:] - ptr[:-1]  # (nBlocks,)
    if split_tiles is None:
        split_tiles = max(SPLIT_MIN, 2 * int(lengths.float().median().ceil()) if len(lengths) else SPLIT_MIN)
    if split_tiles < 1:
        raise ValueError(f"split_tiles must be >= 1 tiles per program, got {split_tiles}")
    items, slots = [], []
    for block, (a, n) in enumerate(zip(ptr[:-1].tolist(), lengths.tolist())):
        if n <= split_tiles:
            items.append((block, a, a + n, -1))
            continue
        for c in range(a, a + n, split_tiles):
            items.append((block, c, min(a + n, c + split_tiles), len(slots)))
            slots.append(block)
    items_t = torch.tensor(items, dtype=torch.int32).reshape(-1, 4)
    return items_t, torch.tensor(slots, dtype=torch.int32)


def split_key_lengths(mask: Mask | None) -> tuple[Mask | None, Tensor | None]:
    """mask = rest & key_padding(lengths) -> (rest, lengths (B,)); (mask, None) where the mask has
    no such factor (padding given as a bool mask, or under | or ~, stays in the tiles). The
    kernels apply the lengths themselves, per sample (keys j >= lengths[b] masked), so per-sample
    padding costs the plan no per-sample tiles."""
    if isinstance(mask, KeyPadding) and mask.lengths is not None:
        return None, mask.lengths
    if isinstance(mask, And):
        for this, other in ((mask.a, mask.b), (mask.b, mask.a)):
            rest, lengths = split_key_lengths(this)
            if lengths is not None:
                return (other if rest is None else rest & other), lengths
    return mask, None


def make_plan(mask: Mask | None, Nq: int, Nk: int, block_m: int, block_n: int, device,
              split_tiles: int | None = None) -> BlockPlan:
    """The block plan of ``mask`` for an (Nq, Nk) problem (module docstring); ``split_tiles``: see
    ``split_work``. A key_padding(lengths) factor of the mask goes to the kernels as ``kv_len``
    (``split_key_lengths``); key blocks past every sample's length are not visited."""
    whole = mask
    mask, lengths = split_key_lengths(mask)
    kinds = _kinds(mask, Nq, Nk, block_m, block_n, device)  # (nQ, nK)
    if lengths is not None:  # key blocks no sample reaches: empty
        reach = -(-int(lengths.max()) // block_n) if lengths.numel() else 0
        kinds[:, reach:] = EMPTY
        kv_len = lengths.to(device=device, dtype=torch.int32)
    else:
        kv_len = torch.empty(0, dtype=torch.int32, device=device)
    partial = kinds == PARTIAL
    tile_id = torch.full(kinds.shape, -1, dtype=torch.int64, device=device)
    tile_id[partial] = torch.arange(int(partial.sum()), device=device)
    kv_ptr, kv_idx, kv_tile = _csr(kinds, tile_id)
    q_ptr, q_idx, q_tile = _csr(kinds.T, tile_id.T)
    tiles, tiles_t = _partial_tiles(mask, kinds, Nq, Nk, block_m, block_n)
    q_work, q_slots = split_work(kv_ptr, split_tiles)
    k_work, k_slots = split_work(q_ptr, split_tiles)
    q_work, k_work = q_work.to(device), k_work.to(device)  # read by the kernels; slots stay on the host
    q_split, k_split = _splits(q_slots, block_m, Nq, device), _splits(k_slots, block_n, Nk, device)
    return BlockPlan(block_m, block_n, Nq, Nk, whole, kv_ptr, kv_idx, kv_tile, q_ptr, q_idx, q_tile, tiles,
                     tiles_t, kv_len, q_work, q_split, k_work, k_split)


PLAN_CACHE_SIZE = 64  # plans, up to two per mask (forward and backward blocks)
_plans: OrderedDict = OrderedDict()  # key -> (mask, plan); the mask is kept so its id stays unique


def _fingerprint(obj) -> tuple:
    """The identity and version of every tensor inside a mask expression: a tensor changed in
    place (its ``_version`` moves) or replaced gives another fingerprint, so a stale plan is never
    reused."""
    if isinstance(obj, Tensor):
        return (obj.data_ptr(), obj._version, tuple(obj.shape), str(obj.device))
    if dataclasses.is_dataclass(obj):
        return tuple(_fingerprint(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, (tuple, list)):
        return tuple(_fingerprint(x) for x in obj)
    return (obj,)


def cached_plan(mask: Mask | None, Nq: int, Nk: int, block_m: int, block_n: int, device,
                split_tiles: int | None = None) -> BlockPlan:
    """``make_plan``, remembered for the last PLAN_CACHE_SIZE (mask, sizes) pairs: a model calling
    attention with the same mask in every layer builds its plan once."""
    key = (id(mask), _fingerprint(mask), Nq, Nk, block_m, block_n, str(torch.device(device)), split_tiles)
    hit = _plans.get(key)
    if hit is not None and hit[0] is mask:
        _plans.move_to_end(key)
        return hit[1]
    plan = make_plan(mask, Nq, Nk, block_m, block_n, device, split_tiles)
    _plans[key] = (mask, plan)
    while len(_plans) > PLAN_CACHE_SIZE:
        _plans.popitem(last=False)
    return plan


# -- kernels ----------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _work_item(WORK, H, GROUP):
        """This program's work item (program_id 0) and sequence x head (program_id 1): block, the
        range of its list, slot, and b, h, hk (the kv head), in int64 (base offsets of big tensors
        overflow int32)."""
        w = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        item = WORK + 4 * w
        return tl.load(item), tl.load(item + 1), tl.load(item + 2), tl.load(item + 3), b, h, h // GROUP, bh

    @triton.jit
    def _load_rows(PTR, b, h, offs, sb, sh, sn, n, D: tl.constexpr):
        """Rows ``offs`` of sequence b, head h: (len(offs), D), zeros past n."""
        offs_d = tl.arange(0, D)
        return tl.load(PTR + b * sb + h * sh + offs[:, None] * sn + offs_d[None, :], mask=(offs < n)[:, None],
                       other=0.0)

    @triton.jit
    def _scores(a, b, pos_a, pos_b, slope, tile, TILES, scale_log2, kb, kv_len,
                RA: tl.constexpr, RB: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr,
                HAS_KV_LEN: tl.constexpr, KEYS_ON_ROWS: tl.constexpr):
        """(RA, RB) scores a b^T * scale * log2(e) in the log2 domain, ALiBi (-slope |pos_a - pos_b|,
        positions on the key axis), partial tile ``tile`` of TILES (-1: a full tile) and, where key
        block ``kb`` crosses this sample's key length ``kv_len``, the padding keys. a / b are q / k
        for (query, key) tiles and k / q for the transposed tiles of dk/dv (KEYS_ON_ROWS)."""
        if IEEE:
            s = tl.dot(a, tl.trans(b), input_precision="ieee") * scale_log2
        else:
            s = tl.dot(a, tl.trans(b)) * scale_log2
        if HAS_ALIBI:
            s -= slope * LOG2E_K * tl.abs(pos_a[:, None] - pos_b[None, :]).to(tl.float32)
        if tile >= 0:
            s = tl.where(_tile_bits(TILES, tile, RA, RB), s, float("-inf"))
        if HAS_KV_LEN:
            if KEYS_ON_ROWS:
                if (kb + 1) * RA > kv_len:
                    s = tl.where((pos_a < kv_len)[:, None], s, float("-inf"))
            else:
                if (kb + 1) * RB > kv_len:
                    s = tl.where((pos_b < kv_len)[None, :], s, float("-inf"))
        return s

    @triton.jit
    def _key_length(KV_LEN, b, len_b, Nk, HAS_KV_LEN: tl.constexpr):
        """Sample b's key length (keys j >= it are padding, ``split_key_lengths``); Nk without one."""
        kv_len = Nk
        if HAS_KV_LEN:
            kv_len = tl.load(KV_LEN + b * len_b)
        return kv_len

    @triton.jit
    def _tile_bits(TILES, tile, BM: tl.constexpr, BN: tl.constexpr):
        """(BM, BN) truth of partial tile ``tile`` from its packed words (``pack_bits``): one word
        load per row and 32 keys, then shifts in registers."""
        NW: tl.constexpr = (BN + 31) // 32
        c = tl.arange(0, BN)
        row = TILES + tile.to(tl.int64) * (BM * NW) + tl.arange(0, BM) * NW  # (BM,) word pointers
        word = tl.broadcast_to(tl.load(row)[:, None], (BM, BN))
        for i in tl.static_range(1, NW):
            word = tl.where((c >= 32 * i)[None, :], tl.load(row + i)[:, None], word)
        return ((word >> (c % 32)[None, :]) & 1) != 0

    @triton.jit
    def _fwd(Q, K, V, O, LSE, PO, PLSE, WORK, KV_IDX, KV_TILE, TILES, SLOPES, KV_LEN,
             sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh, stb, sth, len_b,
             H, GROUP, Nq, Nk, scale_log2, BH,
             BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr,
             HAS_KV_LEN: tl.constexpr):
        """One work item: a query block over a run of its key tiles. Slot -1: the whole list, the
        final out / lse; slot s: a partial (normalized out, lse) in PO / PLSE, merged afterwards."""
        qb, start, end, slot, b, h, hk, bh = _work_item(WORK, H, GROUP)
        offs_m = qb * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        rows_ok = offs_m < Nq
        q = _load_rows(Q, b, h, offs_m, sqb, sqh, sqn, Nq, D)
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(SLOPES + h)
        t_base = b * stb + h * sth
        kv_len = _key_length(KV_LEN, b, len_b, Nk, HAS_KV_LEN)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, D], tl.float32)
        for t in range(start, end):
            kb = tl.load(KV_IDX + t)
            tile = tl.load(KV_TILE + t)
            offs_n = kb * BN + tl.arange(0, BN)
            k = _load_rows(K, b, hk, offs_n, skb, skh, skn, Nk, D)
            v = _load_rows(V, b, hk, offs_n, svb, svh, svn, Nk, D)
            s = _scores(q, k, offs_m + (Nk - Nq), offs_n, slope, tile, TILES + t_base, scale_log2, kb, kv_len,
                        BM, BN, HAS_ALIBI, IEEE, HAS_KV_LEN, False)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep p = 0
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        alive = l_i > 0
        out = acc / tl.where(alive, l_i, 1.0)[:, None]
        lse = tl.where(alive, (m_i + tl.log2(tl.where(alive, l_i, 1.0))) / LOG2E_K, float("-inf"))
        if slot < 0:
            tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),
                     mask=rows_ok[:, None])
            tl.store(LSE + b * slb + h * slh + offs_m, lse, mask=rows_ok)
        else:  # PO (S, B*H, BM, D) and PLSE (S, B*H, BM), float32, contiguous
            r = tl.arange(0, BM)
            base = (slot.to(tl.int64) * BH + bh) * BM
            tl.store(PO + (base + r[:, None]) * D + offs_d[None, :], out)
            tl.store(PLSE + base + r, lse)

    @triton.jit
    def _bwd_delta(O, DO, DLSE, DELTA, Nq, D: tl.constexpr, BM: tl.constexpr):
        """delta = rowsum(dO * O) - dlse for BM rows of one sequence x head (program_id 1), in
        float32 without a float32 copy of O or dO. O, DO (B*H, Nq, D) and DLSE, DELTA (B*H, Nq),
        contiguous."""
        offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
        bh = tl.program_id(1).to(tl.int64)
        rows_ok = offs_m < Nq
        o = _load_rows(O, bh, 0, offs_m, Nq * D, 0, D, Nq, D).to(tl.float32)
        do = _load_rows(DO, bh, 0, offs_m, Nq * D, 0, D, Nq, D).to(tl.float32)
        dlse = tl.load(DLSE + bh * Nq + offs_m, mask=rows_ok, other=0.0)
        tl.store(DELTA + bh * Nq + offs_m, tl.sum(o * do, 1) - dlse, mask=rows_ok)

    @triton.jit
    def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, PDQ, WORK, KV_IDX, KV_TILE, TILES, SLOPES, KV_LEN,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, slb, slh, stb, sth, len_b,
                H, GROUP, Nq, Nk, scale_log2, scale, BH,
                BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr,
                HAS_KV_LEN: tl.constexpr):
        """dQ of one work item: sum over its key blocks of dS K * scale, into DQ (slot -1) or into
        the float32 partial PDQ (S, B*H, BM, D) (summed afterwards). Q, DO, DQ share strides (sq*);
        LSE, DELTA share (sl*)."""
        qb, start, end, slot, b, h, hk, bh = _work_item(WORK, H, GROUP)
        offs_m = qb * BM + tl.arange(0, BM)
        offs_d = tl.arange(0, D)
        rows_ok = offs_m < Nq
        q_off = b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :]
        q = _load_rows(Q, b, h, offs_m, sqb, sqh, sqn, Nq, D)
        do = _load_rows(DO, b, h, offs_m, sqb, sqh, sqn, Nq, D)
        lse = tl.load(LSE + b * slb + h * slh + offs_m, mask=rows_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E_K  # no key: P = 0
        delta = tl.load(DELTA + b * slb + h * slh + offs_m, mask=rows_ok, other=0.0)
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(SLOPES + h)
        t_base = b * stb + h * sth
        kv_len = _key_length(KV_LEN, b, len_b, Nk, HAS_KV_LEN)
        dq = tl.zeros([BM, D], tl.float32)
        for t in range(start, end):
            kb = tl.load(KV_IDX + t)
            tile = tl.load(KV_TILE + t)
            offs_n = kb * BN + tl.arange(0, BN)
            k = _load_rows(K, b, hk, offs_n, skb, skh, skn, Nk, D)
            v = _load_rows(V, b, hk, offs_n, svb, svh, svn, Nk, D)
            s = _scores(q, k, offs_m + (Nk - Nq), offs_n, slope, tile, TILES + t_base, scale_log2, kb, kv_len,
                        BM, BN, HAS_ALIBI, IEEE, HAS_KV_LEN, False)
            p = tl.exp2(s - lse[:, None])
            if IEEE:
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
            else:
                dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k)
        if slot < 0:
            tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=rows_ok[:, None])
        else:
            r = tl.arange(0, BM)
            tl.store(PDQ + ((slot.to(tl.int64) * BH + bh) * BM + r[:, None]) * D + offs_d[None, :], dq * scale)

    @triton.jit
    def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, PDK, PDV, WORK, Q_IDX, Q_TILE, TILES_T, SLOPES, KV_LEN,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sgb, sgh, sgn, slb, slh, stb, sth, len_b,
                  H, GROUP, Nq, Nk, scale_log2, scale, BH,
                  BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr,
                  HAS_KV_LEN: tl.constexpr):
        """dK, dV of one key block for one *query* head (summed over each GQA group afterwards):
        sum over the query blocks of one work item. DK, DV are (B, Hq, Nk, D) with strides sg*
        (slot -1); slot s >= 0 writes float32 partials PDK, PDV (S', B*H, BN, D) instead."""
        kb, start, end, slot, b, h, hk, bh = _work_item(WORK, H, GROUP)
        offs_n = kb * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, D)
        keys_ok = offs_n < Nk
        k = _load_rows(K, b, hk, offs_n, skb, skh, skn, Nk, D)
        v = _load_rows(V, b, hk, offs_n, svb, svh, svn, Nk, D)
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(SLOPES + h)
        t_base = b * stb + h * sth
        kv_len = _key_length(KV_LEN, b, len_b, Nk, HAS_KV_LEN)
        dk = tl.zeros([BN, D], tl.float32)
        dv = tl.zeros([BN, D], tl.float32)
        if HAS_KV_LEN:
            end = tl.where(kb * BN < kv_len, end, start)  # a block of padding keys only: dk = dv = 0
        for t in range(start, end):
            qb = tl.load(Q_IDX + t)
            tile = tl.load(Q_TILE + t)
            offs_m = qb * BM + tl.arange(0, BM)
            rows_ok = offs_m < Nq
            q = _load_rows(Q, b, h, offs_m, sqb, sqh, sqn, Nq, D)
            do = _load_rows(DO, b, h, offs_m, sqb, sqh, sqn, Nq, D)
            lse = tl.load(LSE + b * slb + h * slh + offs_m, mask=rows_ok, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E_K
            delta = tl.load(DELTA + b * slb + h * slh + offs_m, mask=rows_ok, other=0.0)
            # transposed (BN, BM) scores: P^T and dS^T come out in the layout their dots take
            s_t = _scores(k, q, offs_n, offs_m + (Nk - Nq), slope, tile, TILES_T + t_base, scale_log2, kb, kv_len,
                          BN, BM, HAS_ALIBI, IEEE, HAS_KV_LEN, True)
            p_t = tl.exp2(s_t - lse[None, :])  # (BN, BM)
            if IEEE:
                dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")
                dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q, input_precision="ieee")
            else:
                dv += tl.dot(p_t.to(do.dtype), do)
                dp_t = tl.dot(v, tl.trans(do))
                ds_t = p_t * (dp_t - delta[None, :])
                dk += tl.dot(ds_t.to(q.dtype), q)
        if slot < 0:
            g_off = b * sgb + h * sgh + offs_n[:, None] * sgn + offs_d[None, :]
            tl.store(DK + g_off, (dk * scale).to(DK.dtype.element_ty), mask=keys_ok[:, None])
            tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=keys_ok[:, None])
        else:
            c = tl.arange(0, BN)
            p_off = ((slot.to(tl.int64) * BH + bh) * BN + c[:, None]) * D + offs_d[None, :]
            tl.store(PDK + p_off, dk * scale)
            tl.store(PDV + p_off, dv)


# -- launchers and the custom op --------------------------------------------------------------------

def _tile_strides(tiles: Tensor) -> tuple[int, int]:
    """Batch and head strides of the partial tiles, 0 where the mask broadcasts."""
    return (tiles.stride(0) if tiles.shape[0] > 1 else 0), (tiles.stride(1) if tiles.shape[1] > 1 else 0)


def _len_stride(kv_len: Tensor) -> int:
    """Batch stride of the key lengths: 0 where one length serves every sample."""
    return 1 if kv_len.shape[0] > 1 else 0


def _launch(kernel: str, block_m: int, block_n: int, q: Tensor) -> dict:
    """``launch_config`` on the GPU; nothing in the interpreter."""
    return launch_config(kernel, block_m, block_n, q.shape[-1], q.dtype) if q.device.type == "cuda" else {}


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


DELTA_ROWS = 64  # rows per program of _bwd_delta


def _partials(split: Splits, BH: int, rows: int, D: int, device) -> Tensor:
    """(max(S, 1), B*H, rows, D) float32 for the split blocks' partials (never read unwritten)."""
    return torch.empty(max(split.slots.numel(), 1), BH, rows, D, dtype=torch.float32, device=device)


def _forward(q, k, v, plan: list[Tensor], slopes, scale, block_m, block_n, has_alibi):
    """(out, lse) of the forward kernel over ``BlockPlan.forward_tensors``, split blocks merged."""
    kv_idx, kv_tile, tiles, kv_len, q_work, *q_split = plan
    q_split = Splits(*q_split)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    po = _partials(q_split, B * H, block_m, D, q.device)
    plse = torch.empty(po.shape[:3], dtype=torch.float32, device=q.device)  # (S, B*H, BM)
    stb, sth = _tile_strides(tiles)
    _fwd[(q_work.shape[0], B * H)](
        q, k, v, out, lse, po, plse, q_work, kv_idx, kv_tile, tiles, slopes, kv_len,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), stb, sth, _len_stride(kv_len), H, H // k.shape[1], Nq, Nk, scale * LOG2E, B * H,
        BM=block_m, BN=block_n, D=D, HAS_ALIBI=has_alibi, IEEE=q.dtype == torch.float32,
        HAS_KV_LEN=kv_len.numel() > 0, **_launch("_fwd", block_m, block_n, q))
    if q_split.slots.numel():
        _merge_slots(out, lse, po, plse, q_split, block_m)
    return out, lse


def _backward(dout, q, k, v, out, lse, dlse, plan: list[Tensor], slopes, scale, block_m, block_n, has_alibi):
    """(dq, dk, dv) of the backward kernels over ``BlockPlan.backward_tensors``."""
    kv_idx, kv_tile, q_idx, q_tile, tiles, tiles_t, kv_len, q_work, *rest = plan
    q_split, k_work, k_split = Splits(*rest[:4]), rest[4], Splits(*rest[5:])
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dout = dout.contiguous()
    # delta_i = rowsum(dO * O) - dlse_i: the lse's own gradient enters dS = P (dP - delta) through it
    out, dlse = out.contiguous(), dlse.float().contiguous()
    delta = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    _bwd_delta[(-(-Nq // DELTA_ROWS), B * H)](out, dout, dlse, delta, Nq, D=D, BM=DELTA_ROWS,
                                              **_launch("_bwd_delta", DELTA_ROWS, DELTA_ROWS, q))
    lse = lse.contiguous()
    dq = torch.empty_like(q)
    dk_h = torch.empty(B, H, Nk, D, dtype=q.dtype if Hkv == H else torch.float32, device=q.device)
    dv_h = torch.empty_like(dk_h)
    pdq = _partials(q_split, B * H, block_m, D, q.device)
    pdk, pdv = _partials(k_split, B * H, block_n, D, q.device), _partials(k_split, B * H, block_n, D, q.device)
    common = dict(BM=block_m, BN=block_n, D=D, HAS_ALIBI=has_alibi, IEEE=q.dtype == torch.float32,
                  HAS_KV_LEN=kv_len.numel() > 0)
    _bwd_dq[(q_work.shape[0], B * H)](
        q, k, v, dout, lse, delta, dq, pdq, q_work, kv_idx, kv_tile, tiles, slopes, kv_len,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), lse.stride(0), lse.stride(1), *_tile_strides(tiles),
        _len_stride(kv_len), H, H // Hkv, Nq, Nk, scale * LOG2E, scale, B * H, **common,
        **_launch("_bwd_dq", block_m, block_n, q))
    _bwd_dkdv[(k_work.shape[0], B * H)](
        q, k, v, dout, lse, delta, dk_h, dv_h, pdk, pdv, k_work, q_idx, q_tile, tiles_t, slopes, kv_len,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dk_h.stride(0), dk_h.stride(1), dk_h.stride(2),
        lse.stride(0), lse.stride(1), *_tile_strides(tiles_t), _len_stride(kv_len), H, H // Hkv, Nq, Nk,
        scale * LOG2E, scale, B * H, **common, **_launch("_bwd_dkdv", block_m, block_n, q))
    if q_split.slots.numel():
        _sum_slots(dq, pdq, q_split, block_m)
    if k_split.slots.numel():
        _sum_slots(dk_h, pdk, k_split, block_n)
        _sum_slots(dv_h, pdv, k_split, block_n)
    if Hkv != H:  # each kv head's gradient is the sum over the query heads that read it
        dk_h = dk_h.view(B, Hkv, H // Hkv, Nk, D).sum(2).to(k.dtype)
        dv_h = dv_h.view(B, Hkv, H // Hkv, Nk, D).sum(2).to(v.dtype)
    return dq, dk_h, dv_h


# The op's inputs after q, k, v: the forward's plan (``BlockPlan.forward_tensors``), the backward's
# (``backward_tensors``: it may use other blocks) and the ALiBi slopes.
@torch.library.custom_op("attnkit::triton_attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, fwd_plan: list[Tensor], bwd_plan: list[Tensor], slopes: Tensor,
                  scale: float, block_m: int, block_n: int, b_block_m: int, b_block_n: int,
                  has_alibi: bool) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, fwd_plan, slopes, scale, block_m, block_n, has_alibi)


@_attention_op.register_fake
def _(q, k, v, *rest):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("attnkit::triton_attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor,
                           plan: list[Tensor], slopes: Tensor, scale: float, block_m: int, block_n: int,
                           has_alibi: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(dout, q, k, v, out, lse, dlse, plan, slopes, scale, block_m, block_n, has_alibi)


@_attention_backward_op.register_fake
def _(dout, q, k, v, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, fwd_plan, bwd_plan, slopes, scale, _, _, b_block_m, b_block_n, has_alibi = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], slopes, *bwd_plan)
    ctx.config = (scale, b_block_m, b_block_n, has_alibi)
    ctx.plan_sizes = (len(fwd_plan), len(bwd_plan))


def _autograd_backward(ctx, dout, dlse):
    q, k, v, out, lse, slopes, *plan = ctx.saved_tensors
    if dlse is None:
        dlse = torch.zeros_like(lse)
    dq, dk, dv = _attention_backward_op(dout, q, k, v, out, lse, dlse, plan, slopes, *ctx.config)
    n_fwd, n_bwd = ctx.plan_sizes  # the gradient's structure must follow the inputs': one None per plan tensor
    return dq, dk, dv, [None] * n_fwd, [None] * n_bwd, None, None, None, None, None, None, None


_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check_plan(name: str, plan: BlockPlan, mask, Nq: int, Nk: int) -> None:
    """A plan given by the caller must be the one for this call: same mask object and sizes."""
    if plan.mask is not mask or (plan.Nq, plan.Nk) != (Nq, Nk):
        raise ValueError(f"{name} was built for mask {plan.mask!r} at (Nq, Nk) = ({plan.Nq}, {plan.Nk}); this call "
                         f"has mask {mask!r} at ({Nq}, {Nk}): build it with make_plan(mask, Nq, Nk, ...) for this call")


def _check_batch(plan: BlockPlan, B: int) -> None:
    """The mask's per-sample parts (key lengths, tiles) must have one entry or one per sample:
    the kernels index them by sample without a bound."""
    for name, n in (("key lengths", plan.kv_len.shape[0]), ("partial tiles", plan.tiles.shape[0])):
        if n not in (0, 1, B):
            raise ValueError(f"mask {plan.mask!r} has {name} for {n} samples; this call has B={B}: give one per "
                             "batch element (or one for all)")


def _check_blocks(block_m: int, block_n: int) -> None:
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name}={size}: expected a power of two >= 16 (tl.dot needs 16 on the GPU)")


def _plans_for(q: Tensor, k: Tensor, v: Tensor, mask, block_m, block_n, plan, plan_bwd,
               split_tiles) -> tuple[BlockPlan, BlockPlan]:
    """The forward's and the backward's plans. Given plans are checked. A missing forward plan
    comes from ``cached_plan`` at block_m x block_n (default ``default_blocks``). A missing
    backward plan is the forward's when a plan or block sizes were given (a ``plan=`` caller
    under torch.compile builds plans outside the graph: give ``plan_bwd=`` for other blocks);
    otherwise ``cached_plan`` at the backward's default blocks and the same split_tiles, built
    only when a gradient will be asked for."""
    D, Nq, Nk = q.shape[-1], q.shape[2], k.shape[2]
    chosen = plan is not None or block_m is not None or block_n is not None
    if plan is not None:
        if block_m is not None or block_n is not None or split_tiles is not None:
            raise ValueError("block_m, block_n and split_tiles are the plan's: give them to make_plan, not with plan=")
        _check_plan("plan", plan, mask, Nq, Nk)
    else:
        bm, bn = default_blocks(D, q.dtype)
        bm, bn = block_m or bm, block_n or bn
        _check_blocks(bm, bn)
        plan = cached_plan(mask, Nq, Nk, bm, bn, q.device, split_tiles)
    _check_batch(plan, q.shape[0])
    if plan_bwd is not None:
        _check_plan("plan_bwd", plan_bwd, mask, Nq, Nk)
        _check_batch(plan_bwd, q.shape[0])
        return plan, plan_bwd
    wants_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    bwd_blocks = default_blocks(D, q.dtype, backward=True)
    if not wants_grad or chosen or bwd_blocks == (plan.block_m, plan.block_n):
        return plan, plan
    return plan, cached_plan(mask, Nq, Nk, *bwd_blocks, q.device, split_tiles)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | None = None, bias: Bias | None = None,
                     scale: float | None = None, block_m: int | None = None, block_n: int | None = None,
                     plan: BlockPlan | None = None, plan_bwd: BlockPlan | None = None,
                     split_tiles: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact attention with the Triton kernels -> (out (B, Hq, Nq, D), lse (B, Hq, Nq) float32).

    q (B, Hq, Nq, D), k / v (B, Hkv, Nk, D); ``mask`` any attnkit mask; ``bias`` None or ALiBi.
    ``plan`` / ``plan_bwd``: ``make_plan(mask, Nq, Nk, block_m, block_n, device)`` for the forward
    and the backward (which may use other blocks; given ``plan`` alone, the backward uses it too:
    on the GPU at D = 128 give ``plan_bwd`` at ``default_blocks(D, dtype, backward=True)``, the
    forward's blocks spill registers there). Without them plans come from ``cached_plan`` (built
    once per mask object and sizes, like FlexAttention's block mask): at block_m x block_n for
    both passes when given, else at each pass's ``default_blocks``.
    """
    reason = why_not(q, k, v, mask, bias, 0.0)
    if reason is not None:
        raise ValueError(f"impl='triton' cannot run this call: {reason}")
    fwd, bwd = _plans_for(q, k, v, mask, block_m, block_n, plan, plan_bwd, split_tiles)
    has_alibi = isinstance(bias, Alibi)
    slopes = (bias.slopes.detach().to(device=q.device, dtype=torch.float32) if has_alibi
              else torch.zeros(1, dtype=torch.float32, device=q.device))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _attention_op(q.contiguous(), k.contiguous(), v.contiguous(), fwd.forward_tensors(),
                         bwd.backward_tensors(), slopes, scale, fwd.block_m, fwd.block_n, bwd.block_m, bwd.block_n,
                         has_alibi)
