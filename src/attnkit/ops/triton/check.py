"""Compile attnkit's Triton kernels for a GPU that is not here, and read what the GPU would get.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels' arithmetic on the CPU but skips the
real compiler: it accepts code that ``triton.compile`` rejects (a plain Python global read in a
kernel, say) and says nothing about registers. This module compiles each kernel ahead of time,
exactly as a launch on an H100 (sm_90) or A100 (sm_80) would, down to a cubin with the ``ptxas``
that ships in triton's wheel. No GPU and no CUDA driver are needed. For each kernel it reports the
registers per thread, the bytes spilled to local memory, the shared memory, and which tensor-core
instructions the code uses (``wgmma`` on Hopper, ``mma.sync`` before it).

Used by ``tests/test_triton_compile.py`` (every shipped configuration compiles, without spills)
and ``python -m attnkit.ops.triton_check`` (the table in docs/benchmarks.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import torch

from . import kernels
from .configs import DELTA_ROWS, DTYPES, HEAD_DIMS, gpu_blocks, interpreting, launch_config

KERNELS = ("_fwd", "_bwd_delta", "_bwd_dq", "_bwd_dkdv")
ARCHS = {90: 232448, 80: 166912}  # compute capability -> shared memory per block (bytes) on H100 / A100
_CONSTEXPRS = ("BM", "BN", "D", "HAS_ALIBI", "IEEE", "HAS_KV_LEN", "TMA", "WS", "FUSED_DELTA", "ATOMIC_DQ", "GQA_GROUP",
               "PERSISTENT", "DROPOUT", "SOFTCAP")
_SCALARS_F32 = ("scale_log2", "scale", "keep_scale", "softcap")
_SCALARS_I64 = ("seed", "threshold")  # dropout's Philox seed (< 2**63) and threshold (< 2**32)
_INDEX_PTRS = ("WORK", "KV_IDX", "KV_TILE", "Q_IDX", "Q_TILE", "TILES", "TILES_T", "KV_LEN")
_TENSOR_PTRS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")  # in the input dtype (DK / DV: float32 under GQA)
_FLOAT32_PTRS = ("LSE", "DELTA", "DLSE", "SLOPES", "PO", "PLSE", "PDQ", "PDK", "PDV", "DQACC")
TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class KernelStats:
    """One kernel compiled for one configuration."""

    kernel: str
    arch: int  # compute capability, 90 = H100
    dtype: str
    D: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    variant: str  # "", "alibi", "gqa", "ragged", "padding", "dropout", "softcap", or a Schedule switch
    registers: int  # per thread (255 is the ceiling)
    spill_bytes: int  # spill stores to local memory per thread: 0 unless registers ran out
    shared_bytes: int  # dynamic shared memory per program
    tensor_core_ops: int  # wgmma (sm_90) or mma.sync (sm_80) instructions in the PTX
    tma_ops: int = 0  # bulk tensor copies (cp.async.bulk.tensor: TMA) in the PTX
    setmaxnreg: int = 0  # setmaxnreg instructions: warp-specialized partitions re-balancing registers
    mma_sync_ops: int = 0  # mma.sync instructions (the tensor cores without wgmma: tiles of fewer than 64 rows)


VARIANTS = ("", "alibi", "gqa", "ragged", "padding", "dropout", "softcap", "dropout_softcap")  # see compile_kernel
REGULARIZED = {"dropout": {"DROPOUT": True}, "softcap": {"SOFTCAP": True},  # variant -> its constexprs
               "dropout_softcap": {"DROPOUT": True, "SOFTCAP": True}}
# The Schedule switches (configs.Schedule), each compiled on its own: variant -> (kernels it changes,
# its constexprs). Off in every shipped row until a GPU run shows it correct and faster.
SWITCHES = {
    "tma": (("_fwd", "_bwd_dq", "_bwd_dkdv"), {"TMA": True}),
    "ws": (("_fwd", "_bwd_dq", "_bwd_dkdv"), {"WS": True}),
    "fused_delta": (("_bwd_dq",), {"FUSED_DELTA": True}),
    "atomic_dq": (("_bwd_dkdv",), {"ATOMIC_DQ": True}),
    "gqa_group": (("_bwd_dkdv",), {"GQA_GROUP": True}),
    "persistent": (("_fwd",), {"PERSISTENT": True}),
}


def _signature(fn, dtype: torch.dtype, gqa: bool = False) -> dict[str, str]:
    """The kernel's argument types as ``triton.compile`` takes them: pointers typed, ints i32.
    gqa: dk/dv are float32 buffers (per query head, summed over each group afterwards)."""
    ty = TRITON_DTYPES[dtype]
    sig = {}
    for name in fn.arg_names:
        if name in _CONSTEXPRS:
            sig[name] = "constexpr"
        elif gqa and name in ("DK", "DV"):
            sig[name] = "*fp32"
        elif name in _TENSOR_PTRS:
            sig[name] = "*" + ty
        elif name in _INDEX_PTRS:
            sig[name] = "*i32"
        elif name in _FLOAT32_PTRS:
            sig[name] = "*fp32"
        elif name in _SCALARS_I64:
            sig[name] = "i64"
        else:
            sig[name] = "fp32" if name in _SCALARS_F32 else "i32"
    return sig


def _attrs(fn, sig: dict[str, str], ragged: bool = False) -> dict:
    """The specialization a launch on contiguous tensors gets (triton's ``specialize_impl``):
    every pointer 16-byte aligned and every stride divisible by 16 (D is a multiple of 16), and
    Nq, Nk too unless ``ragged`` (then neither is, nor are the lse strides, H x Nq and Nq)."""
    off = ("Nq", "Nk", "slb", "slh") if ragged else ()
    hinted = [name for name in fn.arg_names if name not in off and
              (sig[name].startswith("*") or name in ("Nq", "Nk") or (name[0] == "s" and sig[name] == "i32"))]
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in hinted}


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill store bytes) from ``ptxas -v`` on the kernel's PTX, with the flags
    triton itself gives ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               src, "-o", os.path.join(tmp, "kernel.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if regs is None or spills is None:
        raise RuntimeError(f"could not read registers and spills from ptxas -v:\n{log}")
    return int(regs.group(1)), int(spills.group(1))


def compile_kernel(kernel: str, dtype: torch.dtype, D: int, block_m: int, block_n: int, *, arch: int = 90,
                   variant: str = "", num_warps: int | None = None, num_stages: int | None = None) -> KernelStats:
    """Compile ``kernel`` (one of KERNELS) for compute capability ``arch`` with the launch
    configuration attnkit uses (``configs.launch_config``) unless num_warps / num_stages are
    given. ``variant``: "" (contiguous tensors, N a multiple of 16), "alibi", "gqa" (float32
    dk/dv buffers), "ragged" (N not a multiple of 16), "padding" (per-sample key lengths),
    "dropout" (Philox keep bits in the tiles), "softcap" (tanh-capped scores), "dropout_softcap"
    (both), or one of SWITCHES (a ``Schedule`` switch on).
    Raises triton's CompilationError where the kernel does not compile."""
    if variant not in VARIANTS and variant not in SWITCHES:
        raise ValueError(f"variant={variant!r}: expected one of {VARIANTS + tuple(SWITCHES)}")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(kernels, kernel)
    if kernel == "_bwd_delta":  # row blocks only, of its own size
        block_m = block_n = DELTA_ROWS
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError(f"{kernel} is {type(fn).__name__}, not a JITFunction: Triton's interpreter is on "
                           "(TRITON_INTERPRET=1 when triton was imported); compile in a process without it")
    config = launch_config(kernel, block_m, block_n, D, dtype, regularized=variant in REGULARIZED)
    config = {"num_warps": num_warps or config["num_warps"], "num_stages": num_stages or config["num_stages"]}
    constexprs = {"BM": block_m, "BN": block_n, "D": D, "HAS_ALIBI": variant == "alibi",
                  "IEEE": dtype == torch.float32, "HAS_KV_LEN": variant == "padding", "TMA": False, "WS": False,
                  "FUSED_DELTA": False, "ATOMIC_DQ": False, "GQA_GROUP": False, "PERSISTENT": False}
    constexprs.update(SWITCHES.get(variant, ((), {}))[1])
    constexprs.update({"DROPOUT": False, "SOFTCAP": False, **REGULARIZED.get(variant, {})})
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    sig = _signature(fn, dtype, gqa=variant == "gqa")
    source = ASTSource(fn, sig, constexprs, _attrs(fn, sig, ragged=variant == "ragged"))
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=config)
    ptx = compiled.asm["ptx"]
    registers, spills = _ptxas_report(ptx, arch)
    mma = ptx.count("wgmma.mma_async") if arch >= 90 else ptx.count("mma.sync")
    return KernelStats(kernel, arch, TRITON_DTYPES[dtype], D, block_m, block_n, config["num_warps"],
                       config["num_stages"], variant, registers, spills, compiled.metadata.shared, mma,
                       ptx.count("cp.async.bulk.tensor"), ptx.count("setmaxnreg"), ptx.count("mma.sync"))


def _variants(kernel: str, dtype: torch.dtype, D: int) -> list[str]:
    """The variants checked besides the plain one: ALiBi and key lengths at D = 64, dropout and
    softcap at D = 64 and 128 (the most registers; each alone and both in bfloat16, whose code
    float16 shares, both in float32), GQA for dk/dv in half precision, a ragged N in bfloat16 at
    D = 64 and 128."""
    out = [""]
    if D == 64 and kernel != "_bwd_delta":
        out += ["alibi", "padding"]
    if D >= 64 and kernel != "_bwd_delta":
        out += {torch.bfloat16: list(REGULARIZED), torch.float32: ["dropout_softcap"]}.get(dtype, [])
    if kernel == "_bwd_dkdv" and dtype != torch.float32:
        out.append("gqa")
    if dtype == torch.bfloat16 and D >= 64:
        out.append("ragged")
    return out


def switch_configs(archs=(90,)) -> list[dict]:
    """Each Schedule switch (SWITCHES) on the kernels it changes, bfloat16, D = 64 and 128, at the
    default blocks: the switched-off variants must compile too (their spills are reported)."""
    out = []
    for arch in archs:
        for variant, (kernels_, _) in SWITCHES.items():
            for D in (64, 128):
                for kernel in kernels_:
                    bm, bn = gpu_blocks(D, torch.bfloat16, backward=kernel != "_fwd")
                    out.append(dict(kernel=kernel, dtype=torch.bfloat16, D=D, block_m=bm, block_n=bn, arch=arch,
                                    variant=variant))
    return out


def shipped_configs(archs=(90,)) -> list[dict]:
    """Every configuration a GPU launch can pick: each kernel, dtype and head dim at its default
    blocks (``configs.gpu_blocks``, the forward's or the backward's; for dropout / softcap the
    backward's ``REGULARIZED_BWD`` blocks), in ``_variants``."""
    out = []
    for arch in archs:
        for dtype in DTYPES:
            for D in HEAD_DIMS:
                for kernel in KERNELS:
                    for variant in _variants(kernel, dtype, D):
                        bm, bn = ((DELTA_ROWS,) * 2 if kernel == "_bwd_delta" else
                                  gpu_blocks(D, dtype, backward=kernel != "_fwd", regularized=variant in REGULARIZED))
                        out.append(dict(kernel=kernel, dtype=dtype, D=D, block_m=bm, block_n=bn, arch=arch,
                                        variant=variant))
    return out


def _compile(cfg: dict) -> dict:
    return asdict(compile_kernel(**cfg))


def check_all(archs=(90,), jobs: int | None = None, switches: bool = False) -> list[dict]:
    """``compile_kernel`` over ``shipped_configs(archs)`` (and ``switch_configs`` with
    ``switches``), in parallel processes: a list of KernelStats as dicts."""
    from concurrent.futures import ProcessPoolExecutor

    configs = shipped_configs(archs) + (switch_configs(archs) if switches else [])
    with ProcessPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        return list(pool.map(_compile, configs))


def _table(rows: list[dict]) -> str:
    head = ("| arch | kernel | dtype | D | variant | BM x BN | warps | stages | registers | spill bytes | shared KiB "
            "| tensor-core ops | TMA ops |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| sm_{s['arch']} | {s['kernel']} | {s['dtype']} | {s['D']} | {s['variant']} | "
             f"{s['block_m']} x {s['block_n']} | "
             f"{s['num_warps']} | {s['num_stages']} | {s['registers']} | {s['spill_bytes']} | "
             f"{s['shared_bytes'] / 1024:.1f} | {s['tensor_core_ops']} | {s['tma_ops']} |" for s in rows]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> None:
    """``python -m attnkit.ops.triton_check [--arch 90 80] [--json]``: compile every shipped
    configuration and print a markdown table (or JSON)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCHS))
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a markdown table")
    parser.add_argument("--switches", action="store_true",
                        help="also compile each Schedule switch (switched off in the shipped table)")
    args = parser.parse_args(argv)
    if interpreting():
        raise SystemExit("triton_check compiles for a GPU: run it without TRITON_INTERPRET=1 (the interpreter's "
                         "kernels cannot be compiled)")
    rows = check_all(tuple(args.arch), switches=args.switches)
    print(json.dumps(rows) if args.json else _table(rows))


if __name__ == "__main__":
    main()
