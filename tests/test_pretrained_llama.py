"""attnkit.pretrained.load_llama against the real transformers LlamaForCausalLM / MistralForCausalLM.

Small randomly initialised HF models (seeded, fp32, eval, eager attention). Norm weights and biases
are re-drawn at random because HF initialises them to 1 / 0, which would hide a swapped norm or a
dropped bias. Tolerance: max|attnkit - hf| <= 1e-5 * max|hf| (fp32).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

import attnkit as ak
from attnkit.pretrained import CheckpointError, load_llama

B, N, V, GEN = 2, 37, 100, 20
RTOL = 1e-5
SMALL = {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 128,
         "vocab_size": V, "num_hidden_layers": 2, "initializer_range": 0.1,
         "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}  # no eos: HF never stops early
VARIANTS = {
    "base": {},
    "tied": {"tie_word_embeddings": True},
    "attention_bias": {"attention_bias": True, "mlp_bias": True},
    "head_dim_16": {"head_dim": 16},  # Hq * D = 128 != hidden 64
    "rope_theta_500": {"rope_theta": 500.0},
    "rms_eps_1e-2": {"rms_norm_eps": 1e-2},  # ~ mean(x^2) of the embeddings, so a dropped eps shows
    "mistral_window_8": {"sliding_window": 8},  # MistralForCausalLM; the window matters at N = 37
}


# -- helpers -----------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one thread beats two that spin-wait on each other (10x on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_hf(variant: str, seed: int = 0):
    """(HF model, its config) for a variant, with random norms and biases."""
    kwargs = {**SMALL, **VARIANTS[variant], "attn_implementation": "eager"}
    config = MistralConfig(**kwargs) if "sliding_window" in kwargs else LlamaConfig(**kwargs)
    torch.manual_seed(seed)
    hf = (MistralForCausalLM if "sliding_window" in kwargs else LlamaForCausalLM)(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return hf, config


def prompt(seed: int = 1, n: int = N) -> torch.Tensor:
    return torch.randint(0, V, (B, n), generator=torch.Generator().manual_seed(seed))


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def logits_or_skip(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits, or a skip carrying the backend's own reason when its impl refuses the call.

    (``ak.explain`` lists auto's reasons, which include speed preferences: banded "prefers the dense
    paths" for a short sequence yet runs it when named, so the explicit call is the judge.)
    """
    try:
        with torch.no_grad():
            return model(ids)
    except ValueError as e:
        if "cannot run this call" not in str(e):
            raise
        pytest.skip(str(e))


# -- logits parity -----------------------------------------------------------------------------

@pytest.mark.parametrize("impl", list(ak.backends()))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, impl):
    hf, config = make_hf(variant)
    model = load_llama(hf.state_dict(), config, impl=impl)
    ids = prompt()
    ours = logits_or_skip(model, ids)
    with torch.no_grad():
        ref = hf(ids).logits
    assert ours.shape == ref.shape == (B, N, V)
    assert rel_err(ours, ref) <= RTOL, f"{variant}/{impl}: max rel err {rel_err(ours, ref):.2e}"


def test_config_as_dict_and_legacy_rope_theta():
    """config.to_dict(), and an older config.json (rope_theta + rope_scaling=None) load the same model."""
    hf, config = make_hf("rope_theta_500")
    legacy = {k: v for k, v in config.to_dict().items() if k != "rope_parameters"}
    legacy.update(rope_theta=500.0, rope_scaling=None)
    ids = prompt()
    with torch.no_grad():
        ref = hf(ids).logits
        for cfg in (config.to_dict(), legacy):
            assert rel_err(load_llama(hf.state_dict(), cfg)(ids), ref) <= RTOL


def test_sliding_window_convention_is_hfs():
    """HF's window W lets a query see W keys (itself included); a window of W + 1 keys must not match."""
    hf, config = make_hf("mistral_window_8")
    model = load_llama(hf.state_dict(), config)
    ids = prompt()
    with torch.no_grad():
        ref = hf(ids).logits
        assert rel_err(model(ids), ref) <= RTOL
        model.mask = ak.causal() & ak.sliding_window(8, 0)
        assert rel_err(model(ids), ref) > 1e-3


# -- decoding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["base", "mistral_window_8"])
def test_greedy_generation_matches_transformers(variant):
    hf, config = make_hf(variant)
    model = load_llama(hf.state_dict(), config)
    ids = prompt(2)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=GEN,
                          eos_token_id=None, pad_token_id=0)
    cached, recomputed = model.generate(ids, GEN), model.generate(ids, GEN, use_cache=False)
    assert ref.shape == (B, N + GEN)
    assert torch.equal(cached, ref), f"attnkit (KV cache) {cached[:, N:]} != HF {ref[:, N:]}"
    assert torch.equal(recomputed, ref)


@pytest.mark.parametrize("variant", ["base", "mistral_window_8"])
def test_left_padded_batch_matches_transformers(variant):
    """Prompts of different lengths, padded on the left: HF's generate and attnkit's agree, and
    the real tokens' logits agree (HF derives positions from the mask the same way)."""
    hf, config = make_hf(variant)
    model = load_llama(hf.state_dict(), config)
    ids = prompt(3, 14)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # sample 0 has 9 real tokens, sample 1 has 14
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=GEN, eos_token_id=None,
                          pad_token_id=0)
        ref_logits = hf(ids, attention_mask=mask).logits
        ours_logits = model(ids, mask)
    real = mask.bool()
    assert rel_err(ours_logits[real], ref_logits[real]) < 1e-5
    assert torch.equal(model.generate(ids, GEN, attention_mask=mask), ref)
    assert torch.equal(model.generate(ids, GEN, attention_mask=mask, use_cache=False), ref)


@pytest.mark.parametrize("variant", ["base", "mistral_window_8"])
def test_kv_cache_steps_match_full_sequence(variant):
    hf, config = make_hf(variant)
    model = load_llama(hf.state_dict(), config)
    ids = prompt(3)
    cache = model.new_cache()
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :20], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(20, N)]
    assert cache[0].self_attn.position == N
    if config.to_dict().get("sliding_window"):
        assert len(cache[0].self_attn) <= 8, "the sliding-window cache must stay O(W)"
    assert rel_err(torch.cat(steps, dim=1), full) <= RTOL


def test_sampling_is_reproducible_and_respects_top_k():
    hf, config = make_hf("base")
    model = load_llama(hf.state_dict(), config)
    ids, k = prompt(4, n=5), 3

    def draw(seed: int) -> torch.Tensor:
        return model.generate(ids, 12, temperature=1.5, top_k=k, generator=torch.Generator().manual_seed(seed))

    out = draw(7)
    assert torch.equal(out, draw(7))
    with torch.no_grad():
        logits = model(out)[:, 4:-1]  # (B, 12, V): the logits each new token was drawn from
    top = logits.topk(k, dim=-1).indices  # (B, 12, k)
    assert bool((top == out[:, 5:, None]).any(-1).all()), "a sampled token fell outside the top-k"


# -- files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["base", "tied"])
def test_safetensors_round_trip(variant, tmp_path, monkeypatch):
    import pickle

    from safetensors.torch import save_file

    hf, config = make_hf(variant)
    state = hf.state_dict()
    if config.tie_word_embeddings:  # save_file refuses shared tensors; HF files omit the tied head
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    ids = prompt()

    def trap(*args, **kwargs):
        raise AssertionError("load_llama tried to unpickle")

    with monkeypatch.context() as trapped:  # reading the file must not unpickle anything
        for name in ("load", "loads", "Unpickler"):
            trapped.setattr(pickle, name, trap)
        trapped.setattr(torch, "load", trap)
        from_file = load_llama(path, config)
    with torch.no_grad():
        assert torch.equal(from_file(ids), load_llama(hf.state_dict(), config)(ids))
        assert rel_err(load_llama(str(path), config)(ids), hf(ids).logits) <= RTOL


def test_pickle_files_are_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"not read: attnkit never unpickles")
    with pytest.raises(CheckpointError, match=r"only \.safetensors"):
        load_llama(path, make_hf("base")[1])


# -- errors ------------------------------------------------------------------------------------

def test_missing_key_is_named_with_its_shape():
    hf, config = make_hf("base")
    state = dict(hf.state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError,
                       match=r"'model\.layers\.1\.mlp\.up_proj\.weight' \(expected shape \(128, 64\)\)"):
        load_llama(state, config)


def test_wrong_shape_is_named_with_both_shapes():
    hf, config = make_hf("base")
    state = dict(hf.state_dict())
    state["model.layers.0.self_attn.q_proj.weight"] = torch.randn(60, 64)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \(60, 64\)"
                                              r".* expects \(64, 64\)"):
        load_llama(state, config)


def test_config_that_does_not_fit_the_weights():
    hf, config = make_hf("base")  # 2 kv heads: k_proj is (2 * 8, 64)
    wrong = {**config.to_dict(), "num_key_value_heads": 4}
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 64\)"
                                              r".* expects \(32, 64\)"):
        load_llama(hf.state_dict(), wrong)
    fewer_layers = {**config.to_dict(), "num_hidden_layers": 1}
    with pytest.raises(CheckpointError, match=r"no place for: \['model\.layers\.1\."):
        load_llama(hf.state_dict(), fewer_layers)


def test_tied_config_with_a_separate_head_is_refused():
    hf, config = make_hf("base")  # untied weights
    with pytest.raises(CheckpointError, match=r"tie_word_embeddings=True but checkpoint key 'lm_head\.weight'"):
        load_llama(hf.state_dict(), {**config.to_dict(), "tie_word_embeddings": True})


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, r"rope_type='llama3'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "longrope", "factor": 2.0}}, r"rope_type='longrope'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}}, r"has no 'rope_theta'"),
    ({"hidden_act": "gelu"}, r"hidden_act'\] = 'gelu'"),
    ({"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]}, r"layer_types"),
    ({"num_attention_heads": None}, r"config\['num_attention_heads'\] = None; expected int"),
])
def test_unsupported_configs_are_refused(change, message):
    hf, config = make_hf("base")
    with pytest.raises(CheckpointError, match=message):
        load_llama(hf.state_dict(), {**config.to_dict(), **change})


def test_unknown_impl_is_refused():
    hf, config = make_hf("base")
    with pytest.raises(ValueError, match=r"impl='fastest'"):
        load_llama(hf.state_dict(), config, impl="fastest")


def test_loaded_parameters_are_real_owned_and_tied_once():
    """Built on the meta device and assigned: every tensor is real, a caller's state dict is copied
    (training attnkit must not change the HF model), and a tied head is one parameter."""
    hf, config = make_hf("tied")
    model = load_llama(hf.state_dict(), config)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.embeddings.tokens.weight
    assert len(list(model.parameters())) == len(list(hf.parameters()))
    before = hf.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        model.embeddings.tokens.weight.add_(1.0)
    assert torch.equal(hf.model.embed_tokens.weight, before)
    assert all(p.requires_grad for p in model.parameters())
