"""The interactive page's data and HTML (no browser here; tests/test_viz_browser.py drives one).

What the page shows must be the attention itself: its kept links are the top-k of the dense map
``ak.attention_weights`` gives, its thumbnails the pooled map, its statistics those of
``attnkit.viz.analysis`` on the dense map, its rollout ``attention_rollout``. And the HTML must be
one inert file: no network address, no markup from the data.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import sys

import pytest
import torch
from torch import nn

import attnkit as ak
from attnkit.nn import MultiHeadAttention
from attnkit.viz import attention_rollout, capture, head_entropy, mean_attention_distance, special_token_attention
from attnkit.viz.page import ROLLOUT_LIMIT, page_data, render_html, write_html

INJECTION = "<img src=x onerror=alert(1)>"


class Stack(nn.Module):
    """L residual self-attention layers: enough for capture and the page (GQA: 4 query, 2 kv heads)."""

    def __init__(self, layers: int = 3, dim: int = 32, heads: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(MultiHeadAttention(dim, heads, num_kv_heads=2) for _ in range(layers))

    def forward(self, x, mask=None):
        for attn in self.layers:
            x = x + attn(x, mask=mask)
        return x


def run(N: int, mask=None, B: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = Stack()
    x = torch.randn(B, N, 32)
    with torch.no_grad(), capture(model) as cap:
        model(x, mask=mask)
    return cap


def dense(cap, name: str, batch: int) -> torch.Tensor:
    """The oracle: (H, N, N) from the record's q, k and mask through ak.attention_weights."""
    rec = cap[name]
    k = rec.k.repeat_interleave(rec.q.shape[1] // rec.k.shape[1], dim=1)
    w = ak.attention_weights(rec.q.double(), k.double(), mask=rec.mask)  # (B, H, N, N)
    return w[batch]


def unpack(text: str, bits: int) -> torch.Tensor:
    raw = bytearray(base64.b64decode(text))
    dtype = {8: torch.uint8, 16: torch.int16, 32: torch.int32}[bits]
    v = torch.frombuffer(raw, dtype=dtype).long()
    return v % (2 ** bits)  # the page reads them unsigned


def tokens(N: int) -> list[str]:
    return [f"t{i}" for i in range(N)]


@pytest.mark.parametrize("N,mask,top_k", [(19, ak.causal(), None), (300, ak.sliding_window(20) | ak.global_tokens([0, 7]), 6),
                                          (40, ak.document([0] * 15 + [1] * 25), 5),
                                          (23, ~ak.causal(), None)])  # the last row attends to nothing
def test_links_thumbnails_and_stats_are_the_attention(N, mask, top_k):
    cap = run(N, mask)
    special = [0, N - 1]
    data = page_data(cap, tokens(N), batch=1, top_k=top_k, special=special, overview=64)
    k, M, block = data["k"], data["m"], data["block"]
    assert k == (N if top_k is None else top_k) and M == -(-N // block) and M <= 64
    for l, name in enumerate(cap.names):
        layer = data["layers"][l]
        want = dense(cap, name, batch=1)  # (H, N, N)
        H = want.shape[0]
        idx = unpack(layer["idx"], layer["idx_bits"]).reshape(H, N, k)
        w = unpack(layer["w"], 16).reshape(H, N, k).double() / 65535
        # the kept links are the k strongest keys of each row, with their probabilities
        assert torch.allclose(w, want.topk(k, dim=-1).values, atol=1e-4)
        assert torch.allclose(want.gather(-1, idx), w, atol=1e-4)
        # thumbnails: block means of the dense map, scaled to each map's max
        pooled = unpack(layer["pooled"], 8).reshape(H, M, M).double() / 255
        pooled = pooled * torch.tensor(layer["pooled_max"], dtype=torch.float64)[:, None, None]
        expect = nn.functional.avg_pool2d(want[:, None], block, ceil_mode=True)[:, 0]
        assert torch.allclose(pooled, expect, atol=expect.amax() / 254)
        # statistics: analysis' functions on the dense map
        stats = data["stats"]
        assert torch.allclose(torch.tensor(stats["entropy"][l]), head_entropy(want[None])[0].float(), atol=1e-5)
        assert torch.allclose(torch.tensor(stats["distance"][l]), mean_attention_distance(want[None])[0].float(),
                              atol=1e-4)
        assert torch.allclose(torch.tensor(stats["special"][l]),
                              special_token_attention(want[None], special)[0].float(), atol=1e-6)
    assert data["special"] == special


@pytest.mark.parametrize("order", ["as run", "reversed"])
def test_rollout_is_attention_rollout(order):
    N = 30
    cap = run(N, ak.causal())
    layers = cap.names if order == "as run" else cap.names[::-1]
    data = page_data(cap, tokens(N), batch=0, layers=layers)
    roll = data["layers"][-1]
    assert [L["index"] for L in data["layers"]] == [0, 1, 2, -1]  # shown in the order the model ran them
    assert roll["name"] == "rollout over all layers, all heads" and roll.get("rollout")
    want = attention_rollout([dense(cap, name, 0)[None] for name in cap.names])[0]  # (N, N), bottom layer first
    w = unpack(roll["w"], 16).reshape(N, N).double() / 65535
    idx = unpack(roll["idx"], roll["idx_bits"]).reshape(N, N)
    assert torch.allclose(want.gather(-1, idx), w, atol=1e-4)
    assert torch.allclose(w.sum(-1), torch.ones(N, dtype=torch.float64), atol=N * 1e-4)


ONE_LAYER = "it composes the maps of several layers and this page shows one"
TOO_LONG = "it multiplies dense N x N maps and N = {N} > {limit}"


@pytest.mark.parametrize("N,shown,rollout,reasons", [
    (12, "all", None, []),
    (12, "one", None, [ONE_LAYER]),  # was: "N = 12 > 2048"
    (12, "all", False, ["rollout=False was given"]),  # was: "N = 12 > 2048"
    (12, "one", True, []),  # asked for: a rollout of the one layer
    (ROLLOUT_LIMIT + 1, "all", None, [TOO_LONG]),
    (ROLLOUT_LIMIT + 1, "one", None, [ONE_LAYER, TOO_LONG]),
])
def test_the_rollout_note_gives_the_true_reason(N, shown, rollout, reasons):
    cap = run(N, ak.causal() & ak.sliding_window(8, 0), B=1)
    layers = cap.names if shown == "all" else cap.names[1:2]
    data = page_data(cap, tokens(N), layers=layers, heads=[0], rollout=rollout)
    included = [L for L in data["layers"] if L.get("rollout")]
    assert len(included) == (not reasons), data["note"]
    if not reasons:
        assert data["note"] == ""
        return
    note = data["note"]
    assert note.startswith("attention rollout is left out: ")
    for reason in reasons:
        assert reason.format(N=N, limit=ROLLOUT_LIMIT) in note, note
    if N <= ROLLOUT_LIMIT:
        assert str(ROLLOUT_LIMIT) not in note and ">" not in note  # not the length, when the length is fine
    if shown == "one" and rollout is None:
        assert repr(cap.names[1]) in note and "rollout=True" in note  # which layer, and how to get it anyway


def test_notices_are_shown_as_text(tmp_path):
    cap = run(8)
    notices = ["Input cut short: 600 word pieces, 510 shown.", INJECTION]
    data = page_data(cap, tokens(8), notices=notices)
    assert data["notices"] == notices and page_data(cap, tokens(8))["notices"] == []
    page = render_html(cap, tokens(8), notices=notices)
    assert "<img" not in page and json.loads(re.search(r'id="ak-data">(.*?)</script>', page, re.S)[1])["notices"] \
        == notices
    for bad in ("one notice", [3]):
        with pytest.raises(ValueError, match="notices: expected a list of strings"):
            page_data(cap, tokens(8), notices=bad)


class Terminal(io.StringIO):
    """A stderr that says it is a terminal (tqdm draws its bar only on one)."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_and_nothing_in_a_log(monkeypatch):
    N = 40
    cap = run(N, B=1)
    layers, heads = len(cap.names), cap[cap.names[0]].shape[1]
    total = (layers * heads + layers * heads) * N  # the rows of every head's map, then of the rollout's maps
    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    want = page_data(cap, tokens(N))
    assert tty.getvalue() == ""  # progress is asked for, never on by default
    assert page_data(cap, tokens(N), progress=True) == want
    bar = tty.getvalue()
    assert re.search(rf"attention page, {N} tokens: .*\b0/{total} ", bar), bar
    assert "\r" in bar and "\n" not in bar.rstrip("\n")  # one line redrawn in place (and cleared: leave=False)
    log = io.StringIO()  # a file or a pipe: not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    assert page_data(cap, tokens(N), progress=True) == want
    assert log.getvalue() == ""


def test_long_inputs_keep_top_k_and_pool_and_skip_rollout():
    N = 2100
    cap = run(N, ak.causal() & ak.sliding_window(32, 0), B=1)
    data = page_data(cap, tokens(N), layers=cap.names[:1], heads=[1, 3])
    assert data["k"] == 8 and data["block"] == 17 and data["m"] == 124
    layer = data["layers"][0]
    assert layer["heads"] == [1, 3] and len(base64.b64decode(layer["idx"])) == 2 * N * 8 * 2
    assert "rollout" in data["note"] and not any(L.get("rollout") for L in data["layers"])
    want = dense(cap, cap.names[0], 0)[[1, 3]]
    w = unpack(layer["w"], 16).reshape(2, N, 8).double() / 65535
    assert torch.allclose(w, want.topk(8, dim=-1).values, atol=1e-4)


def test_html_is_one_inert_file(tmp_path):
    N = 12
    cap = run(N)
    toks = tokens(N)
    toks[3], toks[4], toks[5] = INJECTION, "</script><script>alert(2)</script>", "a\u2028b & c"
    title = "<b>bold</b> & </title>"
    path = write_html(cap, toks, tmp_path / "page.html", title=title)
    page = path.read_text(encoding="utf-8")
    # the data travels as JSON with <, >, & escaped: no markup from tokens or title, anywhere
    assert "<img" not in page and "<script>alert" not in page and "<b>bold" not in page
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "<title>&lt;b&gt;bold&lt;/b&gt; &amp; &lt;/title&gt;</title>" in page
    found = re.search(r'<script type="application/json" id="ak-data">(.*?)</script>', page, re.S)
    assert not re.search("[<>&\u2028\u2029]", found[1])  # nothing in the data can end its element
    data = json.loads(found[1])
    assert data["tokens"] == toks and data["title"] == title  # the same text comes back out
    # nothing to fetch: no address, no external resource element (outside the data, which is text)
    code = page[:found.start()] + page[found.end():]
    assert not re.search(r"https?:|//[a-z]|<link|<iframe|<img|\bsrc=|@import|url\(", code)
    # the policy allows only this script (by its hash) and no connection
    script = re.search(r"<script>(.*?)</script>", page, re.S)[1]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)[1]
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp and "connect-src 'none'" in csp


def test_render_and_write_agree_and_are_deterministic(tmp_path):
    cap = run(10)
    first = render_html(cap, tokens(10))
    assert first == render_html(cap, tokens(10))
    assert write_html(cap, tokens(10), tmp_path / "x.html").read_text(encoding="utf-8") == first


def test_bad_requests_say_what_to_do(tmp_path):
    cap = run(8)
    with pytest.raises(ValueError, match="one label per position, 8 in all"):
        page_data(cap, tokens(7))
    with pytest.raises(ValueError, match="one label per position"):
        page_data(cap, "a sentence")
    with pytest.raises(ValueError, match="batch 2 is out of range"):
        page_data(cap, tokens(8), batch=2)
    with pytest.raises(ValueError, match="distinct heads in 0..3"):
        page_data(cap, tokens(8), heads=[4])
    with pytest.raises(ValueError, match="distinct heads"):
        page_data(cap, tokens(8), heads=[1, 1])
    with pytest.raises(ValueError, match="each layer once"):
        page_data(cap, tokens(8), layers=[cap.names[0]] * 2)
    with pytest.raises(ValueError, match="layers=\\[\\] was given"):
        page_data(cap, tokens(8), layers=[])
    with pytest.raises(ValueError, match=r"valid: expected one flag per token of sequence 0, shape \(8,\)"):
        page_data(cap, tokens(8), valid=[True] * 7)
    with pytest.raises(ValueError, match="overview"):
        page_data(cap, tokens(8), overview=True)
    with pytest.raises(ValueError, match="focus 8 is out of range"):
        page_data(cap, tokens(8), focus=8)
    with pytest.raises(ValueError, match="top_k"):
        page_data(cap, tokens(8), top_k=0)
    with pytest.raises(KeyError, match="no attention call recorded"):
        page_data(cap, tokens(8), layers=["nope"])
    with pytest.raises(ValueError, match="ending in .html"):
        write_html(cap, tokens(8), tmp_path / "x.png")
    with capture(Stack()) as empty:
        pass
    with pytest.raises(ValueError, match="recorded no attention call"):
        page_data(empty, tokens(8))
    # cross-attention is not a self-attention map
    mha = MultiHeadAttention(32, 4)
    with torch.no_grad(), capture(mha) as cross:
        mha(torch.randn(1, 5, 32), torch.randn(1, 9, 32))
    with pytest.raises(ValueError, match="not self-attention"):
        page_data(cross, tokens(5))
    # a map with NaN is refused by name, never written into the page
    model = Stack()
    x = torch.randn(1, 8, 32)
    x[0, 3, 0] = float("nan")
    with torch.no_grad(), capture(model) as bad:
        model(x)
    with pytest.raises(ValueError, match="layer 'layers.0', head 0: the attention map holds NaN"):
        page_data(bad, tokens(8))


def test_padding_queries_are_left_out_of_the_statistics():
    N, n_real = 20, 13
    cap = run(N, ak.key_padding([N, n_real]))
    valid = torch.arange(N) < n_real
    data = page_data(cap, tokens(N), batch=1, valid=valid)
    for l, name in enumerate(cap.names):
        want = dense(cap, name, batch=1)[None]  # (1, H, N, N)
        expect = head_entropy(want, query_valid=valid[None])[0].float()
        assert torch.allclose(torch.tensor(data["stats"]["entropy"][l]), expect, atol=1e-5)
        assert not torch.allclose(expect, head_entropy(want)[0].float(), atol=1e-3)  # padding rows would change it


def test_odd_text_survives_the_trip():
    N = 6
    cap = run(N)
    toks = ["bad\ud800", "\u2028", "\x00", "%DATA%", "\\1", "\U0001f600"]
    page = render_html(cap, toks, title="t\udc00itle")
    found = re.search(r'<script type="application/json" id="ak-data">(.*?)</script>', page, re.S)
    assert found[1].isascii() and json.loads(found[1])["tokens"] == toks


def test_cli_writes_the_page(tmp_path, capsys):
    from attnkit.cli.main import main
    path = tmp_path / "maps.html"
    png = tmp_path / "maps.png"
    sentence = "The boat drifted to the bank of the river."
    assert main(["viz", sentence, "--out", str(path), "--png", str(png), "--token", "bank"]) == 0
    data = json.loads(re.search(r'id="ak-data">(.*?)</script>', path.read_text(encoding="utf-8"), re.S)[1])
    assert data["tokens"][0] == "[CLS]" and "bank" in data["tokens"] and data["focus"] == data["tokens"].index("bank")
    assert len(data["layers"]) == 7 and data["layers"][-1]["rollout"]  # 6 layers and rollout
    assert data["special"] == [0, len(data["tokens"]) - 1] and png.stat().st_size > 10_000
    assert main(["viz", sentence, "--out", str(path), "--layer", "2", "--head", "5"]) == 0
    data = json.loads(re.search(r'id="ak-data">(.*?)</script>', path.read_text(encoding="utf-8"), re.S)[1])
    assert [L["name"] for L in data["layers"]] == ["blocks.2.attn"] and data["layers"][0]["heads"] == [5]
    assert data["layers"][0]["index"] == 2  # the model's layer number, not the page's slot
    assert main(["viz", sentence, "--out", str(path), "--head", "5", "--token", "[CLS]"]) == 0  # --head alone
    data = json.loads(re.search(r'id="ak-data">(.*?)</script>', path.read_text(encoding="utf-8"), re.S)[1])
    assert len(data["layers"]) == 7 and data["layers"][0]["heads"] == [5] and data["focus"] == 0
    capsys.readouterr()
    assert main(["viz", sentence, "--out", str(tmp_path / "x.txt")]) == 2
    assert "ending in .html" in capsys.readouterr().err
    assert main(["viz", sentence, "--out", str(tmp_path / "ok.html"), "--png", str(tmp_path / "x.txt")]) == 2
    assert not (tmp_path / "ok.html").exists()  # checked before anything ran


def test_longformer_layers_make_a_page_too():
    from attnkit.nn import LongformerSelfAttention
    torch.manual_seed(0)
    layer = LongformerSelfAttention(32, 4, attention_window=8)
    N = 150
    roles = torch.ones(1, N, dtype=torch.long)
    roles[0, [0, 90]] = 2  # two global tokens
    with torch.no_grad(), capture(layer) as cap:
        layer(torch.randn(1, N, 32), roles)
    data = page_data(cap, tokens(N), top_k=6)
    want = cap[cap.names[0]].weights()[0].double()  # (H, N, N), checked against HF in test_viz_capture
    idx = unpack(data["layers"][0]["idx"], 16).reshape(4, N, 6)
    w = unpack(data["layers"][0]["w"], 16).reshape(4, N, 6).double() / 65535
    assert torch.allclose(want.gather(-1, idx), w, atol=1e-4)
    assert idx[:, 90].sub(90).abs().max() > 8  # a global token's row reaches far
    assert set(idx[:, 50].flatten().tolist()) <= set(range(46, 55)) | {0, 90}  # a local row: window + globals
