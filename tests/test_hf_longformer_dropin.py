"""attnkit inside transformers models: swap_longformer_attention and swap_encoder_attention.

Peers: the same transformers model unswapped (deepcopy, then swap), and for BERT/RoBERTa an
eager copy given the equivalent dense 4-D mask built here by hand. Tiny random configs, each
model its own config object, fp32. Outputs are compared at real (non-padding) positions with
``rtol=1e-5, atol=1e-5 * max|peer|``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (BertConfig, BertForMaskedLM, BertModel, LongformerConfig, LongformerForMaskedLM,
                          LongformerModel, RobertaConfig, RobertaModel)

from attnkit.integrations.transformers import longformer as lf
from attnkit.integrations.transformers.longformer import (DropInLongformerSelfAttention, swap_encoder_attention,
                                                          swap_longformer_attention)
from attnkit.nn import longformer as nn_longformer
from attnkit.nn.longformer import normalized_roles
from attnkit.viz import capture

B, E, H, VOCAB, PAD = 2, 32, 4, 100, 1


# -- helpers -----------------------------------------------------------------------------------------

def longformer_cfg(window: int = 8, dropout: float = 0.0, layers: int = 2) -> LongformerConfig:
    """dropout: on the attention probabilities only (hidden dropout off, so it is what a test sees)."""
    return LongformerConfig(hidden_size=E, num_attention_heads=H, num_hidden_layers=layers, intermediate_size=64,
                            vocab_size=VOCAB, attention_window=window, max_position_embeddings=80, pad_token_id=PAD,
                            attention_probs_dropout_prob=dropout, hidden_dropout_prob=0.0)


def longformer_pair(window: int = 8, seed: int = 0) -> tuple[LongformerModel, LongformerModel]:
    """(HF's model, a deepcopy with attnkit's attention), eval, same weights, own configs."""
    torch.manual_seed(seed)
    hf = LongformerModel(longformer_cfg(window)).eval()
    return hf, swap_longformer_attention(copy.deepcopy(hf))


def batch(N: int, lengths: tuple[int, ...], globals_: tuple[tuple[int, ...], ...], seed: int = 0) -> dict:
    """input_ids, attention_mask (right padding) and global_attention_mask, each (B, N)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, N), generator=gen)
    mask = (torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, N)
    ids = ids.masked_fill(mask == 0, PAD)
    glob = torch.zeros(B, N, dtype=torch.long)
    for b, idx in enumerate(globals_):
        glob[b, list(idx)] = 1
    return dict(input_ids=ids, attention_mask=mask, global_attention_mask=glob)


def assert_close_at(got: torch.Tensor, want: torch.Tensor, valid: torch.Tensor) -> None:
    """got, want (B, N, ...) compared where valid (B, N) is True."""
    got, want = got[valid], want[valid]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


# (name, N, attention_window, lengths, global positions per sample)
LONGFORMER_CASES = [
    ("right_padding", 21, 8, (21, 13), ((), ())),
    ("global_and_padding_n_not_multiple", 37, 8, (37, 20), ((0, 19), (0,))),
    ("globals_no_padding", 24, 8, (24, 24), ((5,), (0, 23))),
    ("window_wider_than_n", 9, 16, (9, 6), ((2,), ())),
]


def check_longformer_parity(N, window, lengths, globals_) -> None:
    hf, ours = longformer_pair(window, seed=N)
    inputs = batch(N, lengths, globals_, seed=N + 1)
    with torch.no_grad():
        want, got = hf(**inputs).last_hidden_state, ours(**inputs).last_hidden_state
    assert got.shape == want.shape == (B, N, E)
    assert_close_at(got, want, inputs["attention_mask"].bool())


# -- LongformerModel ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,N,window,lengths,globals_", LONGFORMER_CASES, ids=[c[0] for c in LONGFORMER_CASES])
def test_longformer_model_matches_hf(name, N, window, lengths, globals_):
    check_longformer_parity(N, window, lengths, globals_)


def test_parity_check_fails_without_padding(monkeypatch):
    """The parity cases see padding: a swap that ignores it (every token real) fails them."""
    real = lf._layer_roles
    monkeypatch.setattr(lf, "_layer_roles", lambda *a: normalized_roles(None, real(*a).is_global))
    with pytest.raises(AssertionError):
        check_longformer_parity(*LONGFORMER_CASES[1][1:])


def test_parity_check_fails_without_window(monkeypatch):
    """... and the window: attnkit layers attending to every key fail them."""
    real = nn_longformer.local_mask
    monkeypatch.setattr(nn_longformer, "local_mask", lambda window, roles: real(10_000, roles))
    with pytest.raises(AssertionError):
        check_longformer_parity(*LONGFORMER_CASES[0][1:])


def test_gradients_match_hf():
    N, window, lengths, globals_ = LONGFORMER_CASES[1][1:]
    hf, ours = longformer_pair(window, seed=3)
    inputs = batch(N, lengths, globals_, seed=4)
    ids, valid = inputs.pop("input_ids"), inputs["attention_mask"].bool()
    g = torch.randn(B, N, E, generator=torch.Generator().manual_seed(5)) * valid[..., None]
    grads = []
    for model in (hf, ours):
        x = model.embeddings.word_embeddings(ids).detach().requires_grad_(True)  # (B, N, E)
        (model(inputs_embeds=x, **inputs).last_hidden_state * g).sum().backward()
        grads.append({"inputs_embeds": x.grad} | {n: p.grad for n, p in model.named_parameters()})
    want, got = grads
    assert_grads_match(got, want)


def assert_grads_match(got: dict, want: dict) -> None:
    """Every gradient within 1e-5 relative. A key bias's is 0 in exact arithmetic (it shifts a
    softmax row by a constant), so both must be rounding noise next to the key weight's."""
    assert set(got) == set(want)
    for name, w in want.items():
        if w is None:  # the pooler is not on the loss's path
            assert got[name] is None, name
        elif name.endswith(("key.bias", "key_global.bias")):
            scale = want[name.replace(".bias", ".weight")].abs().max().item()
            assert got[name].abs().max() <= 1e-5 * scale and w.abs().max() <= 1e-5 * scale, name
        else:
            torch.testing.assert_close(got[name], w, rtol=1e-5, atol=1e-5 * w.abs().max().item(), msg=name)


def test_output_attentions_match_hf():
    N, window, lengths, globals_ = LONGFORMER_CASES[1][1:]
    hf, ours = longformer_pair(window, seed=6)
    inputs = batch(N, lengths, globals_, seed=7)
    with torch.no_grad():
        want, got = hf(**inputs, output_attentions=True), ours(**inputs, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == 2
    for g_, w_ in zip(got.attentions, want.attentions):  # (B, H, N, G + W): every entry
        assert g_.shape == w_.shape
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-6)
    counts = inputs["global_attention_mask"].sum(1)  # (B,)
    for g_, w_ in zip(got.global_attentions, want.global_attentions):  # (B, H, N_padded, G)
        assert g_.shape == w_.shape
        real = (torch.arange(g_.shape[-1])[None, :] < counts[:, None])[:, None, None, :]  # (B, 1, 1, G)
        torch.testing.assert_close(g_ * real, w_ * real, rtol=1e-5, atol=1e-6)
        assert torch.all(g_.masked_select(~real) == 0), "unused global slots are 0 rows"


def test_output_attentions_without_globals_has_no_global_entry():
    hf, ours = longformer_pair(8, seed=8)
    inputs = batch(21, (21, 13), ((), ()), seed=9)
    inputs.pop("global_attention_mask")
    with torch.no_grad():
        want, got = hf(**inputs, output_attentions=True), ours(**inputs, output_attentions=True)
    assert got.global_attentions is None and want.global_attentions is None
    torch.testing.assert_close(got.attentions[0], want.attentions[0], rtol=1e-5, atol=1e-6)


def test_layer_reads_the_extended_mask_without_flags():
    """Called with LongformerModel's extended mask alone (-10000 / 0 / +10000), the layer derives
    padding and global tokens as HF's encoder does."""
    torch.manual_seed(10)
    layer = DropInLongformerSelfAttention(E, H, 8).eval()
    x = torch.randn(B, 16, E)
    ext = torch.zeros(B, 16)
    ext[1, 11:], ext[0, 3] = -10000.0, 10000.0
    with torch.no_grad():
        got = layer(x, attention_mask=ext)
        want = layer(x, is_index_masked=ext < 0, is_index_global_attn=ext > 0, is_global_attn=True)
        plain = base_forward(layer, x, ext)
    assert len(got) == len(want) == 1
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[0], plain, rtol=0, atol=0)


def base_forward(layer, x, ext):
    """attnkit's own convention (0/1/2) through the base class."""
    m012 = torch.where(ext < 0, 0, torch.where(ext > 0, 2, 1))
    return super(DropInLongformerSelfAttention, layer).forward(x, m012)


def test_swap_shares_weights_and_keeps_mode():
    torch.manual_seed(11)
    model = LongformerForMaskedLM(longformer_cfg()).train()
    before = [(lay.attention.self.query, lay.attention.self.value_global) for lay in model.longformer.encoder.layer]
    keys = list(model.state_dict())
    swap_longformer_attention(model)
    for layer, (q, vg) in zip(model.longformer.encoder.layer, before):
        assert isinstance(layer.attention.self, DropInLongformerSelfAttention)
        assert layer.attention.self.query is q and layer.attention.self.value_global is vg
        assert layer.attention.self.training
    assert list(model.state_dict()) == keys
    assert swap_longformer_attention(model) is model  # a second call changes nothing


def test_viz_capture_records_swapped_layers():
    hf, ours = longformer_pair(8, seed=12)
    inputs = batch(21, (21, 13), ((0,), (4,)), seed=13)
    with torch.no_grad(), capture(ours) as cap:
        ours(**inputs)
    names = [n for n, m in ours.named_modules() if isinstance(m, DropInLongformerSelfAttention)]
    assert sorted(cap.names) == sorted(names) and len(names) == 2
    w = cap[names[0]].weights()  # (B, H, N_padded, N_padded), padded to a multiple of the window
    valid = torch.nn.functional.pad(inputs["attention_mask"], (0, 3)).float()  # (B, N_padded)
    torch.testing.assert_close(w.sum(-1), valid[:, None].expand(-1, H, -1))  # real rows sum to 1, padding rows 0


# -- BERT / RoBERTa ----------------------------------------------------------------------------------

def encoder(kind: str, attn: str, seed: int, dropout: float = 0.0, cls=None):
    cfg_cls, model_cls = {"bert": (BertConfig, BertModel), "roberta": (RobertaConfig, RobertaModel)}[kind]
    cfg = cfg_cls(hidden_size=E, num_attention_heads=H, num_hidden_layers=2, intermediate_size=64, vocab_size=VOCAB,
                  max_position_embeddings=80, pad_token_id=PAD, attn_implementation=attn,
                  attention_probs_dropout_prob=dropout, hidden_dropout_prob=0.0)
    torch.manual_seed(seed)
    return (cls or model_cls)(cfg).eval()


def windowed_reference(model, ids: torch.Tensor, valid: torch.Tensor, window: int, is_global: torch.Tensor):
    """An eager copy of ``model`` run with the dense 4-D additive mask of the pattern, by hand:
    key j visible to query i when |i - j| <= window or i or j is global, and j is real."""
    ref = encoder("roberta" if "Roberta" in type(model).__name__ else "bert", "eager", 0)
    ref.load_state_dict(model.state_dict())
    N = ids.shape[1]
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    seen = ((i - j).abs() <= window)[None] | is_global[:, :, None] | is_global[:, None, :]  # (B, N, N)
    seen = seen & valid[:, None, :]
    additive = torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min)[:, None]  # (B, 1, N, N)
    hidden = ref.embeddings(input_ids=ids)
    out = ref.encoder(hidden, attention_mask=additive).last_hidden_state
    weights = ref.encoder.layer[0].attention.self(hidden, attention_mask=additive)[1]  # (B, H, N, N)
    return out, weights


ENCODERS = [(k, a) for k in ("bert", "roberta") for a in ("eager", "sdpa")] + [("bert", "attnkit")]


@pytest.mark.parametrize("kind,attn", ENCODERS)
def test_encoder_windowed_matches_dense_mask(kind, attn):
    N, window = 23, 3
    model = swap_encoder_attention(encoder(kind, attn, seed=20), window=window, global_tokens=[0])
    inputs = batch(N, (N, 15), (), seed=21)
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    is_global = torch.zeros(B, N, dtype=torch.bool)
    is_global[:, 0] = True
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=inputs["attention_mask"], output_attentions=True)
        want, want_w = windowed_reference(model, ids, valid, window, is_global)
    assert_close_at(got.last_hidden_state, want, valid)
    rows = valid[:, None, :].expand(-1, H, -1)  # (B, H, N): real query rows
    torch.testing.assert_close(got.attentions[0][rows], want_w[rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_encoder_per_call_global_attention_mask(kind):
    N, window = 20, 2
    model = swap_encoder_attention(encoder(kind, "sdpa", seed=22), window=window, global_tokens=[0])
    inputs = batch(N, (N, 12), ((3, 17), (5,)), seed=23)
    valid, is_global = inputs["attention_mask"].bool(), inputs["global_attention_mask"].bool()
    with torch.no_grad():
        got = model(**inputs).last_hidden_state  # global_attention_mask replaces the fixed [0]
        want, _ = windowed_reference(model, inputs["input_ids"], valid, window, is_global)
        fixed = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    assert_close_at(got, want, valid)
    assert not torch.allclose(got[valid], fixed[valid], atol=1e-3), "the per-call globals must change the output"


@pytest.mark.parametrize("kind,attn", ENCODERS)
def test_encoder_window_covering_n_equals_unswapped(kind, attn):
    N = 17
    model = encoder(kind, attn, seed=24)
    swapped = swap_encoder_attention(copy.deepcopy(model), window=N - 1, global_tokens=[0])
    inputs = batch(N, (N, 9), (), seed=25)
    inputs.pop("global_attention_mask")
    with torch.no_grad():
        assert_close_at(swapped(**inputs).last_hidden_state, model(**inputs).last_hidden_state,
                        inputs["attention_mask"].bool())
        narrow = swap_encoder_attention(swapped, window=1)(**inputs).last_hidden_state  # the pattern replaced
    assert not torch.allclose(narrow, model(**inputs).last_hidden_state, atol=1e-3)


def test_encoder_swap_keeps_modules_and_weights():
    model = encoder("bert", "eager", seed=26)
    layers = [layer.attention.self for layer in model.encoder.layer]
    weights = [m.query.weight for m in layers]
    swap_encoder_attention(model, window=4)
    assert [layer.attention.self for layer in model.encoder.layer] == layers
    assert all(m.query.weight is w for m, w in zip(layers, weights))
    assert type(layers[0]).__name__ == "WindowedBertSelfAttention" and not layers[0].training


# -- training ----------------------------------------------------------------------------------------

def mlm_step(model, inputs: dict, seed: int) -> tuple[torch.Tensor, dict]:
    """One training step's loss and gradients under torch.manual_seed(seed)."""
    model.zero_grad()
    torch.manual_seed(seed)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_longformer_train_step_without_dropout_matches_hf():
    torch.manual_seed(30)
    hf = LongformerForMaskedLM(longformer_cfg(dropout=0.0)).train()
    ours = swap_longformer_attention(copy.deepcopy(hf))
    inputs = batch(37, (37, 20), ((0, 19), (0,)), seed=31)
    (l_hf, g_hf), (l_ours, g_ours) = mlm_step(hf, inputs, 0), mlm_step(ours, inputs, 0)
    torch.testing.assert_close(l_ours, l_hf, rtol=1e-5, atol=0)
    assert_grads_match(g_ours, g_hf)


@pytest.mark.parametrize("which", ["longformer", "bert"])
def test_train_with_dropout_is_seeded_and_flows(which):
    if which == "longformer":
        torch.manual_seed(32)
        model = swap_longformer_attention(LongformerForMaskedLM(longformer_cfg(dropout=0.3)).train())
        inputs = batch(37, (37, 20), ((0, 19), (0,)), seed=33)
        attn = model.longformer.encoder.layer[0].attention.self
    else:
        model = swap_encoder_attention(encoder("bert", "sdpa", 34, dropout=0.3, cls=BertForMaskedLM).train(),
                                       window=3)
        inputs = batch(29, (29, 18), ((7,), (2, 11)), seed=35)
        attn = model.bert.encoder.layer[0].attention.self
    loss_a, grads_a = mlm_step(model, inputs, 0)
    loss_b, grads_b = mlm_step(model, inputs, 0)
    loss_c, _ = mlm_step(model, inputs, 1)
    assert torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert not torch.equal(loss_a, loss_c), "another seed must drop other attention entries"
    for p in (attn.query.weight, attn.key.weight, attn.value.weight):
        g = p.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        eval_a, eval_b = mlm_step_loss(model, inputs, 0), mlm_step_loss(model, inputs, 1)
    torch.testing.assert_close(eval_a, eval_b, rtol=0, atol=0)  # no dropout in eval
    assert not torch.equal(eval_a, loss_a), "training must drop attention entries"


def mlm_step_loss(model, inputs, seed):
    torch.manual_seed(seed)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return model(**inputs, labels=labels).loss


# -- errors ------------------------------------------------------------------------------------------

def test_swap_errors():
    bert = encoder("bert", "eager", seed=40)
    torch.manual_seed(41)
    longformer = LongformerModel(longformer_cfg())
    with pytest.raises(ValueError, match="holds no transformers LongformerSelfAttention.*swap_encoder_attention"):
        swap_longformer_attention(bert)
    with pytest.raises(ValueError, match="holds no transformers BERT-style.*swap_longformer_attention"):
        swap_encoder_attention(longformer, window=4)
    with pytest.raises(ValueError, match="for a lone transformers LongformerSelfAttention use"):
        swap_longformer_attention(longformer.encoder.layer[0].attention.self)
    with pytest.raises(ValueError, match="window=-1: expected an int >= 0"):
        swap_encoder_attention(bert, window=-1)
    with pytest.raises(ValueError, match=r"global_tokens=\[-1\]: expected positions as ints >= 0"):
        swap_encoder_attention(bert, window=2, global_tokens=[-1])
    with pytest.raises(ValueError, match="impl='nope' is not a backend"):
        swap_encoder_attention(bert, window=2, impl="nope")
    with pytest.raises(ValueError, match="impl='nope' is not a backend"):
        swap_longformer_attention(longformer, impl="nope")
    decoder_cfg = BertConfig(hidden_size=E, num_attention_heads=H, num_hidden_layers=1, intermediate_size=64,
                             vocab_size=VOCAB, is_decoder=True)
    with pytest.raises(ValueError, match="causal/decoder self-attention"):
        swap_encoder_attention(BertModel(decoder_cfg), window=2)


def test_per_call_errors():
    model = swap_encoder_attention(encoder("bert", "eager", seed=42), window=2, global_tokens=[5])
    ids = torch.randint(3, VOCAB, (B, 4))
    with pytest.raises(ValueError, match="global token position 5 is past the N=4 tokens"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"global_attention_mask must be a tensor \(B, N\) = \(2, 4\)"):
        model(input_ids=ids, global_attention_mask=torch.ones(B, 3))
    layer = model.encoder.layer[0].attention.self
    x = torch.randn(B, 4, E)
    with pytest.raises(ValueError, match="attention_mask holds -5.0: an additive mask must be 0"):
        layer(x, attention_mask=torch.full((B, 1, 4, 4), -5.0), global_attention_mask=torch.zeros(B, 4))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4, 4\)"):
        layer(x, attention_mask=torch.zeros(B, 4, 4), global_attention_mask=torch.zeros(B, 4))
    with pytest.raises(NotImplementedError, match="KV cache"):
        layer(x, cache=object())
    with pytest.raises(NotImplementedError, match="relative position bias"):  # LayoutLMv3 passes one
        layer(x, position_bias=torch.zeros(B, H, 4, 4))
    drop_in = DropInLongformerSelfAttention(E, H, 8)
    with pytest.raises(TypeError, match="expected LongformerModel's extended float mask"):
        drop_in(x, attention_mask=torch.ones(B, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"is_index_masked must be a bool tensor \(B, N\) = \(2, 4\)"):
        drop_in(x, is_index_masked=torch.zeros(B, 5, dtype=torch.bool), is_index_global_attn=torch.zeros(B, 4))
