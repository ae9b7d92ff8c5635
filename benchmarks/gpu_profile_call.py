"""Where one warm ``ak.attention(..., impl="triton")`` call spends its time, host and device.

Issue 14 measured about 1.2 ms of fixed cost per Longformer forward on an H200 with the block
plan prebuilt (0.79 ms at N=4096 against FlexAttention's 0.13 ms) and could not say where it
went. This script, for a lent GPU, runs a few warm calls under ``torch.profiler`` and writes:

- ``profile_<case>.txt``: torch.profiler's table by self CPU time and by CUDA time (host Python,
  the custom op's dispatch, each Triton launch, the split partials' merge ops);
- ``profile_<case>.json``: a Chrome trace (chrome://tracing or ui.perfetto.dev);
- ``host_<case>.json``: wall time per call of the host path alone, with the kernels stubbed
  (what ``ak.attention`` costs before the first launch), beside torch SDPA's wall time per call.

Usage (on the device machine, attnkit not installed)::

    PYTHONPATH=src python benchmarks/gpu_profile_call.py --out $OUT [--n 4096 16384]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import attnkit as ak


def _inputs(N: int, H: int = 12, D: int = 64, grad: bool = False):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(grad)
            for _ in range(3)]


def _longformer() -> ak.Mask:
    return ak.sliding_window(256) | ak.global_tokens(range(16))


def profile_case(N: int, backward: bool, out: Path) -> None:
    """torch.profiler over 5 warm calls of the Longformer mask at N (mask rebuilt per call)."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = _inputs(N, grad=backward)

    def step():
        o = ak.attention(q, k, v, mask=_longformer(), impl="triton")
        if backward:
            o.sum().backward()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    name = f"longformer_N{N}_{'fwdbwd' if backward else 'fwd'}"
    table = prof.key_averages()
    (out / f"profile_{name}.txt").write_text(
        table.table(sort_by="self_cpu_time_total", row_limit=40) + "\n\n"
        + table.table(sort_by="cuda_time_total", row_limit=25))
    prof.export_chrome_trace(str(out / f"profile_{name}.json"))


def host_path(N: int, out: Path, calls: int = 300) -> None:
    """Wall time per call of ak.attention(impl="triton") with its custom op stubbed, and of torch
    SDPA (causal), at B=1, H=8, D=64 bf16."""
    from attnkit.ops.triton import op

    q, k, v = (t[:, :8].contiguous() for t in _inputs(N))
    results = {}

    def per_call(fn) -> float:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / calls * 1e6
    results["sdpa causal us"] = per_call(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    for name, mask in (("causal", ak.causal), ("window|global", lambda: ak.sliding_window(64) | ak.global_tokens(range(4)))):
        results[f"ak triton {name} us"] = per_call(lambda: ak.attention(q, k, v, mask=mask(), impl="triton"))
        real = op._attention_op
        op._attention_op = lambda q, k, v, *rest: (q, q.new_empty(q.shape[:3], dtype=torch.float32))
        try:
            results[f"ak triton {name} host only us"] = per_call(lambda: ak.attention(q, k, v, mask=mask(), impl="triton"))
        finally:
            op._attention_op = real
    (out / f"host_N{N}.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 65536])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_profile_call.py needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    host_path(128, args.out)
    for N in args.n:
        for backward in (False, True):
            profile_case(N, backward, args.out)
            print(f"profiled N={N} {'fwd+bwd' if backward else 'fwd'}", flush=True)


if __name__ == "__main__":
    main()
