"""Models built from attnkit.nn: KV-cache decoding equals full recomputation, generation, encoder-decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import attnkit as ak
from attnkit import nn as aknn

E, H, V = 32, 4, 50


def close(got, want, tol=1e-5):
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * max(1.0, want.double().abs().max().item()), f"max error {err:.3g}"


def decoder(pos: str = "rope", window: int | None = None, impl: str = "auto", cross: bool = False,
            layers: int = 2) -> aknn.DecoderLM:
    torch.manual_seed(0)
    absolute = {"learned": aknn.LearnedPositionalEmbedding(128, E),
                "sinusoidal": aknn.SinusoidalPositionalEncoding(E)}.get(pos)

    def attn_pos():
        return {"rope": aknn.RotaryEmbedding(E // H), "alibi": aknn.ALiBi(H)}.get(pos)

    blocks = [aknn.PreNormBlock(aknn.MultiHeadAttention(E, H, num_kv_heads=2, positional=attn_pos(), impl=impl),
                                aknn.SwiGLU(E, 64), aknn.RMSNorm(E), aknn.RMSNorm(E),
                                cross_attn=aknn.MultiHeadAttention(E, H, impl=impl) if cross else None,
                                norm_cross=aknn.RMSNorm(E) if cross else None) for _ in range(layers)]
    mask = ak.causal() if window is None else ak.causal() & ak.sliding_window(window, 0)
    return aknn.DecoderLM(aknn.TokenEmbeddings(V, E, positional=absolute), blocks, aknn.RMSNorm(E),
                          nn.Linear(E, V, bias=False), mask=mask, cache_window=window).eval()


def stepwise(model, ids, first: int, cache=None, **kw):
    cache = model.new_cache() if cache is None else cache
    outs = [model(ids[:, :first], cache=cache, **kw)]
    for t in range(first, ids.shape[1]):
        outs.append(model(ids[:, t:t + 1], cache=cache, **kw))
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("pos", ["rope", "alibi", "learned", "sinusoidal"])
@pytest.mark.parametrize("impl", ["reference", "sdpa", "tiled", "auto"])
def test_kv_cache_equals_full_recomputation(pos, impl):
    if impl == "sdpa" and pos == "alibi":
        with pytest.raises(ValueError, match="structured"):  # explicit impls refuse, never fall back
            decoder(pos, impl=impl)(torch.zeros(1, 3, dtype=torch.long))
        return
    model = decoder(pos, impl=impl)
    ids = torch.randint(0, V, (2, 23))
    with torch.no_grad():
        full = model(ids)
        inc, cache = stepwise(model, ids, first=7)
    close(inc, full)
    assert len(cache[0].self_attn) == 23 and cache[0].self_attn.position == 23


@pytest.mark.parametrize("pos", ["rope", "alibi"])
@pytest.mark.parametrize("first", [1, 3, 12])  # prompt chunks shorter and longer than the window
def test_sliding_window_cache_is_bounded_and_exact(pos, first):
    W = 5
    model = decoder(pos, window=W)
    ids = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        full = model(ids)  # mask causal & sliding_window(W, 0) over the whole sequence
        inc, cache = stepwise(model, ids, first=first)
    close(inc, full)
    assert len(cache[0].self_attn) == W and cache[0].self_attn.position == 30
    assert cache[0].self_attn.dropped == 30 - W


def test_bounded_cache_refuses_a_mask_that_reaches_dropped_keys():
    model = decoder("rope")
    model.cache_window = 4  # causal() alone needs every earlier key
    ids = torch.randint(0, V, (1, 10))
    cache = model.new_cache()
    with torch.no_grad():
        model(ids[:, :6], cache=cache)
        with pytest.raises(ValueError, match="dropped"):
            model(ids[:, 6:7], cache=cache)


def test_cache_refuses_a_different_batch():
    cache = aknn.KVCache()
    cache.update(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8))
    with pytest.raises(ValueError, match="reset"):
        cache.update(torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8))
    cache.reset()
    assert len(cache) == 0 and cache.position == 0
    with pytest.raises(ValueError, match="window"):
        aknn.KVCache(window=0)


@pytest.mark.parametrize("pos,window", [("rope", None), ("alibi", None), ("learned", None), ("rope", 6)])
def test_greedy_generate_with_and_without_cache(pos, window):
    model = decoder(pos, window=window)
    prompt = torch.randint(0, V, (3, 5))
    with_cache = model.generate(prompt, 15)
    without = model.generate(prompt, 15, use_cache=False)
    assert with_cache.shape == (3, 20) and torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)


def test_sampling_is_reproducible_and_respects_top_k():
    model = decoder("rope")
    prompt = torch.randint(0, V, (2, 4))
    a = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 10, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(model.generate(prompt, 10, temperature=0.7, top_k=1), model.generate(prompt, 10))
    with torch.no_grad():
        logits = model(a[:, :-1])[:, 3:]  # (B, 10, V): the logits each sampled token was drawn from
    top5 = logits.topk(5, dim=-1).indices
    assert (top5 == a[:, 4:, None]).any(-1).all(), "a sampled token lies outside the top 5"
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 2, temperature=-1.0)


def test_eos_stops_and_pads():
    model = decoder("rope")
    prompt = torch.randint(0, V, (2, 4))
    greedy = model.generate(prompt, 8)
    eos = int(greedy[0, 5])  # the second token sample 0 generates
    out = model.generate(prompt, 8, eos_token_id=eos)
    first = int((greedy[0, 4:] == eos).nonzero()[0])
    assert torch.equal(out[0, : 4 + first + 1], greedy[0, : 4 + first + 1])
    assert (out[0, 4 + first:] == eos).all()


def encoder_decoder(impl="auto") -> aknn.EncoderDecoder:
    torch.manual_seed(1)
    enc_blocks = [aknn.PostNormBlock(aknn.MultiHeadAttention(E, H, impl=impl), aknn.FeedForward(E, 64),
                                     nn.LayerNorm(E), nn.LayerNorm(E)) for _ in range(2)]
    encoder = aknn.Encoder(aknn.TokenEmbeddings(V, E, positional=aknn.SinusoidalPositionalEncoding(E)), enc_blocks)
    return aknn.EncoderDecoder(encoder, decoder("rope", impl=impl, cross=True)).eval()


@pytest.mark.parametrize("impl", ["reference", "tiled", "auto"])
def test_encoder_decoder_cache_and_padding(impl):
    model = encoder_decoder(impl)
    src = torch.randint(1, V, (2, 9))
    src_mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    tgt = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        full = model(src, tgt, src_mask)
        memory = model.encoder(src, src_mask)
        inc, cache = stepwise(model.decoder, tgt, first=2, memory=memory,
                              memory_mask=ak.key_padding(src_mask.bool()))
        # padding in the source must not matter: change the padded tokens
        src2 = src.clone()
        src2[1, 6:] = (src2[1, 6:] + 7) % V
        full2 = model(src2, tgt, src_mask)
    close(inc, full)
    close(full2[1], full[1])
    assert cache[0].cross_attn.k.shape == (2, H, 9, E // H)  # the memory was projected once and kept


def test_encoder_decoder_generate_with_and_without_cache():
    model = encoder_decoder()
    src = torch.randint(1, V, (2, 7))
    start = torch.zeros(2, 1, dtype=torch.long)
    a = model.generate(src, start, 10)
    b = model.generate(src, start, 10, use_cache=False)
    assert a.shape == (2, 11) and torch.equal(a, b)


def test_encoder_return_all_and_padding_mask_errors():
    model = encoder_decoder().encoder
    ids = torch.randint(0, V, (2, 6))
    states = model(ids, return_all=True)
    assert len(states) == 3 and torch.equal(states[-1], model(ids))
    with pytest.raises(ValueError, match=r"expected \(B, N\)"):
        model(ids, torch.ones(2, 5))
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.full((1, 3), V))


def test_cache_with_gradients_backpropagates_through_steps():
    """Training through a cache (keys that need grad) must not trip autograd's in-place checks."""
    model = decoder("rope").train()
    ids = torch.randint(0, V, (2, 9))
    inc, _ = stepwise(model, ids, first=4)
    inc.sum().backward()
    grad = model.embeddings.tokens.weight.grad
    model.zero_grad()
    model(ids).sum().backward()
    close(grad, model.embeddings.tokens.weight.grad)


def test_unbounded_cache_grows_in_place():
    cache = aknn.KVCache()
    with torch.no_grad():  # inference: the preallocated buffer (with autograd on, torch.cat)
        for step in range(40):
            k, v = cache.update(torch.full((1, 2, 1, 4), float(step)), torch.full((1, 2, 1, 4), -float(step)))
    assert len(cache) == 40 and torch.equal(k[0, 0, :, 0], torch.arange(40.0)) and torch.equal(v, -k)
    assert cache._k_buf.shape[2] >= 40


def _left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):], mask[b, P - len(p):] = p, 1
    return ids, mask


@pytest.mark.parametrize("pos,window", [("rope", None), ("alibi", None), ("learned", None), ("sinusoidal", None),
                                        ("rope", 4)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_generates_like_each_prompt_alone(pos, window, use_cache):
    model = decoder(pos, window=window)
    torch.manual_seed(11)
    prompts = [torch.randint(1, V, (n,)) for n in (7, 3, 5)]
    ids, mask = _left_pad(prompts)
    batched = model.generate(ids, 9, attention_mask=mask, use_cache=use_cache)
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], 9)
        assert torch.equal(batched[b, ids.shape[1]:], alone[0, len(p):]), f"sample {b} differs"


def test_left_padded_logits_equal_unpadded_logits():
    model = decoder("rope")
    p = torch.randint(1, V, (1, 6))
    ids, mask = _left_pad([p[0], torch.randint(1, V, (9,))])
    with torch.no_grad():
        close(model(ids, mask)[0, 3:], model(p)[0])
    with pytest.raises(ValueError, match=r"expected \(B, L \+ N\)"):
        model(ids, mask[:, 1:])


def test_memory_cache_refuses_another_memory():
    mha = aknn.MultiHeadAttention(E, H).eval()
    x, m1, m2 = torch.randn(1, 2, E), torch.randn(1, 5, E), torch.randn(1, 5, E)
    cache = aknn.MemoryKVCache()
    with torch.no_grad():
        first = mha(x, m1, cache=cache)
        close(mha(x, m1, cache=cache), first)
        with pytest.raises(ValueError, match="another memory"):
            mha(x, m2, cache=cache)
        cache.reset()
        close(mha(x, m2, cache=cache), mha(x, m2))


def test_bounded_cache_with_a_document_mask_and_refused_global_tokens():
    """Data-dependent parts narrow a window (allowed); global tokens reach every key (refused)."""
    mha = aknn.MultiHeadAttention(E, H, positional=aknn.RotaryEmbedding(E // H)).eval()
    x = torch.randn(1, 8, E)
    doc = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    window = ak.causal() & ak.sliding_window(2, 0)
    with torch.no_grad():
        full = mha(x, mask=window & ak.document(doc))
        cache = aknn.KVCache(window=3)
        outs = [mha(x[:, :6], mask=window & ak.document(doc[:6]), cache=cache)]
        for t in range(6, 8):  # the cache holds the last 3 keys, the document ids follow them
            outs.append(mha(x[:, t:t + 1], mask=window & ak.document(doc[t - 3:t + 1]), cache=cache))
        close(torch.cat(outs, 1), full)
        with pytest.raises(ValueError, match="no such limit"):
            mha(x[:, :1], mask=window | ak.global_tokens([0]), cache=cache)


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_kv_heads must be an int >= 1"):
        aknn.MultiHeadAttention(32, 4, num_kv_heads=0)
    with pytest.raises(ValueError, match="dropout"):
        aknn.MultiHeadAttention(32, 4, dropout=1.0)
    with pytest.raises(ValueError, match="head_dim=16"):
        aknn.MultiHeadAttention(32, 4, positional=aknn.RotaryEmbedding(16))
    with pytest.raises(ValueError, match="num_heads=8"):
        aknn.MultiHeadAttention(32, 4, positional=aknn.ALiBi(8))


# -- issue 13: prompts padded on any side, max_new_tokens, the encoder's mask ----------------------

def _pad(prompts: list[torch.Tensor], layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch prompts with padding (id 0) on the left, on the right, between tokens, or one row each."""
    P = max(len(p) for p in prompts) + 2
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        side = layout if layout != "mixed" else ("left", "right", "inner")[b % 3]
        if side == "left":
            cols = torch.arange(P - len(p), P)
        elif side == "right":
            cols = torch.arange(len(p))
        else:  # inner: one pad column after the first token, the rest at the end
            cols = torch.cat([torch.tensor([0]), torch.arange(2, len(p) + 1)])
        ids[b, cols], mask[b, cols] = p, 1
    return ids, mask


@pytest.mark.parametrize("layout", ["left", "right", "inner", "mixed"])
@pytest.mark.parametrize("pos,window", [("rope", None), ("alibi", None), ("learned", None), ("rope", 4)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_padded_prompts_continue_like_each_prompt_alone(layout, pos, window, use_cache):
    """Each row continues from its true last token, wherever the padding sits; the prompt part of
    the output is the input as given."""
    model = decoder(pos, window=window)
    torch.manual_seed(12)
    prompts = [torch.randint(1, V, (n,)) for n in (7, 3, 5)]
    ids, mask = _pad(prompts, layout)
    out = model.generate(ids, 6, attention_mask=mask, use_cache=use_cache)
    assert out.shape == (3, ids.shape[1] + 6) and torch.equal(out[:, :ids.shape[1]], ids)
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], 6)
        assert torch.equal(out[b, ids.shape[1]:], alone[0, len(p):]), f"{layout}: sample {b} differs"


def test_right_padded_prompts_with_eos_and_sampling():
    model = decoder("rope")
    torch.manual_seed(13)
    prompts = [torch.randint(1, V, (n,)) for n in (4, 6)]
    ids, mask = _pad(prompts, "right")
    left, left_mask = _pad(prompts, "left")
    for kw in ({"temperature": 0.9, "top_k": 5}, {"eos_token_id": int(model.generate(prompts[0][None], 3)[0, -1])}):
        got = model.generate(ids, 5, attention_mask=mask, generator=torch.Generator().manual_seed(3), **kw)
        want = model.generate(left, 5, attention_mask=left_mask, generator=torch.Generator().manual_seed(3), **kw)
        assert torch.equal(got[:, ids.shape[1]:], want[:, left.shape[1]:]), kw


@pytest.mark.parametrize("bad", [-1, -5, 2.5, 3.0, "3", None, True, torch.tensor(2.0)])
def test_max_new_tokens_must_be_a_nonnegative_int(bad):
    model, seq2seq = decoder("rope"), encoder_decoder()
    prompt = torch.randint(0, V, (2, 4))
    start = torch.zeros(2, 1, dtype=torch.long)
    calls = {"DecoderLM.generate": lambda: model.generate(prompt, bad),
             "left-padded": lambda: model.generate(prompt, bad, attention_mask=torch.ones(2, 4)),
             "EncoderDecoder.generate": lambda: seq2seq.generate(prompt, start, bad),
             "generate_tokens": lambda: aknn.generate_tokens(lambda ids, c: model(ids), list, prompt, bad)}
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"max_new_tokens must be an int >= 0 .*got"):
            call()
            pytest.fail(f"{name} accepted max_new_tokens={bad!r}")


@pytest.mark.parametrize("count", [0, 2, np.int64(2), torch.tensor(2)])
def test_max_new_tokens_accepts_integers_and_zero_returns_the_prompt(count):
    model = decoder("rope")
    prompt = torch.randint(0, V, (2, 4))
    out = model.generate(prompt, count)
    assert out.shape == (2, 4 + int(count)) and torch.equal(out[:, :4], prompt)


@pytest.mark.parametrize("mask,match", [(torch.ones(2, 3), r"expected \(B, N\) = \(2, 4\)"),
                                        (torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]), r"rows \[1\] hold no real token")])
def test_generate_refuses_masks_that_do_not_fit(mask, match):
    with pytest.raises(ValueError, match=match):
        decoder("rope").generate(torch.randint(1, V, (2, 4)), 2, attention_mask=mask)


def _dense(kind: str, N: int) -> torch.Tensor:
    """The encoder masks of the table below, written with torch ops: (N, N) bool, True = may attend."""
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    return {"window": (i - j).abs() <= 2, "causal": j <= i,
            "window|global": ((i - j).abs() <= 1) | (i == 0) | (j == 0)}[kind]


ENCODER_MASKS = {"window": ak.sliding_window(2), "causal": ak.causal(),
                 "window|global": ak.sliding_window(1) | ak.global_tokens([0])}


@pytest.mark.parametrize("kind", list(ENCODER_MASKS))
@pytest.mark.parametrize("padded", [False, True])
def test_encoder_mask_combines_with_padding_like_the_dense_computation(kind, padded):
    """Encoder(mask=...) & attention_mask equals the blocks run by hand on a dense bool mask."""
    base = encoder_decoder().encoder
    model = aknn.Encoder(base.embeddings, list(base.blocks), base.norm, mask=ENCODER_MASKS[kind]).eval()
    B, N = 2, 9
    ids = torch.randint(1, V, (B, N))
    lengths = torch.tensor([N, 6 if padded else N])
    valid = torch.arange(N)[None, :] < lengths[:, None]  # (B, N)
    dense = _dense(kind, N)[None, None] & valid[:, None, None, :]  # (B, 1, N, N)
    with torch.no_grad():
        got = model(ids, valid.long())
        x = base.embeddings(ids)
        for block in base.blocks:
            x = block(x, aknn.Context(mask=dense))
        unmasked = base(ids, valid.long())
    close(got, x)
    assert (got - unmasked).abs().max() > 1e-3, "the mask changed nothing"


@pytest.mark.parametrize("build", [
    lambda: aknn.Encoder(aknn.TokenEmbeddings(V, E), [], mask="causal"),
    lambda: aknn.Encoder(aknn.TokenEmbeddings(V, E), [], mask=torch.ones(4, 4, dtype=torch.bool)),
    lambda: aknn.DecoderLM(aknn.TokenEmbeddings(V, E), [], None, nn.Linear(E, V), mask=None),
    lambda: aknn.DecoderLM(aknn.TokenEmbeddings(V, E), [], None, nn.Linear(E, V), mask="causal"),
])
def test_model_masks_must_be_attnkit_masks(build):
    with pytest.raises(TypeError, match=r"mask must be an attnkit Mask.*got"):
        build()
