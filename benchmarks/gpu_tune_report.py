"""What benchmarks/gpu.py --tune's rows (gpu_tune.py) say: each (case, pass)'s verdict
(``pick_winner``), the winners as configs.TABLE rows (``tune_table_text``: tune_table.py) and the
markdown tables (``tune_markdown``). Reads rows only: no GPU, no torch."""

from __future__ import annotations

import json
import runpy
import statistics
from dataclasses import fields
from pathlib import Path

from attnkit.ops.triton.configs import Config, Schedule

MIN_SPREAD = 0.01  # the spread counted is at least this fraction of the shipped time (two medians may agree by chance)


def pick_winner(rows: list) -> dict:
    """One (case, pass)'s verdict from its rows: the shipped row's time (the mean of its two
    timings), the spread (their difference, at least MIN_SPREAD of the time), the fastest other
    candidate at the slower of its two timings, and whether that beats the shipped time by more
    than the spread. No second timing of either: no winner."""
    ok = [r for r in rows if "ms" in r]
    shipped = [r["ms"] for r in ok if r["shipped"]]
    firsts = [r for r in ok if not r["shipped"] and not r.get("repeat")]
    verdict = {"shipped_ms": statistics.mean(shipped) if shipped else None, "shipped_times": shipped,
               "spread_ms": None, "best": None, "best_ms": None, "wins": False}
    if len(shipped) >= 2:
        verdict["spread_ms"] = max(max(shipped) - min(shipped), MIN_SPREAD * verdict["shipped_ms"])
    if not firsts:
        return {**verdict, "why": "no other candidate was timed"}
    best = min(firsts, key=lambda r: r["ms"])
    again = [r["ms"] for r in ok if r.get("repeat") and not r["shipped"] and r["label"] == best["label"]]
    verdict.update(best=best, best_ms=max([best["ms"], *again]))
    if not shipped:
        return {**verdict, "why": "the shipped row was not timed"}
    if verdict["spread_ms"] is None or not again:
        return {**verdict, "why": "not timed twice (the run stopped first)"}
    if verdict["best_ms"] < verdict["shipped_ms"] - verdict["spread_ms"]:
        return {**verdict, "wins": True, "why": "beats the shipped row by more than the spread"}
    return {**verdict, "why": "within the spread of the shipped row, or slower"}


def by_slice(rows: list) -> dict:
    """(case, N, D, H, pass) -> its rows, in the order they came."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["case"], r["N"], r["D"], r["H"], r.get("pass", "?")), []).append(r)
    return out


def row_config(row: dict, source: str) -> Config:
    """The TABLE row a tuning row measured."""
    return Config(row["block_m"], row["block_n"], {k: tuple(v) for k, v in row["launch"].items()},
                  Schedule.parse(row["schedule"]), source)


def tune_winners(rows: list, device: str, date: str) -> dict:
    """(pass, dtype class, D, mask kind) -> (Config, comment) of each (case, pass) whose fastest
    candidate won (``pick_winner``), its source "timed: <device>, <date>, benchmarks/gpu.py --tune,
    <ms> vs shipped <ms>"; a later case of the same key replaces an earlier one."""
    out = {}
    for (case, N, D, H, pass_), mine in by_slice(rows).items():
        verdict = pick_winner(mine)
        if not verdict["wins"]:
            continue
        best = verdict["best"]
        key = (pass_, "float32" if best.get("dtype") == "float32" else "half", D, best["mask_kind"])
        source = (f"timed: {device}, {date}, benchmarks/gpu.py --tune, {verdict['best_ms']:.3f} ms vs shipped "
                  f"{verdict['shipped_ms']:.3f} ms")
        what = "fwd" if pass_ == "fwd" else "bwd = fwd+bwd - fwd"
        comment = (f"{case} N={N} H={H} D={D} {best.get('dtype', 'bfloat16')} B=1, {what}: {best['label']}, spread "
                   f"{verdict['spread_ms']:.3f} ms")
        out[key] = (row_config(best, source), comment)
    return out


def _py(value) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def config_text(config: Config) -> str:
    """``config`` as Python source, as configs.py writes its rows."""
    launch = ", ".join(f'"{k}": ({w}, {s})' for k, (w, s) in config.launch.items())
    switches = ", ".join(f"{f.name}={_py(getattr(config.schedule, f.name))}" for f in fields(Schedule)
                         if getattr(config.schedule, f.name) != f.default)
    return (f"Config({config.block_m}, {config.block_n}, {{{launch}}}, schedule=Schedule({switches}),\n"
            f"           source={_py(config.source)})")


def tune_table_text(rows: list, device: str, date: str) -> str:
    """tune_table.py: the winners' TABLE rows as Python, to paste into configs.TABLE (and importable:
    ``ROWS``, which the issue-15 compare step applies in-process)."""
    lines = [f'"""TABLE rows timed by benchmarks/gpu.py --tune on {device}, {date}.', "",
             "Paste the entries of ROWS into TABLE in src/attnkit/ops/triton/configs.py. Each beat the shipped row of",
             "its (pass, dtype class, D, mask kind) by more than the measured spread, checked first; each comment says",
             "the case it was measured on (a sparse row: the Longformer pattern only; a half row: bfloat16 only).",
             "One Schedule serves a call: with a forward row that turns a switch on, the backward runs with the",
             "forward's tma / warp_specialize (configs.default_schedule); --issue15's compare times the rows",
             'together."""',
             "", "from attnkit.ops.triton.configs import Config, Schedule", "", "ROWS = {"]
    for (pass_, dclass, D, kind), (config, comment) in tune_winners(rows, device, date).items():
        lines += [f"    # {comment}", f'    ("{pass_}", "{dclass}", {D}, "{kind}"): {config_text(config)},']
    return "\n".join(lines + ["}", ""])


def load_tuned(path: Path) -> dict | None:
    """ROWS of a tune_table.py (None where there is no such file)."""
    return runpy.run_path(str(path))["ROWS"] if Path(path).exists() else None


TUNE_NOTE = ("Each (case, pass): the shipped row first, then candidates by a prior (neighbours of the shipped "
             "row first) until the time limit, compiled ahead in worker processes where the sweep had them "
             "(\"warmed\"; a candidate that failed there is an error row, never launched in the sweep's process); "
             "each checked before timing (output rows against the float32 "
             "reference; backward: dq rows against the float32 reference, dk and dv against the shipped row's). "
             "fwd: the forward alone; bwd: fwd+bwd minus fwd of the same call (forward at the shipped row). "
             "do_bench medians. The shipped row is timed first and again at the end: spread = their difference "
             f"(at least {MIN_SPREAD:.0%}); the fastest candidate is timed again and counted at its slower "
             "time; it wins when that beats the shipped mean by more than the spread.")


def _launch_text(row: dict) -> str:
    launch = row.get("launch", {})
    if row.get("pass") == "bwd":
        return " ".join(f"{k.removeprefix('_bwd_')} {w}/{s}" for k, (w, s) in launch.items())
    return " ".join(f"{w}/{s}" for w, s in launch.values())


def _verdict_lines(verdict: dict) -> list:
    """The line of ``pick_winner``'s verdict (none where the shipped row was not timed)."""
    if verdict["shipped_ms"] is None:
        return []
    times = ", ".join(f"{t:.3f}" for t in verdict["shipped_times"])
    spread = "?" if verdict["spread_ms"] is None else f"{verdict['spread_ms']:.3f}"
    best = "" if verdict["best"] is None else f"; fastest other {verdict['best']['label']} at {verdict['best_ms']:.3f} ms"
    return [f"shipped {verdict['shipped_ms']:.3f} ms (timed {times}; spread {spread} ms){best}: "
            f"**{'winner' if verdict['wins'] else 'no winner'}** ({verdict['why']}).", ""]


def warm_counts(rows: list) -> tuple[int, int, int]:
    """(compiled ahead, failed in the warm-up, tried) over the candidates' first rows."""
    tried = [r for r in rows if "warmed" in r]
    failed = sum(r.get("error", "").startswith("failed in warm-up") for r in tried)
    return sum(bool(r["warmed"]) for r in tried), failed, len(tried)


def _warm_lines(rows: list) -> list:
    warmed, failed, tried = warm_counts(rows)
    if not tried:
        return []
    return [f"Compiled ahead in worker processes: {warmed} of the {tried} candidates tried; {failed} failed there "
            "(not launched in the sweep's process).", ""]


def tune_markdown(rows: list, device: str, title: bool = True) -> str:
    """Per (case, pass): the verdict, the warm-up's counts, then the timed rows fastest first (``x``:
    the shipped mean over this row's time; "check s" includes the compile unless warmed), then errors
    and the rows not tried."""
    lines = [f"# attnkit triton tuning sweep ({device}, B=1)", ""] if title else []
    lines += [TUNE_NOTE, ""]
    for (case, N, D, H, pass_), mine in by_slice(rows).items():
        verdict = pick_winner(mine)
        base = verdict["shipped_ms"]
        lines += [f"### {case} N={N} D={D} H={H}: {pass_}", "", *_verdict_lines(verdict), *_warm_lines(mine)]
        lines += ["| # | blocks | warps/stages | schedule | ms | x shipped | checks | check s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sorted((r for r in mine if "ms" in r), key=lambda r: r["ms"]):
            name = (r["label"].split(" ")[0] + (" (shipped)" if r["shipped"] else "")
                    + (" (again)" if r.get("repeat") else ""))
            checks = ", ".join(f"{k} {r[k]:.1e}" for k in ("max_err", "dq_rows_err", "dk_vs_shipped", "dv_vs_shipped")
                               if k in r)
            ratio = f"{base / r['ms']:.2f}" if base and r["ms"] > 0 else "-"
            lines.append(f"| {r['rank']} | {name} | {_launch_text(r)} | {r['schedule'] or 'plain'} | {r['ms']:.3f} | "
                         f"{ratio} | {checks} | {r.get('check_s', '')}{' (warmed)' if r.get('warmed') else ''} |")
        lines += [f"| {r.get('rank', '')} | {r['label']} | {_launch_text(r)} | {r.get('schedule') or ''} | "
                  f"{r['error']} | | | |" for r in mine if "error" in r]
        lines.append("")
    return "\n".join(lines)

