"""The steps of benchmarks/gpu.py --issue14 and --issue15 (gpu.py's docstring says what each
measures): a ``StepReport`` per run (JSON, rows log, markdown, rewritten after every row), the steps
under soft time limits, the gpu-marked tests in a child pytest, and issue 15's short summary."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

import torch

import plan_build
from gpu_overhead import OVERHEAD_DTYPE, OVERHEAD_NS, host_overhead, overhead_markdown
from gpu_peers import LONGFORMER_NS, error_text, markdown, measure
from gpu_tune import TUNE_CASES, failed_switches, tune
from gpu_tune_report import by_slice, load_tuned, pick_winner, tune_markdown, tune_table_text, tune_winners, warm_counts
from gpu_warm import Warmer

ISSUE14_STEPS = ("tests", "overhead", "plans", "longformer")
ISSUE14_LIMITS_S = {"tests": 120, "overhead": 40, "plans": 90, "longformer": 120}  # soft: no new case after
GPU_TESTS = ("tests/test_triton.py", "tests/test_block_plan.py", "tests/test_numerics.py")
PLAN_NS = (4096, 16384, 65536, 262144, 1 << 20)
PLAN_MASKS = ("longformer", "docs512", "causal_window", "causal", "docs1", "docs8", "docs64")  # acceptance first
PLAN_CACHE_N = 65536
REPO = Path(__file__).resolve().parents[1]


class StepReport:
    """``<name>.json`` (meta and each step's rows), ``<name>_rows.jsonl`` and the files ``render``
    makes of the document (file name -> text: ``<name>.md``, ...) in ``out``, rewritten after every
    row; a step run in another process adds to the same files."""

    def __init__(self, out: Path, meta: dict, name: str = "issue14", render=None):
        self.out, self.name = out, name
        self.render = render or (lambda doc: {f"{name}.md": issue14_markdown(doc)})
        path = out / f"{name}.json"
        self.doc = json.loads(path.read_text()) if path.exists() else {"meta": dict(meta), "steps": {}}
        self.doc["meta"].setdefault("runs", []).append(dict(meta))  # one entry per process (step)

    def start(self, step: str, **info) -> None:
        self.doc["steps"][step] = {"info": {"started": datetime.now(UTC).isoformat(timespec="seconds"), **info},
                                   "rows": []}
        self.write()

    def add(self, step: str, row: dict, log: bool = True) -> None:
        self.doc["steps"][step]["rows"].append(row)
        if log:
            with (self.out / f"{self.name}_rows.jsonl").open("a") as f:
                f.write(json.dumps({"step": step, **row}) + "\n")
        print(f"[{step}] {json.dumps(row)}", flush=True)
        self.write()

    def finish(self, step: str, rows: list | None = None, **info) -> None:
        if rows is not None:
            self.doc["steps"][step]["rows"] = rows
        self.doc["steps"][step]["info"].update(finished=datetime.now(UTC).isoformat(timespec="seconds"), **info)
        self.write()

    def write(self) -> None:
        (self.out / f"{self.name}.json").write_text(json.dumps(self.doc, indent=1) + "\n")
        for file, text in self.render(self.doc).items():
            (self.out / file).write_text(text)


def _step_markdown(step: str, info: dict, rows: list, device: str) -> list:
    """One step's section of a report's markdown."""
    lines = [f"## {step}", "", "`" + json.dumps(info) + "`", ""]
    if step == "tests":
        lines += ["```", *info.get("tail", "").splitlines()[-15:], "```", ""]
    elif step == "overhead" and rows:
        lines.append(overhead_markdown(rows))
    elif step == "plans" and rows:
        lines.append(plan_build.markdown({}, rows, body_only=True))
    elif step in ("longformer", "compare") and rows:
        lines.append(markdown(rows, device).split("\n", 2)[2])
    elif step == "tune" and rows:
        lines.append(tune_markdown(rows, device, title=False))
    return lines


def report_markdown(doc: dict, title: str, steps) -> str:
    meta = doc["meta"]
    lines = [f"# {title} on {meta.get('device')}: {meta.get('date')}", "",
             f"torch {meta.get('torch')}, triton {meta.get('triton')}, attnkit {meta.get('attnkit_commit')}.", ""]
    for step in steps:
        if step in doc["steps"]:
            lines += _step_markdown(step, doc["steps"][step]["info"], doc["steps"][step]["rows"],
                                    meta.get("device", "?"))
    return "\n".join(lines) + "\n"


def issue14_markdown(doc: dict) -> str:
    return report_markdown(doc, "Issue 14", ISSUE14_STEPS)


def run_child(cmd: list, env: dict, timeout_s: float) -> tuple:
    """(return code or "timeout", its stdout and stderr) of a command run in the repository, in its
    own process group: at the timeout, or if this process is stopped meanwhile, the whole group is
    killed (pytest-xdist's workers too), so nothing keeps the GPU busy under the next step."""
    child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        out = child.communicate(timeout=timeout_s)[0]
        return child.returncode, out
    except subprocess.TimeoutExpired:
        _kill_group(child)
        return "timeout", (child.communicate()[0] or "") + f"\n(stopped after {timeout_s} s)"
    finally:
        if child.poll() is None:
            _kill_group(child)


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def step_tests(report: StepReport, limit_s: float) -> None:
    """The gpu-marked tests of GPU_TESTS in a child pytest (5 workers where pytest-xdist is
    there), stopped after ``limit_s``; the log goes to <report name>_pytest.log."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfE", *GPU_TESTS]
    if importlib.util.find_spec("xdist") is not None:  # one worker per test: the 3 dtypes' case tables compile apart
        cmd += ["-n", "5"]
    env = {**os.environ}
    env["PYTHONPATH"] = str(REPO / "src") + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    report.start("tests", command=" ".join(cmd[1:]))
    t0 = time.monotonic()
    rc, text = run_child(cmd, env, limit_s)
    (report.out / f"{report.name}_pytest.log").write_text(text)
    report.finish("tests", returncode=rc, wall_s=round(time.monotonic() - t0, 1), tail=text[-3000:])
    print(text[-3000:], flush=True)


def step_overhead(report: StepReport, device, limit_s: float) -> None:
    """``host_overhead`` at OVERHEAD_NS in bfloat16."""
    report.start("overhead", ns=list(OVERHEAD_NS), dtype=str(OVERHEAD_DTYPE))
    rows = host_overhead(device, OVERHEAD_DTYPE, ns=OVERHEAD_NS, on_row=lambda r: report.add("overhead", r),
                         deadline=time.monotonic() + limit_s)
    report.finish("overhead", rows)


def _raise_recompile_limits() -> None:
    """Flex's create_block_mask recompiles per mask_mod and once more when N goes dynamic; the
    default limit (8) would send the later masks to eager mode, which materializes N x N."""
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


def step_plans(report: StepReport, device, limit_s: float) -> None:
    """``plan_build.run`` on ``device`` at PLAN_NS for PLAN_MASKS, Flex beside, cache hits at PLAN_CACHE_N."""
    ns, masks = PLAN_NS, PLAN_MASKS
    report.start("plans", ns=list(ns), masks=list(masks))
    _raise_recompile_limits()
    rows = plan_build.run(ns, masks, plan_build.default_blocks(), torch.device(device), reps=5, budget_s=2.0,
                          flex=True, cache_n=PLAN_CACHE_N, cache_calls=200, on_row=lambda r: report.add("plans", r),
                          deadline=time.monotonic() + limit_s)
    report.finish("plans", rows)


def _measure_cases(report: StepReport, step: str, cases, device, limit_s: float, **contender_kw) -> None:
    """``measure`` on each (kind, N, D, H) of ``cases`` in order, its rows reaching the report as they
    are measured; no new case past the soft limit."""
    deadline, rows = time.monotonic() + limit_s, _Reported(report, step)
    for kind, N, D, H in cases:
        if time.monotonic() > deadline:
            rows.append({"case": kind, "N": N, "D": D, "H": H, "contender": "(all)", "error": "skipped: time limit"})
            continue
        measure(kind, N, D, H, device, rows, Path(os.devnull), **contender_kw)
    report.finish(step)


def step_longformer(report: StepReport, device, limit_s: float) -> None:
    """``measure`` at each of LONGFORMER_NS (attnkit triton and compiled Flex, fwd and fwd+bwd);
    no new N past the limit."""
    report.start("longformer", ns=list(LONGFORMER_NS))
    _measure_cases(report, "longformer", [("longformer", N, 64, 12) for N in LONGFORMER_NS], device, limit_s)


class _Reported(list):
    """A list of rows that hands each appended row to the report (``measure`` appends them)."""

    def __init__(self, report: StepReport, step: str):
        super().__init__()
        self.report, self.step = report, step

    def append(self, row: dict) -> None:
        super().append(row)
        self.report.add(self.step, row)


def _exit_on_term(signum, frame) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def run_meta(device: torch.device, steps) -> dict:
    """What a report records of the run: date, versions, devices."""
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "steps": list(steps), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "attnkit_commit": plan_build._commit(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "cpu_model": plan_build.cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0]}


def run_steps(report: StepReport, steps, limits: dict, runners: dict) -> None:
    """``runners[step](soft limit)`` for each step in order; a step that raises is recorded and the
    next one runs; SIGTERM (``timeout``) stops the process as an exception, so its children go too."""
    signal.signal(signal.SIGTERM, _exit_on_term)
    for step in steps:
        t0 = time.monotonic()
        print(f"== {report.name} step {step} (soft limit {limits[step]} s)", flush=True)
        try:
            runners[step](limits[step])
        except Exception as e:  # one step failing leaves the others to run
            report.doc["steps"].setdefault(step, {"info": {}, "rows": []})
            report.finish(step, error=error_text(e))
            print(f"{report.name} step {step} failed: {error_text(e)}", flush=True)
        print(f"== {report.name} step {step} took {time.monotonic() - t0:.1f} s", flush=True)


def issue14(out: Path, steps=ISSUE14_STEPS, device=None, limits: dict | None = None) -> int:
    """Run the steps of issue 14 in order (module docstring)."""
    device = torch.device(device or "cuda")
    limits = {**ISSUE14_LIMITS_S, **(limits or {})}
    report = StepReport(out, run_meta(device, steps))
    run_steps(report, steps, limits, {"tests": lambda s: step_tests(report, s),
                                      "overhead": lambda s: step_overhead(report, device, s),
                                      "plans": lambda s: step_plans(report, device, s),
                                      "longformer": lambda s: step_longformer(report, device, s)})
    print(issue14_markdown(report.doc), flush=True)
    return 0


# -- issue 15: the tests, the tuning sweep, the acceptance cases with the winners, in one device call -

ISSUE15_STEPS = ("tests", "tune", "compare", "longformer")
# soft limits (no new candidate / case after them); gpu_issue15.sh's hard ones: 150, 240, 120 s, then what is left
ISSUE15_LIMITS_S = {"tests": 135, "tune": 205, "compare": 80, "longformer": 60}
COMPARE_SDPA = ("FLASH_ATTENTION", "CUDNN_ATTENTION")


def acceptance_cases(longformer_n: int | None = None, quick: bool = False) -> list:
    """TUNE_CASES (issue 15's acceptance: dense D=128 16k, causal D=64 16k, Longformer 64k), the
    Longformer at ``longformer_n`` where given; all at N=4096 with ``quick``."""
    cases = [(kind, 4096 if quick else N, D, H) for kind, N, D, H in TUNE_CASES]
    return [(kind, longformer_n if kind == "longformer" and longformer_n else N, D, H) for kind, N, D, H in cases]


def _tune_table_file(doc: dict) -> dict:
    """tune_table.py of a report whose "tune" step has run (dated by the step's UTC start)."""
    tune = doc["steps"].get("tune")
    if tune is None:
        return {}
    return {"tune_table.py": tune_table_text(tune["rows"], doc["meta"].get("device", "?"),
                                             tune["info"].get("started", "?")[:10])}


def issue15_render(doc: dict) -> dict:
    return {"issue15.md": report_markdown(doc, "Issue 15", ISSUE15_STEPS), **_tune_table_file(doc)}


def tune_render(doc: dict) -> dict:
    rows = doc["steps"].get("tune", {}).get("rows", [])
    return {"tune.md": tune_markdown(rows, doc["meta"].get("device", "?")), **_tune_table_file(doc)}


def step_tune(report: StepReport, device, limit_s: float, cases) -> None:
    """``tune`` on ``cases``, each row into the report as it is measured (the report's render
    rewrites tune_table.py with it), each slice compiled ahead by a ``Warmer`` on CUDA; the switches
    whose bf16 GPU test failed in the report's tests step (``failed_switches``) are left out."""
    log = report.out / f"{report.name}_pytest.log"
    ran = "tests" in report.doc["steps"] and log.exists()
    exclude = failed_switches(log.read_text(errors="replace")) if ran else []
    report.start("tune", cases=[list(c) for c in cases], limit_s=limit_s, left_out=[[k, v] for k, v in exclude])
    with Warmer() if torch.device(device).type == "cuda" else nullcontext() as warmer:
        tune(cases, device, limit_s, on_row=lambda r: report.add("tune", r), exclude=exclude, warmer=warmer)
    rows = report.doc["steps"]["tune"]["rows"]
    report.finish("tune", winners=[list(key) for key in tune_winners(rows, "", "")],
                  warm_workers=warmer.workers if warmer else 0, warm_stopped=warmer.disabled if warmer else None)


def step_compare(report: StepReport, device, limit_s: float, cases) -> None:
    """``measure`` on the acceptance cases with COMPARE_SDPA, compiled Flex, attnkit's shipped rows
    and, from ``tune_table.py`` in the report's folder (the tune step's), attnkit with its ROWS."""
    tuned = load_tuned(report.out / "tune_table.py")
    report.start("compare", cases=[list(c) for c in cases], sdpa=list(COMPARE_SDPA),
                 tuned_rows=None if tuned is None else [list(key) for key in tuned])
    _measure_cases(report, "compare", cases, device, limit_s, tuned=tuned, sdpa=COMPARE_SDPA)


def issue15(out: Path, steps=ISSUE15_STEPS, device=None, limits: dict | None = None,
            longformer_n: int | None = None) -> int:
    """Run the steps of issue 15 in order (module docstring), writing issue15.json / .md /
    _rows.jsonl / _pytest.log and tune_table.py in ``out``."""
    device = torch.device(device or "cuda")
    limits = {**ISSUE15_LIMITS_S, **(limits or {})}
    cases = acceptance_cases(longformer_n)
    report = StepReport(out, run_meta(device, steps), "issue15", issue15_render)
    run_steps(report, steps, limits, {"tests": lambda s: step_tests(report, s),
                                      "tune": lambda s: step_tune(report, device, s, cases),
                                      "compare": lambda s: step_compare(report, device, s, cases),
                                      "longformer": lambda s: step_longformer(report, device, s)})
    return 0


def _pytest_result(info: dict) -> str:
    lines = [line.strip(" =") for line in info.get("tail", "").splitlines()
             if re.search(r"\b(passed|failed|errors?|no tests ran)\b", line)]
    return lines[-1] if lines else str(info.get("error", ""))


def _tflops(row: dict | None) -> str:
    if row is None:
        return ""
    if "error" in row:
        return "error" if not row["error"].startswith("skipped") else "skipped"
    return f"{row['fwd_tflops']:.0f} / {row['fwdbwd_tflops']:.0f}"


def issue15_summary(doc: dict | None, log: str = "") -> str:
    """The short tables gpu_issue15.sh prints last: how each step ended (the script's log lines
    "== STEP exit RC after S s"), the tests' count, each (case, pass)'s tuning verdict, and the
    compare step's TFLOP/s (fwd / fwd+bwd) per case and contender."""
    doc = doc or {"meta": {}, "steps": {}}
    meta, steps = doc["meta"], doc["steps"]
    ended = {m[1]: m[2] for m in re.finditer(r"^== (\w+) (exit \S+ after \d+ s|skipped: [^\n]*)$", log, re.M)}
    lines = [f"# Issue 15 summary: {meta.get('device', '?')}, {meta.get('date', '?')}, attnkit "
             f"{meta.get('attnkit_commit', '?')}", "", "| step | ended | result |", "|---|---|---|"]
    for step in ISSUE15_STEPS:
        info, rows = steps.get(step, {}).get("info", {}), steps.get(step, {}).get("rows", [])
        timed, errors = sum("error" not in r for r in rows), sum("error" in r for r in rows)
        warmed, failed, tried = warm_counts(rows)
        result = {"tests": _pytest_result(info),
                  "tune": f"{timed} rows timed, {errors} errors or skips ({failed} in the warm-up; {warmed} of {tried} "
                          f"candidates compiled ahead), {len(info.get('winners', []))} winners",
                  }.get(step, f"{timed} rows timed, {errors} errors or skips")
        lines.append(f"| {step} | {ended.get(step, 'not run' if step not in steps else '?')} | "
                     f"{result if step in steps else ''} |")
    tune_rows = steps.get("tune", {}).get("rows", [])
    if tune_rows:
        lines += ["", "| tune: case | pass | shipped ms (spread) | fastest other | its ms | verdict |",
                  "|---|---|---|---|---|---|"]
        for (case, N, D, H, pass_), mine in by_slice(tune_rows).items():
            v = pick_winner(mine)
            shipped = "-" if v["shipped_ms"] is None else f"{v['shipped_ms']:.3f} ({v['spread_ms'] or 0:.3f})"
            best = v["best"]["label"] if v["best"] else "-"
            best_ms = "-" if v["best_ms"] is None else f"{v['best_ms']:.3f}"
            lines.append(f"| {case} {N} D={D} | {pass_} | {shipped} | {best} | {best_ms} | "
                         f"{'WINNER' if v['wins'] else v.get('why', '')} |")
    compare = steps.get("compare", {}).get("rows", [])
    if compare:
        names = list(dict.fromkeys(r["contender"] for r in compare if r["contender"] != "(all)"))
        by = {(r["case"], r["N"], r["contender"]): r for r in compare}
        lines += ["", "| compare TFLOP/s fwd / fwd+bwd | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for case, N, D in dict.fromkeys((r["case"], r["N"], r["D"]) for r in compare):
            whole = by.get((case, N, "(all)"))
            cells = [_tflops(by.get((case, N, name), whole)) for name in names]
            lines.append(f"| {case} N={N} D={D} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_issue15_summary(out: Path) -> int:
    path, log = out / "issue15.json", out / "issue15_log.txt"
    doc = json.loads(path.read_text()) if path.exists() else None
    print(issue15_summary(doc, log.read_text(errors="replace") if log.exists() else ""), flush=True)
    return 0

