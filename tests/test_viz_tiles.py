"""The on-demand maps score only the keys a mask may allow (``attnkit.viz.tiles``), and that changes
nothing: weights, pooled maps and the page's per-head summaries equal the dense computation (every
key scored) for windows, causal, window | global tokens and padding; and the work is linear in N
for a window, counted (key columns scored per block of rows), not timed.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import attnkit as ak
from attnkit.viz import AttentionRecord
from attnkit.viz.capture import ROW_BLOCK
from attnkit.viz.page import summarize_head
from attnkit.viz.tiles import TILE

B, H, HKV, D = 2, 4, 2, 16
capture_module = importlib.import_module("attnkit.viz.capture")  # attnkit.viz.capture is also the function


def masks(N: int) -> dict:
    return {
        "window": ak.sliding_window(40),
        "causal-window": ak.causal() & ak.sliding_window(70, 0),
        "causal": ak.causal(),
        "window|global": ak.sliding_window(20) | ak.global_tokens([3, N // 2]),
        "padding": ak.key_padding(torch.tensor([N - 150, N])) & ak.sliding_window(30),
        "padding-only": ak.key_padding(torch.tensor([N // 3, N - 7])),
        "dense-tensor": ak.sliding_window(25).materialize(N, N),  # a bool tensor: its tiles from the values
    }


def record(N: int, mask, seed: int = 0, dtype=torch.float64) -> AttentionRecord:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=dtype) * 2
    k = torch.randn(B, HKV, N, D, generator=g, dtype=dtype) * 2
    return AttentionRecord("x", q, k, mask, None, None)


def dense(rec: AttentionRecord) -> torch.Tensor:
    """The oracle: every key scored, (B, H, N, N)."""
    return ak.attention_weights(rec.q, rec.k.repeat_interleave(H // HKV, 1), mask=rec.mask)


class EveryKey:
    """The same map with nothing skipped: ``scored`` scores all N keys (what the page did before)."""

    def __init__(self, rec: AttentionRecord):
        self.rec, self.name, self.shape = rec, rec.name, rec.shape
        self.map = dense(rec)

    def scored(self, *, rows=None, heads=None, batch=None, min_cols=0):
        w = self.map[torch.as_tensor(batch)][:, torch.as_tensor(heads)][:, :, torch.as_tensor(rows)]
        return None, w


N_CASES = 700  # 3 row blocks (the last one ragged), 11 tiles per side


@pytest.mark.parametrize("name", list(masks(N_CASES)))
def test_weights_and_pooled_equal_the_dense_map(name):
    rec = record(N_CASES, masks(N_CASES)[name])
    want = dense(rec)  # (B, H, N, N) float64
    assert (rec.weights() - want).abs().max() < 1e-12
    rows = [0, 63, 64, 300, 699]
    assert (rec.weights(rows=rows, heads=[3, 0], batch=[1]) - want[1:, [3, 0]][:, :, rows]).abs().max() < 1e-12
    for block in (7, 64, 300):
        nb = -(-N_CASES // block)
        counts = torch.bincount(torch.arange(N_CASES) // block, minlength=nb).double()
        pooled = torch.nn.functional.avg_pool2d(want, block, ceil_mode=True, divisor_override=1)
        pooled = pooled / (counts[:, None] * counts[None, :])
        assert (rec.pooled(block) - pooled).abs().max() < 1e-12, block


@pytest.mark.parametrize("name", list(masks(N_CASES)))
def test_page_summaries_equal_the_dense_ones(name):
    rec = record(N_CASES, masks(N_CASES)[name], seed=1)
    special = torch.zeros(N_CASES, dtype=torch.bool)
    special[[0, 5, 350]] = True
    valid = torch.rand(N_CASES, generator=torch.Generator().manual_seed(2)) > 0.1
    for head, batch, top_k in ((1, 0, 8), (2, 1, 200)):  # 200: more keys than some rows may see
        kw = dict(batch=batch, top_k=top_k, block=6, special=special, valid=valid)
        fast, stats = summarize_head(rec, head, **kw)
        slow, want_stats = summarize_head(EveryKey(rec), head, **kw)
        assert torch.allclose(torch.tensor(stats), torch.tensor(want_stats), rtol=1e-12, atol=1e-12)
        assert (fast.pooled - slow.pooled).abs().max() < 1e-12
        assert (fast.top_w - slow.top_w).abs().max() < 1e-12
        w = dense(rec)[batch, head]  # (N, N)
        assert (w.gather(1, fast.top_idx) - fast.top_w).abs().max() < 1e-12  # the links name their keys
        assert all(len(set(r)) == len(r) for r in fast.top_idx.tolist())  # each key once per row


def test_a_few_keys_made_up_to_min_cols_with_masked_ones():
    rec = record(300, ak.sliding_window(2))
    cols, w = rec.scored(rows=[5, 6], heads=[0], batch=[1], min_cols=200)
    assert len(cols) == 200 and len(set(cols.tolist())) == 200  # 64 keys of one tile, then masked ones
    full = torch.zeros(1, 1, 2, 300, dtype=w.dtype)
    full[..., cols] = w
    assert (full - dense(rec)[1:, :1, 5:7]).abs().max() < 1e-12


class Counter:
    """Counts what the records score: ``attention_weights`` calls' (rows, key columns)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, int]] = []
        real = capture_module.attention_weights

        def counted(q, k, **kw):
            self.calls.append((q.shape[2], k.shape[2]))
            return real(q, k, **kw)
        monkeypatch.setattr(capture_module, "attention_weights", counted)

    def pairs(self) -> int:
        return sum(r * c for r, c in self.calls)


@pytest.mark.parametrize("w", [32, 100])
def test_a_windowed_page_scores_keys_linear_in_n(monkeypatch, w):
    counter = Counter(monkeypatch)
    pairs = {}
    for N in (1024, 2048, 4096):
        rec = record(N, ak.sliding_window(w), dtype=torch.float32)
        counter.calls.clear()
        summarize_head(rec, 0, batch=0, top_k=8, block=-(-N // 128), special=None)
        assert len(counter.calls) == -(-N // ROW_BLOCK)  # one scoring per block of rows
        widest = ROW_BLOCK + 2 * TILE * math.ceil(w / TILE)  # a block's rows, its window each side, in whole tiles
        assert max(c for _, c in counter.calls) <= widest, counter.calls
        pairs[N] = counter.pairs()
        assert pairs[N] <= N * widest
    assert pairs[4096] <= 4.5 * pairs[1024]  # 4x the tokens, ~4x the work (every key scored: 16x)
    counter.calls.clear()
    record(1024, ak.sliding_window(w), dtype=torch.float32).pooled(64)
    assert counter.pairs() <= 1024 * widest * H  # the pooled map of every head: the same bound


def test_nothing_is_skipped_without_a_mask(monkeypatch):
    counter = Counter(monkeypatch)
    rec = record(300, None)
    assert (rec.weights() - dense(rec)).abs().max() < 1e-12
    assert counter.calls == [(300, 300)]
