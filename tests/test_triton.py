"""impl="triton" beyond the case table (tests/test_backends.py runs that): the block plan is the
mask, tile for tile; split-KV covers every key list once; attnkit works without triton; the op
goes through torch.compile. On the CPU the kernels run in Triton's interpreter (conftest)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import attnkit as ak
from attnkit.masks import Mask

pytest.importorskip("triton")

from attnkit.ops import triton as ak_triton  # noqa: E402
from attnkit.ops.block_plan import (  # noqa: E402
    make_plan,
    pack_bits,
    split_key_lengths,
    split_work,
    unpack_bits,
)
from attnkit.ops.triton.op import triton_attention  # noqa: E402

MASKS = {
    "none": lambda B, N: None,
    "causal": lambda B, N: ak.causal(),
    "window-global": lambda B, N: ak.sliding_window(7) | ak.global_tokens([0, N // 2]),
    "padding-documents": lambda B, N: ak.key_padding([N, N // 3]) & ak.document(torch.arange(N) * 3 // N),
    "bool-padding": lambda B, N: ak.key_padding(torch.arange(N)[None, :] % 5 != 1) & ak.causal(),  # stays in tiles
    "dilated-heads": lambda B, N: ak.sliding_window(4, dilation=(1, 3)),
}


def lists(ptr: torch.Tensor, idx: torch.Tensor, tile: torch.Tensor) -> dict[tuple[int, int], int]:
    """{(row block, col block): tile id} from a CSR list."""
    out = {}
    for r in range(len(ptr) - 1):
        for t in range(int(ptr[r]), int(ptr[r + 1])):
            out[(r, int(idx[t]))] = int(tile[t])
    return out


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("Nq,Nk,bm,bn", [(50, 50, 16, 16), (37, 61, 16, 8), (64, 64, 32, 16), (40, 200, 16, 64),
                                         (33, 300, 16, 128)])
def test_the_plan_is_the_mask_tile_for_tile(name, Nq, Nk, bm, bn):
    B, H = 2, 2
    mask: Mask | None = MASKS[name](B, Nk)
    truth = (torch.ones(1, 1, Nq, Nk, dtype=torch.bool) if mask is None
             else mask.materialize(Nq, Nk)).expand(B, H, Nq, Nk)  # (B, H, Nq, Nk)
    plan = make_plan(mask, Nq, Nk, bm, bn, "cpu")
    visits = lists(plan.kv_ptr, plan.kv_idx, plan.kv_tile)
    assert visits == {(c, r): t for (r, c), t in lists(plan.q_ptr, plan.q_idx, plan.q_tile).items()}  # transposed
    # the kernels mask keys j >= kv_len[b] themselves (a key_padding(lengths) factor of the mask)
    lengths = split_key_lengths(mask)[1]
    kv_len = lengths.long() if lengths is not None else torch.tensor([Nk])
    key_ok = (torch.arange(Nk)[None, :] < kv_len[:, None]).expand(B, Nk)[:, None, None]  # (B, 1, 1, Nk)
    nQ, nK = -(-Nq // bm), -(-Nk // bn)
    for qb in range(nQ):
        for kb in range(nK):
            region = truth[:, :, qb * bm:(qb + 1) * bm, kb * bn:(kb + 1) * bn]  # (B, H, <=bm, <=bn)
            live = key_ok[..., kb * bn:(kb + 1) * bn].expand_as(region)
            if (qb, kb) not in visits:
                assert not region.any(), f"tile {(qb, kb)} holds allowed pairs but is never visited"
                continue
            tile = visits[(qb, kb)]
            if tile < 0:  # run unmasked but for the key lengths: every live pair allowed, no ragged key
                assert torch.equal(region, live) and region.shape[-1] == bn, f"tile {(qb, kb)} is not full"
                continue
            stored = unpack_bits(plan.tiles[:, :, tile], bn).expand(B, H, bm, bn)
            rows, cols = region.shape[-2:]
            got = stored[:, :, :rows, :cols] & live
            assert torch.equal(got, region), f"partial tile {(qb, kb)} differs from the mask"
            assert not stored[:, :, :, cols:].any() and not stored[:, :, rows:].any()  # outside N: nothing
    if name == "padding-documents":  # per-sample lengths cost no per-sample tiles
        assert plan.tiles.shape[0] == 1 and "key_padding" not in repr(plan.mask)


@pytest.mark.parametrize("bn", [8, 16, 32, 33, 64, 128])
def test_tile_bits_round_trip(bn):
    truth = torch.rand(3, 5, bn) < 0.5
    truth[0, 0] = True  # every bit, the sign bit of each word included
    words = pack_bits(truth)
    assert words.dtype == torch.int32 and words.shape == (3, 5, -(-bn // 32))
    assert torch.equal(unpack_bits(words, bn), truth)


@pytest.mark.parametrize("lists", ["key lists (forward, dq)", "query lists (dk, dv)"])
@pytest.mark.parametrize("split", [None, 1, 2, 3])
def test_split_work_covers_each_list_once(split, lists):
    plan = make_plan(ak.sliding_window(3) | ak.global_tokens([0, 100]), 200, 200, 8, 8, "cpu")
    ptr = plan.kv_ptr if lists.startswith("key") else plan.q_ptr
    items, slot_q = split_work(ptr, split)
    work_q, start, end, slot = items.unbind(1)
    ptr = ptr.tolist()
    for qb in range(len(ptr) - 1):
        mine = sorted((int(s), int(e)) for q, s, e in zip(work_q, start, end) if int(q) == qb)
        covered = [t for s, e in mine for t in range(s, e)]
        assert covered == list(range(ptr[qb], ptr[qb + 1])), f"query block {qb}: tiles {covered}"
        if split is not None:
            assert all(e - s <= split for s, e in mine)
    assert sorted(int(s) for s in slot if s >= 0) == list(range(len(slot_q)))
    if split is None:  # the default splits only the global tokens' blocks (0 and 12): their lists span all N
        assert sorted(set(slot_q.tolist())) == [0, 12]


def test_splits_name_each_partial_once_and_only_rows_inside_n():
    plan = make_plan(ak.sliding_window(3) | ak.global_tokens([0, 100]), 200, 190, 16, 16, "cpu", split_tiles=2)
    for split, N in ((plan.q_split, 200), (plan.k_split, 190)):
        slots = split.slots.long()
        assert len(slots) > 0 and sorted(split.gather[split.gather >= 0].tolist()) == list(range(len(slots)))
        blocks = []
        for row in split.gather.tolist():
            mine = [x for x in row if x >= 0]
            assert mine == sorted(mine) and row[len(mine):] == [-1] * (len(row) - len(mine))  # in order, then -1
            assert len({int(slots[x]) for x in mine}) == 1  # one block per group
            blocks.append(int(slots[mine[0]]))
        assert blocks == sorted(set(slots.tolist()))
        every = [b * 16 + i for b in blocks for i in range(16)]
        assert split.rows.tolist() == [r for r in every if r < N]
        assert [every[i] for i in split.keep.tolist()] == split.rows.tolist()


def test_key_lengths_leave_the_mask_only_where_they_are_a_factor():
    lengths = torch.tensor([5, 3])
    pad = ak.key_padding(lengths)
    assert split_key_lengths(pad) == (None, lengths)
    rest, got = split_key_lengths(ak.causal() & pad)
    assert repr(rest) == "causal()" and got is lengths
    rest, got = split_key_lengths((ak.causal() & ak.sliding_window(2)) & (ak.document([0, 0, 1, 1, 1]) & pad))
    assert got is lengths and "key_padding" not in repr(rest) and "document" in repr(rest) and "causal" in repr(rest)
    for kept in (pad | ak.global_tokens([0]), ~pad, ak.key_padding(torch.ones(2, 5, dtype=torch.bool)) & ak.causal()):
        assert split_key_lengths(kept) == (kept, None)


@pytest.mark.parametrize("build", [
    lambda a, b: ak.key_padding(a) & ak.key_padding(b),
    lambda a, b: (ak.causal() & ak.key_padding(a)) & ak.key_padding(b),
    lambda a, b: ak.key_padding(a) & (ak.sliding_window(6) & ak.key_padding(b)),
    lambda a, b: (ak.key_padding(a) & ak.document(torch.arange(40) // 15)) & (ak.causal() & ak.key_padding(b)),
], ids=["two", "causal-two", "nested", "documents"])
def test_several_key_length_factors_are_all_applied(build):
    """Every key_padding(lengths) factor of an & counts (their minimum per sample), in any order
    and nesting: splitting them off the plan must not drop one."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 40, 16) for _ in range(3))
    for a, b in ((torch.tensor([30, 40]), torch.tensor([12, 35])), (torch.tensor([12]), torch.tensor([30, 5]))):
        for mask in (build(a, b), build(b, a)):
            rest, lengths = split_key_lengths(mask)
            assert split_key_lengths(rest) == (rest, None)  # nothing left to split
            got = triton_attention(q, k, v, mask=mask)[0]
            want = ak.attention(q, k, v, mask=mask, impl="reference")
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_key_lengths_are_applied_in_the_kernels():
    """Per-sample lengths (one of them 0: a sample with no key) go to the kernels, not the tiles;
    forward, lse and gradients against the reference, with GQA and every list split."""
    torch.manual_seed(0)
    N = 50
    q = torch.randn(3, 4, N, 16, requires_grad=True)
    k, v = (torch.randn(3, 2, N, 16, requires_grad=True) for _ in range(2))
    mask = ak.sliding_window(9) & ak.key_padding([50, 17, 0])
    plan = make_plan(mask, N, N, 16, 16, "cpu", split_tiles=1)
    assert plan.tiles.shape[:2] == (1, 1)  # no per-sample tiles
    got, lse = triton_attention(q, k, v, mask=mask, plan=plan)
    want, want_lse = ak.attention(q, k, v, mask=mask, impl="reference", return_lse=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse)) and torch.isneginf(lse[2]).all()
    torch.testing.assert_close(lse[:2], want_lse[:2], atol=1e-5, rtol=1e-5)
    g = torch.randn_like(got)
    mine = torch.autograd.grad((got * g).sum(), (q, k, v))
    ref = torch.autograd.grad((want * g).sum(), (q, k, v))
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not mine[1][1, :, 17:].any() and not mine[1][2].any()  # padding keys get no gradient


def test_per_sample_mask_parts_must_fit_the_batch():
    q = k = v = torch.randn(4, 1, 20, 16)
    for mask in (ak.key_padding([20, 5]), ak.key_padding(torch.arange(20)[None, :].expand(2, 20) < 9) & ak.causal()):
        with pytest.raises(ValueError, match="B=4"):  # the mask's own check, or the plan's
            triton_attention(q, k, v, mask=mask)


def test_split_kv_equals_one_program_per_block():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 90, 32) for _ in range(3))
    mask = ak.sliding_window(5) | ak.global_tokens([3, 77])
    whole, lse_whole = triton_attention(q, k, v, mask=mask, split_tiles=10 ** 6)
    split, lse_split = triton_attention(q, k, v, mask=mask, split_tiles=1)
    assert torch.allclose(whole, split, atol=1e-6) and torch.allclose(lse_whole, lse_split, atol=1e-6)


def test_the_backward_may_use_other_blocks_than_the_forward():
    """plan_bwd: the backward's own blocks (on the GPU the defaults differ at D = 128), split too."""
    torch.manual_seed(0)
    Nq, Nk = 45, 70
    q = torch.randn(2, 4, Nq, 32, requires_grad=True)
    k, v = (torch.randn(2, 2, Nk, 32, requires_grad=True) for _ in range(2))  # GQA
    mask = ak.sliding_window(6) | ak.global_tokens([2, 60])
    fwd, bwd = make_plan(mask, Nq, Nk, 32, 16, "cpu"), make_plan(mask, Nq, Nk, 16, 32, "cpu", split_tiles=1)
    got, lse = triton_attention(q, k, v, mask=mask, plan=fwd, plan_bwd=bwd)
    want, want_lse = ak.attention(q, k, v, mask=mask, impl="reference", return_lse=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    g_out = torch.randn_like(got)
    g_lse = torch.randn_like(lse)  # through the lse too
    mine = torch.autograd.grad((got * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    ref = torch.autograd.grad((want * g_out).sum() + (want_lse * g_lse).sum(), (q, k, v))
    for name, a, b in zip("qkv", mine, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"d{name}: {m}")
    with pytest.raises(ValueError, match="plan_bwd was built for mask"):
        triton_attention(q, k, v, mask=ak.causal(), plan_bwd=bwd)


def test_through_torch_compile():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    mask = ak.causal() & ak.sliding_window(9)
    plan = make_plan(mask, 40, 40, 16, 16, "cpu")
    compiled = torch.compile(lambda q, k, v: triton_attention(q, k, v, mask=mask, plan=plan)[0], fullgraph=True)
    got = compiled(q, k, v)
    want = ak.attention(q, k, v, mask=mask, impl="reference")
    assert torch.allclose(got, want, atol=1e-5)
    g = torch.autograd.grad(got.sum(), (q, k, v))
    w = torch.autograd.grad(want.sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g, w))


def test_auto_on_cuda_leaves_sdpa_the_masks_it_takes_without_materializing(monkeypatch):
    """On CUDA (pretended here: the dispatch reads the device through _on_cuda), auto gives torch
    SDPA what FlashAttention / cuDNN run (no mask, causal with Nq == Nk); a mask SDPA needs
    materialized goes where auto's cost model (_dispatch.CudaCosts) says it is cheaper: SDPA for
    small calls and decoding steps, the Triton kernels for long ones; ALiBi (which SDPA cannot
    take structured) to the kernels. The lse on CUDA goes past SDPA by its own device check,
    which reads the tensors, so it is not pretended here."""
    from attnkit import _dispatch
    from attnkit._validate import validate
    monkeypatch.setattr(_dispatch, "_on_cuda", lambda c: True)
    q = k = v = torch.randn(2, 2, 128, 16)  # small: SDPA's host path is the shorter
    big = torch.randn(1, 12, 4096, 64)  # long: the kernels skip most of the pairs
    one = torch.randn(2, 2, 1, 16)
    masks = {
        "window": ak.sliding_window(4),
        "longformer": ak.sliding_window(4) | ak.global_tokens([0]),
        "padding": ak.key_padding([128, 31]),
        "documents": ak.causal() & ak.document([0] * 60 + [1] * 68),
    }
    picks = {"none": validate(q, k, v), "causal": validate(q, k, v, mask=ak.causal()),
             "alibi": validate(q, k, v, mask=ak.causal(), bias=ak.alibi(2)),
             "decode step": validate(one, k, v, mask=ak.causal() & ak.key_padding([128, 31]))}
    picks.update({f"small {name}": validate(q, k, v, mask=m) for name, m in masks.items()})
    long_masks = {"window": ak.sliding_window(64), "longformer": ak.sliding_window(64) | ak.global_tokens([0]),
                  "documents": ak.causal() & ak.document(torch.arange(4096) // 512)}
    picks.update({f"long {name}": validate(big, big, big, mask=m) for name, m in long_masks.items()})
    got = {name: _dispatch.choose(call, "auto").name for name, call in picks.items()}
    want = {"none": "sdpa", "causal": "sdpa", "alibi": "triton", "decode step": "sdpa"}
    want.update({f"small {name}": "sdpa" for name in masks})
    want.update({f"long {name}": "triton" for name in long_masks})
    assert got == want
    reason = _dispatch.auto_reasons(picks["long window"])["sdpa"]
    assert "materializing" in reason and "Triton" in reason and "estimated" in reason
    assert "cost model" in _dispatch.auto_reasons(picks["small window"])["triton"]
    monkeypatch.setattr(_dispatch, "_on_cuda", lambda c: False)  # the CPU: never the interpreter
    assert all(_dispatch.choose(call, "auto").name != "triton" for call in picks.values())


def test_more_sequences_and_heads_than_a_grid_column_holds_are_refused():
    q = torch.randn(1, ak_triton.MAX_BH + 1, 1, 16)  # B * Hq one past CUDA's gridDim.y
    assert "split the batch" in ak_triton.why_not(q, q, q, None, None, 0.0)
    assert ak_triton.why_not(q[:, :-1], q[:, :-1], q[:, :-1], None, None, 0.0) is None


def test_auto_never_picks_the_interpreter_and_explicit_impl_says_why():
    from attnkit import _dispatch
    from attnkit._validate import validate
    q = k = v = torch.randn(1, 2, 20, 16)
    for mask in (None, ak.causal(), ak.sliding_window(3) | ak.global_tokens([0])):
        call = validate(q, k, v, mask=mask)
        assert _dispatch.BACKENDS["triton"].why_not(call) is None  # it can run here (the interpreter) ...
        assert _dispatch.choose(call, "auto").name != "triton"  # ... but auto does not pick it on the CPU
    with pytest.raises(ValueError, match="D == Dv"):
        ak.attention(q, k, torch.randn(1, 2, 20, 8), impl="triton")
    with pytest.raises(ValueError, match="ALiBi only"):
        ak.attention(q, k, v, bias=ak.DenseBias(torch.zeros(20, 20)), impl="triton")
    with pytest.raises(ValueError, match="bfloat16 in Triton's interpreter"):
        ak.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), impl="triton")


def test_attnkit_works_without_triton():
    code = """
import sys
sys.modules["triton"] = None  # import triton raises ImportError
import torch, attnkit as ak
q = k = v = torch.randn(1, 2, 30, 16)
out = ak.attention(q, k, v, mask=ak.causal())
try:
    ak.attention(q, k, v, impl="triton")
except ValueError as e:
    print("REFUSED:", e)
print("OK", tuple(out.shape))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "triton is not installed" in r.stdout and "OK (1, 2, 30, 16)" in r.stdout


# The Schedule switches on the GPU (issue 15: off in the table until a GPU run shows them right and
# faster); each alone and all at once, at the GPU's default blocks.
GPU_SCHEDULES = {"shipped": None, "atomic-dq": dict(dq="atomic"), "fused-delta": dict(delta="fused"),
                 "gqa-group": dict(gqa="group"), "tma": dict(tma=True), "warp-specialize": dict(warp_specialize=True),
                 "persistent": dict(persistent=2),
                 "all": dict(dq="atomic", gqa="group", tma=True, warp_specialize=True, persistent=1)}


# the shipped schedule in every dtype; each switch in bfloat16 (the tuned dtype); all of them in float16 too
GPU_RUNS = ([(dtype, "shipped") for dtype in (torch.bfloat16, torch.float16, torch.float32)]
            + [(torch.bfloat16, name) for name in GPU_SCHEDULES if name != "shipped"] + [(torch.float16, "all")])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,schedule", [pytest.param(d, s, id=f"{d}-{s}") for d, s in GPU_RUNS])
def test_case_table_on_the_gpu(dtype, schedule):
    """The shared case table on CUDA (tests/test_backends.py gives CPU tensors, which the GPU
    kernels refuse): forward and backward against the float64 reference, under the contract,
    with the shipped schedule and with each switch of ``configs.Schedule``."""
    from _numerics import check_backend
    from cases import CASES

    from attnkit.ops.triton.configs import Schedule
    switches = GPU_SCHEDULES[schedule]
    chosen = None if switches is None else Schedule(**switches)
    ran = 0
    for case in CASES:
        q, k, v = (t.cuda() for t in case.inputs(seed=1))
        mask, bias = case.make_mask(), case.make_bias()
        if ak_triton.why_not(q.to(dtype), k.to(dtype), v.to(dtype), mask, bias, 0.0) is not None:
            continue

        def run(q, k, v, mask=mask, bias=bias, case=case):
            return triton_attention(q, k, v, mask=mask, bias=bias, scale=case.D ** -0.5, schedule=chosen)
        check_backend(run, q, k, v, mask, bias, case.D ** -0.5, dtype)
        ran += 1
    assert ran >= len(CASES) - 3, f"only {ran} of {len(CASES)} cases ran"  # dense-dv, float-bias are refused


def test_key_lengths_changed_in_place_are_read_by_the_next_call():
    """The lengths are not in the plan (the kernels read them per call): changing them in place
    keeps the plan and changes the answer."""
    from attnkit.ops.block_plan import cached_plan
    lengths = torch.tensor([30, 12])
    mask = ak.key_padding(lengths) & ak.causal()
    first = cached_plan(mask, 30, 30, 16, 16, "cpu")
    assert cached_plan(mask, 30, 30, 16, 16, "cpu") is first  # built once
    assert cached_plan(mask, 30, 31, 16, 16, "cpu") is not first  # other sizes, other plan
    q = k = v = torch.randn(2, 1, 30, 16)
    before = triton_attention(q, k, v, mask=mask)[0]
    lengths[1] = 2  # changed in place
    assert cached_plan(mask, 30, 30, 16, 16, "cpu") is first
    got = triton_attention(q, k, v, mask=mask)[0]
    assert torch.allclose(got, ak.attention(q, k, v, mask=mask, impl="reference"), atol=1e-5)
    assert not torch.allclose(got[1], before[1], atol=1e-3)


def test_a_plan_or_block_size_that_does_not_fit_is_refused():
    q = k = v = torch.randn(1, 1, 40, 16)
    plan = make_plan(ak.causal(), 20, 20, 16, 16, "cpu")
    with pytest.raises(ValueError, match=r"built for mask causal\(\) at \(Nq, Nk\) = \(20, 20\)"):
        triton_attention(q, k, v, mask=plan.mask, plan=plan)  # other sizes
    plan = make_plan(ak.causal(), 40, 40, 16, 16, "cpu")
    with pytest.raises(ValueError, match="this call has mask None"):
        triton_attention(q, k, v, plan=plan)  # other mask
    with pytest.raises(ValueError, match="give them to make_plan"):
        triton_attention(q, k, v, mask=plan.mask, plan=plan, block_m=32)
    for bad in (8, 24):
        with pytest.raises(ValueError, match=f"block_m={bad}: expected a power of two >= 16"):
            triton_attention(q, k, v, block_m=bad)
