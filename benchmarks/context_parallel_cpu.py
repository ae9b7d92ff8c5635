"""Context-parallel attention on the CPU: the mask-aware schedule against Ring Attention's traffic.

    python benchmarks/context_parallel_cpu.py [--ps 1,2,4] [--ns 16384,32768,65536,131072,262144]
        [--cases causal,causal_contiguous,window,longformer] [--modes fwd,fwd+bwd] [--reps 3]
        [--case-budget-s 60] [--max-total-minutes 25] [--out-dir benchmarks/results] [--quick]

Problem. One sequence of N positions, fp32, B=1, Hq=2, Hkv=2, D=32 (``--heads/--kv-heads/--head-dim``),
sharded over P gloo processes on this machine, each on ONE torch thread. Cases (mask, layout):
  causal             ``ak.causal()``, zigzag layout (balanced)
  causal_contiguous  ``ak.causal()``, contiguous layout: the last rank sees (2P-1)x the first's keys
  window             ``ak.sliding_window(256)`` (256 keys each side), contiguous (a rank needs only
                     its neighbours' edges)
  longformer         ``sliding_window(256) | global_tokens(16 positions round(linspace(0, N-1, 16)))``
                     (``attnkit.bench.process.named_mask("longformer")``), contiguous
Schedules: ``mask`` (``context_parallel_attention(schedule="mask")``: only the keys the receiver's
queries may see), ``ring`` (``schedule="ring"``: every key shard to every rank, Ring Attention's
traffic, the baseline) and, at P=1 only, ``single``: ``ak.attention`` on the whole sequence in one
process. At P=1 ``ring`` sends nothing and equals ``mask``, so it is not run (a row says so).

Method. The P processes are spawned once per P (``torch.multiprocessing`` spawn, gloo over a free
local port) and run every case of that P in turn. Per case: one untimed warm-up call at a small N
(the first time a (case, schedule, mode) runs in a process), then up to ``--reps`` timed calls at
the real N, fewer when the next one would push the case's calls past half of ``--case-budget-s``
or the run past its time (at least one). Each timed call starts after a barrier; a call's time is the MAX over the
ranks of each rank's own wall time (the slowest rank is the call's time); the median over the calls
is reported, with each rank's median (the imbalance). ``fwd`` runs under no_grad; ``fwd+bwd``
backpropagates a fixed upstream gradient into q, k, v. The first timed call of an N also builds the
plan for that N (cached by attnkit afterwards). Bytes: ``CommStats`` of one call on each rank
(forward; forward + backward for fwd+bwd), max and mean over the ranks. Correctness: the first timed
call's output rows (and dq rows for fwd+bwd) at about 8 positions per rank are compared with float64
``ak.attention(impl="reference")`` on those rows (the mask evaluated on them, never N x N).
FLOPs: useful work only, ``4*B*Hq*D`` per allowed (query, key) pair forward, x3.5 forward+backward;
the pairs are counted exactly from the mask's structure (``row_counts``).

Order and skips, never silent. Within a P every (case, schedule, mode) runs at the smallest N first,
then the rest cheapest predicted first, so a run short of time loses its most expensive cases. A case's time is predicted before it runs: seconds per allowed
pair of the busiest rank, from the last measured case of the same (case, schedule, mode) (or, before
any, from a single-process calibration at N=2048, times 2), times that rank's pairs at this N, times
P / cores when the processes outnumber the cores. A case predicted above ``--case-budget-s`` per
call, or beyond the time left, is recorded "skipped" with the estimate. ``--max-total-minutes`` is
shared out over the P groups (each gets what is left divided by the groups left). ON A MACHINE WITH
FEWER CORES THAN P the processes share cores: such times measure communication and work, not
speed-up; the results record the cores and the load average before and after each group.

Outputs: ``<out-dir>/context_parallel_cpu_<YYYY-MM-DDTHHMM>.json`` and ``.md`` (``_quick_`` in the
name with ``--quick``), rewritten after each case, so a killed run keeps what it measured.
``--quick``: P in {1, 2}, N in {512, 1024}, 2 reps, no warm-up calls (the smoke test; seconds).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import queue
import socket
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

import attnkit as ak
from attnkit.bench.cpu import CommaList, header
from attnkit.bench.process import LONGFORMER_GLOBALS, LONGFORMER_WINDOW, named_mask
from attnkit.cli._paths import OutputPathError, prepare_output_dir
from attnkit.distributed import layout as cp_layout

B, HQ, HKV, D = 1, 2, 2, 32
W = LONGFORMER_WINDOW  # the window of "window" and "longformer": W keys each side
CASES = {"causal": ("causal", "zigzag"), "causal_contiguous": ("causal", "contiguous"),
         "window": ("window", "contiguous"), "longformer": ("longformer", "contiguous")}
MODES = ("fwd", "fwd+bwd")
NS, PS = (16384, 32768, 65536, 131072, 262144), (1, 2, 4)
QUICK_NS, QUICK_PS = (512, 1024), (1, 2)
CALIBRATION_N, WARM_N, PRIOR_SAFETY = 2048, 512, 2.0
SAMPLED_PER_RANK = 8
FLOP_FORMULA = "useful FLOPs = 4*B*Hq*D per allowed (query, key) pair forward, x3.5 forward+backward"
MB = 1e6


@dataclass(frozen=True)
class Dims:
    """Head counts and head dimension of every case."""

    hq: int = HQ
    hkv: int = HKV
    d: int = D


# -- masks and their exact pair counts ---------------------------------------------------------

def build_mask(kind: str, n: int) -> ak.Mask:
    """The mask of ``kind`` ("causal", "window", "longformer") for a sequence of n."""
    if kind == "causal":
        return ak.causal()
    if kind == "window":
        return ak.sliding_window(W)
    if kind == "longformer":
        return named_mask("longformer", n)
    raise ValueError(f"unknown mask kind {kind!r}; expected one of causal, window, longformer")


def global_positions(n: int) -> torch.Tensor:
    """(G,) the sorted unique global positions of "longformer" at n (as ``named_mask`` places them)."""
    return torch.linspace(0, n - 1, LONGFORMER_GLOBALS).round().long().unique()


def row_counts(kind: str, n: int) -> torch.Tensor:
    """(n,) int64: how many keys each query position may see, from the mask's structure (no n x n)."""
    i = torch.arange(n)
    if kind == "causal":
        return i + 1
    lo, hi = (i - W).clamp(min=0), (i + W).clamp(max=n - 1)
    window = hi - lo + 1
    if kind == "window":
        return window
    if kind != "longformer":
        raise ValueError(f"unknown mask kind {kind!r}")
    g = global_positions(n)
    inside = torch.searchsorted(g, hi, right=True) - torch.searchsorted(g, lo)  # globals in the window
    counts = window + g.numel() - inside  # the window plus the global keys outside it
    counts[g] = n  # a global query sees every key
    return counts


def allowed_pairs(kind: str, n: int) -> int:
    """(query, key) pairs the mask allows on an n x n problem."""
    return int(row_counts(kind, n).sum())


def rank_pairs(case: str, world: int, n: int, schedule: str = "mask") -> list[int]:
    """Allowed pairs each rank's queries hold (the work of each rank); the whole problem for "single"."""
    kind, layout = CASES[case]
    counts = row_counts(kind, n)
    if schedule == "single":
        return [int(counts.sum())]
    return [int(counts[cp_layout.positions(layout, r, world, n)].sum()) for r in range(world)]


def flops(kind: str, mode: str, n: int, dims: Dims = Dims()) -> float:
    """Useful FLOPs of one call: ``4*B*Hq*D`` per allowed pair forward, x3.5 forward+backward."""
    return 4.0 * B * dims.hq * dims.d * allowed_pairs(kind, n) * (3.5 if mode == "fwd+bwd" else 1.0)


# -- the cases, their prediction and the skip rule ------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One measurement: a case (mask, layout) under a schedule and mode at N on P processes."""

    case: str
    schedule: str
    mode: str
    n: int
    world: int


def plan_specs(world: int, cases: Sequence[str], ns: Sequence[int], modes: Sequence[str]) -> tuple[list[Spec], list[tuple[Spec, str]]]:
    """(specs to run on ``world`` processes, specs not applicable with the reason), by case, then N
    ascending, then schedule, then mode (``order_specs`` puts them cheapest first)."""
    run, never = [], []
    for case in cases:
        for n in ns:
            for schedule in (("single", "mask", "ring") if world == 1 else ("mask", "ring")):
                for mode in modes:
                    spec = Spec(case, schedule, mode, n, world)
                    if world == 1 and schedule == "ring":
                        never.append((spec, "P=1: ring sends nothing and is the mask schedule's call"))
                    elif world == 1 and case == "causal_contiguous":
                        never.append((spec, "P=1: one shard, no imbalance; the same work as causal"))
                    else:
                        run.append(spec)
    return run, never


def order_specs(specs: list[Spec], rates: dict, cores: int) -> list[Spec]:
    """``specs`` in the order to run them: every (case, schedule, mode) at its smallest N first (so
    each has a measured rate before its larger N are predicted), then cheapest predicted first
    (stable: N ascending within a case, schedule and mode), so a run short of time skips its most
    expensive cases."""
    smallest = min(s.n for s in specs) if specs else 0
    return sorted(specs, key=lambda s: (s.n > smallest, predict(s, rates, cores)[0]))


def oversubscription(world: int, cores: int) -> float:
    """How many processes share a core (1 when there are enough cores)."""
    return max(1.0, world / max(1, cores))


def rate_key(spec: Spec) -> tuple[str, str, str]:
    return spec.case, spec.schedule, spec.mode


def predict(spec: Spec, rates: dict, cores: int) -> tuple[float, str]:
    """(predicted seconds of one call, where the rate came from). ``rates`` maps (case, schedule,
    mode) to measured seconds per allowed pair of the busiest rank per core share, and
    ``prior_key(...)`` to the single-process calibration."""
    busiest = max(rank_pairs(spec.case, spec.world, spec.n, spec.schedule))
    share = oversubscription(spec.world, cores)
    for key in (rate_key(spec), (spec.case, "mask", spec.mode)):
        if key in rates:
            return rates[key] * busiest * share, f"measured {key[1]} rate"
    kind = CASES[spec.case][0]
    prior = rates[prior_key(kind, spec.mode, spec.schedule == "single")]
    return prior * PRIOR_SAFETY * busiest * share, "calibration prior x2"


def measured_rate(spec: Spec, seconds: float, cores: int) -> float:
    """Seconds per allowed pair of the busiest rank per core share, from a measured call."""
    busiest = max(rank_pairs(spec.case, spec.world, spec.n, spec.schedule))
    return seconds / (busiest * oversubscription(spec.world, cores))


def skip_reason(predicted_s: float, basis: str, case_budget_s: float, time_left_s: float) -> str | None:
    """Why a case predicted to take ``predicted_s`` per call is not run, or None to run it."""
    if predicted_s > case_budget_s:
        return f"predicted {predicted_s:.0f} s per call ({basis}) > --case-budget-s {case_budget_s:g}"
    if predicted_s > time_left_s:
        return (f"predicted {predicted_s:.0f} s per call ({basis}) > the {max(0.0, time_left_s):.0f} s left "
                "of this P's share of --max-total-minutes")
    return None


def another_call(times: Sequence[float], reps: int, case_budget_s: float, time_left_s: float) -> bool:
    """Whether to time one more call after ``times`` (each call's seconds): up to ``reps`` calls,
    while the next (estimated as the last) keeps the case's calls within half its per-call budget
    (coverage before repetition) and the run within its time."""
    if len(times) >= reps:
        return False
    return sum(times) + times[-1] <= case_budget_s / 2 and times[-1] <= time_left_s


def prior_key(kind: str, mode: str, single: bool) -> tuple:
    """The calibration's key: ``ak.attention`` alone (``single``) or with its lse, as each rank runs a pair."""
    return "prior", kind, mode, "single" if single else "pair"


def _seconds_per_pair(kind: str, mode: str, n: int, dims: Dims, single: bool) -> float:
    """One timed call of ``ak.attention`` (after an untimed one) divided by its allowed pairs."""
    mask, grad = build_mask(kind, n), mode == "fwd+bwd"
    q, k, v = (torch.randn(B, h, n, dims.d) for h in (dims.hq, dims.hkv, dims.hkv))
    for _ in range(2):  # the first call pays one-off start-up costs: the second is timed
        leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        t0 = time.perf_counter()
        with torch.set_grad_enabled(grad):
            outs = ak.attention(*leaves, mask=mask, return_lse=not single)
            if grad:
                outs = (outs,) if single else outs
                torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
    return (time.perf_counter() - t0) / allowed_pairs(kind, n)


def calibrate(cases: Sequence[str], modes: Sequence[str], dims: Dims, n: int = CALIBRATION_N) -> dict:
    """Seconds per allowed pair in this process, per (mask kind, mode), of ``ak.attention`` (the
    "single" schedule) and of ``ak.attention(return_lse=True)`` (what each rank runs per pair; under
    autograd it cannot use torch's fused kernels): ``{prior_key(kind, mode, single): rate}``."""
    return {prior_key(kind, mode, single): _seconds_per_pair(kind, mode, n, dims, single)
            for kind in sorted({CASES[c][0] for c in cases}) for mode in modes for single in (True, False)}


# -- one process group: every case of one P ------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agree(obj, rank: int):
    """Rank 0's ``obj`` on every rank (decisions that depend on the clock must agree)."""
    import torch.distributed as dist
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(values: Sequence[float], world: int) -> list[list[float]]:
    """Every rank's ``values`` (floats), indexed [rank][i]."""
    import torch.distributed as dist
    mine = torch.tensor(list(values), dtype=torch.float64)
    got = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(got, mine)
    return [g.tolist() for g in got]


class Problem:
    """Seeded whole-sequence q, k, v, dout (kept for the reference rows) and this rank's shards."""

    def __init__(self, spec: Spec, rank: int, dims: Dims, seed: int = 0):
        gen = torch.Generator().manual_seed(seed + spec.n)
        shapes = [(B, h, spec.n, dims.d) for h in (dims.hq, dims.hkv, dims.hkv, dims.hq)]
        self.q, self.k, self.v, self.dout = (torch.randn(s, generator=gen) for s in shapes)
        kind, layout = CASES[spec.case]
        self.mask, self.spec = build_mask(kind, spec.n), spec
        if spec.schedule == "single":
            self.pos = torch.arange(spec.n)
        else:
            self.pos = cp_layout.positions(layout, rank, spec.world, spec.n)
        self.local = [t.index_select(2, self.pos) for t in (self.q, self.k, self.v, self.dout)]

    def sampled(self) -> torch.Tensor:
        """Local row indices to check: evenly spread, plus the global-token rows this rank holds."""
        n = self.pos.numel()
        rows = torch.linspace(0, n - 1, SAMPLED_PER_RANK - 2).round().long()
        if CASES[self.spec.case][0] == "longformer":
            held = torch.isin(self.pos, global_positions(self.spec.n)).nonzero().flatten()[:2]
            rows = torch.cat([rows, held])
        return rows.unique()

    def reference(self, rows: torch.Tensor, need_dq: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float64 (out, dq) of local ``rows``, each (B, Hq, r, D), from the mask on those rows."""
        g, n = self.pos[rows], self.spec.n
        truth = self.mask.evaluate(g, torch.arange(n), n, n)  # (1, 1, r, N)
        qr = self.q[:, :, g].double().requires_grad_(need_dq)
        with torch.set_grad_enabled(need_dq):
            out = ak.attention(qr, self.k.double(), self.v.double(), mask=truth, impl="reference")
            dq = torch.autograd.grad(out, qr, self.dout[:, :, g].double())[0] if need_dq else None
        return out.detach(), dq


def _call(spec: Spec, p: Problem, leaves, stats):
    """One forward (or forward + backward) of ``spec`` on this rank; its output."""
    from attnkit.distributed import context_parallel_attention
    grad = spec.mode == "fwd+bwd"
    with torch.set_grad_enabled(grad):
        if spec.schedule == "single":
            out = ak.attention(*leaves, mask=p.mask)
        else:
            out = context_parallel_attention(*leaves, mask=p.mask, layout=CASES[spec.case][1], schedule=spec.schedule,
                                             stats=stats, timeout_s=3600.0)
        if grad:
            out.backward(p.local[3])
    return out.detach()


def _timed_call(spec: Spec, p: Problem, stats) -> tuple[float, torch.Tensor, torch.Tensor | None]:
    """(this rank's seconds, out, dq) of one call started after a barrier."""
    import torch.distributed as dist
    leaves = [t.clone().requires_grad_(spec.mode == "fwd+bwd") for t in p.local[:3]]
    dist.barrier()
    t0 = time.perf_counter()
    out = _call(spec, p, leaves, stats)
    return time.perf_counter() - t0, out, leaves[0].grad


def _max_error(p: Problem, out: torch.Tensor, dq: torch.Tensor | None) -> float:
    rows = p.sampled()
    ref_out, ref_dq = p.reference(rows, dq is not None)
    err = (out[:, :, rows].double() - ref_out).abs().max().item()
    if dq is not None:
        err = max(err, (dq[:, :, rows].double() - ref_dq).abs().max().item())
    return err


class Group:
    """The cases of one P, run in every process of the group in the same order."""

    def __init__(self, rank: int, world: int, cfg: dict):
        self.rank, self.world, self.cfg = rank, world, cfg
        self.rates, self.warm = dict(cfg["rates"]), set()
        self.dims = Dims(**cfg["dims"])

    def time_left(self) -> float:
        return self.cfg["deadline"] - time.time()

    def run(self, spec: Spec) -> dict:
        from attnkit.distributed import CommStats
        cfg = self.cfg
        predicted, basis = predict(spec, self.rates, cfg["cores"])
        reason = _agree(skip_reason(predicted, basis, cfg["case_budget_s"], self.time_left()), self.rank)
        row = base_row(spec, self.dims, predicted, basis)
        if reason is not None:
            return {**row, "status": "skipped", "reason": reason}
        if cfg["warm_up"] and rate_key(spec) not in self.warm:  # thread pools, lazy imports, first messages: not timed
            small = Spec(*rate_key(spec), WARM_N, spec.world)
            _timed_call(small, Problem(small, self.rank, self.dims), None)
            self.warm.add(rate_key(spec))
        p = Problem(spec, self.rank, self.dims)
        times, stats = [], CommStats()
        secs, out, dq = _timed_call(spec, p, stats)
        err = _max_error(p, out, dq)
        first = [secs, float(stats.bytes_sent), float(stats.bytes_received), float(stats.messages_sent), err]
        table = _gather(first, self.world)  # [rank][secs, sent, received, messages, err]
        times.append([r[0] for r in table])
        while _agree(another_call([max(t) for t in times], cfg["reps"], cfg["case_budget_s"], self.time_left()),
                     self.rank):
            times.append([r[0] for r in _gather([_timed_call(spec, p, None)[0]], self.world)])
        per_call = [max(t) for t in times]
        median = statistics.median(per_call)
        self.rates[rate_key(spec)] = measured_rate(spec, median, cfg["cores"])
        sent = [r[1] for r in table]
        return {**row, "status": "ok", "times_s": per_call, "median_s": median,
                "rank_median_s": [statistics.median(t[r] for t in times) for r in range(self.world)],
                "bytes_sent": sent, "bytes_sent_max": max(sent), "bytes_sent_mean": sum(sent) / len(sent),
                "bytes_received": [r[2] for r in table], "messages_sent": [r[3] for r in table],
                "max_abs_err": max(r[4] for r in table),
                "gflops": flops(CASES[spec.case][0], spec.mode, spec.n, self.dims) / median / 1e9}


def base_row(spec: Spec, dims: Dims, predicted_s: float | None, basis: str | None) -> dict:
    """What every row of ``spec`` says, run or not."""
    kind, layout = CASES[spec.case]
    pairs = rank_pairs(spec.case, spec.world, spec.n, spec.schedule)
    return {**asdict(spec), "P": spec.world, "N": spec.n, "mask": kind, "layout": "whole" if spec.schedule == "single"
            else layout, "pairs": allowed_pairs(kind, spec.n), "pairs_per_rank": pairs, "pairs_max_rank": max(pairs),
            "flops": flops(kind, spec.mode, spec.n, dims), "predicted_s": predicted_s, "prediction_basis": basis}


def _worker(rank: int, world: int, port: int, specs: list[Spec], cfg: dict, out) -> None:
    """A process of the group: gloo, one thread, every spec; rank 0 reports each row."""
    import datetime
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(hours=2))
        group = Group(rank, world, cfg)
        for spec in specs:
            row = group.run(spec)
            if rank == 0:
                out.put(("row", rank, row))
        out.put(("done", rank, None))
    except BaseException:  # noqa: BLE001 - the parent records it, with the rank
        out.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_group(world: int, specs: list[Spec], cfg: dict, on_row) -> None:
    """Spawn ``world`` processes, run ``specs`` in them, call ``on_row`` with each row as it arrives;
    a rank that raises or a group that overruns its time ends the group, its unrun specs recorded."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, cfg["port"], specs, cfg, out),
                         daemon=True) for r in range(world)]
    for proc in procs:
        proc.start()
    hard_stop = cfg["deadline"] + 2 * cfg["case_budget_s"] + 180
    done, got, failure = set(), 0, None
    try:
        while len(done) < world and failure is None:
            try:
                kind, rank, value = out.get(timeout=max(1.0, min(30.0, hard_stop - time.time())))
            except queue.Empty:
                if time.time() > hard_stop:
                    failure = f"P={world}: stopped, past the group's time by {time.time() - cfg['deadline']:.0f} s"
                elif dead := [r for r, p in enumerate(procs) if not p.is_alive() and r not in done]:
                    failure = f"P={world}: rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]})"
                continue
            if kind == "row":
                on_row(value)
                got += 1
            elif kind == "done":
                done.add(rank)
            else:
                failure = f"P={world}: rank {rank} raised:\n{value}"
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    if failure is not None:
        print(failure, file=sys.stderr, flush=True)
        for spec in specs[got:]:
            on_row({**base_row(spec, Dims(**cfg["dims"]), None, None), "status": "error",
                    "reason": failure.splitlines()[0] + " (see the group's error in the JSON)"})
        cfg.setdefault("errors", []).append(failure)


# -- results ----------------------------------------------------------------------------------------

def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"


def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / MB:.2f}" if x < 10 * MB else f"{x / MB:.0f}"


def _cell(r: dict | None, what: str) -> str:
    if r is None:
        return ""
    if r["status"] == "not applicable":
        return "n/a"
    if r["status"] != "ok":
        est = f" (~{_s(r['predicted_s'])} s)" if r.get("predicted_s") is not None else ""
        return f"{r['status']}{est}" if what == "time" else "-"
    if what == "time":
        return _s(r["median_s"])
    return f"{_mb(r['bytes_sent_max'])} / {_mb(r['bytes_sent_mean'])}"


def _ratio(a: dict | None, b: dict | None, key: str) -> str:
    if not a or not b or a["status"] != "ok" or b["status"] != "ok" or not b[key]:
        return "-"
    return f"{a[key] / b[key]:.2f}x"


def summary_lines(rows: Sequence[dict], case: str, mode: str) -> list[str]:
    """One markdown table of a case and mode: mask vs ring (and ak.attention at P=1) per (N, P)."""
    by = {(r["schedule"], r["N"], r["P"]): r for r in rows if r["case"] == case and r["mode"] == mode}
    keys = sorted({(n, p) for (_, n, p) in by})
    if not keys:
        return []
    out = [f"### {case} ({CASES[case][1]}), {mode}", "",
           "| N | P | pairs, busiest rank | ak.attention s | mask s | ring s | ring / mask time | "
           "mask MB sent max / mean | ring MB sent max / mean | ring / mask bytes | mask rank s min-max | "
           "mask GFLOP/s | max err |", "|" + "---|" * 13]
    for n, p in keys:
        single, mask, ring = (by.get((s, n, p)) for s in ("single", "mask", "ring"))
        any_row = mask or ring or single
        ranks = f"{_s(min(mask['rank_median_s']))}-{_s(max(mask['rank_median_s']))}" if mask and mask["status"] == "ok" else "-"
        errs = [r["max_abs_err"] for r in (single, mask, ring) if r and r["status"] == "ok"]
        out.append(f"| {n} | {p} | {any_row['pairs_max_rank']:.3g} | {_cell(single, 'time')} | {_cell(mask, 'time')} | "
                   f"{_cell(ring, 'time')} | {_ratio(ring, mask, 'median_s')} | {_cell(mask, 'bytes')} | "
                   f"{_cell(ring, 'bytes')} | {_ratio(ring, mask, 'bytes_sent_max')} | {ranks} | "
                   f"{_s(mask['gflops']) if mask and mask['status'] == 'ok' else '-'} | "
                   f"{f'{max(errs):.1e}' if errs else '-'} |")
    return out + [""]


def _commit(h: dict) -> str:
    if not h.get("git_commit"):
        return "commit unknown"
    return f"commit {h['git_commit'][:10]}" + (", src/ modified" if h.get("src_modified") else "")


def markdown(doc: dict) -> str:
    """The results as markdown: machine, method, one table per (case, mode), what did not run."""
    h, s, rows = doc["header"], doc["settings"], doc["rows"]
    loads = "; ".join(f"P={g['P']}: {g['load_before']} -> {g.get('load_after', '?')}" for g in doc["groups"])
    lines = [f"# Context-parallel attention on the CPU: mask-aware vs ring, {h['date']}", "",
             f"{h['cpu_model']}, {s['cores']} cores usable ({h['cpu_count']} CPUs), {h['platform']}; torch "
             f"{h['torch_version']}, attnkit {h['attnkit_version']} ({_commit(h)}), gloo, 1 torch thread per process.",
             f"fp32, B={B}, Hq={s['Hq']}, Hkv={s['Hkv']}, D={s['D']}; window W={W} each side; longformer: W plus "
             f"{LONGFORMER_GLOBALS} global tokens at round(linspace(0, N-1, {LONGFORMER_GLOBALS})). {FLOP_FORMULA}.",
             f"Load average (1, 5, 15 min) before -> after each group: {loads}. {s['note']}", "",
             "Time: median over the timed calls of the slowest rank's wall time (barrier before each call), "
             f"up to {s['reps']} calls, fewer above {s['case_budget_s'] / 2:g} s in all (half --case-budget-s). Bytes: sent by a rank "
             "in one call (forward, or forward + backward), MB = 1e6 bytes, max / mean over the ranks. "
             "'ak.attention' is one process on the whole sequence (P=1). 'skipped (~x s)': predicted x s per call. "
             "'n/a': not run at P=1, where ring sends nothing (it is the mask schedule's call) and causal_contiguous "
             "is causal's work.", ""]
    if any(g["P"] > s["cores"] for g in doc["groups"]):
        lines += [f"**P > {s['cores']} cores: those processes share cores, so their times measure communication "
                  "and work, not speed-up.**", ""]
    for case in s["cases"]:
        for mode in s["modes"]:
            lines += summary_lines(rows, case, mode)
    notes = [f"- {r['case']} {r['schedule']} {r['mode']} N={r['N']} P={r['P']}: {r['status']}: {r['reason']}"
             for r in rows if r["status"] not in ("ok", "not applicable")]
    notes += [f"- {r['case']} {r['schedule']} {r['mode']} N={r['N']} P={r['P']}: max error {r['max_abs_err']:.2g} "
              "against float64 (over 1e-4)" for r in rows if r["status"] == "ok" and r["max_abs_err"] > 1e-4]
    return "\n".join(lines + (["## Not measured, and warnings", "", *notes] if notes else [])) + "\n"


def write_results(stem: Path, doc: dict) -> None:
    """(Re)write ``stem.json`` and ``stem.md``."""
    import json
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))


# -- driver and CLI ---------------------------------------------------------------------------------

def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def source_version() -> dict:
    """The checkout's git commit and whether src/ differs from it (None where git cannot say): the
    library changes fast, and a number belongs to the code that made it."""
    root = Path(__file__).resolve().parents[1]
    try:
        git = [subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=30)
               for cmd in (["rev-parse", "HEAD"], ["status", "--porcelain", "src"])]
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "src_modified": None}
    if any(g.returncode for g in git):
        return {"git_commit": None, "src_modified": None}
    return {"git_commit": git[0].stdout.strip(), "src_modified": bool(git[1].stdout.strip())}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(args: argparse.Namespace) -> dict:
    """Every P group in turn, the results rewritten after each row; the final document."""
    torch.set_num_threads(1)
    start, dims, cores = time.time(), Dims(args.heads, args.kv_heads, args.head_dim), usable_cores()
    tag = "quick_" if args.quick else ""
    stem = Path(args.out_dir) / f"context_parallel_cpu_{tag}{_dt.datetime.now():%Y-%m-%dT%H%M}"
    rates = calibrate(args.cases, args.modes, dims)
    doc = {"header": header(), "settings": {
        "dtype": "float32", "device": "cpu", "B": B, "Hq": dims.hq, "Hkv": dims.hkv, "D": dims.d, "W": W,
        "G": LONGFORMER_GLOBALS, "cases": list(args.cases), "case_layouts": {c: CASES[c] for c in args.cases},
        "ns": list(args.ns), "ps": list(args.ps), "modes": list(args.modes), "reps": args.reps,
        "case_budget_s": args.case_budget_s, "max_total_minutes": args.max_total_minutes, "cores": cores,
        "threads_per_process": 1, "backend": "gloo", "flop_formula": FLOP_FORMULA, "note": args.note,
        "calibration_s_per_pair": {" ".join(k[1:]): v for k, v in rates.items()}},
        "groups": [], "rows": []}
    doc["header"].pop("settings", None)
    doc["header"].update(source_version())
    stem.parent.mkdir(parents=True, exist_ok=True)

    def on_row(row: dict) -> None:
        doc["rows"].append(row)
        write_results(stem, doc)
        print(format_row(row), flush=True)

    deadline = start + 60 * args.max_total_minutes
    for i, world in enumerate(args.ps):
        specs, never = plan_specs(world, args.cases, args.ns, args.modes)
        specs = order_specs(specs, rates, cores)
        for spec, why in never:
            doc["rows"].append({**base_row(spec, dims, None, None), "status": "not applicable", "reason": why})
        share = (deadline - time.time()) / (len(args.ps) - i)
        group = {"P": world, "load_before": _load(), "share_s": round(share, 1)}
        doc["groups"].append(group)
        cfg = {"rates": rates, "deadline": time.time() + share, "case_budget_s": args.case_budget_s,
               "reps": args.reps, "warm_up": not args.quick, "cores": cores, "dims": asdict(dims), "port": free_port()}
        print(f"P={world}: {len(specs)} cases, {share:.0f} s, load {group['load_before']}", flush=True)
        t0 = time.time()
        run_group(world, specs, cfg, on_row)
        group.update(load_after=_load(), seconds=round(time.time() - t0, 1), errors=cfg.get("errors", []))
        for r in doc["rows"]:  # later groups start from what this one measured
            if r["P"] == world and r["status"] == "ok":
                rates[rate_key(Spec(r["case"], r["schedule"], r["mode"], r["N"], world))] = \
                    measured_rate(Spec(r["case"], r["schedule"], r["mode"], r["N"], world), r["median_s"], cores)
    doc["total_s"] = round(time.time() - start, 1)
    write_results(stem, doc)
    print(f"wrote {stem}.json and {stem}.md ({doc['total_s']:.0f} s)", flush=True)
    return doc


def format_row(r: dict) -> str:
    what = f"P={r['P']} N={r['N']:>6} {r['case']:<17} {r['schedule']:<6} {r['mode']:<7}"
    if r["status"] != "ok":
        return f"{what} {r['status']}: {r['reason']}"
    return (f"{what} {r['median_s']:8.3f} s x{len(r['times_s'])}  sent max {r['bytes_sent_max'] / MB:8.2f} MB  "
            f"{r['gflops']:6.2f} GFLOP/s  err {r['max_abs_err']:.1e}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ps", metavar="P,...", type=CommaList(int), default=None,
                   help=f"process counts (default {','.join(map(str, PS))}; --quick {','.join(map(str, QUICK_PS))})")
    p.add_argument("--ns", metavar="N,...", type=CommaList(int), default=None,
                   help=f"sequence lengths (default {','.join(map(str, NS))}; --quick {','.join(map(str, QUICK_NS))})")
    p.add_argument("--cases", metavar="C,...", type=CommaList(str), default=("window", "longformer", "causal",
                   "causal_contiguous"), help=f"from {{{','.join(CASES)}}} (default all, cheapest first)")
    p.add_argument("--modes", metavar="M,...", type=CommaList(str), default=MODES, help="from {fwd,fwd+bwd}")
    p.add_argument("--reps", type=int, default=None, help="timed calls per case at most (default 3; --quick 2)")
    p.add_argument("--case-budget-s", type=float, default=60.0,
                   help="skip a case predicted above this many seconds per call; also caps its timed calls (default 60)")
    p.add_argument("--max-total-minutes", type=float, default=30.0,
                   help="the whole run's time, shared out over the P groups; cases beyond it are skipped (default 30)")
    p.add_argument("--heads", type=int, default=HQ, help=f"query heads Hq (default {HQ})")
    p.add_argument("--kv-heads", type=int, default=HKV, help=f"key/value heads Hkv (default {HKV})")
    p.add_argument("--head-dim", type=int, default=D, help=f"head dimension D (default {D})")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (seconds)")
    p.add_argument("--note", default="", help="a line about the machine for the results (e.g. shared, loaded)")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the JSON / markdown go (created)")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.ps = args.ps or (QUICK_PS if args.quick else PS)
    args.ns = args.ns or (QUICK_NS if args.quick else NS)
    args.reps = args.reps or (2 if args.quick else 3)
    for what, got, allowed in (("case", args.cases, tuple(CASES)), ("mode", args.modes, MODES)):
        if bad := [x for x in got if x not in allowed]:
            p.error(f"unknown {what}(s) {bad}; choose from {list(allowed)}")
    if bad := [x for x in args.ps if x < 1]:
        p.error(f"--ps: process counts must be >= 1, got {bad}")
    if bad := [n for n in args.ns if n < 2 * max(args.ps)]:
        p.error(f"--ns: N must be at least 2 * max(P) = {2 * max(args.ps)} (zigzag cuts 2P chunks), got {bad}")
    if args.reps < 1 or args.case_budget_s <= 0 or args.max_total_minutes <= 0:
        p.error("--reps, --case-budget-s and --max-total-minutes must be positive")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # before any case: the results are written after each one
        args.out_dir = str(prepare_output_dir(args.out_dir, "--out-dir"))
    except OutputPathError as e:
        print(f"context_parallel_cpu: error: {e}", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
