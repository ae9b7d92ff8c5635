"""transformers models, one training step: attn_implementation eager / sdpa / attnkit, time and memory.

    python benchmarks/hf_train_step.py [--models longformer,llama] [--ns 4096,8192,16384,32768]
        [--impls eager,sdpa,attnkit] [--reps 3] [--case-budget-s 240] [--timeout 1200]
        [--mem-budget-gb 14] [--out-dir benchmarks/results]

Models (random weights, seeded; the same weights for every impl of a model and N), fp32, batch 1:
  longformer  ``LongformerForMaskedLM``: hidden 256, 4 heads, 2 layers, intermediate 512, vocab 1024,
              attention_window 512 (256 keys each side), token 0 global, transformers' default
              dropouts (attention 0.1, hidden 0.1); labels = the input ids (MLM loss on every token).
              eager = transformers' own ``LongformerSelfAttention``; attnkit =
              ``attnkit.integrations.transformers.longformer.swap_longformer_attention(model)``;
              sdpa does not exist for Longformer (transformers refuses it; the refusal is recorded).
  llama       ``LlamaForCausalLM``, same sizes (4 KV heads, head dim 64), plain causal,
              ``attention_dropout=0.1`` (transformers' default is 0: set so the dropout path runs).
  mistral     (on request) ``MistralForCausalLM``, the same with ``sliding_window=4096``.
  For llama / mistral the impl is ``attn_implementation=`` (attnkit after
  ``import attnkit.integrations.transformers``, which registers it).

Every (N, model, impl) runs in a fresh ``python benchmarks/hf_train_step.py --case JSON`` process,
side by side in one command (N outer, so a row's impls run minutes apart, not hours):
  * an eval forward without dropout first (its loss: a cross-check that the impls compute the same
    model; also the library start-up, outside the measurement);
  * then in train mode: ``zero_grad(set_to_none) -> model(**batch).loss -> backward()``, no
    optimizer. One warm-up step, then up to ``--reps`` timed steps (fewer when the warm-up says they
    would take more than ``--case-budget-s``); the median is reported.
  * Memory: gc + malloc_trim, then the peak-RSS mark is reset (``attnkit.bench.process``) right
    before the warm-up step; extra peak = VmHWM after the timed steps - RSS at the reset (the model,
    its inputs and the eval pass are not in it; the gradients the first step allocates are).
  * A case is skipped before it starts when its estimated memory exceeds ``--mem-budget-gb``
    (eager, and sdpa with dropout on the CPU, hold (H, N, N) probabilities per layer; see
    ``estimate_gb``), and killed after ``--timeout`` seconds (status "timeout").
Results: ``<out-dir>/hf_train_step_<YYYY-MM-DDTHHMM>.json`` and ``.md``, rewritten after each case.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

import attnkit as ak
from attnkit.bench.cpu import (RESULT_TAG, CommaList, _limit_address_space, run_case_process, cpu_model,
                               measured_or_failed)
from attnkit.bench.process import peak_rss_mb, release_memory, reset_peak_rss
from attnkit.cli._paths import OutputPathError, prepare_output_dir

MODELS = ("longformer", "llama", "mistral")
DEFAULT_MODELS = ("longformer", "llama")
IMPLS = ("eager", "sdpa", "attnkit")
NS = (4096, 8192, 16384, 32768)
HIDDEN, HEADS, LAYERS, INTERMEDIATE, VOCAB = 256, 4, 2, 512, 1024
HEAD_DIM = HIDDEN // HEADS
LONGFORMER_WINDOW = 512  # transformers' attention_window: 256 keys on each side
MISTRAL_WINDOW = 4096
ATTENTION_DROPOUT = 0.1
GB = 1e9


@dataclass(frozen=True)
class Case:
    """One measurement: a model at sequence length ``n`` with one attention implementation."""

    model: str
    impl: str
    n: int
    reps: int = 3
    case_budget_s: float = 240.0
    seed: int = 0
    as_limit_gb: float = 0.0


def settings() -> dict:
    """The model sizes and dropouts every case uses (recorded in the results)."""
    return {"dtype": "float32", "device": "cpu", "batch": 1, "hidden": HIDDEN, "heads": HEADS, "kv_heads": HEADS,
            "head_dim": HEAD_DIM, "layers": LAYERS, "intermediate": INTERMEDIATE, "vocab": VOCAB,
            "longformer": {"attention_window": LONGFORMER_WINDOW, "global_tokens": [0],
                           "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1, "loss": "MLM, labels = ids"},
            "llama": {"attention_dropout": ATTENTION_DROPOUT, "mask": "causal", "loss": "causal LM"},
            "mistral": {"attention_dropout": ATTENTION_DROPOUT, "sliding_window": MISTRAL_WINDOW},
            "step": "zero_grad(set_to_none) + forward + loss + backward, no optimizer, train mode"}


# ---------------------------------------------------------------------------------------------
# Skips: what a case would hold in memory
# ---------------------------------------------------------------------------------------------

def estimate_gb(model: str, impl: str, n: int) -> float:
    """Rough peak memory (GB) of one training step's attention, the part that grows with N.

    eager (llama / mistral) and sdpa with dropout (torch's CPU SDPA kernels take no dropout, so it
    runs its math path) keep per layer the (H, N, N) fp32 probabilities, the dropped ones and the
    bool keep mask for backward (9 bytes a pair), plus ~3 fp32 (H, N, N) temporaries while one
    layer runs and, for eager, the (N, N) fp32 additive mask. Everything else (Longformer's
    chunks, attnkit's tiles, activations) is linear in N: ~64 KB a token here.
    """
    linear = 64e3 * n / GB
    if model == "longformer" or impl == "attnkit":
        return linear
    pairs = HEADS * n * n
    held = LAYERS * 9 * pairs + 3 * 4 * pairs + (4 * n * n if impl == "eager" else 0)
    return linear + held / GB


def skip_reason(case: Case, mem_budget_gb: float) -> str | None:
    """Why ``case`` is not run, or None."""
    if case.model == "longformer" and case.impl == "sdpa":
        return sdpa_refusal()
    need = estimate_gb(case.model, case.impl, case.n)
    if need > mem_budget_gb:
        return (f"estimated {need:.0f} GB ({LAYERS} layers x (H={HEADS}, N, N) probabilities, dropped "
                f"probabilities and keep mask held for backward), over the {mem_budget_gb:g} GB budget")
    return None


def sdpa_refusal() -> str:
    """transformers' own words when Longformer is asked for sdpa."""
    try:
        build_model(Case("longformer", "sdpa", 1024))
    except ValueError as e:
        return "transformers refuses it: " + str(e).split(". ")[0]
    return "transformers built it, but this script does not run it"


# ---------------------------------------------------------------------------------------------
# Child side: one case in this process
# ---------------------------------------------------------------------------------------------

def _common(**extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=INTERMEDIATE, **extra)


def build_model(case: Case) -> torch.nn.Module:
    """The seeded random-weight model of ``case`` with its attention implementation, train mode."""
    torch.manual_seed(case.seed)
    if case.model == "longformer":
        from transformers import LongformerConfig, LongformerForMaskedLM
        cfg = LongformerConfig(**_common(attention_window=LONGFORMER_WINDOW, max_position_embeddings=case.n + 2))
        impl = "eager" if case.impl == "attnkit" else case.impl  # attnkit: swapped in after building
        model = LongformerForMaskedLM._from_config(cfg, attn_implementation=impl)
        if case.impl == "attnkit":
            from attnkit.integrations.transformers.longformer import swap_longformer_attention
            swap_longformer_attention(model)
        return model.train()
    import attnkit.integrations.transformers  # noqa: F401  registers attn_implementation="attnkit"
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig
    common = _common(num_key_value_heads=HEADS, max_position_embeddings=case.n, attention_dropout=ATTENTION_DROPOUT)
    if case.model == "llama":
        cfg = LlamaConfig(**common)
    elif case.model == "mistral":
        cfg = MistralConfig(**common, sliding_window=MISTRAL_WINDOW, head_dim=HEAD_DIM)
    else:
        raise ValueError(f"model={case.model!r}; expected one of {MODELS}")
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=case.impl).train()


def make_batch(case: Case) -> dict:
    """Seeded token ids (1, N) (ids >= 3: never Longformer's padding id 1), labels = ids."""
    gen = torch.Generator().manual_seed(case.seed + case.n)
    ids = torch.randint(3, VOCAB, (1, case.n), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if case.model == "longformer":
        glob = torch.zeros_like(ids)
        glob[:, 0] = 1  # the [CLS]-like first token attends and is attended globally
        batch["global_attention_mask"] = glob
    return batch


def attnkit_backends(model: torch.nn.Module, step: Callable[[], object]) -> list[str]:
    """What ``impl="auto"`` picks for the attention calls of one training ``step`` (ak.explain on
    the calls' own q, k, mask and dropout), e.g. ["tiled"]; [] when no attnkit call was seen."""
    from attnkit.integrations.transformers import observing
    from attnkit.integrations.transformers.longformer import DropInLongformerSelfAttention
    seen: set[str] = set()

    def explain(q, k, mask, dropout_p: float) -> None:
        v = k.new_empty(k.shape)  # explain reads shapes and dtypes only
        seen.add(ak.explain(q.detach(), k.detach(), v, mask=mask, dropout_p=dropout_p).chosen)

    layers = [m for m in model.modules() if isinstance(m, DropInLongformerSelfAttention)]
    for m in layers:
        m.observers.append(lambda q, k, mask, roles, glob, m=m: explain(q, k, mask, m.dropout * m.training))
    try:  # transformers passes the layer's attention_dropout in training, 0 in eval
        with observing(lambda c: explain(c.q, c.k, c.mask, ATTENTION_DROPOUT * c.module.training)):
            step()
    finally:
        for m in layers:
            m.observers.pop()
    return sorted(seen)


def timed_steps(step: Callable[[], object], reps: int, budget_s: float,
                warm_up: Callable[[], object] | None = None) -> tuple[float, list[float]]:
    """``warm_up`` (default ``step``) once, then ``reps`` timed steps, fewer (>= 1) when the
    warm-up says ``reps`` would take longer than ``budget_s``; (warm-up s, [timed s])."""
    t0 = time.perf_counter()
    (warm_up or step)()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(max(1, min(reps, int(budget_s // max(warm, 1e-9))))):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return warm, times


def measure(case: Case) -> dict:
    """Run ``case`` in this process: eval loss, warm-up and timed steps, memory, attnkit backends."""
    model, batch = build_model(case), make_batch(case)
    model.eval()
    with torch.no_grad():
        eval_loss = model(**batch).loss.item()
    model.train()
    losses: list[float] = []
    backends: list[str] = []

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())

    def warm_up() -> None:  # attnkit: the warm-up step also records what auto picks
        backends.extend(attnkit_backends(model, step) if case.impl == "attnkit" else step() or [])

    release_memory()
    reset_peak_rss()
    base = peak_rss_mb()
    warm, times = timed_steps(step, case.reps, case.case_budget_s, warm_up)
    peak = peak_rss_mb()
    return {"eval_loss": eval_loss, "train_losses": losses, "warmup_s": warm, "times_s": times,
            "baseline_rss_mb": base, "peak_rss_mb": peak, "extra_peak_mb": peak - base,
            "attnkit_backends": backends, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters())}


def child_main(case_json: str) -> int:
    """The child process: measure one case, print its result as one tagged JSON line."""
    case = Case(**json.loads(case_json))
    _limit_address_space(case.as_limit_gb)
    print(RESULT_TAG + json.dumps(measured_or_failed(measure, case)), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side: one child per case, the results files
# ---------------------------------------------------------------------------------------------

def run_child(case: Case, timeout_s: float) -> dict:
    """Run ``case`` in a fresh Python process; its result (status ok / oom / timeout / error)."""
    return run_case_process([sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(asdict(case))],
                            timeout_s)


def run_case(case: Case, mem_budget_gb: float, timeout_s: float,
             runner: Callable[[Case, float], dict] = run_child) -> dict:
    """Skip ``case`` (with the reason) or measure it with ``runner``; the finished row."""
    reason = skip_reason(case, mem_budget_gb)
    status = "n/a" if case.model == "longformer" and case.impl == "sdpa" else "skipped"
    result = {"status": status, "reason": reason} if reason else runner(case, timeout_s)
    times = result.get("times_s")
    return {"model": case.model, "impl": case.impl, "N": case.n, **result,
            "median_s": statistics.median(times) if times else None,
            "estimate_gb": estimate_gb(case.model, case.impl, case.n)}


def header(args: argparse.Namespace) -> dict:
    """Machine, versions, settings and options of the run."""
    import transformers
    return {"date": _dt.datetime.now().isoformat(timespec="seconds"), "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": sys.platform,
            "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "attnkit": ak.__version__, "settings": settings(),
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items() if k != "case"},
            "machine_note": args.note}


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    return (f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}") + unit


def _cell(row: dict | None) -> str:
    """'time s / extra MB', or the status of a case that did not run."""
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    return f"{_fmt(row['median_s'])} s / {_fmt(row['extra_peak_mb'])} MB"


def _ratio(rows: dict, model: str, n: int, impl: str, key: str) -> str:
    a, b = rows.get((model, n, impl)), rows.get((model, n, "attnkit"))
    if not a or not b or a["status"] != "ok" or b["status"] != "ok" or not b[key]:
        return "-"
    return f"{a[key] / b[key]:.2f}x"


def markdown(head: dict, rows: Sequence[dict]) -> str:
    """The results: machine, method, one table (cells: median step time / extra peak RSS), notes."""
    by = {(r["model"], r["N"], r["impl"]): r for r in rows}
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    cols = ["model", "N", *(f"{i}" for i in impls), "eager / attnkit time", "eager / attnkit mem",
            "sdpa / attnkit time", "sdpa / attnkit mem", "attnkit backend", "eval loss (impls)"]
    lines = [f"# transformers training step: eager / sdpa / attnkit, {head['date']}", "",
             f"{head['cpu_model']}, {head['cpu_count']} CPUs, torch {head['torch']} ({head['torch_threads']} threads), "
             f"transformers {head['transformers']}, attnkit {head['attnkit']}. {head['machine_note']}", "",
             f"fp32, batch 1, hidden {HIDDEN}, {HEADS} heads (D={HEAD_DIM}), {LAYERS} layers, intermediate "
             f"{INTERMEDIATE}, vocab {VOCAB}, random weights; Longformer attention_window {LONGFORMER_WINDOW}, "
             f"token 0 global, dropouts 0.1; Llama causal, attention_dropout {ATTENTION_DROPOUT}. One step = "
             "forward + loss + backward in train mode, no optimizer. Cells: median step time (s) / extra peak RSS "
             "over the RSS before the warm-up step (MB = 2^20 bytes); each case in its own process.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for model, n in dict.fromkeys((r["model"], r["N"]) for r in rows):
        got = [by.get((model, n, i)) for i in impls]
        losses = ", ".join(f"{r['eval_loss']:.5f}" for r in got if r and r["status"] == "ok")
        ak_row = by.get((model, n, "attnkit")) or {}
        cells = [model, str(n), *(_cell(r) for r in got),
                 _ratio(by, model, n, "eager", "median_s"), _ratio(by, model, n, "eager", "extra_peak_mb"),
                 _ratio(by, model, n, "sdpa", "median_s"), _ratio(by, model, n, "sdpa", "extra_peak_mb"),
                 ", ".join(ak_row.get("attnkit_backends") or []) or "-", losses or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['model']} N={r['N']} {r['impl']}: {r['status']}: {r['reason']}" for r in rows if r["status"] != "ok"]
    notes += [f"- {r['model']} N={r['N']} {r['impl']}: {len(r['times_s'])} timed step(s) (warm-up "
              f"{r['warmup_s']:.0f} s)" for r in rows if r["status"] == "ok" and len(r["times_s"]) < head["options"]["reps"]]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def write_results(stem: Path, head: dict, rows: Sequence[dict]) -> None:
    """(Re)write ``stem.json`` and ``stem.md``."""
    stem.with_suffix(".json").write_text(json.dumps({"header": head, "rows": list(rows)}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(head, rows))


def format_row(r: dict) -> str:
    what = f"{r['model']:<10} N={r['N']:>6} {r['impl']:<8}"
    if r["status"] != "ok":
        return f"{what} {r['status']}: {r['reason']}"
    return (f"{what} {r['median_s']:8.2f} s x{len(r['times_s'])}  extra peak {r['extra_peak_mb']:8.0f} MB  "
            f"eval loss {r['eval_loss']:.5f}  {','.join(r['attnkit_backends'])}")


def run(args: argparse.Namespace) -> list[dict]:
    """Every (N, model, impl) case, N outer; the results rewritten after each."""
    head = header(args)
    stem = Path(args.out_dir) / f"hf_train_step_{_dt.datetime.now():%Y-%m-%dT%H%M}"
    rows: list[dict] = []
    for n in args.ns:
        for model in args.models:
            for impl in args.impls:
                big = n > args.materializing_max_n and impl != "attnkit" and model != "longformer"
                case = Case(model, impl, n, args.reps, args.case_budget_s, as_limit_gb=args.as_limit_gb)
                row = ({"model": model, "impl": impl, "N": n, "status": "skipped", "median_s": None,
                        "reason": f"not run above N={args.materializing_max_n} (--materializing-max-n) to keep "
                                  f"the run short", "estimate_gb": estimate_gb(model, impl, n)}
                       if big else run_case(case, args.mem_budget_gb, args.timeout))
                rows.append(row)
                write_results(stem, head, rows)
                print(format_row(row), flush=True)
    print(f"wrote {stem}.json and {stem}.md", flush=True)
    return rows


def _available_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return 16.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", metavar="M,...", type=CommaList(str), default=DEFAULT_MODELS,
                   help=f"comma-separated, from {{{','.join(MODELS)}}} (default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--ns", metavar="N,...", type=CommaList(int), default=NS,
                   help=f"sequence lengths, comma-separated (default {','.join(map(str, NS))})")
    p.add_argument("--impls", metavar="I,...", type=CommaList(str), default=IMPLS,
                   help=f"comma-separated, from {{{','.join(IMPLS)}}} (default all)")
    p.add_argument("--reps", type=int, default=3, help="timed steps per case at most, after one warm-up")
    p.add_argument("--case-budget-s", type=float, default=240.0,
                   help="fewer timed steps when the warm-up says they would take longer than this")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds before a case's process is killed")
    p.add_argument("--mem-budget-gb", type=float, default=round(0.7 * _available_gb(), 1),
                   help="skip cases whose estimated memory exceeds this (default 70%% of MemAvailable)")
    p.add_argument("--materializing-max-n", type=int, default=1 << 30,
                   help="run eager / sdpa of llama and mistral only up to this N (time, not memory)")
    p.add_argument("--as-limit-gb", type=float, default=round(0.85 * _available_gb(), 1),
                   help="address-space limit of each case's process, so running out is a row (0: none)")
    p.add_argument("--note", default="", help="a line about the machine for the results (e.g. shared, load)")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the JSON / markdown go (created)")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (JSON) in this process
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name, got, allowed in (("model", args.models, MODELS), ("impl", args.impls, IMPLS)):
        if bad := [x for x in got if x not in allowed]:
            p.error(f"unknown {name}(s) {bad}; choose from {list(allowed)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.case is not None:
        return child_main(args.case)
    try:  # before any case: the results are written after each one
        prepare_output_dir(args.out_dir, "--out-dir")
    except OutputPathError as e:
        print(f"hf_train_step.py: error: {e}", file=sys.stderr)
        return 2
    print(f"transformers training step: models {list(args.models)}, N {list(args.ns)}, impls {list(args.impls)}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), memory budget {args.mem_budget_gb} GB",
          flush=True)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
