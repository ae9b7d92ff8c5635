"""Inputs in every memory layout a user can hand over give the same answer, forward and backward.

Issue 13 (1): torch's private CPU flash kernels read a row of D values as adjacent memory, so a
sliced, transposed or expanded last dimension gave garbage through tiled, banded, sdpa with the
lse and auto. The table: layouts x every backend (and its kernel variants) x masks; each output
and each gradient (with respect to the tensor the view was taken from) is held to the numerics
contract against the float64 reference on the same values made contiguous.
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit import _dispatch
from attnkit._validate import validate
from attnkit.ops.banded import banded_attention
from attnkit.ops.tiled import tiled_attention

from _numerics import assert_close_to_oracle, run_reference

B, H, N, D = 1, 2, 32, 16


def _sliced(x):  # stride(-1) == 2: every other element of a wider buffer
    return torch.stack([x, torch.zeros_like(x)], -1).flatten(-2)[..., ::2]


LAYOUTS = {
    "contiguous": lambda x: x,
    "sliced-last-dim": _sliced,
    "transposed-(B,H,D,N)": lambda x: x.transpose(-1, -2).contiguous().transpose(-1, -2),  # stride(-1) = N
    "expanded-last-dim": lambda x: x[..., :1].expand(x.shape),  # stride(-1) = 0
    "expanded-rows": lambda x: x[:, :, :1].expand(x.shape),  # stride(-2) = 0
    "expanded-heads": lambda x: x[:, :1].expand(x.shape),  # stride(1) = 0
    "heads-strided-(B,N,H,D)": lambda x: x.transpose(1, 2).contiguous().transpose(1, 2),
    "d-major-(B,D,H,N)": lambda x: x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),  # stride(-1) = H*N
}

MASKS = {
    "none": None,
    "window": ak.sliding_window(4),
    "window-global": ak.sliding_window(3) | ak.global_tokens([0, 20]),
}


def _public(impl, lse):
    def run(q, k, v, mask):
        if lse:
            return ak.attention(q, k, v, mask=mask, impl=impl, return_lse=True)[0]
        return ak.attention(q, k, v, mask=mask, impl=impl)
    return run


RUNNERS = {
    "reference": _public("reference", False),
    "sdpa": _public("sdpa", False),
    "sdpa-lse": _public("sdpa", True),  # torch's private CPU kernel (no autograd)
    "tiled": _public("tiled", True),
    "tiled-math": lambda q, k, v, mask: tiled_attention(q, k, v, mask=mask, bias=None, scale=D ** -0.5,
                                                        block_q=16, block_k=16, kernel="math")[0],
    "tiled-fused-small": lambda q, k, v, mask: tiled_attention(q, k, v, mask=mask, bias=None, scale=D ** -0.5,
                                                               block_q=16, block_k=8, kernel="fused")[0],
    "banded": _public("banded", True),
    "banded-math": lambda q, k, v, mask: banded_attention(q, k, v, mask=mask, scale=D ** -0.5, kernel="math")[0],
    "auto": _public("auto", False),
    "auto-lse": _public("auto", True),
    "triton": _public("triton", True),  # on the CPU: Triton's interpreter
}
NO_GRAD = {"sdpa-lse", "auto-lse"}  # torch's lse kernel has no autograd (auto-lse then is tiled: graded below)


def _why_not(runner: str, q, k, v, mask) -> str | None:
    backend = next((b for b in ("sdpa", "banded", "triton") if runner.startswith(b)), None)
    if backend is None:
        return None
    call = validate(q, k, v, mask=mask, need_lse=runner == "sdpa-lse")
    return _dispatch.BACKENDS[backend].why_not(call)


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_every_backend(layout, runner, mask_name):
    if runner == "triton" and mask_name == "none":
        pytest.skip("the interpreter is slow: triton runs the window and window-global masks")
    mask = MASKS[mask_name]
    g = torch.Generator().manual_seed(len(layout) * 31 + len(runner))
    base = [torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3)]
    view = LAYOUTS[layout]
    leaves = [t.float().requires_grad_(runner not in NO_GRAD) for t in base]
    q, k, v = (view(t) for t in leaves)
    why = _why_not(runner, q, k, v, mask)
    if why:
        pytest.skip(why)
    grads = runner not in NO_GRAD
    dout = torch.randn(B, H, N, D, generator=g, dtype=torch.float64) if grads else None
    # the oracle and the naive fp32 formula see the same values, laid out contiguously
    same = [view(t).contiguous() for t in base]
    o_out, _, o_grads = run_reference(*same, mask, None, D ** -0.5, torch.float64, True, dout)
    n_out, _, n_grads = run_reference(*same, mask, None, D ** -0.5, torch.float32, False, dout)
    out = RUNNERS[runner](q, k, v, mask)
    assert_close_to_oracle(f"{layout} {runner} out", out, o_out, n_out, torch.float32)
    if grads:  # with respect to the strided views the backend was given
        got = torch.autograd.grad(out, (q, k, v), dout.float())
        for name, a, o, n in zip(("dq", "dk", "dv"), got, o_grads, n_grads):
            assert_close_to_oracle(f"{layout} {runner} {name}", a, o, n, torch.float32, factor=3.0)


@pytest.mark.parametrize("impl", ["sdpa", "tiled", "banded"])
def test_a_gradient_with_a_strided_last_dim_flows_back_right(impl):
    """dout itself may arrive with stride(-1) != 1 (here: a transposed view's gradient)."""
    q, k, v = (torch.randn(1, 2, 24, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = ak.sliding_window(3)
    g = torch.randn(1, 2, 8, 24, dtype=torch.float64)
    grads = []
    for name in (impl, "reference"):
        out = ak.attention(q.float(), k.float(), v.float(), mask=mask, impl=name)
        loss = (out.transpose(-1, -2) * g.float()).sum()  # dout = g^T: stride(-1) = 24
        grads.append(torch.autograd.grad(loss, (q, k, v)))
    for a, b in zip(*grads):
        assert (a - b).abs().max().item() < 1e-4
