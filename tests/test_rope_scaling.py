"""RoPE scaling (linear, dynamic NTK, YaRN, Llama 3.1) and partial rotary against transformers.

Peers: transformers' own ``LlamaRotaryEmbedding`` (cos, sin, inv_freq) and ``NemotronRotaryEmbedding``
+ its ``apply_rotary_pos_emb`` (partial rotary), built from the same config, and random-weight tiny
``LlamaForCausalLM`` models (fp32, eager, eval) for ``load_llama``. Tolerances: cos/sin
max|ours - hf| <= 1e-6 * max|hf|; logits max|ours - hf| <= 1e-5 * max|hf|. Every comparison is run
past the pretraining context, and each one is checked to fail for the plain (unscaled) RoPE.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, NemotronConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.nemotron.modeling_nemotron import NemotronRotaryEmbedding
from transformers.models.nemotron.modeling_nemotron import apply_rotary_pos_emb as nemotron_apply

from attnkit.nn.positional import ROPE_TYPES, RopeScaling, RotaryEmbedding
from attnkit.pretrained import CheckpointError, load_llama
from attnkit.pretrained.llama import llama_architecture

MAX_POS, ORIGINAL = 64, 16  # the config's max_position_embeddings; yarn/llama3's pretraining context
D = 32  # head dim of the RotaryEmbedding cases
ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 3.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
    # 1.3 * L / M - 0.3 rounds below 1 in float32 at L <= M: short calls must take the plain RoPE as HF does
    "dynamic_1.3": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 1.3},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn_deepseek": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,  # mscale ratio
                      "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2, "truncate": False,
                      "original_max_position_embeddings": 48},
    "yarn_attention_factor": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 2.5, "attention_factor": 0.8,
                              "original_max_position_embeddings": ORIGINAL},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 48},  # wavelengths in all 3 bands
}
LENGTHS = (7, MAX_POS, MAX_POS + 1, 300)  # inside, at, just past and far past max_position_embeddings


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one thread beats two that spin-wait on each other on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> bool:
    return (got.double() - want.double()).abs().max().item() <= rtol * want.double().abs().max().item()


def hf_config(rope: dict, *, cls=LlamaConfig, **kwargs):
    """A fresh config per model: transformers writes onto the config object it is given."""
    base = {"hidden_size": 2 * D, "num_attention_heads": 2, "max_position_embeddings": MAX_POS}
    return cls(**{**base, **kwargs}, rope_parameters=dict(rope))


def plain(rope: dict) -> dict:
    return {"rope_type": "default", "rope_theta": rope["rope_theta"]}


# -- cos / sin against transformers' rotary embeddings -----------------------------------------------

@pytest.mark.parametrize("case", list(ROPE))
def test_cos_sin_equal_transformers(case):
    """cos, sin (scaled by YaRN's attention factor) and theta_i equal LlamaRotaryEmbedding's, each
    length on a fresh HF module (its dynamic frequencies depend on the calls it has seen)."""
    config = hf_config(ROPE[case])
    ours = RotaryEmbedding.from_rope_parameters(D, ROPE[case], max_position_embeddings=MAX_POS)
    unscaled = RotaryEmbedding(D, ROPE[case]["rope_theta"])
    for L in LENGTHS:
        hf = LlamaRotaryEmbedding(config)
        positions = torch.arange(L).expand(2, L)  # (B, N)
        want = hf(torch.zeros(2, L, D), positions)
        got = ours.cos_sin(positions, torch.float32)
        assert ours.attention_scaling == pytest.approx(hf.attention_scaling, rel=1e-12)
        assert close(got[0], want[0], 1e-6) and close(got[1], want[1], 1e-6), f"{case} L={L}"
        assert close(ours.inv_freq(torch.float32, "cpu", L), hf.inv_freq, 1e-6)
        if case != "default" and (not case.startswith("dynamic") or L > MAX_POS):  # a RoPE ignoring the scaling fails
            assert not close(unscaled.cos_sin(positions, torch.float32)[0], want[0], 1e-6), f"{case} L={L}"


def test_llama3_and_yarn_cases_reach_every_band():
    """The cases above exercise each piece of the formulas: kept, interpolated and blended pairs."""
    for case in ("llama3", "yarn", "yarn_deepseek"):
        got = RotaryEmbedding.from_rope_parameters(D, ROPE[case]).inv_freq(torch.float64, "cpu")
        base = RotaryEmbedding(D, ROPE[case]["rope_theta"]).inv_freq(torch.float64, "cpu")
        ratio = base / got  # 1 (kept), factor (interpolated), or between
        factor = ROPE[case]["factor"]
        assert (ratio - 1).abs().min() < 1e-9 and (ratio - factor).abs().min() < 1e-9 * factor, case
        assert ((ratio > 1 + 1e-6) & (ratio < factor - 1e-6)).any(), f"{case}: no blended pair"


def test_dynamic_follows_transformers_through_prefill_decode_and_reset():
    """A KV-cache sequence of calls on one HF module (growth each step, then a short call that
    resets it) equals our stateless frequencies taken from each call's largest position."""
    rope = ROPE["dynamic"]
    hf = LlamaRotaryEmbedding(hf_config(rope))
    ours = RotaryEmbedding.from_rope_parameters(D, rope, max_position_embeddings=MAX_POS)
    calls = [torch.arange(100)] + [torch.tensor([t]) for t in range(100, 104)] + [torch.arange(10), torch.arange(80)]
    for positions in calls:
        want = hf(torch.zeros(1, positions.numel(), D), positions[None])
        got = ours.cos_sin(positions, torch.float32)
        assert close(got[0], want[0][0], 1e-6) and close(got[1], want[1][0], 1e-6), f"up to {int(positions.max())}"


def test_dynamic_is_stateless_and_shares_q_and_k_frequencies():
    """No hidden state: a call gives the same rotation whatever came before; q and k of one call
    share the frequencies of the longest of their positions."""
    rope = RotaryEmbedding.from_rope_parameters(D, ROPE["dynamic"], max_position_embeddings=MAX_POS)
    x = torch.randn(1, 2, 80, D)
    first = rope.apply(x, torch.arange(80))
    rope.apply(torch.randn(1, 2, 300, D), torch.arange(300))
    assert torch.equal(rope.apply(x, torch.arange(80)), first)
    q, k = torch.randn(1, 2, 1, D), torch.randn(1, 2, 120, D)
    q_rot, k_rot = rope(q, k, torch.tensor([100]), torch.arange(120))
    assert torch.equal(k_rot, rope.apply(k, torch.arange(120)))
    assert torch.equal(q_rot, rope.apply(q, torch.tensor([100]), seq_len=120))
    assert not torch.allclose(q_rot, rope.apply(q, torch.tensor([100])), rtol=1e-6, atol=0)  # 101 differs


@pytest.mark.parametrize("case", ["default", "linear", "dynamic", "yarn", "llama3"])
def test_partial_rotary_equals_transformers_nemotron(case):
    """partial_rotary_factor 0.5: the first int(D * 0.5) features rotate ("rotate_half" within
    them, as Nemotron / GPT-NeoX / Phi), the rest pass through; q and k equal Nemotron's."""
    rope = {**ROPE[case], "partial_rotary_factor": 0.5}
    hf = NemotronRotaryEmbedding(hf_config(rope, cls=NemotronConfig))
    ours = RotaryEmbedding.from_rope_parameters(D, rope, max_position_embeddings=MAX_POS)
    assert ours.rotary_dim == D // 2
    torch.manual_seed(0)
    L = 150
    q, k = torch.randn(2, 4, L, D), torch.randn(2, 2, L, D)
    positions = torch.arange(L).expand(2, L)
    want_q, want_k = nemotron_apply(q, k, *hf(q, positions))
    got_q, got_k = ours(q, k, positions, positions)
    assert close(got_q, want_q, 1e-6) and close(got_k, want_k, 1e-6)
    assert torch.equal(got_q[..., D // 2:], q[..., D // 2:])
    full = RotaryEmbedding.from_rope_parameters(D, ROPE[case], max_position_embeddings=MAX_POS)
    assert not close(full.apply(q, positions), want_q, 1e-6)  # rotating the whole head is caught


def test_old_spellings_parse_like_the_new():
    """transformers < 5 wrote ``rope_scaling`` with ``type``; the numbers are the same."""
    old = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
    assert RopeScaling.from_dict(old) == RopeScaling.from_dict({**ROPE["yarn"]})
    assert RopeScaling.from_dict({"rope_type": "yarn", "factor": 4.0}, max_position_embeddings=ORIGINAL) == \
        RopeScaling.from_dict(ROPE["yarn"], max_position_embeddings=ORIGINAL)  # original from max, as HF
    deepseek = RopeScaling.from_dict({"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16},
                                     max_position_embeddings=64)
    assert deepseek.factor == 4.0  # factor null: max / original, as HF
    assert RopeScaling.from_dict({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16,
                                  "beta_fast": None, "beta_slow": 0}).beta_fast == 32.0


# -- load_llama: logits against LlamaForCausalLM -----------------------------------------------------

SMALL = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
         "vocab_size": 50, "num_hidden_layers": 2, "initializer_range": 0.1, "max_position_embeddings": MAX_POS,
         "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
N = 100  # past max_position_embeddings (64) and far past the original context (16)


def make_hf(rope: dict, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**SMALL, rope_parameters=dict(rope), attn_implementation="eager")).eval()
    with torch.no_grad():  # HF sets norms to 1: re-draw them so a swapped norm would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("case", ["llama3", "yarn", "yarn_deepseek", "dynamic", "linear"])
def test_load_llama_logits_equal_transformers(case):
    hf = make_hf(ROPE[case])
    ids = torch.randint(0, SMALL["vocab_size"], (2, N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        model = load_llama(hf.state_dict(), LlamaConfig(**SMALL, rope_parameters=dict(ROPE[case])))
        assert close(model(ids), want, 1e-5)
        unscaled = load_llama(hf.state_dict(), LlamaConfig(**SMALL, rope_parameters=plain(ROPE[case])))
        assert not close(unscaled(ids), want, 1e-5)  # the test sees a loader that ignores the scaling


def test_load_llama_31_config_json_spellings():
    """A Llama 3.1 config.json (rope_theta + rope_scaling), the 5.x dict and the config object load
    the same model; the architecture records the scaling."""
    hf = make_hf(ROPE["llama3"])
    scaling = {k: v for k, v in ROPE["llama3"].items() if k != "rope_theta"}
    legacy = {**SMALL, "model_type": "llama", "hidden_act": "silu", "rope_theta": 500000.0, "rope_scaling": scaling}
    config = LlamaConfig(**SMALL, rope_parameters=dict(ROPE["llama3"]))
    arch = llama_architecture(legacy)
    assert arch == llama_architecture(config) == llama_architecture(config.to_dict())
    assert arch.rope_theta == 500000.0 and arch.rope_scaling.rope_type == "llama3"
    ids = torch.randint(0, SMALL["vocab_size"], (1, N), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert close(load_llama(hf.state_dict(), legacy)(ids), hf(ids).logits, 1e-5)


def test_top_level_original_max_position_embeddings_wins_as_in_transformers():
    """Phi-3 style: a top-level original_max_position_embeddings overrides the rope dict's (HF's
    standardize_rope_params does so when it builds the rotary embedding)."""
    rope = ROPE["yarn"]  # original 16 in the dict
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SMALL, original_max_position_embeddings=48, rope_parameters=dict(rope),
                                      attn_implementation="eager")).eval()
    config = {**LlamaConfig(**SMALL, rope_parameters=dict(rope)).to_dict(), "original_max_position_embeddings": 48}
    assert llama_architecture(config).rope_scaling.original_max_position_embeddings == 48
    ids = torch.randint(0, SMALL["vocab_size"], (1, N), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert close(load_llama(hf.state_dict(), config)(ids), hf(ids).logits, 1e-5)


def test_load_llama_dynamic_kv_cache_steps_equal_transformers():
    """Prefill past max_position_embeddings, then decode one token at a time with a KV cache: the
    cached keys keep the rotation of their step, in both libraries."""
    hf = make_hf(ROPE["dynamic"])
    model = load_llama(hf.state_dict(), LlamaConfig(**SMALL, rope_parameters=dict(ROPE["dynamic"])))
    unscaled = load_llama(hf.state_dict(), LlamaConfig(**SMALL, rope_parameters=plain(ROPE["dynamic"])))
    ids = torch.randint(0, SMALL["vocab_size"], (1, 75), generator=torch.Generator().manual_seed(3))
    cache, unscaled_cache, past, prefill = model.new_cache(), unscaled.new_cache(), None, 70
    unscaled_steps_match = []
    with torch.no_grad():
        for start, stop in [(0, prefill)] + [(t, t + 1) for t in range(prefill, 75)]:
            out = hf(ids[:, start:stop], cache=past, use_cache=True)
            past = out.cache
            assert close(model(ids[:, start:stop], cache=cache), out.logits, 1e-5), f"tokens {start}..{stop}"
            unscaled_steps_match.append(close(unscaled(ids[:, start:stop], cache=unscaled_cache), out.logits, 1e-5))
    assert not any(unscaled_steps_match)


# -- bad configs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, kwargs, error, message", [
    ({"rope_type": "longrope", "factor": 2.0}, {}, ValueError,
     r"rope_type='longrope' is not supported; expected one of \['default', 'linear', 'dynamic', 'yarn', 'llama3'\]"),
    ({"rope_type": "linear"}, {}, ValueError, r"rope_type='linear' needs \['factor'\]"),
    ({"rope_type": "dynamic", "factor": 2.0}, {}, ValueError, r"needs \['max_position_embeddings'\].*model config"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}, {}, ValueError,
     r"needs \['low_freq_factor', 'high_freq_factor'\]"),
    ({"rope_type": "yarn", "factor": 4.0}, {}, ValueError, r"needs \['original_max_position_embeddings'\]"),
    ({"rope_type": "linear", "factor": "8"}, {}, ValueError, r"factor='8'; expected a positive number"),
    ({"rope_type": "linear", "factor": 0}, {}, ValueError, r"factor=0; expected a positive number"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16, "low_freq_factor": 4.0,
      "high_freq_factor": 1.0}, {}, ValueError, r"high_freq_factor=1.0 must exceed low_freq_factor=4.0"),
    ({"rope_type": "default", "partial_rotary_factor": 1.5}, {}, ValueError, r"partial_rotary_factor=1.5"),
    ({"rope_type": "default", "mrope_section": [4, 4]}, {}, ValueError, r"mrope_section"),
    ([("rope_type", "linear")], {}, TypeError, r"expected a dict"),
])
def test_bad_rope_parameters_are_refused(params, kwargs, error, message):
    with pytest.raises(error, match=message):
        RopeScaling.from_dict(params, **kwargs)


def test_bad_rotary_dims_are_refused():
    with pytest.raises(ValueError, match=r"rotary_dim must be even.*got 5"):  # int(16 * 0.35)
        RotaryEmbedding(16, scaling=RopeScaling(partial_rotary_factor=0.35))
    with pytest.raises(ValueError, match=r"rotary_dim=8 but scaling.partial_rotary_factor=0.25 gives 4"):
        RotaryEmbedding(16, rotary_dim=8, scaling=RopeScaling(partial_rotary_factor=0.25))
    with pytest.raises(ValueError, match=r"rotary_dim=2 needs to be at least 4"):
        RotaryEmbedding(2, scaling=RopeScaling("dynamic", factor=2.0, max_position_embeddings=8))
    with pytest.raises(TypeError, match=r"scaling must be a RopeScaling"):
        RotaryEmbedding(16, scaling={"rope_type": "linear", "factor": 2.0})
    assert set(ROPE_TYPES) == {params["rope_type"] for params in ROPE.values()}


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                          "long_factor": [2.0] * 8}}, r"rope_type='longrope' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     r"rope_type='llama3'.*needs \['low_freq_factor', 'high_freq_factor'\]"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, "max_position_embeddings": None},
     r"needs \['max_position_embeddings'\]"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "partial_rotary_factor": 0.5}},
     r"partial_rotary_factor=0.5; Llama rotates the whole head"),
])
def test_load_llama_refuses_bad_rope_configs(change, message):
    hf = make_hf(ROPE["default"])
    with pytest.raises(CheckpointError, match=message):
        load_llama(hf.state_dict(), {**LlamaConfig(**SMALL).to_dict(), **change})
