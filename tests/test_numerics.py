"""The contract's harness (tests/_numerics.py) itself: where it makes its tensors, and that it bites.

The GPU case table (tests/test_triton.py::test_case_table_on_the_gpu) once never checked the GPU:
check_backend made its upstream gradient on the CPU, so a CUDA backend's backward stopped with
"expected device cuda:0 but got cpu". A CPU machine cannot show that by running on two devices,
so these tests watch where each tensor is made.
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from _numerics import check_backend, upstream_grad


def _inputs(B=1, H=2, N=24, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3)]


class _Watch(torch.autograd.Function):
    """Identity whose backward records the device of the upstream gradient it receives."""

    seen: list = []

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dout):
        _Watch.seen.append(dout.device)
        return dout


def test_the_upstream_gradient_is_made_on_q_device(monkeypatch):
    """Every random tensor check_backend draws names q's device (a bare torch.randn(...) would
    land on the CPU whatever q's device), and the backend's backward receives dout there."""
    q, k, v = _inputs()
    mask = ak.causal() & ak.sliding_window(5)
    made = []
    real_randn = torch.randn

    def spy(*args, **kwargs):
        made.append(kwargs.get("device"))
        return real_randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", spy)
    _Watch.seen = []
    inputs_seen = []

    def run(q_, k_, v_):
        inputs_seen.extend(t.device for t in (q_, k_, v_))
        out, lse = ak.attention(q_, k_, v_, mask=mask, impl="tiled", return_lse=True)
        return _Watch.apply(out), lse

    check_backend(run, q, k, v, mask, None, 16 ** -0.5, torch.float32)
    assert made, "check_backend drew no upstream gradient"
    assert all(d is not None and torch.device(d) == q.device for d in made), \
        f"random tensors made without q's device: {made}"
    assert inputs_seen == [q.device] * 3 and _Watch.seen == [q.device]


def test_upstream_grad_has_the_output_shape_on_q_device():
    q, k, v = _inputs(N=7)
    v = torch.randn(1, 2, 7, 8, dtype=torch.float64)
    g = upstream_grad(q, v)
    assert g.shape == (1, 2, 7, 8) and g.dtype == torch.float64 and g.device == q.device


@pytest.mark.parametrize("what", ["out", "dk"])
def test_the_harness_still_bites_after_moving_results_to_the_cpu(what):
    """A backend off by a little in the output, or with a wrong gradient, fails the contract."""
    q, k, v = _inputs()
    mask = ak.causal()

    def run(q_, k_, v_):
        if what == "dk":
            k_ = k_.detach() + 0.5 * (k_ - k_.detach())  # the same keys, half their gradient
        out, lse = ak.attention(q_, k_, v_, mask=mask, impl="tiled", return_lse=True)
        return (out + 1e-3 if what == "out" else out), lse

    with pytest.raises(AssertionError, match=what):
        check_backend(run, q, k, v, mask, None, 16 ** -0.5, torch.float32)


@pytest.mark.gpu
def test_check_backend_runs_a_backend_on_cuda():
    """On a GPU: inputs on CUDA, oracle on the CPU, fwd and bwd compared there."""
    q, k, v = (t.cuda() for t in _inputs())
    mask = ak.causal()

    def run(q_, k_, v_):
        assert q_.is_cuda
        return ak.attention(q_, k_, v_, mask=mask, impl="tiled", return_lse=True)

    check_backend(run, q, k, v, mask, None, 16 ** -0.5, torch.float32)
