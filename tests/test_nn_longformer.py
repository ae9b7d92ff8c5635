"""attnkit.nn.LongformerSelfAttention against the real transformers LongformerSelfAttention.

HF's module is called the way LongformerModel calls it: the 0/1/2 mask is padded to a multiple of
the window (padding tokens, mask 0, as in ``_pad_to_window_size``), extended to 0 / finfo.min /
finfo.max, and split into ``is_index_masked`` / ``is_index_global_attn`` / ``is_global_attn``;
we compare the first N rows. Tolerance (fp32, eval): ``rtol=1e-5, atol=1e-5 * max|hf|``.
"""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from torch.nn import functional as F
from transformers import LongformerConfig
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention as HFLongformerSelfAttention

import attnkit as ak
from attnkit.nn import LongformerSelfAttention

E, H, B = 64, 4, 2
IMPLS = ["reference", "tiled", "auto"] + (["banded"] if "banded" in ak.backends() else [])


# -- helpers -----------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _hf_state(attention_window: int, dropout: float = 0.0) -> tuple[LongformerConfig, dict]:
    """A config and fixed random weights (seeded), built once per window."""
    cfg = LongformerConfig(hidden_size=E, num_attention_heads=H, attention_window=[attention_window],
                           attention_probs_dropout_prob=dropout)
    torch.manual_seed(attention_window)
    return cfg, HFLongformerSelfAttention(cfg, layer_id=0).state_dict()


def make_hf(attention_window: int, dropout: float = 0.0) -> HFLongformerSelfAttention:
    """A fresh HF module in eval mode with the window's fixed weights (callers may mutate it)."""
    cfg, state = _hf_state(attention_window, dropout)
    hf = HFLongformerSelfAttention(cfg, layer_id=0)
    hf.load_state_dict(state)
    return hf.eval()


def hf_forward(hf: HFLongformerSelfAttention, x: torch.Tensor, mask012: torch.Tensor) -> torch.Tensor:
    """HF's output (B, N, E) for hidden states (B, N, E) and a 0/1/2 mask (B, N), as LongformerModel
    feeds its layers: pad N up to a multiple of the window, extend the mask, derive the flags."""
    N = x.shape[1]
    pad = (-N) % (2 * hf.one_sided_attn_window_size)
    filler = torch.randn(x.shape[0], pad, x.shape[2], dtype=x.dtype)  # what padding tokens hold is irrelevant
    x_p = torch.cat([x, filler], 1)  # (B, N + pad, E)
    m_p = F.pad(mask012, (0, pad), value=0)  # (B, N + pad), padding tokens get 0
    ext = torch.zeros(m_p.shape, dtype=x.dtype)  # 1 (local) -> 0
    ext[m_p == 0] = torch.finfo(x.dtype).min  # create_bidirectional_mask's "no attention"
    ext[m_p == 2] = torch.finfo(x.dtype).max  # LongformerModel.forward: global -> finfo.max
    is_global = ext > 0
    out = hf(x_p, attention_mask=ext, is_index_masked=ext < 0, is_index_global_attn=is_global,
             is_global_attn=bool(is_global.flatten().any()))[0]
    return out[:, :N]


def assert_matches_hf(ours: torch.Tensor, hf: torch.Tensor) -> None:
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-5 * hf.abs().max().item())


def mask012(N: int, lengths: tuple[int, ...] = (), globals_: tuple[tuple[int, ...], ...] = ()) -> torch.Tensor:
    """(B, N) long: 1 everywhere, 0 from lengths[b] on, 2 at globals_[b]."""
    m = torch.ones(B, N, dtype=torch.long)
    for b, n in enumerate(lengths):
        m[b, n:] = 0
    for b, idx in enumerate(globals_):
        m[b, list(idx)] = 2
    return m


# (name, N, attention_window, 0/1/2 mask)
CASES = [
    ("local_only", 64, 16, mask012(64)),
    ("global_at_start", 64, 16, mask012(64, globals_=((0, 1, 2), (0, 1, 2)))),
    ("global_middle_and_end", 64, 16, mask012(64, globals_=((20, 37, 63), (20, 37, 63)))),
    ("padding_different_lengths", 64, 16, mask012(64, lengths=(64, 41))),
    ("global_and_padding", 64, 16, mask012(64, lengths=(50, 29), globals_=((0, 30), (5,)))),
    ("n_not_multiple_of_window", 300, 64, mask012(300, lengths=(300, 257), globals_=((0, 150), (299 - 50,)))),
    ("different_global_counts", 96, 16, mask012(96, globals_=((0, 10, 50, 95), (40,)))),
    ("global_in_one_sample_only", 80, 16, mask012(80, lengths=(80, 70), globals_=((), (7, 69)))),
    ("window_wider_than_sequence", 17, 64, mask012(17, lengths=(17, 9), globals_=((3,), ()))),
    ("single_token", 1, 16, mask012(1)),
]


def _inputs(N: int, seed: int) -> torch.Tensor:
    return torch.randn(B, N, E, generator=torch.Generator().manual_seed(seed))


# -- parity with HF --------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,N,window,mask", CASES, ids=[c[0] for c in CASES])
def test_matches_hf(name, N, window, mask, impl):
    hf = make_hf(window)
    ours = LongformerSelfAttention.from_hf(hf, impl=impl)
    x = _inputs(N, seed=N + window)
    with torch.no_grad():
        got, want = ours(x, mask), hf_forward(hf, x, mask)
    assert got.shape == (B, N, E)
    assert_matches_hf(got, want)
    assert torch.all(got[mask == 0] == 0) and torch.all(want[mask == 0] == 0), "padding rows must be exactly 0"


def test_no_mask_means_all_local():
    hf = make_hf(16)
    ours = LongformerSelfAttention.from_hf(hf)
    x = _inputs(48, seed=1)
    with torch.no_grad():
        assert_matches_hf(ours(x), hf_forward(hf, x, mask012(48)))


def test_explicit_convention_matches_hf():
    """key_padding (lengths or bool) and global_indices (positions or bool) mean the 0/1/2 mask."""
    hf = make_hf(16)
    ours = LongformerSelfAttention.from_hf(hf)
    x = _inputs(70, seed=2)
    m = mask012(70, lengths=(70, 33), globals_=((0, 12), (0, 12)))
    with torch.no_grad():
        want = hf_forward(hf, x, m)
        assert_matches_hf(ours(x, key_padding=torch.tensor([70, 33]), global_indices=[0, 12]), want)
        assert_matches_hf(ours(x, key_padding=m != 0, global_indices=m == 2), want)


def test_global_index_inside_padding_counts_as_padding():
    """Shared global_indices that fall in a short sample's padding: padding wins (HF's 0/1/2 mask
    cannot say "global padding", so the equivalent HF mask marks that position 0)."""
    hf = make_hf(16)
    ours = LongformerSelfAttention.from_hf(hf)
    x = _inputs(64, seed=3)
    m = mask012(64, lengths=(64, 40), globals_=((0, 50), (0,)))  # 50 is padding in sample 1
    with torch.no_grad():
        got = ours(x, key_padding=torch.tensor([64, 40]), global_indices=[0, 50])
        assert_matches_hf(got, hf_forward(hf, x, m))
    assert torch.all(got[1, 40:] == 0)


def test_gradients_match_hf():
    hf = make_hf(16)
    ours = LongformerSelfAttention.from_hf(hf)
    m = mask012(64, lengths=(64, 45), globals_=((0, 30), (5,)))
    x1 = _inputs(64, seed=4).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    g = torch.randn(B, 64, E, generator=torch.Generator().manual_seed(5))
    (ours(x1, m) * g).sum().backward()
    (hf_forward(hf, x2, m) * g).sum().backward()
    for got, want in ((x1.grad, x2.grad), (ours.query_global.weight.grad, hf.query_global.weight.grad),
                      (ours.key.weight.grad, hf.key.weight.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


# -- backends agree --------------------------------------------------------------------------

@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "auto"])
def test_impls_agree_with_auto(impl):
    hf = make_hf(16)
    x = _inputs(90, seed=6)
    m = mask012(90, lengths=(90, 61), globals_=((0, 44, 89), (2,)))
    with torch.no_grad():
        auto = LongformerSelfAttention.from_hf(hf)(x, m)
        other = LongformerSelfAttention.from_hf(hf, impl=impl)(x, m)
    torch.testing.assert_close(other, auto, rtol=1e-5, atol=1e-6)


# -- from_hf, dropout, modes -----------------------------------------------------------------

def test_from_hf_copies_weights():
    hf = make_hf(16)
    ours = LongformerSelfAttention.from_hf(hf)
    names = ("query", "key", "value", "query_global", "key_global", "value_global")
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())
    assert {f"{n}.{p}" for n in names for p in ("weight", "bias")} == set(ours.state_dict())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=0, atol=0)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(1.0)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed when HF's weights changed: not a copy"
    assert (ours.num_heads, ours.head_dim, ours.embed_dim, ours.one_sided_attn_window_size) == (H, E // H, E, 8)
    assert not ours.training


def test_from_hf_shares_weights():
    """share_weights=True: HF's own Linear layers (same Parameters), nothing left on the meta device."""
    hf = make_hf(16)
    ours = LongformerSelfAttention.from_hf(hf, share_weights=True)
    for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
        assert getattr(ours, name) is getattr(hf, name), name
    assert not any(p.is_meta for p in ours.parameters()) and not ours.training
    x, m = _inputs(40, seed=9), mask012(40, lengths=(40, 30), globals_=((0,), (7,)))
    with torch.no_grad():
        hf.value.weight.mul_(2.0)  # seen by both
        assert_matches_hf(ours(x, m), hf_forward(hf, x, m))


def test_from_hf_copies_dropout_and_mode():
    hf = make_hf(16, dropout=0.1).train()
    ours = LongformerSelfAttention.from_hf(hf)
    assert ours.dropout == pytest.approx(0.1) and ours.training


def test_dropout_only_in_training():
    hf = make_hf(16, dropout=0.5)
    ours = LongformerSelfAttention.from_hf(hf)  # eval: dropout off, equals HF in eval
    x, m = _inputs(64, seed=7), mask012(64, lengths=(64, 40), globals_=((0,), (3,)))
    with torch.no_grad():
        eval_out = ours(x, m)
        assert_matches_hf(eval_out, hf_forward(hf, x, m))
        torch.manual_seed(0)
        train_out = ours.train()(x, m)
    assert torch.isfinite(train_out).all() and not torch.allclose(train_out, eval_out)
    assert torch.all(train_out[m == 0] == 0)


def test_training_without_dropout_equals_eval():
    ours = LongformerSelfAttention.from_hf(make_hf(16))
    x, m = _inputs(40, seed=8), mask012(40, globals_=((1,), (2, 39)))
    with torch.no_grad():
        torch.testing.assert_close(ours.train()(x, m), ours.eval()(x, m), rtol=0, atol=0)


def test_constructor_builds_hf_shaped_module():
    m = LongformerSelfAttention(hidden_size=32, num_heads=2, attention_window=6, dropout=0.1)
    assert (m.head_dim, m.one_sided_attn_window_size, m.dropout, m.impl) == (16, 3, 0.1, "auto")
    assert m.query_global.bias is not None and m.value.weight.shape == (32, 32)
    assert m(torch.randn(1, 5, 32)).shape == (1, 5, 32)


# -- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,pattern", [
    (dict(attention_window=15), r"attention_window=15 is odd.*must be even"),
    (dict(attention_window=0), r"attention_window=0: expected a positive integer"),
    (dict(attention_window=-4), r"attention_window=-4"),
    (dict(hidden_size=66), r"hidden_size=66 is not divisible by num_heads=4"),
    (dict(dropout=1.0), r"dropout=1.0: expected a probability in \[0, 1\)"),
    (dict(impl="nope"), r"impl='nope' is not a backend"),
])
def test_bad_config(kwargs, pattern):
    args = dict(hidden_size=E, num_heads=H, attention_window=16) | kwargs
    with pytest.raises(ValueError, match=pattern):
        LongformerSelfAttention(**args)


def test_window_must_be_int():
    with pytest.raises(TypeError, match="attention_window must be an int"):
        LongformerSelfAttention(E, H, 16.0)


@pytest.fixture(scope="module")
def small():
    return LongformerSelfAttention(E, H, 16).eval(), torch.randn(B, 20, E)


@pytest.mark.parametrize("call,pattern", [
    (lambda m, x: m(x, mask012(20), key_padding=[20, 10]), r"use one convention"),
    (lambda m, x: m(x, mask012(20), global_indices=[0]), r"use one convention"),
    (lambda m, x: m(x, mask012(21)), r"attention_mask has shape \(2, 21\); expected \(B, N\) = \(2, 20\)"),
    (lambda m, x: m(x, torch.ones(20)), r"attention_mask has shape \(20,\)"),
    (lambda m, x: m(x, mask012(20) * 3), r"attention_mask holds 3; expected only the values 0, 1, 2"),
    (lambda m, x: m(x, mask012(20) - 2), r"attention_mask holds -1"),
    (lambda m, x: m(x, torch.full((B, 20), torch.finfo(torch.float32).min)), r"not the extended"),
    (lambda m, x: m(x, torch.full((B, 20), 0.5)), r"attention_mask holds 0.5"),
    (lambda m, x: m(x[:, :, :32]), r"expected \(B, N, E\) with E = hidden_size = 64"),
    (lambda m, x: m(x[0]), r"hidden_states has shape \(20, 64\)"),
    (lambda m, x: m(x, key_padding=[20, 21]), r"lengths must lie in \[0, N=20\]"),
    (lambda m, x: m(x, key_padding=[20]), r"expected integer lengths of shape \(B,\) = \(2,\)"),
    (lambda m, x: m(x, key_padding=torch.ones(B, 19, dtype=torch.bool)), r"expected \(B, N\) = \(2, 20\)"),
    (lambda m, x: m(x, global_indices=[0, 20]), r"global_indices must lie in \[0, N=20\)"),
    (lambda m, x: m(x, global_indices=[[0], [1]]), r"expected 1-D integer positions"),
    (lambda m, x: m(x, global_indices=torch.zeros(1, 20, dtype=torch.bool)), r"expected \(B, N\) = \(2, 20\)"),
])
def test_bad_inputs(small, call, pattern):
    module, x = small
    with pytest.raises(ValueError, match=pattern):
        call(module, x)


def test_from_hf_rejects_other_modules():
    with pytest.raises(TypeError, match="from_hf expects transformers' LongformerSelfAttention"):
        LongformerSelfAttention.from_hf(torch.nn.Linear(4, 4))
