"""Inputs that were refused or mishandled, and what attnkit says about its own choices (issue 13,
items 5-7): scales of any real type, nested tensors, empty sequences, auto's fallback to the
materializing reference, explain's marks, one device rule for masks and biases, lazy subpackages,
attention weights of rows at given positions."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import attnkit as ak
from attnkit import _dispatch, functional
from attnkit._validate import validate

IMPLS = ["auto", "reference", "sdpa", "tiled", "banded", "triton"]


def qkv(B=1, H=2, N=8, Nk=None, D=8):
    return torch.randn(B, H, N, D), torch.randn(B, H, Nk or N, D), torch.randn(B, H, Nk or N, D)


# -- 5: numbers of any type, nested tensors, empty sequences ------------------------------------------

@pytest.mark.parametrize("scale", [np.float32(0.35), np.float64(0.35), np.int64(1), np.array(0.35), torch.tensor(0.35),
                                   1, 0.35],
                         ids=lambda s: type(s).__name__)
def test_scale_of_any_real_type(scale):
    q, k, v = qkv()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=float(scale))
    assert (ak.attention(q, k, v, scale=scale) - want).abs().max() < 1e-6


@pytest.mark.parametrize("scale,message", [
    ("0.3", "scale must be a real number"), (True, "scale must be a real number"),
    (1 + 2j, "scale must be a real number"), (torch.tensor([0.1, 0.2]), "scale must be a real number"),
    (torch.tensor(0.3, requires_grad=True), "scale is a tensor that requires grad"),
    (float("inf"), "scale must be a finite number"), (np.float32("nan"), "scale must be a finite number"),
])
def test_scale_refusals(scale, message):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=message):
        ak.attention(q, k, v, scale=scale)


def test_dropout_p_of_any_real_type():
    q, k, v = qkv()
    torch.manual_seed(0)
    a = ak.attention(q, k, v, dropout_p=np.float32(0.25), impl="reference")
    torch.manual_seed(0)
    b = ak.attention(q, k, v, dropout_p=0.25, impl="reference")
    assert torch.equal(a, b)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_nested_tensors_are_refused_with_what_to_do(which):
    seqs = [torch.randn(2, n, 8) for n in (3, 5)]  # (H, N_i, D) each
    nested = torch.nested.nested_tensor(seqs, layout=torch.jagged)
    q, k, v = qkv(B=2)
    args = {"q": q, "k": k, "v": v, which: nested}
    for impl in ("auto", "reference", "tiled"):
        with pytest.raises(TypeError, match=rf"{which} is a nested \(jagged\) tensor.*ak.key_padding.*ak.document"):
            ak.attention(args["q"], args["k"], args["v"], impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("Nq,Nk", [(0, 5), (5, 0), (0, 0)])
@pytest.mark.parametrize("mask", [None, ak.causal(), ak.sliding_window(2)], ids=["none", "causal", "window"])
def test_empty_sequences_give_torchs_answer(Nq, Nk, mask, impl):
    """Nq = 0: an empty output; Nk = 0: every query sees no key, out = 0 and lse = -inf (torch's SDPA
    gives the same), with zero gradients of the right shapes."""
    q = torch.randn(2, 4, Nq, 16, requires_grad=True)
    k, v = torch.randn(2, 2, Nk, 16, requires_grad=True), torch.randn(2, 2, Nk, 16, requires_grad=True)
    why = None if impl == "auto" else _dispatch.BACKENDS[impl].why_not(validate(q, k, v, mask=mask, need_lse=True))
    if why:  # an explicit impl refuses what it could not run at any length
        with pytest.raises(ValueError, match="cannot run this call"):
            ak.attention(q, k, v, mask=mask, impl=impl, return_lse=True)
        return
    out, lse = ak.attention(q, k, v, mask=mask, impl=impl, return_lse=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert out.shape == want.shape == (2, 4, Nq, 16) and lse.shape == (2, 4, Nq)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    if Nq:
        assert torch.equal(want, torch.zeros_like(want))  # torch agrees: a query with no key gives 0
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t))


def test_empty_sequences_still_check_impl_and_weights():
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 0, 4), torch.randn(1, 1, 0, 4)
    with pytest.raises(ValueError, match="impl='fast' is not a backend"):
        ak.attention(q, k, v, impl="fast")
    assert ak.attention_weights(q, k).shape == (1, 1, 3, 0)
    assert ak.attention(q[:, :, :0], k, v, mask=ak.document(torch.zeros(0, dtype=torch.long))).shape == (1, 1, 0, 4)


@pytest.mark.parametrize("impl,kwargs,reason", [
    ("banded", {}, "banded needs a sliding window"),
    ("tiled", dict(bias=torch.zeros(3, 0, requires_grad=True)), "tiled does not compute the bias gradient"),
    ("triton", dict(bias=torch.zeros(3, 0)), "impl='triton' cannot run this call"),
])
def test_an_explicit_impl_refuses_an_empty_call_it_could_not_run(impl, kwargs, reason):
    """An explicit impl never falls back, not even to the empty closed form."""
    q, k, v = torch.randn(1, 1, 3, 16), torch.randn(1, 1, 0, 16), torch.randn(1, 1, 0, 16)
    with pytest.raises(ValueError, match=reason):
        ak.attention(q, k, v, impl=impl, **kwargs)


# -- 6: auto's fallback says so; explain tells "skipped" from "cannot" --------------------------------

def _dropout_call(N=2048, **kw):
    q, k, v = qkv(H=4, N=N, D=16)
    return dict(q=q, k=k, v=v, mask=ak.document(torch.arange(N) // 500), dropout_p=0.1, **kw)


def _materialization_warnings(calls) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for call in calls:
            ak.attention(**call)
    return [w for w in caught if issubclass(w.category, ak.MaterializationWarning)]


def _grad_bias(N=2048) -> torch.Tensor:
    """A dense bias that requires grad: tiled refuses it (no bias gradient), banded takes no bias."""
    return torch.zeros(1, 1, N, N, requires_grad=True)


def test_dropout_with_a_structured_mask_takes_tiled_and_does_not_warn(monkeypatch):
    """tiled draws the dropout mask per tile (ops/dropout.py): auto takes it, nothing materialized."""
    monkeypatch.setattr(functional, "_warned", set())
    assert ak.explain(**_dropout_call()).chosen == "tiled"
    assert _materialization_warnings([_dropout_call(), _dropout_call(N=2300)]) == []


def test_dropout_that_only_sdpa_can_run_warns_once(monkeypatch):
    """With a bias that requires grad only torch SDPA (its math path, for dropout on the CPU) or
    the reference can run a dropout call: auto takes SDPA and says so once."""
    monkeypatch.setattr(functional, "_warned", set())
    calls = [_dropout_call(bias=_grad_bias()), _dropout_call(bias=_grad_bias())]
    assert ak.explain(**calls[0]).chosen == "sdpa"
    caught = _materialization_warnings(calls)
    assert len(caught) == 1, [str(w.message) for w in caught]
    msg = str(caught[0].message)
    assert "runs this call on 'sdpa', which materializes a (B, Hq, Nq, Nk) = (1, 4, 2048, 2048) bool mask" in msg
    assert "tiled: bias requires grad" in msg
    assert caught[0].filename == __file__  # points at the caller, not into attnkit


def test_the_reference_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(functional, "_warned", set())
    call = _dropout_call(return_lse=True, bias=_grad_bias())  # sdpa's lse kernel takes no dropout, tiled no bias grad
    assert ak.explain(**{k: v for k, v in call.items()}).chosen == "reference"
    caught = _materialization_warnings([call, call])
    assert len(caught) == 1 and "on 'reference', which materializes" in str(caught[0].message)


def test_the_warning_points_at_user_code_through_modules(monkeypatch):
    from attnkit import nn as aknn
    monkeypatch.setattr(functional, "_warned", set())
    mha = aknn.MultiHeadAttention(64, 4, dropout=0.1).train()
    x = torch.randn(1, 2048, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mha(x, mask=ak.document(torch.arange(2048) // 500), bias=_grad_bias())
    mine = [w for w in caught if issubclass(w.category, ak.MaterializationWarning)]
    assert len(mine) == 1 and mine[0].filename == __file__, [(w.filename, w.lineno) for w in mine]


def test_small_or_fast_calls_do_not_warn(monkeypatch):
    monkeypatch.setattr(functional, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ak.MaterializationWarning)
        q, k, v = qkv(N=64)
        ak.attention(q, k, v, mask=ak.document(torch.arange(64) // 20), dropout_p=0.1)  # small: fine
        q, k, v = qkv(H=4, N=2048, D=16)
        ak.attention(q, k, v, mask=ak.document(torch.arange(2048) // 500))  # no dropout: tiled


def test_explain_marks_backends_auto_skips_apart_from_those_that_cannot_run():
    q, k, v = qkv(H=4, N=2048, D=16)
    e = ak.explain(q, k, v, mask=ak.document(torch.arange(2048) // 500))
    lines = {line.split()[0]: line.split()[1] for line in str(e).splitlines()[2:] if not line.startswith("      ")}
    assert e.chosen == "tiled" and lines["tiled"] == "yes"
    assert lines["sdpa"] == "skip" and e.runnable["sdpa"]  # impl='sdpa' runs it: auto only passes over it
    ak.attention(q, k, v, mask=ak.document(torch.arange(2048) // 500), impl="sdpa")
    assert lines["banded"] == "no" and not e.runnable["banded"]
    assert "auto passes over it" in str(e) and "(impl='sdpa' runs it)" in str(e)


def test_info_lists_each_backend_once():
    out = subprocess.run([sys.executable, "-m", "attnkit.cli.main", "info"], capture_output=True, text=True,
                         check=True).stdout
    listing = out.split("backends:")[1].split("==")[0]
    names = [line.split()[0] for line in listing.strip().splitlines()]
    assert sorted(names) == sorted(ak.backends()) and "not built yet" not in out


# -- 7: one device rule, lazy subpackages, weights of rows at given positions ---------------------------

@pytest.mark.parametrize("kwargs", [
    dict(mask=torch.ones(8, 8, dtype=torch.bool, device="meta")),
    dict(mask=ak.causal() & ak.dense_mask(torch.ones(8, 8, dtype=torch.bool, device="meta"))),
    dict(mask=~ak.dense_mask(torch.zeros(8, 8, dtype=torch.bool, device="meta"))),
    dict(bias=torch.zeros(8, 8, device="meta")),
    dict(bias=ak.SumBias((ak.alibi(2), ak.DenseBias(torch.zeros(8, 8, device="meta"))))),
], ids=["mask", "mask-in-and", "mask-in-not", "bias", "bias-in-sum"])
def test_one_device_rule_for_dense_masks_and_biases(kwargs):
    q, k, v = qkv()
    what = "mask" if "mask" in kwargs else "bias"
    with pytest.raises(ValueError, match=rf"{what} tensor is on meta but q is on cpu; move it once with {what}.to"):
        ak.attention(q, k, v, **kwargs)


def test_attention_weights_of_rows_follows_the_device_rule():
    q, k, _ = qkv(N=12)
    with pytest.raises(ValueError, match="mask tensor is on meta but q is on cpu"):
        ak.attention_weights(q[:, :, :2], k, mask=torch.ones(12, 12, dtype=torch.bool, device="meta"), rows=[0, 1])


def test_subpackages_load_lazily_as_attributes():
    code = ("import sys, attnkit; heavy = [m for m in ('matplotlib', 'transformers', 'tokenizers', 'triton') "
            "if m in sys.modules]; assert not heavy, heavy; "
            "assert callable(attnkit.pretrained.load_bert) and attnkit.nn.MultiHeadAttention and attnkit.viz; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    with pytest.raises(AttributeError, match="module 'attnkit' has no attribute 'pretrianed'"):
        ak.pretrianed


@pytest.mark.parametrize("rows", [range(4), [0, 3, 9], [11, 2], range(8, 12)], ids=str)
@pytest.mark.parametrize("mask", [ak.causal(), ak.sliding_window(2) | ak.global_tokens([5]),
                                  torch.rand(2, 1, 12, 12) > 0.4], ids=["causal", "window-global", "dense"])
def test_attention_weights_of_rows_at_given_positions(rows, mask):
    q, k, _ = qkv(B=2, N=12)
    bias = torch.randn(2, 2, 12, 12)
    full = ak.attention_weights(q, k, mask=mask, bias=bias)  # (B, H, 12, 12)
    idx = list(rows)
    got = ak.attention_weights(q[:, :, idx], k, mask=mask, bias=bias, rows=rows)
    assert (got - full[:, :, idx]).abs().max() < 1e-6


def test_attention_weights_default_rows_are_the_last_ones():
    """The README's example: without rows=, q's 4 rows are the last 4 positions (a KV cache's view)."""
    q, k, _ = qkv(N=12)
    full = ak.attention_weights(q, k, mask=ak.causal())
    assert (ak.attention_weights(q[:, :, -4:], k, mask=ak.causal()) - full[:, :, -4:]).abs().max() < 1e-6
    first = ak.attention_weights(q[:, :, :4], k, mask=ak.causal(), rows=range(4))
    assert (first - full[:, :, :4]).abs().max() < 1e-6 and (first[0, 0, 0, 1:] == 0).all()


@pytest.mark.parametrize("rows,num_queries,message", [
    ([0.5, 1.7, 2.0], None, "rows must be integer positions"),
    ([True, False, True], None, "rows must be integer positions"),
    ([0, 1], None, "rows has 2 positions but q holds Nq=3 rows"),
    ([0, 1, 12], None, r"rows must lie in \[0, num_queries=12\)"),
    ([0, 1, 2], 0, "num_queries must be an int >= 1"),
])
def test_attention_weights_rows_errors(rows, num_queries, message):
    q, k, _ = qkv(N=12)
    with pytest.raises(ValueError, match=message):
        ak.attention_weights(q[:, :, :3], k, rows=rows, num_queries=num_queries)
