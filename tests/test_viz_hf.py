"""``attnkit.viz`` on Hugging Face transformers models built with attn_implementation="attnkit".

The maps a capture records must be the ones transformers' own eager attention returns as
``output_attentions`` (a separate eager model with its own config object and the same weights),
at every real query row: with padding, Mistral's sliding window and Gemma 2's softcap. And
``attnkit viz --model DIR`` must show a tiny checkpoint saved to disk (safetensors, a tokenizer
built offline), and refuse a folder of pickled weights without loading it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
akt = pytest.importorskip("attnkit.integrations.transformers")

from attnkit.cli.main import main  # noqa: E402
from attnkit.viz import capture  # noqa: E402
from attnkit.viz.page import page_data  # noqa: E402

V = 61


def _decoder(**extra):
    return dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, **extra)


MODELS = {  # name: (config class, model class, config kwargs, attention module names)
    "llama": ("LlamaConfig", "LlamaForCausalLM", lambda: _decoder(), "model.layers.{}.self_attn"),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", lambda: _decoder(sliding_window=4),
                       "model.layers.{}.self_attn"),
    "gemma2-softcap": ("Gemma2Config", "Gemma2ForCausalLM", lambda: _decoder(
        head_dim=16, sliding_window=4, attn_logit_softcapping=0.3, final_logit_softcapping=5.0,
        query_pre_attn_scalar=16), "model.layers.{}.self_attn"),
    "bert": ("BertConfig", "BertModel", lambda: dict(vocab_size=V, hidden_size=64, intermediate_size=96,
                                                     num_hidden_layers=2, num_attention_heads=4),
             "encoder.layer.{}.attention.self"),
}


def _pair(name: str, seed: int = 0):
    """(eager, attnkit) models with the same weights, each from its own config object (transformers
    writes _attn_implementation onto the config it is given)."""
    cfg_name, model_name, kwargs, _ = MODELS[name]
    cfg_cls, model_cls = getattr(transformers, cfg_name), getattr(transformers, model_name)
    torch.manual_seed(seed)
    eager = model_cls._from_config(cfg_cls(**kwargs()), attn_implementation="eager").eval()
    ours = model_cls._from_config(cfg_cls(**kwargs()), attn_implementation="attnkit").eval()
    ours.load_state_dict(eager.state_dict())
    assert eager.config is not ours.config and ours.config._attn_implementation == "attnkit"
    return eager, ours


def _batch(B: int = 3, N: int = 11, seed: int = 1):
    """ids and a padding mask: row 0 left-padded, row 1 right-padded, row 2 full."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, N), generator=g)
    am = torch.ones(B, N, dtype=torch.long)
    am[0, :3] = 0
    am[1, N - 4:] = 0
    return ids, am


@pytest.mark.parametrize("name", list(MODELS))
def test_captured_maps_equal_eager_output_attentions(name):
    eager, ours = _pair(name)
    ids, am = _batch()
    with torch.no_grad():
        want = eager(input_ids=ids, attention_mask=am, output_attentions=True).attentions  # L x (B, H, N, N)
        with capture(ours) as cap:
            ours(input_ids=ids, attention_mask=am)
    layers = MODELS[name][3]
    assert cap.names == [layers.format(i) for i in range(len(want))]
    real = am.bool()  # padding query rows: eager gives them some distribution, attnkit zeros (no key is theirs)
    for i, w_eager in enumerate(want):
        rec = cap[layers.format(i)]
        assert rec.shape == tuple(w_eager.shape)
        got = rec.weights()  # (B, H, N, N)
        err = (got - w_eager).abs()[real[:, None, :, None].expand_as(got)].max()
        assert err < 2e-6, (name, i, float(err))
        rows = torch.tensor([10, 4, 7])
        sub = rec.weights(rows=rows, heads=[3, 0], batch=[2])  # rows keep their place
        assert (sub - w_eager[2:, [3, 0]][:, :, rows]).abs().max() < 2e-6
    if name == "gemma2-softcap":
        assert rec.softcap == 0.3  # the softcap is in the record, so the maps above used it


def test_the_softcap_changes_the_maps():
    """The Gemma 2 comparison above would fail with the softcap left out: it changes the maps."""
    eager, ours = _pair("gemma2-softcap")
    ids, _ = _batch()
    with torch.no_grad(), capture(ours) as cap:
        want = eager(input_ids=ids, output_attentions=True).attentions[0]
        ours(input_ids=ids)
    rec = cap[cap.names[0]]
    plain = type(rec)(rec.name, rec.q, rec.k, rec.mask, rec.bias, rec.scale)  # the same call, no softcap
    assert (plain.weights() - want).abs().max() > 1e-4 > 2e-6 > (rec.weights() - want).abs().max()  # 50x the tolerance


def test_pages_and_layers_of_a_transformers_model():
    _, ours = _pair("mistral-window")
    ids = _batch(N=9)[0][:1]
    with torch.no_grad(), capture(ours, layers=["model.layers.1.self_attn"]) as cap:
        ours(input_ids=ids)
    assert cap.names == ["model.layers.1.self_attn"]
    data = page_data(cap, [f"t{i}" for i in range(9)])
    assert [layer["name"] for layer in data["layers"]] == ["model.layers.1.self_attn"]
    with pytest.raises(ValueError, match=r"no attnkit .* or transformers module named \['model.layers.9'\]; "
                                         r"the model has \[.*'model.layers.0.self_attn'"):
        with capture(ours, layers=["model.layers.9"]):
            pass


def test_a_transformers_model_not_built_with_attnkit_is_refused():
    eager, _ = _pair("llama")
    with pytest.raises(ValueError, match=r"This transformers model runs attn_implementation='eager': build it "
                                         r"with attn_implementation='attnkit'"):
        with capture(eager):
            pytest.fail("capture entered a model whose attention it cannot see")


def test_importing_viz_does_not_import_transformers():
    code = ("import sys, attnkit.viz, attnkit.viz.page, attnkit.viz.tiles, attnkit.cli.viz; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# -- attnkit viz --model DIR ---------------------------------------------------------------------

WORDS = "the boat drifted slowly past old mill toward bank of wide river".split()


def _tokenizer():
    """A word-level tokenizer built offline, wrapped as transformers' fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                                  ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", model_max_length=12)


@pytest.fixture(scope="module", params=["bert", "llama"])
def checkpoint(request, tmp_path_factory):
    """A tiny random checkpoint folder: safetensors weights, config.json, tokenizer files."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    cfg_name, _, kwargs, layers = MODELS[request.param]
    base = {"bert": "BertModel", "llama": "LlamaModel"}[request.param]
    torch.manual_seed(0)
    model = getattr(transformers, base)(getattr(transformers, cfg_name)(**kwargs()))
    model.save_pretrained(folder, safe_serialization=True)
    _tokenizer().save_pretrained(folder)
    return folder, layers.removeprefix("model.")


def _page(path) -> dict:
    return json.loads(re.search(r'id="ak-data">(.*?)</script>', path.read_text(encoding="utf-8"), re.S)[1])


def test_viz_model_writes_the_page_and_the_picture(checkpoint, tmp_path, capsys):
    folder, layers = checkpoint
    out, png = tmp_path / "maps.html", tmp_path / "maps.png"
    text = "the boat drifted past the old mill"
    assert main(["viz", text, "--model", str(folder), "--out", str(out), "--png", str(png)]) == 0
    data = _page(out)
    assert data["tokens"] == ["[CLS]", *text.split(), "[SEP]"]
    assert data["special"] == [0, len(text.split()) + 1]
    assert [layer["name"] for layer in data["layers"][:2]] == [layers.format(0), layers.format(1)]
    assert data["title"] == f"{folder.name} attention: {text}"
    assert png.stat().st_size > 1000 and "wrote" in capsys.readouterr().out


def test_viz_model_cuts_a_long_text_and_says_so(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint
    text = " ".join(WORDS * 2)  # 24 words: more than the tokenizer's 12 positions
    out = tmp_path / "cut.html"
    assert main(["viz", text, "--model", str(folder), "--out", str(out), "--layer", "0"]) == 0
    data = _page(out)
    assert len(data["tokens"]) == 12 and data["tokens"][1:11] == WORDS[:10]
    err = capsys.readouterr().err
    assert "the text is 26 tokens, special tokens included, but the model reads at most 12 positions" in err, err
    assert data["notices"] and data["title"].endswith("[cut at 12 positions]")


def test_viz_model_refuses_pickled_weights_without_loading_them(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not a pickle: loading it would fail differently")
    assert main(["viz", "the boat", "--model", str(pickled), "--out", str(tmp_path / "p.html")]) == 2
    err = capsys.readouterr().err
    assert ("holds only pickled weights (pytorch_model.bin) and no *.safetensors file; attnkit viz loads "
            "safetensors only") in err, err
    assert not (tmp_path / "p.html").exists()
    assert main(["viz", "the boat", "--model", str(tmp_path / "missing")]) == 2
    assert "expected a local checkpoint folder" in capsys.readouterr().err
    bare = tmp_path / "bare"  # weights but no tokenizer
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((folder / name).read_bytes())
    assert main(["viz", "the boat", "--model", str(bare), "--out", str(tmp_path / "p.html")]) == 2
    assert "no tokenizer could be loaded from the folder" in capsys.readouterr().err


def test_viz_model_refuses_an_encoder_decoder_checkpoint(tmp_path, capsys):
    """T5 needs decoder inputs and has three kinds of attention: refused with a reason, not a traceback."""
    folder = tmp_path / "t5"
    t5 = transformers.T5Model(transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                    num_heads=4))
    t5.save_pretrained(folder, safe_serialization=True)
    _tokenizer().save_pretrained(folder)
    assert main(["viz", "the boat", "--model", str(folder), "--out", str(tmp_path / "p.html")]) == 2
    assert "T5Model is an encoder-decoder model" in capsys.readouterr().err
    assert not (tmp_path / "p.html").exists()
