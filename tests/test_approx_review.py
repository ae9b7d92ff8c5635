"""Adversarial review of attnkit.approx (issue 17): inputs a demanding user of performer-pytorch /
linformer / nystrom-attention / fast-transformers would try, each against an independent oracle
(the method's own call on the unpadded input, exact attention, or the layer's own formula)."""

import pytest
import torch

import attnkit as ak
from attnkit.approx import (LinearAttention, PerformerAttention, linear_attention, orthogonal_random_features,
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


# -- Linformer: E's columns are positions, so padding anywhere must meet the same columns ---------------

@pytest.mark.parametrize("per_head", [False, True])
def test_linformer_padding_anywhere_equals_the_unpadded_call(per_head):
    """A left- or inner-padded row (e.g. an EncoderDecoder's memory, which keeps the source's layout)
    used E's columns at the padded positions: 0.46 off the unpadded row before the fix."""
    from attnkit.approx import linformer_attention

    q, k, v = qkv(B=1, Nq=5, Nk=6, seed=2)
    g = torch.Generator().manual_seed(3)
    E = torch.randn(*((2,) if per_head else ()), 4, 12, generator=g, dtype=F64)
    Fv = torch.randn(E.shape, generator=g, dtype=F64)
    alone = linformer_attention(q, k, v, E, Fv)  # (1, H, Nq, Dv): the oracle, no padding at all
    junk_k, junk_v = (50 * torch.randn(1, 2, 3, t.shape[-1], generator=g, dtype=F64) for t in (k, v))
    layouts = {"left": ([junk_k, k], [junk_v, v], [0] * 3 + [1] * 6),
               "inner": ([k[:, :, :2], junk_k, k[:, :, 2:]], [v[:, :, :2], junk_v, v[:, :, 2:]], [1] * 2 + [0] * 3 + [1] * 4),
               "right": ([k, junk_k], [v, junk_v], [1] * 6 + [0] * 3)}
    for name, (ks, vs, valid) in layouts.items():
        got = linformer_attention(q, torch.cat(ks, 2), torch.cat(vs, 2), E, Fv,
                                  mask=ak.key_padding(torch.tensor([valid], dtype=torch.bool)))
        torch.testing.assert_close(got, alone, rtol=1e-12, atol=1e-12, msg=name)


# -- the core path of MultiHeadAttention ------------------------------------------------------------------

def test_a_core_behind_a_windowed_kv_cache_refuses_a_mask_that_reaches_dropped_keys():
    """A core without its own state reads the KVCache; with window=3 the cache drops keys that
    ak.causal() still lets a query see. Exact attention refuses that; the core path silently
    attended to the window only (0.28 off the full causal output) before the fix."""
    from attnkit.nn import KVCache, MultiHeadAttention

    torch.manual_seed(0)
    x = torch.randn(1, 10, 16, dtype=F64)
    for core in (None, LinearAttention()):
        mha = MultiHeadAttention(16, 2, core=core).double()
        cache = KVCache(window=3)
        with torch.no_grad():
            mha(x[:, :6], mask=ak.causal(), cache=cache)
            with pytest.raises(ValueError, match="dropped"):
                mha(x[:, 6:], mask=ak.causal(), cache=cache)
        # a mask the window covers still decodes, and equals the uncached call (the oracle)
        cache = KVCache(window=3)
        window = ak.causal() & ak.sliding_window(3, 0)
        if core is not None:  # linear attention refuses windows: check the core with an unbounded cache
            cache, window = KVCache(), ak.causal()
        with torch.no_grad():
            first = mha(x[:, :6], mask=window, cache=cache)
            rest = mha(x[:, 6:], mask=window, cache=cache)
            torch.testing.assert_close(torch.cat([first, rest], 1), mha(x, mask=window))


def test_kernel_state_refuses_a_dtype_change_with_what_to_do_and_works_after_reset():
    """model.double() in the middle of decoding: torch's 'expected scalar type Double but found
    Float' came from a matmul deep inside before the fix; now a ValueError that says reset()."""
    from attnkit.approx import KernelState

    q, k, v = qkv(B=1, Nq=4, Nk=4, dtype=torch.float32)
    state = KernelState()
    linear_attention(q, k, v, mask=ak.causal(), state=state)
    with pytest.raises(ValueError, match=r"float32.*float64.*reset\(\)"):
        linear_attention(q.double(), k.double(), v.double(), mask=ak.causal(), state=state)
    assert state.position == 4 and state.S.dtype == torch.float32  # the refused call changed nothing
    half = linear_attention(q.half(), k.half(), v.half(), mask=ak.causal(), state=state)  # half computes in fp32
    assert half.dtype == torch.float16 and state.position == 8
    state.reset()
    got = linear_attention(q.double(), k.double(), v.double(), mask=ak.causal(), state=state)
    torch.testing.assert_close(got, linear_attention(q.double(), k.double(), v.double(), mask=ak.causal()))


# -- whatever sits at padded positions stays out ----------------------------------------------------------

def _methods_on(E, P):
    from attnkit.approx import linformer_attention, nystrom_attention

    return {"linear": lambda q, k, v, m: linear_attention(q, k, v, mask=m),
            "linear causal": lambda q, k, v, m: linear_attention(q, k, v, mask=m & ak.causal()),
            "performer": lambda q, k, v, m: performer_attention(q, k, v, P, mask=m),
            "performer causal": lambda q, k, v, m: performer_attention(q, k, v, P, mask=m & ak.causal()),
            "nystrom": lambda q, k, v, m: nystrom_attention(q, k, v, num_landmarks=3, mask=m),
            "linformer": lambda q, k, v, m: linformer_attention(q, k, v, E, mask=m)}


def test_large_finite_garbage_in_padded_keys_changes_nothing_and_has_finite_gradients():
    """A padded key of 1e20 (finite; exact attention takes it): |k|^2 overflows in the Performer's
    exp(w.k - |k|^2 / 2), and NaN * 0 left the padded feature NaN in every row of the head before the
    fix (and its gradient NaN even after zeroing the features). Oracle: the call without the padded
    keys (left padding, so the bottom-right causal diagonal stays on the same keys; Nq != Nk)."""
    q, k, v = qkv(B=1, Nq=5, Nk=6, dtype=torch.float32, seed=4)
    E = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    P = orthogonal_random_features(16, 8, generator=torch.Generator().manual_seed(6))
    kp = torch.cat([torch.full((1, 2, 2, 8), 1e20), k], 2)
    vp = torch.cat([torch.full((1, 2, 2, 4), -1e20), v], 2)
    mask = ak.key_padding(torch.tensor([[False] * 2 + [True] * 6]))
    for name, fn in _methods_on(E, P).items():
        want = fn(q, k, v, ak.key_padding(torch.ones(1, 6, dtype=torch.bool)))
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, kp, vp))
        got = fn(qg, kg, vg, mask)
        torch.testing.assert_close(got, want, msg=name)
        got.sum().backward()
        for t in (qg, kg, vg):
            assert torch.isfinite(t.grad).all(), name
            assert t is qg or torch.equal(t.grad[:, :, :2], torch.zeros_like(t.grad[:, :, :2])), name


# -- audit -------------------------------------------------------------------------------------------------

def test_audit_defaults_serve_layers_with_different_head_dims():
    """An EncoderDecoder whose encoder has 4 heads (D = 8) and decoder 2 (D = 16): the default
    Performer was built for the first call's D and every decoder layer showed it 'refused' with
    'projection must be a (F, D=16) tensor ... got (256, 8)', audit's own construction error. Oracle:
    the Performer with seed 0 built for that layer's D, run on the layer's recorded q, k, v."""
    from torch import nn

    from attnkit.approx import audit
    from attnkit.approx.audit import head_errors, record_calls
    from attnkit.nn import (DecoderLM, Encoder, EncoderDecoder, FeedForward, MultiHeadAttention, PreNormBlock,
                            RMSNorm, TokenEmbeddings)

    E, V = 32, 20
    torch.manual_seed(0)
    enc = Encoder(TokenEmbeddings(V, E), [PreNormBlock(MultiHeadAttention(E, 4), FeedForward(E, 32), RMSNorm(E),
                                                        RMSNorm(E))])
    dec = DecoderLM(TokenEmbeddings(V, E), [PreNormBlock(MultiHeadAttention(E, 2), FeedForward(E, 32), RMSNorm(E),
                                                         RMSNorm(E), cross_attn=MultiHeadAttention(E, 2),
                                                         norm_cross=RMSNorm(E))], RMSNorm(E), nn.Linear(E, V))
    model = EncoderDecoder(enc, dec).eval()
    src, tgt = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 5))
    report = audit(model, src, tgt, repeats=1)
    calls = {c.name: c for c in record_calls(model, src, tgt)}
    for layer in ("encoder.blocks.0.attn", "decoder.blocks.0.attn", "decoder.blocks.0.cross_attn"):
        row = report.row(layer, "performer F=256")
        assert row.refused is None, row.refused
        c = calls[layer]
        with torch.no_grad():
            out = PerformerAttention(c.q.shape[-1], 256, seed=0).eval()(c.q, c.k, c.v, mask=c.mask)
        want = head_errors(out, ak.attention(c.q, c.k, c.v, mask=c.mask))[0]
        assert row.rel_l2 == pytest.approx(want, rel=1e-4)


# -- the Performer's features and its decoding state -------------------------------------------------------

def test_performer_refuses_a_decoding_state_built_before_its_features_changed():
    """redraw() (or load_state_dict) between two decoding steps left S, z summed with the old
    features and the new queries read them with the new ones: a silent mix before the fix."""
    core = PerformerAttention(8, 16, seed=3).double().eval()
    q, k, v = qkv(B=1, Nq=6, Nk=6, Dv=8)
    for change in ("redraw", "load_state_dict"):
        state = core.new_cache()
        core(q[:, :, :3], k[:, :, :3], v[:, :, :3], mask=ak.causal(), cache=state)
        if change == "redraw":
            core.redraw()
        else:
            core.load_state_dict(PerformerAttention(8, 16, seed=4).double().state_dict())
        with pytest.raises(ValueError, match=r"reset\(\)"):
            core(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], mask=ak.causal(), cache=state)
        state.reset()  # rerun the sequence with the current features: equals the one-shot causal call
        steps = [core(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], mask=ak.causal(), cache=state)
                 for i in range(6)]
        torch.testing.assert_close(torch.cat(steps, 2), performer_attention(q, k, v, core.projection,
                                                                            mask=ak.causal()))
    other = PerformerAttention(8, 16, seed=3).double()  # same features, another layer: not its state
    with pytest.raises(ValueError, match="another layer"):
        other(q[:, :, :1], k[:, :, :1], v[:, :, :1], mask=ak.causal(), cache=state)


def test_performer_built_for_another_head_dim_says_which():
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match=r"head_dim=8.*D=16.*PerformerAttention\(layer.head_dim"):
        PerformerAttention(8, 16)(q, q, q)


# -- recurrent steps of any shape against the quadratic form over all the keys so far ------------------------

def _step_oracle(method, q, K, V, valid):
    """The masked quadratic form of the same features over every key so far, bottom-right causal."""
    from attnkit.approx import elu_feature_map, kernelized
    from attnkit.approx.performer import performer_features

    if method == "linear":
        return kernelized.quadratic(elu_feature_map(q), elu_feature_map(K), V, causal=True, key_valid=valid)
    pq, pk, s = performer_features(q, K, P8, kernel="softmax", scale=q.shape[-1] ** -0.5)
    return kernelized.quadratic(pq, pk, V, causal=True, key_logscale=s, key_valid=valid)


@pytest.mark.parametrize("method", ["linear", "performer"])
def test_recurrent_steps_with_fewer_queries_than_keys_and_padding_equal_the_quadratic_form(method):
    from attnkit.approx import KernelState

    g = torch.Generator().manual_seed(7)
    state, ks, vs, valids = KernelState(), [], [], []
    for nq, nk in [(2, 5), (1, 1), (3, 4), (4, 4)]:  # steps with Nq <= Nk, keys partly padded
        q, k, v = (3 * torch.randn(2, 2, n, 8, generator=g, dtype=F64) for n in (nq, nk, nk))
        valid = torch.rand(2, nk, generator=g) > 0.4
        if not valids:
            valid[:, 0] = False  # the first step starts with a padded key
        mask = ak.causal() & ak.key_padding(valid)
        if method == "linear":
            out = linear_attention(q, k, v, mask=mask, chunk_size=2, state=state)
        else:
            out = performer_attention(q, k, v, P8, mask=mask, chunk_size=2, state=state)
        ks, vs, valids = ks + [k], vs + [v], valids + [valid]
        want = _step_oracle(method, q, torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(valids, 1))
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_more_queries_than_new_keys_with_a_filled_state_is_refused():
    """Bottom-right over all the keys, query 0 of a (Nq=3, Nk=1) step after 4 stored tokens sees
    keys 0..1 only; the state's sums hold all 4 and gave it all of them (0.6 to 1.7 off the masked
    quadratic form) before the fix. An empty state is fine: the early queries see nothing."""
    from attnkit.approx import KernelState

    q, k, v = qkv(B=1, Nq=4, Nk=4)
    state = KernelState()
    linear_attention(q, k, v, mask=ak.causal(), state=state)
    with pytest.raises(ValueError, match="as many new keys as queries"):
        linear_attention(q[:, :, :3], k[:, :, :1], v[:, :, :1], mask=ak.causal(), state=state)
    fresh = linear_attention(q[:, :, :3], k[:, :, :1], v[:, :, :1], mask=ak.causal(), state=KernelState())
    torch.testing.assert_close(fresh, _step_oracle("linear", q[:, :, :3], k[:, :, :1], v[:, :, :1], None))


def test_a_core_whose_new_cache_is_a_kv_cache_decodes_with_it():
    """A custom core (``forward(q, k, v, *, mask, scale, cache)``, documented as pluggable) whose
    new_cache() returns a KVCache was taken as owning its state: the layer never filled the cache,
    the core got cache=None and each step saw only its own keys (0.30 off) before the fix."""
    from torch import nn

    from attnkit.nn import KVCache, MultiHeadAttention

    class ExactCore(nn.Module):
        def new_cache(self):
            return KVCache()

        def forward(self, q, k, v, *, mask=None, scale=None, cache=None):
            return ak.attention(q, k, v, mask=mask, scale=scale)

    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, core=ExactCore()).double()
    x = torch.randn(1, 6, 16, dtype=F64)
    cache = mha.new_cache()
    with torch.no_grad():
        steps = [mha(x[:, :3], mask=ak.causal(), cache=cache), mha(x[:, 3:], mask=ak.causal(), cache=cache)]
        torch.testing.assert_close(torch.cat(steps, 1), mha(x, mask=ak.causal()))
    assert len(cache) == 6


def test_replace_attention_with_a_core_instance_says_to_pass_a_factory():
    """replace_attention(model, LinearAttention()) (a natural first try) called the core's forward
    with the layer: 'LinearAttention.forward() missing 2 required positional arguments'."""
    from torch import nn

    from attnkit.approx import replace_attention
    from attnkit.nn import MultiHeadAttention

    model = nn.Sequential(MultiHeadAttention(16, 2))
    with pytest.raises(TypeError, match=r"make_core must be a function.*lambda layer: LinearAttention\(\.\.\.\)"):
        replace_attention(model, LinearAttention())
    assert model[0].core is None  # nothing changed
    assert replace_attention(model, lambda layer: LinearAttention()) == ["0"]
    assert isinstance(model[0].core, LinearAttention)


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True, None])
def test_linear_attention_core_refuses_a_bad_chunk_size_when_built(chunk_size):
    """Accepted at construction before the fix; a model then failed at its first causal call (or,
    with chunk_size=True, ran with chunks of 1 row). PerformerAttention already checked it."""
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        LinearAttention(chunk_size=chunk_size)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        PerformerAttention(8, chunk_size=chunk_size)


# -- owner's fixes of the review's open points A, B, C ------------------------------------------------

def test_nystrom_core_is_refused_on_cross_attention_and_self_attention_is_explicit():
    import attnkit as ak
    from attnkit.approx import NystromAttention, nystrom_attention
    from attnkit.nn import MultiHeadAttention
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 2, core=NystromAttention(num_landmarks=3))
    with pytest.raises(ValueError, match="cross-attention"):
        mha(torch.randn(1, 5, 16), torch.randn(1, 7, 16))
    q, k, v = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    pad = ak.key_padding(torch.tensor([6]))
    cross = nystrom_attention(q, k, v, num_landmarks=3, mask=pad, self_attention=False)
    longer = nystrom_attention(q, torch.cat([k, torch.randn(1, 2, 3, 4)], 2), torch.cat([v, torch.randn(1, 2, 3, 4)], 2),
                               num_landmarks=3, mask=pad)  # Nq != Nk: every query counts
    torch.testing.assert_close(cross, longer, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cross, nystrom_attention(q, k, v, num_landmarks=3, mask=pad))
    with pytest.raises(ValueError, match="Nq == Nk"):
        nystrom_attention(q[:, :, :5], k, v, num_landmarks=3, self_attention=True)


def test_more_landmarks_than_tokens_change_nothing():
    from attnkit.approx import nystrom_attention
    q, k, v = torch.randn(2, 2, 9, 4, dtype=torch.float64), torch.randn(2, 2, 9, 4, dtype=torch.float64), \
        torch.randn(2, 2, 9, 3, dtype=torch.float64)
    torch.testing.assert_close(nystrom_attention(q, k, v, num_landmarks=9),
                               nystrom_attention(q, k, v, num_landmarks=1000), rtol=1e-10, atol=1e-10)


def test_padded_cached_decoding_with_cores_on_some_layers_only_says_what_to_do():
    from attnkit.approx import LinearAttention, replace_attention
    from attnkit.nn import DecoderLM, FeedForward, MultiHeadAttention, PreNormBlock, RMSNorm, TokenEmbeddings
    torch.manual_seed(0)
    blocks = [PreNormBlock(MultiHeadAttention(16, 2), FeedForward(16, 32), RMSNorm(16), RMSNorm(16)) for _ in range(2)]
    lm = DecoderLM(TokenEmbeddings(20, 16), blocks, RMSNorm(16), torch.nn.Linear(16, 20)).eval()
    replace_attention(lm, lambda layer: LinearAttention() if layer is lm.blocks[0].attn else None)
    ids, am = torch.randint(0, 20, (2, 5)), torch.ones(2, 5, dtype=torch.bool)
    am[1, :2] = False
    with pytest.raises(ValueError, match="use_cache=False"):
        lm.generate(ids, 3, attention_mask=am)
    assert torch.equal(lm.generate(ids, 3), lm.generate(ids, 3, use_cache=False))  # unpadded: fine
