"""The cases of benchmarks/gpu.py and its peer table: attnkit's Triton kernels beside torch SDPA
(FLASH, cuDNN, EFFICIENT) and compiled FlexAttention on the same bf16 inputs (``measure``), with
what the other parts share: the cases' masks and FLOP counts, the float32 reference rows and dq
rows, ``table_rows`` (config rows in place for a call), ``check``, ``device_ok`` and ``error_text``.
The lowest of benchmarks/gpu*.py (gpu.py's docstring says how they stack): it imports none of them.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit as ak
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


def case_mask(kind: str):
    """The attnkit mask of a case: none (dense), ``ak.causal()`` or the Longformer pattern."""
    return None if kind == "dense" else ak.causal() if kind == "causal" else longformer_mask()


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


def reference_dq_rows(q, k, v, mask, rows, grad_out, scale: float | None = None):
    """float32 dq (B, H, r, D) of the sampled query rows for the loss sum(out * grad_out), from
    those rows' probabilities alone (FlashAttention-2, Algorithm 2): dq_i = scale sum_j
    P_ij (dP_ij - delta_i) k_j with dP_ij = dO_i . v_j and delta_i = dO_i . out_i. (dk and dv need
    every row's probabilities: no such shortcut.) q, k, v (B, H, N, D), rows (r,) long."""
    p = AttentionRecord("check", q.float(), k.float(), mask, None, None).weights(rows=rows)  # (B, H, r, Nk)
    vf = v.float()
    out = p @ vf  # (B, H, r, D)
    dout = grad_out[:, :, rows.to(grad_out.device)].float()  # (B, H, r, D)
    dp = dout @ vf.transpose(-1, -2)  # (B, H, r, Nk)
    delta = (dout * out).sum(-1, keepdim=True)  # (B, H, r, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return scale * (p * (dp - delta)) @ k.float()  # (B, H, r, D)


@contextmanager
def table_rows(rows: dict):
    """``attnkit.ops.triton.configs.TABLE`` with ``rows`` ((pass, dtype class, D, mask kind) ->
    Config) in place inside the block; afterwards the table holds exactly what it held before,
    also when the block raises (the same dict object: the library reads it per call)."""
    table = triton_configs.TABLE
    saved = dict(table)
    try:
        table.update(rows)
        yield table
    finally:
        table.clear()
        table.update(saved)


def attnkit_contender(mask, N: int, D: int, dev, rows: dict | None = None):
    """(fn(q, k, v) -> out, set-up seconds) of attnkit's Triton kernels as the library runs them
    with ``rows`` in ``configs.TABLE`` (``table_rows``; none: the shipped table): plans built here at
    the blocks the table gives the mask's kind, and every call made with the rows in place (the
    launch settings and the schedule are looked up per call)."""
    kind, rows = triton_configs.mask_kind(mask), rows or {}
    t0 = time.perf_counter()
    with table_rows(rows):
        fwd_blocks = default_blocks(D, torch.bfloat16, kind=kind)
        bwd_blocks = default_blocks(D, torch.bfloat16, backward=True, kind=kind)
    plan = make_plan(mask, N, N, *fwd_blocks, dev)
    plan_bwd = plan if bwd_blocks == fwd_blocks else make_plan(mask, N, N, *bwd_blocks, dev)
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()

    def run(q, k, v):
        with table_rows(rows) if rows else nullcontext():  # the shipped contender: the library's call as is
            return triton_attention(q, k, v, mask=mask, plan=plan, plan_bwd=plan_bwd)[0]
    return run, time.perf_counter() - t0


SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
SDPA_NAMES = {"FLASH_ATTENTION": "sdpa FLASH", "CUDNN_ATTENTION": "sdpa CUDNN", "EFFICIENT_ATTENTION": "sdpa EFFICIENT"}


def _no_tuned_row(q, k, v):
    raise RuntimeError("no tuned row for this case (D, mask kind): the shipped rows were the fastest measured")


def contenders(kind: str, N: int, D: int, H: int, dev, tuned: dict | None = None, sdpa=SDPA_BACKENDS):
    """name -> (forward fn(q, k, v) -> out, set-up seconds). ``tuned``: TABLE rows (a tune_table.py's
    ROWS) for an "attnkit triton (tuned)" contender beside the shipped one (None: no such contender;
    rows that miss this case's keys: a row saying so); ``sdpa``: the SDPBackend names timed (dense,
    causal)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = case_mask(kind)
    out = {"attnkit triton": attnkit_contender(mask, N, D, dev)}
    if tuned is not None:
        mine = {key: row for key, row in tuned.items()
                if key[1:] == (triton_configs.dtype_class(torch.bfloat16), D, triton_configs.mask_kind(mask))}
        out["attnkit triton (tuned)"] = attnkit_contender(mask, N, D, dev, mine) if mine else (_no_tuned_row, 0.0)
    if kind in ("dense", "causal"):
        for name in sdpa:
            def run(q, k, v, be=getattr(SDPBackend, name)):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=kind == "causal")
            out[SDPA_NAMES[name]] = (run, 0.0)
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


def measure(kind: str, N: int, D: int, H: int, dev, rows_log: list, log_path: Path, **contender_kw) -> None:
    """Every contender of one case (``contenders``, which takes ``contender_kw``): checked, then
    timed fwd and fwd+bwd; each row appended to ``rows_log`` and ``log_path`` as it is measured."""
    from triton.testing import do_bench

    torch._dynamo.reset()  # each case compiles its own static flex graph (see contenders)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    rows = torch.linspace(0, N - 1, CHECK_ROWS).long()
    fwd_flops = 4 * H * D * useful_pairs(kind, N)
    try:
        mask, runs = contenders(kind, N, D, H, dev, **contender_kw)
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

def device_ok(dev) -> bool:
    """Whether the device still runs work (an illegal address in a kernel breaks the CUDA context
    for the rest of the process: every later candidate would fail)."""
    if torch.device(dev).type != "cuda":
        return True
    try:
        torch.ones(1, device=dev).add_(1).item()
        return True
    except Exception:
        return False

KINDS = ("dense", "causal", "longformer")
LONGFORMER_NS = (4096, 16384, 65536, 262144, 1 << 20)
