"""``attnkit train``: a small decoder learns, on the CPU, a synthetic task that needs attention.

Two tasks, both answered by the logits at the last position, scored on the answer token only:

- ``lookup`` (default): ``x_1 .. x_n  ?i``  ->  ``x_i``. n random symbols, then a query token that
  names a position; the answer is the symbol at that position. Finding it needs *position* (the
  symbols are i.i.d., so nothing but their order tells which one is the i-th) and *selection*
  (one token out of n has to be copied out, which a running mean cannot do).
- ``recall``: ``k_1 v_1 .. k_P v_P  k_j``  ->  ``v_j`` (associative recall, distinct keys). The
  value is the token right *after* the matching key: content lookup plus a one-step offset.

Three variants of the same decoder (``DecoderLM`` from ``attnkit.nn``):

- ``full``:  the model as built, with its positional encoding;
- ``nopos``: the same without any positional encoding;
- ``mean``:  every ``MultiHeadAttention`` replaced by ``MeanMixing`` (the causal running mean of
  the value projections: each token sees the average of everything so far, no selection).

Legend: B batch, N tokens, E model width, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

import attnkit as ak
from attnkit.cli._paths import OutputPathError, check_output_file
from attnkit.cli._progress import progress_bar
from attnkit.nn import (DecoderLM, FeedForward, LearnedPositionalEmbedding, MultiHeadAttention, PreNormBlock,
                        RMSNorm, RotaryEmbedding, SinusoidalPositionalEncoding, TokenEmbeddings)

VARIANTS = ("full", "nopos", "mean")
POSITIONALS = ("rope", "learned", "sinusoidal")


# -- tasks -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """A synthetic task: ``sample(B, generator) -> (ids (B, N), answers (B,))``.

    ``num_symbols`` symbols are the possible answers (chance accuracy is 1 / num_symbols).
    """

    name: str
    length: int  # n for lookup (symbols), P for recall (pairs)
    num_symbols: int

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + self.length if self.name == "lookup" else 2 * self.num_symbols

    @property
    def seq_len(self) -> int:
        return self.length + 1 if self.name == "lookup" else 2 * self.length + 1

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        sampler = {"lookup": _sample_lookup, "recall": _sample_recall}[self.name]
        return sampler(self, batch, generator)


def make_task(name: str, length: int | None = None, num_symbols: int = 16) -> Task:
    """``lookup`` (default n=32 symbols) or ``recall`` (default P=12 pairs); ``num_symbols`` answers."""
    if name not in ("lookup", "recall"):
        raise ValueError(f"task must be 'lookup' or 'recall', got {name!r}")
    length = {"lookup": 32, "recall": 12}[name] if length is None else length
    if length < 2 or num_symbols < 2:
        raise ValueError(f"task {name}: need length >= 2 and num_symbols >= 2, got {length} and {num_symbols}")
    if name == "recall" and length > num_symbols:
        raise ValueError(f"recall: {length} pairs need at least as many distinct keys, got num_symbols="
                         f"{num_symbols}; raise --num-symbols or lower --length")
    return Task(name, length, num_symbols)


def _sample_lookup(task: Task, batch: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """ids: symbols 0..S-1 at positions 0..n-1, then the query token S + i; answer x_i."""
    n, S = task.length, task.num_symbols
    symbols = torch.randint(0, S, (batch, n), generator=g)  # (B, n)
    index = torch.randint(0, n, (batch,), generator=g)  # (B,)
    ids = torch.cat([symbols, (S + index)[:, None]], dim=1)  # (B, n + 1)
    return ids, symbols.gather(1, index[:, None])[:, 0]


def _sample_recall(task: Task, batch: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """ids: keys S..2S-1 (distinct per row) and values 0..S-1, interleaved, then a key; its value."""
    P, S = task.length, task.num_symbols
    keys = torch.rand(batch, S, generator=g).argsort(dim=1)[:, :P] + S  # (B, P) distinct keys
    values = torch.randint(0, S, (batch, P), generator=g)  # (B, P)
    which = torch.randint(0, P, (batch,), generator=g)  # (B,)
    pairs = torch.stack([keys, values], dim=2).flatten(1)  # (B, 2P) k_1 v_1 k_2 v_2 ...
    ids = torch.cat([pairs, keys.gather(1, which[:, None])], dim=1)  # (B, 2P + 1)
    return ids, values.gather(1, which[:, None])[:, 0]


# -- models ------------------------------------------------------------------------------------------

class MeanMixing(nn.Module):
    """Attention replaced by a mean: ``out_proj(mean_{s <= t} v_proj(x_s))`` at every position t.

    Same call signature as ``MultiHeadAttention`` so it drops into ``PreNormBlock``. Every token
    gets the average of the values so far: the mixing is causal but cannot choose what to read.
    x (B, N, E) -> (B, N, E).
    """

    def __init__(self, embed_dim: int, *, bias: bool = True):
        super().__init__()
        self.embed_dim = embed_dim
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor, memory: Tensor | None = None, *, mask: ak.Mask | Tensor | None = None,
                bias: ak.Bias | Tensor | None = None, cache: object | None = None,
                positions: Tensor | None = None) -> Tensor:
        # positions is accepted and ignored: a running mean has no notion of where tokens sit
        if memory is not None or bias is not None or cache is not None:
            raise ValueError("MeanMixing is causal self-mixing only: expected memory=None, bias=None, cache=None; "
                             "use MultiHeadAttention for cross-attention, biases or KV caches")
        if mask is not None and mask != ak.causal():
            raise ValueError(f"MeanMixing always mixes causally: expected mask=None or ak.causal(), got {mask!r}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"MeanMixing: expected x of shape (B, N, E={self.embed_dim}), got {tuple(x.shape)}")
        v = self.v_proj(x)  # (B, N, E)
        counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=v.dtype)  # (N,)
        return self.out_proj(v.cumsum(dim=1) / counts[:, None])  # (B, N, E)


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 32
    num_heads: int = 4
    num_layers: int = 2
    ffn_mult: int = 4
    positional: str = "learned"  # rope | learned | sinusoidal (the "full" variant's)


def _mixer(cfg: ModelConfig, variant: str) -> nn.Module:
    if variant == "mean":
        return MeanMixing(cfg.embed_dim)
    rope = variant == "full" and cfg.positional == "rope"
    return MultiHeadAttention(cfg.embed_dim, cfg.num_heads,
                              positional=RotaryEmbedding(cfg.embed_dim // cfg.num_heads) if rope else None)


def _absolute(cfg: ModelConfig, variant: str, seq_len: int) -> nn.Module | None:
    """The embedding-side encoding; ``mean`` keeps it (position is not what it lacks)."""
    if variant == "nopos" or cfg.positional == "rope":
        return None
    if cfg.positional == "learned":
        return LearnedPositionalEmbedding(seq_len, cfg.embed_dim)
    return SinusoidalPositionalEncoding(cfg.embed_dim)


def build_model(task: Task, variant: str, cfg: ModelConfig = ModelConfig()) -> DecoderLM:
    """A pre-norm decoder (RMSNorm, GELU feed-forward, causal mask) for ``task`` in one ``variant``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if cfg.positional not in POSITIONALS:
        raise ValueError(f"positional must be one of {POSITIONALS}, got {cfg.positional!r}")
    E = cfg.embed_dim
    blocks = [PreNormBlock(_mixer(cfg, variant), FeedForward(E, cfg.ffn_mult * E), RMSNorm(E), RMSNorm(E))
              for _ in range(cfg.num_layers)]
    embeddings = TokenEmbeddings(task.vocab_size, E, positional=_absolute(cfg, variant, task.seq_len))
    return DecoderLM(embeddings, blocks, RMSNorm(E), nn.Linear(E, task.vocab_size, bias=False), mask=ak.causal())


# -- training ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    steps: int = 20000
    time_budget: float = 180.0  # seconds of wall clock, evaluation included
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    eval_every: int = 50
    eval_size: int = 2000
    final_eval_size: int = 10000
    target: float = 0.99


def answer_loss_and_accuracy(model: nn.Module, ids: Tensor, answers: Tensor) -> tuple[Tensor, Tensor]:
    """Cross-entropy and accuracy of the last position's prediction against the answers (B,)."""
    logits = model(ids)[:, -1]  # (B, V)
    loss = nn.functional.cross_entropy(logits, answers)
    return loss, (logits.argmax(-1) == answers).float().mean()


@torch.no_grad()
def evaluate(model: nn.Module, ids: Tensor, answers: Tensor, chunk: int = 1000) -> tuple[float, float]:
    """Mean loss and accuracy on a held-out set, in chunks."""
    model.eval()
    loss = correct = 0.0
    for start in range(0, ids.shape[0], chunk):
        part_ids, part_ans = ids[start:start + chunk], answers[start:start + chunk]
        l, a = answer_loss_and_accuracy(model, part_ids, part_ans)
        loss, correct = loss + float(l) * len(part_ans), correct + float(a) * len(part_ans)
    model.train()
    return loss / ids.shape[0], correct / ids.shape[0]


def _progress(label: str, total: int) -> tqdm:
    """The default progress of a run: tqdm over its steps, one short line per 30 s in a log."""
    return progress_bar(label, total, unit="step")


def _lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup)  # linear warm-up, then constant (open-ended run)


def train(model: nn.Module, task: Task, cfg: TrainConfig, seed: int, *, label: str = "train",
          progress: Callable[[str, int], tqdm] = _progress) -> dict:
    """Train until held-out accuracy >= target, ``cfg.steps`` or ``cfg.time_budget``; return the record.

    ``progress(label, total_steps)`` makes the progress bar (a tqdm; ``tqdm(disable=True)`` for none).
    """
    g_train = torch.Generator().manual_seed(seed)
    held_ids, held_ans = task.sample(cfg.eval_size, torch.Generator().manual_seed(10_000 + seed))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    bar, history, step, t0 = progress(label, cfg.steps), [], 0, time.perf_counter()
    loss = torch.tensor(float("nan"))
    while True:
        if step % cfg.eval_every == 0 or step == cfg.steps:
            seconds = time.perf_counter() - t0
            ev_loss, ev_acc = evaluate(model, held_ids, held_ans)
            history.append({"step": step, "seconds": round(seconds, 3), "train_loss": round(float(loss.detach()), 5),
                            "loss": round(ev_loss, 5), "accuracy": round(ev_acc, 5)})
            bar.set_postfix_str(f"loss {ev_loss:.3f} acc {ev_acc:.1%} budget {cfg.time_budget:.0f}s", refresh=False)
            bar.update(step - bar.n)  # redraws at most every mininterval
            if ev_acc >= cfg.target or step >= cfg.steps or seconds >= cfg.time_budget:
                break
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        ids, answers = task.sample(cfg.batch_size, g_train)
        loss, _ = answer_loss_and_accuracy(model, ids, answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    bar.close()
    return {"steps": step, "seconds": history[-1]["seconds"], "reached_target": history[-1]["accuracy"] >= cfg.target,
            "history": history}


def final_accuracy(model: nn.Module, task: Task, size: int, seed: int) -> float:
    """Accuracy on a second, larger set of fresh examples (never used to decide when to stop)."""
    ids, answers = task.sample(size, torch.Generator().manual_seed(20_000 + seed))
    return evaluate(model, ids, answers)[1]


def run_variant(task: Task, variant: str, model_cfg: ModelConfig, cfg: TrainConfig, seed: int) -> dict:
    load = [round(x, 2) for x in os.getloadavg()]  # other work on the machine skews the seconds
    torch.manual_seed(seed)  # the initial weights
    model = build_model(task, variant, model_cfg)
    record = train(model, task, cfg, seed, label=f"{variant:<5} seed {seed}")
    record["final_accuracy"] = round(final_accuracy(model, task, cfg.final_eval_size, seed), 5)
    params = sum(p.numel() for p in model.parameters())
    return {"variant": variant, "seed": seed, "params": params, "load_average_at_start": load, **record}


# -- command line ------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=("lookup", "recall"), default="lookup",
                   help="lookup: n symbols then a position, answer the symbol there; recall: key-value pairs "
                        "then a key, answer its value (default lookup)")
    p.add_argument("--length", type=int, default=None, help="symbols (lookup, default 32) or pairs (recall, 12)")
    p.add_argument("--num-symbols", type=int, default=16, help="possible answers; chance = 1/this (default 16)")
    p.add_argument("--variant", choices=VARIANTS + ("all",), default="full",
                   help="full model, no positional encoding, attention replaced by a mean, or all three "
                        "(default full)")
    p.add_argument("--positional", choices=POSITIONALS, default="learned",
                   help="the full model's positional encoding (default learned absolute)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps,
                   help=f"at most this many steps per run (default {TrainConfig.steps})")
    p.add_argument("--time-budget", type=float, default=TrainConfig.time_budget,
                   help=f"wall-clock seconds per run, evaluation included (default {TrainConfig.time_budget:g})")
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="one run per seed; several space-separated, e.g. --seed 0 1 2 (default 0)")
    p.add_argument("--eval-every", type=int, default=TrainConfig.eval_every,
                   help=f"steps between evaluations (default {TrainConfig.eval_every})")
    p.add_argument("--embed-dim", type=int, default=ModelConfig.embed_dim,
                   help=f"model width E (default {ModelConfig.embed_dim})")
    p.add_argument("--layers", type=int, default=ModelConfig.num_layers,
                   help=f"decoder blocks (default {ModelConfig.num_layers})")
    p.add_argument("--out", default=None, help="write every run's record (config, history, results) as JSON to "
                   "this file; its directory must exist and be writable (checked before training starts)")


def _environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def summary_table(runs: list[dict]) -> str:
    header = (f"{'variant':<8} {'seed':>4} {'params':>7} {'steps':>6} {'seconds':>8} {'held-out acc':>13} "
              f"{'final acc':>10}  reached 99%")
    lines = [header]
    for r in runs:
        lines.append(f"{r['variant']:<8} {r['seed']:>4} {r['params']:>7} {r['steps']:>6} {r['seconds']:>8.1f} "
                     f"{r['history'][-1]['accuracy']:>13.2%} {r['final_accuracy']:>10.2%}  "
                     f"{'yes' if r['reached_target'] else 'no'}")
    return "\n".join(lines)


def run_train(args: argparse.Namespace, command: str = "attnkit train") -> int:
    if args.steps < 1 or args.time_budget <= 0 or args.eval_every < 1:
        raise SystemExit(f"attnkit train: --steps and --eval-every must be >= 1 and --time-budget > 0, got "
                         f"{args.steps}, {args.eval_every}, {args.time_budget}")
    try:  # before any training: a bad --out would otherwise lose the run at the end
        out = None if args.out is None else check_output_file(args.out, "--out")
    except OutputPathError as e:
        print(f"attnkit train: error: {e}", file=sys.stderr)
        return 2
    task = make_task(args.task, args.length, args.num_symbols)
    model_cfg = ModelConfig(embed_dim=args.embed_dim, num_layers=args.layers, positional=args.positional)
    cfg = TrainConfig(steps=args.steps, time_budget=args.time_budget, eval_every=args.eval_every)
    variants = VARIANTS if args.variant == "all" else (args.variant,)
    print(f"attnkit train: task {task.name} (length {task.length}, {task.num_symbols} symbols, chance "
          f"{1 / task.num_symbols:.1%}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    runs = [run_variant(task, v, model_cfg, cfg, seed) for seed in args.seed for v in variants]
    print(summary_table(runs))
    if out is not None:
        doc = {"task": asdict(task), "model": asdict(model_cfg), "train": asdict(cfg),
               "environment": _environment(), "command": command, "runs": runs}
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attnkit train", description=__doc__.split("\n")[0])
    add_arguments(p)
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_train(p.parse_args(argv), " ".join(["attnkit train", *argv]))


if __name__ == "__main__":
    sys.exit(main())
