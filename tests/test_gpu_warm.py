"""benchmarks/gpu_warm.py, the tuning sweep's compiling ahead in spawned worker processes, on the
CPU: failures become error rows, deadlines hold, a dying worker is traced to its candidate."""

from __future__ import annotations

import ctypes
import time
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from attnkit.ops.block_plan import make_plan  # noqa: E402
from attnkit.ops.triton import configs  # noqa: E402


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
