"""The tuning sweep of benchmarks/gpu.py --tune (issue 15; gpu.py's docstring says what it does):
each pass's candidate config rows on one case, checked, then timed, the shipped row first, within a
soft time limit shared by the (case, pass) slices (``tune``). A ``warmer`` (gpu_warm.py's
``Warmer``) may compile a slice's candidates ahead in other processes; a candidate that fails there
is an error row and is never launched here.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch

from attnkit.ops.block_plan import make_plan
from attnkit.ops.triton import configs as triton_configs
from attnkit.ops.triton.configs import Config, Schedule
from attnkit.ops.triton.op import triton_attention
from gpu_peers import CHECK_ROWS, TOLERANCE, case_mask, device_ok, error_text, reference_dq_rows, reference_rows, table_rows

TUNE_CASES = (("dense", 16384, 128, 16), ("causal", 16384, 64, 16), ("longformer", 65536, 64, 12))
TUNE_FWD_BLOCKS = ((128, 64), (128, 128), (64, 64), (64, 128))
TUNE_FWD_WARPS = (4, 8)
TUNE_FWD_STAGES = (2, 3, 4)
TUNE_BWD_BLOCKS = ((64, 128), (64, 64), (128, 64), (128, 128))
TUNE_BWD_WARPS = (4, 8)
TUNE_BWD_STAGES = (1, 2, 3)
TUNE_BWD_SCHEDULES = ({}, {"delta": "fused"}, {"dq": "atomic"})  # plain, delta in _bwd_dq, dq by atomics
TUNE_TMA = (False, True)
TUNE_FWD_PERSISTENT = (0, 2)  # the forward's grid: one program per work item, or 2 looping programs per SM
MAIN_KERNEL = {"fwd": "_fwd", "bwd": "_bwd_dkdv"}  # whose (warps, stages) a candidate's label shows
TUNE_LIMIT_S = 240.0  # --tune's default soft limit: no candidate starts after it
TUNE_SHARE = {"fwd": 1.0, "bwd": 2.0}  # each slice's part of the limit: a backward candidate compiles 3 kernels
WARM_SHARE = 0.5  # the part of a slice's time its warm-up may take (compiling ahead, gpu_warm.py)
TUNE_WARMUP_MS, TUNE_REP_MS = 10, 60  # do_bench per timing: each candidate compiles anew, compiles dominate
SMEM_BYTES = 227 * 1024  # sm_90's shared memory per block (H100, H200): candidates estimated above go last
CANDIDATE_SOURCE = "benchmarks/gpu.py --tune: a candidate being timed"


@dataclass(frozen=True)
class Candidate:
    """One pass's TABLE row to time (``config``); ``shipped``: the row the table holds now."""

    pass_: str
    config: Config
    shipped: bool = False

    def label(self) -> str:
        c = self.config
        warps, stages = c.launch[MAIN_KERNEL[self.pass_]]
        return f"{c.block_m}x{c.block_n} {warps}w {stages}s {c.schedule.spec() or 'plain'}"


def sweep_configs(pass_: str, shipped: Config) -> list[Config]:
    """Every candidate row of ``pass_`` (TUNE_FWD_* x TUNE_TMA x TUNE_FWD_PERSISTENT; TUNE_BWD_* x
    TUNE_BWD_SCHEDULES x TUNE_TMA): the backward's candidates give _bwd_dq and _bwd_dkdv the same
    (warps, stages) and keep the shipped row's _bwd_delta launch; the switches not swept (gqa,
    warp_specialize; the backward's persistent, which only the forward reads) stay the shipped row's."""
    if pass_ == "fwd":
        return [Config(bm, bn, {"_fwd": (w, s)}, replace(shipped.schedule, tma=t, persistent=p), CANDIDATE_SOURCE)
                for (bm, bn), w, s, t, p in itertools.product(TUNE_FWD_BLOCKS, TUNE_FWD_WARPS, TUNE_FWD_STAGES,
                                                               TUNE_TMA, TUNE_FWD_PERSISTENT)]
    delta = shipped.launch["_bwd_delta"]
    return [Config(bm, bn, {"_bwd_delta": delta, "_bwd_dq": (w, s), "_bwd_dkdv": (w, s)},
                   replace(shipped.schedule, **{"dq": "separate", "delta": "kernel", "tma": t, **switches}),
                   CANDIDATE_SOURCE)
            for (bm, bn), w, s, switches, t in itertools.product(TUNE_BWD_BLOCKS, TUNE_BWD_WARPS, TUNE_BWD_STAGES,
                                                                   TUNE_BWD_SCHEDULES, TUNE_TMA)]


def _same_choices(a: Config, b: Config) -> bool:
    return (a.block_m, a.block_n, a.launch, a.schedule) == (b.block_m, b.block_n, b.launch, b.schedule)


def distance(pass_: str, config: Config, shipped: Config) -> int:
    """How many choices differ from the shipped row: the blocks, warps, stages, each switch."""
    (w, s), (w0, s0) = config.launch[MAIN_KERNEL[pass_]], shipped.launch[MAIN_KERNEL[pass_]]
    return (int((config.block_m, config.block_n) != (shipped.block_m, shipped.block_n)) + int(w != w0) + int(s != s0)
            + sum(getattr(config.schedule, f.name) != getattr(shipped.schedule, f.name) for f in fields(Schedule)))


def smem_estimate(pass_: str, config: Config, D: int, elem_bytes: int = 2) -> int:
    """Rough shared memory (bytes) of the pass's largest kernel: the tiles it holds once plus
    ``stages`` copies of those it streams (forward: Q held, K and V streamed; dk/dv: K, V held, Q and
    dO streamed; dq: the other way round). No softmax or layout scratch: a prior, not a limit."""
    stages = config.launch[MAIN_KERNEL[pass_]][1]
    bm, bn = config.block_m, config.block_n
    if pass_ == "fwd":
        return elem_bytes * D * (bm + 2 * stages * bn)
    return elem_bytes * D * max(2 * bn + 2 * stages * bm, 2 * bm + 2 * stages * bn)


def prior(pass_: str, config: Config, shipped: Config, D: int) -> tuple:
    """The sweep's order (a cheap guess, no GPU): rows estimated to fit sm_90's shared memory
    first; among them the shipped row's neighbours first (fewest choices changed: the shipped rows
    compile without spills, so a neighbour most likely does too, and each choice's effect shows
    alone before a budget cut); then the larger estimated shared memory first (the shipped rows use
    little of Hopper's 227 KiB: deeper pipelines and larger tiles are where its headroom goes)."""
    smem = smem_estimate(pass_, config, D)
    return smem > SMEM_BYTES, distance(pass_, config, shipped), -smem, Candidate(pass_, config).label()


def excluded(config: Config, exclude) -> bool:
    """Whether the row turns on a switch of ``exclude`` ((field, value) pairs of Schedule)."""
    return any(getattr(config.schedule, name) == value for name, value in exclude)


def candidates(pass_: str, shipped: Config, D: int, exclude=()) -> list[Candidate]:
    """The shipped row first, then ``sweep_configs`` without it and without the rows that turn on
    a switch of ``exclude`` ((field, value) pairs), in ``prior``'s order."""
    swept = sorted((c for c in sweep_configs(pass_, shipped) if not _same_choices(c, shipped)
                    and not excluded(c, exclude)), key=lambda c: prior(pass_, c, shipped, D))
    return [Candidate(pass_, shipped, shipped=True), *(Candidate(pass_, c) for c in swept)]


# The GPU tests' ids of the switches the sweep turns on (tests/test_triton.py, test_case_table_on_the_gpu)
SWITCH_TESTS = {"atomic-dq": ("dq", "atomic"), "fused-delta": ("delta", "fused"), "tma": ("tma", True),
                "persistent": ("persistent", 2)}


def failed_switches(pytest_text: str, dtype: str = "bfloat16") -> list:
    """The (field, value) switches whose case-table test failed (or errored) on the GPU in
    ``dtype``, from pytest's -rfE summary: the sweep leaves them out (a kernel that faults breaks
    the CUDA context, and every later candidate with it)."""
    failed = re.findall(r"^(?:FAILED|ERROR) \S*test_case_table_on_the_gpu\[torch\." + dtype + r"-([\w-]+)\]",
                        pytest_text, re.M)
    return [SWITCH_TESTS[name] for name in dict.fromkeys(failed) if name in SWITCH_TESTS]


class TuneBudget:
    """A soft time limit shared by the (case, pass) slices still to run, in proportion to TUNE_SHARE
    (a slice that ends early leaves its time to the later ones); ``lost``: why no candidate may start
    any more (the CUDA context broke)."""

    def __init__(self, passes: list, limit_s: float, clock=time.monotonic):
        self.left, self.clock = list(passes), clock
        self.end = clock() + limit_s
        self.lost: str | None = None

    def deadline(self, pass_: str) -> float:
        """When the next slice, one of ``pass_``, starts its last candidate (called as it starts)."""
        now, shares = self.clock(), sum(TUNE_SHARE[p] for p in self.left)
        self.left.remove(pass_)
        return now + max(0.0, self.end - now) * TUNE_SHARE[pass_] / shares


class TuneInputs:
    """One case's inputs (B=1, fixed seed), its float32 reference rows, its plans by blocks and the
    shipped rows, shared by all its candidates."""

    def __init__(self, case: str, N: int, D: int, H: int, dev, dtype=torch.bfloat16):
        self.case, self.N, self.D, self.H, self.dev, self.dtype = case, N, D, H, torch.device(dev), dtype
        g = torch.Generator(device=self.dev).manual_seed(0)
        self.q, self.k, self.v = (torch.randn(1, H, N, D, device=self.dev, dtype=dtype, generator=g).requires_grad_()
                                  for _ in range(3))
        self.grad_out = torch.randn(1, H, N, D, device=self.dev, dtype=dtype, generator=g)
        self.mask = case_mask(case)
        self.kind = triton_configs.mask_kind(self.mask)
        self.rows = torch.linspace(0, N - 1, CHECK_ROWS).long()
        q, k, v = (t.detach() for t in (self.q, self.k, self.v))
        self.want = reference_rows(q, k, v, self.mask, self.rows)  # (1, H, r, D)
        self.want_dq = reference_dq_rows(q, k, v, self.mask, self.rows, self.grad_out)  # (1, H, r, D)
        self.shipped = {p: triton_configs.lookup(p, D, dtype, self.kind) for p in triton_configs.PASSES}
        self.shipped_grads = None  # (dk, dv) of the shipped backward, once it has run
        self._plans: dict = {}

    def key(self, pass_: str) -> tuple:
        return pass_, triton_configs.dtype_class(self.dtype), self.D, self.kind

    def info(self, pass_: str) -> dict:
        return {"case": self.case, "N": self.N, "D": self.D, "H": self.H,
                "dtype": str(self.dtype).replace("torch.", ""), "mask_kind": self.kind, "pass": pass_}

    def plan(self, config: Config):
        blocks = (config.block_m, config.block_n)
        if blocks not in self._plans:
            self._plans[blocks] = make_plan(self.mask, self.N, self.N, *blocks, self.dev)
        return self._plans[blocks]

    def call(self, cand: Candidate):
        """(fn() -> out, schedule): one call as the library makes it with the candidate's row in
        TABLE (call inside ``table_rows``, as ``applied`` does): explicit plans, at the candidate's
        blocks for its pass and the shipped row's for the other, and the table's schedule
        (``default_schedule``: one per call, so a backward candidate's tma reaches the forward too)."""
        rows = {**self.shipped, cand.pass_: cand.config}
        plan, plan_bwd = self.plan(rows["fwd"]), self.plan(rows["bwd"])
        schedule = triton_configs.default_schedule(self.D, self.dtype, self.kind)

        def fn():
            return triton_attention(self.q, self.k, self.v, mask=self.mask, plan=plan, plan_bwd=plan_bwd,
                                    schedule=schedule)[0]
        return fn, schedule

    @contextmanager
    def applied(self, cand: Candidate):
        """``call``'s (fn, schedule) with the candidate's row in TABLE for the block."""
        with table_rows({self.key(cand.pass_): cand.config}):
            yield self.call(cand)

    def grads(self, out) -> tuple:
        """(dq, dk, dv) of the loss sum(out * grad_out): the backward pass of a call."""
        return torch.autograd.grad(out, (self.q, self.k, self.v), self.grad_out)


def relative_err(a, b) -> float:
    """max |a - b| / max |b| in float32 (NaN stays NaN)."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()


def check_candidate(cand: Candidate, case: TuneInputs, fn) -> dict:
    """The checks before timing; raises on a miss (NaN misses). The output's sampled rows against the
    float32 reference (max abs error <= TOLERANCE). The backward also: dq on the sampled rows against
    the float32 reference (``reference_dq_rows``), and dk, dv against the shipped row's (each
    relative to the reference's largest entry, <= TOLERANCE); the shipped row's own dk, dv are only
    checked finite (as is every candidate's when the shipped backward failed)."""
    out = fn()
    errs = {"max_err": (out.detach()[:, :, case.rows.to(out.device)].float() - case.want).abs().max().item()}
    if cand.pass_ == "bwd":
        dq, dk, dv = case.grads(out)
        errs["dq_rows_err"] = relative_err(dq[:, :, case.rows.to(dq.device)], case.want_dq)
        if cand.shipped and case.shipped_grads is None:
            case.shipped_grads = (dk.detach(), dv.detach())
        if case.shipped_grads is not None and not cand.shipped:
            errs["dk_vs_shipped"] = relative_err(dk, case.shipped_grads[0])
            errs["dv_vs_shipped"] = relative_err(dv, case.shipped_grads[1])
        elif not (torch.isfinite(dk).all() and torch.isfinite(dv).all()):
            raise RuntimeError("dk or dv is not finite: not timed")
    for name, err in errs.items():
        if not err <= TOLERANCE:
            raise RuntimeError(f"{name} = {err:.3g} > {TOLERANCE}: not timed")
    return errs


def _bench(fn) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench``, L2 flushed between calls)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, return_mode="median")


def time_pass(pass_: str, fn, case: TuneInputs) -> dict:
    """"ms": the forward alone, or the backward as fwd+bwd minus fwd, both timed on this call
    (the forward at the shipped row, with the call's schedule)."""
    if pass_ == "fwd":
        ms = _bench(fn)
        return {"ms": ms, "fwd_ms": ms}
    both = _bench(lambda: case.grads(fn()))
    fwd = _bench(fn)
    return {"ms": both - fwd, "fwd_ms": fwd, "fwdbwd_ms": both}


def describe(cand: Candidate, case: TuneInputs) -> dict:
    c = cand.config
    return {"label": cand.label(), "shipped": cand.shipped, "block_m": c.block_m, "block_n": c.block_n,
            "launch": {k: list(v) for k, v in c.launch.items()}, "schedule": c.schedule.spec(),
            "distance": distance(cand.pass_, c, case.shipped[cand.pass_]),
            "smem_est_kib": smem_estimate(cand.pass_, c, case.D) // 1024}


def run_candidate(cand: Candidate, case: TuneInputs, rank: int, repeat: bool = False) -> dict:
    """One candidate's row, with its row in TABLE: checked (``check_candidate``), then timed
    (``time_pass``). An error (compile failure, out of shared memory, a wrong result) is the row's
    "error"; "check_s" includes the compile."""
    row = {**case.info(cand.pass_), **describe(cand, case), "rank": rank, **({"repeat": True} if repeat else {})}
    try:
        with case.applied(cand) as (fn, schedule):
            row["schedule_run"] = schedule.spec()
            t0 = time.perf_counter()
            row.update(check_candidate(cand, case, fn))
            row["check_s"] = round(time.perf_counter() - t0, 2)
            row.update(time_pass(cand.pass_, fn, case))
    except Exception as e:  # compile failure, out of resources, a wrong result: the row says so
        row["error"] = error_text(e)
    return row


def warm_ahead(warmer, case: TuneInputs, cands: list, budget: TuneBudget, deadline: float) -> dict:
    """rank -> the warm-up's outcome for the slice's candidates (``warmer.warm``: {"warmed": True,
    "warm_s", "warm_n"} or {"error": "failed in warm-up: ..."}; a rank left out was not warmed),
    given WARM_SHARE of the time to the slice's deadline; {} without a warmer, past the deadline or
    once the CUDA context broke."""
    now = budget.clock()
    if warmer is None or budget.lost or now >= deadline:
        return {}
    return warmer.warm(case, cands, now + WARM_SHARE * (deadline - now))


def run_warmed(cand: Candidate, case: TuneInputs, rank: int, warm: dict) -> dict:
    """``run_candidate``'s row with the warm-up's outcome ("warmed"); a candidate that failed its
    warm-up is that error's row and is not launched here (a kernel that faults would break this
    process's CUDA context)."""
    if "error" in warm:
        return {**case.info(cand.pass_), **describe(cand, case), "rank": rank, "warmed": False, **warm}
    return {**run_candidate(cand, case, rank), "warmed": False, **warm}


def tune_pass(pass_: str, case: TuneInputs, budget: TuneBudget, on_row, exclude=(), warmer=None) -> list:
    """Time one pass's candidates on one case, shipped row first, while its slice of ``budget``
    lasts (soft: no candidate starts past the deadline; one row counts those not tried), compiled
    ahead first by ``warmer`` where given (``warm_ahead``); then, past the deadline too (compiled by
    then, quick), the shipped row again (its two timings give the spread) and the fastest candidate
    again (a winner must be fast both times, ``pick_winner``). Each row goes to ``on_row`` as it is
    measured; one row counts the candidates left out for turning on a switch of ``exclude``."""
    cands, deadline, rows = candidates(pass_, case.shipped[pass_], case.D, exclude), budget.deadline(pass_), []

    def emit(row: dict) -> dict:
        rows.append(row)
        on_row(row)
        return row
    if left_out := sum(excluded(c, exclude) for c in sweep_configs(pass_, case.shipped[pass_])):
        emit({**case.info(pass_), "label": f"({left_out} left out)", "skipped": left_out,
              "error": "skipped: " + ", ".join(f"{k}={v}" for k, v in exclude) + " failed the GPU tests"})
    warm = warm_ahead(warmer, case, cands, budget, deadline)
    for rank, cand in enumerate(cands):
        if budget.lost or budget.clock() > deadline:
            emit({**case.info(pass_), "label": f"({len(cands) - rank} not tried)", "skipped": len(cands) - rank,
                  "error": f"skipped: {budget.lost or 'time limit'}"})
            break
        row = emit(run_warmed(cand, case, rank, warm.get(rank, {})))
        if "error" in row and not device_ok(case.dev):
            budget.lost = f"the CUDA context broke at {case.case} {pass_} {row['label']}"
        if case.dev.type == "cuda" and not budget.lost:
            torch.cuda.empty_cache()
    timed = {r["rank"]: r for r in rows if "ms" in r}
    if 0 in timed and not budget.lost:
        emit(run_candidate(cands[0], case, 0, repeat=True))
        best = min((r for rank, r in timed.items() if rank), key=lambda r: r["ms"], default=None)
        if best is not None and best["ms"] < timed[0]["ms"]:
            emit(run_candidate(cands[best["rank"]], case, best["rank"], repeat=True))
    return rows


def _print_row(row: dict) -> None:
    print(json.dumps(row), flush=True)


def tune_case(kind: str, N: int, D: int, H: int, dev, on_row=_print_row, budget: TuneBudget | None = None,
              dtype=torch.bfloat16, exclude=(), warmer=None) -> list:
    """Both passes of one case on the same inputs, the forward first (``tune_pass``); ``budget``
    holds the soft time limit (default none); ``exclude``: switches left out; ``warmer``: compiles
    each slice's candidates ahead (none: each compiles at its first launch)."""
    budget = budget or TuneBudget(list(triton_configs.PASSES), float("inf"))
    try:
        case = TuneInputs(kind, N, D, H, dev, dtype)
    except Exception as e:  # out of memory at N = 1M, say: reported, the sweep goes on
        row = {"case": kind, "N": N, "D": D, "H": H, "pass": "(set-up)", "label": "(set-up)", "error": error_text(e)}
        on_row(row)
        for pass_ in triton_configs.PASSES:  # this case's share goes to the later ones
            budget.deadline(pass_)
        return [row]
    return [row for pass_ in triton_configs.PASSES
            for row in tune_pass(pass_, case, budget, on_row, exclude, warmer)]


def tune(cases, dev, limit_s: float, on_row=_print_row, dtype=torch.bfloat16, exclude=(), warmer=None) -> list:
    """``tune_case`` on each of ``cases`` ((kind, N, D, H), ...) within one soft limit."""
    budget = TuneBudget([p for _ in cases for p in triton_configs.PASSES], limit_s)
    return [row for case in cases
            for row in tune_case(*case, dev, on_row=on_row, budget=budget, dtype=dtype, exclude=exclude,
                                 warmer=warmer)]

