"""Why tiled picks big query blocks for dense work: forward and backward time per block size.

    python benchmarks/tiled_blocks.py [N]      (default N=16384; fp32, B=1, H=12, D=64, CPU)

Runs torch SDPA and attnkit tiled with query blocks of 512, 2048 and the whole sequence, in one
process on the same inputs, one warm-up, then one timed forward and backward each, and writes
``benchmarks/results/tiled_blocks_<date>T<hhmm>.md``.
"""

from __future__ import annotations

import datetime as dt
import platform
import sys
import time
from pathlib import Path

import torch

import attnkit as ak
from attnkit.ops.tiled import tiled_attention


def fwd_bwd_seconds(f, grad: torch.Tensor) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = f()
    t1 = time.perf_counter()
    out.backward(grad)
    return t1 - t0, time.perf_counter() - t1


def main(n: int = 16384, heads: int = 12, d: int = 64) -> Path:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, d, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, heads, n, d)
    runs = {"sdpa": lambda: ak.attention(q, k, v, impl="sdpa")}
    for bq in (512, 2048, n):
        runs[f"tiled, block_q={bq}"] = (lambda bq=bq: tiled_attention(q, k, v, mask=None, bias=None,
                                                                      scale=d ** -0.5, block_q=bq)[0])
    fwd_bwd_seconds(runs["sdpa"], grad)  # warm-up
    rows = []
    for name, f in runs.items():
        fwd, bwd = fwd_bwd_seconds(f, grad)
        rows.append(f"| {name} | {fwd:.2f} | {bwd:.2f} |")
        print(rows[-1], flush=True)
    stamp = dt.datetime.now().isoformat(timespec="minutes")
    text = "\n".join([f"# tiled query-block size, {stamp}", "",
                      f"{platform.node()}, {platform.machine()}, torch {torch.__version__} "
                      f"({torch.get_num_threads()} threads). fp32, B=1, H={heads}, N={n}, D={d}, dense; "
                      "one timed call each after one warm-up, same process and inputs.", "",
                      "| contender | forward s | backward s |", "|---|---|---|", *rows, ""])
    path = Path("benchmarks/results") / f"tiled_blocks_{stamp.replace(':', '')}.md"
    path.write_text(text)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
