"""Rows that break log-sum-exp arithmetic, and biases wider than the inputs (issue 13, items 2-4, 10a).

Every other test compares against the reference, so first the reference itself is checked against
an independent formula (torch.softmax in float64). Then every backend, forward and backward, on:

- huge rows: a dense bias whose every key in a row holds finfo.min (transformers' padding of a
  sample with no real token) or +-2^31; softmax is the same for any constant added to a row, so
  such a row must give softmax(q k^T * scale + (bias - its row max)), which float64 holds exactly;
- large scores: q and k scaled so that the logits reach about +-50 and +-2000;
- biases in float32 with float16 / bfloat16 inputs: values past float16's 65504, finfo.min padding;
- low-precision gradients held to FlashAttention's own bound (3x the naive error, no floor).
"""

from __future__ import annotations

import pytest
import torch

import attnkit as ak
from attnkit import _dispatch
from attnkit._validate import validate
from attnkit.ops.banded import banded_attention
from attnkit.ops.reference import reference_attention
from attnkit.ops.tiled import tiled_attention

from _numerics import FLOOR, _err, assert_close_to_oracle, run_reference

F32_MIN = torch.finfo(torch.float32).min
B, H, N, D = 2, 2, 40, 16


def _qkv(seed, dtype=torch.float64, logit_std=1.0, n=N, d=D):
    """q, k scaled so that the logits q.k / sqrt(D) have about ``logit_std`` standard deviation."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    return q * logit_std ** 0.5, k * logit_std ** 0.5, v


def _padding_bias(value: float, n=N) -> torch.Tensor:
    """(B, 1, 1, Nk): sample 0 has 9 real keys and `value` on the rest; sample 1 has `value` on every key."""
    bias = torch.zeros(B, 1, 1, n, dtype=torch.float64)
    bias[0, ..., 9:] = value
    bias[1] = value
    return bias


def _row_shifted(bias: torch.Tensor) -> torch.Tensor:
    """The same softmax with each row's max moved to 0 (rows that are all -inf left alone)."""
    m = bias.amax(-1, keepdim=True)
    return bias - torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _shift(bias: torch.Tensor | None):
    """(B, 1, 1) or 0: the constant each row of ``bias`` was moved by in ``_row_shifted``."""
    return 0 if bias is None else (bias - _row_shifted(bias))[..., 0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, 1) over the finite entries of b (a must be finite there too)."""
    fin = torch.isfinite(b)
    assert torch.isfinite(a[fin]).all()
    return ((a.double() - b)[fin].abs() / b.abs().clamp(min=1)[fin]).max().item() if fin.any() else 0.0


# -- the oracle against torch.softmax in float64 ----------------------------------------------------

ORACLE_ROWS = {
    "finfo.min on every key": (_padding_bias(F32_MIN), 1.0),
    "-2^31 on every key": (_padding_bias(-2.0 ** 31), 1.0),
    "-1e4 on every key (old BERT padding)": (_padding_bias(-1e4), 1.0),
    "+2^31 on a few keys": (-_padding_bias(-2.0 ** 31), 1.0),
    "logits ~ +-50": (None, 15.0),
    "logits ~ +-2000": (None, 600.0),
}


@pytest.mark.parametrize("name", list(ORACLE_ROWS))
def test_the_oracle_against_torch_softmax(name):
    bias, logit_std = ORACLE_ROWS[name]
    q, k, v = _qkv(1, logit_std=logit_std)
    s = q @ k.transpose(-1, -2) * D ** -0.5  # (B, H, N, N) float64
    # finfo.min + s rounds s away even in float64: for that row the identity softmax(s + c) = softmax(s)
    # is what holds exactly; for +-2^31 float64 keeps s to ~5e-7, and the plain formula is the truth.
    full = s if bias is None else s + (_row_shifted(bias) if bias.abs().max() > 2.0 ** 60 else bias)
    want_p = torch.softmax(full, -1)
    want_out, want_lse = want_p @ v, torch.logsumexp(full, -1)
    got_p = ak.attention_weights(q, k, bias=bias)
    call = validate(q, k, v, bias=bias)  # every backend gets the bias as validate leaves it (row-shifted)
    out, lse = reference_attention(q, k, v, mask=None, bias=call.bias, scale=D ** -0.5)
    if call.lse_shift is not None:
        lse = lse + call.lse_shift
    assert torch.allclose(got_p.sum(-1), torch.ones(B, H, N, dtype=torch.float64), atol=1e-12), "rows sum to 1"
    assert _err(got_p, want_p) < 1e-6
    assert _err(out, want_out) < 1e-6
    if bias is None or bias.abs().max() < 2.0 ** 60:
        assert _err(lse, want_lse) < 1e-6
    pub, pub_lse = ak.attention(q, k, v, bias=bias, impl="reference", return_lse=True)
    assert _err(pub, want_out) < 1e-6
    want_pub_lse = torch.logsumexp(s + (0 if bias is None else _row_shifted(bias)), -1) + _shift(bias)
    assert _rel(pub_lse, want_pub_lse) < 1e-12


def test_viz_weights_normalize_huge_rows():
    from attnkit.viz.capture import AttentionRecord
    q, k, _ = _qkv(2)
    bias = _padding_bias(F32_MIN)
    rec = AttentionRecord("layer", q.float(), k.float(), None, bias.float(), None)
    w = rec.weights(rows=[0, 5, 39])
    assert torch.allclose(w.sum(-1).double(), torch.ones_like(w.sum(-1).double()), atol=1e-5)


# -- every backend on hard rows, fwd and bwd ----------------------------------------------------------

def _public(impl, lse):
    def run(q, k, v, mask, bias):
        out = ak.attention(q, k, v, mask=mask, bias=bias, impl=impl, return_lse=lse)
        return out if lse else (out, None)
    return run


def _direct(backend, q, k, v, mask, bias, **options):
    """A backend function called as the public path calls it: on the validated call, with the lse
    shift of a row-shifted bias added back."""
    c = validate(q, k, v, mask=mask, bias=bias)
    extra = {} if backend is banded_attention else {"bias": c.bias}  # banded takes no bias
    out, lse = backend(q, k, v, mask=c.mask, scale=c.scale, **extra, **options)
    return out, lse if c.lse_shift is None else lse + c.lse_shift


RUNNERS = {
    "reference": _public("reference", True),
    "sdpa": _public("sdpa", False),
    "sdpa-lse": _public("sdpa", True),
    "tiled": _public("tiled", True),
    "tiled-math": lambda q, k, v, mask, bias: _direct(tiled_attention, q, k, v, mask, bias, block_q=16, block_k=8,
                                                      kernel="math"),
    "banded": _public("banded", True),
    "banded-math": lambda q, k, v, mask, bias: _direct(banded_attention, q, k, v, mask, bias, kernel="math"),
    "triton": _public("triton", True),
    "auto": _public("auto", True),
}
NO_GRAD = {"sdpa-lse"}

HARD = {  # name: (bias, mask, logit standard deviation)
    "finfo.min padding bias": (_padding_bias(F32_MIN), None, 1.0),
    "-2^31 padding bias + window": (_padding_bias(-2.0 ** 31), ak.sliding_window(6), 1.0),
    "-1e4 padding bias + causal": (_padding_bias(-1e4), ak.causal(), 1.0),
    "+2^31 bias on a few keys": (-_padding_bias(-2.0 ** 31), ak.causal(), 1.0),
    "logits +-50, window | global": (None, ak.sliding_window(5) | ak.global_tokens([0, 33]), 15.0),
    "logits +-50, causal": (None, ak.causal(), 15.0),
    "logits +-400, window | global & padding": (
        None, (ak.sliding_window(4) | ak.global_tokens([2, 30])) & ak.key_padding([N, 11]), 120.0),
}


def _why_not(runner, q, k, v, mask, bias):
    backend = next((b for b in ("sdpa", "banded", "triton") if runner.startswith(b)), None)
    if backend is None:
        return None
    call = validate(q, k, v, mask=mask, bias=bias, need_lse=runner == "sdpa-lse")
    return _dispatch.BACKENDS[backend].why_not(call)


@pytest.mark.parametrize("runner", list(RUNNERS))
@pytest.mark.parametrize("name", list(HARD))
def test_every_backend_on_hard_rows(name, runner):
    bias, mask, logit_std = HARD[name]
    q, k, v = _qkv(3, logit_std=logit_std)
    b32 = None if bias is None else bias.float()
    leaves = [t.float().requires_grad_(runner not in NO_GRAD) for t in (q, k, v)]
    why = _why_not(runner, *leaves, mask, b32)
    if why:
        pytest.skip(why)
    # the oracle sees the row-shifted bias: the same softmax, held exactly in float64
    oracle_bias = None if bias is None else ak.DenseBias(_row_shifted(bias))
    dout = torch.randn(B, H, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = runner not in NO_GRAD
    o_out, o_lse, o_g = run_reference(q, k, v, mask, oracle_bias, D ** -0.5, torch.float64, True, dout if grads else None)
    n_out, _, n_g = run_reference(q, k, v, mask, oracle_bias, D ** -0.5, torch.float32, False, dout if grads else None)
    out, lse = RUNNERS[runner](*leaves, mask, b32)
    assert_close_to_oracle(f"{name} {runner} out", out, o_out, n_out, torch.float32)
    if lse is not None:
        want = (o_lse + _shift(bias)).expand_as(lse)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want)), "-inf rows"
        assert _rel(lse, want) < 1e-5, f"lse off by {_rel(lse, want):.3g} (relative)"
    if grads:
        got = torch.autograd.grad(out, leaves, dout.float())
        for g_name, a, o, n in zip(("dq", "dk", "dv"), got, o_g, n_g):
            assert_close_to_oracle(f"{name} {runner} {g_name}", a, o, n, torch.float32,
                                   factor=3.0 if logit_std <= 1 else LARGE_LOGIT_GRAD_FACTOR)


# FlashAttention's backward recomputes P = exp(s - lse) (the Triton kernels as exp2(s*log2e - lse*log2e),
# with scale*log2e rounded once for every logit): at |s| ~ 50-400 both s and lse carry float32 rounding
# of about |s| * 2^-24, which the plain formula pays once. Measured 2026-11-30 (CPU, fp32): tiled's math
# kernel up to 4.2x the naive error, Triton (interpreter) up to 7.4x at +-400. A broken stabilizer gives
# inf or NaN here, far beyond any such factor.
LARGE_LOGIT_GRAD_FACTOR = 10.0


def test_the_backends_agree_on_a_fully_padded_sample():
    """Issue 13 (3): three backends gave three answers on a sample whose every key is finfo.min."""
    q, k, v = (t.float() for t in _qkv(5))
    bias = _padding_bias(F32_MIN).float()
    outs = {impl: ak.attention(q, k, v, bias=bias, impl=impl) for impl in ("reference", "sdpa", "tiled", "auto")}
    for impl, out in outs.items():
        assert torch.isfinite(out).all(), impl
        assert _err(out, outs["reference"]) < 1e-5, impl


# -- a float32 bias with half inputs -------------------------------------------------------------------

def _beyond_fp16(n=N) -> torch.Tensor:
    bias = torch.randn(B, 1, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    bias[..., 3] = 7.0e4  # finite in float32, inf in float16
    bias[1, :, 5, :] = 7.0e4 + torch.arange(n)  # a row entirely past float16's range
    return bias


HALF_BIASES = {
    "7e4 (past fp16)": _beyond_fp16(),
    "finfo(f32).min padding": _padding_bias(F32_MIN),
    "random": torch.randn(B, H, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(8)),
}


@pytest.mark.parametrize("runner", ["reference", "sdpa", "sdpa-lse", "tiled", "tiled-math", "auto"])
@pytest.mark.parametrize("bias_name", list(HALF_BIASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_float32_bias_keeps_its_precision_with_half_inputs(dtype, bias_name, runner):
    bias = HALF_BIASES[bias_name]
    q, k, v = _qkv(7)
    leaves = [t.to(dtype).requires_grad_(runner not in NO_GRAD) for t in (q, k, v)]
    b32 = bias.float()
    why = _why_not(runner, *leaves, None, b32)
    if runner == "sdpa":  # torch's SDPA would take the bias in q's dtype: refused, auto goes elsewhere
        assert why is not None and "keeps the bias's precision" in why
        assert ak.explain(*leaves, bias=b32).chosen != "sdpa"
        return
    if why:
        pytest.skip(why)
    oracle_bias = ak.DenseBias(_row_shifted(bias))  # float64: the formula, exactly
    dout = torch.randn(B, H, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    grads = runner not in NO_GRAD
    o_out, _, o_g = run_reference(q, k, v, None, oracle_bias, D ** -0.5, torch.float64, True, dout if grads else None)
    # naive: the plain formula in the half dtype, on the shifted bias (the raw one overflows float16 to NaN)
    n_out, _, n_g = run_reference(q, k, v, None, oracle_bias, D ** -0.5, dtype, False, dout if grads else None)
    out, _ = RUNNERS[runner](*leaves, None, b32)
    assert out.dtype == dtype
    assert_close_to_oracle(f"{bias_name} {runner} out", out, o_out, n_out, dtype)
    if grads:
        got = torch.autograd.grad(out, leaves, dout.to(dtype))
        for g_name, a, o, n in zip(("dq", "dk", "dv"), got, o_g, n_g):
            assert_close_to_oracle(f"{bias_name} {runner} {g_name}", a, o, n, dtype, factor=3.0)


def test_a_bias_in_q_dtype_still_goes_to_sdpa():
    q, k, v = (t.half() for t in _qkv(10))
    assert ak.explain(q, k, v, bias=torch.randn(N, N).half()).chosen == "sdpa"


# -- low-precision gradients: FlashAttention's bound --------------------------------------------------

FA_CASES = [  # (Nq, Nk, mask, dtype): from FlashAttention's test sizes; the first is the one reported
    pytest.param(1024, 1023, ak.causal() & ak.sliding_window(824, 0), torch.bfloat16, marks=pytest.mark.slow),
    (513, 511, ak.causal() & ak.sliding_window(300, 0), torch.bfloat16),
    (300, 257, ak.causal(), torch.float16),
    (257, 300, ak.sliding_window(40) | ak.global_tokens([0, 200]), torch.bfloat16),
    (113, 203, None, torch.float16),
]


@pytest.mark.parametrize("impl", ["tiled", "banded"])
@pytest.mark.parametrize("Nq,Nk,mask,dtype", FA_CASES)
def test_half_gradients_within_flash_attentions_bound(Nq, Nk, mask, dtype, impl):
    """max|grad - oracle| <= 3 x max|naive_half - oracle|, no floor (FlashAttention's test): tiled
    once rounded every block's partial dk/dv to the half type before summing them."""
    g = torch.Generator().manual_seed(Nq + Nk)
    q = torch.randn(1, 2, Nq, 64, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, Nk, 64, generator=g, dtype=torch.float64) for _ in range(2))
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    call = validate(*leaves, mask=mask)
    why = _dispatch.BACKENDS[impl].why_not(call)
    if why:
        pytest.skip(why)
    dout = torch.randn(1, 2, Nq, 64, generator=g, dtype=torch.float64)
    o_out, _, o_g = run_reference(q, k, v, mask, None, 0.125, torch.float64, True, dout)
    n_out, _, n_g = run_reference(q, k, v, mask, None, 0.125, dtype, False, dout)
    out = ak.attention(*leaves, mask=mask, impl=impl)
    got = torch.autograd.grad(out, leaves, dout.to(dtype))
    assert _err(out, o_out) <= 2 * _err(n_out, o_out), "out"
    for name, a, o, n in zip(("dq", "dk", "dv"), got, o_g, n_g):
        assert _err(a, o) <= 3 * _err(n, o), f"{name}: {_err(a, o):.3g} > 3 x {_err(n, o):.3g}"


HALF_EPS = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


@pytest.mark.parametrize("impl", ["tiled", "banded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mask", [ak.causal() & ak.sliding_window(200, 0), ak.sliding_window(40) | ak.global_tokens([3])],
                         ids=["causal-window", "window-global"])
def test_half_gradients_are_the_float32_gradients_rounded_once(mask, dtype, impl):
    """The same call on the same (half-rounded) values in float32, rounded to the half type at the
    end, is what a half-precision backward must return: partials summed in float32, one rounding."""
    g = torch.Generator().manual_seed(11)
    q, k, v, dout = (torch.randn(1, 2, 2049, 64, generator=g).to(dtype) for _ in range(4))
    half = [t.clone().requires_grad_() for t in (q, k, v)]
    wide = [t.float().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(ak.attention(*half, mask=mask, impl=impl), half, dout)
    want = torch.autograd.grad(ak.attention(*wide, mask=mask, impl=impl), wide, dout.float())
    # dk and dv: sums over every query block of the partials; rounded once, each sits within half an
    # ulp (of the tensor's largest entry) of the float32 result; rounding every partial doubled that.
    # (dq also goes through the forward's output in the half type, as in FlashAttention: not compared.)
    for name, a, w in zip(("dk", "dv"), got[1:], want[1:]):
        ulps = (a.float() - w.to(dtype).float()).abs().max() / (w.abs().max() * HALF_EPS[dtype])
        assert ulps <= 0.6, f"{name}: {ulps:.2f} half ulps from the float32 gradient rounded once"


def test_a_bias_past_the_lse_dtypes_range_keeps_live_rows_finite():
    """A float64 bias of finfo(float64).min with float32 inputs: the true lse (~ -1.8e308) does not
    fit float32; it saturates at finfo(float32).min, never -inf (which means 'sees no key')."""
    q, k, v = (torch.randn(1, 1, 8, 4) for _ in range(3))
    bias = torch.randn(8, 8, dtype=torch.float64)
    bias[::2] = torch.finfo(torch.float64).min
    for impl in ("reference", "sdpa", "tiled", "auto"):
        out, lse = ak.attention(q, k, v, mask=ak.causal(), bias=bias, return_lse=True, impl=impl)
        assert torch.isfinite(lse).all() and torch.isfinite(out).all(), impl
        assert (lse[0, 0, ::2] == torch.finfo(torch.float32).min).all(), impl
