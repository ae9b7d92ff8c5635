"""Block-plan build time: ``attnkit.ops.block_plan.make_plan`` per mask, N and block size (issue 14).

    python benchmarks/plan_build.py                       # CPU, N = 4k, 16k, 64k, 256k
    python benchmarks/plan_build.py --with-1m             # adds N = 1M (minutes on 2 cores)
    python benchmarks/plan_build.py --ns 65536 --masks longformer,docs512 --blocks 128x64
    python benchmarks/plan_build.py --device cuda --flex  # on a GPU, beside Flex's create_block_mask
                                                          # (benchmarks/gpu.py --issue14 runs this)

Masks (Nq = Nk = N, as attnkit writes them):
  longformer     sliding_window(256) | global_tokens(range(16))
  causal         causal()
  causal_window  causal() & sliding_window(256)
  docsD          causal() & document(ids), D documents of equal length, ids sorted (D = 1, 8, 64, 512)
Blocks: the Triton kernels' GPU tiles (``ops.triton.configs.gpu_blocks(64, bfloat16)``: forward 128x64,
backward 64x128) and 64x64.

Method. Each (mask, N, blocks): the mask is built once (its tensors on the device), one warm-up
``make_plan`` call, then up to ``--reps`` timed calls (fewer when the warm-up says they would take
longer than ``--case-budget-s``); median and minimum of the wall times (``time.perf_counter``; on
CUDA with ``torch.cuda.synchronize()`` before and after each call, so the device's work is in it).
Recorded with each: T (tiles visited, ``len(plan.kv_idx)``), P (of them partial) and U (distinct
partial tiles stored, ``plan.tiles.shape[2]``, which is max(U, 1)).
The cache table: ``cached_plan`` on a hit, the mask rebuilt before every call as a model does
(document ids: the same tensor each call, as a model's buffer): median microseconds of the lookup
alone and of building the mask plus the lookup, over ``--cache-calls`` calls, and whether any call
built a plan (``plan_builds``).
``--flex`` (CUDA): FlexAttention's ``create_block_mask`` for the same masks (mask_mods written
out below, BLOCK_SIZE 128), compiled with ``torch.compile(create_block_mask)`` (one compiled
function; dynamo recompiles per mask_mod and goes dynamic in N after the first N), first call
(compile) recorded apart, then timed as above.
Outputs: ``<out>/plan_build_<cpu|cuda>_<YYYY-MM-DDTHHMM>.json`` and ``.md``, rewritten after each
row, so a killed run keeps what it measured. List options are comma-separated.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

import attnkit as ak
from attnkit.bench.cpu import CommaList, cpu_model
from attnkit.cli._paths import OutputPathError, prepare_output_dir
from attnkit.ops.block_plan import cached_plan, make_plan, plan_builds

W, G = 256, 16
NS = (4096, 16384, 65536, 262144)
N_1M = 1 << 20
DOCS = (1, 8, 64, 512)
FLEX_BLOCK = 128


@dataclass(frozen=True)
class MaskCase:
    """One mask of the table: ``data(N, device)`` makes its tensors once (a model's buffers),
    ``build(data)`` the attnkit mask from them (cheap, done per call in the cache table) and
    ``flex(data)`` the same mask as a FlexAttention mask_mod."""

    name: str
    text: str
    data: Callable[[int, torch.device], dict]
    build: Callable[[dict], ak.Mask]
    flex: Callable[[dict], Callable]


def _nothing(N: int, device) -> dict:
    return {}


def _doc_ids(n_docs: int) -> Callable[[int, torch.device], dict]:
    def data(N: int, device) -> dict:  # sorted ids, n_docs documents of equal length (one more if N % n_docs)
        return {"ids": torch.arange(N, device=device) * n_docs // N}
    return data


def _longformer_mod(d):
    def mod(b, h, q, k):
        return ((q - k).abs() <= W) | (q < G) | (k < G)
    return mod


def _causal_mod(d):
    def mod(b, h, q, k):
        return q >= k
    return mod


def _causal_window_mod(d):
    def mod(b, h, q, k):
        return (q >= k) & (q - k <= W)
    return mod


def _docs_mod(d):
    ids = d["ids"]

    def mod(b, h, q, k):
        return (q >= k) & (ids[q] == ids[k])
    return mod


MASKS: dict[str, MaskCase] = {
    "longformer": MaskCase("longformer", f"sliding_window({W}) | global_tokens(range({G}))", _nothing,
                           lambda d: ak.sliding_window(W) | ak.global_tokens(list(range(G))), _longformer_mod),
    "causal": MaskCase("causal", "causal()", _nothing, lambda d: ak.causal(), _causal_mod),
    "causal_window": MaskCase("causal_window", f"causal() & sliding_window({W})", _nothing,
                              lambda d: ak.causal() & ak.sliding_window(W), _causal_window_mod),
    **{f"docs{n}": MaskCase(f"docs{n}", f"causal() & document(ids), {n} documents", _doc_ids(n),
                            lambda d: ak.causal() & ak.document(d["ids"]), _docs_mod) for n in DOCS},
}


def block_pair(text: str) -> tuple[int, int]:
    """'128x64' -> (128, 64): BLOCK_M x BLOCK_N."""
    m, sep, n = text.lower().partition("x")
    if not sep:
        raise ValueError(text)
    return int(m), int(n)


block_pair.__name__ = "BMxBN"  # named so in CommaList's messages


def default_blocks() -> tuple[tuple[int, int], ...]:
    """The Triton kernels' GPU blocks at D=64 in bfloat16 (forward, backward), then 64x64."""
    from attnkit.ops.triton.configs import gpu_blocks  # imports no triton
    out = [gpu_blocks(64, torch.bfloat16), gpu_blocks(64, torch.bfloat16, backward=True), (64, 64)]
    return tuple(dict.fromkeys(out))


# -- timing -------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Milliseconds of one call, the device's work included (synchronized before and after)."""
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, result


def timed(fn: Callable[[], object], device: torch.device, reps: int, budget_s: float) -> dict:
    """One warm-up call, then up to ``reps`` timed calls (fewer past ``budget_s``); ms."""
    warm, result = wall_ms(fn, device)
    n = max(1, min(reps, int(budget_s * 1e3 / max(warm, 1e-3))))
    times = [wall_ms(fn, device)[0] for _ in range(n)]
    return {"warmup_ms": warm, "median_ms": statistics.median(times), "min_ms": min(times),
            "times_ms": [round(t, 4) for t in times], "result": result}


def plan_row(case: MaskCase, N: int, bm: int, bn: int, device: torch.device, reps: int, budget_s: float) -> dict:
    """make_plan for one (mask, N, blocks): times and the plan's T, P, U."""
    mask = case.build(case.data(N, device))
    row = {"what": "make_plan", "mask": case.name, "N": N, "block_m": bm, "block_n": bn, "device": str(device)}
    t = timed(lambda: make_plan(mask, N, N, bm, bn, device), device, reps, budget_s)
    plan = t.pop("result")
    row.update(t, T=int(plan.kv_idx.numel()), P=int((plan.kv_tile >= 0).sum()), U=int(plan.tiles.shape[2]),
               nQ=-(-N // bm), nK=-(-N // bn))
    return row


def cache_row(case: MaskCase, N: int, bm: int, bn: int, device: torch.device, calls: int) -> dict:
    """cached_plan on a hit with the mask rebuilt before each call: median microseconds."""
    data = case.data(N, device)
    cached_plan(case.build(data), N, N, bm, bn, device)  # the miss: builds the plan once
    builds = plan_builds()
    lookup, total = [], []
    for _ in range(calls):
        t0 = time.perf_counter()
        mask = case.build(data)
        t1 = time.perf_counter()
        cached_plan(mask, N, N, bm, bn, device)
        t2 = time.perf_counter()
        lookup.append((t2 - t1) * 1e6)
        total.append((t2 - t0) * 1e6)
    return {"what": "cached_plan hit", "mask": case.name, "N": N, "block_m": bm, "block_n": bn,
            "device": str(device), "calls": calls, "lookup_us": statistics.median(lookup),
            "build_and_lookup_us": statistics.median(total), "plans_built": plan_builds() - builds}


_compiled_cbm = None


def compiled_create_block_mask() -> Callable:
    """``torch.compile(create_block_mask)``, made once (torch's advice; ``_compile=True`` is deprecated)."""
    global _compiled_cbm
    if _compiled_cbm is None:
        from torch.nn.attention.flex_attention import create_block_mask
        _compiled_cbm = torch.compile(create_block_mask)
    return _compiled_cbm


def flex_row(case: MaskCase, N: int, device: torch.device, reps: int, budget_s: float,
             create: Callable | None = None) -> dict:
    """Flex's create_block_mask (compiled) for one (mask, N): first call apart, then timed."""
    create = create or compiled_create_block_mask()
    mod = case.flex(case.data(N, device))
    row = {"what": "flex create_block_mask", "mask": case.name, "N": N, "block_m": FLEX_BLOCK,
           "block_n": FLEX_BLOCK, "device": str(device)}

    def call():
        return create(mod, 1, 1, N, N, device=device, BLOCK_SIZE=FLEX_BLOCK)
    row["first_call_ms"], _ = wall_ms(call, device)  # compiles (or recompiles) here
    t = timed(call, device, reps, budget_s)
    bm = t.pop("result")
    row.update(t, T=int(bm.kv_num_blocks.sum() + (bm.full_kv_num_blocks.sum() if bm.full_kv_num_blocks is not None
                                                  else 0)))
    return row


# -- the machine and the reports ----------------------------------------------------------------------

def _commit() -> str:
    """The commit of the attnkit imported, '+modified' when its files differ from it; '?' outside git."""
    here = str(Path(ak.__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (commit + (" +modified" if dirty else "")) if commit else "?"


def header(device: torch.device, note: str = "") -> dict:
    """Machine, versions and date, written at the top of the results."""
    head = {"note": note, "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "device": str(device), "attnkit": str(Path(ak.__file__).parent),
            "attnkit_commit": _commit(), "loadavg_start": _loadavg()}
    if device.type == "cuda":
        head["gpu"] = torch.cuda.get_device_name(device)
    return head


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _grid(rows: list[dict], cell: Callable[[dict], str], with_blocks: bool = True) -> list[str]:
    """One markdown table: a line per (mask, blocks), a column per N."""
    ns = sorted({r["N"] for r in rows})
    keys = list(dict.fromkeys((r["mask"], r["block_m"], r["block_n"]) for r in rows))
    by = {(r["mask"], r["block_m"], r["block_n"], r["N"]): r for r in rows}
    head = ["mask", "blocks"] if with_blocks else ["mask"]
    lines = ["| " + " | ".join(head + [str(n) for n in ns]) + " |", "|" + "---|" * (len(head) + len(ns))]
    for m, bm, bn in keys:
        cells = [cell(by[(m, bm, bn, n)]) if (m, bm, bn, n) in by else "" for n in ns]
        lines.append("| " + " | ".join(([m, f"{bm}x{bn}"] if with_blocks else [m]) + cells) + " |")
    return lines


def _time_cell(r: dict) -> str:
    return r["error"] if "error" in r else f"{_ms(r['median_ms'])} ({_ms(r['min_ms'])})"


def markdown(head: dict, rows: Sequence[dict], body_only: bool = False) -> str:
    """The tables: make_plan times, tiles, Flex's times, the cache; ``body_only``: without the
    title and the line on the machine (``head`` is then not read)."""
    plans = [r for r in rows if r["what"] == "make_plan"]
    flex = [r for r in rows if r["what"] == "flex create_block_mask"]
    cache = [r for r in rows if r["what"] == "cached_plan hit"]
    masks = "N = Nq = Nk; masks: " + "; ".join(f"{c.name} = `{c.text}`" for c in MASKS.values()) + "."
    if body_only:
        lines = [masks, ""]
    else:
        where = head.get("gpu") or f"{head['cpu_model']}, {head['cpu_count']} cores, {head['torch_threads']} threads"
        lines = [f"# Block-plan build time on {head['device']} ({where}), {head['date']}", "",
                 f"torch {head['torch']}, Python {head['python']}, attnkit {head['attnkit_commit']}; "
                 f"load average at the start {head.get('loadavg_start')}, at the end {head.get('loadavg_now')}. "
                 + (f"{head['note']}. " if head.get("note") else "") + masks, ""]
    if plans:
        lines += ["## make_plan, ms: median (min) after one warm-up", ""] + _grid(plans, _time_cell) + [""]
        lines += ["## Tiles: T visited / P partial / U distinct stored", ""]
        lines += _grid(plans, lambda r: "" if "error" in r else f"{r['T']} / {r['P']} / {r['U']}") + [""]
    if flex:
        lines += [f"## FlexAttention create_block_mask (torch.compile), BLOCK_SIZE {FLEX_BLOCK}, ms: median (min); "
                  "first (compiling) call in brackets below", ""]
        lines += _grid(flex, _time_cell, with_blocks=False) + [""]
        lines += _grid(flex, lambda r: "" if "error" in r else f"[{_ms(r['first_call_ms'])}]", with_blocks=False)
        lines += [""]
    if cache:
        lines += ["## cached_plan on a hit, the mask rebuilt before each call", "",
                  "| mask | N | blocks | lookup µs | mask build + lookup µs | plans built |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['mask']} | {r['N']} | {r['block_m']}x{r['block_n']} | " +
                  (f"{r['error']} | | |" if "error" in r else
                   f"{r['lookup_us']:.1f} | {r['build_and_lookup_us']:.1f} | {r['plans_built']} |") for r in cache]
        lines.append("")
    notes = [f"- {r['what']} {r['mask']} N={r['N']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines + notes) + "\n"


def write(out: Path, stem: str, head: dict, rows: Sequence[dict]) -> tuple[Path, Path]:
    """``out/stem.json`` and ``out/stem.md``; rewritten whole each time."""
    head = {**head, "loadavg_now": _loadavg()}
    (out / f"{stem}.json").write_text(json.dumps({"header": head, "rows": list(rows)}, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(head, rows))
    return out / f"{stem}.json", out / f"{stem}.md"


# -- the run ------------------------------------------------------------------------------------------

def error_text(e: BaseException) -> str:
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def run(ns: Sequence[int], masks: Sequence[str], blocks: Sequence[tuple[int, int]], device: torch.device,
        reps: int = 5, budget_s: float = 10.0, flex: bool = False, cache_n: int | None = 65536,
        cache_calls: int = 200, on_row: Callable[[dict], None] = print,
        deadline: float | None = None) -> list[dict]:
    """Every (mask, N, blocks) make_plan row, Flex's rows with ``flex``, then the cache rows at
    ``cache_n`` (None: none). A case that fails is a row with its error; past ``deadline``
    (time.monotonic()) the remaining cases are rows saying so. ``on_row`` sees each row."""
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        on_row(row)

    def attempt(what: str, name: str, N: int, bm: int, bn: int, fn: Callable[[], dict]) -> None:
        if deadline is not None and time.monotonic() > deadline:
            add({"what": what, "mask": name, "N": N, "block_m": bm, "block_n": bn, "error": "skipped: time limit"})
            return
        try:
            add(fn())
        except Exception as e:  # out of memory at 1M, say: a row, and the run goes on
            add({"what": what, "mask": name, "N": N, "block_m": bm, "block_n": bn, "error": error_text(e)})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    for name in masks:
        case = MASKS[name]
        for N in ns:
            for bm, bn in blocks:
                attempt("make_plan", name, N, bm, bn, lambda: plan_row(case, N, bm, bn, device, reps, budget_s))
            if flex:
                attempt("flex create_block_mask", name, N, FLEX_BLOCK, FLEX_BLOCK,
                        lambda: flex_row(case, N, device, reps, budget_s))
    if cache_n is not None:
        bm, bn = blocks[0]
        for name in masks:
            attempt("cached_plan hit", name, cache_n, bm, bn,
                    lambda: cache_row(MASKS[name], cache_n, bm, bn, device, cache_calls))
    return rows


def format_row(row: dict) -> str:
    what = f"{row['what']:<24} {row['mask']:<14} N={row['N']:>8} {row['block_m']}x{row['block_n']}"
    if "error" in row:
        return f"{what}  {row['error']}"
    if row["what"] == "cached_plan hit":
        return f"{what}  lookup {row['lookup_us']:.1f} us, with the mask build {row['build_and_lookup_us']:.1f} us"
    extra = f"  T={row['T']}" + (f" P={row['P']} U={row['U']}" if "U" in row else "")
    return f"{what}  {row['median_ms']:9.3f} ms (min {row['min_ms']:.3f}, warm-up {row['warmup_ms']:.1f}){extra}"


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; list options are comma-separated (``--ns 4096,65536``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", metavar="N,...", type=CommaList(int), default=NS,
                   help="sequence lengths, comma-separated (default " + ",".join(map(str, NS)) + ")")
    p.add_argument("--with-1m", action="store_true", help=f"add N = {N_1M} (minutes on a 2-core CPU)")
    p.add_argument("--masks", metavar="NAME,...", type=CommaList(str), default=tuple(MASKS),
                   help="masks, comma-separated, from {" + ",".join(MASKS) + "} (default all)")
    p.add_argument("--blocks", metavar="BMxBN,...", type=CommaList(block_pair), default=None,
                   help="block sizes, comma-separated (default the Triton GPU blocks at D=64 bf16, then 64x64: "
                        "128x64,64x128,64x64)")
    p.add_argument("--device", default="cpu", help="where the plans are built: cpu (default) or cuda")
    p.add_argument("--reps", type=int, default=5, help="timed calls per case at most, after one warm-up (default 5)")
    p.add_argument("--case-budget-s", type=float, default=10.0,
                   help="fewer timed calls when the warm-up says they would take longer than this (default 10)")
    p.add_argument("--flex", action="store_true", help="FlexAttention's create_block_mask beside (for CUDA)")
    p.add_argument("--cache-n", type=int, default=65536, help="N of the cache-hit table (0: none; default 65536)")
    p.add_argument("--cache-calls", type=int, default=200, help="calls per cache-hit row (default 200)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"),
                   help="directory for the JSON and markdown; created if missing, before any case "
                        "(default benchmarks/results)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (torch.set_num_threads; default 0: torch's own choice). On a "
                        "shared CPU, 1 thread is steadier: 2 threads among other busy processes spin at barriers")
    p.add_argument("--note", default="", help="a line recorded with the results (what was measured, the commit)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if unknown := [m for m in args.masks if m not in MASKS]:
        p.error(f"--masks: unknown {unknown}; choose from {', '.join(MASKS)}")
    if bad := [b for b in (args.blocks or ()) if min(b) < 16 or any(x & (x - 1) for x in b)]:
        p.error(f"--blocks: {bad}: block sizes are powers of two >= 16")
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r}: cpu or cuda")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # before any work: a path that cannot be used is refused now, not after the first case
        out = prepare_output_dir(args.out, "--out")
    except OutputPathError as e:
        print(f"plan_build.py: error: {e}", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("plan_build.py: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    ns = tuple(args.ns) + ((N_1M,) if args.with_1m and N_1M not in args.ns else ())
    blocks = tuple(args.blocks or default_blocks())
    head = header(device, args.note)
    stem = f"plan_build_{device.type}_{head['date'][:16].replace(':', '')}_{torch.get_num_threads()}t"
    print(f"plan build on {device}: N={list(ns)}, masks {list(args.masks)}, blocks {blocks}; "
          f"results in {out / stem}.{{json,md}}", flush=True)
    rows: list[dict] = []

    def on_row(row: dict) -> None:
        rows.append(row)
        print(format_row(row), flush=True)
        write(out, stem, head, rows)

    run(ns, args.masks, blocks, device, args.reps, args.case_budget_s, args.flex, args.cache_n or None,
        args.cache_calls, on_row)
    print(write(out, stem, head, rows)[1].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
