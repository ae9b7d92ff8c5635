"""Issue 14's host-overhead table for benchmarks/gpu.py --issue14: wall time per call at small N,
torch SDPA beside ``ak.attention`` (auto and triton), the mask built once or per call as a model
does (``host_overhead``, ``overhead_markdown``)."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import attnkit as ak
import plan_build
from gpu_peers import error_text

OVERHEAD_NS = (128, 1024)
OVERHEAD_B, OVERHEAD_H, OVERHEAD_D = 1, 8, 64
WG_WINDOW, WG_GLOBALS = 64, (0, 1, 2, 3)
OVERHEAD_TOLERANCE = 0.05  # max |out - SDPA's| allowed before a contender is timed (bf16)
OVERHEAD_DTYPE = torch.bfloat16


def window_global_mask() -> ak.Mask:
    """The host-overhead table's structured mask: sliding_window(64) | global_tokens([0, 1, 2, 3])."""
    return ak.sliding_window(WG_WINDOW) | ak.global_tokens(list(WG_GLOBALS))


def overhead_contenders(q, k, v) -> dict:
    """name -> (call with the mask built once, call that builds its mask as a model does, the
    name of the SDPA contender computing the same function). Forward only, no autograd."""
    N, dev = q.shape[2], q.device
    causal, wg = ak.causal(), window_global_mask()
    wg_dense = wg.materialize(N, N, dev)  # (1, 1, N, N) bool

    def sdpa_causal():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def ak_call(impl, mask_of):
        return lambda: ak.attention(q, k, v, mask=mask_of(), impl=impl)
    return {
        "sdpa causal": (sdpa_causal, sdpa_causal, "sdpa causal"),
        "sdpa window+global (bool mask)": (
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=wg_dense),
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=window_global_mask().materialize(N, N, dev)),
            "sdpa window+global (bool mask)"),
        "ak auto causal": (ak_call("auto", lambda: causal), ak_call("auto", ak.causal), "sdpa causal"),
        "ak triton causal": (ak_call("triton", lambda: causal), ak_call("triton", ak.causal), "sdpa causal"),
        "ak triton window+global": (ak_call("triton", lambda: wg), ak_call("triton", window_global_mask),
                                    "sdpa window+global (bool mask)"),
        "ak auto window+global": (ak_call("auto", lambda: wg), ak_call("auto", window_global_mask),
                                  "sdpa window+global (bool mask)"),
    }


def _loop(fn, calls: int) -> None:
    for _ in range(calls):
        fn()


def per_call_ms(fn, device, rounds: int = 5, max_calls: int = 200, min_calls: int = 10,
                round_s: float = 0.15) -> tuple[float, int, list]:
    """Wall milliseconds per call: two warm-up calls (compiles, plans, caches), then ``rounds``
    loops of ``calls`` calls (as many as fit in ``round_s``, within [min_calls, max_calls]),
    synchronized around each loop and not per call, as a model's calls run back to back; the
    median of the loops' means, the calls per loop, and each loop's mean."""
    fn()
    est, _ = plan_build.wall_ms(fn, device)
    calls = max(min_calls, min(max_calls, int(round_s * 1e3 / max(est, 1e-3))))
    means = [plan_build.wall_ms(lambda: _loop(fn, calls), device)[0] / calls for _ in range(rounds)]
    return statistics.median(means), calls, [round(m, 5) for m in means]


def host_overhead(device, dtype=torch.bfloat16, ns=OVERHEAD_NS, on_row=print, deadline: float | None = None,
                  **timing) -> list:
    """The host-overhead rows: every contender of ``overhead_contenders`` at each N, mask reused
    and rebuilt; each output checked against its SDPA counterpart before it is timed. ``timing``
    goes to ``per_call_ms``. Ratios are added by ``overhead_ratios``."""
    rows = []
    for N in ns:
        g = torch.Generator(device=device).manual_seed(N)
        q, k, v = (torch.randn(OVERHEAD_B, OVERHEAD_H, N, OVERHEAD_D, device=device, dtype=dtype, generator=g)
                   for _ in range(3))
        with torch.no_grad():
            runs = overhead_contenders(q, k, v)
            want = {name: reused().float() for name, (reused, _, same) in runs.items() if name == same}
            for name, (reused, rebuilt, same) in runs.items():
                auto = ak.explain(q, k, v, mask=window_global_mask() if "window" in name else ak.causal()).chosen
                for mode, fn in (("reused", reused), ("rebuilt", rebuilt)):
                    row = {"step": "overhead", "contender": name, "mask_mode": mode, "N": N, "B": OVERHEAD_B,
                           "H": OVERHEAD_H, "D": OVERHEAD_D, "dtype": str(dtype).replace("torch.", ""),
                           "baseline": same}
                    if name.startswith("ak auto"):
                        row["auto_picks"] = auto
                    if deadline is not None and time.monotonic() > deadline:
                        row["error"] = "skipped: time limit"
                    else:
                        try:
                            err = (fn().float() - want[same]).abs().max().item()
                            row["max_err_vs_sdpa"] = err
                            if not err <= OVERHEAD_TOLERANCE:
                                raise RuntimeError(f"output differs from {same} by {err:.3g}: not timed")
                            ms, calls, means = per_call_ms(fn, device, **timing)
                            row.update(ms_per_call=ms, calls_per_loop=calls, loop_means_ms=means)
                        except Exception as e:  # reported, and the table goes on
                            row["error"] = error_text(e)
                    rows.append(row)
                    on_row(row)
    return overhead_ratios(rows)


def overhead_ratios(rows: list) -> list:
    """Adds to each timed row its ratio to SDPA causal and to the SDPA call of the same mask
    (same N and mask mode)."""
    ms = {(r["contender"], r["mask_mode"], r["N"]): r.get("ms_per_call") for r in rows}
    for r in rows:
        if r.get("ms_per_call") is None:
            continue
        for key, base in (("ratio_to_sdpa_causal", "sdpa causal"), ("ratio_to_sdpa_same_mask", r["baseline"])):
            b = ms.get((base, r["mask_mode"], r["N"]))
            r[key] = r["ms_per_call"] / b if b else None
    return rows


def overhead_markdown(rows: list) -> str:
    """The host-overhead table; ratios worked out here too, so a table written mid-run has them."""
    def ratio(x):
        return "-" if x is None else f"{x:.2f}x"

    def cell(r):
        if r is None:
            return ""
        if "error" in r:
            return r["error"]
        same = "" if r["baseline"] == "sdpa causal" else f", {ratio(r['ratio_to_sdpa_same_mask'])} same-mask SDPA"
        return f"{r['ms_per_call']:.4f} ms ({ratio(r['ratio_to_sdpa_causal'])}{same})"
    rows = overhead_ratios([dict(r) for r in rows])
    by = {(r["contender"], r["mask_mode"], r["N"]): r for r in rows}
    lines = [f"Wall time per call, B={OVERHEAD_B}, H={OVERHEAD_H}, D={OVERHEAD_D}, forward without autograd; "
             "median of the loop means, synchronized around each loop and not per call; (ratio to SDPA causal, and to SDPA with the same "
             "mask as a bool tensor). window+global = sliding_window(64) | global_tokens([0, 1, 2, 3]).", "",
             "| N | contender | auto picks | mask reused | mask rebuilt per call |", "|---|---|---|---|---|"]
    for name, _, N in dict.fromkeys((r["contender"], 0, r["N"]) for r in rows):
        reused, rebuilt = by.get((name, "reused", N)), by.get((name, "rebuilt", N))
        picks = (reused or rebuilt or {}).get("auto_picks", "")
        lines.append(f"| {N} | {name} | {picks} | {cell(reused)} | {cell(rebuilt)} |")
    return "\n".join(lines) + "\n"

