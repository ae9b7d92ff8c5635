"""Block sizes and launch settings of the Triton kernels: one table of choices, in one place.

``gpu_blocks`` / ``launch_config`` were chosen from compiled register counts for sm_90
(``python -m attnkit.ops.triton_check``: no spills), not yet from timings on a GPU;
``benchmarks/gpu.py --tune`` measures the alternatives where a GPU is lent.
"""

from __future__ import annotations

import os

import torch

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DELTA_ROWS = 64  # rows per program of _bwd_delta


def interpreting() -> bool:
    """Triton's interpreter runs the kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_blocks(D: int, dtype: torch.dtype, backward: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) on the GPU, large tiles whose kernels compile without register spills
    on sm_90 (``python -m attnkit.ops.triton_check``). Forward: 128 x 64. Backward: 64 x 128 (the
    dk/dv kernel holds 128 keys and walks 64-row query blocks, as FlashAttention-2's backward;
    at 128 x 64 it spills), 64 x 64 at D = 128. float32: 32 x 32 (its IEEE dots run on the FMA
    units and hold twice the bytes). Chosen from compiled register counts, not yet from timings."""
    if dtype == torch.float32:
        return 32, 32
    if not backward:
        return 128, 64
    return (64, 64) if D >= 128 else (64, 128)


def default_blocks(D: int, dtype: torch.dtype, backward: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 16 x 16 in the interpreter (tests), ``gpu_blocks`` otherwise."""
    if interpreting():
        return 16, 16
    return gpu_blocks(D, dtype, backward)


def launch_config(kernel: str, block_m: int, block_n: int, D: int, dtype: torch.dtype) -> dict:
    """num_warps / num_stages of one kernel launch: 8 warps for 128-row tiles, D = 128, the dk/dv
    kernel and float32 (with 4 they run out of registers and spill, ``triton_check``), 4 otherwise;
    two pipeline stages. Not yet tuned by timing on a GPU."""
    big = max(block_m, block_n) >= 128 or D >= 128 or kernel == "_bwd_dkdv" or dtype == torch.float32
    return {"num_warps": 8 if big else 4, "num_stages": 2}

