"""The Triton kernels of attnkit's fused attention: FlashAttention-2 (Dao 2023) over a block plan.

The only module that defines kernels; ``op.py`` launches them, ``check.py`` compiles them for a GPU
that is not here. The plan they read is ``ops/block_plan.py``'s.

- ``_fwd``: one work item (a query block over a run of its key tiles): online softmax in the log2
  domain with fp32 accumulators (Algorithm 1 of FlashAttention-2), writing out / lse, or a
  normalized partial for split lists;
- ``_bwd_delta``: delta = rowsum(dO * O) - dlse;
- ``_bwd_dq``: dQ over a query block's key tiles, P recomputed from the saved lse;
- ``_bwd_dkdv``: dK, dV over a key block's query tiles, on transposed (key x query) tiles.

Switches (constexprs, ``configs.Schedule``; off unless a table row turns them on): ``TMA`` loads the
loop's tiles through tensor descriptors; ``WS`` asks for warp-specialized main loops; ``FUSED_DELTA``
computes delta inside ``_bwd_dq``; ``ATOMIC_DQ`` adds dQ from ``_bwd_dkdv`` with float32 atomics (no
``_bwd_dq`` launch); ``PERSISTENT`` runs the forward on a grid of a few programs per SM, each
looping over work items; ``GQA_GROUP`` runs one ``_bwd_dkdv`` program per kv head over its group's query
heads.

Dropout and softcap (constexprs ``DROPOUT`` / ``SOFTCAP``, off: the code above unchanged, the same
registers). ``SOFTCAP``: the scores are capped in the natural domain, s = c * tanh(q k^T * scale /
c) (Gemma 2's soft-capping, Gemma Team 2024), before ALiBi and the mask; the backward multiplies
dS by 1 - tanh^2. ``DROPOUT`` (FlashAttention, Dao et al. 2022, sec. 3.1 and appendix B): each
tile draws its keep bits from Philox (``_keep``) at its (seed, b * Hq + query head, query row, key)
positions, ``ops/dropout.py``'s layout, so the backward draws the same bits again and every
backend drops the same pairs for one seed; m_i, l_i and the lse are those of the undropped P, the
kept P is scaled by 1 / (1 - p), and delta = rowsum(dO * O) - dlse is unchanged (O is the dropped
output). Every Schedule switch keeps the same bits: they depend on positions only.

Rows that attend nowhere have lse = -inf, out = 0 and zero gradients. A key block at or past a
sample's key length (``KV_LEN``) is skipped; the one that crosses it is masked per key. GQA: each
query head reads kv head h // (Hq / Hkv).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# The kernels may read module globals only as constexprs (the interpreter does not enforce this).
LOG2E_K = tl.constexpr(LOG2E)


@triton.jit
def _work_item(WORK, w, bh, H, GROUP):
    """Work item w (a row of WORK) of sequence x head bh: block, the range of its list, slot, and
    b, h, hk (the kv head), in int64 (base offsets of big tensors overflow int32)."""
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
def _rows_source(PTR, b, h, sb, sh, sn, n, BLOCK: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """Where ``_load_block`` reads the rows of sequence b, head h: a tensor descriptor of its
    (n, D) rows in blocks of BLOCK (TMA), else the pointer itself."""
    if TMA:
        return tl.make_tensor_descriptor(PTR + b * sb + h * sh, shape=[n, D], strides=[sn, 1],
                                         block_shape=[BLOCK, D])
    else:
        return PTR


@triton.jit
def _load_block(src, b, h, blk, sb, sh, sn, n, BLOCK: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """Rows blk * BLOCK .. + BLOCK of ``_rows_source``'s sequence and head: (BLOCK, D), zeros past n
    (the descriptor pads out-of-bounds rows with zeros too)."""
    if TMA:
        return src.load([blk * BLOCK, 0])
    else:
        return _load_rows(src, b, h, blk * BLOCK + tl.arange(0, BLOCK), sb, sh, sn, n, D)


@triton.jit
def _key_list(K, V, SLOPES, KV_IDX, KV_LEN, b, h, hk, start, end, skb, skh, skn, svb, svh, svn, stb, sth, len_b, Nk,
              BN: tl.constexpr, D: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KV_LEN: tl.constexpr,
              TMA: tl.constexpr):
    """What a walk over a query block's key list (forward, dQ) needs: head h's ALiBi slope, the
    partial tiles' base offset, sample b's key length, the list's end cut before the key blocks
    past that length (the list is ascending), and where K and V are read from."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + h)
    kv_len = _key_length(KV_LEN, b, len_b, Nk, HAS_KV_LEN)
    if HAS_KV_LEN:
        end = _end_at_key_length(KV_IDX, start, end, kv_len, BN)
    return (slope, b * stb + h * sth, kv_len, end, _rows_source(K, b, hk, skb, skh, skn, Nk, BN, D, TMA),
            _rows_source(V, b, hk, svb, svh, svn, Nk, BN, D, TMA))


@triton.jit
def _key_tile(KV_IDX, KV_TILE, t, k_src, v_src, b, hk, skb, skh, skn, svb, svh, svn, Nk, BN: tl.constexpr,
              D: tl.constexpr, TMA: tl.constexpr):
    """Entry t of a query block's key list (forward, dQ): its key block kb, partial tile id (-1:
    full), key positions, and the block's K and V rows (BN, D)."""
    kb = tl.load(KV_IDX + t)
    tile = tl.load(KV_TILE + t)
    k = _load_block(k_src, b, hk, kb, skb, skh, skn, Nk, BN, D, TMA)
    v = _load_block(v_src, b, hk, kb, svb, svh, svn, Nk, BN, D, TMA)
    return kb, tile, kb * BN + tl.arange(0, BN), k, v


@triton.jit
def _row_lse(LSE, b, h, slb, slh, offs_m, rows_ok):
    """The saved lse of rows offs_m in the log2 domain, +inf for rows that attend nowhere (and
    rows past N), so that P = exp2(s - lse) = 0 there."""
    lse = tl.load(LSE + b * slb + h * slh + offs_m, mask=rows_ok, other=float("inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E_K


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b, in IEEE float32 on the FMA units for float32 inputs (tf32 would miss the contract)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tanh(x):
    """tanh(x) from one exp2: (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1], so nothing
    overflows and |x| -> inf gives +-1 exactly (libdevice's tanh does not run in the interpreter).
    Below |x| = 1/4, where 1 - e cancels (a large softcap puts every score there), its Taylor series
    to x^9 instead: the first term left out is under 1e-8 relative there."""
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E_K))  # tensor first: constexpr * tensor stays a constexpr
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    return tl.where(tl.abs(x) < 0.25, series, t)


@triton.jit
def _keep(seed, bh, rows, col0, threshold, R: tl.constexpr, C: tl.constexpr):
    """(R, C) dropout keep bits of query rows ``rows`` (R,) x keys col0 .. col0 + C - 1 (col0 a
    multiple of 4) of sequence x query head bh = b * Hq + h. Key j's word is word j & 3 of
    Philox4x32-10 at counter (j >> 2, i, bh, 0) under key ``seed``, kept where it is >= threshold
    = floor(p * 2**32): ``ops/dropout.py``'s layout, so every backend drops the same pairs. One
    Philox call gives the words of four neighbouring keys (FlashAttention, Dao et al. 2022,
    appendix B, which also draws the bits again in the backward instead of storing them)."""
    quads = (col0 // 4 + tl.arange(0, C // 4)).to(tl.uint32)  # (C / 4,) counters c0
    zero = tl.zeros([R, C // 4], tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, zero + quads[None, :], zero + rows.to(tl.uint32)[:, None],
                               zero + bh.to(tl.uint32), zero)
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # (R, C / 4, 2, 2): [r, c, a, b] = word 2a + b
    return tl.reshape(words >= threshold.to(tl.uint32), (R, C))


@triton.jit
def _scores(a, b, pos_a, pos_b, slope, tile, TILES, scale_log2, softcap, kb, kv_len,
            RA: tl.constexpr, RB: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr,
            HAS_KV_LEN: tl.constexpr, KEYS_ON_ROWS: tl.constexpr, SOFTCAP: tl.constexpr):
    """(RA, RB) scores a b^T * scale * log2(e) in the log2 domain, capped (SOFTCAP: softcap *
    tanh(a b^T * scale / softcap), in the natural domain, Gemma 2's soft-capping), ALiBi
    (-slope |pos_a - pos_b|, positions on the key axis), partial tile ``tile`` of TILES (-1: a
    full tile) and, where key block ``kb`` crosses this sample's key length ``kv_len``, the
    padding keys. a / b are q / k for (query, key) tiles and k / q for the transposed tiles of
    dk/dv (KEYS_ON_ROWS). Returns (s, t): t = tanh(...) under SOFTCAP (the backward's
    d cap / d s = 1 - t^2), s itself otherwise."""
    if SOFTCAP:
        t = _tanh(_dot(a, tl.trans(b), IEEE) * (scale_log2 / (LOG2E_K * softcap)))
        s = t * (softcap * LOG2E_K)
    else:
        s = _dot(a, tl.trans(b), IEEE) * scale_log2
        t = s
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
    return s, t

@triton.jit
def _key_length(KV_LEN, b, len_b, Nk, HAS_KV_LEN: tl.constexpr):
    """Sample b's key length (keys j >= it are padding, ``split_key_lengths``); Nk without one."""
    kv_len = Nk
    if HAS_KV_LEN:
        kv_len = tl.load(KV_LEN + b * len_b)
    return kv_len

@triton.jit
def _end_at_key_length(KV_IDX, start, end, kv_len, BN: tl.constexpr):
    """The end of entries start..end of an ascending key-block list cut before the first block
    that starts at or past ``kv_len`` (all its keys are padding): a binary search, log2 of the
    run's length scalar loads, instead of visiting padding-only tiles."""
    lo = start
    hi = end
    while lo < hi:
        mid = (lo + hi) // 2
        past = tl.load(KV_IDX + mid) * BN >= kv_len
        hi = tl.where(past, mid, hi)
        lo = tl.where(past, lo, mid + 1)
    return lo


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

@triton.jit(do_not_specialize=["seed", "threshold"])
def _fwd(Q, K, V, O, LSE, PO, PLSE, WORK, KV_IDX, KV_TILE, TILES, SLOPES, KV_LEN,
         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh, stb, sth, len_b,
         H, GROUP, Nq, Nk, scale_log2, BH, N_ITEMS, seed, threshold, keep_scale, softcap,
         BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr,
         HAS_KV_LEN: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, PERSISTENT: tl.constexpr,
         DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr):
    """The forward over the plan's N_ITEMS work items for each of the BH sequences x heads: one
    program per (item, sequence x head) on a (N_ITEMS, BH) grid, or, PERSISTENT, a 1-D grid of
    programs each taking every num_programs-th of the N_ITEMS * BH pairs, item-major within a
    sequence x head (neighbouring programs share its K / V in L2). DROPOUT / SOFTCAP: see
    ``_fwd_item``."""
    if PERSISTENT:
        for idx in range(tl.program_id(0), N_ITEMS * BH, tl.num_programs(0)):
            _fwd_item(Q, K, V, O, LSE, PO, PLSE, WORK, KV_IDX, KV_TILE, TILES, SLOPES, KV_LEN,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh, stb, sth, len_b,
                      H, GROUP, Nq, Nk, scale_log2, BH, idx % N_ITEMS, idx // N_ITEMS, seed, threshold, keep_scale,
                      softcap, BM, BN, D, HAS_ALIBI, IEEE, HAS_KV_LEN, TMA, WS, DROPOUT, SOFTCAP)
    else:
        _fwd_item(Q, K, V, O, LSE, PO, PLSE, WORK, KV_IDX, KV_TILE, TILES, SLOPES, KV_LEN,
                  sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh, stb, sth, len_b,
                  H, GROUP, Nq, Nk, scale_log2, BH, tl.program_id(0), tl.program_id(1), seed, threshold, keep_scale,
                  softcap, BM, BN, D, HAS_ALIBI, IEEE, HAS_KV_LEN, TMA, WS, DROPOUT, SOFTCAP)


@triton.jit
def _fwd_item(Q, K, V, O, LSE, PO, PLSE, WORK, KV_IDX, KV_TILE, TILES, SLOPES, KV_LEN,
              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh, stb, sth, len_b,
              H, GROUP, Nq, Nk, scale_log2, BH, w, bh_id, seed, threshold, keep_scale, softcap,
              BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr,
              HAS_KV_LEN: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr, DROPOUT: tl.constexpr,
              SOFTCAP: tl.constexpr):
    """Work item w of sequence x head bh_id: a query block over a run of its key tiles. Slot -1:
    the whole list, the final out / lse; slot s: a partial (normalized out, lse) in PO / PLSE,
    merged afterwards. SOFTCAP: the scores are capped (``_scores``). DROPOUT: m_i, l_i and the
    lse are those of the undropped P; acc sums only the kept P (``_keep``), and out is scaled by
    keep_scale = 1 / (1 - p) at the end (FlashAttention, Dao et al. 2022, Algorithm 2)."""
    qb, start, end, slot, b, h, hk, bh = _work_item(WORK, w, bh_id, H, GROUP)
    offs_m = qb * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    rows_ok = offs_m < Nq
    q = _load_rows(Q, b, h, offs_m, sqb, sqh, sqn, Nq, D)
    slope, t_base, kv_len, end, k_src, v_src = _key_list(K, V, SLOPES, KV_IDX, KV_LEN, b, h, hk, start, end, skb, skh,
                                                         skn, svb, svh, svn, stb, sth, len_b, Nk, BN, D, HAS_ALIBI,
                                                         HAS_KV_LEN, TMA)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for t in tl.range(start, end, warp_specialize=WS):
        kb, tile, offs_n, k, v = _key_tile(KV_IDX, KV_TILE, t, k_src, v_src, b, hk, skb, skh, skn, svb, svh, svn, Nk,
                                           BN, D, TMA)
        s, _cap = _scores(q, k, offs_m + (Nk - Nq), offs_n, slope, tile, TILES + t_base, scale_log2, softcap, kb,
                          kv_len, BM, BN, HAS_ALIBI, IEEE, HAS_KV_LEN, False, SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: keep p = 0
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # bh of the query head: the GQA group's heads draw their own bits
            p = tl.where(_keep(seed, b * H + h, offs_m, kb * BN, threshold, BM, BN), p, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    alive = l_i > 0
    out = acc / tl.where(alive, l_i, 1.0)[:, None]
    if DROPOUT:
        out = out * keep_scale
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

@triton.jit(do_not_specialize=["seed", "threshold"])
def _bwd_dq(Q, K, V, O, DO, LSE, DLSE, DELTA, DQ, PDQ, WORK, KV_IDX, KV_TILE, TILES, SLOPES, KV_LEN,
            sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, slb, slh, stb, sth, len_b,
            H, GROUP, Nq, Nk, scale_log2, scale, BH, seed, threshold, keep_scale, softcap,
            BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr,
            HAS_KV_LEN: tl.constexpr, FUSED_DELTA: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
            DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr):
    """dQ of one work item: sum over its key blocks of dS K * scale, into DQ (slot -1) or into
    the float32 partial PDQ (S, B*H, BM, D) (summed afterwards). Q, O, DO, DQ share strides (sq*);
    LSE, DLSE, DELTA share (sl*). FUSED_DELTA: this kernel computes delta = rowsum(dO * O) - dlse
    for its rows and writes it to DELTA for ``_bwd_dkdv`` (every work item of a split block writes
    the same values); otherwise it reads ``_bwd_delta``'s. DROPOUT: dP = dO V^T is taken through
    the keep mask (kept * keep_scale, dropped 0) before dS = P (dP - delta), delta unchanged (O is
    the dropped output). SOFTCAP: dS is multiplied by the cap's derivative 1 - t^2."""
    qb, start, end, slot, b, h, hk, bh = _work_item(WORK, tl.program_id(0), tl.program_id(1), H, GROUP)
    offs_m = qb * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    rows_ok = offs_m < Nq
    q_off = b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :]
    q = _load_rows(Q, b, h, offs_m, sqb, sqh, sqn, Nq, D)
    do = _load_rows(DO, b, h, offs_m, sqb, sqh, sqn, Nq, D)
    lse = _row_lse(LSE, b, h, slb, slh, offs_m, rows_ok)
    if FUSED_DELTA:
        o = _load_rows(O, b, h, offs_m, sqb, sqh, sqn, Nq, D)
        dlse = tl.load(DLSE + b * slb + h * slh + offs_m, mask=rows_ok, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) - dlse
        tl.store(DELTA + b * slb + h * slh + offs_m, delta, mask=rows_ok)
    else:
        delta = tl.load(DELTA + b * slb + h * slh + offs_m, mask=rows_ok, other=0.0)
    slope, t_base, kv_len, end, k_src, v_src = _key_list(K, V, SLOPES, KV_IDX, KV_LEN, b, h, hk, start, end, skb, skh,
                                                         skn, svb, svh, svn, stb, sth, len_b, Nk, BN, D, HAS_ALIBI,
                                                         HAS_KV_LEN, TMA)
    dq = tl.zeros([BM, D], tl.float32)
    for t in tl.range(start, end, warp_specialize=WS):
        kb, tile, offs_n, k, v = _key_tile(KV_IDX, KV_TILE, t, k_src, v_src, b, hk, skb, skh, skn, svb, svh, svn, Nk,
                                           BN, D, TMA)
        if DROPOUT:  # first, while few tiles are live: Philox's temporaries need registers
            keep = _keep(seed, b * H + h, offs_m, kb * BN, threshold, BM, BN)
        s, cap = _scores(q, k, offs_m + (Nk - Nq), offs_n, slope, tile, TILES + t_base, scale_log2, softcap, kb,
                         kv_len, BM, BN, HAS_ALIBI, IEEE, HAS_KV_LEN, False, SOFTCAP)
        p = tl.exp2(s - lse[:, None])
        if SOFTCAP:  # dS = P (dP - delta) (1 - t^2): fold the cap's derivative into P now (t dies here)
            p = p * (1.0 - cap * cap)
        dp = _dot(do, tl.trans(v), IEEE)
        if DROPOUT:
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)
    if slot < 0:
        tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=rows_ok[:, None])
    else:
        r = tl.arange(0, BM)
        tl.store(PDQ + ((slot.to(tl.int64) * BH + bh) * BM + r[:, None]) * D + offs_d[None, :], dq * scale)


@triton.jit(do_not_specialize=["seed", "threshold"])
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, PDK, PDV, DQACC, WORK, Q_IDX, Q_TILE, TILES_T, SLOPES, KV_LEN,
              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sgb, sgh, sgn, slb, slh, stb, sth, len_b,
              H, GROUP, Nq, Nk, scale_log2, scale, BH, seed, threshold, keep_scale, softcap,
              BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr,
              HAS_KV_LEN: tl.constexpr, ATOMIC_DQ: tl.constexpr, GQA_GROUP: tl.constexpr, TMA: tl.constexpr,
              WS: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr):
    """dK, dV of one key block over the query blocks of one work item. Without GQA_GROUP, for one
    *query* head (grid axis 1 B * Hq; under GQA summed over each group afterwards): DK, DV are
    (B, Hq, Nk, D). With GQA_GROUP, for one kv head over its GROUP query heads (grid axis 1
    B * Hkv): DK, DV are (B, Hkv, Nk, D). Strides sg*; slot s >= 0 writes float32 partials
    PDK, PDV (S', BH, BN, D) instead. ATOMIC_DQ: also adds dS^T K * scale of each tile into DQACC
    (B, Hq, Nq, D) float32 with strides sq*. DROPOUT: dV sums the kept P^T dO (times keep_scale
    at the end) and dP^T goes through the keep mask, drawn for the query head b * H + h at
    (query, key) = (column, row) of the transposed tile; SOFTCAP: dS^T times 1 - t^2."""
    if GQA_GROUP:
        kb, start, end, slot, b, hk, _unused, bh = _work_item(WORK, tl.program_id(0), tl.program_id(1), H // GROUP, 1)
        h_first = hk * GROUP
        n_heads = GROUP
        h_out = hk
    else:
        kb, start, end, slot, b, h_first, hk, bh = _work_item(WORK, tl.program_id(0), tl.program_id(1), H, GROUP)
        n_heads = 1
        h_out = h_first
    offs_n = kb * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    keys_ok = offs_n < Nk
    k = _load_rows(K, b, hk, offs_n, skb, skh, skn, Nk, D)
    v = _load_rows(V, b, hk, offs_n, svb, svh, svn, Nk, D)
    kv_len = _key_length(KV_LEN, b, len_b, Nk, HAS_KV_LEN)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    if HAS_KV_LEN:
        end = tl.where(kb * BN < kv_len, end, start)  # a block of padding keys only: dk = dv = 0
    for g in range(n_heads):
        h = h_first + g
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(SLOPES + h)
        t_base = b * stb + h * sth
        q_src = _rows_source(Q, b, h, sqb, sqh, sqn, Nq, BM, D, TMA)
        do_src = _rows_source(DO, b, h, sqb, sqh, sqn, Nq, BM, D, TMA)
        for t in tl.range(start, end, warp_specialize=WS):
            qb = tl.load(Q_IDX + t)
            tile = tl.load(Q_TILE + t)
            offs_m = qb * BM + tl.arange(0, BM)
            rows_ok = offs_m < Nq
            q = _load_block(q_src, b, h, qb, sqb, sqh, sqn, Nq, BM, D, TMA)
            do = _load_block(do_src, b, h, qb, sqb, sqh, sqn, Nq, BM, D, TMA)
            lse = _row_lse(LSE, b, h, slb, slh, offs_m, rows_ok)
            delta = tl.load(DELTA + b * slb + h * slh + offs_m, mask=rows_ok, other=0.0)
            # transposed (BN, BM) scores: P^T and dS^T come out in the layout their dots take
            s_t, cap_t = _scores(k, q, offs_n, offs_m + (Nk - Nq), slope, tile, TILES_T + t_base, scale_log2, softcap,
                                 kb, kv_len, BN, BM, HAS_ALIBI, IEEE, HAS_KV_LEN, True, SOFTCAP)
            p_t = tl.exp2(s_t - lse[None, :])  # (BN, BM)
            if DROPOUT:  # (here, not first in the loop: fewer registers on sm_90, triton 3.9)
                keep_t = tl.trans(_keep(seed, b * H + h, offs_m, kb * BN, threshold, BM, BN))  # (BN, BM)
                dv += _dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do, IEEE)
                dp_t = tl.where(keep_t, _dot(v, tl.trans(do), IEEE) * keep_scale, 0.0)
            else:
                dv += _dot(p_t.to(do.dtype), do, IEEE)
                dp_t = _dot(v, tl.trans(do), IEEE)
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * (1.0 - cap_t * cap_t)
            dk += _dot(ds_t.to(q.dtype), q, IEEE)
            if ATOMIC_DQ:
                dq = _dot(tl.trans(ds_t.to(k.dtype)), k, IEEE)
                tl.atomic_add(DQACC + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], dq * scale,
                              mask=rows_ok[:, None], sem="relaxed")
    if DROPOUT:
        dv = dv * keep_scale
    if slot < 0:
        g_off = b * sgb + h_out * sgh + offs_n[:, None] * sgn + offs_d[None, :]
        tl.store(DK + g_off, (dk * scale).to(DK.dtype.element_ty), mask=keys_ok[:, None])
        tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=keys_ok[:, None])
    else:
        c = tl.arange(0, BN)
        p_off = ((slot.to(tl.int64) * BH + bh) * BN + c[:, None]) * D + offs_d[None, :]
        tl.store(PDK + p_off, dk * scale)
        tl.store(PDV + p_off, dv)
