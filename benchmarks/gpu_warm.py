"""Compile ahead for the tuning sweep (gpu_tune.py): before a (case, pass) slice is timed, worker
processes launch each of its candidates once at a small N, so that Triton's on-disk cache holds the
candidate's kernels when the sweep's own process first launches it.

Triton compiles a kernel at its first launch (seconds a candidate, expected; a backward candidate
compiles three), one at a time in the sweep's process, which would spend most of its time compiling.
A ``Warmer`` keeps a spawn ``ProcessPoolExecutor`` (the sweep's process holds a CUDA context: no
fork) of up to WARM_WORKERS processes for the whole sweep. Each worker runs ``warm_one``: the
candidate's call as the sweep makes it (``TuneInputs.applied``: the row in the table, explicit
plans, the table's schedule), forward and, for a backward candidate, backward, at ``warm_n``: the
same B, H, D, dtype and mask kind, and an N at which every int argument Triton specializes on
(equal to 1, divisible by 16) is as at the case's N, so the compiled kernels are the very ones the
sweep loads.

A candidate whose launch raises there, or whose worker dies while it runs it, is an error row of the
sweep ("failed in warm-up: ...") and is never launched in the sweep's process (a kernel that faults
there would break its CUDA context, and every later candidate with it). The warm-up gets a share of
the slice's time (gpu_tune.WARM_SHARE): no launch starts unless the longest one seen so far would
end before its deadline, and the workers still at it then are stopped. What it did not reach is
timed all the same, compiling at its first launch as before.
"""

from __future__ import annotations

import faulthandler
import itertools
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from attnkit.ops.block_plan import make_plan
from attnkit.ops.triton.configs import Config
from gpu_peers import device_ok, error_text
from gpu_tune import Candidate, TuneInputs

WARM_WORKERS = 12  # at most, and at most the CPU count: each compiles on one core and holds a CUDA context
WARM_NS = (1024, 2048, 3072, 4096, 6144, 8192)  # the Ns a warm-up launch may take, smallest first
WARM_STRIKES = 2  # a candidate in flight at this many unexplained worker deaths fails; as many deaths with
#                   no candidate started stop the warm-up for the rest of the sweep


@dataclass(frozen=True)
class WarmSpec:
    """One candidate's launch in a worker: the case (kind, B=1, H, D, dtype name) at ``N``, the
    candidate's pass and row, the device, and ``marker``: a file the worker holds, with its pid,
    while it runs the launch (what ties a worker's death to its candidate)."""

    case: str
    N: int
    D: int
    H: int
    dtype: str
    pass_: str
    config: Config
    device: str = "cuda"
    marker: str = ""


class ContextLost(RuntimeError):
    """Raised, without a launch, by a worker whose CUDA context broke at an earlier candidate."""


_context_lost: list = []  # in a worker: the error that broke its CUDA context, once seen
_fault_log: list = []  # in a worker: its open fault log (faulthandler writes to it on a crash)


def launch_once(spec: WarmSpec) -> None:
    """The candidate's call once at spec.N, as the sweep makes it (forward; backward too for a
    backward candidate), then a synchronize: its kernels compiled and in Triton's disk cache."""
    case = TuneInputs(spec.case, spec.N, spec.D, spec.H, spec.device, getattr(torch, spec.dtype))
    cand = Candidate(spec.pass_, spec.config)
    with case.applied(cand) as (fn, _):
        out = fn()
        if cand.pass_ == "bwd":
            case.grads(out)
    if case.dev.type == "cuda":
        torch.cuda.synchronize(case.dev)


def warm_one(spec: WarmSpec, launch=launch_once) -> float:
    """A worker's task (importable by name, as the spawn context needs): ``launch(spec)`` and its
    seconds. Raises what the launch raised, and ContextLost without launching once an earlier
    launch broke this worker's CUDA context (every later one would fail through no fault of its own)."""
    if _context_lost:
        raise ContextLost(f"this worker's CUDA context broke at an earlier candidate: {_context_lost[0]}")
    marker = Path(spec.marker) if spec.marker else None
    if marker:
        marker.write_text(str(os.getpid()))
    t0 = time.perf_counter()
    try:
        launch(spec)
    except Exception as e:
        if not device_ok(spec.device):
            _context_lost.append(error_text(e))
        raise
    finally:
        if marker:
            marker.unlink(missing_ok=True)
    return time.perf_counter() - t0


def worker_init(scratch: str) -> None:
    """A worker's set-up: one thread (the workers share the CPUs), a fault log at
    <scratch>/<pid>.fault that ``faulthandler`` writes if the process crashes (segfault, abort), and
    its CUDA context."""
    torch.set_num_threads(1)
    _fault_log.append(open(Path(scratch) / f"{os.getpid()}.fault", "w"))
    faulthandler.enable(file=_fault_log[0])
    if torch.cuda.is_available():
        torch.ones(1, device="cuda")


def specialization(n: int) -> tuple[bool, bool]:
    """What Triton specializes a kernel's int argument on: whether it is 1, whether 16 divides it."""
    return n == 1, n % 16 == 0


def warm_n(case: TuneInputs, fwd: Config) -> int:
    """The N of a warm-up launch for a call whose forward runs at ``fwd``'s blocks: the smallest of
    WARM_NS under the case's N at which the forward plan's work items (the _fwd kernel's N_ITEMS:
    its only int argument that a multiple-of-16 N does not fix) specialize as at the case's N;
    else the smallest (that forward then compiles again at its first launch in the sweep), or the
    case's N where it is smaller."""
    want = specialization(case.plan(fwd).q_work.shape[0])
    smaller = [n for n in WARM_NS if n < case.N]
    for n in smaller:
        if specialization(make_plan(case.mask, n, n, fwd.block_m, fwd.block_n, "cpu").q_work.shape[0]) == want:
            return n
    return smaller[0] if smaller else case.N


class Warmer:
    """Compiles candidates ahead in worker processes (module docstring), one pool kept across the
    sweep's slices and replaced when it breaks. ``submit(spec) -> Future`` of ``warm_one(spec)`` and
    ``kill()`` (stop every worker now) default to the spawn pool of ``workers`` processes; tests
    give their own, and a ``clock``. ``disabled``: why the warm-up stopped for good, if it did."""

    def __init__(self, workers: int | None = None, submit=None, kill=None, clock=time.monotonic, scratch=None):
        self.workers = workers or min(WARM_WORKERS, os.cpu_count() or 1)
        self.clock = clock
        self.scratch = Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="attnkit_warm_"))
        self._own_scratch = scratch is None
        self._submit, self._kill = submit or self._pool_submit, kill or self._pool_kill
        self._pool: ProcessPoolExecutor | None = None
        self._ids = itertools.count()
        self._ns: dict = {}
        self._idle_deaths = 0
        self.disabled: str | None = None

    def __enter__(self) -> Warmer:
        """Starts the pool's processes now, where it is the default one: they import torch and make
        their CUDA contexts while the sweep sets up its first case."""
        if self._submit == self._pool_submit:
            for _ in range(self.workers):
                self._executor().submit(os.getpid)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(stop=exc_type is not None)

    def close(self, stop: bool = False) -> None:
        """Ends the workers, once idle (they are, between slices) or, ``stop``, at once, and removes
        the scratch folder this Warmer made."""
        if self._pool is not None and not stop:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._kill()
        if self._own_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=worker_init, initargs=(str(self.scratch),))
        return self._pool

    def _pool_submit(self, spec: WarmSpec) -> Future:
        try:
            return self._executor().submit(warm_one, spec)
        except BrokenExecutor as e:  # a worker died while idle (at its start, say): as if it died now
            future = Future()
            future.set_exception(e)
            return future

    def _pool_kill(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for process in list((getattr(pool, "_processes", None) or {}).values()):  # no public kill before 3.14
            process.kill()
        pool.shutdown(wait=True, cancel_futures=True)  # its thread has seen them die: no stale pipe at exit

    def spec(self, case: TuneInputs, cand: Candidate) -> WarmSpec:
        """The candidate's launch at ``warm_n`` (kept per case and forward blocks)."""
        fwd = cand.config if cand.pass_ == "fwd" else case.shipped["fwd"]
        key = (case.case, case.N, case.D, case.H, fwd.block_m, fwd.block_n)
        if key not in self._ns:
            self._ns[key] = warm_n(case, fwd)
        return WarmSpec(case.case, self._ns[key], case.D, case.H, str(case.dtype).removeprefix("torch."), cand.pass_,
                        cand.config, str(case.dev), str(self.scratch / f"{next(self._ids)}.run"))

    def warm(self, case: TuneInputs, cands: list, deadline: float) -> dict:
        """rank -> outcome for the slice's candidates (ranks by their order in ``cands``), compiled
        ahead until ``deadline`` (``run``)."""
        if self.disabled:
            return {}
        return self.run({rank: self.spec(case, cand) for rank, cand in enumerate(cands)}, deadline)

    def run(self, specs: dict, deadline: float) -> dict:
        """rank -> {"warmed": True, "warm_s", "warm_n"} or {"error": "failed in warm-up: ..."}; a
        rank left out was not reached, or its worker was stopped at ``deadline``. At most
        ``workers`` launches in flight, started in rank order while the longest launch seen so far
        would still end before the deadline."""
        out, queue, running, strikes, longest = {}, deque(specs), {}, {}, 0.0
        while (queue or running) and not self.disabled:
            while queue and len(running) < self.workers and self.clock() + longest < deadline:
                rank = queue.popleft()
                running[self._submit(specs[rank])] = rank
            if not running:
                break
            done, _ = wait(running, timeout=max(0.0, deadline - self.clock()), return_when=FIRST_COMPLETED)
            if not done:  # the deadline: the workers still at it are stopped, their candidates not warmed
                self._kill()
                break
            broken, again = None, []
            for future in done:
                error = future.exception()
                if isinstance(error, BrokenExecutor):  # the pool is gone: every rank in flight is a suspect
                    broken = error
                    continue
                rank = running.pop(future)
                if error is None:
                    longest = max(longest, future.result())
                    out[rank] = {"warmed": True, "warm_s": round(future.result(), 2), "warm_n": specs[rank].N}
                elif isinstance(error, ContextLost):  # not this candidate's doing: again, in a fresh pool
                    again.append(rank)
                else:
                    out[rank] = {"error": f"failed in warm-up: {error_text(error)}"}
            if broken is not None:
                self._blame(list(running.values()), specs, strikes, out, broken)
            if broken is not None or again:  # a fresh pool for the ranks in flight and those to try again
                retry = sorted(r for r in [*running.values(), *again] if r not in out)
                for r in retry:
                    _take_marker(specs[r])  # a stopped run's marker would read as started after a later death
                queue.extendleft(reversed(retry))
                running.clear()
                self._kill()
        return out

    def _blame(self, suspects: list, specs: dict, strikes: dict, out: dict, error) -> None:
        """After a worker died: which of ``suspects`` (the ranks in flight) it was running. Its fault
        log names it (a segfault, an abort); else the only one that had started; else each one
        that had started takes a strike, and fails at WARM_STRIKES. Failures go to ``out``; the
        caller puts the rest back in the queue."""
        started = {r: pid for r in suspects if (pid := _take_marker(specs[r])) is not None}
        culprits = {r: text for r, pid in started.items() if (text := self._fault_text(pid))}
        if not culprits and len(started) == 1:
            culprits = {r: f"its worker process died ({error_text(error)})" for r in started}
        for r in started:
            if not culprits:
                strikes[r] = strikes.get(r, 0) + 1
            if r in culprits or strikes.get(r, 0) >= WARM_STRIKES:
                out[r] = {"error": "failed in warm-up: " + culprits.get(r, f"its worker died {strikes.get(r)} times "
                                                                              "while it ran, among others")}
        self._idle_deaths = 0 if started else self._idle_deaths + 1
        if self._idle_deaths >= WARM_STRIKES:
            self.disabled = f"the workers died {self._idle_deaths} times before any launch: {error_text(error)}"
            print(f"gpu_warm: warm-up stopped: {self.disabled}", flush=True)

    def _fault_text(self, pid: int) -> str:
        """The first line of worker ``pid``'s fault log ("" where it wrote none)."""
        path = self.scratch / f"{pid}.fault"
        lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return lines[0][:200] if lines else ""


def _take_marker(spec: WarmSpec) -> int | None:
    """The pid in the spec's marker file (its worker had started it and not finished), removed; None
    where there is none."""
    path = Path(spec.marker) if spec.marker else None
    if path is None or not path.exists():
        return None
    text = path.read_text().strip()
    path.unlink(missing_ok=True)
    return int(text) if text.isdigit() else -1
