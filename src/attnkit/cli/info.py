"""``attnkit info``: versions, devices, and what each backend can run."""

from __future__ import annotations

import platform

import torch

import attnkit as ak


def _probe_calls() -> dict[str, dict]:
    """Representative calls whose explanation shows each backend's reach."""
    q = torch.randn(1, 4, 8192, 32)  # long enough that auto stops materializing structured masks
    kv = torch.randn(1, 2, 8192, 32)
    return {
        "dense, GQA 4/2": dict(q=q, k=kv, v=kv),
        "causal & sliding_window(16) | global_tokens([0])":
            dict(q=q, k=kv, v=kv, mask=ak.causal() & ak.sliding_window(16) | ak.global_tokens([0])),
        "causal + ALiBi, return_lse": dict(q=q, k=kv, v=kv, mask=ak.causal(), bias=ak.alibi(4), return_lse=True),
        "dropout 0.1 + document mask": dict(q=q, k=kv, v=kv, mask=ak.document(torch.arange(8192) // 2000),
                                            dropout_p=0.1),
    }


def run_info() -> int:
    print(f"attnkit {ak.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    cuda = torch.cuda.is_available()
    print(f"devices: cpu ({torch.get_num_threads()} threads)"
          + (f", cuda: {torch.cuda.get_device_name(0)}" if cuda else ", no CUDA device"))
    print("\nbackends:")
    for name, summary in ak.backends().items():
        print(f"  {name:<10} {summary}")
    for title, call in _probe_calls().items():
        print(f"\n== {title}")
        print(ak.explain(**call))
    return 0
