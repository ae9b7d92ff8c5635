"""Structured masks at N=65536 through impl="auto" on the CPU: nothing N x N is ever allocated.

Every tensor any aten op produces is recorded by a TorchDispatchMode; the largest must stay far
below N*N elements (it is O(N * block) by construction).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit as ak

N = 65536


class LargestAllocation(TorchDispatchMode):
    """Remembers the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


MASKS = {
    "sliding_window": lambda: ak.sliding_window(64),
    "document": lambda: ak.document(torch.arange(N) // 5000),
    "causal&window": lambda: ak.causal() & ak.sliding_window(128),
    "longformer": lambda: (ak.sliding_window(64) | ak.global_tokens([0, 777, 40000])) & ak.key_padding([N - 999]),
}
EXPECTED = {"sliding_window": "banded", "document": "tiled", "causal&window": "banded", "longformer": "banded"}


@pytest.mark.parametrize("name", list(MASKS))
def test_auto_runs_65536_without_n_by_n(name):
    q, k, v = (torch.randn(1, 1, N, 16) for _ in range(3))
    mask = MASKS[name]()
    assert ak.explain(q, k, v, mask=mask).chosen == EXPECTED[name]
    with LargestAllocation() as probe, torch.no_grad():
        out = ak.attention(q, k, v, mask=mask)
    assert probe.largest < N * N // 64, f"largest tensor {probe.largest} elements"
    # spot-check rows against the reference, given those rows of the mask's dense truth
    rows = torch.tensor([0, 1, 4999, 5000, 40000, N - 1])
    truth = mask.evaluate(rows, torch.arange(N), N, N)  # (1, 1, 6, N)
    ref = ak.attention(q[:, :, rows], k, v, mask=truth, impl="reference")
    assert (out[:, :, rows] - ref).abs().max() < 1e-5


def test_backward_65536_window_without_n_by_n():
    q, k, v = (torch.randn(1, 1, N, 16, requires_grad=True) for _ in range(3))
    with LargestAllocation() as probe:
        out = ak.attention(q, k, v, mask=ak.causal() & ak.sliding_window(32))
        out.square().sum().backward()
    assert probe.largest < N * N // 64
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_banded_backward_65536_longformer_is_linear_in_memory():
    """Forward and backward of the Longformer pattern allocate O(N * W), never N x N: the largest
    tensor is a piece of block windows, about N * (2W + block) * D / block elements."""
    q, k, v = (torch.randn(1, 2, N, 16, requires_grad=True) for _ in range(3))
    mask = (ak.sliding_window(32) | ak.global_tokens([3, 30000, N - 1])) & ak.key_padding([N - 100])
    with LargestAllocation() as probe:
        out = ak.attention(q, k, v, mask=mask, impl="banded")
        (out * torch.randn_like(out)).sum().backward()
    assert probe.largest < 256 * N, f"largest tensor {probe.largest} elements"
    rows = torch.tensor([0, 3, 5000, 30000, N - 150, N - 1])
    truth = mask.evaluate(rows, torch.arange(N), N, N)  # (1, 1, 6, N)
    ref = ak.attention(q[:, :, rows].detach(), k.detach(), v.detach(), mask=truth, impl="reference")
    assert (out[:, :, rows].detach() - ref).abs().max() < 1e-5
    assert torch.isfinite(k.grad).all() and k.grad[0, :, 3].abs().sum() > 0  # a global key gets gradient
