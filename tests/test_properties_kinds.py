"""Properties that planted one-line bugs slipped past (issue 13, item 10), each tested as a kind.

(b) ALiBi slopes against the paper's formula, written here independently of ``ak.alibi_slopes``,
    for head counts that are and are not powers of two; the structured ``ak.alibi`` bias equals the
    dense bias built from those slopes, inside attention on every backend that takes it.
(c) Every shape mismatch of q / k / v / mask / bias, one tensor and one dimension at a time, through
    ``ak.attention`` with every ``impl``, ``ak.attention_weights`` and ``ak.explain``: each is refused
    with a ValueError / TypeError whose message names the tensor and both shapes (what came and what
    fits), before any backend sees the call.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

import pytest
import torch

import attnkit as ak
from attnkit.nn.positional import ALiBi

from attnkit.ops.triton import available as _triton_available

HAVE_TRITON = _triton_available()


# -- (b) ALiBi slopes ------------------------------------------------------------------------

def paper_slopes(H: int) -> list[float]:
    """Press et al. 2022 (ALiBi), section 3 and the authors' code (ofirpress/attention_with_linear_biases,
    ``get_slopes``), in closed form: with n the largest power of two <= H, head h < n has slope
    2^(-8 (h+1) / n) (the geometric sequence that starts at 2^(-8/n), with that ratio); the H - n heads
    beyond take every other slope of the 2n sequence, 2^(-8 (2m+1) / (2n)) for m = 0, 1, ..."""
    n = 1 << (H.bit_length() - 1)  # largest power of two <= H
    first = [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    rest = [2.0 ** (-8.0 * (2 * m + 1) / (2 * n)) for m in range(H - n)]
    return first + rest


HEAD_COUNTS = list(range(1, 21)) + [24, 32, 40, 48, 64, 96]


def test_paper_formula_anchors():
    """The formula above on the paper's own examples: 8 heads give 1/2 .. 1/256; 12 heads add the
    16-head sequence's odd terms 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5."""
    assert paper_slopes(8) == [2.0 ** -e for e in range(1, 9)]
    assert paper_slopes(12) == [2.0 ** -e for e in range(1, 9)] + [2.0 ** -(e + 0.5) for e in range(4)]


@pytest.mark.parametrize("H", HEAD_COUNTS)
def test_alibi_slopes_follow_the_paper(H):
    got = ak.alibi_slopes(H)
    assert got.shape == (H,) and got.dtype == torch.float32
    want = torch.tensor(paper_slopes(H), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0.0,
                               msg=lambda m: f"alibi_slopes({H}) differs from the paper's formula:\n{m}")
    assert len(set(got.tolist())) == H, f"alibi_slopes({H}) repeats a slope: {got.tolist()}"
    assert bool(((got > 0) & (got < 1)).all())


@pytest.mark.parametrize("H", [1, 3, 12, 16, 20])
def test_nn_alibi_module_uses_the_paper_slopes(H):
    module = ALiBi(H)
    torch.testing.assert_close(module.slopes, ak.alibi_slopes(H), rtol=0, atol=0)
    torch.testing.assert_close(module.slopes.double(), torch.tensor(paper_slopes(H), dtype=torch.float64),
                               rtol=1e-6, atol=0.0)
    Nq, Nk = 5, 9
    torch.testing.assert_close(module.bias().materialize(Nq, Nk).double(), dense_alibi(paper_slopes(H), Nq, Nk),
                               rtol=1e-6, atol=1e-6)


def dense_alibi(slopes, Nq: int, Nk: int) -> torch.Tensor:
    """(1, H, Nq, Nk) float64: -slope_h * |p_i - j| with bottom-right positions p_i = i + Nk - Nq."""
    s = torch.as_tensor(slopes, dtype=torch.float64)
    p = torch.arange(Nq, dtype=torch.float64)[:, None] + (Nk - Nq)
    j = torch.arange(Nk, dtype=torch.float64)[None, :]
    return -(s[:, None, None] * (p - j).abs())[None]  # (1, H, Nq, Nk)


def formula_attention(q, k, v, bias, allowed, scale):
    """softmax(q k^T * scale + bias) v in float64, written out (rows with no allowed key give 0)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = q.double() @ k.transpose(-1, -2) * scale + bias  # (B, Hq, Nq, Nk)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # all -inf rows -> 0
    return p @ v  # (B, Hq, Nq, Dv)


ALIBI_IMPLS = ["reference", "tiled", "auto"] + (["triton"] if HAVE_TRITON else [])
ALIBI_CASES = {  # name: (Hkv, Nq, Nk, mask)
    "nq<nk": (12, 5, 11, None),
    "causal-gqa": (4, 11, 11, ak.causal()),
    "nq>nk": (12, 11, 5, None),
    "window-mqa": (1, 9, 13, ak.sliding_window(3, 1)),
}


@pytest.mark.parametrize("impl", ALIBI_IMPLS)
@pytest.mark.parametrize("case", list(ALIBI_CASES))
@pytest.mark.parametrize("slopes", ["paper", "random"])
def test_structured_alibi_is_the_dense_bias_in_attention(impl, case, slopes):
    """12 heads (not a power of two): ak.alibi(12) inside attention is softmax(s - slope_h |p_i - j|)."""
    torch.manual_seed(zlib.crc32(f"{impl} {case} {slopes}".encode()))
    Hkv, Nq, Nk, mask = ALIBI_CASES[case]
    B, Hq, D = 2, 12, 16
    q, k, v = torch.randn(B, Hq, Nq, D), torch.randn(B, Hkv, Nk, D), torch.randn(B, Hkv, Nk, D)
    s = paper_slopes(Hq) if slopes == "paper" else (torch.rand(Hq, dtype=torch.float64) * 2).tolist()
    bias = ak.alibi(Hq) if slopes == "paper" else ak.alibi(torch.tensor(s, dtype=torch.float32))
    dense = dense_alibi(s, Nq, Nk)
    torch.testing.assert_close(bias.materialize(Nq, Nk).double(), dense, rtol=1e-6, atol=1e-6)
    allowed = (torch.ones(1, 1, Nq, Nk, dtype=torch.bool) if mask is None else mask.materialize(Nq, Nk))
    want = formula_attention(q, k, v, dense, allowed, D ** -0.5)
    got = ak.attention(q, k, v, mask=mask, bias=bias, impl=impl)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5,
                               msg=lambda m: f"impl={impl!r}, {case}, {slopes} slopes:\n{m}")


# -- (c) shape mismatches --------------------------------------------------------------------

B, HQ, HKV, NQ, NK, D, DV = 2, 4, 2, 5, 7, 16, 16  # D = Dv = 16: triton runs the valid call
BASE = {"q": (B, HQ, NQ, D), "k": (B, HKV, NK, D), "v": (B, HKV, NK, DV)}
TARGET = (B, HQ, NQ, NK)  # what a mask or bias must broadcast to
DEFAULT_MASK = lambda: ak.sliding_window(2)  # noqa: E731 - every backend (banded too) runs the base call with it


def shape_re(name: str, shape) -> str:
    """``name`` before ``shape`` in one sentence: 'v (3, 2, 7, 6)', 'mask has 5 dims ..., got shape (...)'.
    (Every shape in the table differs from the base shapes, so the shape itself says whose it is.)"""
    return rf"\b{re.escape(name)}\b[^;]*?{re.escape(str(tuple(shape)))}"


@dataclass
class Mismatch:
    """One wrong input. ``says``: regexes the error message must all contain (the tensor named with
    what came, and what it had to fit)."""

    name: str
    shapes: dict = field(default_factory=dict)  # q / k / v shapes replacing BASE
    mask: object = None  # a callable building the mask (fresh tensors per case)
    bias: object = None
    says: tuple = ()


def tensor_case(name: str, which: str, shape, other: str) -> Mismatch:
    """``which`` gets ``shape``; the message must name it with its shape and ``other`` with its own."""
    shapes = {which: shape}
    return Mismatch(name, shapes, says=(shape_re(which, shape), shape_re(other, BASE[other])))


def mask_case(name: str, shape, kind: str = "mask") -> Mismatch:
    if kind == "mask":
        build = dict(mask=lambda: torch.ones(shape, dtype=torch.bool))
    else:
        build = dict(bias=lambda: torch.zeros(shape))
    return Mismatch(name, **build, says=(shape_re(kind, shape), re.escape(str(TARGET))))


MISMATCHES = [
    # batch (dim 0), each tensor in turn
    tensor_case("q-batch", "q", (3, HQ, NQ, D), "k"),
    tensor_case("k-batch", "k", (3, HKV, NK, D), "q"),
    tensor_case("v-batch", "v", (3, HKV, NK, DV), "k"),
    tensor_case("v-batch-1", "v", (1, HKV, NK, DV), "k"),  # 1 would broadcast in torch: still wrong
    # heads (dim 1): Hq not a multiple of Hkv; v's heads != k's (either way, even when Hq % Hv == 0)
    tensor_case("q-heads-not-multiple", "q", (B, 3, NQ, D), "k"),
    Mismatch("kv-heads-not-dividing", {"k": (B, 3, NK, D), "v": (B, 3, NK, DV)},
             says=(shape_re("q", BASE["q"]), shape_re("k", (B, 3, NK, D)))),
    Mismatch("kv-zero-heads", {"k": (B, 0, NK, D), "v": (B, 0, NK, DV)},
             says=(shape_re("q", BASE["q"]), shape_re("k", (B, 0, NK, D)))),
    Mismatch("kv-heads-more-than-q", {"k": (B, 2 * HQ, NK, D), "v": (B, 2 * HQ, NK, DV)},
             says=(shape_re("q", BASE["q"]), shape_re("k", (B, 2 * HQ, NK, D)))),
    tensor_case("v-heads-fewer", "v", (B, 1, NK, DV), "k"),
    tensor_case("v-heads-more", "v", (B, HQ, NK, DV), "k"),
    tensor_case("k-heads", "k", (B, 1, NK, D), "v"),
    # sequence (dim 2): k and v must have one length
    tensor_case("v-length", "v", (B, HKV, NK - 1, DV), "k"),
    tensor_case("v-length-1", "v", (B, HKV, 1, DV), "k"),
    tensor_case("k-length", "k", (B, HKV, NK + 1, D), "v"),
    # head dim (dim 3): q and k share D (v's Dv is free)
    tensor_case("q-head-dim", "q", (B, HQ, NQ, D + 1), "k"),
    tensor_case("k-head-dim", "k", (B, HKV, NK, D - 1), "q"),
    tensor_case("k-head-dim-1", "k", (B, HKV, NK, 1), "q"),
    # wrong number of dims
    Mismatch("q-3d", {"q": (B * HQ, NQ, D)}, says=(shape_re("q", (B * HQ, NQ, D)), r"4-D")),
    Mismatch("k-5d", {"k": (B, HKV, 1, NK, D)}, says=(shape_re("k", (B, HKV, 1, NK, D)), r"4-D")),
    Mismatch("v-3d", {"v": (B, NK, DV)}, says=(shape_re("v", (B, NK, DV)), r"4-D")),
    Mismatch("v-2d", {"v": (NK, DV)}, says=(shape_re("v", (NK, DV)), r"4-D")),
    # tensor masks and biases: each of the 4 dims neither 1 nor the full size; too many dims
    *[mask_case(f"{kind}-{dim}", shape, kind) for kind in ("mask", "bias") for dim, shape in (
        ("batch", (3, HQ, NQ, NK)),
        ("heads", (B, 3, NQ, NK)),
        ("heads-is-hkv", (B, HKV, NQ, NK)),  # sized for k's heads, not q's
        ("queries", (B, HQ, NQ + 1, NK)),
        ("keys", (B, HQ, NQ, NK - 1)),
        ("keys-3d", (HQ, NQ, NK + 1)),
        ("transposed-2d", (NK, NQ)),
        ("5d", (1, B, HQ, NQ, NK)),
    )],
    # structured masks whose per-sample / per-head data has the wrong size
    Mismatch("key_padding-lengths-batch", mask=lambda: ak.key_padding([3, 4, 5]),
             says=(r"key_padding", r"\b3 lengths\b", rf"\bB={B}\b")),
    Mismatch("key_padding-valid-batch", mask=lambda: ak.key_padding(torch.ones(3, NK, dtype=torch.bool)),
             says=(shape_re("key_padding", (3, NK)), rf"\bB={B}\b", rf"\bNk={NK}\b")),
    Mismatch("key_padding-valid-keys", mask=lambda: ak.key_padding(torch.ones(B, NK + 2, dtype=torch.bool)),
             says=(shape_re("key_padding", (B, NK + 2)), rf"\bB={B}\b", rf"\bNk={NK}\b")),
    Mismatch("document-length", mask=lambda: ak.document(torch.zeros(NK + 1, dtype=torch.long)),
             says=(r"document", rf"\b{NK + 1}\b", rf"\bNk={NK}\b")),
    Mismatch("document-short", mask=lambda: ak.document(torch.zeros(NK - 2, dtype=torch.long)),
             says=(r"document", rf"\b{NK - 2}\b", rf"\bNk={NK}\b")),
    Mismatch("document-batch", mask=lambda: ak.document(torch.zeros(3, NK, dtype=torch.long)),
             says=(shape_re("document", (3, NK)), rf"\bB={B}\b")),
    Mismatch("sliding_window-dilation-heads", mask=lambda: ak.sliding_window(2, dilation=(1, 2, 3)),
             says=(r"sliding_window", r"\b3 per-head dilations\b", rf"\bHq={HQ}\b")),
    Mismatch("sliding_window-dilation-hkv", mask=lambda: ak.sliding_window(2, dilation=(1, 2)),
             says=(r"sliding_window", r"\b2 per-head dilations\b", rf"\bHq={HQ}\b")),
    Mismatch("global_tokens-flags-keys", mask=lambda: ak.global_tokens(torch.zeros(B, NK + 1, dtype=torch.bool)),
             says=(shape_re("global_tokens", (B, NK + 1)), rf"\bNk={NK}\b")),
    Mismatch("global_tokens-flags-batch", mask=lambda: ak.global_tokens(torch.zeros(3, NK, dtype=torch.bool)),
             says=(shape_re("global_tokens", (3, NK)), rf"\bB={B}\b")),
    Mismatch("global_tokens-index-range", mask=lambda: ak.global_tokens([0, NK]),
             says=(r"global_tokens", rf"\bmax={NK}\b", rf"\bNk={NK}\b")),
    Mismatch("alibi-heads", bias=lambda: ak.alibi(3), says=(r"alibi", r"\b3 slopes\b", rf"\bHq={HQ}\b")),
    Mismatch("alibi-heads-is-hkv", bias=lambda: ak.alibi(HKV),
             says=(r"alibi", rf"\b{HKV} slopes\b", rf"\bHq={HQ}\b")),
    # the same wrong parts inside compositions: every part is checked
    Mismatch("and-padding", mask=lambda: ak.causal() & ak.key_padding([3, 4, 5]),
             says=(r"key_padding", r"\b3 lengths\b", rf"\bB={B}\b")),
    Mismatch("or-not-documents", mask=lambda: ak.sliding_window(2) | ~ak.document(torch.zeros(NK + 1).long()),
             says=(r"document", rf"\bNk={NK}\b")),
    Mismatch("sum-bias-dense", bias=lambda: ak.SumBias((ak.alibi(HQ), ak.DenseBias(torch.zeros(B, 3, NQ, NK)))),
             says=(shape_re("bias", (B, 3, NQ, NK)), re.escape(str(TARGET)))),
    Mismatch("sum-bias-alibi", bias=lambda: ak.SumBias((ak.alibi(HKV), ak.DenseBias(torch.zeros(NQ, NK)))),
             says=(r"alibi", rf"\b{HKV} slopes\b", rf"\bHq={HQ}\b")),
]

CALLS = ["reference", "sdpa", "tiled", "banded", "auto"] + (["triton"] if HAVE_TRITON else []) + ["weights", "explain"]


def test_the_table_covers_every_tensor_and_dim():
    """Guard the table itself: each of q, k, v is wrong in each of its 4 dims and in ndim, and
    mask and bias each in each of their 4 dims (naming rule: '<tensor>-<what>')."""
    names = {m.name for m in MISMATCHES}
    for t, dims in {"q": ("batch", "heads-not-multiple", "head-dim", "3d"),
                    "k": ("batch", "heads", "length", "head-dim", "5d"),
                    "v": ("batch", "heads-fewer", "heads-more", "length", "3d")}.items():
        assert all(f"{t}-{d}" in names for d in dims), t
    for kind in ("mask", "bias"):
        assert all(f"{kind}-{d}" in names for d in ("batch", "heads", "queries", "keys", "5d")), kind


def _valid_call_runs(call: str):
    """The base shapes with the default mask run on every call (so a refusal below is the mismatch's)."""
    q, k, v = (torch.randn(s) for s in BASE.values())
    if call == "weights":
        return ak.attention_weights(q, k, v, mask=DEFAULT_MASK())
    if call == "explain":
        return ak.explain(q, k, v, mask=DEFAULT_MASK())
    return ak.attention(q, k, v, mask=DEFAULT_MASK(), impl=call)


@pytest.mark.parametrize("call", CALLS)
def test_the_base_call_is_valid(call):
    out = _valid_call_runs(call)
    if call == "explain":
        return
    assert out.shape == ((B, HQ, NQ, NK) if call == "weights" else (B, HQ, NQ, DV))


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("case", MISMATCHES, ids=lambda m: m.name)
def test_every_shape_mismatch_is_refused_with_both_shapes(case: Mismatch, call: str):
    shapes = {**BASE, **case.shapes}
    q, k, v = (torch.randn(shapes[n]) for n in ("q", "k", "v"))
    mask = case.mask() if case.mask else None if case.bias else DEFAULT_MASK()
    bias = case.bias() if case.bias else None
    with pytest.raises((ValueError, TypeError)) as info:
        if call == "weights":
            ak.attention_weights(q, k, v, mask=mask, bias=bias)
        elif call == "explain":
            ak.explain(q, k, v, mask=mask, bias=bias)
        else:
            ak.attention(q, k, v, mask=mask, bias=bias, impl=call)
    msg = str(info.value)
    assert not msg.startswith(f"impl='{call}' cannot run"), f"refused by the backend, not by the checks: {msg}"
    for pattern in case.says:
        assert re.search(pattern, msg), f"{case.name}: message lacks {pattern!r}:\n{msg}"
