"""The numerics contract (DESIGN.md section 5), in one place.

A backend computing in dtype t passes when

    max|out - oracle| <= 2 * max|naive_t - oracle| + floor_t        (3x for gradients)

where the oracle is the reference path in float64 on the CPU and naive_t is the same plain
formula computed in dtype t without upcasting (FlashAttention's rule). NaN never passes.

Inputs may live on any device: the backend runs there (its inputs and the upstream gradient are
made on q's device), while the oracle and naive_t are computed on the CPU from copies, and the
backend's results are moved to the CPU to be compared. The mask and bias given to ``check_backend``
are the oracle's, so their tensors belong on the CPU (the backend's ``run`` holds its own).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.ops.reference import reference_attention

FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def run_reference(q, k, v, mask, bias, scale, dtype: torch.dtype, upcast: bool, grad_out=None):
    """(out, lse, grads) of the reference on the CPU with inputs cast to ``dtype`` (grads None
    without grad_out); inputs on another device are copied to the CPU first."""
    leaves = [t.detach().to("cpu", dtype).requires_grad_(grad_out is not None) for t in (q, k, v)]
    out, lse = reference_attention(*leaves, mask=mask, bias=bias, scale=scale, upcast=upcast)
    grads = None
    if grad_out is not None:
        grads = torch.autograd.grad(out, leaves, grad_out.to("cpu", dtype), allow_unused=True)
    return out, lse, grads


def assert_close_to_oracle(name: str, got: Tensor, oracle: Tensor, naive: Tensor, dtype: torch.dtype,
                           factor: float = 2.0) -> None:
    """The contract for one tensor; error messages name the tensor and every number involved."""
    assert not torch.isnan(got).any(), f"{name}: NaN in the result"
    budget = factor * _err(naive, oracle) + FLOOR[dtype]
    err = _err(got, oracle)
    assert err <= budget, f"{name}: max error {err:.3g} > budget {budget:.3g} ({factor}x naive + floor) in {dtype}"


def upstream_grad(q: Tensor, v: Tensor) -> Tensor:
    """A random upstream gradient dout (B, Hq, Nq, Dv) float64, made on q's device: the backend's
    backward receives it there (one made on the CPU stops a CUDA backend's backward with "expected
    device cuda:0 but got cpu")."""
    return torch.randn(*q.shape[:3], v.shape[-1], dtype=torch.float64, device=q.device)


def check_backend(run, q, k, v, mask, bias, scale, dtype: torch.dtype, grads: bool = True,
                  check_lse: bool = True) -> None:
    """Run ``run(q, k, v) -> (out, lse)`` in ``dtype`` on q's device and hold it to the contract,
    fwd and bwd, against the oracle computed on the CPU (module docstring)."""
    g = upstream_grad(q, v)  # (B, Hq, Nq, Dv) on q's device
    o_out, o_lse, o_grads = run_reference(q, k, v, mask, bias, scale, torch.float64, True, g if grads else None)
    n_out, n_lse, n_grads = run_reference(q, k, v, mask, bias, scale, dtype, False, g if grads else None)
    leaves = [t.detach().to(dtype).requires_grad_(grads) for t in (q, k, v)]  # on q's device
    out, lse = run(*leaves)
    assert out.dtype == dtype and out.shape == o_out.shape, f"out: {out.dtype} {tuple(out.shape)}"
    assert out.device == q.device, f"out on {out.device}, inputs on {q.device}"
    assert_close_to_oracle("out", out.detach().cpu(), o_out, n_out, dtype)
    if check_lse and lse is not None:
        lse = lse.detach().cpu()
        assert torch.equal(torch.isneginf(lse), torch.isneginf(o_lse)), "lse: -inf rows differ from the oracle"
        fin = torch.isfinite(o_lse)
        assert_close_to_oracle("lse", lse[fin], o_lse[fin], n_lse[fin], dtype)
    if grads:
        got = torch.autograd.grad(out, leaves, g.to(dtype))
        for name, a, o, n in zip(("dq", "dk", "dv"), got, o_grads, n_grads):
            assert_close_to_oracle(name, a.cpu(), o, n, dtype, factor=3.0)
