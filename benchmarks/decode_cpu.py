"""KV-cache decoding on the CPU: attnkit's DecoderLM against transformers' LlamaForCausalLM, same weights.

    python benchmarks/decode_cpu.py [--batches 1,8] [--prompt 128] [--new 128] [--reps 5]
        [--out-dir benchmarks/results]

Model: a randomly initialised Llama (hidden 512, 8 layers, 8 query heads, 2 KV heads, head dim 64,
SwiGLU 1408, vocab 8192, fp32, eval), built by transformers and loaded into attnkit with
``attnkit.pretrained.load_llama``. One process, the same prompts for every contender.

Contenders, greedy decoding of ``--new`` tokens after a ``--prompt``-token prompt:
  attnkit_cache     ``DecoderLM.generate(prompt, new)`` (KV cache, impl="auto")
  attnkit_nocache   ``generate(..., use_cache=False)``: recomputes the whole sequence every step (B=1 only)
  hf_cache          ``LlamaForCausalLM.generate(do_sample=False)`` (its default sdpa attention, DynamicCache)
and the prefill alone (one forward over a 2048-token prompt, B=1) for attnkit and HF.

Method: the tokens of every contender are compared with attnkit_cache's before timing (a mismatch
is recorded, not timed; this run is also the warm-up); then ``--reps`` timed runs per contender,
alternating between contenders so that the machine's drift hits all alike; medians reported, as
generated tokens per second (B * new / seconds). Outputs: ``<out-dir>/decode_cpu_<YYYY-MM-DDTHHMM>.{json,md}``,
written at the end; ``--out-dir`` is created if missing (or refused, if it cannot be) before the models are built.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from typing import Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnkit.bench.cpu import CommaList, header
from attnkit.cli._paths import OutputPathError, prepare_output_dir
from attnkit.pretrained import load_llama

CONFIG = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
              intermediate_size=1408, vocab_size=8192, max_position_embeddings=4096, rope_theta=10000.0,
              tie_word_embeddings=False)


def build_models():
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    return hf, load_llama(hf.state_dict(), hf.config)


def contenders(hf, ak_model, new: int):
    def hf_generate(prompt):
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)
        return out

    return {
        "attnkit_cache": lambda p: ak_model.generate(p, new),
        "attnkit_nocache": lambda p: ak_model.generate(p, new, use_cache=False),
        "hf_cache": hf_generate,
    }


def timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()
        times.append(time.perf_counter() - t0)
    return times


def interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """Time each function ``reps`` times, alternating between them so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name] += timed(fn, 1)
    return times


def run(args) -> dict:
    hf, ak_model = build_models()
    rows = []
    for B in args.batches:
        prompt = torch.randint(0, CONFIG["vocab_size"], (B, args.prompt), generator=torch.Generator().manual_seed(B))
        runs = contenders(hf, ak_model, args.new)
        if B > 1:  # recomputing everything per step is the B=1 illustration only (minutes at B=8)
            runs.pop("attnkit_nocache")
        with torch.no_grad():
            want = runs["attnkit_cache"](prompt)
            same = {name: torch.equal(fn(prompt), want) for name, fn in runs.items()}  # also the warm-up
        times = interleaved({name: (lambda fn=fn: fn(prompt)) for name, fn in runs.items() if same[name]}, args.reps)
        for name in runs:
            med = statistics.median(times[name]) if same[name] else None
            rows.append({"kind": "generate", "B": B, "contender": name, "tokens_equal": same[name],
                         "times_s": times.get(name, []), "median_s": med,
                         "tokens_per_s": B * args.new / med if med else None})
            print(rows[-1], flush=True)
    long = torch.randint(0, CONFIG["vocab_size"], (1, 2048), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        err = (ak_model(long) - hf(long).logits).abs().max().item()  # also the warm-up
    times = interleaved({"attnkit": lambda: ak_model(long), "hf": lambda: hf(long)}, args.reps)
    for name, ts in times.items():
        rows.append({"kind": "prefill_2048", "B": 1, "contender": name, "times_s": ts,
                     "median_s": statistics.median(ts), "max_abs_logit_diff": err})
        print(rows[-1], flush=True)
    head = {k: v for k, v in header().items() if k != "settings"}  # settings describe the attention suite
    return {"header": head, "config": CONFIG, "prompt": args.prompt, "new": args.new, "rows": rows}


def markdown(result: dict) -> str:
    head = result["header"]
    lines = [f"# Decoding on the CPU, {head['date']}", "",
             f"machine: {head['cpu_model']} ({head['cpu_count']} cores), torch {head['torch_version']}, {head['torch_num_threads']} threads", "",
             f"Llama-style model {result['config']}; prompt {result['prompt']} tokens, {result['new']} new "
             "tokens, greedy, fp32.", "",
             "| B | contender | tokens equal | median s | tokens/s |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["kind"] == "generate":
            tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else "—"
            med = f"{r['median_s']:.2f}" if r["median_s"] else "—"
            lines.append(f"| {r['B']} | {r['contender']} | {r['tokens_equal']} | {med} | {tps} |")
    lines += ["", "| prefill, 2048 tokens | median s | max abs logit diff |", "|---|---|---|"]
    for r in result["rows"]:
        if r["kind"] == "prefill_2048":
            lines.append(f"| {r['contender']} | {r['median_s']:.2f} | {r['max_abs_logit_diff']:.2e} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; list options are comma-separated (``--batches 1,8``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", metavar="B,...", type=CommaList(int), default=(1, 8),
                    help="batch sizes, comma-separated (default 1,8)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    ap.add_argument("--new", type=int, default=128, help="tokens generated per prompt (default 128)")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per contender (default 5)")
    ap.add_argument("--out-dir", default="benchmarks/results",
                    help="where the JSON/markdown go; created if missing, before the models are built "
                         "(default benchmarks/results)")
    return ap


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # before any work: the results are written only at the end of the run
        out = prepare_output_dir(args.out_dir, "--out-dir")
    except OutputPathError as e:
        print(f"decode_cpu.py: error: {e}", file=sys.stderr)
        return 2
    result = run(args)
    stamp = _dt.datetime.now().strftime("%Y-%m-%dT%H%M")
    (out / f"decode_cpu_{stamp}.json").write_text(json.dumps(result, indent=1))
    (out / f"decode_cpu_{stamp}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
