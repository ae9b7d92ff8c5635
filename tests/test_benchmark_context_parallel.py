"""benchmarks/context_parallel_cpu.py: its pair counts against the materialized masks, the per-rank
split against the layouts, the prediction and skip rules on hand-worked cases, and one ``--quick``
run of the script (1 and 2 gloo processes, tiny N): every row present, exact against float64 on its
sampled rows, the ring's bytes equal to the shard sizes, the mask-aware schedule sending no more (less
for windows on shards longer than the window).
No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from attnkit.distributed import layout as cp_layout
from conftest import BENCHMARKS, load_benchmark


@pytest.fixture(scope="module")
def cpb():
    yield from load_benchmark("context_parallel_cpu")


# -- pair counts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [100, 513, 700, 1500])  # below, at and above 2W + 1 = 513 (W = 256)
@pytest.mark.parametrize("kind", ["causal", "window", "longformer"])
def test_row_counts_equal_the_materialized_mask(cpb, kind, n):
    dense = cpb.build_mask(kind, n).materialize(n, n)  # (N, N) bool truth
    assert torch.equal(cpb.row_counts(kind, n), dense.sum(-1).flatten().long())
    assert cpb.allowed_pairs(kind, n) == int(dense.sum())
    assert cpb.flops(kind, "fwd", n) == 4 * cpb.B * cpb.HQ * cpb.D * int(dense.sum())
    assert cpb.flops(kind, "fwd+bwd", n) == 3.5 * cpb.flops(kind, "fwd", n)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("case", ["causal", "causal_contiguous", "window", "longformer"])
def test_rank_pairs_are_the_rows_each_rank_holds(cpb, case, world):
    n = 1000
    kind, layout = cpb.CASES[case]
    dense = cpb.build_mask(kind, n).materialize(n, n).reshape(n, n)
    got = cpb.rank_pairs(case, world, n)
    want = [int(dense[cp_layout.positions(layout, r, world, n)].sum()) for r in range(world)]
    assert got == want
    assert cpb.rank_pairs(case, world, n, "single") == [int(dense.sum())]


# -- prediction, skips, timed calls --------------------------------------------------------------

def test_prediction_scales_a_measured_rate_by_the_busiest_ranks_pairs(cpb):
    spec = cpb.Spec("causal_contiguous", "mask", "fwd", 2048, 4)
    rate = cpb.measured_rate(spec, 3.0, cores=2)  # 4 processes on 2 cores: each runs at half speed
    busiest = max(cpb.rank_pairs("causal_contiguous", 4, 2048))
    assert rate == pytest.approx(3.0 / (busiest * 2))
    bigger = cpb.Spec("causal_contiguous", "ring", "fwd", 4096, 4)  # no ring rate yet: the mask's
    seconds, basis = cpb.predict(bigger, {cpb.rate_key(spec): rate}, cores=2)
    assert seconds == pytest.approx(3.0 * max(cpb.rank_pairs("causal_contiguous", 4, 4096)) / busiest)
    assert "measured mask" in basis
    prior = {cpb.prior_key("causal", "fwd", False): 1e-9, cpb.prior_key("causal", "fwd", True): 1.0}
    seconds, basis = cpb.predict(bigger, prior, cores=8)  # enough cores: no sharing factor
    assert seconds == pytest.approx(1e-9 * cpb.PRIOR_SAFETY * max(cpb.rank_pairs("causal_contiguous", 4, 4096)))
    assert "prior" in basis


def test_skip_reasons_name_the_estimate_and_the_limit(cpb):
    assert cpb.skip_reason(10.0, "x", case_budget_s=60, time_left_s=100) is None
    over = cpb.skip_reason(75.0, "x", case_budget_s=60, time_left_s=1000)
    assert "75 s" in over and "--case-budget-s 60" in over
    late = cpb.skip_reason(30.0, "x", case_budget_s=60, time_left_s=20)
    assert "30 s" in late and "--max-total-minutes" in late


def test_timed_calls_stop_at_reps_budget_or_time(cpb):
    assert cpb.another_call([1.0], reps=3, case_budget_s=60, time_left_s=100)
    assert not cpb.another_call([1.0, 1.0, 1.0], reps=3, case_budget_s=60, time_left_s=100)
    assert not cpb.another_call([20.0], reps=3, case_budget_s=60, time_left_s=1000)  # 40 s > 60 / 2
    assert cpb.another_call([15.0], reps=3, case_budget_s=60, time_left_s=1000)  # 30 s fits
    assert not cpb.another_call([12.0, 12.0], reps=3, case_budget_s=60, time_left_s=1000)  # 24 s + 12 s > 30
    assert not cpb.another_call([5.0], reps=3, case_budget_s=60, time_left_s=4)


def test_specs_cover_every_case_and_say_why_some_are_not_run(cpb):
    cases, ns, modes = tuple(cpb.CASES), (512, 1024), cpb.MODES
    for world in (1, 2):
        run, never = cpb.plan_specs(world, cases, ns, modes)
        schedules = ("single", "mask", "ring") if world == 1 else ("mask", "ring")
        assert len(run) + len(never) == len(cases) * len(ns) * len(modes) * len(schedules)
        assert all(reason for _, reason in never)
        assert all(s.schedule != "ring" for s in run) if world == 1 else not never
        priors = {cpb.prior_key(k, m, single): 1e-9 * (1 + single) for k in ("causal", "window", "longformer")
                  for m in modes for single in (True, False)}
        ordered = cpb.order_specs(run, priors, cores=2)
        first = [s for s in ordered if s.n == min(ns)]  # every (case, schedule, mode) once, then by cost
        assert ordered[:len(first)] == first and len(first) == len(run) // len(ns)
        rest = [cpb.predict(s, priors, 2)[0] for s in ordered[len(first):]]
        assert rest == sorted(rest)
        assert set(ordered) == set(run)


# -- the script, end to end ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick(tmp_path_factory, cpb):
    out = tmp_path_factory.mktemp("cp_quick")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "context_parallel_cpu.py"), "--quick", "--out-dir",
                           str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("context_parallel_cpu_quick_*.json")
    assert path.with_suffix(".md").exists()
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_quick_run_measures_every_case_exactly(cpb, quick):
    doc, _ = quick
    rows = doc["rows"]
    want = {(c, s, m, n, p) for p in cpb.QUICK_PS for c in cpb.CASES for n in cpb.QUICK_NS for m in cpb.MODES
            for s in (("single", "mask", "ring") if p == 1 else ("mask", "ring"))}
    assert {(r["case"], r["schedule"], r["mode"], r["N"], r["P"]) for r in rows} == want
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["status"] for r in rows} <= {"ok", "not applicable"} and len(ok) > len(rows) / 2
    for r in ok:
        assert r["max_abs_err"] < 1e-4, r
        assert 1 <= len(r["times_s"]) <= 2 and r["median_s"] > 0
        n, kind = r["N"], r["mask"]
        assert r["pairs"] == int(cpb.build_mask(kind, n).materialize(n, n).sum())
    assert [g["P"] for g in doc["groups"]] == list(cpb.QUICK_PS) and all(not g["errors"] for g in doc["groups"])


def test_quick_run_ring_sends_whole_shards_and_mask_no_more(cpb, quick):
    doc, _ = quick
    by = {(r["case"], r["schedule"], r["mode"], r["N"], r["P"]): r for r in doc["rows"] if r["status"] == "ok"}
    s = doc["settings"]
    per_key = cpb.B * s["Hkv"] * 2 * s["D"] * 4  # one position's k and v, fp32
    for (case, schedule, mode, n, p), r in by.items():
        if p == 1:
            assert r["bytes_sent_max"] == 0
            continue
        layout = cpb.CASES[case][1]
        if schedule == "ring" and mode == "fwd":  # every rank's shard to each of the P - 1 others
            shards = [(p - 1) * cp_layout.local_size(layout, q, p, n) * per_key for q in range(p)]
            if case == "longformer":  # both schedules also send the global rows' queries and partials
                assert all(b >= w for b, w in zip(r["bytes_sent"], shards)), (r["bytes_sent"], shards)
            else:
                assert r["bytes_sent"] == shards
        if schedule == "mask":
            ring = by[(case, "ring", mode, n, p)]
            assert r["bytes_sent_max"] <= ring["bytes_sent_max"]
            if case in ("window", "longformer") and n // p > cpb.W:  # a neighbour's W edge keys, not its shard
                assert r["bytes_sent_max"] < ring["bytes_sent_max"]


def test_quick_run_markdown_has_a_table_per_case_and_mode(cpb, quick):
    doc, md = quick
    for case in cpb.CASES:
        for mode in cpb.MODES:
            assert f"### {case} ({cpb.CASES[case][1]}), {mode}" in md
    assert "n/a" in md and "Load average" in md and doc["settings"]["cores"] >= 1
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCHMARKS.parent, capture_output=True, text=True)
    if commit.returncode == 0:  # the results name the code that made them
        assert doc["header"]["git_commit"] == commit.stdout.strip() and commit.stdout.strip()[:10] in md
