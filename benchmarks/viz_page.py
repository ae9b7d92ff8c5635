"""How the attention page scales with N: build time, file size, and in headless chromium the load
time, tokens in the document and the time a hover or a scroll takes to redraw.

    python benchmarks/viz_page.py                    # N = 512, 2048, 8192; 2 layers x 12 heads
    python benchmarks/viz_page.py --n 4096 --layers 4

The model is random (attnkit MultiHeadAttention layers, width 768, 12 heads) under the
Longformer mask ``sliding_window(256) | global_tokens([0])``; what is measured is the page, not the
model. Needs /usr/bin/chromium and playwright (the test extras). Writes benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

import attnkit as ak
from attnkit.nn import MultiHeadAttention
from attnkit.viz import capture
from attnkit.viz.page import write_html

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


class Stack(nn.Module):
    def __init__(self, layers: int, dim: int = 768, heads: int = 12):
        super().__init__()
        self.layers = nn.ModuleList(MultiHeadAttention(dim, heads) for _ in range(layers))

    def forward(self, x, mask):
        for attn in self.layers:
            x = x + attn(x, mask=mask)
        return x


def build(n: int, layers: int, path: Path) -> dict:
    torch.manual_seed(0)
    model = Stack(layers)
    with torch.no_grad(), capture(model) as cap:
        model(torch.randn(1, n, 768), ak.sliding_window(256) | ak.global_tokens([0]))
    start = time.perf_counter()
    write_html(cap, [f"w{i}" for i in range(n)], path, special=[0])
    return {"build_s": time.perf_counter() - start, "mb": path.stat().st_size / 1e6}


def in_browser(path: Path, n: int) -> dict:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        start = time.perf_counter()
        page.goto(path.resolve().as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=120_000)
        load = time.perf_counter() - start
        in_document = page.eval_on_selector_all(".ak-tok", "els => els.length")
        hover_q = page.evaluate("""() => { const t = performance.now();
            document.querySelector('#ak-left .ak-tok[data-i="5"]').dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
            return performance.now() - t; }""")
        hover_k = page.evaluate("""() => { const t = performance.now();
            document.querySelector('#ak-right .ak-tok[data-i="5"]').dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
            return performance.now() - t; }""")
        page.mouse.move(1270, 890)
        scroll = page.evaluate("""async () => { const s = document.getElementById('ak-scroll');
            const t = performance.now(); s.scrollTop = s.scrollHeight / 2;
            await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
            return performance.now() - t; }""")
        browser.close()
    if errors:
        raise RuntimeError(f"the page raised: {errors}")
    return {"load_s": load, "tokens_in_document": in_document, "hover_query_ms": hover_q, "hover_key_ms": hover_k,
            "scroll_redraw_ms": scroll}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            path = Path(tmp) / f"page_{n}.html"
            row = {"n": n, "layers": args.layers, "heads": 12, **build(n, args.layers, path), **in_browser(path, n)}
            print(json.dumps(row))
            rows.append(row)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M")
    out = Path(__file__).parent / "results" / f"viz_page_{stamp}"
    meta = {"date": stamp, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# attention page scaling, {stamp} ({meta['machine']}, {meta['threads']} threads)", "",
             "| N | layers x heads | build | file | load in chromium | tokens in DOM | hover query / key | scroll redraw |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['n']} | {r['layers']} x {r['heads']} | {r['build_s']:.1f} s | {r['mb']:.1f} MB | {r['load_s']:.2f} s | "
              f"{r['tokens_in_document']} | {r['hover_query_ms']:.0f} / {r['hover_key_ms']:.0f} ms | "
              f"{r['scroll_redraw_ms']:.0f} ms |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
