"""Plot held-out accuracy vs wall-clock seconds from ``attnkit train --out`` JSON files.

    python benchmarks/plot_train.py benchmarks/results/train_2026-11-23.json \
        [more.json ...] --out docs/img/train_curve.png

Needs matplotlib (not a dependency of attnkit: ``pip install matplotlib``). One line per run,
coloured by variant; a dashed line at the 99% target and a dotted one at chance.
"""

from __future__ import annotations

import argparse
import json
import sys

COLORS = {"full": "tab:blue", "nopos": "tab:orange", "mean": "tab:green"}
LABELS = {"full": "full (learned positions + attention)", "nopos": "no positional encoding",
          "mean": "attention replaced by a running mean"}


def load_runs(paths: list[str]) -> tuple[list[dict], dict]:
    runs, first = [], None
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        first = first or doc
        runs.extend(doc["runs"])
    return runs, first


def plot(runs: list[dict], doc: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    seen = set()
    for r in runs:
        secs = [h["seconds"] for h in r["history"]]
        acc = [100 * h["accuracy"] for h in r["history"]]
        label = None if r["variant"] in seen else LABELS.get(r["variant"], r["variant"])
        seen.add(r["variant"])
        ax.plot(secs, acc, color=COLORS.get(r["variant"], "gray"), lw=1.6, alpha=0.9 if r["seed"] == 0 else 0.5,
                label=label)
    task, env = doc["task"], doc["environment"]
    ax.axhline(99, color="black", ls="--", lw=0.8, label="99% target")
    ax.axhline(100 / task["num_symbols"], color="gray", ls=":", lw=0.8, label="chance")
    ax.set(xlabel="wall-clock seconds (training + evaluation)", ylabel="held-out accuracy on the answer (%)",
           ylim=(0, 101), title=f"attnkit train --task {task['name']} (n={task['length']}, "
                                f"{task['num_symbols']} symbols): {env['processor']}, {env['threads']} threads")
    ax.title.set_fontsize(9)
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("json", nargs="+", help="files written by attnkit train --out")
    p.add_argument("--out", default="docs/img/train_curve.png")
    args = p.parse_args(argv)
    runs, doc = load_runs(args.json)
    plot(runs, doc, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
