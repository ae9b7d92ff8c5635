"""attnkit's Triton kernels beside torch SDPA (FLASH, cuDNN, EFFICIENT) and FlexAttention, on one GPU.

    python benchmarks/gpu.py                  # the whole table (several minutes on an H100)
    python benchmarks/gpu.py --quick          # small sizes only: a smoke test of the script
    python benchmarks/gpu.py --out DIR        # where the JSON and markdown go (default benchmarks/results)
    python benchmarks/gpu.py --tune           # sweep attnkit's Triton configs per pass (--limit-s: soft limit)
    python benchmarks/gpu.py --acceptance     # only the three cases of issue 6's acceptance
    python benchmarks/gpu.py --kinds longformer --ns 65536,131072   # a subset (one device call is 10 min)
    python benchmarks/gpu.py --issue14 --out DIR   # issue 14's tables in one short run (benchmarks/gpu_issue14.sh)
    python benchmarks/gpu.py --issue15 --out DIR   # tests, tune, compare, longformer (benchmarks/gpu_issue15.sh)

In one process, on the same bf16 inputs (B=1):
- dense and causal, H=16, D = 64 and 128, N = 1k, 4k, 16k: attnkit triton, SDPA FLASH / CUDNN /
  EFFICIENT (``sdpa_kernel``), FlexAttention compiled (causal: a causal block mask);
- the Longformer pattern (H=12, D=64, window of W=256 keys on each side, G=16 global tokens at the start),
  N = 4k, 16k, 64k, 256k, 1M: attnkit triton, FlexAttention compiled with the same block mask.

Before timing, every contender's output is checked against the float32 reference on 64 sampled
query rows (attnkit.viz.capture's row recomputation, which evaluates the mask on those rows), and
up to N = 4096 its gradients dq, dk, dv against the float32 reference's.
Timing: ``triton.testing.do_bench`` medians; forward, and forward+backward (``autograd.grad`` of
all three inputs). TFLOP/s count useful FLOPs only (anchors' convention: forward 4 B H D x pairs,
fwd+bwd 3.5x). Peak memory: ``max_memory_allocated`` above the inputs over one forward+backward
call, outside ``do_bench`` (whose L2-flush buffer would add 256 MiB). Each row is appended to a
.jsonl file as soon as it is measured, so a crash keeps what ran.
Block plans (attnkit) and block masks (Flex) are built once, outside the timing; their build
times are reported.

``--tune`` (issue 15) times attnkit alone, each pass apart, on the acceptance cases (bf16, B=1: dense
D=128 N=16k H=16, causal D=64 N=16k H=16, Longformer D=64 H=12 at N=64k, or the N of ``--ns``, e.g.
1048576). Candidates: forward blocks TUNE_FWD_BLOCKS x warps x stages x tma x persistent (0 or 2
programs per SM); backward blocks TUNE_BWD_BLOCKS x warps x stages x {plain, delta="fused",
dq="atomic"} x tma. A candidate is applied
as the library would apply a pasted row: ``table_rows`` puts it into ``configs.TABLE`` at (pass,
"half", D, mask kind) for the call (and restores the table afterwards, also on error), the call gets
explicit plans (``make_plan`` at the candidate's blocks for its pass, the shipped row's for the
other) and the table's ``schedule=``. The forward is timed alone; the backward as fwd+bwd minus fwd
of the same call (forward at the shipped row). Before timing, each candidate is checked: its output
on 64 sampled rows against the float32 reference (TOLERANCE); for the backward also dq on those rows
against the float32 reference (``reference_dq_rows``) and dk, dv against the shipped row's (each
relative to the reference's largest entry; the shipped row's own only checked finite). Order: the
shipped row first, then ``prior`` (rows estimated to fit sm_90's shared memory first, the shipped
row's neighbours first). The soft limit (``--limit-s``, default TUNE_LIMIT_S) is shared by the (case, pass) slices
(TUNE_SHARE, leftovers passed on); no candidate starts after its slice's deadline. Compiling ahead
(gpu_warm.py): before a slice is timed, up to 12 worker processes (spawned; at most the CPU count)
launch its candidates once each, in order, at a small N with the case's B, H, D, dtype and mask kind
(an N at which Triton compiles the same kernels), for WARM_SHARE of the slice's time, so that the
sweep's process loads each from Triton's disk cache instead of compiling it; a candidate whose
launch fails there, or whose worker dies, is an error row ("failed in warm-up: ...") and is never
launched in the sweep's process; one not reached compiles at its first launch; each row says
whether it was warmed. Then the shipped
row is timed again (spread = the difference of its two times, at least MIN_SPREAD of it) and the
fastest candidate again (counted at its slower time): it wins when that beats the shipped mean by
more than the spread. An error (compile failure, out of shared memory, a wrong result) is a row; a
broken CUDA context stops the sweep. Rows are written as they come (``tune_rows.jsonl``,
``tune.json``, ``tune.md`` fastest first per case and pass) with ``tune_table.py``: each winner as a
``configs.TABLE`` row, ``source="timed: <device>, <UTC date>, benchmarks/gpu.py --tune, <ms> vs
shipped <ms>"``, to paste into configs.py (and ``ROWS`` to import).

``--issue14`` runs issue 14's measurements, step by step (``--step`` picks some; each step stops
starting new cases past its soft limit, ``ISSUE14_LIMITS_S``), writing as it goes to
``issue14.json`` (all steps' rows), ``issue14.md`` and ``issue14_rows.jsonl`` in ``--out``:
- ``tests``: the gpu-marked correctness tests first (the case table on CUDA, the no-sync /
  CUDA-graph test, ``check_backend`` on CUDA), pytest in a child process with a timeout;
- ``overhead``: host overhead, wall time per call at B=1, H=8, D=64, bf16, N = 128 and 1024
  (``host_overhead``): torch SDPA, ak auto and ak triton, causal and window+global, each with the
  mask reused across calls and rebuilt inside the loop as a model does; ratios to SDPA;
- ``plans``: the plan-build table on CUDA (``benchmarks/plan_build.py``'s cases, N = 4k..1M)
  beside FlexAttention's compiled ``create_block_mask`` for the same masks, and cache hits;
- ``longformer``: the Longformer fwd / fwd+bwd comparison with Flex at N = 4k..1M (``measure``).
``benchmarks/gpu_issue14.sh`` runs the four steps under ``timeout`` for one device call.

``--issue15`` runs issue 15's steps the same way (``--step``, ``--limit-s`` per step, ISSUE15_LIMITS_S),
writing ``issue15.json`` / ``.md`` / ``_rows.jsonl`` / ``_pytest.log`` and ``tune_table.py`` in ``--out``:
- ``tests``: the gpu-marked tests of GPU_TESTS (the case table per dtype and Schedule on CUDA);
- ``tune``: the ``--tune`` sweep above, its rows in issue15.json, its winners in tune_table.py; the
  switches whose bf16 case-table test failed in ``tests`` are left out (``failed_switches``);
- ``compare``: the three acceptance cases side by side (``measure``): attnkit with the shipped rows,
  attnkit with tune_table.py's ROWS in the table ("attnkit triton (tuned)"), SDPA FLASH and cuDNN,
  compiled Flex; fwd and fwd+bwd TFLOP/s;
- ``longformer``: issue 14's Longformer table, with the time left.
``--issue15 --summary`` prints the short tables of a run (no GPU); ``benchmarks/gpu_issue15.sh``
runs the four steps under ``timeout`` in one device call of at most 9 minutes and prints them last.

Code, imports pointing down: gpu.py (this command line) -> gpu_steps.py (the issue-14 and issue-15
steps, their reports and summary) -> gpu_overhead.py (host overhead), gpu_warm.py (compiling ahead)
-> gpu_tune.py (the sweep), gpu_tune_report.py (its verdicts, tune_table.py, markdown) ->
gpu_peers.py (the cases, the reference rows, the peer table).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
if str(BENCHMARKS) not in sys.path:  # (there already when this file runs as a script)
    # benchmarks/ is no package: its modules import each other by name, as do the sweep's spawned
    # warm-up workers, which inherit this path
    sys.path.append(str(BENCHMARKS))

import torch  # noqa: E402

from attnkit.bench.cpu import CommaList  # noqa: E402
from attnkit.cli._paths import OutputPathError, prepare_output_dir  # noqa: E402
from gpu_peers import KINDS, LONGFORMER_NS, markdown, measure  # noqa: E402
from gpu_steps import (ISSUE14_LIMITS_S, ISSUE14_STEPS, ISSUE15_LIMITS_S, ISSUE15_STEPS,  # noqa: E402
                       StepReport, acceptance_cases, issue14, issue15, print_issue15_summary, run_meta, step_tune,
                       tune_render)
from gpu_tune import TUNE_LIMIT_S, tune_case  # noqa: E402

__all__ = ["build_parser", "main", "measure", "parse_args", "tune_case"]  # what callers reach here (the tests stub
#                                                                            measure and tune_case on this module)


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; list options are comma-separated (``--ns 65536,131072``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N up to 4096 only (with --tune: every case at N=4096)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"),
                   help="directory for the JSON, .jsonl and markdown; created if missing, before any case "
                        "(default benchmarks/results)")
    p.add_argument("--tune", action="store_true",
                   help="sweep attnkit's Triton configs per pass on issue 15's acceptance cases instead (tune.json, "
                        "tune.md, tune_rows.jsonl and tune_table.py in --out, written as it goes)")
    p.add_argument("--acceptance", action="store_true",
                   help="only the issue's acceptance cases: Longformer N=65536, dense D=128 N=16384, causal D=64 N=16384")
    p.add_argument("--kinds", metavar="KIND,...", type=CommaList(str), default=KINDS,
                   help="subset of the cases, comma-separated, from {" + ",".join(KINDS) + "} (default all)")
    p.add_argument("--ns", metavar="N,...", type=CommaList(int), default=None,
                   help="sequence lengths, comma-separated, instead of each kind's defaults (with --tune or "
                        "--issue15: one N, the Longformer case's, e.g. 1048576)")
    p.add_argument("--ds", metavar="D,...", type=CommaList(int), default=(64, 128),
                   help="head dims of the dense and causal cases, comma-separated (default 64,128)")
    p.add_argument("--issue14", action="store_true",
                   help="issue 14's run instead: tests, host overhead, plan builds beside Flex, the Longformer table "
                        "(issue14.json / .md / _rows.jsonl in --out, written as it goes)")
    p.add_argument("--issue15", action="store_true",
                   help="issue 15's run instead: tests, tune, compare, longformer (issue15.json / .md / _rows.jsonl / "
                        "_pytest.log and tune_table.py in --out, written as it goes; benchmarks/gpu_issue15.sh)")
    p.add_argument("--step", action="append", choices=tuple(dict.fromkeys(ISSUE14_STEPS + ISSUE15_STEPS)),
                   default=None, help="with --issue14 / --issue15: run only this step (repeat for several; default "
                                      f"all, in order: {', '.join(ISSUE14_STEPS)} / {', '.join(ISSUE15_STEPS)})")
    p.add_argument("--limit-s", type=float, default=None,
                   help="soft time limit in seconds, after which no new case or candidate starts: with --tune the "
                        f"whole sweep's (default {TUNE_LIMIT_S:.0f}); with --issue14 / --issue15 each step's (default "
                        f"per step: {ISSUE14_LIMITS_S} / {ISSUE15_LIMITS_S})")
    p.add_argument("--summary", action="store_true",
                   help="with --issue15: print the short summary of --out's issue15.json and issue15_log.txt and "
                        "stop (no GPU needed)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if unknown := sorted(set(args.kinds) - set(KINDS)):
        p.error(f"--kinds: unknown {unknown}; choose from {', '.join(KINDS)}")
    if args.issue14 + args.issue15 + args.tune > 1:
        p.error("--tune, --issue14 and --issue15 are separate runs: give one")
    mode_steps = ISSUE14_STEPS if args.issue14 else ISSUE15_STEPS if args.issue15 else ()
    if wrong := sorted(set(args.step or ()) - set(mode_steps)):
        p.error(f"--step {', '.join(wrong)}: " + (f"not a step of this run; choose from {', '.join(mode_steps)}"
                                                  if mode_steps else "only with --issue14 or --issue15"))
    if (args.tune or args.issue15) and args.ns and len(args.ns) > 1:
        p.error(f"--ns {','.join(map(str, args.ns))}: --tune and --issue15 take one N (the Longformer case's; each "
                "case's winners make one TABLE row)")
    if args.summary and not args.issue15:
        p.error("--summary goes with --issue15")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # before any work (and before the device check): rows are appended to it as they are measured
        out = prepare_output_dir(args.out, "--out")
    except OutputPathError as e:
        print(f"gpu.py: error: {e}", file=sys.stderr)
        return 2
    if args.summary:
        return print_issue15_summary(out)
    kinds = args.kinds
    ns = args.ns or None
    dense_n = ns or ((1024, 4096) if args.quick else (1024, 4096, 16384))
    lf_n = ns or ((4096,) if args.quick else LONGFORMER_NS)
    cases = [(kind, N, D, 16) for kind in ("dense", "causal") if kind in kinds
             for D in args.ds for N in dense_n]
    cases += [("longformer", N, 64, 12) for N in lf_n if "longformer" in kinds]
    if args.acceptance:
        cases = [("longformer", 65536, 64, 12), ("dense", 16384, 128, 16), ("causal", 16384, 64, 16)]
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device")
    if args.issue14:
        limits = None if args.limit_s is None else {step: args.limit_s for step in ISSUE14_STEPS}
        return issue14(out, tuple(args.step or ISSUE14_STEPS), limits=limits)
    if args.issue15:
        limits = None if args.limit_s is None else {step: args.limit_s for step in ISSUE15_STEPS}
        return issue15(out, tuple(args.step or ISSUE15_STEPS), limits=limits, longformer_n=ns[0] if ns else None)
    dev = torch.device("cuda")
    device = torch.cuda.get_device_name(dev)
    if args.tune:
        report = StepReport(out, run_meta(dev, ["tune"]), "tune", tune_render)
        step_tune(report, dev, TUNE_LIMIT_S if args.limit_s is None else args.limit_s,
                  acceptance_cases(ns[0] if ns else None, quick=args.quick))
        for text in tune_render(report.doc).values():
            print(text, flush=True)
        return 0
    rows: list = []
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M")
    log_path = out / f"gpu_{stamp}.jsonl"
    for kind, N, D, H in cases:
        measure(kind, N, D, H, dev, rows, log_path)
    meta = {"date": stamp, "device": device, "torch": torch.__version__, "triton": __import__("triton").__version__}
    (out / f"gpu_{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"gpu_{stamp}.md").write_text(markdown(rows, device))
    print(markdown(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
