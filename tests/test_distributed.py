"""Acceptance tests of context-parallel attention (issue 18), the functional API.

``context_parallel_attention`` on P gloo processes, each holding its shard of one sequence, must equal
single-process ``ak.attention(..., impl="reference")`` forward (out, lse) and backward (dq, dk, dv,
through out and lse) for any mask, layout and schedule (the numerics contract of ``_numerics``: in
float64 that is 1e-10), send only the key blocks a mask needs (a sliding window's traffic does not
grow with N), and fail loudly instead of hanging when a peer stalls, raises, dies or calls with
other arguments.

Spawning costs seconds per process, so each spawn batches many cases: one of 4 processes runs the
``core`` cases of the table on P=4 (the default group) and the others on P=2 (two subgroups of 2,
which also exercises ``group=``), the schedule-cache, traffic and argument checks; a slow one runs
the complement (the other cases on P=4, the core ones on P=2); one of 3 processes runs the
failures. Ranks return numbers; the parent compares them and names the case.
"""

from __future__ import annotations

import math
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist

import attnkit as ak
from attnkit.distributed import CommStats, ContextParallelError, context_parallel_attention, shard
from attnkit.ops.reference import reference_attention
from _dist import run_ranks
from _numerics import assert_close_to_oracle

B, HQ, D = 2, 4, 16
NAMES = ("out", "lse", "dq", "dk", "dv")
MASKS = ("none", "causal", "window", "causal&window", "window|global", "causal&(window|global)",
         "window|global per batch", "(window|global)&key_padding", "causal&~global", "document",
         "causal&key_padding", "dilated", "dilated_per_head", "empty_rows", "dense")
LAYOUTS = ("contiguous", "zigzag", "striped")


# ---- the table of cases (built alike in the parent and in every rank) ----

def _table() -> list[dict]:
    """Every mask on every layout (float64), plus ring schedules, softcap / scale, fp32 and bf16.

    N cycles through sizes divisible by neither P nor 2P (53, 41, 77, 130, 99) and by both (64);
    key_block through 64 (whole shards at these sizes), 8 and 5 (partial sends); Hkv through 2
    (GQA), 1 (MQA), 4; every third case has ALiBi; half the cases backpropagate through lse.
    ``core`` cases (each mask on one layout, each layout with several masks, the rest) run on P=4 and
    the others on P=2 in the quick spawn; the slow one swaps them, so every case runs on both.
    """
    sizes, blocks, hkvs = (53, 64, 41, 77, 130, 99, 66), (64, 8, 5), (2, 1, 4)
    cases, i = [], 0
    for m, mask in enumerate(MASKS):
        for j, layout in enumerate(LAYOUTS):
            cases.append(dict(name=f"{mask}/{layout}", core=(m + j) % 3 == 0, mask=mask, layout=layout,
                              N=sizes[i % len(sizes)],
                              key_block=blocks[i % 3], hkv=hkvs[(i // 3) % 3], bias="alibi" if i % 3 == 1 else None,
                              lse_grad=i % 2 == 0, schedule="mask", dtype=torch.float64, seed=i))
            if mask == "dense":  # auto picks tiled, whose plan for a region of a dense mask is slow
                cases[-1]["impl"] = "reference"
            i += 1
    for j, (mask, layout) in enumerate((("causal", "contiguous"), ("window", "zigzag"), ("empty_rows", "striped"),
                                        ("none", "zigzag"))):
        cases.append(dict(name=f"{mask}/{layout}/ring", core=True, mask=mask, layout=layout, N=(53, 64, 41, 70)[j],
                          key_block=64, hkv=2, bias="alibi" if j == 1 else None, lse_grad=j % 2 == 0,
                          schedule="ring", dtype=torch.float64, seed=100 + j))
    extra = dict(core=True, key_block=8, hkv=2, lse_grad=True, schedule="mask", seed=200)
    cases += [
        dict(extra, name="dense tensors (bool mask, float bias)/zigzag", mask="dense", layout="zigzag", N=45,
             bias="tensor", dtype=torch.float64, mask_as_tensor=True, impl="reference"),
        dict(extra, name="causal&window softcap+scale/contiguous", mask="causal&window", layout="contiguous",
             N=61, bias="alibi", dtype=torch.float64, softcap=5.0, scale=0.4),
        dict(extra, name="causal&window alibi fp32/zigzag", mask="causal&window", layout="zigzag", N=75,
             bias="alibi", dtype=torch.float32),
        dict(extra, name="causal GQA bf16/striped", mask="causal", layout="striped", N=67, bias=None,
             dtype=torch.bfloat16),
    ]
    return cases


def _cache_cases() -> list[dict]:
    """Masks of one structure and N but other values, in a row: a schedule cached for the first
    (``context_parallel._schedule``) must not serve the second. With lengths 10 only the first
    keys travel; with 40 nearly all of them must."""
    base = dict(layout="contiguous", N=48, key_block=8, hkv=2, bias=None, lse_grad=True, schedule="mask",
                dtype=torch.float64, seed=300)
    return [dict(base, name=f"{mask} after the others/contiguous", mask=mask)
            for mask in ("causal&key_padding 10", "causal&key_padding 40", "document 2", "document 1",
                         "window|global 1", "window|global 30")]


def _mask(name: str, N: int, g: torch.Generator) -> ak.Mask | None:
    """The whole (N, N) problem's mask (batch B, Hq heads) named in MASKS."""
    if name == "none":
        return None
    return {
        "causal": lambda: ak.causal(),
        "window": lambda: ak.sliding_window(5, 3),
        "causal&window": lambda: ak.causal() & ak.sliding_window(7),
        "window|global": lambda: ak.sliding_window(4) | ak.global_tokens([0, N // 2 + 1]),
        "causal&(window|global)": lambda: ak.causal() & (ak.sliding_window(4) | ak.global_tokens([0, N // 2 + 1])),
        "window|global per batch": lambda: ak.sliding_window(3) | ak.global_tokens(_global_flags(N)),
        "(window|global)&key_padding": lambda: ((ak.sliding_window(3) | ak.global_tokens([1, N - 2]))
                                                & ak.key_padding(torch.tensor([N, N // 2]))),
        # global rows see nothing (and no row sees a global key)
        "causal&~global": lambda: ak.causal() & ~ak.global_tokens([2, N - 4]),
        "document": lambda: ak.document([0] * (N // 3) + [1] * (N // 2) + [2] * (N - N // 3 - N // 2)),
        "causal&key_padding": lambda: ak.causal() & ak.key_padding(torch.tensor([N - 5, N // 2])),
        "dilated": lambda: ak.sliding_window(3, dilation=2),
        "dilated_per_head": lambda: ak.causal() & ak.sliding_window(4, 0, dilation=(1, 2, 3, 5)),
        # batch element 0 sees no key at all: out 0, lse -inf, gradients 0, never NaN
        "empty_rows": lambda: ak.causal() & ak.key_padding(torch.tensor([0, N - 3])),
        "dense": lambda: ak.dense_mask(_dense_bool(N, g)),
        "causal&key_padding 10": lambda: ak.causal() & ak.key_padding(torch.tensor([10, 10])),
        "causal&key_padding 40": lambda: ak.causal() & ak.key_padding(torch.tensor([40, 40])),
        "document 2": lambda: ak.document([0] * (N // 2) + [1] * (N - N // 2)),
        "document 1": lambda: ak.document([0] * N),
        "window|global 1": lambda: ak.sliding_window(2) | ak.global_tokens([1]),
        "window|global 30": lambda: ak.sliding_window(2) | ak.global_tokens([30]),
    }[name]()


def _global_flags(N: int) -> torch.Tensor:
    """(B, N) bool: other global positions in each batch element."""
    flags = torch.zeros(B, N, dtype=torch.bool)
    flags[0, [0, N // 3]] = True
    flags[1, [N // 2, N - 1]] = True
    return flags


def _dense_bool(N: int, g: torch.Generator) -> torch.Tensor:
    """(B, 1, N, N) random bool mask with some rows seeing nothing."""
    m = torch.rand(B, 1, N, N, generator=g) < 0.3
    m[:, :, 3] = False
    m[1, :, N // 2:] = False
    return m


def _bias(kind: str | None, N: int, g: torch.Generator) -> ak.Bias | None:
    if kind == "alibi":
        return ak.alibi(HQ)
    if kind == "tensor":
        return ak.DenseBias(torch.randn(1, HQ, N, N, generator=g, dtype=torch.float64))
    return None


def _inputs(case: dict) -> dict:
    """The whole problem of a case: q, k, v, dout, dlse (float64), mask, bias."""
    g = torch.Generator().manual_seed(case["seed"])
    N, hkv = case["N"], case["hkv"]
    t = dict(q=torch.randn(B, HQ, N, D, generator=g, dtype=torch.float64),
             k=torch.randn(B, hkv, N, D, generator=g, dtype=torch.float64),
             v=torch.randn(B, hkv, N, D, generator=g, dtype=torch.float64),
             dout=torch.randn(B, HQ, N, D, generator=g, dtype=torch.float64),
             dlse=torch.randn(B, HQ, N, generator=g, dtype=torch.float64))
    t["mask"], t["bias"] = _mask(case["mask"], N, g), _bias(case["bias"], N, g)
    return t


def _loss(out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor, case: dict) -> torch.Tensor:
    """<out, dout> (+ <lse, dlse> over the rows that see a key, when the case backpropagates through lse)."""
    loss = (out.double() * dout).sum()
    if case["lse_grad"]:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0).double() * dlse).sum()
    return loss


def _whole(case: dict, t: dict, dtype: torch.dtype, oracle: bool) -> list[torch.Tensor]:
    """[out, lse, dq, dk, dv] on the whole sequence: the oracle (``ak.attention(impl="reference")``
    in float64) or the contract's naive baseline (the reference formula in ``dtype``, no upcast)."""
    leaves = [t[n].to(dtype).requires_grad_() for n in ("q", "k", "v")]
    scale, softcap = case.get("scale"), case.get("softcap")
    if oracle:
        out, lse = ak.attention(*leaves, mask=t["mask"], bias=t["bias"], scale=scale, softcap=softcap,
                                impl="reference", return_lse=True)
    else:
        out, lse = reference_attention(*leaves, mask=t["mask"], bias=t["bias"], scale=scale or D ** -0.5,
                                       softcap=softcap, upcast=False)
    grads = torch.autograd.grad(_loss(out, lse, t["dout"], t["dlse"], case), leaves)
    return [x.detach().double() for x in (out, lse, *grads)]


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| (NaN if got has a NaN), over the entries where want is finite."""
    fin = torch.isfinite(want)
    if torch.isnan(got).any():
        return math.nan
    return (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0


def _run_case(case: dict, rank: int, world: int, group) -> dict:
    """This rank's errors for one case: {name: (max error of its shard, naive error of the whole)}."""
    t, dtype, layout = _inputs(case), case["dtype"], case["layout"]
    want = _whole(case, t, torch.float64, oracle=True)
    naive = want if dtype == torch.float64 else _whole(case, t, dtype, oracle=False)
    leaves = [shard(t[n], rank, world, layout=layout).to(dtype).requires_grad_() for n in ("q", "k", "v")]
    mask, bias = t["mask"], t["bias"]
    if case.get("mask_as_tensor"):  # the raw tensors, as a user would pass them
        mask, bias = mask.tensor, bias.tensor
    out, lse = context_parallel_attention(*leaves, mask=mask, bias=bias, scale=case.get("scale"),
                                          softcap=case.get("softcap"), group=group, layout=layout,
                                          schedule=case["schedule"], key_block=case["key_block"],
                                          impl=case.get("impl", "auto"), return_lse=True, timeout_s=30)
    dout, dlse = shard(t["dout"], rank, world, layout=layout), shard(t["dlse"], rank, world, dim=-1, layout=layout)
    grads = torch.autograd.grad(_loss(out, lse, dout, dlse, case), leaves)
    got = [x.detach().double() for x in (out, lse, *grads)]
    res = {}
    for name, g_, w, nv in zip(NAMES, got, want, naive):
        res[name] = (_err(g_, shard(w, rank, world, dim=-1 if name == "lse" else -2, layout=layout)), _err(nv, w))
    lse_want = shard(want[1], rank, world, dim=-1, layout=layout)
    res["lse -inf rows"] = bool(torch.equal(torch.isneginf(got[1]), torch.isneginf(lse_want)))
    res["dtype"] = str(out.dtype)
    return res


def _run_table(cases: list[dict], rank: int, world: int, group) -> dict:
    """{case name: errors}, or {case name: "raised ..."} for the first case that raised (then stop:
    the other ranks will have timed out on it too)."""
    results = {}
    for case in cases:
        try:
            results[case["name"]] = _run_case(case, rank, world, group)
        except Exception as err:  # noqa: BLE001 - reported by the parent with the case's name
            results[case["name"]] = f"raised {type(err).__name__}: {err}"
            break
    return results


def _check_table(per_rank: list[dict], world: int, cases: list[dict]) -> None:
    """Hold every case to the numerics contract; one message listing every failing case."""
    failures = []
    for case in cases:
        rows = [r[case["name"]] for r in per_rank if case["name"] in r]
        label = f"P={world}, case {case['name']!r} (N={case['N']}, key_block={case['key_block']})"
        if len(rows) < len(per_rank) or any(isinstance(r, str) for r in rows):
            shown = [r if isinstance(r, str) else "ok" for r in rows] or "not run (an earlier case raised)"
            failures.append(f"{label}: {shown}")
            continue
        if not all(r["lse -inf rows"] for r in rows):
            failures.append(f"{label}: lse is -inf on other rows than the oracle's")
        if any(r["dtype"] != str(case["dtype"]) for r in rows):
            failures.append(f"{label}: out dtype {rows[0]['dtype']}, inputs {case['dtype']}")
        for name in NAMES:
            err = max(r[name][0] for r in rows) if not any(math.isnan(r[name][0]) for r in rows) else math.nan
            naive = max(r[name][1] for r in rows)
            try:  # the contract's own check, on the numbers: max|got - oracle| <= factor * naive + floor
                assert_close_to_oracle(name, torch.tensor([err]), torch.zeros(1), torch.tensor([naive]),
                                       case["dtype"], factor=2.0 if name in ("out", "lse") else 3.0)
            except AssertionError as e:
                failures.append(f"{label}: {e}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)


# ---- traffic: what each rank sends (forward only) ----

WINDOW, KEY_BLOCK, HKV_BYTES = 20, 16, 1
_REFERENCE: dict = {}  # (mask name, N) -> whole-sequence reference output, per rank process


def _traffic(rank: int, world: int, group) -> dict:
    """Bytes each rank sends for window masks at N=256 and 1024 (mask-aware and ring), and for a
    causal mask, contiguous layout; each output is checked against the reference too."""
    res = {}
    masks = {"causal&window": ak.causal() & ak.sliding_window(WINDOW, 0), "window": ak.sliding_window(WINDOW),
             "causal": ak.causal()}
    for mask_name, mask in masks.items():
        for N, schedule in ((256, "mask"), (1024, "mask"), (1024, "ring")):
            if mask_name == "causal" and N == 1024:
                continue
            g = torch.Generator().manual_seed(N)
            q = torch.randn(B, 2, N, D, generator=g, dtype=torch.float64)
            k, v = (torch.randn(B, HKV_BYTES, N, D, generator=g, dtype=torch.float64) for _ in range(2))
            if (mask_name, N) not in _REFERENCE:  # the P=4 and P=2 calls and both schedules share it
                _REFERENCE[(mask_name, N)] = ak.attention(q, k, v, mask=mask, impl="reference")
            want = _REFERENCE[(mask_name, N)]
            stats = CommStats()
            out = context_parallel_attention(*(shard(x, rank, world, layout="contiguous") for x in (q, k, v)),
                                             mask=mask, group=group, layout="contiguous", schedule=schedule,
                                             key_block=KEY_BLOCK, stats=stats, timeout_s=30)
            err = (out - shard(want, rank, world, layout="contiguous")).abs().max().item()
            res[(mask_name, N, schedule)] = (stats.bytes_sent, dict(stats.sent_to), err)
    return res


def _group_rank(rank: int, group) -> int:
    return rank if group is None else dist.get_global_rank(group, dist.get_rank(group))


# ---- argument checks: every rank raises the same ValueError ----

def _mismatch_calls(rank: int, world: int) -> dict:
    """(type name, message) of each call that must raise, on every rank, in the default group."""
    N = 40
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, HQ, N, D, generator=g, dtype=torch.float64)
    q = shard(x, rank, world, layout="contiguous")

    def call(q_, k_=None, **kw):
        kw = dict(dict(layout="contiguous", timeout_s=10), **kw)
        try:
            context_parallel_attention(q_, q_ if k_ is None else k_, q_ if k_ is None else k_, **kw)
        except Exception as err:  # noqa: BLE001 - the parent checks the type
            return type(err).__name__, str(err)
        return "no error", ""

    other = rank == 1
    n = N // world  # contiguous shares of N = 40: [10, 10, 10, 10]; give ranks 0 and 1 [11, 9] instead
    wrong = {0: x[:, :, :n + 1], 1: x[:, :, n + 1:2 * n]}.get(rank, q)
    return {
        "head dim D": call(q[..., :8] if other else q),
        "query heads Hq": call(q[:, :2] if rank == 2 else q, q[:, :2]),
        "mask (window 4 vs 5)": call(q, mask=ak.sliding_window(5 if rank == world - 1 else 4)),
        "mask (key_padding lengths)": call(q, mask=ak.key_padding(torch.tensor([N, 30 if other else 31]))),
        "bias": call(q, bias=ak.alibi(HQ) if other else None),
        "shard size": call(wrong),
        "layout": call(q, layout="zig"),
        "schedule": call(q, schedule="halo"),
    }


def _twice(cases: list[dict]) -> list[dict]:
    """Each case twice in a row, so that each pair of ranks (every other case) runs all of them in order."""
    return [c for c in cases for _ in range(2)]


def _pairs() -> list:
    """Groups {0, 1} and {2, 3} (every rank creates both, in order) and this rank's."""
    return [dist.new_group([0, 1]), dist.new_group([2, 3])]


def _run_both(rank: int, world: int, p4: list[dict], p2: list[dict], mine) -> dict:
    """``p4`` on the 4 ranks, then ``p2`` on the two pairs, each pair taking every other case."""
    return {"P4": _run_table(p4, rank, world, None),
            "P2": _run_table(p2[rank // 2::2], dist.get_rank(mine), 2, mine)}


def _check_both(per_rank: list[dict], p4: list[dict], p2: list[dict]) -> None:
    _check_table([r["P4"] for r in per_rank], 4, p4)
    _check_table([r["P2"] for r in per_rank[:2]], 2, p2[0::2])
    _check_table([r["P2"] for r in per_rank[2:]], 2, p2[1::2])


def _core(core: bool) -> list[dict]:
    return [c for c in _table() if c["core"] == core]


def _healthy_rank(rank: int, world: int) -> dict:
    """Everything that leaves the process group usable, in one spawn of 4 processes."""
    mine = _pairs()[rank // 2]
    res = {"table": _run_both(rank, world, _core(True), _core(False), mine),
           "cache": _run_both(rank, world, _cache_cases(), _twice(_cache_cases()), mine)}
    res["traffic P4"] = _traffic(rank, world, None)
    res["traffic P2"] = _traffic(dist.get_rank(mine), 2, mine)
    res["global rank via group"] = _group_rank(rank, mine)
    res["mismatch"] = _mismatch_calls(rank, world)
    return res


@pytest.fixture(scope="module")
def healthy() -> list[dict]:
    return run_ranks(_healthy_rank, 4, timeout_s=300, threads=1)


def test_matches_single_process_with_4_and_2_ranks(healthy):
    """The core cases on 4 ranks, the others on 2 (pairs of ranks in subgroups, ``group=``)."""
    _check_both([r["table"] for r in healthy], _core(True), _core(False))
    assert [r["global rank via group"] for r in healthy] == [0, 1, 2, 3]


def test_schedule_cache_tells_masks_of_one_structure_apart(healthy):
    _check_both([r["cache"] for r in healthy], _cache_cases(), _twice(_cache_cases()))


def _other_rank(rank: int, world: int) -> dict:
    return _run_both(rank, world, _core(False), _core(True), _pairs()[rank // 2])


@pytest.mark.slow
def test_matches_single_process_other_cases():
    """The complement: the other cases on 4 ranks, the core ones on 2."""
    _check_both(run_ranks(_other_rank, 4, timeout_s=300, threads=1), _core(False), _core(True))


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("mask_name", ["causal&window", "window"])
def test_window_traffic_does_not_grow_with_N(healthy, world, mask_name):
    """A window of W sends each neighbour at most W + 2 key_block keys (k and v), the same bytes at
    N=256 as at N=1024, nothing to other ranks, and a fraction of what the ring sends."""
    ranks = healthy[:world] if world == 4 else healthy[:2]
    per_key = B * HKV_BYTES * D * 2 * 8  # k and v, float64
    bound = (WINDOW + 2 * KEY_BLOCK) * per_key
    for r, res in enumerate(ranks):
        t = res[f"traffic P{world}"]
        for key, (_, _, err) in t.items():
            assert err < 1e-10, f"P={world} rank {r} {key}: output differs from the reference by {err:.3g}"
        small, _, _ = t[(mask_name, 256, "mask")]
        big, sent_to, _ = t[(mask_name, 1024, "mask")]
        ring, _, _ = t[(mask_name, 1024, "ring")]
        assert small == big, f"P={world} rank {r} {mask_name}: sends {small} bytes at N=256 but {big} at N=1024"
        neighbours = {r + 1} if mask_name.startswith("causal") else {r - 1, r + 1}
        assert {dst for dst, n in sent_to.items() if n} == neighbours & set(range(world)), (
            f"P={world} rank {r} {mask_name}: sends to {sent_to}, expected its neighbours only")
        for dst, n in sent_to.items():
            assert n <= bound, (f"P={world} rank {r} {mask_name}: sends {n} bytes to rank {dst}; a window of "
                                f"{WINDOW} with key_block {KEY_BLOCK} needs at most {bound}")
        assert 8 * big <= ring, f"P={world} rank {r}: window sends {big} bytes, ring {ring}"


@pytest.mark.parametrize("world", [2, 4])
def test_causal_contiguous_never_sends_to_earlier_ranks(healthy, world):
    for r, res in enumerate(healthy[:world]):
        _, sent_to, err = res[f"traffic P{world}"][("causal", 256, "mask")]
        assert err < 1e-10, f"P={world} rank {r}: causal output differs from the reference by {err:.3g}"
        assert all(sent_to.get(dst, 0) == 0 for dst in range(r)), f"P={world} rank {r} sends backwards: {sent_to}"
        assert all(sent_to.get(dst, 0) > 0 for dst in range(r + 1, world)), (
            f"P={world} rank {r} sends nothing to a later rank that needs its keys: {sent_to}")


@pytest.mark.parametrize("what, field", [("head dim D", "head dim D"), ("query heads Hq", "query heads Hq"),
                                         ("mask (window 4 vs 5)", "mask"), ("mask (key_padding lengths)", "mask"),
                                         ("bias", "bias")])
def test_calls_that_differ_across_ranks_raise_valueerror_everywhere(healthy, what, field):
    for r, res in enumerate(healthy):
        kind, msg = res["mismatch"][what]
        assert kind == "ValueError" and field in msg, f"{what}: rank {r} got {kind}: {msg}"
        assert all(f"rank {i}" in msg for i in range(4)), f"{what}: rank {r}'s message lacks a rank's value: {msg}"
    if field == "head dim D":
        assert "rank 1: 8" in healthy[0]["mismatch"][what][1]


def test_wrong_shard_size_and_bad_names_raise_valueerror(healthy):
    for r, res in enumerate(healthy):
        kind, msg = res["mismatch"]["shard size"]
        assert kind == "ValueError" and "shard(" in msg and "[11, 9, 10, 10]" in msg, f"rank {r}: {kind}: {msg}"
        for name, bad in (("layout", "zig"), ("schedule", "halo")):
            kind, msg = res["mismatch"][name]
            assert kind == "ValueError" and repr(bad) in msg, f"{name}={bad!r}: rank {r} got {kind}: {msg}"


def test_uninitialized_process_group_raises():
    assert not dist.is_initialized()
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ContextParallelError, match="init_process_group"):
        context_parallel_attention(q, q, q)


# ---- failures: a peer that stalls, dies or raised; 3 processes ----

def _answer_and_die(result) -> None:
    """Hand ``result`` to run_ranks, then die at once (os._exit: no clean-up, sockets just close).
    run_ranks waits for an answer from every rank, so a dying rank answers first, through the
    queue its ``_child`` holds."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "_child":
        frame = frame.f_back
    if frame is not None:
        queue = frame.f_locals["out"]
        queue.put((frame.f_locals["rank"], "ok", result))
        queue.close()
        queue.join_thread()
    os._exit(1)


def _timed(fn) -> tuple[str, str, float]:
    t0 = time.monotonic()
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the parent checks the type
        return type(err).__name__, str(err), time.monotonic() - t0
    return "no error", "", time.monotonic() - t0


def _failing_rank(rank: int, world: int) -> dict:
    """Four failures in a row, each on a group of its own (a failure leaves its group unusable):

    1. rank 1 never calls on group {0, 1} (it waits elsewhere): rank 0 times out in the first
       exchange (every rank's shapes and mask);
    2. ranks 0 and 1 run a forward on another group {0, 1}; rank 1 skips the backward: rank 0 times
       out waiting for its keys;
    3. all three run a forward, rank 2 dies (os._exit) before the backward: ranks 0 and 1 raise;
    4. rank 1 stops before calling on a third group {0, 1} (returns, and its process ends as after a
       raise): rank 0 raises.
    """
    pairs = [dist.new_group([0, 1]) for _ in range(3)]  # every rank creates each, in order
    x = torch.randn(B, HQ, 48, D, generator=torch.Generator().manual_seed(0))
    res = {}
    if rank == 0:
        q = shard(x, 0, 2, layout="contiguous")
        res["stall"] = _timed(lambda: context_parallel_attention(q, q, q, group=pairs[0], layout="contiguous",
                                                                 timeout_s=3))
    dist.barrier()  # rank 1 waits here, never in context_parallel_attention on pairs[0]
    if rank < 2:
        q = shard(x, rank, 2).requires_grad_()
        out = context_parallel_attention(q, q, q, mask=ak.causal(), group=pairs[1], timeout_s=2)
        if rank == 0:
            res["stall in backward"] = _timed(lambda: out.sum().backward())
    dist.barrier()  # rank 1 waits here, not in the backward
    q = shard(x, rank, world).requires_grad_()
    out = context_parallel_attention(q, q, q, mask=ak.causal(), timeout_s=5)
    if rank == 2:
        _answer_and_die({"died": True})
    res["dead peer"] = _timed(lambda: out.sum().backward())
    if rank == 1:  # gives up before calling on pairs[2]
        return res
    q = shard(x, 0, 2, layout="contiguous")
    res["raised peer"] = _timed(lambda: context_parallel_attention(q, q, q, group=pairs[2], layout="contiguous",
                                                                   timeout_s=3))
    return res


@pytest.fixture(scope="module")
def failing() -> list:
    return run_ranks(_failing_rank, 3, timeout_s=120, threads=1, allow_errors=True)


def test_stalled_peer_times_out(failing):
    kind, msg, elapsed = failing[0]["stall"]
    assert kind == "ContextParallelError", f"rank 0 got {kind}: {msg}"
    assert 2.5 <= elapsed <= 10, f"rank 0 raised after {elapsed:.1f} s with timeout_s=3"
    assert "rank 0" in msg and "peer" in msg and "3 s" in msg, msg


def test_stalled_peer_is_named(failing):
    for step in ("stall", "raised peer"):
        msg = failing[0][step][1]
        assert "peer 1" in msg or "rank 1" in msg, f"{step}: the message does not name rank 1: {msg}"


def test_peer_that_skips_the_backward_times_out(failing):
    kind, msg, elapsed = failing[0]["stall in backward"]
    assert kind == "ContextParallelError", f"rank 0 got {kind}: {msg}"
    assert 1.5 <= elapsed <= 10, f"rank 0 raised after {elapsed:.1f} s with timeout_s=2"
    assert "rank 0" in msg and "peer 1" in msg, f"the message does not name peer 1: {msg}"


def test_dead_peer_makes_the_others_raise(failing):
    assert failing[2] == {"died": True}, failing[2]
    for r in (0, 1):
        kind, msg, elapsed = failing[r]["dead peer"]
        assert kind == "ContextParallelError", f"rank {r} got {kind}: {msg}"
        assert elapsed <= 10, f"rank {r} took {elapsed:.1f} s to notice a dead peer"
        assert f"rank {r}" in msg and "2" in msg.split("peer", 1)[-1][:12], f"the message names no peer 2: {msg}"


def test_peer_that_raised_before_calling(failing):
    kind, msg, elapsed = failing[0]["raised peer"]
    assert kind == "ContextParallelError", f"rank 0 got {kind}: {msg}"
    assert elapsed <= 10, f"rank 0 raised after {elapsed:.1f} s with timeout_s=3"
    assert "rank 0" in msg and "peer" in msg, msg
