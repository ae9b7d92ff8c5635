"""attnkit.approx.audit: every attention layer found, its numbers equal an independent computation on
q, k, v taken from the layers' own projections (forward hooks, not the observers audit uses), refusals
carry their reason, observers leave, the CPU memory tracker counts what a call allocates."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

import attnkit as ak
from attnkit import nn as aknn
from attnkit.approx import LinearAttention
from attnkit.approx._peak import measure_peak
from attnkit.approx.audit import EXACT, AuditReport, audit

E, H, HKV, V, N = 32, 4, 2, 40, 11
D = E // H


class ExactCore(nn.Module):
    """A core that is exact by construction: whatever error audit reports for it is plumbing."""

    def forward(self, q, k, v, *, mask=None, scale=None, cache=None):
        return ak.attention(q, k, v, mask=mask, scale=scale)


class RefusingCore(nn.Module):
    def forward(self, q, k, v, *, mask=None, scale=None, cache=None):
        raise ValueError(f"RefusingCore: Nk={k.shape[2]} is not for me")


class SpyCore(ExactCore):
    """Exact, and keeps what audit handed it: one entry per distinct q (audit calls a core a few
    times per layer: measured, warmed up, timed)."""

    def __init__(self):
        super().__init__()
        self.calls: dict = {}

    @property
    def seen(self) -> list:
        return list(self.calls.values())

    def forward(self, q, k, v, *, mask=None, scale=None, cache=None):
        self.calls.setdefault(id(q), (q, k, v, mask))
        return super().forward(q, k, v, mask=mask, scale=scale)


def decoder(positional="rope", seed=0) -> aknn.DecoderLM:
    torch.manual_seed(seed)
    pos = {"rope": lambda: aknn.RotaryEmbedding(D), "alibi": lambda: aknn.ALiBi(H)}[positional]
    blocks = [aknn.PreNormBlock(aknn.MultiHeadAttention(E, H, num_kv_heads=HKV, positional=pos()),
                                aknn.SwiGLU(E, 48), aknn.RMSNorm(E), aknn.RMSNorm(E)) for _ in range(2)]
    return aknn.DecoderLM(aknn.TokenEmbeddings(V, E), blocks, aknn.RMSNorm(E), nn.Linear(E, V)).double().eval()


def encoder(seed=0) -> aknn.Encoder:
    torch.manual_seed(seed)
    blocks = [aknn.PostNormBlock(aknn.MultiHeadAttention(E, H), aknn.FeedForward(E, 48), nn.LayerNorm(E),
                                 nn.LayerNorm(E)) for _ in range(3)]
    return aknn.Encoder(aknn.TokenEmbeddings(V, E), blocks).double().eval()


def ids(B=2, n=N, seed=1):
    return torch.randint(0, V, (B, n), generator=torch.Generator().manual_seed(seed))


def mha_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, aknn.MultiHeadAttention)]


# -- an independent oracle: q, k, v from each layer's own projections, attention and metrics by formula -----


def layer_inputs(model, *args, **kwargs) -> list:
    """Each MultiHeadAttention's input x, caught by forward pre-hooks in a separate run."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.append((mod, a[0])))
             for m in model.modules() if isinstance(m, aknn.MultiHeadAttention)]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def qkv_by_hand(attn: aknn.MultiHeadAttention, x: torch.Tensor):
    B, n, _ = x.shape
    q = attn.q_proj(x).view(B, n, attn.num_heads, D).transpose(1, 2)  # (B, H, N, D)
    k, v = (p(x).view(B, n, attn.num_kv_heads, D).transpose(1, 2) for p in (attn.k_proj, attn.v_proj))
    if attn.positional is not None:
        pos = torch.arange(n)
        q, k = attn.positional.rotate(q, k, pos, pos)
    group = attn.num_heads // attn.num_kv_heads
    return q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)


def softmax_attention(q, k, v, allowed):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, Nq, Nk)
    return torch.softmax(s.masked_fill(~allowed, -math.inf), -1) @ v


def linear_attention_quadratic(q, k, v, allowed):
    """Katharopoulos et al. eq. 4 in its quadratic form, phi = elu + 1."""
    w = ((Fn.elu(q) + 1) @ (Fn.elu(k) + 1).transpose(-1, -2)) * allowed  # (B, H, Nq, Nk)
    return (w @ v) / w.sum(-1, keepdim=True)


def metrics_by_hand(a, e):
    heads = range(a.shape[1])
    rel = [(torch.linalg.vector_norm(a[:, h] - e[:, h]) / torch.linalg.vector_norm(e[:, h])).item() for h in heads]
    mx = [(a[:, h] - e[:, h]).abs().max().item() for h in heads]
    cos = [Fn.cosine_similarity(a[:, h], e[:, h], dim=-1).mean().item() for h in heads]
    return rel, mx, cos


def assert_metrics(row, a, e, rtol):
    rel, mx, cos = metrics_by_hand(a, e)
    assert row.refused is None
    torch.testing.assert_close(torch.tensor(row.rel_l2), torch.tensor(rel), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(torch.tensor(row.max_abs), torch.tensor(mx), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(torch.tensor(row.cosine), torch.tensor(cos), rtol=rtol, atol=1e-12)
    assert max(rel) > 1e-3  # linear attention is not exact: the comparison has something to compare


# -- attnkit models -------------------------------------------------------------------------------------


def test_decoder_every_layer_and_linear_attention_equal_the_oracle():
    model, x = decoder(), ids()
    report = audit(model, x, methods={"exact core": ExactCore(), "linear": LinearAttention()}, repeats=1)
    assert report.layers == mha_names(model) and report.methods == (EXACT, "exact core", "linear")
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    for (attn, inp), name in zip(layer_inputs(model, x), mha_names(model)):
        q, k, v = qkv_by_hand(attn, inp)
        exact = softmax_attention(q, k, v, causal)
        assert_metrics(report.row(name, "linear"), linear_attention_quadratic(q, k, v, causal), exact, 1e-9)
        for method in (EXACT, "exact core"):
            assert max(report.row(name, method).rel_l2) < 1e-12
            assert min(report.row(name, method).cosine) > 1 - 1e-12


def test_encoder_with_padding_equals_the_oracle_and_counts_time_and_memory():
    model, x = encoder(), ids()
    am = torch.ones(2, N, dtype=torch.long)
    am[0, 7:] = 0  # right padding: the encoder keeps token order
    report = audit(model, x, attention_mask=am, methods={"linear": LinearAttention()}, repeats=2)
    assert report.layers == mha_names(model)
    allowed = am.bool()[:, None, None, :]  # (B, 1, 1, Nk)
    for (attn, inp), name in zip(layer_inputs(model, x, attention_mask=am), mha_names(model)):
        q, k, v = qkv_by_hand(attn, inp)
        assert_metrics(report.row(name, "linear"), linear_attention_quadratic(q, k, v, allowed),
                       softmax_attention(q, k, v, allowed), 1e-9)
        for method in report.methods:
            row = report.row(name, method)
            out_bytes = 2 * H * N * D * 8  # the (B, Hq, Nq, Dv) float64 output is alive at the end
            assert row.peak_bytes >= out_bytes and row.exact_peak_bytes >= out_bytes
            assert row.seconds > 0 and row.exact_seconds > 0 and row.shape == (2, H, H, N, N, D, D)


def test_refusals_carry_their_reason_and_other_methods_still_run():
    report = audit(decoder(), ids(), methods={"no": RefusingCore(), "linear": LinearAttention()}, repeats=1)
    for name in report.layers:
        assert report.row(name, "no").refused == f"RefusingCore: Nk={N} is not for me"
        assert report.row(name, "no").rel_l2 == () and report.row(name, "linear").refused is None
    assert f"refused: RefusingCore: Nk={N} is not for me" in report.table()
    assert set(report.per_head("linear")) == set(report.layers) and report.per_head("no") == {}


def test_a_layer_with_a_bias_is_refused_for_every_core_but_measured_exactly():
    report = audit(decoder("alibi"), ids(), methods={"exact core": ExactCore()}, repeats=1)
    for name in report.layers:
        assert "bias" in report.row(name, "exact core").refused
        assert report.row(name, EXACT).refused is None and max(report.row(name, EXACT).rel_l2) < 1e-12


def test_default_methods_refuse_causal_where_they_cannot_be_causal():
    report = audit(decoder(), ids(), repeats=1)
    names = report.methods[1:]
    assert len(names) == 4 and names[0].startswith("linear") and names[1].startswith("performer")
    assert any("untrained" in note for note in report.notes)
    for name in report.layers:
        for method in names:
            row = report.row(name, method)
            if method.startswith(("linformer", "nystrom")):
                assert "causal" in row.refused
            else:
                assert row.refused is None and 0 < row.mean_rel_l2 < 1


# -- what the report is made of --------------------------------------------------------------------------


def test_table_json_and_per_head_hold_every_row():
    report = audit(encoder(), ids(), methods={"linear": LinearAttention(), "no": RefusingCore()}, repeats=1)
    assert isinstance(report, AuditReport) and len(report.rows) == 3 * len(report.layers)
    lines = report.table().splitlines()
    assert len(lines) == 2 + len(report.rows) and all(line.count("|") - line.count("\\|") == 11 for line in lines)
    data = json.loads(report.to_json())
    assert [(r["layer"], r["method"]) for r in data["rows"]] == [(r.layer, r.method) for r in report.rows]
    row = report.row(report.layers[1], "linear")
    assert report.per_head("linear")[report.layers[1]]["rel_l2"] == row.rel_l2
    assert row.worst_head == max(range(H), key=lambda h: row.rel_l2[h])
    assert report.table() in str(report)
    with pytest.raises(KeyError, match="performer"):
        report.per_head("performer")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="repeats"):
        audit(encoder(), ids(), repeats=0)
    with pytest.raises(ValueError, match="exact"):
        audit(encoder(), ids(), methods={EXACT: ExactCore()})
    with pytest.raises(TypeError, match="mapping"):
        audit(encoder(), ids(), methods=[ExactCore()])


def test_a_model_without_attnkit_attention_raises():
    torch_model = nn.TransformerEncoderLayer(E, H, batch_first=True)
    with pytest.raises(ValueError, match="no attention call to audit.*MultiHeadAttention"):
        audit(torch_model, torch.randn(2, N, E))
    cored = aknn.MultiHeadAttention(E, H, core=LinearAttention())
    with pytest.raises(ValueError, match="already run an approximate core"):
        audit(cored, torch.randn(2, N, E))


def test_observers_are_removed_also_when_the_model_raises():
    model = decoder()
    audit(model, ids(), methods={}, repeats=1)
    assert all(not m.observers for m in model.modules() if isinstance(m, aknn.MultiHeadAttention))

    class Raises(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = decoder()

        def forward(self, x):
            self.inner(x)
            raise RuntimeError("boom")

    broken = Raises()
    with pytest.raises(RuntimeError, match="boom"):
        audit(broken, ids())
    assert all(not m.observers for m in broken.modules() if isinstance(m, aknn.MultiHeadAttention))


# -- the memory tracker --------------------------------------------------------------------------------

MB4 = 1 << 20  # float32 elements in 4 MiB


def test_peak_tracker_counts_a_known_allocation():
    out, peak = measure_peak(lambda: torch.ones(MB4), "cpu")
    assert 4 * MB4 <= peak < 4 * MB4 + 4096 and out.numel() == MB4


def test_peak_tracker_subtracts_what_is_freed_and_ignores_inputs():
    x = torch.randn(512, 512)

    def twice():
        for _ in range(2):
            t = torch.ones(MB4)
            del t
        return x.t()[:3]  # a view of an input: allocates nothing

    _, peak = measure_peak(twice, "cpu")
    assert 4 * MB4 <= peak < 5 * MB4
    _, peak = measure_peak(lambda: (x.t(), x.add_(1), x[2:]), "cpu")
    assert peak == 0


# -- the plot --------------------------------------------------------------------------------------------


def test_plot_audit_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from attnkit.viz.plot import plot_audit

    report = audit(decoder(), ids(), methods={"linear": LinearAttention(), "no": RefusingCore()}, repeats=1)
    path = plot_audit(report, tmp_path / "audit.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


# -- Hugging Face transformers, attn_implementation="attnkit" ------------------------------------------------


def bert(impl="attnkit"):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("attnkit.integrations.transformers")
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=E, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=H, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel._from_config(cfg, attn_implementation=impl).eval()


def hf_qkv(model, x, am):
    """q, k, v of every BertSelfAttention, from forward hooks on its query / key / value projections."""
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("SelfAttention")]
    outs: dict = {}
    hooks = [getattr(m, p).register_forward_hook(lambda mod, a, out, key=(n, p): outs.__setitem__(key, out))
             for n, m in layers for p in ("query", "key", "value")]
    try:
        with torch.no_grad():
            model(x, attention_mask=am)
    finally:
        for h in hooks:
            h.remove()
    heads = {key: out.view(*out.shape[:2], H, D).transpose(1, 2) for key, out in outs.items()}
    return {n: tuple(heads[(n, p)] for p in ("query", "key", "value")) for n, _ in layers}


def test_transformers_bert_every_layer_v_and_metrics():
    model, x = bert(), ids()
    am = torch.ones(2, N, dtype=torch.long)
    am[1, 8:] = 0
    spy = SpyCore()
    report = audit(model, x, attention_mask=am, methods={"spy": spy, "linear": LinearAttention()}, repeats=1)
    by_hand = hf_qkv(model, x, am)
    assert report.layers == list(by_hand) and len(report.layers) == 2
    allowed = am.bool()[:, None, None, :]
    assert len(spy.seen) == len(report.layers)
    for (q_seen, k_seen, v_seen, _), name in zip(spy.seen, report.layers):
        q, k, v = by_hand[name]
        torch.testing.assert_close(v_seen, v, rtol=0, atol=0)  # AttentionCall.v is the layer's value
        torch.testing.assert_close(q_seen, q, rtol=0, atol=0)
        assert max(report.row(name, "spy").rel_l2) < 1e-6
        q64, k64, v64 = q.double(), k.double(), v.double()
        assert_metrics(report.row(name, "linear"), linear_attention_quadratic(q64, k64, v64, allowed),
                       softmax_attention(q64, k64, v64, allowed), 1e-3)


def test_transformers_model_without_attnkit_attention_raises():
    akt = pytest.importorskip("attnkit.integrations.transformers")
    with pytest.raises(ValueError, match="attn_implementation='attnkit'"):
        audit(bert("eager"), ids())
    assert akt._observers.get() == ()
