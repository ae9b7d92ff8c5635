"""attnkit's Triton kernels beside torch SDPA (FLASH, cuDNN, EFFICIENT) and FlexAttention, on one GPU.

    python benchmarks/gpu.py                  # the whole table (several minutes on an H100)
    python benchmarks/gpu.py --quick          # small sizes only: a smoke test of the script
    python benchmarks/gpu.py --out DIR        # where the JSON and markdown go (default benchmarks/results)
    python benchmarks/gpu.py --tune           # sweep attnkit's block sizes, warps and stages instead
    python benchmarks/gpu.py --acceptance     # only the three cases of issue 6's acceptance
    python benchmarks/gpu.py --kinds longformer --ns 65536,131072   # a subset (one device call is 10 min)

In one process, on the same bf16 inputs (B=1):
- dense and causal, H=16, D = 64 and 128, N = 1k, 4k, 16k: attnkit triton, SDPA FLASH / CUDNN /
  EFFICIENT (``sdpa_kernel``), FlexAttention compiled (causal: a causal block mask);
- the Longformer pattern (H=12, D=64, window of W=256 keys on each side, G=16 global tokens at the start),
  N = 4k, 16k, 64k, 128k: attnkit triton, FlexAttention compiled with the same block mask.

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

``--tune`` times attnkit alone on the acceptance cases (Longformer N=64k, dense D=128 N=16k,
causal D=64 N=16k) over TUNE_BLOCKS x TUNE_WARPS x TUNE_STAGES, every kernel launched with the
same warps and stages and the same blocks in both passes, output checked first; it writes
tune_*.json / .md with the forward and the backward (fwd+bwd minus fwd) times, fastest first, so
the forward's and the backward's best can be read apart. Its winners go into ``attnkit.ops.triton.configs.gpu_blocks``
and ``launch_config`` (and ``python -m attnkit.ops.triton_check`` must still pass).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit as ak
from attnkit.bench.cpu import CommaList
from attnkit.cli._paths import OutputPathError, prepare_output_dir
from attnkit.ops.block_plan import make_plan
from attnkit.ops.triton import configs as triton_configs
from attnkit.ops.triton.configs import default_blocks
from attnkit.ops.triton.op import triton_attention
from attnkit.viz.capture import AttentionRecord

W, G = 256, 16
CHECK_ROWS = 64
TOLERANCE = 0.05  # bf16 outputs against the float32 reference rows


def error_text(e: BaseException) -> str:
    """One line for the report, also for an exception without a message."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def longformer_mask():
    return ak.sliding_window(W) | ak.global_tokens(list(range(G)))


def useful_pairs(kind: str, N: int) -> float:
    if kind == "dense":
        return float(N) * N
    if kind == "causal":
        return N * (N + 1) / 2
    return N * (2 * W + 1) + 2 * G * N  # the anchors' count for the Longformer pattern


def reference_rows(q, k, v, mask, rows):
    """float32 reference for the sampled query rows: (B, H, r, D)."""
    rec = AttentionRecord("check", q.float(), k.float(), mask, None, None)
    w = rec.weights(rows=rows)  # (B, H, r, Nk)
    return w @ v.float()


def contenders(kind: str, N: int, D: int, H: int, dev):
    """name -> (forward fn(q, k, v) -> out, set-up seconds)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = None if kind == "dense" else ak.causal() if kind == "causal" else longformer_mask()
    out = {}
    t0 = time.perf_counter()
    plan = make_plan(mask, N, N, *default_blocks(D, torch.bfloat16), dev)
    bwd_blocks = default_blocks(D, torch.bfloat16, backward=True)
    plan_bwd = plan if bwd_blocks == (plan.block_m, plan.block_n) else make_plan(mask, N, N, *bwd_blocks, dev)
    torch.cuda.synchronize()
    out["attnkit triton"] = (lambda q, k, v: triton_attention(q, k, v, mask=mask, plan=plan, plan_bwd=plan_bwd)[0],
                             time.perf_counter() - t0)
    if kind in ("dense", "causal"):
        for name, be in (("sdpa FLASH", SDPBackend.FLASH_ATTENTION), ("sdpa CUDNN", SDPBackend.CUDNN_ATTENTION),
                         ("sdpa EFFICIENT", SDPBackend.EFFICIENT_ATTENTION)):
            def run(q, k, v, be=be):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=kind == "causal")
            out[name] = (run, 0.0)
    # one static graph per case: dynamic=False, and a fresh dynamo per case (measure), so no case
    # falls back to a dynamic-shape kernel or, past dynamo's recompile limit, to eager flex
    flex = torch.compile(flex_attention, dynamic=False)
    if kind == "longformer":
        def mod(b, h, qi, ki):
            return ((qi - ki).abs() <= W) | (qi < G) | (ki < G)
    elif kind == "causal":
        def mod(b, h, qi, ki):
            return qi >= ki
    else:
        mod = None
    t0 = time.perf_counter()
    # _compile=True: built tile by tile; without it torch materializes N x N int64 tensors (64 GiB at 64k)
    block_mask = None if mod is None else create_block_mask(mod, 1, None, N, N, device=dev, _compile=True)
    out["flex (compiled)"] = (lambda q, k, v: flex(q, k, v, block_mask=block_mask), time.perf_counter() - t0)
    return mask, out


GRAD_CHECK_N = 4096  # up to here the float32 reference's full backward fits comfortably


def reference_grads(q, k, v, mask, grad_out):
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = ak.attention(*leaves, mask=mask, impl="reference")
    return torch.autograd.grad(out, leaves, grad_out.float())


def check(fn, q, k, v, mask, rows, want, N) -> float:
    """Largest error of the output rows (and, up to GRAD_CHECK_N, of dq, dk, dv, relative to each
    gradient's largest entry); raises if past TOLERANCE."""
    got = fn(q, k, v)
    err = (got.detach()[:, :, rows.to(q.device)].float() - want).abs().max().item()
    if N <= GRAD_CHECK_N:
        grad_out = torch.randn_like(got)
        mine = torch.autograd.grad(got, (q, k, v), grad_out)
        for name, a, b in zip(("dq", "dk", "dv"), mine, reference_grads(q, k, v, mask, grad_out)):
            rel = ((a.float() - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()
            if not rel <= TOLERANCE:
                raise RuntimeError(f"{name} differs from the reference by {rel:.3g} (relative) > {TOLERANCE}: not timed")
    if not err <= TOLERANCE:
        raise RuntimeError(f"output differs from the reference by {err:.3g} > {TOLERANCE}: not timed")
    return err


def peak_gib(fn, q, k, v) -> float:
    """Memory above what is allocated now, over one forward+backward call."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(q, k, v)
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def measure(kind: str, N: int, D: int, H: int, dev, rows_log: list, log_path: Path) -> None:
    from triton.testing import do_bench

    torch._dynamo.reset()  # each case compiles its own static flex graph (see contenders)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    rows = torch.linspace(0, N - 1, CHECK_ROWS).long()
    fwd_flops = 4 * H * D * useful_pairs(kind, N)
    try:
        mask, runs = contenders(kind, N, D, H, dev)
        want = reference_rows(q.detach(), k.detach(), v.detach(), mask, rows)
    except Exception as e:  # e.g. out of memory building a contender: reported, the run goes on
        runs, mask, want = {}, None, None
        entry = {"case": kind, "N": N, "D": D, "H": H, "contender": "(set-up)",
                 "error": error_text(e)}
        rows_log.append(entry)
        with log_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
    for name, (fn, setup_s) in runs.items():
        entry = {"case": kind, "N": N, "D": D, "H": H, "contender": name, "setup_s": round(setup_s, 3)}
        try:
            entry["max_err"] = check(fn, q, k, v, mask, rows, want, N)
            ms = do_bench(lambda: fn(q, k, v), warmup=25, rep=100, return_mode="median")
            grad_out = torch.randn(q.shape, device=dev, dtype=q.dtype)
            msb = do_bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out), warmup=10, rep=50,
                           return_mode="median")
            entry.update(fwd_ms=ms, fwd_tflops=fwd_flops / ms / 1e9, fwdbwd_ms=msb,
                         fwdbwd_tflops=3.5 * fwd_flops / msb / 1e9, peak_gib=peak_gib(fn, q, k, v))
        except Exception as e:  # a contender that cannot run this case is reported, not fatal
            entry["error"] = error_text(e)
        print(json.dumps(entry), flush=True)
        rows_log.append(entry)
        with log_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        torch.cuda.empty_cache()


def markdown(rows: list, device: str) -> str:
    lines = [f"# attnkit triton vs torch SDPA vs FlexAttention ({device}, bf16, B=1)", "",
             "| case | N | D | contender | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak GiB | max err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['N']} | {r['D']} | {r['contender']} | {r['error']} |||||")
            continue
        lines.append(f"| {r['case']} | {r['N']} | {r['D']} | {r['contender']} | {r['fwd_ms']:.3f} | "
                     f"{r['fwd_tflops']:.0f} | {r['fwdbwd_ms']:.3f} | {r['fwdbwd_tflops']:.0f} | "
                     f"{r['peak_gib']:.2f} | {r['max_err']:.1e} |")
    return "\n".join(lines) + "\n"


TUNE_BLOCKS = ((128, 64), (64, 64), (128, 128), (64, 128), (128, 32))
TUNE_WARPS = (4, 8)
TUNE_STAGES = (2, 3)


def tune_case(kind: str, N: int, D: int, H: int, dev, log_path: Path, dtype=torch.bfloat16) -> list:
    """attnkit at every (blocks, warps, stages): rows with fwd_ms and bwd_ms, or an error."""
    from triton.testing import do_bench

    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(q.shape, device=dev, dtype=q.dtype, generator=g)
    mask = None if kind == "dense" else ak.causal() if kind == "causal" else longformer_mask()
    rows = torch.linspace(0, N - 1, CHECK_ROWS).long()
    want = reference_rows(q.detach(), k.detach(), v.detach(), mask, rows)
    shipped = triton_configs.launch_config
    out = []
    for (bm, bn) in TUNE_BLOCKS:
        plan = make_plan(mask, N, N, bm, bn, dev)
        for warps in TUNE_WARPS:
            for stages in TUNE_STAGES:
                entry = {"case": kind, "N": N, "D": D, "H": H, "block_m": bm, "block_n": bn, "num_warps": warps,
                         "num_stages": stages}
                triton_configs.launch_config = lambda *a, w=warps, s=stages: {"num_warps": w, "num_stages": s}
                try:
                    def fn():
                        return triton_attention(q, k, v, mask=mask, plan=plan)[0]
                    err = (fn().detach()[:, :, rows.to(dev)].float() - want).abs().max().item()
                    if not err <= TOLERANCE:
                        raise RuntimeError(f"output differs from the reference by {err:.3g}")
                    fwd = do_bench(fn, warmup=10, rep=50, return_mode="median")
                    both = do_bench(lambda: torch.autograd.grad(fn(), (q, k, v), grad_out), warmup=5, rep=30,
                                    return_mode="median")
                    entry.update(max_err=err, fwd_ms=fwd, bwd_ms=both - fwd)
                except Exception as e:  # out of shared memory, registers, ...: reported
                    entry["error"] = error_text(e)
                finally:
                    triton_configs.launch_config = shipped
                print(json.dumps(entry), flush=True)
                with log_path.open("a") as f:
                    f.write(json.dumps(entry) + "\n")
                out.append(entry)
        torch.cuda.empty_cache()
    return out


def tune_markdown(rows: list, device: str) -> str:
    lines = [f"# attnkit triton tuning sweep ({device}, bf16, B=1)", ""]
    for case in dict.fromkeys((r["case"], r["N"], r["D"]) for r in rows):
        mine = [r for r in rows if (r["case"], r["N"], r["D"]) == case]
        ok = sorted((r for r in mine if "error" not in r), key=lambda r: r["fwd_ms"])
        lines += [f"## {case[0]} N={case[1]} D={case[2]}", "",
                  "| BM x BN | warps | stages | fwd ms | bwd ms |", "|---|---|---|---|---|"]
        lines += [f"| {r['block_m']} x {r['block_n']} | {r['num_warps']} | {r['num_stages']} | {r['fwd_ms']:.3f} | "
                  f"{r['bwd_ms']:.3f} |" for r in ok]
        lines += [f"| {r['block_m']} x {r['block_n']} | {r['num_warps']} | {r['num_stages']} | {r['error']} | |"
                  for r in mine if "error" in r]
        lines.append("")
    return "\n".join(lines)


KINDS = ("dense", "causal", "longformer")


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; list options are comma-separated (``--ns 65536,131072``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N up to 4096 only")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"),
                   help="directory for the JSON, .jsonl and markdown; created if missing, before any case "
                        "(default benchmarks/results)")
    p.add_argument("--tune", action="store_true", help="sweep attnkit's blocks, warps and stages instead")
    p.add_argument("--acceptance", action="store_true",
                   help="only the issue's acceptance cases: Longformer N=65536, dense D=128 N=16384, causal D=64 N=16384")
    p.add_argument("--kinds", metavar="KIND,...", type=CommaList(str), default=KINDS,
                   help="subset of the cases, comma-separated, from {" + ",".join(KINDS) + "} (default all)")
    p.add_argument("--ns", metavar="N,...", type=CommaList(int), default=None,
                   help="sequence lengths, comma-separated, instead of each kind's defaults")
    p.add_argument("--ds", metavar="D,...", type=CommaList(int), default=(64, 128),
                   help="head dims of the dense and causal cases, comma-separated (default 64,128)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if unknown := sorted(set(args.kinds) - set(KINDS)):
        p.error(f"--kinds: unknown {unknown}; choose from {', '.join(KINDS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # before any work (and before the device check): rows are appended to it as they are measured
        out = prepare_output_dir(args.out, "--out")
    except OutputPathError as e:
        print(f"gpu.py: error: {e}", file=sys.stderr)
        return 2
    kinds = args.kinds
    ns = args.ns or None
    dense_n = ns or ((1024, 4096) if args.quick else (1024, 4096, 16384))
    lf_n = ns or ((4096,) if args.quick else (4096, 16384, 65536, 131072))
    cases = [(kind, N, D, 16) for kind in ("dense", "causal") if kind in kinds
             for D in args.ds for N in dense_n]
    cases += [("longformer", N, 64, 12) for N in lf_n if "longformer" in kinds]
    if args.acceptance:
        cases = [("longformer", 65536, 64, 12), ("dense", 16384, 128, 16), ("causal", 16384, 64, 16)]
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device")
    dev = torch.device("cuda")
    device = torch.cuda.get_device_name(dev)
    rows: list = []
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M")
    log_path = out / f"gpu_{stamp}.jsonl"
    if args.tune:
        cases = ([("longformer", 4096, 64, 12)] if args.quick else
                 [("longformer", 65536, 64, 12), ("dense", 16384, 128, 16), ("causal", 16384, 64, 16)])
        rows = [r for case in cases for r in tune_case(*case, dev, out / f"tune_{stamp}.jsonl")]
        (out / f"tune_{stamp}.json").write_text(json.dumps({"device": device, "date": stamp, "rows": rows}, indent=1))
        (out / f"tune_{stamp}.md").write_text(tune_markdown(rows, device))
        print(tune_markdown(rows, device))
        return 0
    for kind, N, D, H in cases:
        measure(kind, N, D, H, dev, rows, log_path)
    meta = {"date": stamp, "device": device, "torch": torch.__version__, "triton": __import__("triton").__version__}
    (out / f"gpu_{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"gpu_{stamp}.md").write_text(markdown(rows, device))
    print(markdown(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
