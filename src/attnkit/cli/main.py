"""The ``attnkit`` command: ``demo``, ``info``, ``bench``, ``train``, ``viz``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnkit", description="Self-attention end to end.")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="walk through the seed pipeline on the CPU (about a minute)")
    demo.add_argument("--long-n", type=int, default=16384, help="sequence length of the long exact step")
    sub.add_parser("info", help="versions, devices and every backend with its availability")
    from .train import add_arguments as add_train_arguments  # argparse only; torch work happens in run_train
    add_train_arguments(sub.add_parser("train", help="train a small decoder on a task that needs attention "
                                       "(CPU, about 20 s) and compare it with no-position and mean-mixing variants"))
    from .viz import add_arguments as add_viz_arguments
    add_viz_arguments(sub.add_parser("viz", help="the attention of the real MiniLM (or a local transformers checkpoint, --model DIR) "
                                     "on a sentence: an offline interactive page (--out) or a picture (--png)"))
    sub.add_parser("bench", help="CPU benchmark: tiled vs sdpa vs reference, results under ./benchmarks/results "
                   "by default; options: attnkit bench --help", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after "bench" belongs to the benchmark's own parser
        from ..bench.cpu import main as bench_main
        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(long_n=args.long_n)
    if args.command == "train":
        from .train import run_train
        return run_train(args, " ".join(["attnkit", *argv]))
    if args.command == "viz":
        from .viz import run_viz
        try:
            return run_viz(args)
        except (ValueError, ImportError) as e:  # bad options or a missing package: say so, no traceback
            print(f"attnkit viz: error: {e}", file=sys.stderr)
            return 2
    if args.command == "info":
        from .info import run_info
        return run_info()
    raise AssertionError(f"unhandled command {args.command}")  # argparse allows only the above


if __name__ == "__main__":
    sys.exit(main())
