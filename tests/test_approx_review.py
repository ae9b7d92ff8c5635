"""Adversarial review of attnkit.approx (issue 17): inputs a demanding user of performer-pytorch /
linformer / nystrom-attention / fast-transformers would try, each against an independent oracle
(the method's own call on the unpadded input, exact attention, or the layer's own formula)."""

import pytest
import torch

import attnkit as ak
from attnkit.approx import (linear_attention, orthogonal_random_features,
                            performer_attention)

F64 = torch.float64


def qkv(B=2, H=2, Nq=7, Nk=7, D=8, Dv=4, dtype=F64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    ts = (torch.randn(B, H, Nq, D, generator=g, dtype=dtype), torch.randn(B, H, Nk, D, generator=g, dtype=dtype),
          torch.randn(B, H, Nk, Dv, generator=g, dtype=dtype))
    return tuple(t.requires_grad_(requires_grad) for t in ts)


P8 = orthogonal_random_features(16, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
KERNELIZED = {
    "linear": lambda q, k, v, mask: linear_attention(q, k, v, mask=mask),
    "performer": lambda q, k, v, mask: performer_attention(q, k, v, P8, mask=mask),
    "performer-relu": lambda q, k, v, mask: performer_attention(q, k, v, P8, mask=mask, kernel="relu"),
}


# -- rows that see no key: output 0 *and* gradient 0, never NaN (DESIGN.md's contract) ------------------

@pytest.mark.parametrize("method", sorted(KERNELIZED))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_rows_that_see_no_key_have_finite_zero_gradients(method, causal, dtype):
    """Batch row 1 is all padding; batch row 2 is left-padded, so under a causal mask its first queries
    see no key. Before the fix the 1 / tiny gradient of the clamped normalizer overflowed to inf in
    the state and became NaN at the zeroed padded features (also in the *other* batch rows' grads)."""
    N = 300  # enough queries for phi_q^T (g / tiny) to overflow when summed
    q, k, v = qkv(B=3, Nq=N, Nk=N, dtype=dtype, requires_grad=True)
    valid = torch.ones(3, N, dtype=torch.bool)
    valid[1] = False
    valid[2, :5] = False
    mask = ak.key_padding(valid) & ak.causal() if causal else ak.key_padding(valid)
    fn = KERNELIZED[method]
    out = fn(q, k, v, mask)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    (out * g).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))  # the empty row: no gradient at all
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    # oracle: batch row 0 alone (no padding anywhere) gives the same gradients
    q0, k0, v0 = (t.detach()[:1].clone().requires_grad_() for t in (q, k, v))
    (fn(q0, k0, v0, ak.causal() if causal else None) * g[:1]).sum().backward()
    for a, b in ((q, q0), (k, k0), (v, v0)):
        torch.testing.assert_close(a.grad[:1], b.grad)
