"""CPU benchmark of attnkit's exact backends: time and peak memory, one fresh process per case.

    attnkit bench [--ns 1024,4096,16384] [--impls tiled,sdpa,reference]
                  [--masks dense,causal] [--modes fwd,fwd+bwd] [--reps 3]
                  [--out-dir benchmarks/results] [--mem-budget-gb 16]

(``python -m attnkit.bench.cpu`` is the same command.)

Settings: fp32, B=1, H=12, D=64 on the CPU. Every (N, mask, impl, mode) case runs in a child
``python -m attnkit.bench.cpu --case JSON`` so its memory is measured alone:
``extra peak = peak RSS during the timed calls - RSS right after creating the inputs`` (the peak
is reset there through /proc/self/clear_refs, see ``bench.process``).
Before creating the inputs the child makes one tiny call of the same backend and mode, so
one-off library start-up (thread pools, kernels) is not counted as the case's memory.
Time: one warm-up call, then ``reps`` timed calls; the median is reported.
FLOPs: useful FLOPs only, ``4*B*H*D`` per allowed (query, key) pair forward; forward + backward 3.5x.

The ``reference`` backend materializes (B, H, N, N) fp32 scores: a case whose estimate
(``B*H*N*N*4`` bytes, x2 forward, x4 forward + backward) exceeds the memory budget is recorded as
"skipped". Each child also runs under an address-space limit (RLIMIT_AS) so that running out of
memory ends as status "oom", and a child that runs past the time limit as "timeout"; the suite
always goes on. Results go to ``<out_dir>/cpu_<date>T<hhmm>.json`` and ``.md``, rewritten after each case;
``out_dir`` is ``benchmarks/results`` under the current directory unless ``--out-dir`` says otherwise,
created (with its parents) before the first case, and named when the run starts.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

import attnkit as ak

from ..cli._paths import OutputPathError, prepare_output_dir
from ..cli._progress import progress_bar
from .process import peak_rss_mb, reset_peak_rss

GB = 1e9
MB = 2 ** 20
RESULT_TAG = "ATTNKIT_BENCH_RESULT "
IMPLS = ("tiled", "sdpa", "reference")
MASKS = ("dense", "causal")  # the default suite; "window" (sliding_window(256)) on request
WINDOW = 256  # the "window" mask: 256 keys each side, 513 in all
MASK_CHOICES = ("dense", "causal", "window")
MODES = ("fwd", "fwd+bwd")
B, H, D = 1, 12, 64  # batch, heads, head dimension of every case


@dataclass(frozen=True)
class Case:
    """One benchmark case; ``n`` is the sequence length (queries = keys)."""

    impl: str
    mask: str
    mode: str
    n: int
    reps: int = 3
    b: int = B
    h: int = H
    d: int = D
    seed: int = 0
    as_limit_gb: float = 20.0

    def label(self) -> str:
        """Short human-readable name of the case."""
        return f"N={self.n} {self.mask} {self.mode} {self.impl}"


# ---------------------------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------------------------

def allowed_pairs(mask: str, n: int) -> float:
    """(query, key) pairs the mask allows: N^2 dense, N(N+1)/2 causal, the band for window."""
    if mask == "causal":
        return n * (n + 1) / 2
    if mask == "window":
        w = min(WINDOW, n - 1)
        return n * (2 * w + 1) - w * (w + 1)
    return float(n * n)


def flops(case: Case) -> float:
    """Useful FLOPs of one call: ``4*B*H*D`` per allowed pair forward, x3.5 with the backward."""
    fwd = 4.0 * case.b * case.h * case.d * allowed_pairs(case.mask, case.n)
    return fwd * (3.5 if case.mode == "fwd+bwd" else 1.0)


def reference_bytes(case: Case) -> float:
    """Estimated memory of the reference backend: (B,H,N,N) fp32 scores x2 fwd, x4 fwd+bwd."""
    return case.b * case.h * case.n * case.n * 4.0 * (4 if case.mode == "fwd+bwd" else 2)


def _gb(nbytes: float) -> str:
    """Bytes as a short GB figure: '26' for big sizes, '0.0063' for small ones."""
    gb = nbytes / GB
    return f"{gb:.0f}" if gb >= 10 else f"{gb:.2g}"


def skip_reason(case: Case, mem_budget_gb: float) -> str | None:
    """Why ``case`` is not run under ``mem_budget_gb``, or None when it fits."""
    if case.impl != "reference":
        return None
    need = reference_bytes(case)
    if need <= mem_budget_gb * GB:
        return None
    return (f"needs ~{_gb(need)} GB for the {case.b * case.h}x{case.n}x{case.n} fp32 score "
            f"matrices ({case.mode}), over the {mem_budget_gb:g} GB budget")


# ---------------------------------------------------------------------------------------------
# Child side: one case in this process
# ---------------------------------------------------------------------------------------------

def _limit_address_space(gb: float) -> None:
    """Cap this process's virtual memory at ``gb`` so running out raises instead of swapping."""
    if gb <= 0:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = int(gb * GB) if hard == resource.RLIM_INFINITY else min(int(gb * GB), hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ValueError, OSError):  # not supported (e.g. macOS): run without the cap
        pass


def make_inputs(case: Case, n: int | None = None) -> tuple[torch.Tensor, ...]:
    """Seeded fp32 q, k, v (B, H, N, D) and a fixed upstream gradient (requires_grad for fwd+bwd)."""
    n = case.n if n is None else n
    torch.manual_seed(case.seed)
    shape = (case.b, case.h, n, case.d)
    grad = case.mode == "fwd+bwd"
    q, k, v = (torch.randn(shape, dtype=torch.float32).requires_grad_(grad) for _ in range(3))
    return q, k, v, torch.randn(shape, dtype=torch.float32)


def make_step(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              dout: torch.Tensor) -> Callable[[], None]:
    """A no-argument callable running one forward (no_grad) or forward + backward of ``case``."""
    mask = {"dense": None, "causal": ak.causal(), "window": ak.sliding_window(WINDOW)}[case.mask]

    def fwd() -> None:
        with torch.no_grad():
            ak.attention(q, k, v, mask=mask, impl=case.impl)

    def fwd_bwd() -> None:
        q.grad = k.grad = v.grad = None
        ak.attention(q, k, v, mask=mask, impl=case.impl).backward(dout)

    return fwd_bwd if case.mode == "fwd+bwd" else fwd


def time_step(step: Callable[[], None], reps: int) -> list[float]:
    """One warm-up call, then ``reps`` timed calls; wall times in ms."""
    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(case: Case) -> dict:
    """Run ``case`` in this process: times, baseline and peak RSS. Raises on failure."""
    make_step(case, *make_inputs(case, n=64))()  # library start-up outside the baseline
    inputs = make_inputs(case)
    reset_peak_rss()  # the peak counts from here: inputs resident, start-up peaks forgotten
    base = peak_rss_mb()
    times = time_step(make_step(case, *inputs), case.reps)
    peak = peak_rss_mb()
    return {"times_ms": times, "baseline_rss_mb": base, "peak_rss_mb": peak,
            "extra_peak_mb": peak - base, "threads": torch.get_num_threads()}


def measured_or_failed(measure_case, case) -> dict:
    """``{"status": "ok", **measure_case(case)}``, or the failure as a result: "oom" for a
    MemoryError or an allocation RuntimeError, else "error", with the reason (what a child prints)."""
    try:
        return {"status": "ok", **measure_case(case)}
    except MemoryError as e:
        return {"status": "oom", "reason": f"MemoryError: {e}"[:300]}
    except RuntimeError as e:
        msg = str(e)
        oom = "memory" in msg.lower() or "alloc" in msg.lower()
        return {"status": "oom" if oom else "error", "reason": f"RuntimeError: {msg}"[:300]}


def child_main(case_json: str) -> int:
    """Entry point of the child process: measure one case and print its result as one JSON line."""
    case = Case(**json.loads(case_json))
    _limit_address_space(case.as_limit_gb)
    print(RESULT_TAG + json.dumps(measured_or_failed(measure, case)), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side: one child per case
# ---------------------------------------------------------------------------------------------

def _child_env() -> dict[str, str]:
    """Environment for the child, with this attnkit's source directory first on PYTHONPATH."""
    env = dict(os.environ)
    src = str(Path(ak.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def _failed_child(proc: subprocess.CompletedProcess) -> dict:
    """Result for a child that printed no result line (killed, crashed)."""
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    mem_msg = any(w in (proc.stderr or "").lower() for w in ("memory", "bad_alloc"))
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        status = "oom" if sig == "SIGKILL" or mem_msg else "error"
        reason = f"child killed by {sig}" + (" (likely out of memory)" if status == "oom" else "")
    else:
        status = "oom" if mem_msg else "error"
        reason = f"child exited with {proc.returncode}"
    return {"status": status, "reason": " | ".join([reason, *tail])[:500]}


def run_case_process(cmd: list[str], timeout_s: float) -> dict:
    """Run one case's command (a fresh Python process that prints ``RESULT_TAG`` + JSON) and return
    its result dict: the child's own (status ok / oom / error), or timeout / a failed child's."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_child_env())
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"child ran past the {timeout_s:g} s limit (--timeout)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return _failed_child(proc)


def run_child(case: Case, timeout_s: float) -> dict:
    """Run ``case`` in a fresh Python process; its result dict (status ok/oom/timeout/error)."""
    return run_case_process([sys.executable, "-m", "attnkit.bench.cpu", "--case", json.dumps(asdict(case))], timeout_s)


def make_row(case: Case, result: dict) -> dict:
    """One output row: the case, its status, median time, memory and GFLOP/s."""
    times = result.get("times_ms")
    median = statistics.median(times) if times else None
    fl = flops(case)
    return {"impl": case.impl, "mask": case.mask, "mode": case.mode, "N": case.n, "B": case.b,
            "H": case.h, "D": case.d, "dtype": "float32", "status": result["status"],
            "reason": result.get("reason"), "median_ms": median, "times_ms": times,
            "extra_peak_mb": result.get("extra_peak_mb"), "peak_rss_mb": result.get("peak_rss_mb"),
            "baseline_rss_mb": result.get("baseline_rss_mb"), "threads": result.get("threads"),
            "flops": fl, "gflops": fl / (median * 1e-3) / 1e9 if median else None}


def run_case(case: Case, mem_budget_gb: float, timeout_s: float) -> dict:
    """Skip ``case`` if over budget, else measure it in a child; the finished row."""
    reason = skip_reason(case, mem_budget_gb)
    result = {"status": "skipped", "reason": reason} if reason else run_child(case, timeout_s)
    return make_row(case, result)


# ---------------------------------------------------------------------------------------------
# Ratios, header, output files
# ---------------------------------------------------------------------------------------------

def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is not positive."""
    return a / b if a is not None and b is not None and b > 0 else None


def ratios(rows: Sequence[dict]) -> list[dict]:
    """Per (N, mask, mode): tiled/sdpa median time and tiled/reference extra peak memory."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["N"], r["mask"], r["mode"]), {})[r["impl"]] = r
    out = []
    for (n, mask, mode), by in groups.items():
        def get(impl: str, key: str) -> float | None:
            row = by.get(impl)
            return row[key] if row and row["status"] == "ok" else None
        out.append({"N": n, "mask": mask, "mode": mode,
                    "tiled_over_sdpa_time": _ratio(get("tiled", "median_ms"), get("sdpa", "median_ms")),
                    "tiled_over_reference_mem": _ratio(get("tiled", "extra_peak_mb"),
                                                       get("reference", "extra_peak_mb"))})
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header() -> dict:
    """Machine and software description written at the top of the results."""
    return {"date": _dt.datetime.now().isoformat(timespec="seconds"), "hostname": socket.gethostname(),
            "processor": platform.processor(), "machine": platform.machine(), "cpu_model": cpu_model(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_version": torch.__version__, "torch_num_threads": torch.get_num_threads(),
            "attnkit_version": ak.__version__, "python": platform.python_version(),
            "settings": {"dtype": "float32", "device": "cpu", "B": B, "H": H, "D": D}}


def _fmt(x: float | None) -> str:
    """Compact number for the table."""
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _cell(row: dict | None) -> str:
    """Markdown cell 'time ms / extra peak MB', or the status of a case that did not run."""
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    return f"{_fmt(row['median_ms'])} / {_fmt(row['extra_peak_mb'])}"


def markdown(head: dict, rows: Sequence[dict], impls: Sequence[str]) -> str:
    """The results as one markdown table, with the machine above it and the notes below."""
    by = {(r["N"], r["mask"], r["mode"], r["impl"]): r for r in rows}
    cols = ["N", "mask", "mode", *(f"{i} ms / MB" for i in impls),
            "tiled/sdpa time", "tiled/reference mem"]
    lines = [f"# attnkit CPU benchmark, {head['date']}", "",
             f"{head['hostname']}, {head['cpu_model']} ({head['machine']}), {head['cpu_count']} CPUs, "
             f"torch {head['torch_version']} ({head['torch_num_threads']} threads), "
             f"attnkit {head['attnkit_version']}. fp32, B={B}, H={rows[0]['H'] if rows else H}, D={D}. Cells: median time (ms) / "
             "extra peak RSS over the inputs (MB = 2^20 bytes); ratios < 1 favour tiled.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for g in ratios(rows):
        key = (g["N"], g["mask"], g["mode"])
        cells = [str(g["N"]), g["mask"], g["mode"], *(_cell(by.get((*key, i))) for i in impls),
                 *(f"{_fmt(x)}x" if x is not None else "-"
                   for x in (g["tiled_over_sdpa_time"], g["tiled_over_reference_mem"]))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['N']} {r['mask']} {r['mode']} {r['impl']}: {r['status']}: {r['reason']}"
             for r in rows if r["status"] != "ok"]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def write_results(out_dir: str | Path, head: dict, rows: Sequence[dict],
                  impls: Sequence[str]) -> tuple[Path, Path]:
    """Write ``cpu_<date>T<hhmm>.json`` and ``cpu_<date>T<hhmm>.md`` under ``out_dir``; their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cpu_{head['date'][:16].replace(':', '')}"  # one file pair per run
    doc = {"header": head, "rows": list(rows), "ratios": ratios(rows)}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(head, rows, impls))
    return stem.with_suffix(".json"), stem.with_suffix(".md")


# ---------------------------------------------------------------------------------------------
# Suite and CLI
# ---------------------------------------------------------------------------------------------

def run_suite(ns: Sequence[int] = (1024, 4096, 16384), impls: Sequence[str] = IMPLS,
              masks: Sequence[str] = MASKS, modes: Sequence[str] = MODES, reps: int = 3,
              out_dir: str | Path = "benchmarks/results", *, mem_budget_gb: float = 16.0,
              as_limit_gb: float = 20.0, timeout_s: float = 900.0, heads: int = H,
              head: dict | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Run every (N, mask, mode, impl) case in its own process; rows, also written to ``out_dir``.

    The result files are rewritten after each case, so an interrupted run keeps what it measured.
    ``on_row`` is called with each row as it completes (the CLI prints it); ``head`` defaults
    to :func:`header` and names the files (``cpu_<date>T<hhmm>``).
    """
    head, rows = head or header(), []
    for n in ns:
        for mask in masks:
            for mode in modes:
                for impl in impls:
                    case = Case(impl=impl, mask=mask, mode=mode, n=n, reps=reps, h=heads,
                                as_limit_gb=as_limit_gb)
                    rows.append(run_case(case, mem_budget_gb, timeout_s))
                    write_results(out_dir, head, rows, impls)
                    if on_row is not None:
                        on_row(rows[-1])
    return rows


def format_row(row: dict) -> str:
    """One line of progress output for a finished row."""
    what = f"N={row['N']:>6} {row['mask']:<6} {row['mode']:<7} {row['impl']:<9}"
    if row["status"] != "ok":
        return f"{what} {row['status']}: {row['reason']}"
    return (f"{what} {row['median_ms']:10.2f} ms  {row['gflops']:7.2f} GFLOP/s  "
            f"extra peak {row['extra_peak_mb']:8.1f} MB  peak RSS {row['peak_rss_mb']:8.1f} MB")


class CommaList:
    """argparse type for a comma-separated list (``"1024, 4096"`` -> ``(1024, 4096)``).

    Spaces around items are allowed; an empty item (``"64,"``, ``"64,,128"``, ``""``) is refused, as
    is an item ``kind`` cannot read, with a message that names the item and shows the expected form.
    """

    def __init__(self, kind: Callable[[str], object]):
        self.kind = kind
        self.__name__ = f"comma-separated {kind.__name__}"  # argparse names it in "invalid ... value"

    def _form(self) -> str:
        example = "1024,4096" if self.kind is int else "a,b" if self.kind is str else "x,y"
        return f"expected comma-separated {self.kind.__name__} values, e.g. {example}"

    def __call__(self, text: str) -> tuple:
        items = [x.strip() for x in text.split(",")]
        empty = [i for i, x in enumerate(items) if not x]
        if empty:
            where = ("is empty" if len(items) == 1 else "ends with a comma: empty items are not allowed"
                     if empty == [len(items) - 1] else "starts with a comma: empty items are not allowed"
                     if empty == [0] else f"has an empty item (item {empty[0] + 1}): empty items are not allowed")
            raise argparse.ArgumentTypeError(f"{text!r} {where}; {self._form()}")
        values = []
        for x in items:
            try:
                values.append(self.kind(x))
            except (TypeError, ValueError):
                raise argparse.ArgumentTypeError(f"{x!r} in {text!r} is not a valid {self.kind.__name__}; "
                                                 f"{self._form()}") from None
        return tuple(values)


def _choices(names: Sequence[str]) -> str:
    return "{" + ",".join(names) + "}"  # as argparse shows choices


OUT_DIR = "benchmarks/results"  # relative: under the current directory


def build_parser(prog: str = "attnkit bench") -> argparse.ArgumentParser:
    """The command-line options of ``attnkit bench`` (also ``python -m attnkit.bench.cpu``)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--ns", metavar="N,...", type=CommaList(int), default=(1024, 4096, 16384),
                   help="sequence lengths, comma-separated (default 1024,4096,16384)")
    p.add_argument("--impls", metavar="IMPL,...", type=CommaList(str), default=IMPLS,
                   help=f"backends, comma-separated, from {_choices(IMPLS)} (default {','.join(IMPLS)})")
    p.add_argument("--masks", metavar="MASK,...", type=CommaList(str), default=MASKS,
                   help=f"masks, comma-separated, from {_choices(MASK_CHOICES)} (window: sliding_window({WINDOW})) "
                        f"(default {','.join(MASKS)})")
    p.add_argument("--modes", metavar="MODE,...", type=CommaList(str), default=MODES,
                   help=f"passes, comma-separated, from {_choices(MODES)} (default {','.join(MODES)})")
    p.add_argument("--reps", type=int, default=3, help="timed calls per case, after one warm-up (default 3)")
    p.add_argument("--heads", type=int, default=H, help=f"attention heads H (default {H})")
    p.add_argument("--out-dir", default=OUT_DIR,
                   help="folder for the results, cpu_<date>T<hhmm>.json and .md, rewritten after each case; "
                        "created with its parents if missing, before the first case (default "
                        f"{OUT_DIR} under the current directory)")
    p.add_argument("--mem-budget-gb", type=float, default=16.0,
                   help="skip reference cases whose score matrices need more GB than this (default 16)")
    p.add_argument("--as-limit-gb", type=float, default=20.0,
                   help="address-space limit of each child in GB, 0 for none (default 20)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds per case before it is stopped and recorded as 'timeout' (default 900)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (child process)
    return p


def parse_args(argv: Sequence[str] | None, prog: str = "attnkit bench") -> argparse.Namespace:
    """Command-line options of ``attnkit bench``."""
    return build_parser(prog).parse_args(argv)


def _check_choices(args: argparse.Namespace) -> None:
    """Reject unknown impl/mask/mode names before any child starts."""
    for name, got, allowed in (("impl", args.impls, IMPLS), ("mask", args.masks, MASK_CHOICES),
                               ("mode", args.modes, MODES)):
        bad = [x for x in got if x not in allowed]
        if bad:
            raise SystemExit(f"unknown {name}(s) {bad}; choose from {list(allowed)}")


def main(argv: Sequence[str] | None = None, prog: str = "attnkit bench") -> int:
    """CLI: run the suite, printing each row as it completes, then the result file paths."""
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    if args.case is not None:
        return child_main(args.case)
    _check_choices(args)
    try:  # before the first case: the results are written after each one
        out_dir = prepare_output_dir(args.out_dir, "--out-dir")
    except OutputPathError as e:
        print(f"attnkit bench: error: {e}", file=sys.stderr)
        return 2
    total = len(args.ns) * len(args.impls) * len(args.masks) * len(args.modes)
    print(f"attnkit CPU benchmark: {total} cases, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"results in {out_dir.resolve()}", flush=True)
    head = header()
    with progress_bar("bench", total, unit="case") as bar:  # on stderr; the rows go to stdout
        def on_row(row: dict) -> None:
            tqdm.write(format_row(row), file=sys.stdout)  # above a terminal's bar, not through it
            sys.stdout.flush()
            bar.set_postfix_str(f"last N={row['N']} {row['mask']} {row['mode']} {row['impl']}", refresh=False)
            bar.update(1)

        rows = run_suite(args.ns, args.impls, args.masks, args.modes, args.reps, args.out_dir,
                         mem_budget_gb=args.mem_budget_gb, as_limit_gb=args.as_limit_gb,
                         timeout_s=args.timeout, heads=args.heads, head=head, on_row=on_row)
    json_path, md_path = write_results(args.out_dir, head, rows, args.impls)
    print(f"wrote {json_path} and {md_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m attnkit.bench.cpu"))
