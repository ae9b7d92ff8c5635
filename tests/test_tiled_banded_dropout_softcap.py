"""Dropout and softcap inside the ``tiled`` and ``banded`` backends (issue 16, items 2 and 3).

Dropout's keep mask is a pure function of (seed, b, h, i, j) (``ops/dropout.py``), so for one seed
a backend must keep exactly the pairs the oracle keeps: its forward, lse and gradients then equal
``reference_attention(..., dropout_seed=seed)`` to float64 rounding, whatever blocks, spans,
windows, residue classes and global parts it cuts the work into. Both are reached through
``ak.attention`` (the call draws the seed from torch's generator, as the oracle does) and directly
with an explicit seed and small blocks, so that many tiles meet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import attnkit as ak
from _numerics import assert_close_to_oracle
from attnkit.bias import DenseBias
from attnkit.ops import banded, banded_globals, tiles
from attnkit.ops.banded import banded_attention
from attnkit.ops.dropout import dense_keep_mask, draw_seed, dropout_multiplier
from attnkit.ops.reference import reference_attention
from attnkit.ops.tiled import tiled_attention

TIGHT = 1e-10  # float64: the same arithmetic in another order


@dataclass(frozen=True)
class Case:
    name: str
    impls: tuple[str, ...]
    mask: Callable[[], ak.Mask | None]
    Nq: int = 37
    Nk: int = 37
    D: int = 16
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    bias: str | None = None  # "alibi" or "dense"


BOTH = ("tiled", "banded")
CASES = [
    Case("causal", ("tiled",), ak.causal, 17, 17),
    Case("causal Nq<Nk", ("tiled",), ak.causal, 17, 113, D=32),
    Case("causal Nq>Nk, empty rows", ("tiled",), ak.causal, 113, 17, B=1),
    Case("document", ("tiled",), lambda: ak.document([0] * 10 + [1] * 20 + [2] * 7)),
    Case("alibi causal", ("tiled",), ak.causal, 37, 37, bias="alibi"),
    Case("dense bias window", ("tiled",), lambda: ak.sliding_window(6, 2), 17, 37, D=32, bias="dense"),
    Case("window", BOTH, lambda: ak.sliding_window(5, 3), 113, 113, B=1),
    Case("window Nq<Nk", BOTH, lambda: ak.sliding_window(4, 2), 17, 113),
    Case("causal window", BOTH, lambda: ak.causal() & ak.sliding_window(6), 113, 113, D=32, B=1),
    Case("window | globals & padding", BOTH,
         lambda: (ak.sliding_window(4, 2) | ak.global_tokens([0, 7, 50])) & ak.key_padding([100, 40]), 113, 113),
    Case("window & padding, empty rows", BOTH, lambda: ak.sliding_window(3) & ak.key_padding([113, 20]), 113, 113),
    Case("dilated | global", ("banded",),
         lambda: ak.sliding_window(3, 2, dilation=(1, 2, 3, 2)) | ak.global_tokens([5]), 113, 113, B=1),
]
MODES = {"dropout": (0.3, None), "softcap": (0.0, 2.0), "both": (0.4, 1.5)}
PAIRS = [pytest.param(c, impl, id=f"{impl}-{c.name}") for c in CASES for impl in c.impls]
LOW_PRECISION = [pytest.param(c, impl, id=f"{impl}-{c.name}") for c in CASES for impl in c.impls
                 if (impl, c.name) in {("tiled", "alibi causal"), ("tiled", "dense bias window"),
                                       ("banded", "window | globals & padding"),
                                       ("banded", "window & padding, empty rows"), ("banded", "dilated | global")}]


def make_inputs(case: Case, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q = rnd(case.B, case.Hq, case.Nq, case.D) * 1.5  # big enough scores that a cap of 1.5-2 bites
    k, v = rnd(case.B, case.Hkv, case.Nk, case.D) * 1.5, rnd(case.B, case.Hkv, case.Nk, case.D)
    bias = None
    if case.bias == "alibi":
        bias = ak.alibi(case.Hq)
    elif case.bias == "dense":
        bias = DenseBias(rnd(case.B, case.Hq, case.Nq, case.Nk))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], bias, case.mask()


def loss_grads(out, lse, leaves, g_out, g_lse):
    """out, lse and d(<out, g_out> + <finite lse, g_lse>)/d(q, k, v)."""
    loss = (out.double() * g_out).sum()
    if g_lse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0).double() * g_lse).sum()
    return torch.autograd.grad(loss, leaves)


def assert_same(got, want, what: str, tol: float = TIGHT):
    assert not torch.isnan(got).any(), f"{what}: NaN"
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:g}"


def compare(run_backend, run_oracle, case, with_lse: bool):
    (q, k, v), bias, mask = make_inputs(case)
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(case.B, case.Hq, case.Nq, case.D, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(case.B, case.Hq, case.Nq, generator=gen, dtype=torch.float64) if with_lse else None
    results = []
    for run in (run_backend, run_oracle):
        out, lse = run(q, k, v, mask, bias)
        results.append((out, lse, loss_grads(out, lse, (q, k, v), g_out, g_lse)))
    (out, lse, grads), (o_out, o_lse, o_grads) = results
    assert_same(out, o_out, "out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(o_lse)), "lse: -inf rows differ"
    fin = torch.isfinite(o_lse)
    assert_same(lse[fin], o_lse[fin], "lse")
    for name, a, b in zip(("dq", "dk", "dv"), grads, o_grads):
        assert_same(a, b, name)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("case, impl", PAIRS)
def test_attention_equals_the_oracle_for_the_seed_torch_draws(case, impl, mode):
    """ak.attention(impl=...) and the oracle under the same torch.manual_seed draw the same seed:
    out, lse and the gradients of out and lse agree to float64 rounding."""
    p, cap = MODES[mode]

    def call(impl_name):
        def run(q, k, v, mask, bias):
            torch.manual_seed(1234)
            return ak.attention(q, k, v, mask=mask, bias=bias, dropout_p=p, softcap=cap, impl=impl_name,
                                return_lse=True)
        return run
    compare(call(impl), call("reference"), case, with_lse=True)


@pytest.fixture
def small_pieces(monkeypatch):
    """Cut every Philox draw, band run and global-columns pass into many small pieces."""
    monkeypatch.setattr(tiles, "DROP_CHUNK_ELEMENTS", 2048)
    monkeypatch.setattr(banded, "PIECE_ELEMENTS", 4096)
    monkeypatch.setattr(banded_globals, "ROW_CHUNK_ELEMENTS", 1000)


@pytest.mark.parametrize("case, impl", PAIRS)
def test_backend_with_an_explicit_seed_and_small_pieces(case, impl, small_pieces):
    """The backend functions themselves, an explicit seed, dropout and a cap, 32-row blocks
    (tiled) and small pieces: every tile draws the bits of its own rows and keys."""
    p, cap = MODES["both"]
    seed = 2 ** 40 + 12345  # both 32-bit halves of the Philox key non-zero
    scale = case.D ** -0.5

    def backend(q, k, v, mask, bias):
        kw = dict(mask=mask, scale=scale, softcap=cap, dropout_p=p, dropout_seed=seed, kernel="auto")
        if impl == "tiled":
            return tiled_attention(q, k, v, bias=bias, block_q=32, block_k=32, **kw)
        return banded_attention(q, k, v, **kw)

    def oracle(q, k, v, mask, bias):
        return reference_attention(q, k, v, mask=mask, bias=bias, scale=scale, dropout_p=p, softcap=cap,
                                   dropout_seed=seed)
    compare(backend, oracle, case, with_lse=False)


# -- half and single precision: the numerics contract --------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case, impl", LOW_PRECISION)
def test_low_precision_within_the_numerics_contract(case, impl, dtype):
    """out, lse, dq/dk/dv in float32 / bf16 within 2x (3x for gradients) the naive formula's
    error in that dtype plus the floor, with dropout and a cap (DESIGN.md section 5)."""
    p, cap, seed = 0.25, 2.0, 99
    scale = case.D ** -0.5
    (q64, k64, v64), bias, mask = make_inputs(case)
    g = torch.randn(case.B, case.Hq, case.Nq, case.D, generator=torch.Generator().manual_seed(3),
                    dtype=torch.float64)

    def run(dt, fn, **kw):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q64, k64, v64)]
        out, lse = fn(*leaves, mask=mask, bias=bias, scale=scale, dropout_p=p, softcap=cap, dropout_seed=seed,
                      **kw)
        return out, lse, torch.autograd.grad(out, leaves, g.to(dt))

    backend = dict(tiled=lambda *a, **kw: tiled_attention(*a, **kw),
                   banded=lambda *a, bias, **kw: banded_attention(*a, **kw))[impl]
    got = run(dtype, backend)
    oracle = run(torch.float64, reference_attention)
    naive = run(dtype, reference_attention, upcast=False)
    assert got[0].dtype == dtype
    assert_close_to_oracle("out", got[0].detach(), oracle[0].detach(), naive[0].detach(), dtype)
    fin = torch.isfinite(oracle[1])
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(oracle[1])), "lse: -inf rows differ"
    assert_close_to_oracle("lse", got[1][fin], oracle[1][fin], naive[1][fin], dtype)
    for name, a, o, n in zip(("dq", "dk", "dv"), got[2], oracle[2], naive[2]):
        assert_close_to_oracle(name, a, o, n, dtype, factor=3.0)


# -- which pairs are kept ------------------------------------------------------------------------

@pytest.mark.parametrize("impl, mask", [
    ("tiled", ak.causal()),
    ("banded", ak.sliding_window(40, 20, dilation=(1, 3)) | ak.global_tokens([0, 100])),
])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_pairs_are_the_oracles_and_about_one_minus_p(impl, mask, p):
    """With q = 0 every allowed key of a row gets probability 1/n, and with v = the identity
    out[i, j] = keep(i, j) / ((1 - p) n): the kept pairs read straight off the backend's output
    must be the oracle's keep mask on the allowed pairs, and their fraction about 1 - p (5 sigma)."""
    B, H, N = 1, 2, 256
    q = torch.zeros(B, H, N, 8, dtype=torch.float64)
    k = torch.randn(B, H, N, 8, dtype=torch.float64)
    v = torch.eye(N, dtype=torch.float64).expand(B, H, N, N)
    torch.manual_seed(7)
    out = ak.attention(q, k, v, mask=mask, dropout_p=p, impl=impl)  # (B, H, N, N): out[i, j] per pair
    torch.manual_seed(7)
    seed = draw_seed()  # the seed the call drew
    allowed = mask.materialize(N, N).expand(B, H, N, N)
    kept = out > 0
    assert not (kept & ~allowed).any(), "a masked-out pair got weight"
    want = dense_keep_mask(seed, p, B, H, N, N) & allowed
    assert torch.equal(kept, want), f"{(kept != want).sum().item()} pairs differ from the oracle's keep mask"
    n = allowed.sum(-1, keepdim=True).double()
    assert torch.allclose(out[kept], (1.0 / ((1 - p) * n)).expand_as(out)[kept]), "kept weight != 1/((1-p) n)"
    frac, pairs = kept.sum().item() / allowed.sum().item(), allowed.sum().item()
    sigma = (p * (1 - p) / pairs) ** 0.5
    assert abs(frac - (1 - p)) <= 5 * sigma, f"kept {frac:.4f} of {pairs} pairs, expected {1 - p} +- {5 * sigma:.4f}"


# -- seeds, kernels, errors ----------------------------------------------------------------------

@pytest.mark.parametrize("impl", BOTH)
def test_a_seed_fixes_the_mask_and_another_changes_it(impl):
    (q, k, v), _, _ = make_inputs(Case("w", BOTH, lambda: None, 64, 64))
    mask = ak.sliding_window(8)
    call = dict(tiled=lambda s: tiled_attention(q, k, v, mask=mask, bias=None, scale=0.25, dropout_p=0.3,
                                                dropout_seed=s),
                banded=lambda s: banded_attention(q, k, v, mask=mask, scale=0.25, dropout_p=0.3, dropout_seed=s))[impl]
    a, b, c = call(5)[0], call(5)[0], call(6)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.manual_seed(3)
    d = call(None)[0]  # seed None: one drawn from torch's generator
    torch.manual_seed(3)
    assert torch.equal(d, call(None)[0]) and not torch.allclose(d, a)


@pytest.mark.parametrize("impl", BOTH)
@pytest.mark.parametrize("kw", [dict(dropout_p=0.1), dict(softcap=5.0)])
def test_fused_kernel_refuses_dropout_and_softcap_and_auto_takes_math(impl, kw):
    (q, k, v), _, _ = make_inputs(Case("w", BOTH, lambda: None, 40, 40, B=1, Hq=2, Hkv=2))
    mask = ak.sliding_window(4)
    fn = dict(tiled=lambda **a: tiled_attention(q, k, v, mask=mask, bias=None, scale=0.25, **a),
              banded=lambda **a: banded_attention(q, k, v, mask=mask, scale=0.25, **a))[impl]
    with pytest.raises(ValueError, match=f"{impl} kernel='fused' cannot apply softcap=.* / dropout_p=.*: torch's "
                                         "CPU flash kernel has neither; use kernel='math'"):
        fn(kernel="fused", dropout_seed=1, **kw)
    assert torch.equal(fn(kernel="auto", dropout_seed=1, **kw)[0], fn(kernel="math", dropout_seed=1, **kw)[0])


def test_dropout_tile_in_pieces_equals_one_draw():
    """The multiplier drawn per group of 4 keys and in pieces is the same tensor as one
    dropout_multiplier call, for what tiled (B, H, r, c: a run of keys), banded (h, n, c, S:
    windows starting anywhere, before key 0 too, dilated) and the global columns (scattered
    keys) draw."""
    window_starts = torch.arange(5).view(5, 1, 1) * 16 - 7  # (n, 1, 1)
    cases = [((2, 3, 1, 1), torch.randint(0, 1000, (50, 1)), torch.arange(13, 83)[None]),
             ((3, 1, 1, 1), torch.arange(80).view(5, 16, 1), window_starts + torch.arange(40).view(1, 1, 40)),
             ((3, 1, 1, 1), torch.arange(80).view(5, 16, 1), 1 + 2 * (window_starts + torch.arange(40).view(1, 1, 40))),
             ((3, 1, 1), torch.arange(80)[:, None], torch.tensor([[0, 9, 500]])),
             ((2, 3, 1, 1), torch.randint(0, 1000, (50, 1)), torch.randint(-5, 1000, (1, 70)))]
    for s_bh, rows, cols in cases:
        bh = torch.arange(torch.Size(s_bh).numel()).view(s_bh) + 1
        whole = dropout_multiplier(77, 0.3, bh, rows, cols, torch.float32)
        for m in (37, 1000, 100000):
            assert torch.equal(tiles.dropout_tile(77, 0.3, bh, rows, cols, torch.float32, m), whole)
