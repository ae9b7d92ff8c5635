"""The one case table every backend runs: odd sizes, GQA/MQA, Nq != Nk, every mask kind and
combinations, biases, and rows that may attend to nothing. Masks are built per case because
padding and document masks depend on B and N."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import attnkit as ak


@dataclass(frozen=True)
class Case:
    name: str
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    Dv: int | None = None
    mask: Callable[["Case"], object] | None = None
    bias: Callable[["Case"], object] | None = None
    dead_rows: bool = False  # some query may attend to nothing
    tags: tuple[str, ...] = field(default=())

    def inputs(self, seed: int = 0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(self.B, self.Hq, self.Nq, self.D, generator=g, dtype=dtype)
        k = torch.randn(self.B, self.Hkv, self.Nk, self.D, generator=g, dtype=dtype)
        v = torch.randn(self.B, self.Hkv, self.Nk, self.Dv or self.D, generator=g, dtype=dtype)
        return q, k, v

    def make_mask(self):
        """The case's attnkit mask (tensors wrapped with ak.dense_mask), or None."""
        m = None if self.mask is None else self.mask(self)
        return ak.dense_mask(m) if isinstance(m, torch.Tensor) else m

    def make_bias(self):
        """The case's attnkit bias (tensors wrapped as DenseBias), or None."""
        b = None if self.bias is None else self.bias(self)
        return ak.DenseBias(b) if isinstance(b, torch.Tensor) else b


def _docs(c: Case):
    cuts = torch.tensor([0, c.Nk // 5, c.Nk // 2, c.Nk])
    ids = torch.bucketize(torch.arange(c.Nk), cuts[1:-1], right=True)
    return ak.document(torch.stack([ids, ids.flip(0).max() - ids.flip(0)])[: c.B])


def _random_dense(c: Case):
    g = torch.Generator().manual_seed(7)
    m = torch.rand(c.B, 1, c.Nq, c.Nk, generator=g) < 0.3
    m[:, :, 1] = False  # one row with nothing
    return m


def _float_bias(c: Case):
    g = torch.Generator().manual_seed(11)
    return torch.randn(c.B, c.Hq, c.Nq, c.Nk, generator=g, dtype=torch.float64)


def _per_sample_global(c: Case):
    flags = torch.zeros(c.B, c.Nk, dtype=torch.bool)
    flags[0, [1, 30, 69]] = True  # three global tokens in sample 0, one in sample 1
    flags[-1, 50] = True
    return ak.sliding_window(5) | ak.global_tokens(flags)


CASES = [
    Case("dense-tiny", 1, 1, 1, 1, 1, 16),
    Case("dense-odd", 2, 2, 2, 17, 17, 16),
    Case("dense-113-d64", 1, 3, 3, 113, 113, 64),
    Case("dense-dv", 1, 2, 2, 33, 57, 32, Dv=16),
    Case("gqa-dense", 2, 4, 2, 65, 65, 32),
    Case("mqa-causal", 1, 4, 1, 70, 70, 16, mask=lambda c: ak.causal()),
    Case("causal-257", 1, 2, 2, 257, 257, 32, mask=lambda c: ak.causal(), tags=("big",)),
    Case("causal-decode", 2, 2, 2, 1, 257, 64, mask=lambda c: ak.causal()),
    Case("causal-nq<nk", 1, 2, 2, 17, 113, 16, mask=lambda c: ak.causal()),
    Case("causal-nq>nk", 1, 2, 2, 113, 17, 16, mask=lambda c: ak.causal(), dead_rows=True),
    Case("window", 1, 2, 2, 257, 257, 16, mask=lambda c: ak.sliding_window(8), tags=("big",)),
    Case("window-asym", 1, 2, 2, 113, 113, 32, mask=lambda c: ak.sliding_window(3, 11)),
    Case("causal-window-gqa", 2, 4, 2, 113, 113, 16, mask=lambda c: ak.causal() & ak.sliding_window(16)),
    Case("window-global", 1, 2, 2, 257, 257, 16,
         mask=lambda c: ak.sliding_window(4) | ak.global_tokens([0, 50, 200]), tags=("big",)),
    Case("padding-causal", 2, 2, 2, 113, 113, 16, mask=lambda c: ak.key_padding([113, 40]) & ak.causal()),
    Case("padding-empty", 2, 2, 2, 17, 17, 16, mask=lambda c: ak.key_padding([17, 0]), dead_rows=True),
    Case("padding-bool", 2, 2, 2, 33, 33, 16,
         mask=lambda c: ak.key_padding(torch.arange(33)[None, :] % torch.tensor([[3], [5]]) != 0)),
    Case("documents", 2, 2, 2, 113, 113, 16, mask=_docs),
    Case("documents-causal", 2, 2, 1, 113, 113, 32, mask=lambda c: _docs(c) & ak.causal()),
    Case("anti-causal", 1, 2, 2, 33, 33, 16, mask=lambda c: ~ak.causal(), dead_rows=True),
    Case("dense-bool", 2, 2, 2, 37, 41, 16, mask=_random_dense, dead_rows=True),
    Case("float-bias", 2, 2, 2, 37, 41, 16, bias=_float_bias),
    Case("alibi-causal", 1, 4, 4, 113, 113, 16, mask=lambda c: ak.causal(), bias=lambda c: ak.alibi(4)),
    Case("alibi-window-gqa", 1, 4, 2, 113, 113, 16, mask=lambda c: ak.sliding_window(7), bias=lambda c: ak.alibi(4)),
    Case("longformer-mix", 2, 2, 2, 129, 129, 16,
         mask=lambda c: (ak.sliding_window(5) | ak.global_tokens([3, 64])) & ak.key_padding([129, 100])),
    Case("window-global-doc", 1, 2, 2, 113, 113, 16,
         mask=lambda c: (ak.sliding_window(9) | ak.global_tokens([100])) & _docs(c)),
    Case("d128", 1, 2, 2, 33, 33, 128, mask=lambda c: ak.causal()),
    # the Longformer family (impl="banded" runs all of these and the window cases above)
    Case("lf-odd-n-gqa", 2, 4, 2, 301, 301, 32,
         mask=lambda c: (ak.sliding_window(17) | ak.global_tokens([0, 150, 300])) & ak.key_padding([301, 201]),
         tags=("big",)),
    Case("lf-window>n", 1, 2, 2, 45, 45, 16, mask=lambda c: ak.sliding_window(100, 60) | ak.global_tokens([7])),
    Case("lf-global-in-padding", 2, 2, 2, 97, 97, 16,
         mask=lambda c: (ak.sliding_window(6) | ak.global_tokens([2, 90])) & ak.key_padding([97, 60])),
    Case("lf-per-sample-global", 2, 2, 2, 70, 70, 16, mask=_per_sample_global),
    Case("lf-causal-window-global", 1, 2, 1, 113, 113, 16,
         mask=lambda c: (ak.causal() & ak.sliding_window(12)) | ak.global_tokens([40])),
    Case("lf-dilated", 2, 4, 2, 130, 130, 16,
         mask=lambda c: (ak.sliding_window(3, dilation=(1, 2, 3, 4)) | ak.global_tokens([10]))
         & ak.key_padding([130, 77])),
    Case("lf-dilated-causal", 1, 4, 1, 90, 90, 16, mask=lambda c: ak.causal() & ak.sliding_window(5, dilation=2)),
    Case("lf-nq<nk", 1, 2, 2, 40, 130, 16, mask=lambda c: ak.sliding_window(10, 3) | ak.global_tokens([0, 129])),
    Case("lf-nq>nk", 1, 2, 2, 80, 50, 16, mask=lambda c: ak.sliding_window(6), dead_rows=True),
    Case("lf-all-padding", 2, 2, 2, 33, 33, 16,
         mask=lambda c: (ak.sliding_window(4) | ak.global_tokens([5])) & ak.key_padding([0, 33]), dead_rows=True),
]

LONGFORMER = ["window", "window-asym", "causal-window-gqa", "window-global", "longformer-mix"] + [
    c.name for c in CASES if c.name.startswith("lf-")]

BY_NAME = {c.name: c for c in CASES}
