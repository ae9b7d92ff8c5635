"""The issue-15 tuning sweep of benchmarks/gpu.py --tune (gpu_tune.py, gpu_tune_report.py), its
compiling ahead in worker processes (gpu_warm.py) and the one-call driver (--issue15,
gpu_issue15.sh), on the CPU: the Triton kernels in the interpreter, nothing timed."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import attnkit as ak  # noqa: E402
from attnkit.ops.triton import configs  # noqa: E402


PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


# -- issue 15: the tuning sweep, its table rows, the one-call driver ---------------------------------

def test_candidates_are_the_sweep_shipped_first_then_by_the_prior(sweep):
    """Every (blocks, warps, stages, switches) of the brief once, the shipped row first and not
    again, rows that fit sm_90's shared memory before the rest, neighbours of the shipped row first."""
    for pass_, D, kind, n in (("fwd", 128, "dense", 4 * 2 * 3 * 2 * 2), ("bwd", 64, "causal", 4 * 2 * 3 * 3 * 2)):
        shipped = configs.lookup(pass_, D, torch.bfloat16, kind)
        cands = sweep.candidates(pass_, shipped, D)
        assert cands[0].shipped and cands[0].config is shipped and not any(c.shipped for c in cands[1:])
        choices = [(c.config.block_m, c.config.block_n, tuple(sorted(c.config.launch.items())), c.config.schedule)
                   for c in cands]
        assert len(set(choices)) == len(choices) == n  # the shipped row is one of the grid's: not timed twice
        keys = [sweep.prior(pass_, c.config, shipped, D) for c in cands[1:]]
        assert keys == sorted(keys)
        fits = [sweep.smem_estimate(pass_, c.config, D) <= sweep.SMEM_BYTES for c in cands[1:]]
        assert fits == sorted(fits, reverse=True)
        first = [sweep.distance(pass_, c.config, shipped) for c in cands[1:] if sweep.smem_estimate(pass_, c.config, D)
                 <= sweep.SMEM_BYTES]
        assert first[0] == 1 and first == sorted(first)
        for c in cands:
            assert set(c.config.launch) == set(configs.KERNELS_OF[pass_])
    bwd = sweep.candidates("bwd", shipped, 64)
    assert {c.config.launch["_bwd_delta"] for c in bwd} == {shipped.launch["_bwd_delta"]}
    assert {c.config.schedule.spec() for c in bwd} == {"", "tma=True", "delta=fused", "delta=fused,tma=True",
                                                       "dq=atomic", "dq=atomic,tma=True"}
    fwd_shipped = configs.lookup("fwd", 128, torch.bfloat16, "dense")
    fwd = sweep.candidates("fwd", fwd_shipped, 128)
    over = {c.label().rsplit(" ", 1)[0] for c in fwd[-16:]}  # 272 and 288 KiB estimated at D = 128: last
    assert over == {"128x128 4w 4s", "128x128 8w 4s", "64x128 4w 4s", "64x128 8w 4s"}
    assert all(sweep.smem_estimate("fwd", c.config, 128) <= sweep.SMEM_BYTES for c in fwd[:-16])
    # the forward's persistent grid (2 programs per SM) is swept too, the shipped row's neighbour among the first
    assert {c.config.schedule.spec() for c in fwd} == {"", "tma=True", "persistent=2", "tma=True,persistent=2"}
    neighbours = [c for c in fwd[1:] if sweep.distance("fwd", c.config, fwd_shipped) == 1]
    alone = replace(fwd_shipped.schedule, persistent=2)
    assert [c.config.schedule for c in neighbours].count(alone) == 1 and fwd.index(neighbours[-1]) == len(neighbours)


def test_table_rows_puts_rows_in_place_and_restores_the_table_even_on_error(peers):
    table, before = configs.TABLE, dict(configs.TABLE)
    new = configs.Config(64, 32, {"_fwd": (4, 3)}, source="test")
    over = configs.Config(32, 32, {"_fwd": (4, 2)}, source="test")
    with pytest.raises(RuntimeError, match="inside"):
        with peers.table_rows({("fwd", "half", 64, "causal"): new, ("fwd", "half", 64, "any"): over}):
            assert configs.lookup("fwd", 64, torch.bfloat16, "causal") is new
            assert configs.lookup("fwd", 64, torch.bfloat16, "dense") is over
            raise RuntimeError("inside")
    assert configs.TABLE is table and configs.TABLE == before
    assert ("fwd", "half", 64, "causal") not in configs.TABLE


def test_reference_dq_rows_is_the_references_gradient(peers):
    g = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(1, 2, 37, 16, generator=g, dtype=torch.float64) for _ in range(4))
    mask = ak.sliding_window(4) | ak.global_tokens([0, 1])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dq = torch.autograd.grad(ak.attention(*leaves, mask=mask, impl="reference"), leaves[0], dout)[0]
    rows = torch.tensor([0, 5, 17, 36])
    got = peers.reference_dq_rows(q, k, v, mask, rows, dout)
    assert torch.allclose(got.double(), dq[:, :, rows], atol=1e-5)


def test_the_checks_stop_a_wrong_output_or_gradient(sweep):
    """check_candidate on CPU with the reference as the "kernel": right passes; a wrong output, dq
    (on the sampled rows) or dk (against the shipped row's) is refused before timing."""
    case = sweep.TuneInputs("longformer", 40, 16, 2, "cpu", torch.float32)
    shipped, other = (sweep.candidates("bwd", case.shipped["bwd"], 16)[i] for i in (0, 1))

    def ref(q, k, v):
        return lambda: ak.attention(q, k, v, mask=case.mask, impl="reference")
    errs = sweep.check_candidate(shipped, case, ref(case.q, case.k, case.v))
    assert errs["max_err"] < 1e-5 and errs["dq_rows_err"] < 1e-5 and case.shipped_grads is not None
    assert sweep.check_candidate(other, case, ref(case.q, case.k, case.v))["dk_vs_shipped"] < 1e-6
    with pytest.raises(RuntimeError, match="dk_vs_shipped"):  # right output, no gradient for k
        sweep.check_candidate(other, case, ref(case.q, case.k.detach() + 0 * case.k, case.v))
    with pytest.raises(RuntimeError, match="dq_rows_err"):
        sweep.check_candidate(other, case, ref(case.q.detach() + 0 * case.q, case.k, case.v))
    fwd = sweep.candidates("fwd", case.shipped["fwd"], 16)[1]
    with pytest.raises(RuntimeError, match="max_err"):
        sweep.check_candidate(fwd, case, lambda: ref(case.q, case.k, case.v)() + 0.1)


def test_the_sweep_runs_each_candidate_with_its_row_in_the_table(sweep, monkeypatch):
    """tune_case on the CPU (kernels in the interpreter, do_bench stubbed): per pass the shipped row,
    the candidates, the shipped row again and the fastest again; each candidate's launch reaches the
    kernels' launch settings, its schedule the call; the table is as before afterwards."""
    if not configs.interpreting():
        pytest.skip("the CPU run needs Triton's interpreter")
    def bench(fn):  # fwd+bwd (a tuple of gradients) 3 ms, fwd 1 ms; twice that for the shipped rows
        candidate = any(row.source == sweep.CANDIDATE_SOURCE for row in configs.TABLE.values())
        return (3.0 if isinstance(fn(), tuple) else 1.0) * (1 if candidate else 2)
    monkeypatch.setattr(sweep, "_bench", bench)
    monkeypatch.setattr(sweep, "TUNE_FWD_BLOCKS", ((16, 16),))
    monkeypatch.setattr(sweep, "TUNE_FWD_WARPS", (4,))
    monkeypatch.setattr(sweep, "TUNE_FWD_STAGES", (3,))
    monkeypatch.setattr(sweep, "TUNE_TMA", (False,))
    monkeypatch.setattr(sweep, "TUNE_FWD_PERSISTENT", (2,))  # 2 programs per "SM" (3 in the interpreter)
    monkeypatch.setattr(sweep, "TUNE_BWD_BLOCKS", ((16, 32),))
    monkeypatch.setattr(sweep, "TUNE_BWD_WARPS", (2,))
    monkeypatch.setattr(sweep, "TUNE_BWD_STAGES", (1,))
    monkeypatch.setattr(sweep, "TUNE_BWD_SCHEDULES", ({"delta": "fused"},))
    launched, real = [], configs.launch_config
    monkeypatch.setattr(configs, "launch_config", lambda *a: launched.append((a[0], real(*a))) or real(*a))
    before = dict(configs.TABLE)
    rows = sweep.tune_case("causal", 40, 16, 2, "cpu", on_row=lambda r: None, dtype=torch.float16)
    assert configs.TABLE == before
    assert not [r for r in rows if "error" in r], rows
    assert [(r["pass"], r["rank"], r["shipped"], r.get("repeat", False)) for r in rows] == [
        ("fwd", 0, True, False), ("fwd", 1, False, False), ("fwd", 0, True, True), ("fwd", 1, False, True),
        ("bwd", 0, True, False), ("bwd", 1, False, False), ("bwd", 0, True, True), ("bwd", 1, False, True)]
    fwd, bwd = rows[1], rows[5]
    assert (fwd["block_m"], fwd["block_n"], fwd["mask_kind"]) == (16, 16, "causal") and fwd["ms"] == fwd["fwd_ms"]
    assert (fwd["ms"], rows[0]["ms"], bwd["ms"], rows[4]["ms"]) == (1.0, 2.0, 2.0, 4.0)  # bwd: fwd+bwd - fwd
    assert fwd["schedule_run"] == "persistent=2" and bwd["schedule_run"] == "delta=fused"
    assert fwd["warmed"] is False  # no warmer on the CPU: each compiles at its first launch
    assert bwd["dq_rows_err"] < 1e-2 and bwd["dk_vs_shipped"] < 1e-2 and rows[4]["dq_rows_err"] < 1e-2
    assert ("_fwd", {"num_warps": 4, "num_stages": 3}) in launched
    assert ("_bwd_dkdv", {"num_warps": 2, "num_stages": 1}) in launched


def _row(pass_, label, ms, shipped=False, repeat=False, case="dense", D=128, kind="dense", schedule="", bm=128):
    launch = {"_fwd": [8, 3]} if pass_ == "fwd" else {"_bwd_delta": [4, 2], "_bwd_dq": [8, 2], "_bwd_dkdv": [8, 2]}
    row = {"case": case, "N": 16384, "D": D, "H": 16, "dtype": "bfloat16", "mask_kind": kind, "pass": pass_,
           "label": label, "shipped": shipped, "rank": 0 if shipped else 1, "block_m": bm, "block_n": 64,
           "launch": launch, "schedule": schedule, "ms": ms, "max_err": 1e-3}
    return {**row, "repeat": True} if repeat else row


def _sweep_rows():
    """dense fwd: a winner (confirmed; the shipped row compiled ahead, one candidate failed there);
    causal bwd: a winner with delta fused; longformer fwd: within the spread; longformer bwd: its
    fastest not timed again (the run stopped first)."""
    lf = dict(case="longformer", D=64, kind="sparse")
    return [{**_row("fwd", "128x64 8w 2s plain", 2.0, shipped=True), "warmed": True},
            {**_row("fwd", "128x64 8w 3s tma=True", 1.5, schedule="tma=True"), "warmed": False},
            {**_row("fwd", "64x64 8w 2s plain", 9.0), "rank": 2, "warmed": False,
             "error": "failed in warm-up: OutOfResources: shared memory"},
            _row("fwd", "128x64 8w 2s plain", 2.02, shipped=True, repeat=True),
            _row("fwd", "128x64 8w 3s tma=True", 1.6, repeat=True, schedule="tma=True"),
            _row("bwd", "64x128 8w 2s plain", 5.0, shipped=True, case="causal", D=64, kind="causal"),
            _row("bwd", "64x64 8w 2s delta=fused", 4.0, case="causal", D=64, kind="causal", schedule="delta=fused",
                 bm=64),
            _row("bwd", "64x128 8w 2s plain", 5.1, shipped=True, repeat=True, case="causal", D=64, kind="causal"),
            _row("bwd", "64x64 8w 2s delta=fused", 4.2, repeat=True, case="causal", D=64, kind="causal",
                 schedule="delta=fused", bm=64),
            _row("fwd", "128x64 8w 2s plain", 3.0, shipped=True, **lf), _row("fwd", "64x64 4w 2s plain", 2.9, **lf),
            _row("fwd", "128x64 8w 2s plain", 3.1, shipped=True, repeat=True, **lf),
            _row("fwd", "64x64 4w 2s plain", 2.95, repeat=True, **lf),
            _row("bwd", "64x128 8w 2s plain", 6.0, shipped=True, **lf), _row("bwd", "64x64 8w 3s plain", 4.0, **lf),
            _row("bwd", "64x128 8w 2s plain", 6.1, shipped=True, repeat=True, **lf),
            {"case": "longformer", "N": 16384, "D": 64, "H": 16, "pass": "bwd", "label": "(40 not tried)",
             "skipped": 40, "error": "skipped: time limit"}]


def test_a_winner_beats_the_shipped_row_by_more_than_the_spread_twice(verdicts):
    by = verdicts.by_slice(_sweep_rows())
    dense = verdicts.pick_winner(by[("dense", 16384, 128, 16, "fwd")])
    assert dense["wins"] and dense["best_ms"] == 1.6 and dense["shipped_ms"] == pytest.approx(2.01)
    assert dense["spread_ms"] == pytest.approx(0.0201)  # |2.0 - 2.02| is under 1% of 2.01: the floor counts
    assert verdicts.pick_winner(by[("causal", 16384, 64, 16, "bwd")])["wins"]
    lf_fwd = verdicts.pick_winner(by[("longformer", 16384, 64, 16, "fwd")])
    assert not lf_fwd["wins"] and lf_fwd["spread_ms"] == pytest.approx(0.1) and "within the spread" in lf_fwd["why"]
    lf_bwd = verdicts.pick_winner(by[("longformer", 16384, 64, 16, "bwd")])
    assert not lf_bwd["wins"] and "not timed twice" in lf_bwd["why"]


def test_the_winners_table_is_python_that_builds_timed_config_rows(peers, verdicts):
    text = verdicts.tune_table_text(_sweep_rows(), "NVIDIA H200", "2026-11-30")
    rows = {}
    exec(compile(text, "tune_table.py", "exec"), rows)
    rows = rows["ROWS"]
    assert set(rows) == {("fwd", "half", 128, "dense"), ("bwd", "half", 64, "causal")}
    for (pass_, dclass, D, kind), row in rows.items():
        assert isinstance(row, configs.Config) and isinstance(row.schedule, configs.Schedule)
        assert set(row.launch) == set(configs.KERNELS_OF[pass_])
        assert all(isinstance(x, tuple) for x in row.launch.values())
        assert row.source.startswith("timed: NVIDIA H200, 2026-11-30, benchmarks/gpu.py --tune, ")
    dense, causal = rows[("fwd", "half", 128, "dense")], rows[("bwd", "half", 64, "causal")]
    assert (dense.block_m, dense.block_n, dense.launch, dense.schedule) == (128, 64, {"_fwd": (8, 3)},
                                                                             configs.Schedule(tma=True))
    assert dense.source.endswith("1.600 ms vs shipped 2.010 ms")
    assert causal.schedule == configs.Schedule(delta="fused") and causal.block_m == 64
    with peers.table_rows(rows):  # what pasting them does: the lookups find them
        assert configs.lookup("bwd", 64, torch.bfloat16, "causal") == causal
        assert configs.gpu_blocks(128, torch.float16, kind="dense") == (128, 64)
    empty = {}
    exec(verdicts.tune_table_text(_sweep_rows()[:3], "X", "2026-11-30"), empty)
    assert empty["ROWS"] == {}


def test_the_tuning_markdown_ranks_fastest_first_with_the_verdicts(verdicts):
    md = verdicts.tune_markdown(_sweep_rows(), "NVIDIA H200")
    dense = md[md.index("### dense N=16384 D=128 H=16: fwd"):md.index("### causal")]
    assert "**winner**" in dense and "spread 0.020 ms" in dense
    order = [dense.index(s) for s in ("| 1 | 128x64 | 8/3 | tma=True | 1.500 | 1.34 |", "| 1 | 128x64 (again) |",
                                      "| 0 | 128x64 (shipped) | 8/3 | plain | 2.000 |", "OutOfResources")]
    assert order == sorted(order)
    assert "**no winner** (within the spread" in md and "| (40 not tried) |" in md and "skipped: time limit" in md
    assert "dq 8/2 dkdv 8/2" in md
    assert "Compiled ahead in worker processes: 1 of the 3 candidates tried; 1 failed there" in dense
    assert "| 2.000 | 1.00 | max_err 1.0e-03 |  (warmed) |" in dense and dense.count("(warmed)") == 1


def test_the_soft_limit_stops_new_candidates_and_shares_the_time(sweep, monkeypatch):
    """No candidate starts past the slice's deadline (one row counts the rest); the shipped row and
    the fastest are timed again anyway; a broken CUDA context stops every later start."""
    now = [0.0]
    budget = sweep.TuneBudget(["fwd", "bwd"], 9.0, clock=lambda: now[0])  # fwd gets 3 s, bwd the rest
    ran = []

    def run(cand, case, rank, repeat=False):
        ran.append((rank, repeat))
        now[0] += 1.0
        return {"rank": rank, "label": cand.label(), "shipped": cand.shipped, "ms": 10.0 - rank,
                **({"repeat": True} if repeat else {})}
    monkeypatch.setattr(sweep, "run_candidate", run)
    shipped = configs.lookup("fwd", 64, torch.bfloat16)
    case = type("Case", (), {"shipped": {"fwd": shipped, "bwd": configs.lookup("bwd", 64, torch.bfloat16)}, "D": 64,
                             "dev": torch.device("cpu"), "case": "causal", "info": lambda self, p: {"pass": p}})()
    rows = sweep.tune_pass("fwd", case, budget, on_row=lambda r: None)
    n = len(sweep.candidates("fwd", shipped, 64))
    assert ran == [(0, False), (1, False), (2, False), (3, False), (0, True), (3, True)]  # started at 0, 1, 2, 3 s
    assert rows[4] == {"pass": "fwd", "label": f"({n - 4} not tried)", "skipped": n - 4, "error": "skipped: time limit"}
    assert budget.deadline("bwd") == pytest.approx(9.0)  # the slice that ran over leaves nothing extra, but the end
    ran.clear()
    monkeypatch.setattr(sweep, "run_candidate", lambda cand, case, rank, repeat=False: (ran.append(rank), {
        "rank": rank, "label": cand.label(), "shipped": cand.shipped, "error": "RuntimeError: illegal address"})[1])
    monkeypatch.setattr(sweep, "device_ok", lambda dev: False)
    budget = sweep.TuneBudget(["fwd", "fwd"], 100.0, clock=lambda: now[0])
    sweep.tune_pass("fwd", case, budget, on_row=lambda r: None)
    later = sweep.tune_pass("fwd", case, budget, on_row=lambda r: None)
    assert ran == [0] and "the CUDA context broke at causal fwd" in budget.lost
    assert later == [{"pass": "fwd", "label": f"({n} not tried)", "skipped": n,
                      "error": f"skipped: {budget.lost}"}]


def test_the_budget_gives_each_slice_its_share_of_what_is_left(sweep):
    now = [0.0]
    budget = sweep.TuneBudget(["fwd", "bwd", "fwd", "bwd"], 12.0, clock=lambda: now[0])
    assert budget.deadline("fwd") == pytest.approx(2.0)  # 1 of 6 shares
    now[0] = 1.0  # ended a second early: the second goes to the others
    assert budget.deadline("bwd") == pytest.approx(1.0 + 11.0 * 2 / 5)
    now[0] = 20.0  # past the end: no time
    assert budget.deadline("fwd") == 20.0 and budget.deadline("bwd") == 20.0


def test_switches_that_failed_their_gpu_test_are_left_out(sweep, monkeypatch):
    text = ("FAILED tests/test_triton.py::test_case_table_on_the_gpu[torch.bfloat16-tma] - AssertionError\n"
            "ERROR tests/test_triton.py::test_case_table_on_the_gpu[torch.bfloat16-fused-delta] - RuntimeError\n"
            "ERROR tests/test_triton.py::test_case_table_on_the_gpu[torch.bfloat16-tma] - (in teardown)\n"
            "FAILED tests/test_triton.py::test_case_table_on_the_gpu[torch.float16-atomic-dq] - AssertionError\n"
            "FAILED tests/test_triton.py::test_case_table_on_the_gpu[torch.bfloat16-persistent] - AssertionError\n"
            "PASSED tests/test_triton.py::test_case_table_on_the_gpu[torch.bfloat16-atomic-dq]\n")
    exclude = sweep.failed_switches(text)
    assert exclude == [("tma", True), ("delta", "fused"), ("persistent", 2)]  # bf16 only, switches the sweep turns on
    fwd = sweep.candidates("fwd", configs.lookup("fwd", 64, torch.bfloat16), 64, exclude)
    assert len(fwd) == 4 * 2 * 3 and {c.config.schedule.spec() for c in fwd} == {""}
    shipped = configs.lookup("bwd", 64, torch.bfloat16)
    kept = sweep.candidates("bwd", shipped, 64, exclude)
    assert len(kept) == 1 + 4 * 2 * 3 * 2 - 1 and {c.config.schedule.spec() for c in kept} == {"", "dq=atomic"}
    monkeypatch.setattr(sweep, "run_candidate", lambda cand, case, rank, repeat=False: {"rank": rank, "error": "x"})
    case = type("Case", (), {"shipped": {"bwd": shipped}, "D": 64, "dev": torch.device("cpu"), "case": "causal",
                             "info": lambda self, p: {"pass": p}})()
    rows = sweep.tune_pass("bwd", case, sweep.TuneBudget(["bwd"], 100.0), lambda r: None, exclude)
    assert rows[0] == {"pass": "bwd", "label": "(96 left out)", "skipped": 96,
                       "error": "skipped: tma=True, delta=fused, persistent=2 failed the GPU tests"}
    assert len(rows) == 1 + len(kept)


def test_the_tuned_contender_runs_with_its_rows_in_the_table(peers, monkeypatch):
    seen = []

    def spy(q, k, v, **kw):
        seen.append((configs.lookup("fwd", 16, q.dtype, "dense"), kw["plan"].block_m))
        return q, None
    monkeypatch.setattr(peers, "triton_attention", spy)
    row = configs.Config(32, 16, {"_fwd": (4, 3)}, source="timed: test")
    mine = {("fwd", "half", 16, "dense"): row}
    runs = peers.contenders("dense", 64, 16, 2, "cpu", tuned={**mine, ("fwd", "half", 64, "dense"): row}, sdpa=())
    assert list(runs[1]) == ["attnkit triton", "attnkit triton (tuned)", "flex (compiled)"]
    q = torch.randn(1, 2, 64, 16, dtype=torch.float16)
    runs[1]["attnkit triton"][0](q, q, q)
    runs[1]["attnkit triton (tuned)"][0](q, q, q)
    assert seen[0][0] is not row and seen[1][0] is row and ("fwd", "half", 16, "dense") not in configs.TABLE
    if not configs.interpreting():  # in the interpreter the plans are 16 x 16 whatever the table says
        assert seen[1][1] == 32
    other = peers.contenders("dense", 64, 32, 2, "cpu", tuned=mine, sdpa=())[1]["attnkit triton (tuned)"][0]
    with pytest.raises(RuntimeError, match="no tuned row"):
        other(q, q, q)
    assert "attnkit triton (tuned)" not in peers.contenders("dense", 64, 16, 2, "cpu", sdpa=())[1]


def test_the_issue15_run_on_the_cpu(steps, monkeypatch, tmp_path):
    """--issue15's steps with stand-ins for what needs CUDA (the pytest child, the sweep, measure):
    the files that come back, tune_table.py's rows handed to the compare step, and the summary."""
    failed = "FAILED tests/test_triton.py::test_case_table_on_the_gpu[torch.bfloat16-tma] - RuntimeError: x\n"
    text = f"..F.\n{failed}41 passed, 1 failed in 99.0s\n"
    monkeypatch.setattr(steps, "run_child", lambda cmd, env, timeout_s: (1, text))
    swept = []

    def tune(cases, dev, limit_s, on_row, exclude, warmer):
        assert warmer is None  # no compiling ahead without CUDA
        swept.append((cases, limit_s, exclude))
        for r in _sweep_rows():
            on_row(r)
    monkeypatch.setattr(steps, "tune", tune)
    measured = []

    def measure(kind, N, D, H, dev, rows, log_path, **kw):
        measured.append((kind, N, kw))
        for name in ("attnkit triton", "attnkit triton (tuned)", "sdpa FLASH"):
            rows.append({"case": kind, "N": N, "D": D, "H": H, "contender": name, "fwd_ms": 1.0, "fwd_tflops": 400.0,
                         "fwdbwd_ms": 2.0, "fwdbwd_tflops": 350.0, "peak_gib": 0.1, "max_err": 1e-3})
    monkeypatch.setattr(steps, "measure", measure)
    assert steps.issue15(tmp_path, ("tests", "tune"), device="cpu", limits={"tune": 50}, longformer_n=1 << 20) == 0
    assert steps.issue15(tmp_path, ("compare",), device="cpu") == 0  # another process, the same files
    assert swept == [([("dense", 16384, 128, 16), ("causal", 16384, 64, 16), ("longformer", 1 << 20, 64, 12)], 50,
                       [("tma", True)])]  # the switch that failed its GPU test is not swept
    assert [m[:2] for m in measured] == [("dense", 16384), ("causal", 16384), ("longformer", 65536)]
    tuned = measured[0][2]["tuned"]
    assert set(tuned) == {("fwd", "half", 128, "dense"), ("bwd", "half", 64, "causal")}
    assert measured[0][2]["sdpa"] == ("FLASH_ATTENTION", "CUDNN_ATTENTION")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["issue15.json", "issue15.md", "issue15_pytest.log", "issue15_rows.jsonl", "tune_table.py"]
    doc = json.loads((tmp_path / "issue15.json").read_text())
    assert list(doc["steps"]) == ["tests", "tune", "compare"]
    assert doc["steps"]["tune"]["info"]["winners"] == [["fwd", "half", 128, "dense"], ["bwd", "half", 64, "causal"]]
    md = (tmp_path / "issue15.md").read_text()
    for text in ("# Issue 15 on cpu", "## tests", "41 passed", "## tune", "### dense N=16384 D=128 H=16: fwd",
                 "## compare", "| dense | 16384 | 128 | attnkit triton (tuned) |"):
        assert text in md, text
    log = "== tests exit 0 after 101 s\n== tune exit 124 after 240 s\n== longformer skipped: 20 s of the 540 s left\n"
    (tmp_path / "issue15_log.txt").write_text(log)
    steps.print_issue15_summary(tmp_path)
    summary = steps.issue15_summary(doc, log)
    for text in ("| tests | exit 0 after 101 s | 41 passed, 1 failed in 99.0s |", "| tune | exit 124 after 240 s |",
                 "(1 in the warm-up; 1 of 3 candidates compiled ahead), 2 winners", "| compare | ? |", "| longformer | skipped: 20 s of the 540 s left |",
                 "| dense 16384 D=128 | fwd | 2.010 (0.020) | 128x64 8w 3s tma=True | 1.600 | WINNER |",
                 "| attnkit triton | attnkit triton (tuned) | sdpa FLASH |", "| causal N=16384 D=64 | 400 / 350 |"):
        assert text in summary, text
    assert "not run" in steps.issue15_summary(None, "")


def test_the_issue15_options_parse(gpu, capsys):
    args = gpu.parse_args(["--issue15", "--step", "tune", "--limit-s", "30", "--ns", "1048576", "--out", "x"])
    assert args.issue15 and args.step == ["tune"] and args.limit_s == 30.0 and args.ns == (1048576,)
    assert gpu.parse_args(["--issue15", "--summary"]).summary
    for bad, says in ((["--tune", "--ns", "65536,1048576"], "take one N"), (["--step", "tune"], "only with"),
                      (["--issue15", "--step", "overhead"], "not a step of this run"),
                      (["--issue14", "--step", "compare"], "not a step of this run"),
                      (["--summary"], "goes with --issue15"), (["--tune", "--issue15"], "give one")):
        with pytest.raises(SystemExit):
            gpu.parse_args(bad)
        assert says in capsys.readouterr().err, bad


def _run_issue15_script(tmp_path, budget, **env):
    import subprocess
    script = PATH.parent / "gpu_issue15.sh"
    tmp_path.mkdir(exist_ok=True)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "ARGS $*"\nfor a in "$@"; do [ "$a" = --summary ] && echo SUMMARY; '
                    'done\nexit 0\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake), "ISSUE15_BUDGET_S": str(budget), **env}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout, (out / "issue15_log.txt").read_text(), out


def test_the_issue15_script_runs_each_step_within_the_budget(tmp_path):
    """benchmarks/gpu_issue15.sh with a stand-in python: the steps in order under `timeout`, each
    soft limit its hard one less a margin, the hard ones cut to the budget, the summary last."""
    stdout, log, out = _run_issue15_script(tmp_path, 540)
    calls = [line.split("ARGS ")[1] for line in log.splitlines() if line.startswith("ARGS benchmarks/gpu.py")]
    limits = [(c.split("--step ")[1].split()[0], float(c.split("--limit-s ")[1].split()[0])) for c in calls[:-1]]
    assert limits[:3] == [("tests", 135), ("tune", 205), ("compare", 80)]
    assert limits[3][0] == "longformer" and 480 <= limits[3][1] <= 485  # what is left: 540 - 25 kept back - 30
    assert all(f"--out {out}" in c and "--issue15" in c for c in calls)
    assert calls[-1] == f"benchmarks/gpu.py --issue15 --summary --out {out}"
    assert stdout.rstrip().splitlines()[-1] == "SUMMARY"
    assert all(f"== {s} exit 0" in log for s, _ in limits)
    assert "--ns" not in log
    stdout, log, _ = _run_issue15_script(tmp_path / "budget200", 200, ISSUE15_NS="1048576")
    assert "== tests (soft 135 s, hard 150 s)" in log
    # bash's SECONDS counts wall-clock second boundaries: the stand-in run may cross one before tune
    assert re.search(r"== tune \(soft (140|139) s, hard (175|174) s\)", log), log
    assert re.search(r"--step tune --limit-s (140|139) --ns 1048576 --out", log), log
    stdout, log, _ = _run_issue15_script(tmp_path / "budget40", 40)
    assert "== tests skipped" in log and "== longformer skipped" in log and "--step" not in log
    assert stdout.rstrip().splitlines()[-1] == "SUMMARY"
