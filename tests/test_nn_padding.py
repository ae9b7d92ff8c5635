"""Padded batches in the models (issue 13): every padded row equals that row run alone, or the call is
refused with the reason; attention masks hold only 0 and 1; a learned position table too short for
generation is reported before anything is generated.

The tables cross padding layouts (left, right, between tokens, a mix) with positional encodings
(RoPE, ALiBi, learned, sinusoidal) and masks, for every path that takes an attention mask:
``Encoder``, ``DecoderLM`` with and without a KV cache, ``generate``, ``EncoderDecoder``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnkit as ak
from attnkit import nn as aknn

E, H, V = 32, 4, 50
POSITIONS = ["rope", "alibi", "learned", "sinusoidal"]
# The model's own mask. "global" picks tokens by absolute index (each row's first real token is global).
DECODER_MASKS = {"causal": lambda: ak.causal(),
                 "window": lambda: ak.causal() & ak.sliding_window(2, 0),
                 "global": lambda: ak.causal() & (ak.sliding_window(1, 0) | ak.global_tokens([0]))}
ENCODER_MASKS = {"none": lambda: None, "window": lambda: ak.sliding_window(1),
                 "global": lambda: ak.sliding_window(1) | ak.global_tokens([0])}
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [21, 22, 23, 24]]


def _parts(pos: str):
    absolute = {"learned": aknn.LearnedPositionalEmbedding(64, E), "sinusoidal": aknn.SinusoidalPositionalEncoding(E)}
    relative = {"rope": aknn.RotaryEmbedding(E // H), "alibi": aknn.ALiBi(H)}
    return aknn.TokenEmbeddings(V, E, positional=absolute.get(pos)), lambda: relative.get(pos)


def decoder(pos: str, mask: str, memory_dim: bool = False) -> aknn.DecoderLM:
    torch.manual_seed(0)
    emb, attn_pos = _parts(pos)
    blocks = [aknn.PreNormBlock(aknn.MultiHeadAttention(E, H, num_kv_heads=2, positional=attn_pos()),
                                aknn.SwiGLU(E, 64), aknn.RMSNorm(E), aknn.RMSNorm(E),
                                cross_attn=aknn.MultiHeadAttention(E, H) if memory_dim else None,
                                norm_cross=aknn.RMSNorm(E) if memory_dim else None) for _ in range(2)]
    for p in blocks[0].parameters():  # larger weights: positions and distances matter visibly
        nn.init.normal_(p, std=0.2) if p.dim() > 1 else None
    return aknn.DecoderLM(emb, blocks, aknn.RMSNorm(E), nn.Linear(E, V), mask=DECODER_MASKS[mask]()).eval()


def encoder(pos: str, mask: str) -> aknn.Encoder:
    torch.manual_seed(0)
    emb, attn_pos = _parts(pos)
    blocks = [aknn.PostNormBlock(aknn.MultiHeadAttention(E, H, positional=attn_pos()), aknn.FeedForward(E, 64),
                                 nn.LayerNorm(E), nn.LayerNorm(E)) for _ in range(2)]
    return aknn.Encoder(emb, blocks, mask=ENCODER_MASKS[mask]()).eval()


def pad(layout: str, prompts=PROMPTS, extra: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded (id 3) on the left, on the right, between tokens (two gaps), or one of each."""
    P = max(map(len, prompts)) + extra
    ids = torch.full((len(prompts), P), 3, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        side = layout if layout != "mixed" else ("left", "right", "inner")[b % 3]
        n = len(p)
        cols = {"left": list(range(P - n, P)), "right": list(range(n)),
                "inner": [0] + list(range(2, n)) + [P - 1]}[side]  # a gap after the first token, one before the last
        ids[b, cols], mask[b, cols] = torch.tensor(p), 1
    return ids, mask


def assert_rows_alone(got: torch.Tensor, mask: torch.Tensor, alone: list[torch.Tensor], what: str) -> None:
    """got (B, N, ...) on the real tokens of each row == that row run alone (1, n, ...)."""
    for b, want in enumerate(alone):
        err = (got[b][mask[b].bool()] - want[0]).abs().max().item()
        assert err < 1e-5, f"{what}: row {b} differs from the row alone by {err:.2e}"


LAYOUTS = ["left", "right", "inner", "mixed"]


# -- 1. padded rows equal rows alone ---------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask", list(DECODER_MASKS))
@pytest.mark.parametrize("pos", POSITIONS)
def test_decoder_forward_padded_rows_equal_rows_alone(pos, mask, layout):
    model = decoder(pos, mask)
    ids, am = pad(layout)
    with torch.no_grad():
        got = model(ids, am)
        alone = [model(torch.tensor([p])) for p in PROMPTS]
    assert_rows_alone(got, am, alone, f"DecoderLM {pos} {mask} {layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask", list(ENCODER_MASKS))
@pytest.mark.parametrize("pos", POSITIONS)
def test_encoder_padded_rows_equal_rows_alone(pos, mask, layout):
    model = encoder(pos, mask)
    ids, am = pad(layout)
    with torch.no_grad():
        got = model(ids, am, return_all=True)
        alone = [model(torch.tensor([p]), return_all=True) for p in PROMPTS]
    for i, state in enumerate(got):
        assert_rows_alone(state, am, [a[i] for a in alone], f"Encoder {pos} {mask} {layout} state {i}")


def _cached_expectation(pos: str, mask: str, layout: str) -> str | None:
    """What a KV cache can do with this padding (None = exact), written from the rule: cached keys keep
    their indices, so padding between real tokens is fine only when attention asks 'before or after'
    (causal, no ALiBi, no window); left padding is fine unless the mask picks absolute indices."""
    between = layout in ("right", "inner", "mixed")  # right: the tokens decoded after the padding
    if between and (pos == "alibi" or mask != "causal"):
        return "padding between real tokens"
    if layout == "left" and mask == "global":  # global_tokens([0]) would point at padding
        return "start with padding"
    return None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask", list(DECODER_MASKS))
@pytest.mark.parametrize("pos", POSITIONS)
def test_cached_decoding_of_padded_rows_is_exact_or_refused(pos, mask, layout):
    """Prefill the padded prompts into a KV cache, then feed 3 more tokens one at a time: each row's
    logits equal the row alone (prompt + the same tokens), or the call is refused, with the reason."""
    model = decoder(pos, mask)
    ids, am = pad(layout)
    more = torch.tensor([[31, 32, 33]] * len(PROMPTS))
    expected = _cached_expectation(pos, mask, layout)
    cache = model.new_cache()
    full_mask = torch.cat([am, torch.ones_like(more)], 1)
    with torch.no_grad():
        try:
            outs = [model(ids, am, cache=cache)]
            for t in range(more.shape[1]):
                outs.append(model(more[:, t:t + 1], full_mask[:, :ids.shape[1] + t + 1], cache=cache))
        except ValueError as e:
            assert expected is not None, f"refused a layout it can run: {e}"
            assert expected is not None and expected in str(e), f"refused for another reason: {e}"
            assert "attention_mask rows" in str(e) and "without cache=" in str(e), str(e)
            return
        assert expected is None, f"ran a layout it cannot place ({expected}) without refusing"
        got = torch.cat(outs, 1)
        alone = [model(torch.cat([torch.tensor([p]), more[:1]], 1)) for p in PROMPTS]
    assert_rows_alone(got, full_mask, alone, f"cached {pos} {mask} {layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mask", list(DECODER_MASKS))
@pytest.mark.parametrize("pos", POSITIONS)
def test_generate_continues_padded_rows_like_rows_alone(pos, mask, layout):
    """Without a cache always; with one, exactly or refused (generate compacts to the left, so only a
    mask that picks absolute indices is refused)."""
    model = decoder(pos, mask)
    ids, am = pad(layout)
    alone = [model.generate(torch.tensor([p]), 4, use_cache=False)[0, len(p):] for p in PROMPTS]
    for use_cache in (False, True):
        try:
            out = model.generate(ids, 4, attention_mask=am, use_cache=use_cache)
        except ValueError as e:
            assert use_cache and mask == "global" and "use_cache=False" in str(e), str(e)
            continue
        assert not (use_cache and mask == "global"), "a cache with a mask on absolute indices was not refused"
        for b, want in enumerate(alone):
            assert torch.equal(out[b, ids.shape[1]:], want), f"{pos} {mask} {layout} cache={use_cache}: row {b}"


def test_decoder_reorders_a_per_query_memory_mask_with_its_queries():
    """Cross-attention masks over (N, S) that differ per query follow their queries when the rows are
    reordered internally (between-token padding, no cache)."""
    model = decoder("alibi", "window", memory_dim=True)
    torch.manual_seed(5)
    S = 6
    memory = torch.randn(len(PROMPTS), S, E)
    ids, am = pad("inner")
    N = ids.shape[1]
    per_query = torch.rand(len(PROMPTS), 1, N, S) > 0.4
    per_query[..., 0] = True  # every query sees some key
    with torch.no_grad():
        got = model(ids, am, memory=memory, memory_mask=per_query)
        alone = [model(torch.tensor([p]), memory=memory[b:b + 1], memory_mask=per_query[b:b + 1, :, am[b].bool()])
                 for b, p in enumerate(PROMPTS)]
    assert_rows_alone(got, am, alone, "cross-attention per-query mask")


# -- 2. attention masks hold only 0 and 1 -------------------------------------------------------------

def _paths(bad_or_good: torch.Tensor):
    """Every call that takes an attention mask, given a (B, N) = (2, 4) mask built from the values."""
    dec, enc = decoder("rope", "causal"), encoder("rope", "none")
    seq2seq = aknn.EncoderDecoder(enc, decoder("rope", "causal", memory_dim=True)).eval()
    ids = torch.randint(1, V, (2, 4), generator=torch.Generator().manual_seed(7))
    start = torch.zeros(2, 1, dtype=torch.long)
    m = bad_or_good

    def cached():
        cache = dec.new_cache()
        dec(ids, torch.ones(2, 4), cache=cache)
        return dec(ids[:, :1], torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1), cache=cache)

    return {"Encoder": lambda: enc(ids, m), "DecoderLM": lambda: dec(ids, m),
            "DecoderLM+cache": lambda: (dec(ids, m, cache=dec.new_cache()), cached()),
            "DecoderLM.generate": lambda: dec.generate(ids, 2, attention_mask=m),
            "EncoderDecoder": lambda: seq2seq(ids, start, m),
            "EncoderDecoder.generate": lambda: seq2seq.generate(ids, start, 2, source_mask=m)}


@pytest.mark.parametrize("values", [[[1, 2, 1, 1], [1, 1, 1, 1]], [[0.5, 1.0, 1.0, 1.0], [1, 1, 1, 1]],
                                    [[1, 1, 1, 1], [-1, 1, 1, 1]], [[1, 1, float("nan"), 1], [1, 1, 1, 1]]],
                         ids=["two", "half", "minus-one", "nan"])
def test_attention_masks_other_than_0_and_1_are_refused_on_every_path(values):
    mask = torch.tensor(values)
    for name, call in _paths(mask).items():
        with pytest.raises(ValueError, match=r"mask holds .* expected only 0 \(padding\) and 1 \(real token\)"):
            call()
            pytest.fail(f"{name} accepted an attention mask holding {values}")


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int32, torch.uint8, torch.float32, torch.float16])
def test_attention_masks_of_0_and_1_in_any_dtype_are_accepted_alike(dtype):
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    want = {name: call() for name, call in _paths(mask.bool()).items()}
    for name, call in _paths(mask.to(dtype)).items():
        got = call()
        a, b = (got[-1], want[name][-1]) if isinstance(got, tuple) else (got, want[name])
        assert torch.equal(a, b), f"{name}: a {dtype} mask gives another result than the bool mask"


# -- 3. a learned position table too short for generation ---------------------------------------------

def test_generate_checks_a_learned_table_before_generating():
    torch.manual_seed(0)
    emb = aknn.TokenEmbeddings(V, E, positional=aknn.LearnedPositionalEmbedding(16, E))
    model = aknn.DecoderLM(emb, [aknn.PreNormBlock(aknn.MultiHeadAttention(E, H), aknn.SwiGLU(E, 64),
                                                   aknn.RMSNorm(E), aknn.RMSNorm(E))],
                           aknn.RMSNorm(E), nn.Linear(E, V)).eval()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    prompt = torch.randint(1, V, (2, 10))
    # 10 prompt tokens + 7 new ones feed 16 tokens (the last new one is not fed back): fits exactly
    assert model.generate(prompt, 7).shape == (2, 17)
    # left padding: positions count real tokens, so 10 real tokens in a row of 13 fit alike
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), prompt], 1)
    am = torch.cat([torch.zeros(2, 3), torch.ones(2, 10)], 1)
    assert model.generate(padded, 7, attention_mask=am).shape == (2, 20)
    calls.clear()
    for call in (lambda: model.generate(prompt, 8), lambda: model.generate(padded, 8, attention_mask=am),
                 lambda: model.generate(prompt, 8, use_cache=False)):
        with pytest.raises(ValueError, match=r"10 real tokens .* max_new_tokens=8 need positions 0\.\.16 .* "
                                             r"has 16 rows .* at most 7 new tokens"):
            call()
    assert not calls, "the model ran before the table was found too short"
    with pytest.raises(ValueError, match="the prompt alone is too long: shorten it to at most 16 tokens"):
        model.generate(torch.randint(1, V, (1, 17)), 1)
    assert model.generate(torch.randint(1, V, (1, 17)), 0).shape == (1, 17)  # nothing fed: nothing to check


def test_encoder_decoder_generate_checks_the_decoders_table_before_generating():
    torch.manual_seed(0)
    dec = decoder("rope", "causal", memory_dim=True)
    dec.embeddings = aknn.TokenEmbeddings(V, E, positional=aknn.LearnedPositionalEmbedding(8, E))
    seq2seq = aknn.EncoderDecoder(encoder("rope", "none"), dec).eval()
    calls = []
    seq2seq.register_forward_hook(lambda *_: calls.append(1))
    src, start = torch.randint(1, V, (2, 5)), torch.zeros(2, 2, dtype=torch.long)
    assert seq2seq.generate(src, start, 7).shape == (2, 9)
    calls.clear()
    with pytest.raises(ValueError, match=r"EncoderDecoder.generate: .* max_new_tokens=8 need positions 0\.\.8"):
        seq2seq.generate(src, start, 8)
    assert not calls


@pytest.mark.parametrize("layout", LAYOUTS)
def test_padding_reaches_attention_as_lengths(layout, monkeypatch):
    """After the real tokens are moved first, DecoderLM and Encoder give ak.attention the padding as
    key_padding(lengths): the Triton kernels read lengths per call, so a new padding pattern every
    batch costs no new block plan (a bool (B, N) mask would)."""
    from attnkit.nn import attention as nn_attention
    from attnkit.ops.block_plan import split_key_lengths
    seen = []
    real = nn_attention.attention

    def spy(q, k, v, *, mask=None, **kw):
        seen.append(mask)
        return real(q, k, v, mask=mask, **kw)
    monkeypatch.setattr(nn_attention, "attention", spy)
    ids, mask = pad(layout)
    for model in (decoder("rope", next(iter(DECODER_MASKS))), encoder("learned", next(iter(ENCODER_MASKS)))):
        seen.clear()
        with torch.no_grad():
            model(ids, attention_mask=mask)
        assert seen and all(split_key_lengths(m)[1] is not None for m in seen), [repr(m) for m in seen]
        lengths = split_key_lengths(seen[0])[1]
        assert lengths.tolist() == mask.sum(-1).tolist()
