"""attnkit.viz.capture: recorded maps equal ak.attention_weights of the same q, k, mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnkit as ak
from attnkit import nn as aknn
from attnkit.viz import AttentionRecord, capture

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


def test_pooled_equals_pooling_the_dense_map():
    torch.manual_seed(1)
    B, N, D = 2, 70, 16
    q, k = torch.randn(B, H, N, D), torch.randn(B, 2, N, D)
    mask = ak.sliding_window(9) | ak.global_tokens([0, 33])
    rec = AttentionRecord("x", q, k, mask, None, None)
    dense = ak.attention_weights(q, k.repeat_interleave(2, 1), mask=mask).double()  # (B, H, N, N)
    for block in (8, 16, 70):
        nb = -(-N // block)
        padded = nn.functional.pad(dense, (0, nb * block - N, 0, nb * block - N))
        sums = padded.reshape(B, H, nb, block, nb, block).sum((3, 5))
        counts = torch.bincount(torch.arange(N) // block, minlength=nb).double()
        want = sums / (counts[:, None] * counts[None, :])
        assert torch.allclose(rec.pooled(block).double(), want, atol=1e-6)


def test_capture_detaches_and_removes_itself():
    model = decoder()
    ids = torch.randint(0, V, (1, 5))
    with capture(model) as cap:
        model(ids)
    assert not cap["blocks.0.attn"].q.requires_grad
    assert all(not m.observers for m in model.modules() if isinstance(m, aknn.MultiHeadAttention))
    with pytest.raises(ValueError, match="no attnkit MultiHeadAttention named"):
        with capture(model, layers=["blocks.9.attn"]):
            pass
    with pytest.raises(KeyError, match="recorded"):
        cap["nope"]


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
