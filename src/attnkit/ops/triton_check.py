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

from . import flash_triton as ft

KERNELS = ("_fwd", "_bwd_delta", "_bwd_dq", "_bwd_dkdv")
ARCHS = {90: 232448, 80: 166912}  # compute capability -> shared memory per block (bytes) on H100 / A100
_CONSTEXPRS = ("BM", "BN", "D", "HAS_ALIBI", "IEEE")
_SCALARS_F32 = ("scale_log2", "scale")
_INDEX_PTRS = ("WORK", "KV_IDX", "KV_TILE", "Q_IDX", "Q_TILE", "TILES", "TILES_T")
_TENSOR_PTRS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")  # in the input dtype (DK / DV: float32 under GQA)
_FLOAT32_PTRS = ("LSE", "DELTA", "DLSE", "SLOPES", "PO", "PLSE", "PDQ", "PDK", "PDV")
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
    has_alibi: bool
    registers: int  # per thread (255 is the ceiling)
    spill_bytes: int  # spill stores to local memory per thread: 0 unless registers ran out
    shared_bytes: int  # dynamic shared memory per program
    tensor_core_ops: int  # wgmma (sm_90) or mma.sync (sm_80) instructions in the PTX


def _signature(fn, dtype: torch.dtype) -> dict[str, str]:
    """The kernel's argument types as ``triton.compile`` takes them: pointers typed, ints i32."""
    ty = TRITON_DTYPES[dtype]
    sig = {}
    for name in fn.arg_names:
        if name in _CONSTEXPRS:
            sig[name] = "constexpr"
        elif name in _TENSOR_PTRS:
            sig[name] = "*" + ty
        elif name in _INDEX_PTRS:
            sig[name] = "*i32"
        elif name in _FLOAT32_PTRS:
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name in _SCALARS_F32 else "i32"
    return sig


def _attrs(fn, sig: dict[str, str]) -> dict:
    """The specialization a typical launch gets (triton's ``specialize_impl``): every pointer and
    every stride 16-byte aligned / divisible by 16 (contiguous (B, H, N, D) tensors, D a multiple
    of 16), Nq and Nk too (the benchmark's lengths). A launch with a ragged N compiles its own
    variant without those two hints."""
    divisible = [["tt.divisibility", 16]]
    return {(i,): divisible for i, name in enumerate(fn.arg_names)
            if sig[name].startswith("*") or name in ("Nq", "Nk") or (name[0] == "s" and name[1:] and sig[name] == "i32")}


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
                   has_alibi: bool = False, num_warps: int | None = None,
                   num_stages: int | None = None) -> KernelStats:
    """Compile ``kernel`` (one of KERNELS) for compute capability ``arch`` with the launch
    configuration attnkit uses (``flash_triton.launch_config``) unless num_warps / num_stages are
    given. Raises triton's CompilationError where the kernel does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(ft, kernel)
    if kernel == "_bwd_delta":  # row blocks only, of its own size
        block_m = block_n = ft.DELTA_ROWS
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError(f"{kernel} is {type(fn).__name__}, not a JITFunction: Triton's interpreter is on "
                           "(TRITON_INTERPRET=1 when triton was imported); compile in a process without it")
    config = ft.launch_config(kernel, block_m, block_n, D, dtype)
    config = {"num_warps": num_warps or config["num_warps"], "num_stages": num_stages or config["num_stages"]}
    constexprs = {"BM": block_m, "BN": block_n, "D": D, "HAS_ALIBI": has_alibi, "IEEE": dtype == torch.float32}
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    sig = _signature(fn, dtype)
    compiled = triton.compile(ASTSource(fn, sig, constexprs, _attrs(fn, sig)), target=GPUTarget("cuda", arch, 32),
                              options=config)
    ptx = compiled.asm["ptx"]
    registers, spills = _ptxas_report(ptx, arch)
    mma = ptx.count("wgmma.mma_async") if arch >= 90 else ptx.count("mma.sync")
    return KernelStats(kernel, arch, TRITON_DTYPES[dtype], D, block_m, block_n, config["num_warps"],
                       config["num_stages"], has_alibi, registers, spills, compiled.metadata.shared, mma)


def shipped_configs(archs=(90,)) -> list[dict]:
    """Every configuration a GPU launch can pick: each kernel, dtype and head dim at its default
    blocks (``flash_triton.gpu_blocks``, the forward's or the backward's), and with ALiBi at D = 64."""
    out = []
    for arch in archs:
        for dtype in ft.DTYPES:
            for D in ft.HEAD_DIMS:
                for kernel in KERNELS:
                    bm, bn = ((ft.DELTA_ROWS,) * 2 if kernel == "_bwd_delta" else
                              ft.gpu_blocks(D, dtype, backward=kernel != "_fwd"))
                    for has_alibi in (False, True) if D == 64 and kernel != "_bwd_delta" else (False,):
                        out.append(dict(kernel=kernel, dtype=dtype, D=D, block_m=bm, block_n=bn, arch=arch,
                                        has_alibi=has_alibi))
    return out


def _compile(cfg: dict) -> dict:
    return asdict(compile_kernel(**cfg))


def check_all(archs=(90,), jobs: int | None = None) -> list[dict]:
    """``compile_kernel`` over ``shipped_configs(archs)``, in parallel processes: a list of
    KernelStats as dicts."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        return list(pool.map(_compile, shipped_configs(archs)))


def _table(rows: list[dict]) -> str:
    head = ("| arch | kernel | dtype | D | ALiBi | BM x BN | warps | stages | registers | spill bytes | shared KiB "
            "| tensor-core ops |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| sm_{s['arch']} | {s['kernel']} | {s['dtype']} | {s['D']} | {'yes' if s['has_alibi'] else ''} | "
             f"{s['block_m']} x {s['block_n']} | "
             f"{s['num_warps']} | {s['num_stages']} | {s['registers']} | {s['spill_bytes']} | "
             f"{s['shared_bytes'] / 1024:.1f} | {s['tensor_core_ops']} |" for s in rows]
    return "\n".join([head, *lines])


def main(argv: list[str] | None = None) -> None:
    """``python -m attnkit.ops.triton_check [--arch 90 80] [--json]``: compile every shipped
    configuration and print a markdown table (or JSON)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(ARCHS))
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a markdown table")
    args = parser.parse_args(argv)
    if ft.interpreting():
        raise SystemExit("triton_check compiles for a GPU: run it without TRITON_INTERPRET=1 (the interpreter's "
                         "kernels cannot be compiled)")
    rows = check_all(tuple(args.arch))
    print(json.dumps(rows) if args.json else _table(rows))


if __name__ == "__main__":
    main()
