"""Fused exact attention in Triton (FlashAttention-2, Dao 2023) over any attnkit mask.

The mask never reaches a kernel as an expression: it becomes a block plan (``ops/block_plan.py``:
per query block the key tiles to visit, FULL or PARTIAL, the partial tiles' bits, split work
items), cached by the mask's structure. Causal masks, windows, global tokens, padding, documents
and any combination run the same kernels; ALiBi is computed in the kernels from its slopes
(``-slope_h * |p_i - j|``, p_i = i + Nk - Nq); a ``key_padding(lengths)`` factor is read per call.
Softcap and dropout run inside the tiles too: dropout's keep bits come from Philox at each
(seed, b, query head, i, j) (``ops/dropout.py``), drawn again by the backward, never stored.

The package, the only place in attnkit that imports triton:

- ``__init__`` (this file): ``why_not``, whether the kernels can run a call, without importing triton;
- ``configs``: block sizes and launch settings;
- ``kernels``: the ``@triton.jit`` kernels;
- ``op``: launchers, the ``torch.library`` custom op with autograd, ``triton_attention``;
- ``check``: compile every shipped configuration for sm_90 / sm_80 without a GPU
  (``python -m attnkit.ops.triton_check``).

Without a CUDA device the kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` is set
before triton is first imported (slow: tests at small sizes).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from ...bias import Alibi, Bias
from ...masks import Mask
from .configs import DTYPES, HEAD_DIMS, interpreting

MAX_BH = 65535  # grid axis 1 is B * Hq: CUDA's limit on gridDim.y

__all__ = ["DTYPES", "HEAD_DIMS", "MAX_BH", "available", "interpreting", "why_not"]


_available: bool | None = None  # looked up once (a plain global: dynamo warns on an lru_cache)


def available() -> bool:
    """Whether triton is installed (looked up once, not imported: importing it costs seconds)."""
    global _available
    if _available is None:
        _available = importlib.util.find_spec("triton") is not None
    return _available


def why_not(q: Tensor, k: Tensor, v: Tensor, mask: Mask | None, bias: Bias | None, dropout_p: float,
            softcap: float | None = None) -> str | None:
    """Why ``impl="triton"`` cannot run this call, or None. Dropout (any ``dropout_p`` in [0, 1))
    and softcap run in the kernels under every mask, bias and ``configs.Schedule``: the keep bits
    depend on (seed, b, query head, row, key) only, not on the tiling or the schedule."""
    if not available():
        return "triton is not installed (pip install triton; it needs Linux)"
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreting()):
        return (f"tensors on {q.device.type}: the Triton kernels run on a CUDA device "
                "(or on the CPU in Triton's interpreter with TRITON_INTERPRET=1, slowly)")
    if bias is not None and not isinstance(bias, Alibi):
        return f"bias {bias!r}: the Triton kernels compute ALiBi only (use impl='tiled' for other biases)"
    if bias is not None and bias.requires_grad() and torch.is_grad_enabled():
        return "the ALiBi slopes require grad: the Triton kernels do not compute their gradient"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype}: the Triton kernels take float16, bfloat16 or float32"
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return ("bfloat16 in Triton's interpreter: its tl.dot misreads bfloat16 operands (seen with triton 3.9: "
                "errors of 1e10); bfloat16 runs on the GPU, float16 and float32 here")
    D, Dv = q.shape[-1], v.shape[-1]
    if D != Dv or D not in HEAD_DIMS:
        return (f"head dims D={D}, Dv={Dv}: the Triton kernels need D == Dv in {HEAD_DIMS}; pad the head dim to "
                "the next of these, or use impl='sdpa' or 'tiled'")
    if q.shape[1] % k.shape[1]:
        return f"Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}"
    if q.shape[0] * q.shape[1] > MAX_BH:
        return (f"B*Hq = {q.shape[0] * q.shape[1]} > {MAX_BH}: the kernels run one grid row per sequence and head, "
                "and CUDA allows 65535; split the batch")
    return None

