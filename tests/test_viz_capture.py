"""attnkit.viz.capture: recorded maps equal ak.attention_weights of the same q, k, mask; a Longformer
layer's map equals a dense oracle built from its weights and the map HF's module reports."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import attnkit as ak
from attnkit import nn as aknn
from attnkit.viz import AttentionRecord, LongformerRecord, capture

capture_module = importlib.import_module("attnkit.viz.capture")  # the attribute viz.capture is the function

E, H, V = 32, 4, 40


def decoder(pos="rope") -> aknn.DecoderLM:
    torch.manual_seed(0)
    positional = {"rope": lambda: aknn.RotaryEmbedding(E // H), "alibi": lambda: aknn.ALiBi(H)}[pos]
    blocks = [aknn.PreNormBlock(aknn.MultiHeadAttention(E, H, num_kv_heads=2, positional=positional()),
                                aknn.SwiGLU(E, 64), aknn.RMSNorm(E), aknn.RMSNorm(E)) for _ in range(2)]
    return aknn.DecoderLM(aknn.TokenEmbeddings(V, E), blocks, aknn.RMSNorm(E), nn.Linear(E, V)).eval()


def by_hand(model, ids, layer: int, mask) -> torch.Tensor:
    """Layer ``layer``'s probabilities from its own projections, outside the capture."""
    x = model.embeddings(ids)
    for block in model.blocks[:layer]:
        x = block(x, aknn.Context(mask=mask))
    attn = model.blocks[layer].attn
    h = model.blocks[layer].norm1(x)
    q, k = attn._heads(attn.q_proj(h), H), attn._heads(attn.k_proj(h), 2)
    pos = torch.arange(ids.shape[1])
    if isinstance(attn.positional, aknn.RotaryEmbedding):
        q, k = attn.positional.rotate(q, k, pos, pos)
    bias = attn.positional.bias() if isinstance(attn.positional, aknn.ALiBi) else None
    return ak.attention_weights(q, k, mask=mask, bias=bias)


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_captured_maps_equal_attention_weights(pos):
    model = decoder(pos)
    ids = torch.randint(0, V, (2, 13))
    with torch.no_grad(), capture(model) as cap:
        model(ids)
    assert cap.names == ["blocks.0.attn", "blocks.1.attn"]
    for layer in range(2):
        with torch.no_grad():
            want = by_hand(model, ids, layer, ak.causal())  # (B, H, N, N)
        rec = cap[f"blocks.{layer}.attn"]
        assert torch.allclose(rec.weights(), want, atol=1e-6)
        sub = rec.weights(rows=[0, 7, 12], heads=[3, 1], batch=[1])  # rows keep their causal place
        assert torch.allclose(sub, want[1:, [3, 1]][:, :, [0, 7, 12]], atol=1e-6)


def test_decoding_steps_are_recorded_with_the_cache():
    model = decoder()
    ids = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        full = by_hand(model, ids, 1, ak.causal())
        cache = model.new_cache()
        with capture(model, layers=["blocks.1.attn"]) as cap:
            model(ids[:, :9], cache=cache)
            model(ids[:, 9:], cache=cache)
    steps = cap.records["blocks.1.attn"]
    assert len(steps) == 2 and cap.names == ["blocks.1.attn"]
    assert torch.allclose(steps[1].weights(), full[:, :, 9:], atol=1e-6)  # one query over 10 keys


def pool_dense(dense: torch.Tensor, block: int) -> torch.Tensor:
    """Block means of a dense square map (B, H, N, N), edge blocks averaging what they hold."""
    B, Hd, N, _ = dense.shape
    nb = -(-N // block)
    padded = nn.functional.pad(dense.double(), (0, nb * block - N, 0, nb * block - N))
    sums = padded.reshape(B, Hd, nb, block, nb, block).sum((3, 5))  # (B, H, nb, nb)
    counts = torch.bincount(torch.arange(N) // block, minlength=nb).double()
    return sums / (counts[:, None] * counts[None, :])


def test_pooled_equals_pooling_the_dense_map():
    torch.manual_seed(1)
    B, N, D = 2, 70, 16
    q, k = torch.randn(B, H, N, D), torch.randn(B, 2, N, D)
    mask = ak.sliding_window(9) | ak.global_tokens([0, 33])
    rec = AttentionRecord("x", q, k, mask, None, None)
    dense = ak.attention_weights(q, k.repeat_interleave(2, 1), mask=mask)  # (B, H, N, N)
    for block in (8, 16, 70):
        assert torch.allclose(rec.pooled(block).double(), pool_dense(dense, block), atol=1e-6)


def test_capture_detaches_and_removes_itself():
    model = decoder()
    ids = torch.randint(0, V, (1, 5))
    with capture(model) as cap:
        model(ids)
    assert not cap["blocks.0.attn"].q.requires_grad
    assert all(not m.observers for m in model.modules() if isinstance(m, aknn.MultiHeadAttention))
    with pytest.raises(ValueError, match="no attnkit MultiHeadAttention or LongformerSelfAttention named"):
        with capture(model, layers=["blocks.9.attn"]):
            pass
    with pytest.raises(KeyError, match="recorded"):
        cap["nope"]


# -- Longformer layers -------------------------------------------------------------------------

LW, LN, LB = 4, 23, 3  # one-sided window w, tokens (a multiple of nothing here), batch


def longformer_case(with_mask: bool = True):
    """A small random layer, hidden states and HF's 0/1/2 mask: sample 0 has no padding and global
    tokens at 0, 11, 22; sample 1 has padding from 19 and no global token; sample 2 has padding from
    14 and global tokens at 5 and 13 (its last real token). None when ``with_mask`` is False."""
    torch.manual_seed(2)
    layer = aknn.LongformerSelfAttention(E, H, attention_window=2 * LW).eval()
    for p in layer.parameters():  # bigger weights than the default init: peaked, distinct maps
        nn.init.normal_(p, std=0.3)
    x = torch.randn(LB, LN, E)
    m = torch.ones(LB, LN, dtype=torch.long)
    m[1, 19:], m[2, 14:] = 0, 0
    m[0, [0, 11, 22]], m[2, [5, 13]] = 2, 2
    return layer, x, (m if with_mask else None)


def longformer_by_hand(layer, x, m) -> torch.Tensor:
    """The layer's map (B, H, N, N) from its projections: local rows with query / key under the
    band | global rows and columns, real keys only; global rows with query_global / key_global over
    every real key; padding rows 0."""
    B, N, _ = x.shape
    m = torch.ones(B, N, dtype=torch.long) if m is None else m
    valid, is_global = m != 0, m == 2  # (B, N)

    def heads(t):
        return t.view(B, N, H, E // H).transpose(1, 2)  # (B, H, N, D)

    pos = torch.arange(N)
    band = (pos[:, None] - pos[None, :]).abs() <= LW  # (N, N)
    local = (band | is_global[:, :, None] | is_global[:, None, :]) & valid[:, None, :]  # (B, N, N)
    w_local = ak.attention_weights(heads(layer.query(x)), heads(layer.key(x)), mask=local[:, None])
    w_global = ak.attention_weights(heads(layer.query_global(x)), heads(layer.key_global(x)),
                                    mask=valid[:, None, None, :].expand(B, 1, N, N))  # every row, as if global
    w = torch.where(is_global[:, None, :, None], w_global, w_local)  # (B, H, N, N)
    return w.masked_fill(~valid[:, None, :, None], 0.0)


def captured_longformer(layer, x, m) -> LongformerRecord:
    with torch.no_grad(), capture(layer) as cap:
        layer(x, m)
    return cap[""]


@pytest.mark.parametrize("with_mask", [True, False], ids=["padding_and_global", "no_mask"])
def test_longformer_maps_equal_a_dense_oracle(with_mask):
    layer, x, m = longformer_case(with_mask)
    rec = captured_longformer(layer, x, m)
    with torch.no_grad():
        want = longformer_by_hand(layer, x, m)  # (B, H, N, N)
    assert isinstance(rec, LongformerRecord) and rec.shape == (LB, H, LN, LN)
    assert (rec.global_ is None) == (not with_mask)
    torch.testing.assert_close(rec.weights(), want, rtol=0, atol=1e-6)
    # 22 / 0 / 11: global in sample 0; 5, 13: global in sample 2; 16, 22: padding in sample 2
    rows, heads, batch = [22, 0, 5, 16, 13, 11], [3, 1], [2, 0]
    torch.testing.assert_close(rec.weights(rows=rows, heads=heads, batch=batch),
                               want[batch][:, heads][:, :, rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(rec.weights(rows=[7], batch=[1]), want[1:2, :, 7:8], rtol=0, atol=1e-6)


def hf_dense_map(hf, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """HF's attention map (B, H, N, N), rebuilt from what its output_attentions returns.

    HF is called as LongformerModel calls it (N padded to a multiple of the window with mask-0
    tokens, mask extended to finfo.min / 0 / finfo.max). It returns the local probabilities as
    (B, Np, H, G + 2w + 1): column s < G is the key at sample b's s-th global position, column
    G + d the key at i + d - w (0 there when that key is global or padding); global tokens' rows
    are 0 there and come as (B, H, G, Np) in the global tensor, slot s = s-th global position.
    """
    B, N, _ = x.shape
    w = hf.one_sided_attn_window_size
    pad = (-N) % (2 * w)
    x_p = torch.cat([x, torch.zeros(B, pad, x.shape[2])], 1)  # (B, Np, E)
    m_p = nn.functional.pad(m, (0, pad), value=0)  # (B, Np)
    ext = torch.zeros(m_p.shape)
    ext[m_p == 0], ext[m_p == 2] = torch.finfo(x.dtype).min, torch.finfo(x.dtype).max
    is_global = ext > 0
    with torch.no_grad():
        _, local, *glob = hf(x_p, attention_mask=ext, is_index_masked=ext < 0, is_index_global_attn=is_global,
                             is_global_attn=bool(is_global.any()), output_attentions=True)
    Np, G = x_p.shape[1], local.shape[-1] - (2 * w + 1)
    i, d = torch.arange(Np)[:, None], torch.arange(2 * w + 1)[None, :]
    j = i + d - w  # (Np, 2w + 1): the key of each band column
    band = local[..., G:].permute(0, 2, 1, 3)  # (B, H, Np, 2w + 1)
    band = torch.where((j >= 0) & (j < Np), band, 0.0)
    dense = torch.zeros(B, H, Np, Np).scatter_add_(3, j.clamp(0, Np - 1).expand(B, H, Np, -1), band)
    for b in range(B):
        g_pos = is_global[b].nonzero().flatten()  # ascending, HF's slot order
        if len(g_pos):
            dense[b][:, :, g_pos] += local[b, :, :, :len(g_pos)].transpose(0, 1)  # (H, Np, g)
            dense[b][:, g_pos, :] = glob[0][b, :, :len(g_pos)]  # (H, g, Np)
    return dense[:, :, :N, :N]


def test_longformer_maps_equal_hf_output_attentions():
    pytest.importorskip("transformers")
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention as HFLongformer

    layer, x, m = longformer_case()
    cfg = LongformerConfig(hidden_size=E, num_attention_heads=H, attention_window=[2 * LW])
    hf = HFLongformer(cfg, layer_id=0).eval()
    hf.load_state_dict(layer.state_dict())
    want = hf_dense_map(hf, x, m)  # (B, H, N, N)
    real_rows = (m != 0)[:, None, :].expand(-1, H, -1).float()  # (B, H, N)
    torch.testing.assert_close(want.sum(-1), real_rows, rtol=0, atol=1e-5)  # the rebuild lost nothing
    rec = captured_longformer(layer, x, m)
    torch.testing.assert_close(rec.weights(), want, rtol=0, atol=1e-5)


def test_longformer_pooled_equals_pooling_the_dense_map(monkeypatch):
    layer, x, m = longformer_case()
    rec = captured_longformer(layer, x, m)
    with torch.no_grad():
        dense = longformer_by_hand(layer, x, m)  # (B, H, N, N)
    monkeypatch.setattr(capture_module, "ROW_BLOCK", 4)  # several row steps, some without a global row
    most_rows = []
    real_weights = AttentionRecord.weights

    def counting(self, **kw):
        out = real_weights(self, **kw)
        most_rows.append(out.shape[2])
        return out

    monkeypatch.setattr(AttentionRecord, "weights", counting)
    for block in (1, 4, 5, LN):
        torch.testing.assert_close(rec.pooled(block).double(), pool_dense(dense, block), rtol=0, atol=1e-6)
    want = pool_dense(dense[[1, 2]][:, [2]], 5)
    torch.testing.assert_close(rec.pooled(5, heads=[2], batch=[1, 2]).double(), want, rtol=0, atol=1e-6)
    assert max(most_rows) <= LN and max(most_rows[-5:]) <= 5, "pooled computes a block of rows at a time"


def test_longformer_output_is_unchanged_while_capturing():
    layer, x, m = longformer_case()
    x = x.requires_grad_(True)
    plain = layer(x, m)
    with capture(layer) as cap:
        captured = layer(x, m)
    assert torch.equal(plain, captured)
    rec = cap[""]
    assert not (rec.local.q.requires_grad or rec.local.k.requires_grad or rec.global_.q.requires_grad)
    assert not layer.observers
    assert torch.equal(layer(x, m), plain)


class Mixed(nn.Module):
    """A MultiHeadAttention followed by a Longformer layer."""

    def __init__(self):
        super().__init__()
        self.mha = aknn.MultiHeadAttention(E, H)
        self.longformer = aknn.LongformerSelfAttention(E, H, attention_window=2 * LW)

    def forward(self, x, m):
        return self.longformer(self.mha(x), m)


def test_capture_names_either_kind_of_layer():
    torch.manual_seed(3)
    model, (_, x, m) = Mixed().eval(), longformer_case()
    with torch.no_grad(), capture(model) as every:
        model(x, m)
    assert every.names == ["mha", "longformer"]
    assert isinstance(every["mha"], AttentionRecord) and isinstance(every["longformer"], LongformerRecord)
    with torch.no_grad(), capture(model, layers=["longformer"]) as only:
        model(x, m)
    assert only.names == ["longformer"]
    torch.testing.assert_close(only["longformer"].weights(), every["longformer"].weights(), rtol=0, atol=0)
    pattern = (r"no attnkit MultiHeadAttention or LongformerSelfAttention named \['nope'\]; "
               r"the model has \['mha', 'longformer'\]")
    with pytest.raises(ValueError, match=pattern), capture(model, layers=["longformer", "nope"]):
        pass
    assert not model.mha.observers and not model.longformer.observers



CAPTURE_32K = r"""
import json, resource, torch
import attnkit as ak
from attnkit import nn as aknn
from attnkit.bench.process import peak_rss_mb, reset_peak_rss
from attnkit.viz import capture

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

torch.manual_seed(0)
N = 32768
mha = aknn.MultiHeadAttention(64, 2, positional=aknn.RotaryEmbedding(32)).eval()
x = torch.randn(1, N, 64)
with torch.no_grad():
    mha(x, mask=ak.causal())  # warm-up outside the measurement
    base = rss_mb(); reset_peak_rss()
    with capture(mha) as cap:
        mha(x, mask=ak.causal())
    rec = cap[""]
    pooled = rec.pooled(512, heads=[0])  # (1, 1, 64, 64)
    rows = rec.weights(rows=[0, 1, N // 2, N - 1])  # (1, 2, 4, N)
extra = peak_rss_mb() - base
col = torch.full((64,), 512.0)
print(json.dumps({"extra_mb": extra, "pooled_shape": list(pooled.shape),
                  "pooled_row_sums": ((pooled[0, 0].double() * col).sum(-1)).tolist(),
                  "rows_sums": rows.sum(-1).flatten().tolist(), "first_row_first": rows[0, 0, 0, 0].item()}))
"""


def test_capture_at_32768_stays_under_2_gb():
    """In a fresh process: forward with a capture, a pooled map and 4 full rows at N=32768."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", CAPTURE_32K], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["extra_mb"] < 2048, f"extra peak memory {got['extra_mb']:.0f} MB"
    assert got["pooled_shape"] == [1, 1, 64, 64]
    assert max(abs(s - 1) for s in got["pooled_row_sums"]) < 1e-4  # every causal row sums to 1
    assert max(abs(s - 1) for s in got["rows_sums"]) < 1e-4 and abs(got["first_row_first"] - 1) < 1e-6


@pytest.mark.parametrize("model", [nn.Linear(8, 8), nn.Sequential(),
                                   nn.TransformerEncoderLayer(16, 2, batch_first=True)],  # torch's own attention
                         ids=["linear", "empty", "torch-transformer"])
def test_a_model_without_attnkit_attention_layers_is_refused_at_entry(model):
    with pytest.raises(ValueError, match=r"no attnkit attention layers found in this model \(\w+\); capture "
                                         r"records attnkit.nn.MultiHeadAttention and attnkit.nn.LongformerSelfAttention"):
        with capture(model):
            pytest.fail("capture entered a model it can record nothing of")


def test_capture_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="expected a torch nn.Module, got function"):
        with capture(lambda x: x):
            pass


class _Tagged(aknn.MultiHeadAttention):
    """An attention layer with a sublayer that already bears the class name."""

    def __init__(self):
        super().__init__(E, H)
        self._Tagged = aknn.MultiHeadAttention(E, H)  # named "_Tagged": the root becomes "<_Tagged>"


@pytest.mark.parametrize("make,name", [
    (lambda: aknn.MultiHeadAttention(E, H), "MultiHeadAttention"),
    (lambda: longformer_case()[0], "LongformerSelfAttention"),
    (_Tagged, "<_Tagged>"),
])
def test_a_captured_attention_layer_itself_is_named_by_its_class(make, name):
    """named_modules() calls the root ''; a capture calls it by its class name, and '' still finds it."""
    layer = make()
    x = torch.randn(1, 6, E)
    with torch.no_grad(), capture(layer) as cap:
        layer(x)
    assert cap.names[0] == name and cap[name].name == name
    assert cap[""] is cap[name]
    for layers in ([name], [""]):
        with torch.no_grad(), capture(layer, layers=layers) as only:
            layer(x)
        assert only.names == [name], layers
    with pytest.raises(ValueError, match=rf"the model has \['{name}'"):
        with capture(layer, layers=["nope"]):
            pass


def test_capture_of_a_softcapped_module_caps_its_maps():
    """MultiHeadAttention(softcap=c): the recorded maps are softmax(c * tanh(s / c)), what it ran."""
    torch.manual_seed(0)
    mha = aknn.MultiHeadAttention(16, 2, softcap=0.5).double()
    x = torch.randn(1, 7, 16, dtype=torch.float64) * 5
    with capture(mha) as cap:
        mha(x, mask=ak.causal())
    q, k = (p(x).view(1, 7, 2, 8).transpose(1, 2) for p in (mha.q_proj, mha.k_proj))
    want = ak.attention_weights(q, k, mask=ak.causal(), softcap=0.5)
    got = cap["MultiHeadAttention"].weights()
    assert torch.allclose(got, want, atol=1e-12)
    assert (got - ak.attention_weights(q, k, mask=ak.causal())).abs().max() > 1e-3
