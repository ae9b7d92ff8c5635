"""auto with dropout and softcap: never an N x N path for a long call without saying so."""

import warnings

import pytest
import torch

import attnkit as ak
from attnkit import functional as F_ak

LONG = (1, 4, 2048, 16)  # B*Hq*Nq*Nk = 2^24: the size from which a materializing path counts as long


def _qkv(shape, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.parametrize("mask, want", [(None, "tiled"), (ak.causal(), "tiled"), (ak.sliding_window(64), "banded")])
def test_long_dropout_call_on_the_cpu_avoids_sdpas_math_path(mask, want):
    q, k, v = _qkv(LONG)
    e = ak.explain(q, k, v, mask=mask, dropout_p=0.1)
    assert e.chosen == want
    assert e.runnable["sdpa"]  # it could, but would build the probabilities
    assert "materializes" in e.reasons["sdpa"] or "materialized" in e.reasons["sdpa"]


def test_short_dropout_call_keeps_sdpa():
    q, k, v = _qkv((1, 4, 256, 16))
    assert ak.explain(q, k, v, dropout_p=0.1).chosen == "sdpa"


def test_softcap_goes_to_a_backend_that_computes_it():
    q, k, v = _qkv((1, 2, 300, 16))
    e = ak.explain(q, k, v, mask=ak.causal(), softcap=20.0)
    assert e.chosen in ("tiled", "banded") and "softcap" in e.reasons["sdpa"]


def test_a_long_call_only_a_materializing_path_runs_warns_once():
    """A dense bias that requires grad: tiled refuses it (no bias gradient), so with dropout only
    sdpa's math path or the reference can run it; auto says so, once."""
    q, k, v = _qkv(LONG)
    bias = torch.zeros(1, 1, 2048, 2048, requires_grad=True)
    F_ak._warned.clear()
    with pytest.warns(F_ak.MaterializationWarning, match="probability matrix"):
        out = ak.attention(q, k, v, bias=bias, dropout_p=0.1)
    assert torch.isfinite(out).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ak.attention(q, k, v, bias=bias, dropout_p=0.1)  # the same reasons: not again
