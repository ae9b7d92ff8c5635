"""attn_implementation="attnkit" inside transformers models, against their own eager attention.

Random tiny configs (no downloads), fp32, eval. Every model gets its OWN config object:
transformers' ``_from_config`` writes ``_attn_implementation`` onto the config it is given, so two
models built from one config object would both run the last implementation chosen, and a
comparison between them could never fail.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
akt = pytest.importorskip("attnkit.integrations.transformers")

from attnkit.integrations.transformers import _masks  # noqa: E402

V = 101
TOL = 1e-5  # relative, fp32


def _decoder_kwargs(**extra):
    return dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, **extra)


def _llama3_rope():
    return {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


DECODERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", lambda: _decoder_kwargs()),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", lambda: _decoder_kwargs(rope_parameters=_llama3_rope())),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", lambda: _decoder_kwargs(sliding_window=5)),
    "qwen2-window-layers": ("Qwen2Config", "Qwen2ForCausalLM", lambda: _decoder_kwargs(
        use_sliding_window=True, sliding_window=4, max_window_layers=1,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"])),
    "gemma2-softcap": ("Gemma2Config", "Gemma2ForCausalLM", lambda: _decoder_kwargs(
        head_dim=16, sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
        query_pre_attn_scalar=16)),
}
ENCODERS = {
    "bert": ("BertConfig", "BertModel"),
    "roberta": ("RobertaConfig", "RobertaModel"),
}


def _pair(config_name: str, model_name: str, make_kwargs, seed: int = 0):
    """(eager, attnkit) models with the same weights, each built from its own config object."""
    cfg_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    torch.manual_seed(seed)
    eager = model_cls._from_config(cfg_cls(**make_kwargs()), attn_implementation="eager").eval()
    ours = model_cls._from_config(cfg_cls(**make_kwargs()), attn_implementation="attnkit").eval()
    ours.load_state_dict(eager.state_dict())
    assert eager.config is not ours.config and ours.config._attn_implementation == "attnkit"
    return eager, ours


def _batch(B: int = 3, N: int = 13, seed: int = 1):
    """ids and a padding mask: row 0 left-padded, row 1 right-padded, row 2 full."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, N), generator=g)
    am = torch.ones(B, N, dtype=torch.long)
    am[0, :4] = 0
    am[1, N - 5:] = 0
    return ids, am


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_logits_and_gradients_match_eager(name):
    eager, ours = _pair(*DECODERS[name])
    ids, am = _batch()
    valid = am.bool()
    outs = []
    for model in (eager, ours):
        model.zero_grad()
        logits = model(ids, attention_mask=am).logits
        (logits[valid] ** 2).mean().backward()  # padded positions carry no meaning: left out
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (le, ge), (lo, go) = outs
    assert _rel(lo[valid], le[valid]) < TOL
    assert ge.keys() == go.keys()
    for n in ge:
        assert _rel(go[n], ge[n]) < 1e-4, n


@pytest.mark.parametrize("name", list(DECODERS))
def test_greedy_generate_gives_the_same_tokens(name):
    eager, ours = _pair(*DECODERS[name])
    ids, am = _batch(B=2, N=9)
    am[1] = 1  # generation pads on the left
    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(eager.generate(ids, **kw), ours.generate(ids, **kw))


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_hidden_states_and_gradients_match_eager(name):
    kwargs = lambda: dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,  # noqa: E731
                          num_attention_heads=4, max_position_embeddings=64)
    eager, ours = _pair(*ENCODERS[name], kwargs)
    ids, am = _batch()
    am[0] = 1  # encoders pad on the right
    valid = am.bool()
    res = []
    probe = torch.randn(64, generator=torch.Generator().manual_seed(2))  # (h**2).mean() is flat after LayerNorm
    for model in (eager, ours):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        h = model(inputs_embeds=emb, attention_mask=am).last_hidden_state
        (h[valid] @ probe).square().mean().backward()
        res.append((h.detach(), emb.grad))
    assert _rel(res[1][0][valid], res[0][0][valid]) < TOL
    assert _rel(res[1][1], res[0][1]) < 1e-4


def test_padding_and_window_are_not_dropped():
    """The comparison above can fail: the same model run without the padding mask, or with the
    sliding window removed, is far off at valid positions."""
    eager, ours = _pair(*DECODERS["mistral-window"])
    ids, am = _batch()
    valid = am.bool()
    ref = eager(ids, attention_mask=am).logits
    assert _rel(ours(ids, attention_mask=am).logits[valid], ref[valid]) < TOL
    assert _rel(ours(ids).logits[valid], ref[valid]) > 1e-2  # padding dropped
    ours.config.sliding_window = None  # the window dropped
    for layer in ours.model.layers:
        layer.self_attn.sliding_window = None
    assert _rel(ours(ids, attention_mask=am).logits[valid], ref[valid]) > 1e-2


def test_masks_are_translated_structurally():
    eager, ours = _pair(*DECODERS["qwen2-window-layers"])
    ids, am = _batch()
    layers = akt.explain_model(ours, ids, attention_mask=am)
    assert [e.name for e in layers] == [f"model.layers.{i}.self_attn" for i in range(3)]
    assert all("structural" in e.mask for e in layers)
    assert "causal()" in layers[0].mask and "sliding_window(3, 0)" in layers[1].mask
    assert all("key_padding" in e.mask for e in layers)
    print(layers[1])


def test_packed_sequences_become_documents():
    """position_ids that restart mark packed sequences: transformers masks across them, and so do we,
    as ak.document."""
    eager, ours = _pair(*DECODERS["llama"])
    ids = torch.randint(3, V, (1, 12))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    ref = eager(ids, position_ids=pos, use_cache=False).logits  # transformers detects packing without a cache
    assert _rel(ours(ids, position_ids=pos, use_cache=False).logits, ref) < TOL
    layers = akt.explain_model(ours, ids, position_ids=pos, use_cache=False)
    assert "document" in layers[0].mask and "structural" in layers[0].mask
    apart = torch.cat([eager(ids[:, a:b]).logits for a, b in ((0, 5), (5, 8), (8, 12))], 1)
    assert _rel(ref, apart) < TOL  # what packing means: the sequences do not see each other


def test_unknown_mask_functions_become_exact_dense_masks():
    """A mask function attnkit has no structure for (a chunked overlay, a user's function) is
    materialized by transformers' own sdpa_mask: exact, never dropped."""
    mu = transformers.masking_utils
    custom = mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: (q - kv) % 3 != 1)
    am = torch.ones(2, 10, dtype=torch.bool)
    am[0, :3] = False
    t = _masks.translate(2, 10, 10, 0, 0, custom, am)
    assert t.how.startswith("dense")
    want = mu.sdpa_mask(batch_size=2, q_length=10, kv_length=10, mask_function=custom, attention_mask=am,
                        allow_is_causal_skip=False)
    assert torch.equal(t.mask.materialize(10, 10).expand(2, 1, 10, 10), want.expand(2, 1, 10, 10))


@pytest.mark.parametrize("case", [
    ("causal", lambda mu: mu.causal_mask_function, 0, 0),
    ("causal, cache", lambda mu: mu.causal_mask_function, 7, 0),
    ("window", lambda mu: mu.sliding_window_causal_mask_function(4), 0, 0),
    ("window, cache", lambda mu: mu.sliding_window_causal_mask_function(4), 7, 0),
    ("window, offset kv", lambda mu: mu.sliding_window_causal_mask_function(4), 7, 3),
    ("bidirectional", lambda mu: mu.bidirectional_mask_function, 0, 0),
    ("bidirectional window", lambda mu: mu.sliding_window_bidirectional_mask_function(2), 0, 0),
    ("chunked", lambda mu: mu.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long)), 0, 0),
])
def test_translation_equals_transformers_dense_mask(case):
    """Each translation (structural or dense) materializes to exactly transformers' sdpa_mask,
    with left and right padding, with and without a cache offset."""
    _, make, q_offset, kv_offset = case
    mu = transformers.masking_utils
    fn = make(mu)
    Nq = 5 if q_offset else 10
    Nk = q_offset + Nq - kv_offset
    am = torch.ones(2, q_offset + Nq, dtype=torch.bool)
    am[0, :2] = False
    am[1, -1] = False
    t = _masks.translate(2, Nq, Nk, q_offset, kv_offset, fn, am)
    want = mu.sdpa_mask(batch_size=2, q_length=Nq, kv_length=Nk, q_offset=q_offset, kv_offset=kv_offset,
                        mask_function=fn, attention_mask=am, allow_is_causal_skip=False)
    got = t.mask.materialize(Nq, Nk).expand(2, 1, Nq, Nk)
    assert torch.equal(got, want.expand(2, 1, Nq, Nk)), t.how
    if case[0] != "chunked":
        assert t.how == "structural"


def test_training_dropout_runs_and_is_reproducible():
    _, ours = _pair("LlamaConfig", "LlamaForCausalLM", lambda: _decoder_kwargs(attention_dropout=0.3))
    ours.train()
    ids, am = _batch()
    torch.manual_seed(3)
    a = ours(ids, attention_mask=am).logits
    torch.manual_seed(3)
    b = ours(ids, attention_mask=am).logits
    c = ours(ids, attention_mask=am).logits
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.square().mean().backward()
    assert all(p.grad is not None for p in ours.model.layers[0].self_attn.parameters())


def test_explain_model_refuses_a_model_that_does_not_run_attnkit():
    eager, _ = _pair(*DECODERS["llama"])
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        akt.explain_model(eager, torch.randint(3, V, (1, 5)))


@pytest.mark.parametrize("name", ["llama", "mistral-window"])
def test_static_cache_generate_gives_the_same_tokens(name):
    """A static cache holds max_cache_len slots: offsets are not bottom-right aligned, so the mask goes
    in dense (exact); generate() builds it ahead and hands it back to the model, which passes it on."""
    eager, ours = _pair(*DECODERS[name])
    ids, am = _batch(B=2, N=9)
    am[1] = 1
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    assert torch.equal(eager.generate(ids, **kw), ours.generate(ids, **kw))


def test_t5_relative_position_bias_is_added():
    """T5 passes its relative position bias as position_bias=: it is added to the scores, not dropped."""
    kw = lambda: dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)  # noqa: E731
    eager, ours = _pair("T5Config", "T5EncoderModel", kw)
    ids, am = _batch()
    am[0] = 1
    valid = am.bool()
    a = eager(ids, attention_mask=am).last_hidden_state
    assert _rel(ours(ids, attention_mask=am).last_hidden_state[valid], a[valid]) < TOL


def test_gpt_oss_attention_sinks_go_through_the_lse():
    """GPT-OSS passes s_aux= (one sink logit per head in each softmax denominator): out * sigmoid(lse - sink)."""
    kw = lambda: _decoder_kwargs(head_dim=16, num_local_experts=2, num_experts_per_tok=1,  # noqa: E731
                                 sliding_window=4, layer_types=["full_attention", "sliding_attention", "full_attention"])
    eager, ours = _pair("GptOssConfig", "GptOssForCausalLM", kw)
    for layer in eager.model.layers:  # random sinks, so that dropping them shows
        torch.nn.init.normal_(layer.self_attn.sinks, std=2.0)
    ours.load_state_dict(eager.state_dict())
    ids, am = _batch()
    valid = am.bool()
    ref = eager(ids, attention_mask=am).logits
    assert _rel(ours(ids, attention_mask=am).logits[valid], ref[valid]) < TOL


def test_a_model_outside_the_attention_interface_gets_a_clear_error():
    """Bloom adds the mask to its scores itself: attnkit's mask refuses to act as a tensor, and says why."""
    kw = lambda: dict(vocab_size=V, hidden_size=32, n_layer=1, n_head=4)  # noqa: E731
    cfg_cls, model_cls = transformers.BloomConfig, transformers.BloomForCausalLM
    model = model_cls._from_config(cfg_cls(**kw()), attn_implementation="attnkit").eval()
    ids, am = _batch()
    with pytest.raises(TypeError, match="does not go through transformers' attention interface"):
        model(ids, attention_mask=am)
