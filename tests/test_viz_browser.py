"""The interactive page in a real headless browser: Debian's chromium driven by Playwright.

Each page is opened from disk (file://) and must load with no console error, no uncaught
exception, no dialog and no request other than the file itself; hovering and clicking must change
what is drawn; an injected token must stay text; and a screenshot is taken and checked.

Needs /usr/bin/chromium (``make test`` installs Debian's chromium where it can) and the Python
package playwright (test extras; it never downloads a browser here). Without them these tests skip,
unless ATTNKIT_REQUIRE_BROWSER=1 (set by .ci/run), where they fail instead.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import attnkit as ak
from attnkit.viz import capture
from attnkit.viz.page import write_html

CHROMIUM = os.environ.get("ATTNKIT_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("ATTNKIT_REQUIRE_BROWSER") == "1"
INJECTION = "<img src=x onerror=alert(1)>"
# quiet, offline chromium: without the background-networking flags it tries to reach Google at start
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions"]


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} (ATTNKIT_REQUIRE_BROWSER=1: the browser tests must run here)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the Python package playwright is not installed: pip install -e '.[test]'")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no chromium at {CHROMIUM}: install Debian's chromium (make test does, as root) "
                     "or set ATTNKIT_CHROMIUM")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


class Visit:
    """One page opened from disk, with everything it said and asked for recorded."""

    def __init__(self, browser, path: Path):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.url = path.resolve().as_uri()
        self.requests, self.console, self.errors, self.dialogs = [], [], [], []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        # anything but the file itself is refused (and still recorded above)
        self.context.route("**/*", lambda route: route.continue_() if route.request.url == self.url else route.abort())
        start = time.perf_counter()
        self.page.goto(self.url)
        self.page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        self.load_s = time.perf_counter() - start

    def links(self) -> str:
        """The head view's drawing, as a data URL: equal strings, equal pictures."""
        return self.page.evaluate("document.getElementById('ak-links').toDataURL()")

    def painted(self, selector: str) -> float:
        """Standard deviation of a canvas' pixels (0 for a blank or one-colour canvas)."""
        return self.page.evaluate("""(sel) => {
            const c = document.querySelector(sel), copy = document.createElement('canvas');
            copy.width = c.width; copy.height = c.height;
            const ctx = copy.getContext('2d', {willReadFrequently: true});  // a fresh canvas: one readback
            ctx.drawImage(c, 0, 0);
            const d = ctx.getImageData(0, 0, c.width, c.height).data;
            let s = 0, s2 = 0, n = 0;
            for (let i = 0; i < d.length; i += 4) { const v = d[i] + d[i + 1] + d[i + 2]; s += v; s2 += v * v; n++; }
            return Math.sqrt(Math.max(0, s2 / n - (s / n) ** 2));
        }""", selector)

    def assert_quiet(self):
        bad = [m for m in self.console if m.startswith(("error", "warning"))]
        assert not bad and not self.errors, f"console: {bad}, uncaught: {self.errors}"
        assert self.requests == [self.url], f"the page asked for more than itself: {self.requests}"
        assert not self.dialogs, f"a dialog opened: {self.dialogs}"

    def close(self):
        self.context.close()


@contextmanager
def visit(browser, path: Path):
    """Open the page; after the test's steps it must still be quiet (no error, request, dialog)."""
    v = Visit(browser, path)
    try:
        yield v
        v.assert_quiet()
    finally:
        v.close()


@pytest.fixture(scope="module")
def minilm_page(tmp_path_factory):
    """The real MiniLM's page, one word piece replaced by an injection attempt."""
    from attnkit.pretrained import load_bert, minilm_path
    bundle = load_bert(minilm_path())
    sentence = "The boat drifted to the bank of the river."
    ids, valid = bundle.encode([sentence])
    with torch.no_grad(), capture(bundle.model) as cap:
        bundle.model(ids, valid)
    tokens = bundle.tokens(sentence)
    tokens[3] = INJECTION
    path = tmp_path_factory.mktemp("page") / "minilm.html"
    write_html(cap, tokens, path, special=[0, len(tokens) - 1], title=f"MiniLM {INJECTION}")
    return path, tokens, cap


def not_blank_png(path: Path) -> None:
    from matplotlib.image import imread
    pixels = imread(path)
    assert pixels.shape[0] >= 500 and pixels.shape[1] >= 1000
    assert pixels[..., :3].std() > 0.05


def set_links(v: Visit, k: int) -> None:
    """Move the links-per-token slider to k, as a user's drag does (an input event)."""
    v.page.eval_on_selector("#ak-k", "(el, k) => { el.value = String(k); el.dispatchEvent(new Event('input')); }", k)


def lines_drawn(v: Visit) -> int:
    return int(v.page.get_attribute("#ak-links", "data-lines"))


def test_loads_offline_quietly_and_injection_stays_text(browser, minilm_page, tmp_path):
    path, tokens, _ = minilm_page
    with visit(browser, path) as v:
        texts = v.page.eval_on_selector_all("#ak-left .ak-tok .ak-text", "els => els.map(e => e.textContent)")
        assert texts == tokens  # short input: every row is on screen, in order
        assert v.page.text_content("#ak-left .ak-tok[data-i='3'] .ak-text") == INJECTION
        assert v.page.evaluate("document.images.length") == 0  # no <img> was made from the token
        assert v.page.text_content("#ak-title") == f"MiniLM {INJECTION}"
        assert v.page.title() == f"MiniLM {INJECTION}"
        assert v.painted("#ak-links") > 1 and v.painted("#ak-overview") > 1
        shot = tmp_path / "head_view.png"
        v.page.screenshot(path=str(shot), full_page=True)
        not_blank_png(shot)


def test_hover_and_click_change_the_drawing(browser, minilm_page):
    path, tokens, _ = minilm_page
    with visit(browser, path) as v:
        everything = v.links()
        v.page.hover("#ak-left .ak-tok[data-i='6']")  # "bank" as a query
        bank = v.links()
        assert bank != everything and "bank" in v.page.text_content("#ak-focus")
        assert v.page.get_attribute("#ak-left .ak-tok[data-i='6']", "class").split().count("ak-on") == 1
        shaded = v.page.eval_on_selector_all("#ak-right .ak-tok", "els => els.filter(e => e.style.background).length")
        assert shaded > 0  # the keys it attends to are tinted
        v.page.hover("#ak-right .ak-tok[data-i='0']")  # [CLS] as a key: the queries that read it
        assert v.links() not in (bank, everything)
        v.page.mouse.move(1200, 880)  # off the tokens: back to every link
        assert v.links() == everything
        v.page.click("#ak-left .ak-tok[data-i='6']")  # pin
        v.page.mouse.move(1200, 880)
        assert v.links() == bank and v.page.text_content("#ak-focus").startswith("Pinned")
        v.page.click("#ak-left .ak-tok[data-i='6']")  # unpin
        v.page.mouse.move(1200, 880)
        assert v.links() == everything
        v.page.click(".ak-head[data-h='1']")  # show head 1 too (the page opens with head 0 alone)
        assert v.page.get_attribute(".ak-head[data-h='1']", "aria-pressed") == "true" and v.links() != everything
        v.page.click("#ak-none")
        assert v.painted("#ak-links") == 0  # no head, no line
        v.page.select_option("#ak-layer", "6")  # rollout
        assert v.page.eval_on_selector_all(".ak-head", "els => els.length") == 1 and v.painted("#ak-links") > 1


def test_model_view_thumbnails_enlarge_and_stats_table(browser, minilm_page):
    path, tokens, _ = minilm_page
    with visit(browser, path) as v:
        v.page.click(".ak-tab[data-view='ak-modelview']")
        assert v.page.is_visible("#ak-grid") and not v.page.is_visible("#ak-scroll")
        assert v.page.eval_on_selector_all("canvas.ak-thumb", "els => els.length") == 6 * 12 + 1
        assert v.page.is_hidden("#ak-modal")
        v.page.click("canvas.ak-thumb[data-layer='2'][data-slot='3']")
        assert v.page.is_visible("#ak-modal") and v.painted("#ak-modal-map") > 1
        assert v.page.text_content("#ak-modal-title") == "Layer 2 (blocks.2.attn), head 3"
        assert "entropy" in v.page.text_content("#ak-modal-stats")
        v.page.keyboard.press("Escape")
        assert v.page.is_hidden("#ak-modal")
        v.page.click("canvas.ak-thumb[data-layer='6'][data-slot='0']")
        assert "rollout" in v.page.text_content("#ak-modal-title")
        v.page.click("#ak-close")
        assert v.page.is_hidden("#ak-modal")
        v.page.click(".ak-tab[data-view='ak-statsview']")
        rows = v.page.eval_on_selector_all("#ak-stats tr", "els => els.map(r => [...r.children].map(c => c.textContent))")
        data = v.page.evaluate("JSON.parse(document.getElementById('ak-data').textContent).stats")
        assert len(rows) == 1 + 6 and len(rows[1]) == 1 + 12
        assert rows[3][5] == f"{data['entropy'][2][4]:.2f}"  # layer 2, head 4, as computed in Python
        v.page.select_option("#ak-stat", "special")
        assert v.page.text_content("#ak-stats tr:nth-child(2) td") == f"{100 * data['special'][0][0]:.1f}%"


def test_two_thousand_tokens_stay_usable(browser, tmp_path):
    from test_viz_page import Stack
    N = 2304
    torch.manual_seed(0)
    model = Stack(layers=2)
    with torch.no_grad(), capture(model) as cap:
        model(torch.randn(1, N, 32), mask=ak.causal() & ak.sliding_window(48, 0) | ak.global_tokens([0]))
    tokens = [f"w{i}" for i in range(N)]
    tokens[N - 5] = INJECTION
    path = write_html(cap, tokens, tmp_path / "long.html", special=[0])
    with visit(browser, path) as v:
        print(f"{N} tokens: {path.stat().st_size / 1e6:.1f} MB page, loaded in {v.load_s:.2f} s")
        on_screen = v.page.eval_on_selector_all(".ak-tok", "els => els.length")
        assert 0 < on_screen < 300  # only the rows on screen are in the document
        top = v.links()
        v.page.click("#ak-overview", position={"x": 120, "y": 236})  # near the bottom of the overview
        v.page.wait_for_function("document.getElementById('ak-scroll').scrollTop > 30000")
        v.page.wait_for_timeout(100)
        rows = v.page.eval_on_selector_all("#ak-left .ak-tok", "els => els.map(e => Number(e.dataset.i))")
        assert max(rows) > N - 200 and min(rows) > 1000 and v.links() != top
        v.page.evaluate("(s => { s.scrollTop = s.scrollHeight; })(document.getElementById('ak-scroll'))")
        v.page.wait_for_selector(f"#ak-left .ak-tok[data-i='{N - 1}']")
        rows = v.page.eval_on_selector_all("#ak-left .ak-tok", "els => els.map(e => Number(e.dataset.i))")
        assert v.page.text_content(f"#ak-left .ak-tok[data-i='{N - 5}'] .ak-text") == INJECTION
        before = v.links()
        v.page.hover(f"#ak-left .ak-tok[data-i='{max(rows) - 10}']")
        assert v.links() != before
        v.page.hover(f"#ak-right .ak-tok[data-i='{max(rows) - 10}']")  # a key: scans all N rows' links
        assert v.links() != before
        v.page.click(".ak-tab[data-view='ak-modelview']")
        v.page.click("canvas.ak-thumb[data-layer='1'][data-slot='2']")
        assert v.painted("#ak-modal-map") > 1 and "block of" in v.page.text_content("#ak-modal-stats")
        shot = tmp_path / "long.png"
        v.page.screenshot(path=str(shot))
        not_blank_png(shot)
        assert v.page.evaluate("document.images.length") == 0


def test_the_links_drawn_are_that_heads_own(browser, minilm_page):
    """One head shown, one query focused: the keys' tint is that head's attention row, as computed
    in Python from the capture (so a page that mixed up heads, layers or rows would fail)."""
    path, tokens, cap = minilm_page
    layer, head, query = 4, 3, 6
    want = cap[cap.names[layer]].weights(rows=[query], heads=[head])[0, 0, 0]  # (N,)
    with visit(browser, path) as v:
        v.page.select_option("#ak-layer", str(layer))
        v.page.click("#ak-none")
        v.page.click(f".ak-head[data-h='{head}']")
        set_links(v, len(tokens))  # every kept link (the page opens with a few per token)
        v.page.click(f"#ak-left .ak-tok[data-i='{query}']")
        tint = v.page.eval_on_selector_all("#ak-right .ak-tok", """els => els.map(e => {
            const m = /rgba\\([^)]*,\\s*([0-9.]+)\\)/.exec(e.style.background); return m ? Number(m[1]) : 0; })""")
        got = torch.tensor(tint, dtype=torch.float64)
        # CSS keeps an alpha in steps of 1/255: within 0.005 of the head's own row
        assert (got - want.double()).abs().max() < 5e-3, (got, want)
        other = cap[cap.names[layer]].weights(rows=[query], heads=[0])[0, 0, 0].double()
        assert (got - other).abs().max() > 0.05  # another head's row would not do


def test_head_view_opens_readable(browser, minilm_page, tmp_path):
    """The head view opens on one head and each token's few strongest links, not every head's every
    link (12 heads x N x N lines: a tangle); the controls bring the rest."""
    path, tokens, _ = minilm_page
    N = len(tokens)
    with visit(browser, path) as v:
        pressed = v.page.eval_on_selector_all(".ak-head", "els => els.map(e => e.getAttribute('aria-pressed'))")
        assert pressed.count("true") == 1 and pressed[0] == "true" and len(pressed) == 12
        opened = lines_drawn(v)
        k = int(v.page.input_value("#ak-k"))
        assert 1 <= k <= 3 and 0 < opened <= k * N  # at most k lines leave each token
        assert v.page.text_content("#ak-focus").startswith(f"Showing head 0, up to {k} strongest links per token")
        v.page.screenshot(path=str(tmp_path / "head_view_default.png"))
        v.page.select_option("#ak-layer", "3")  # another layer: still one head
        assert v.page.eval_on_selector_all(".ak-head[aria-pressed='true']", "els => els.length") == 1
        assert 0 < lines_drawn(v) <= k * N
        v.page.select_option("#ak-layer", "0")
        v.page.click("#ak-all")
        set_links(v, N)
        everything = lines_drawn(v)
        assert everything > 10 * opened  # what it would open on: every head, every link
        v.page.screenshot(path=str(tmp_path / "head_view_everything.png"))


def visible_boxes(v: Visit, selector: str) -> list[dict]:
    """Each element's text as it shows: the box of its text clipped to the element's own box
    (overflow is hidden), in page pixels, after transforms (a rotated label gives its turned box)."""
    return v.page.eval_on_selector_all(selector, """els => els.map(el => {
        const range = document.createRange();
        range.selectNodeContents(el);
        const t = range.getBoundingClientRect(), b = el.getBoundingClientRect();
        return {i: Number(el.dataset.i), text: el.textContent, left: Math.max(t.left, b.left),
                right: Math.min(t.right, b.right), top: Math.max(t.top, b.top), bottom: Math.min(t.bottom, b.bottom)};
    })""")


def box(v: Visit, selector: str) -> dict:
    return v.page.eval_on_selector(selector, "el => { const r = el.getBoundingClientRect(); "
                                             "return {left: r.left, right: r.right, top: r.top, bottom: r.bottom}; }")


def test_enlarged_map_labels_stay_outside_the_map(browser, minilm_page, tmp_path):
    """Click a thumbnail: the column labels stand above the map over their own columns, the row labels
    left of it beside their own rows; none covers the map or a neighbour."""
    path, tokens, _ = minilm_page
    N = len(tokens)
    with visit(browser, path) as v:
        v.page.click(".ak-tab[data-view='ak-modelview']")
        v.page.click("canvas.ak-thumb[data-layer='2'][data-slot='3']")
        grid = box(v, "#ak-modal-map")
        cell = (grid["right"] - grid["left"]) / N
        assert abs((grid["bottom"] - grid["top"]) - (grid["right"] - grid["left"])) < 1 and cell > 5
        figure = box(v, "#ak-modal-figure")
        cols, rows = visible_boxes(v, ".ak-axis-col"), visible_boxes(v, ".ak-axis-row")
        assert [c["text"] for c in cols] == tokens and [r["text"] for r in rows] == tokens
        for c in cols:
            assert c["right"] > c["left"] and c["bottom"] > c["top"], f"column label {c['i']} shows nothing: {c}"
            assert c["bottom"] <= grid["top"] + 0.5, f"column label {c['text']!r} overlaps the map: {c}, map {grid}"
            mid = (c["left"] + c["right"]) / 2
            assert grid["left"] + c["i"] * cell <= mid <= grid["left"] + (c["i"] + 1) * cell, (c, grid)
            assert c["top"] >= figure["top"] - 0.5  # not pushed out of the figure
        for r in rows:
            assert r["right"] > r["left"] and r["bottom"] > r["top"], f"row label {r['i']} shows nothing: {r}"
            assert r["right"] <= grid["left"] + 0.5, f"row label {r['text']!r} overlaps the map: {r}, map {grid}"
            mid = (r["top"] + r["bottom"]) / 2
            assert grid["top"] + r["i"] * cell <= mid <= grid["top"] + (r["i"] + 1) * cell, (r, grid)
        for a, b in zip(cols, cols[1:]):
            assert a["right"] <= b["left"] + 0.5, f"column labels {a['i']} and {b['i']} overlap"
        for a, b in zip(rows, rows[1:]):
            assert a["bottom"] <= b["top"] + 0.5, f"row labels {a['i']} and {b['i']} overlap"
        assert v.page.evaluate("document.images.length") == 0  # the injected token is a label's text
        v.page.screenshot(path=str(tmp_path / "enlarged.png"))


RTL = ["[CLS]", "\u05e9\u05dc\u05d5\u05dd", "##\u05d9\u05df", "\u0645\u0631\u062d\u0628\u0627", "##\u064a\u0646",
       "river", "12", "\u05e9\u05dc\u05d5\u05dd3", "[SEP]"]  # Hebrew "shalom", "##yn", Arabic "marhaba", "##yn"
HEBREW = [1, 2, 7]  # letters that do not join: each has its own box
RIGHT_TO_LEFT = [1, 2, 3, 4, 7]


def small_capture(n: int):
    from test_viz_page import Stack
    torch.manual_seed(0)
    model = Stack(layers=2)
    with torch.no_grad(), capture(model) as cap:
        model(torch.randn(1, n, 32))
    return cap


@pytest.fixture(scope="module")
def rtl_page(tmp_path_factory):
    return write_html(small_capture(len(RTL)), RTL, tmp_path_factory.mktemp("rtl") / "rtl.html", title="right to left")


def char_centres(v: Visit, selector: str) -> list[list[float]]:
    """(x, y) centre of each character of the element's text, in logical (typed) order."""
    return v.page.eval_on_selector(selector, """el => {
        const walker = document.createTreeWalker(el, NodeFilter.SHOW_TEXT), out = [];
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            for (let c = 0; c < node.length; c++) {
                const r = document.createRange();
                r.setStart(node, c);
                r.setEnd(node, c + 1);
                const b = r.getBoundingClientRect();
                out.push([(b.left + b.right) / 2, (b.top + b.bottom) / 2]);
            }
        }
        return out;
    }""")


def rects(v: Visit, selector: str) -> list[dict]:
    return v.page.eval_on_selector(selector,
                                   "el => [...el.getClientRects()].map(r => ({left: r.left, right: r.right}))")


def test_right_to_left_tokens_read_right_to_left(browser, rtl_page, tmp_path):
    """Hebrew and Arabic word pieces: each one unbroken run, read right to left ("##" at its right,
    where the piece it continues stands), never mixed with the position number beside it; in the
    head view, the focus line and the enlarged map's labels."""
    with visit(browser, rtl_page) as v:
        for i in RIGHT_TO_LEFT:
            for side, pos_after in (("left", True), ("right", False)):
                row = f"#ak-{side} .ak-tok[data-i='{i}']"
                text, (pos,) = rects(v, f"{row} .ak-text"), rects(v, f"{row} .ak-pos")
                text.sort(key=lambda r: r["left"])  # its runs (a number inside a Hebrew word is a run of its own)
                gaps = [b["left"] - a["right"] for a, b in zip(text, text[1:])]
                assert all(abs(g) < 0.5 for g in gaps), f"token {i} ({RTL[i]!r}) is split on the {side}: {text}, {pos}"
                if pos_after:  # query side: "token number"; key side: "number token"
                    assert text[-1]["right"] <= pos["left"] + 0.5, (i, side, text, pos)
                else:
                    assert pos["right"] <= text[0]["left"] + 0.5, (i, side, text, pos)
        for i in HEBREW:
            xs = [x for x, _ in char_centres(v, f"#ak-right .ak-tok[data-i='{i}'] .ak-text")]
            assert all(a > b for a, b in zip(xs, xs[1:])), f"{RTL[i]!r} does not read right to left: {xs}"
        v.page.hover("#ak-left .ak-tok[data-i='2']")
        focus = v.page.text_content("#ak-focus")
        assert focus.startswith(f'Focus: "{RTL[2]}" (token 2)'), focus
        token, after = box(v, "#ak-focus .ak-text"), v.page.evaluate("""() => {
            const r = document.createRange(), el = document.querySelector('#ak-focus .ak-text').nextSibling;
            r.setStart(el, 1); r.setEnd(el, 2);  // the "(" after the token's closing quote
            return r.getBoundingClientRect().left; }""")
        assert token["right"] <= after + 0.5, "the focus line's '(token 2)' went inside the token"
        v.page.screenshot(path=str(tmp_path / "rtl_head_view.png"))
        v.page.click(".ak-tab[data-view='ak-modelview']")
        v.page.click("canvas.ak-thumb[data-layer='0'][data-slot='0']")
        for i in HEBREW:
            xs = [x for x, _ in char_centres(v, f".ak-axis-row[data-i='{i}']")]
            assert all(a > b for a, b in zip(xs, xs[1:])), f"row label {RTL[i]!r}: {xs}"
            ys = [y for _, y in char_centres(v, f".ak-axis-col[data-i='{i}']")]  # turned: right to left = top down
            assert all(a < b for a, b in zip(ys, ys[1:])), f"column label {RTL[i]!r}: {ys}"
        v.page.screenshot(path=str(tmp_path / "rtl_enlarged.png"))


def test_notices_stand_at_the_top(browser, tmp_path):
    notices = ["Input cut short: 600 word pieces, 510 shown.", INJECTION]
    path = write_html(small_capture(6), [f"t{i}" for i in range(6)], tmp_path / "notices.html", notices=notices)
    with visit(browser, path) as v:
        shown = v.page.eval_on_selector_all("#ak-notices .ak-notice", "els => els.map(e => e.textContent)")
        assert shown == notices
        assert v.page.is_visible("#ak-notices .ak-notice") and v.page.evaluate("document.images.length") == 0
        assert box(v, "#ak-notices")["bottom"] <= box(v, "nav")["top"]  # above the views, where it is seen
        v.page.screenshot(path=str(tmp_path / "notices.png"), clip={"x": 0, "y": 0, "width": 1280, "height": 200})
