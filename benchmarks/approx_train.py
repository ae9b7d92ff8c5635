"""Approximate attention trained from scratch: held-out accuracy against wall-clock time, per method,
beside exact attention and the Longformer window (issue 17, "Measured" -> Training).

    python benchmarks/approx_train.py [--tasks lookup,pairs1024]
        [--variants exact,window,linear,performer,linformer,nystrom] [--budget-s S] [--seed 0]
        [--out-dir benchmarks/results] [--no-plot]

Tasks (the answer is read at the last position only; chance = 1 / answers):
  lookup     ``attnkit train``'s default task (``attnkit.cli.train.make_task("lookup")``): n=32 symbols,
             then a query token naming a position; N=33, 16 answers. Model: E=32, 4 heads, 2 layers,
             batch 64 (``attnkit train``'s); budget 120 s.
  pairs1024  ``PairRecall`` (below): 4 key-value pairs, each one token, at random places among 1020
             filler tokens, then a query naming a key; N=1025, 8 answers. Model: E=32, 2 heads, 1 layer,
             batch 8; budget 300 s.
  recall512  ``make_task("recall", 512, 512)``: 512 key-value pairs then a key, N=1025, 512 answers;
             E=64, 4 heads, 2 layers, sinusoidal positions, batch 16. Not in the default set: in a trial
             exact attention stayed at chance for 475 steps (930 s, loaded machine); it needs "the token
             after the key" learned over 1024 positions and 512 answers each learned apart.
Why pairs1024 for the long task: it has to be learnable by exact attention within minutes on 2 CPU
cores. ``lookup`` at n=1024 needs 1024 query tokens each aligned with its position (one example
teaches one of them), and recall512 (above) did not learn. In trials (E=32, 1 layer, batch 8, load
average 4-7) PairRecall with 8 filler ids stayed at chance for 475 steps; with one filler id (the
default) exact attention left chance after ~175 steps and reached 37% at 625 steps (420 s).

One model family for every variant: a *bidirectional* pre-norm stack (``attnkit.nn.Encoder``: token
embeddings + absolute positions (learned, as ``attnkit train``'s default; sinusoidal for recall512),
``PreNormBlock`` of RMSNorm, multi-head attention, GELU feed-forward, a final RMSNorm) and a linear head
on the last position. No causal mask: the answer sits at the last position, so every token may see
every token (and Linformer / Nyström refuse causal masks). Only the attention differs:

  exact          ``ak.attention`` (impl="auto"; the backend auto picks is recorded)
  window[:W]     exact attention under ``ak.sliding_window(W) | ak.global_tokens([N-1])``: the Longformer
                 recipe, W keys each side plus the query token as a global token (it sees every token
                 and every token sees it); default W 4 for lookup, 64 for the N=1025 tasks. With the
                 query global, these last-position tasks need no long path through the window.
  linear         ``attnkit.approx.LinearAttention()`` (Katharopoulos et al. 2020, phi = elu + 1)
  performer[:F]  ``PerformerAttention(D, F)``: FAVOR+ positive orthogonal features (default F=64),
                 redrawn every 1000 training calls (performer-pytorch's default feature_redraw_interval;
                 never in evaluation)
  linformer[:Kp] ``LinformerAttention.build(N, Kp)`` per layer: E, F shared by the heads, not by the
                 layers, N(0, 1/Kp) init (default Kp=128; at lookup's N=33, Kp >= N: nothing compressed)
  nystrom[:m]    ``NystromAttention(m)``: segment-mean landmarks, 6 pseudo-inverse iterations, no conv
                 residual (default m=32; at N=33 nearly one landmark per token)

Each run: ``torch.manual_seed(seed)`` before the model is built (the attention cores' own draws
shift the later ones, so the initial weights differ by variant); the seed fixes the training batches
and the held-out sets, the same for every variant. Training is ``attnkit.cli.train.train`` (AdamW,
lr 3e-3 after 100 warm-up steps), evaluated on a fixed held-out set every ``eval_every`` steps; a run
stops at 99% held-out accuracy or at the first evaluation after its wall-clock budget (training *and*
evaluation, ``--budget-s`` overrides the per-task default) is spent. Each run records (seconds, step,
held-out accuracy) points and the final accuracy on a second, larger fresh set (never used to stop).

Outputs, rewritten after every run so a stopped run keeps what it measured:
``<out-dir>/approx_train_<YYYY-MM-DDTHHMM>.json`` (machine header from ``attnkit.bench.cpu.header()``,
every record), ``.md`` (a table per task) and ``approx_train_<stamp>_<task>.png`` (accuracy vs
seconds, one line per variant; needs matplotlib, drawn with the Agg backend). Times are wall clock
on a possibly shared machine: each record keeps the load average at its start.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

import attnkit as ak
from attnkit.approx.linear import LinearAttention
from attnkit.approx.linformer import LinformerAttention
from attnkit.approx.nystrom import NystromAttention
from attnkit.approx.performer import PerformerAttention
from attnkit.bench.cpu import CommaList, header
from attnkit.cli._paths import OutputPathError, prepare_output_dir
from attnkit.cli.train import ModelConfig, Task, TrainConfig, final_accuracy, make_task, train
from attnkit.nn import Encoder, FeedForward, LearnedPositionalEmbedding, MultiHeadAttention, PreNormBlock, RMSNorm
from attnkit.nn import SinusoidalPositionalEncoding, TokenEmbeddings

METHODS = ("exact", "window", "linear", "performer", "linformer", "nystrom")
PARAMETER = {"window": "W", "performer": "F", "linformer": "Kp", "nystrom": "m"}  # what ``name:k`` sets
DEFAULTS = {"performer": 64, "linformer": 128, "nystrom": 32}  # window: per task
PERFORMER_REDRAW = 1000  # performer-pytorch's default feature_redraw_interval


@dataclass(frozen=True)
class PairRecall:
    """``f f (a,b) f .. (a',b') f .. ?a  ->  b``: P key-value pairs, each ONE token (a, b), at random
    positions among ``length - P`` filler tokens, then a query token naming a key; the answer is its value.

    Retrieval by content over the whole sequence: one of P pair tokens among N - 1 positions must be
    selected (a mean over the tokens cannot tell which pair the query names) and no positional
    offset has to be learned (recall's "the token after the key"), so it is learnable at N >= 1024
    within minutes on a CPU. ``sample(B, generator) -> (ids (B, N), answers (B,))`` like
    ``attnkit.cli.train.Task``; ids: pair (a, b) = a*S + b, filler K*S + f, query K*S + F + a.
    """

    name: str = "pairs"
    length: int = 1024  # context tokens, N - 1
    num_pairs: int = 4  # P pairs per row, distinct keys
    num_keys: int = 4  # K possible keys
    num_symbols: int = 8  # S possible values: the answers (chance 1/S)
    num_filler: int = 1  # F filler ids (with 8, exact attention stayed at chance in a 475-step trial)

    def __post_init__(self):
        if not (1 <= self.num_pairs <= min(self.num_keys, self.length)) or min(self.num_symbols, self.num_filler) < 1:
            raise ValueError(f"PairRecall: need 1 <= num_pairs <= num_keys, num_pairs <= length and num_symbols, "
                             f"num_filler >= 1; got {self}")

    @property
    def vocab_size(self) -> int:
        return self.num_keys * self.num_symbols + self.num_filler + self.num_keys

    @property
    def seq_len(self) -> int:
        return self.length + 1

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        L, P, K, S, F = self.length, self.num_pairs, self.num_keys, self.num_symbols, self.num_filler
        ids = K * S + torch.randint(0, F, (batch, L), generator=generator)  # (B, L) filler
        keys = torch.rand(batch, K, generator=generator).argsort(dim=1)[:, :P]  # (B, P) distinct keys
        values = torch.randint(0, S, (batch, P), generator=generator)  # (B, P)
        where = torch.rand(batch, L, generator=generator).argsort(dim=1)[:, :P]  # (B, P) distinct positions
        ids.scatter_(1, where, keys * S + values)
        which = torch.randint(0, P, (batch, 1), generator=generator)  # (B, 1) the pair asked for
        query = K * S + F + keys.gather(1, which)  # (B, 1)
        return torch.cat([ids, query], dim=1), values.gather(1, which)[:, 0]  # (B, L + 1), (B,)


@dataclass(frozen=True)
class Setup:
    """A task with the model and training settings it is run with."""

    name: str
    task: Task | PairRecall
    model: ModelConfig
    train: TrainConfig
    budget_s: float
    window: int  # the default W of the ``window`` variant


def _setups() -> dict[str, Setup]:
    lookup = make_task("lookup")  # attnkit train's default: n=32, 16 symbols
    recall = make_task("recall", 512, 512)  # N=1025
    pairs_train = TrainConfig(time_budget=300.0, batch_size=8, eval_every=40, eval_size=256, final_eval_size=1024)
    recall_train = TrainConfig(time_budget=240.0, batch_size=16, eval_every=25, eval_size=256, final_eval_size=1024)
    return {
        "lookup": Setup("lookup", lookup, ModelConfig(), TrainConfig(time_budget=120.0), 120.0, 4),
        "pairs1024": Setup("pairs1024", PairRecall(), ModelConfig(embed_dim=32, num_heads=2, num_layers=1),
                           pairs_train, 300.0, 64),
        "recall512": Setup("recall512", recall, ModelConfig(embed_dim=64, num_heads=4, positional="sinusoidal"),
                           recall_train, 240.0, 64),
    }


SETUPS = _setups()
DEFAULT_TASKS = ("lookup", "pairs1024")


@dataclass(frozen=True)
class Variant:
    """One attention variant: a method and its size parameter (None where it has none)."""

    method: str
    param: int | None

    @property
    def label(self) -> str:
        return self.method if self.param is None else f"{self.method}:{self.param}"


def parse_variant(spec: str) -> Variant:
    """``"performer:256"`` -> Variant("performer", 256); ``"nystrom"`` -> the default m.

    ``window`` without W keeps None here (the task picks it). Raises ValueError: an unknown method,
    a parameter on a method without one, or one that is not an int >= 1.
    """
    method, _, value = spec.partition(":")
    if method not in METHODS:
        raise ValueError(f"unknown variant {spec!r}: expected one of {', '.join(METHODS)}, optionally with "
                         "a size, e.g. performer:256, linformer:64, nystrom:64, window:32")
    if not value:
        return Variant(method, DEFAULTS.get(method))
    if method not in PARAMETER:
        raise ValueError(f"variant {spec!r}: {method} takes no size; write {method!r}")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"variant {spec!r}: {PARAMETER[method]} must be an int >= 1, got {value!r}")
    return Variant(method, int(value))


# -- the model ---------------------------------------------------------------------------------------

class LastPositionClassifier(nn.Module):
    """A bidirectional encoder and a linear head read at the last position.

    ids (B, N) int64 -> logits (B, 1, V): the shape ``attnkit.cli.train`` reads with ``[:, -1]``
    (the head runs on the last position only).
    """

    def __init__(self, encoder: Encoder, head: nn.Linear):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.encoder(ids)[:, -1:])  # (B, 1, V)


def _core(variant: Variant, cfg: ModelConfig, seq_len: int) -> nn.Module | None:
    D = cfg.embed_dim // cfg.num_heads
    if variant.method == "linear":
        return LinearAttention()
    if variant.method == "performer":
        return PerformerAttention(D, variant.param, redraw_interval=PERFORMER_REDRAW)
    if variant.method == "linformer":
        return LinformerAttention.build(seq_len, variant.param)
    if variant.method == "nystrom":
        return NystromAttention(variant.param)
    return None  # exact and window: ak.attention


def encoder_mask(variant: Variant, setup: Setup) -> ak.Mask | None:
    """None (every token sees every token), or the Longformer pattern for ``window``."""
    if variant.method != "window":
        return None
    W = setup.window if variant.param is None else variant.param
    return ak.sliding_window(W) | ak.global_tokens([setup.task.seq_len - 1])


def build_classifier(setup: Setup, variant: Variant) -> LastPositionClassifier:
    """The shared model family with ``variant``'s attention (see the module docstring)."""
    cfg, task = setup.model, setup.task
    E = cfg.embed_dim
    blocks = [PreNormBlock(MultiHeadAttention(E, cfg.num_heads, core=_core(variant, cfg, task.seq_len)),
                           FeedForward(E, cfg.ffn_mult * E), RMSNorm(E), RMSNorm(E))
              for _ in range(cfg.num_layers)]
    positional = (LearnedPositionalEmbedding(task.seq_len, E) if cfg.positional == "learned"
                  else SinusoidalPositionalEncoding(E))
    embeddings = TokenEmbeddings(task.vocab_size, E, positional=positional)
    encoder = Encoder(embeddings, blocks, RMSNorm(E), mask=encoder_mask(variant, setup))
    return LastPositionClassifier(encoder, nn.Linear(E, task.vocab_size, bias=False))


def exact_backend(setup: Setup, variant: Variant) -> str | None:
    """The backend ``impl="auto"`` picks for one layer's call (exact variants), else None."""
    if variant.method not in ("exact", "window"):
        return None
    cfg, N = setup.model, setup.task.seq_len
    q = torch.zeros(setup.train.batch_size, cfg.num_heads, N, cfg.embed_dim // cfg.num_heads)
    return ak.explain(q, q, q, mask=encoder_mask(variant, setup)).chosen


# -- runs --------------------------------------------------------------------------------------------

def run_one(setup: Setup, variant: Variant, seed: int, budget_s: float, *, progress=None) -> dict:
    """Train one variant from scratch on one task; its record (history, final accuracy, ...)."""
    load = [round(x, 2) for x in os.getloadavg()]
    torch.manual_seed(seed)  # initial weights and the Performer's first features
    model = build_classifier(setup, variant)
    cfg = replace(setup.train, time_budget=budget_s)
    kwargs = {} if progress is None else {"progress": progress}
    record = train(model, setup.task, cfg, seed, label=f"{setup.name} {variant.label:<14}", **kwargs)
    t0 = time.perf_counter()
    record["final_accuracy"] = round(final_accuracy(model, setup.task, cfg.final_eval_size, seed), 5)
    steps_per_s = record["steps"] / record["seconds"] if record["seconds"] > 0 else None
    return {"task": setup.name, "variant": variant.label, "method": variant.method, "seed": seed,
            "params": sum(p.numel() for p in model.parameters()), "backend": exact_backend(setup, variant),
            "budget_s": budget_s, "load_average_at_start": load,
            "steps_per_s": None if steps_per_s is None else round(steps_per_s, 3),
            "final_eval_s": round(time.perf_counter() - t0, 3), **record}


def first_time_at(history: list[dict], level: float) -> float | None:
    """Seconds of the first evaluation with accuracy >= level, or None if never reached."""
    return next((h["seconds"] for h in history if h["accuracy"] >= level), None)


# -- outputs -----------------------------------------------------------------------------------------

def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def markdown(doc: dict) -> str:
    """Machine, settings and one table per task."""
    h = doc["header"]
    lines = [f"# Approximate attention trained from scratch ({h['date']})", "",
             f"{h['cpu_model']}, {h['cpu_count']} CPUs, torch {h['torch_version']} ({h['torch_num_threads']} "
             f"threads), attnkit {h['attnkit_version']}. Command: `{doc['command']}`", ""]
    for name, task_doc in doc["tasks"].items():
        t, m = task_doc["task"], task_doc["model"]
        lines += [f"## {name}: N={task_doc['seq_len']}, chance {100 / t['num_symbols']:.2g}%", "",
                  "Task: " + ", ".join(f"{k}={v}" for k, v in t.items()) + ". "
                  f"Model: E={m['embed_dim']}, heads={m['num_heads']}, layers={m['num_layers']}, "
                  f"{m['positional']} positions, batch "
                  f"{task_doc['train']['batch_size']}; held-out set {task_doc['train']['eval_size']}, final set "
                  f"{task_doc['train']['final_eval_size']}.", "",
                  "| variant | seed | params | backend | steps | steps/s | seconds | s to 50% | s to 90% | "
                  "last held-out | final acc | load at start |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in doc["runs"] if r["task"] == name):
            hist = r["history"]
            lines.append(f"| {r['variant']} | {r['seed']} | {r['params']} | {r['backend'] or '-'} | {r['steps']} | "
                         f"{r['steps_per_s']} | {_fmt_s(r['seconds'])} | {_fmt_s(first_time_at(hist, 0.5))} | "
                         f"{_fmt_s(first_time_at(hist, 0.9))} | {100 * hist[-1]['accuracy']:.1f}% | "
                         f"{100 * r['final_accuracy']:.1f}% | {r['load_average_at_start'][0]} |")
        lines.append("")
    lines += ["Seconds are wall clock, training and evaluation together; a run stops at 99% held-out accuracy "
              "or when its budget is spent (at the next evaluation). `final acc` is on a second, fresh set.", ""]
    return "\n".join(lines)


def plot_task(doc: dict, name: str, path: Path) -> None:
    """Held-out accuracy (%) against seconds, one line per run of task ``name``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_doc, h = doc["tasks"][name], doc["header"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for i, r in enumerate(r for r in doc["runs"] if r["task"] == name):
        secs = [p["seconds"] for p in r["history"]]
        acc = [100 * p["accuracy"] for p in r["history"]]
        ax.plot(secs, acc, lw=1.6, color=f"C{i % 10}", ls="-" if r["method"] in ("exact", "window") else "--",
                label=f"{r['variant']} (seed {r['seed']})")
    t = task_doc["task"]
    ax.axhline(99, color="black", ls=":", lw=0.8, label="99% (stop)")
    ax.axhline(100 / t["num_symbols"], color="gray", ls=":", lw=0.8, label="chance")
    ax.set(xlabel="wall-clock seconds (training + evaluation)", ylabel="held-out accuracy (%)", ylim=(0, 101),
           title=f"{name} (N={task_doc['seq_len']}): {h['cpu_model']}, {h['torch_num_threads']} threads")
    ax.title.set_fontsize(9)
    ax.legend(loc="best", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(doc: dict, out_dir: Path, stem: str, *, plots: bool = True) -> list[Path]:
    """JSON, markdown and (with ``plots``) one PNG per task that has runs; the paths written."""
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md"]
    paths[0].write_text(json.dumps(doc, indent=1))
    paths[1].write_text(markdown(doc))
    if plots:
        for name in {r["task"] for r in doc["runs"]}:
            paths.append(out_dir / f"{stem}_{name}.png")
            plot_task(doc, name, paths[-1])
    return paths


# -- command line ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", type=CommaList(str), default=DEFAULT_TASKS,
                   help=f"of {', '.join(SETUPS)} (default {','.join(DEFAULT_TASKS)})")
    p.add_argument("--variants", type=CommaList(str), default=METHODS,
                   help="method[:size], e.g. exact,window:32,linear,performer:256,linformer:64,nystrom:64")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock seconds per run (default per task: "
                        + ", ".join(f"{s.name} {s.budget_s:g}" for s in SETUPS.values()) + ")")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one run per seed and variant (default 0)")
    p.add_argument("--out-dir", default="benchmarks/results")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs (no matplotlib needed)")
    args = p.parse_args(argv)
    unknown = [t for t in args.tasks if t not in SETUPS]
    if unknown:
        p.error(f"--tasks: unknown {unknown}; expected some of {', '.join(SETUPS)}")
    try:
        args.variants = [parse_variant(v) for v in args.variants]
    except ValueError as e:
        p.error(f"--variants: {e}")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        out_dir = prepare_output_dir(args.out_dir, "--out-dir")
    except OutputPathError as e:
        print(f"approx_train: error: {e}", file=sys.stderr)
        return 2
    stem = "approx_train_" + _dt.datetime.now().strftime("%Y-%m-%dT%H%M")
    head = header()
    head["settings"] = {"dtype": "float32", "device": "cpu"}  # header()'s B/H/D are the exact suite's
    doc = {"header": head, "command": " ".join(["python benchmarks/approx_train.py", *argv]),
           "tasks": {}, "runs": []}
    print(f"approx_train: writing {out_dir / stem}.json / .md / _<task>.png")
    for name in args.tasks:
        setup = SETUPS[name]
        doc["tasks"][name] = {"task": asdict(setup.task), "seq_len": setup.task.seq_len,
                              "model": asdict(setup.model), "train": asdict(setup.train),
                              "window_default": setup.window}
        for seed in args.seed:
            for variant in args.variants:
                budget = setup.budget_s if args.budget_s is None else args.budget_s
                doc["runs"].append(run_one(setup, variant, seed, budget))
                write_results(doc, out_dir, stem, plots=not args.no_plot)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
