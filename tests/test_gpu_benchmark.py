"""benchmarks/gpu.py and its modules (gpu_*.py) run only on a lent GPU, where minutes are scarce:
their checks and reports are exercised here on the CPU (the Triton kernels in the interpreter), so
a typo does not cost a GPU session."""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import json
import os
import re
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

import attnkit as ak  # noqa: E402
from attnkit.ops.block_plan import make_plan  # noqa: E402
from attnkit.ops.triton import configs  # noqa: E402
from attnkit.ops.triton.op import triton_attention  # noqa: E402

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    """gpu.py loaded by path, as the device runs it: it puts benchmarks/ on sys.path for its modules."""
    import sys
    spec = importlib.util.spec_from_file_location("gpu_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def _module_fixture(name: str, module: str):
    """A fixture ``name``: benchmarks/<module>.py, imported by name (gpu.py put benchmarks/ on sys.path)."""
    @pytest.fixture(scope="module", name=name)
    def fixture(gpu):
        return importlib.import_module(module)
    return fixture


peers = _module_fixture("peers", "gpu_peers")
sweep = _module_fixture("sweep", "gpu_tune")
verdicts = _module_fixture("verdicts", "gpu_tune_report")
warm = _module_fixture("warm", "gpu_warm")
steps = _module_fixture("steps", "gpu_steps")
overhead = _module_fixture("overhead", "gpu_overhead")
pb = _module_fixture("pb", "plan_build")


def _inputs(N=48, H=2, D=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, H, N, D, generator=g).requires_grad_() for _ in range(3)]


def test_check_passes_attnkit_and_stops_a_wrong_output(peers):
    if not configs.interpreting():
        pytest.skip("the CPU run needs Triton's interpreter")
    q, k, v = _inputs()
    mask = ak.sliding_window(5) | ak.global_tokens([0, 1])
    rows = torch.linspace(0, q.shape[2] - 1, 16).long()
    want = peers.reference_rows(q.detach(), k.detach(), v.detach(), mask, rows)
    plan = make_plan(mask, 48, 48, 16, 16, "cpu")

    def mine(q, k, v):
        return triton_attention(q, k, v, mask=mask, plan=plan)[0]

    assert peers.check(mine, q, k, v, mask, rows, want, 48) < 1e-4  # output rows and dq, dk, dv
    with pytest.raises(RuntimeError, match="output differs from the reference"):
        peers.check(lambda q, k, v: mine(q, k, v) + 0.1, q, k, v, mask, rows, want, 48)
    with pytest.raises(RuntimeError, match="dk differs from the reference"):  # right output, wrong gradient
        peers.check(lambda q, k, v: mine(q, k.detach() + 0 * k, v), q, k, v, mask, rows, want, 48)


def test_the_longformer_mask_and_pair_count_match_the_anchors(peers):
    N = 4096
    truth = peers.longformer_mask().materialize(N, N)[0, 0]  # (N, N)
    # the anchors count N (2W + 1) + 2 G N pairs: the band, and the global rows and columns in full
    assert peers.useful_pairs("longformer", N) == N * (2 * peers.W + 1) + 2 * peers.G * N
    assert abs(truth.sum().item() - peers.useful_pairs("longformer", N)) / truth.sum().item() < 0.1
    assert truth[0].all() and truth[:, 0].all() and truth[500, 500 - peers.W] and not truth[500, 500 - peers.W - 1]


def test_an_exception_without_a_message_is_still_reported(peers):
    assert peers.error_text(AssertionError()) == "AssertionError: "
    assert peers.error_text(RuntimeError("out of memory\nmore")) == "RuntimeError: out of memory"


def test_reports_render_rows_and_errors(peers):
    rows = [{"case": "causal", "N": 4096, "D": 64, "H": 16, "contender": "attnkit triton", "fwd_ms": 0.5,
             "fwd_tflops": 300.0, "fwdbwd_ms": 1.5, "fwdbwd_tflops": 350.0, "peak_gib": 0.1, "max_err": 1e-3},
            {"case": "causal", "N": 4096, "D": 64, "H": 16, "contender": "sdpa FLASH", "error": "RuntimeError: x"}]
    md = peers.markdown(rows, "NVIDIA H100")
    assert "NVIDIA H100" in md and "| causal | 4096 | 64 | attnkit triton | 0.500 | 300 |" in md
    assert "RuntimeError: x" in md


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


# -- issue 15: compiling ahead in worker processes (gpu_warm.py) ---------------------------------------

def _run_here(warm, launch):
    """A pool's submit that runs the worker's task here and now: the future is done when returned."""
    def submit(spec):
        future = Future()
        try:
            future.set_result(warm.warm_one(spec, launch))
        except Exception as e:
            future.set_exception(e)
        return future
    return submit


def _specs(warm, scratch, n, pass_="fwd"):
    """rank -> a WarmSpec whose marker file is named by its rank."""
    row = configs.lookup(pass_, 16, torch.float32)
    return {r: warm.WarmSpec("causal", 32, 16, 1, "float32", pass_, row, "cpu", str(scratch / f"{r}.run"))
            for r in range(n)}


@pytest.mark.parametrize("kind,N,D", [("dense", 16384, 128), ("causal", 16384, 64), ("longformer", 65536, 64)])
def test_the_warm_up_launch_compiles_the_kernels_of_the_case(sweep, warm, kind, N, D):
    """At warm_n the forward kernel's only int argument that a multiple-of-16 N leaves free (N_ITEMS,
    the plan's work items) specializes as at the case's N (== 1, divisible by 16): the same kernel."""
    case = SimpleNamespace(N=N, mask=sweep.case_mask(kind))
    case.plan = lambda row: make_plan(case.mask, N, N, row.block_m, row.block_n, "cpu")
    for bm, bn in sweep.TUNE_FWD_BLOCKS:
        row = configs.Config(bm, bn, {"_fwd": (8, 2)})
        n = warm.warm_n(case, row)
        small = make_plan(case.mask, n, n, bm, bn, "cpu").q_work.shape[0]
        assert n in warm.WARM_NS and n < N and n % 16 == 0
        assert warm.specialization(small) == warm.specialization(case.plan(row).q_work.shape[0]), (bm, bn, n, small)
    tiny = SimpleNamespace(N=40, mask=None, plan=lambda row: make_plan(None, 40, 40, 16, 16, "cpu"))
    assert warm.warm_n(tiny, configs.Config(16, 16, {})) == 40  # a case under every WARM_NS: its own N


def test_candidates_that_fail_their_warm_up_are_error_rows_never_launched(sweep, warm, monkeypatch, tmp_path):
    """tune_pass with a Warmer whose workers' launch fails for the 128 x 128 rows: those are error
    rows ("failed in warm-up: ..."), never launched in the sweep's process; the others are launched,
    each row saying it was warmed and at which N."""
    case = sweep.TuneInputs("causal", 40, 16, 2, "cpu", torch.float16)

    def launch(spec):
        if (spec.config.block_m, spec.config.block_n) == (128, 128):
            raise RuntimeError("OutOfResources: out of resource: shared memory")
    launched = []

    def run(cand, case, rank, repeat=False):
        launched.append((rank, repeat))
        return {"rank": rank, "label": cand.label(), "shipped": cand.shipped, "ms": 1.0 + rank, "repeat": repeat}
    monkeypatch.setattr(sweep, "run_candidate", run)
    warmer = warm.Warmer(workers=3, submit=_run_here(warm, launch), kill=lambda: None, scratch=tmp_path)
    rows = sweep.tune_pass("fwd", case, sweep.TuneBudget(["fwd"], 3600.0), lambda r: None, warmer=warmer)
    cands = sweep.candidates("fwd", case.shipped["fwd"], 16)
    failed = [r for r in rows if "error" in r]
    assert {r["rank"] for r in failed} == {i for i, c in enumerate(cands) if c.config.block_m == c.config.block_n == 128}
    assert len(failed) == 2 * 3 * 2 * 2 and not {r["rank"] for r in failed} & {rank for rank, _ in launched}
    for r in failed:
        assert r["error"] == "failed in warm-up: RuntimeError: OutOfResources: out of resource: shared memory"
        assert r["warmed"] is False and r["label"] == cands[r["rank"]].label() and "block_m" in r
    firsts = [r for r in rows if "ms" in r and not r.get("repeat")]
    assert len(firsts) == len(cands) - len(failed) and all(r["warmed"] and r["warm_n"] == 40 for r in firsts)
    assert not list(tmp_path.glob("*.run"))  # each worker let go of its marker


def test_the_warm_up_gets_its_share_of_the_slice(sweep, monkeypatch):
    """A slice's warm-up ends WARM_SHARE of the way to the slice's deadline; none past the deadline
    or once the CUDA context broke."""
    now, seen = [0.0], []
    warmer = SimpleNamespace(warm=lambda case, cands, deadline: seen.append((now[0], deadline)) or {})
    monkeypatch.setattr(sweep, "run_candidate", lambda cand, case, rank, repeat=False: (now.__setitem__(0, now[0] + 4.0), {
        "rank": rank, "label": cand.label(), "shipped": cand.shipped, "error": "x"})[1])
    case = type("Case", (), {"shipped": {"fwd": configs.lookup("fwd", 64, torch.bfloat16)}, "D": 64, "case": "causal",
                             "dev": torch.device("cpu"), "info": lambda self, p: {"pass": p}})()
    budget = sweep.TuneBudget(["fwd", "fwd"], 20.0, clock=lambda: now[0])
    sweep.tune_pass("fwd", case, budget, lambda r: None, warmer=warmer)  # a 10 s slice: warm-up until 5 s
    assert seen == [(0.0, sweep.WARM_SHARE * 10.0)] and now[0] > 10.0
    now[0] = 21.0
    sweep.tune_pass("fwd", case, budget, lambda r: None, warmer=warmer)  # past the end: no warm-up
    budget = sweep.TuneBudget(["fwd"], 20.0, clock=lambda: now[0])
    budget.lost = "the CUDA context broke at causal fwd 64x64 4w 2s plain"
    sweep.tune_pass("fwd", case, budget, lambda r: None, warmer=warmer)
    assert len(seen) == 1


def test_the_warm_up_starts_nothing_past_its_deadline_and_stops_the_stragglers(warm, tmp_path):
    """No launch starts unless the longest seen so far would end before the deadline; a worker
    still at it at the deadline is stopped and its candidate left to compile in the sweep."""
    now, started, killed = [0.0], [], []

    def submit(spec):  # each launch takes a second of the clock and reports 0.6 s of its own
        started.append((int(Path(spec.marker).stem), now[0]))
        now[0] += 1.0
        future = Future()
        future.set_result(0.6)
        return future
    warmer = warm.Warmer(workers=2, submit=submit, kill=lambda: killed.append(now[0]), clock=lambda: now[0],
                         scratch=tmp_path)
    out = warmer.run(_specs(warm, tmp_path, 10), deadline=4.5)
    assert started == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]  # at 4 s, 4 + 0.6 is past 4.5
    assert sorted(out) == [0, 1, 2, 3] and out[3] == {"warmed": True, "warm_s": 0.6, "warm_n": 32} and not killed
    stuck = Future()  # rank 0's worker never finishes

    def submit_stuck(spec):
        if spec.marker.endswith("/0.run"):
            return stuck
        done = Future()
        done.set_result(0.01)
        return done
    warmer = warm.Warmer(workers=2, submit=submit_stuck, kill=lambda: killed.append("stopped"), clock=time.monotonic,
                         scratch=tmp_path)
    t0 = time.monotonic()
    out = warmer.run(_specs(warm, tmp_path, 5), deadline=t0 + 0.3)
    assert sorted(out) == [1, 2, 3, 4] and killed == ["stopped"] and 0.25 < time.monotonic() - t0 < 5


def test_a_worker_that_dies_is_traced_to_its_candidate(warm, tmp_path):
    """The pool breaks with ranks 0, 1 and 2 in flight: 1's worker wrote a fault log (it segfaulted),
    so 1 fails; 0 had started (its worker was stopped with the pool) and 2 had not: both go again in
    a fresh pool. Without a fault log the only one started is the culprit; several started take a
    strike each and fail at the second; deaths before any start stop the warm-up."""
    attempts, killed = [], []

    def submit(spec):
        rank = int(Path(spec.marker).stem)
        attempts.append(rank)
        future = Future()
        if attempts.count(rank) == 1 and rank < 3:  # the first pool
            if rank < 2:
                Path(spec.marker).write_text(str(1000 + rank))  # started, in worker 1000 + rank
            if rank == 1:
                (tmp_path / "1001.fault").write_text("Fatal Python error: Segmentation fault\n\nCurrent thread 0x1:\n")
                future.set_exception(BrokenProcessPool("A child process terminated abruptly"))
            return future  # 0 and 2 pending: the pool fails them too
        future.set_result(0.1)
        return future
    warmer = warm.Warmer(workers=3, submit=submit, kill=lambda: killed.append(1), scratch=tmp_path)
    out = warmer.run(_specs(warm, tmp_path, 4), time.monotonic() + 60)
    assert out[1] == {"error": "failed in warm-up: Fatal Python error: Segmentation fault"}
    assert all(out[r]["warmed"] for r in (0, 2, 3)) and sorted(attempts) == [0, 0, 1, 2, 2, 3] and killed
    assert not list(tmp_path.glob("*.run"))

    def dies(started):  # a submit whose pool breaks with ``started`` ranks begun, no fault log
        def submit(spec):
            if int(Path(spec.marker).stem) in started:
                Path(spec.marker).write_text("2000")
            future = Future()
            future.set_exception(BrokenProcessPool("A child process terminated abruptly"))
            return future
        return submit
    out = warm.Warmer(workers=2, submit=dies({0}), kill=lambda: None, scratch=tmp_path).run(
        _specs(warm, tmp_path, 1), time.monotonic() + 60)
    assert out == {0: {"error": "failed in warm-up: its worker process died (BrokenProcessPool: A child process "
                                "terminated abruptly)"}}
    out = warm.Warmer(workers=2, submit=dies({0, 1}), kill=lambda: None, scratch=tmp_path).run(
        _specs(warm, tmp_path, 2), time.monotonic() + 60)
    assert out == dict.fromkeys((0, 1), {"error": "failed in warm-up: its worker died 2 times while it ran, among others"})
    idle = warm.Warmer(workers=2, submit=dies(set()), kill=lambda: None, scratch=tmp_path)
    assert idle.run(_specs(warm, tmp_path, 3), time.monotonic() + 60) == {}
    assert idle.disabled.startswith("the workers died 2 times before any launch")
    assert idle.warm(None, [1, 2], time.monotonic() + 60) == {}  # nothing more is tried
    broken = warm.Warmer(workers=2, kill=lambda: None, scratch=tmp_path)  # the pool's own submit, on a broken pool
    broken._executor = lambda: SimpleNamespace(submit=lambda *a: (_ for _ in ()).throw(BrokenProcessPool("at start")))
    assert broken.run(_specs(warm, tmp_path, 3), time.monotonic() + 60) == {} and broken.disabled


def test_a_worker_whose_cuda_context_broke_launches_nothing_more(warm, monkeypatch, tmp_path):
    """After a launch that broke its CUDA context a worker refuses every later candidate (ContextLost),
    which the sweep's side does not count against them: they go again, in a fresh pool."""
    monkeypatch.setattr(warm, "_context_lost", [])
    monkeypatch.setattr(warm, "device_ok", lambda device: False)
    calls = []

    def launch(spec):
        calls.append(spec)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    spec = _specs(warm, tmp_path, 1)[0]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        warm.warm_one(spec, launch)
    with pytest.raises(warm.ContextLost, match="illegal memory access"):
        warm.warm_one(spec, launch)
    assert len(calls) == 1 and not Path(spec.marker).exists()
    attempts, killed = [], []

    def submit(spec):
        attempts.append(spec.marker)
        future = Future()
        if len(attempts) == 1:
            future.set_exception(warm.ContextLost("this worker's CUDA context broke at an earlier candidate"))
        else:
            future.set_result(0.1)
        return future
    out = warm.Warmer(workers=1, submit=submit, kill=lambda: killed.append(1), scratch=tmp_path).run(
        _specs(warm, tmp_path, 2), time.monotonic() + 60)
    assert out[0]["warmed"] and out[1]["warmed"] and len(attempts) == 3 and killed == [1]


def test_the_warm_up_runs_in_spawned_worker_processes(warm):
    """The real pool (spawn: the worker's task imported by name in a fresh process) on the CPU, the
    kernels in Triton's interpreter: a good forward and backward candidate are warmed, a bad one (a
    block that is no power of two) is its worker's error; the worker's fault log is empty until it
    segfaults, which its log then says."""
    if not configs.interpreting():
        pytest.skip("the CPU run needs Triton's interpreter")
    rows = {"fwd": configs.Config(16, 16, {"_fwd": (4, 2)}),
            "bad": configs.Config(24, 24, {"_fwd": (4, 2)}),
            "bwd": configs.Config(16, 16, {"_bwd_delta": (4, 2), "_bwd_dq": (4, 2), "_bwd_dkdv": (4, 2)})}
    with warm.Warmer(workers=1) as warmer:
        specs = {rank: warm.WarmSpec("causal", 32, 16, 1, "float32", "bwd" if name == "bwd" else "fwd", rows[name],
                                     "cpu", str(warmer.scratch / f"{rank}.run")) for rank, name in enumerate(rows)}
        out = warmer.run(specs, time.monotonic() + 300)
        faults = list(warmer.scratch.glob("*.fault"))
        assert out[0]["warmed"] and out[2]["warmed"] and out[2]["warm_n"] == 32, out
        assert out[1]["error"].startswith("failed in warm-up: ") and "power of 2" in out[1]["error"], out
        assert len(faults) == 1 and faults[0].read_text() == "" and not list(warmer.scratch.glob("*.run"))
        crash = warmer._executor().submit(ctypes.string_at, 0)  # reads address 0: SIGSEGV in the worker
        with pytest.raises(BrokenProcessPool):
            crash.result(timeout=120)
        assert warmer._fault_text(int(faults[0].stem)) == "Fatal Python error: Segmentation fault"
    assert not warmer.scratch.exists()


# -- issue 14: plan builds, host overhead, the one-call driver -----------------------------------------

@pytest.fixture
def eager_flex(pb, monkeypatch):
    """Flex's create_block_mask uncompiled (eager, N x N: tiny N only) in place of the compiled one,
    whose CPU compile would take the test's whole budget."""
    from torch.nn.attention.flex_attention import create_block_mask
    monkeypatch.setattr(pb, "_compiled_cbm", create_block_mask)


@pytest.mark.parametrize("name", ["longformer", "causal", "causal_window", "docs1", "docs8", "docs64", "docs512"])
def test_the_flex_mask_mods_are_the_attnkit_masks(pb, name):
    """Flex is timed on the same masks: each mask_mod, written out, equals attnkit's mask."""
    N = 1100  # past W + G, and 512 documents of 2 or 3 tokens
    case = pb.MASKS[name]
    data = case.data(N, torch.device("cpu"))
    q, k = torch.arange(N)[:, None], torch.arange(N)[None, :]
    want = case.build(data).materialize(N, N)[0, 0]
    assert torch.equal(case.flex(data)(0, 0, q, k).expand(N, N), want)
    if name.startswith("docs"):
        assert len(torch.unique(data["ids"])) == int(name[4:])


def test_plan_build_rows_tables_and_files(pb, eager_flex, tmp_path):
    """make_plan rows (T, P, U as the plan has them), Flex rows, cache hits that build nothing,
    and the JSON and markdown written after each row."""
    from attnkit.ops.block_plan import make_plan
    rows = []
    head = pb.header(torch.device("cpu"), "a test")

    def on_row(row):
        rows.append(row)
        pb.write(tmp_path, "pb", head, rows)
    pb.run((192, 256), ("longformer", "docs8"), ((32, 16), (16, 16)), torch.device("cpu"), reps=2, flex=True,
           cache_n=256, cache_calls=3, on_row=on_row)
    assert [r["what"] for r in rows].count("make_plan") == 8 and not [r for r in rows if "error" in r], rows
    for r in (r for r in rows if r["what"] == "make_plan"):
        plan = make_plan(pb.MASKS[r["mask"]].build(pb.MASKS[r["mask"]].data(r["N"], "cpu")), r["N"], r["N"],
                         r["block_m"], r["block_n"], "cpu")
        assert (r["T"], r["U"]) == (len(plan.kv_idx), plan.tiles.shape[2]) and len(r["times_ms"]) == 2
        assert r["min_ms"] <= r["median_ms"]
    flex = [r for r in rows if r["what"] == "flex create_block_mask"]
    assert len(flex) == 4 and all(r["T"] > 0 and "first_call_ms" in r for r in flex)
    cache = [r for r in rows if r["what"] == "cached_plan hit"]
    assert [r["mask"] for r in cache] == ["longformer", "docs8"] and all(r["plans_built"] == 0 for r in cache)
    doc = json.loads((tmp_path / "pb.json").read_text())
    assert len(doc["rows"]) == len(rows) and doc["header"]["note"] == "a test"
    md = (tmp_path / "pb.md").read_text()
    assert "| longformer | 32x16 |" in md and "## FlexAttention create_block_mask" in md
    assert "| docs8 | 256 | 32x16 |" in md and "a test" in md


def test_plan_build_reports_a_failing_case_and_the_time_limit(pb, monkeypatch):
    monkeypatch.setattr(pb, "make_plan", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    rows = pb.run((64,), ("causal",), ((16, 16),), torch.device("cpu"), cache_n=None, on_row=lambda r: None)
    assert rows[0]["error"] == "RuntimeError: out of memory"
    rows = pb.run((64,), ("causal",), ((16, 16),), torch.device("cpu"), cache_n=64, on_row=lambda r: None,
                  deadline=0.0)
    assert [r["error"] for r in rows] == ["skipped: time limit"] * 2
    assert "skipped: time limit" in pb.markdown(pb.header(torch.device("cpu")), rows)


def test_plan_build_command_line(pb, tmp_path, capsys):
    """The CLI end to end at a small size, and its refusals."""
    code = pb.main(["--ns", "128", "--masks", "causal", "--blocks", "32x16", "--reps", "1", "--cache-n", "128",
                    "--cache-calls", "2", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| causal | 32x16 |" in out
    assert len(list(tmp_path.glob("plan_build_cpu_*_1t.json"))) == 1
    for bad, says in ((["--masks", "nope"], "unknown"), (["--blocks", "100x64"], "powers of two"),
                      (["--blocks", "128"], "BMxBN"), (["--device", "tpu"], "cpu or cuda")):
        with pytest.raises(SystemExit):
            pb.parse_args(bad)
        assert says in capsys.readouterr().err
    assert pb.default_blocks() == ((128, 64), (64, 128), (64, 64))


def test_per_call_ms_synchronizes_around_loops_not_calls(overhead, monkeypatch):
    calls, syncs = [], []
    monkeypatch.setattr(overhead.plan_build, "_sync", lambda device: syncs.append(len(calls)))
    ms, per_loop, means = overhead.per_call_ms(lambda: calls.append(1), torch.device("cpu"), rounds=3, max_calls=7,
                                          min_calls=7)
    assert per_loop == 7 and len(means) == 3 and ms == pytest.approx(sorted(means)[1], abs=1e-5)
    assert len(calls) == 2 + 3 * 7  # a warm-up, one estimate, three loops of 7
    assert len(syncs) == 2 * (1 + 3)  # around the estimate and around each loop


def test_host_overhead_rows_checks_and_ratios(overhead, monkeypatch):
    """Every contender of the host-overhead table runs (the Triton ones in the interpreter), each
    output is checked against its SDPA counterpart first, and the ratios are to SDPA."""
    if not configs.interpreting():
        pytest.skip("the CPU run needs Triton's interpreter")
    monkeypatch.setattr(overhead, "per_call_ms", lambda fn, device, **kw: (2.0, 1, [2.0]))
    rows = overhead.host_overhead(torch.device("cpu"), dtype=torch.float16, ns=(32,), on_row=lambda r: None)
    assert len(rows) == 12 and not [r for r in rows if "error" in r], rows
    assert all(r["max_err_vs_sdpa"] < 1e-2 for r in rows)
    by = {(r["contender"], r["mask_mode"]): r for r in rows}
    assert by[("ak triton window+global", "rebuilt")]["baseline"] == "sdpa window+global (bool mask)"
    assert by[("sdpa causal", "reused")]["ratio_to_sdpa_causal"] == 1.0
    assert by[("ak auto causal", "rebuilt")]["auto_picks"] in ("sdpa", "tiled", "reference", "triton", "banded")
    md = overhead.overhead_markdown(rows)
    assert "| 32 | ak triton window+global |" in md


def test_host_overhead_stops_a_wrong_contender(overhead, monkeypatch):
    real = overhead.overhead_contenders

    def wrong(q, k, v):
        runs = real(q, k, v)
        reused, rebuilt, same = runs["ak auto causal"]
        runs = {"sdpa causal": runs["sdpa causal"], "ak auto causal": (lambda: reused() + 1, rebuilt, same)}
        return runs
    monkeypatch.setattr(overhead, "overhead_contenders", wrong)
    monkeypatch.setattr(overhead, "per_call_ms", lambda fn, device, **kw: (1.0, 1, [1.0]))
    rows = overhead.host_overhead(torch.device("cpu"), dtype=torch.float32, ns=(16,), on_row=lambda r: None)
    bad = [r for r in rows if r["contender"] == "ak auto causal" and r["mask_mode"] == "reused"][0]
    assert "output differs from sdpa causal" in bad["error"] and "ms_per_call" not in bad


def test_the_issue14_run_on_the_cpu(overhead, steps, pb, eager_flex, monkeypatch, tmp_path):
    """--issue14's steps end to end with stand-ins for what needs CUDA (pytest child, do_bench's
    measure, per-call timing): one issue14.json with every step, markdown, the rows' log."""
    if not configs.interpreting():
        pytest.skip("the CPU run needs Triton's interpreter")
    children = []
    monkeypatch.setattr(steps, "run_child", lambda cmd, env, timeout_s: (children.append(cmd), (0, "3 passed in 9.1s\n"))[1])
    monkeypatch.setattr(overhead, "per_call_ms", lambda fn, device, **kw: (1.5, 1, [1.5]))
    monkeypatch.setattr(steps, "OVERHEAD_NS", (32,))
    monkeypatch.setattr(steps, "OVERHEAD_DTYPE", torch.float16)  # the interpreter refuses bfloat16
    monkeypatch.setattr(steps, "PLAN_NS", (256,))
    monkeypatch.setattr(steps, "PLAN_MASKS", ("longformer", "docs512"))
    monkeypatch.setattr(steps, "PLAN_CACHE_N", 256)
    monkeypatch.setattr(steps, "LONGFORMER_NS", (4096, 1 << 20))
    measured = []

    def measure(kind, N, D, H, dev, rows, log_path):
        measured.append((kind, N, D, H))
        row = {"case": kind, "N": N, "D": D, "H": H, "contender": "attnkit triton", "fwd_ms": 1.0, "fwd_tflops": 1.0,
               "fwdbwd_ms": 2.0, "fwdbwd_tflops": 1.0, "peak_gib": 0.1, "max_err": 1e-3}
        rows.append(row)
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    monkeypatch.setattr(steps, "measure", measure)
    assert steps.issue14(tmp_path, ("tests", "overhead"), device="cpu", limits={"overhead": 600}) == 0
    assert steps.issue14(tmp_path, ("plans", "longformer"), device="cpu") == 0  # another process, the same files
    doc = json.loads((tmp_path / "issue14.json").read_text())
    assert list(doc["steps"]) == ["tests", "overhead", "plans", "longformer"] and len(doc["meta"]["runs"]) == 2
    assert doc["steps"]["tests"]["info"]["returncode"] == 0
    assert children[0][1:5] == ["-m", "pytest", "-m", "gpu"] and "tests/test_triton.py" in children[0]
    assert "3 passed" in (tmp_path / "issue14_pytest.log").read_text()
    assert len(doc["steps"]["overhead"]["rows"]) == 12 and "ratio_to_sdpa_causal" in doc["steps"]["overhead"]["rows"][0]
    plans = doc["steps"]["plans"]["rows"]
    assert {r["what"] for r in plans} == {"make_plan", "flex create_block_mask", "cached_plan hit"}
    assert not [r for r in plans if "error" in r], plans
    assert measured == [("longformer", 4096, 64, 12), ("longformer", 1 << 20, 64, 12)]
    md = (tmp_path / "issue14.md").read_text()
    for text in ("## tests", "3 passed", "## overhead", "| 32 | ak triton causal |", "## plans",
                 "| longformer | 128x64 |", "## longformer", "| longformer | 1048576 | 64 | attnkit triton |"):
        assert text in md, text
    steps = [json.loads(line)["step"] for line in (tmp_path / "issue14_rows.jsonl").read_text().splitlines()]
    assert set(steps) == {"overhead", "plans", "longformer"}


def test_the_issue14_steps_respect_their_time_limits(steps, monkeypatch, tmp_path):
    monkeypatch.setattr(steps, "run_child", lambda cmd, env, timeout_s: ("timeout", "collected 5 items\n(stopped)"))
    monkeypatch.setattr(steps, "measure", lambda *a: pytest.fail("measure ran past the time limit"))
    steps.issue14(tmp_path, steps.ISSUE14_STEPS, device="cpu", limits=dict.fromkeys(steps.ISSUE14_STEPS, 0))
    doc = json.loads((tmp_path / "issue14.json").read_text())
    assert doc["steps"]["tests"]["info"]["returncode"] == "timeout"
    assert "collected 5 items" in (tmp_path / "issue14_pytest.log").read_text()
    for step in ("overhead", "plans", "longformer"):
        rows = doc["steps"][step]["rows"]
        assert rows and all(r["error"] == "skipped: time limit" for r in rows), (step, rows)


def test_the_issue14_options_parse(gpu):
    args = gpu.parse_args(["--issue14", "--step", "plans", "--step", "tests", "--limit-s", "30", "--out", "x"])
    assert args.issue14 and args.step == ["plans", "tests"] and args.limit_s == 30.0
    with pytest.raises(SystemExit):
        gpu.parse_args(["--issue14", "--step", "nope"])


def test_the_issue14_shell_script_runs_each_step_under_a_timeout(tmp_path):
    """benchmarks/gpu_issue14.sh with a stand-in python: every step is started, in order, with the
    options gpu.py takes, under `timeout`, and the log says how each ended."""
    import subprocess
    script = PATH.parent / "gpu_issue14.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "ARGS $*"\necho "PYTHONPATH=$PYTHONPATH"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake), "PATH": os.environ["PATH"]}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    log = (out / "issue14_log.txt").read_text()
    steps = [line.split("--step ")[1].split()[0] for line in log.splitlines() if line.startswith("ARGS benchmarks/gpu.py")]
    assert steps == ["tests", "overhead", "plans", "longformer"]
    assert all(f"== {s} exit 0" in log for s in steps)
    assert f"ARGS benchmarks/gpu_profile_call.py --out {out} --n 4096" in log  # the profile last
    assert f"--out {out}" in log and "/src" in log.split("PYTHONPATH=")[1].split(":")[0]


def test_a_child_past_its_time_is_killed_with_its_own_children(steps, tmp_path):
    """run_child (the tests step's pytest) kills the child's whole process group at the timeout:
    a grandchild (an xdist worker, say) does not outlive it to load the GPU under the next step."""
    import subprocess
    import sys
    marker = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "  # holds no pipe: communicate() does not wait on it
            f"open({str(marker)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(300)")
    rc, out = steps.run_child([sys.executable, "-c", code], dict(os.environ), 3)
    assert rc == "timeout" and "started" in out and "stopped after 3 s" in out
    pid = int(marker.read_text())
    try:
        for _ in range(50):  # the kill is immediate; reaping by init may take a moment
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                              text=True).stdout.strip().startswith("Z"):
                break
            __import__("time").sleep(0.1)
        else:
            pytest.fail(f"the grandchild {pid} outlived the timeout")
    finally:
        try:
            os.kill(pid, 9)  # the test's own grandchild, should it have survived
        except ProcessLookupError:
            pass
    assert steps.run_child([sys.executable, "-c", "print('ok')"], dict(os.environ), 30) == (0, "ok\n")
