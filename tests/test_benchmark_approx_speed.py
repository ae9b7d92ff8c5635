"""benchmarks/approx_speed.py, its pure parts at small N, in this process: the FLOP counts equal
torch's FlopCounterMode on the real calls and the docstring's formulas; the exact contenders' pairs
equal their materialized masks; bytes, memory prediction, skips, the timing budget and the crossover
summary against hand-worked cases; a measured row carries its error against float64 exact
attention. No timing is asserted."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnkit as ak
from conftest import load_benchmark

APPROX = ("linear", "linear_causal", "performer", "performer_causal", "linformer", "nystrom")


@pytest.fixture(scope="module")
def aps():
    yield from load_benchmark("approx_speed")


# -- FLOPs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [100, 300])  # one partial chunk; two full chunks and a partial one (C=128)
@pytest.mark.parametrize("name", APPROX)
def test_flops_equal_torch_flop_counter_on_the_real_call(aps, name, n):
    for mode in aps.MODES:
        q, k, v, dout = aps.make_inputs(n, mode)
        step = aps.make_step(aps.make_call(name, n), q, k, v, dout, mode)
        with FlopCounterMode(display=False) as counter:
            step()
        assert aps.flops(name, mode, n) == counter.get_total_flops(), (name, mode, n)


def test_flops_follow_the_docstring_formulas(aps):
    B, H, D, F, Kp, m, C = 1, 8, 64, 256, 256, 64, 128
    n = 4 * C  # a multiple of C: the causal forms add exactly 2*B*H*N*C*(F + Dv)
    linear = 4 * B * H * n * D * D + 2 * B * H * n * D  # F = D for elu + 1
    performer = 4 * B * H * n * F * D + 2 * B * H * n * F + 4 * B * H * n * D * F
    want = {"linear": linear, "linear_causal": linear + 2 * B * H * n * C * (D + D),
            "performer": performer, "performer_causal": performer + 2 * B * H * n * C * (F + D),
            "linformer": 8 * B * H * n * Kp * D,
            "nystrom": 8 * B * H * n * m * D + 4 * B * H * n * m * D + 48 * B * H * m ** 3 + 2 * B * H * m * m * 2 * D}
    for name, fwd in want.items():
        assert aps.flops(name, "fwd", n) == fwd, name


def test_exact_flops_count_the_pairs_the_mask_allows(aps):
    for n in (100, 300, 700):  # Longformer: window 256 each side, the first 16 tokens global
        dense = ak.sliding_window(256) | ak.global_tokens(list(range(16)))
        assert aps.allowed_pairs("banded_longformer", n) == int(dense.materialize(n, n).sum())
        assert aps.allowed_pairs("sdpa_causal", n) == int(ak.causal().materialize(n, n).sum())
        assert aps.allowed_pairs("tiled_causal", n) == int(torch.ones(n, n).tril().sum())
        assert aps.flops("sdpa", "fwd", n) == 4 * 8 * 64 * n * n
        assert aps.flops("sdpa", "fwd+bwd", n) == 3.5 * 4 * 8 * 64 * n * n
    with pytest.raises(ValueError, match="approximations"):
        aps.flop_terms("sdpa", 64)


def test_traffic_bytes_by_hand(aps):
    n, bh = 1000, 8
    qkv, out = bh * n * 192, bh * n * 64
    assert aps.traffic_bytes("sdpa", "fwd", n) == 4 * (qkv + out + bh * n)  # lse only: flash kernel
    assert aps.traffic_bytes("sdpa", "fwd", n, sdpa_math=True) == 4 * (qkv + out + bh * n * n)
    scores, ef = bh * n * 256, 2 * 256 * n
    fwd = qkv + ef + out + scores
    assert aps.traffic_bytes("linformer", "fwd", n) == 4 * fwd
    assert aps.traffic_bytes("linformer", "fwd+bwd", n) == 4 * (fwd + (qkv + ef) + 2 * out + qkv + scores)
    assert aps.largest_intermediate("performer", n) == ("features phi(Q), phi(K) (B, H, N, F)", 2 * bh * n * 256)
    assert aps.largest_intermediate("linear_causal", n)[1] == 2 * bh * n * 64  # 2 F = C = 128: the features


# -- skips, timing budget ---------------------------------------------------------------------

def _row(aps, name, mode, n, seconds, extra_mb=100.0, status="ok"):
    case = aps.Case(name, mode, n)
    result = {"status": status, "warmup_s": seconds, "times_s": [seconds] * 3, "extra_peak_mb": extra_mb,
              "rel_err": 0.5} if status == "ok" else {"status": status, "reason": "test"}
    return aps.make_row(case, result)


def test_skips_predict_time_and_memory_from_the_previous_n(aps):
    prev = _row(aps, "sdpa", "fwd", 1024, 10.0)
    case = aps.Case("sdpa", "fwd", 4096)  # 16x the FLOPs: 160 s predicted
    reason = aps.skip_reason(case, prev, mem_budget_gb=16, timeout_s=100)
    assert reason and "predicted 160 s" in reason
    assert aps.skip_reason(case, prev, mem_budget_gb=16, timeout_s=200) is None
    assert "ended 'timeout'" in aps.skip_reason(case, _row(aps, "sdpa", "fwd", 1024, 0, status="timeout"), 16, 200)
    # memory: Linformer grows linearly in N, so 1000 MB at 1024 predicts 4000 MB (3.9 GiB) at 4096
    prev = _row(aps, "linformer", "fwd", 1024, 0.1, extra_mb=1000.0)
    gb, how = aps.predicted_gb(aps.Case("linformer", "fwd", 4096), prev)
    assert gb == pytest.approx(4000 * 2 ** 20 / 1e9) and "N=1024" in how
    assert "over the 3 GB budget" in aps.skip_reason(aps.Case("linformer", "fwd", 4096), prev, 3, 1e9)
    assert aps.skip_reason(aps.Case("linformer", "fwd", 4096), prev, 5, 1e9) is None
    assert "budget" in aps.skip_reason(aps.Case("linformer", "fwd", 4096), None, 1e-6, 1e9)  # formula alone


def test_timed_calls_keep_to_the_budget(aps, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(aps.time, "perf_counter", lambda: clock[0])

    def step(seconds):
        def run():
            clock[0] += seconds
            return torch.zeros(1)
        return run

    assert len(aps.timed_calls(step(10.0), 3, 25.0, keep=lambda o: o)[1]) == 2  # 2 x 10 s fit 25 s
    assert len(aps.timed_calls(step(1.0), 3, 25.0, keep=lambda o: o)[1]) == 3  # reps cap
    warm, times, _ = aps.timed_calls(step(30.0), 3, 25.0, keep=lambda o: o)
    assert warm == 30.0 and times == []  # the warm-up alone is over the budget: it is the time
    row = aps.make_row(aps.Case("sdpa", "fwd", 64), {"status": "ok", "warmup_s": 30.0, "times_s": []})
    assert row["seconds"] == 30.0 and row["gflops"] == pytest.approx(row["flops"] / 30.0 / 1e9)


# -- crossovers ---------------------------------------------------------------------------------

def test_crossover_by_hand(aps):
    ns = (1024, 4096, 16384)
    rows = [_row(aps, "sdpa", "fwd", n, t) for n, t in zip(ns, (1.0, 10.0, 100.0))]
    rows += [_row(aps, "linear", "fwd", n, t) for n, t in zip(ns, (4.0, 8.0, 16.0))]  # ratios 4, 0.8, 0.16
    rows += [_row(aps, "nystrom", "fwd", n, t) for n, t in zip(ns, (0.5, 20.0, 50.0))]  # faster, slower, faster
    rows += [_row(aps, "performer", "fwd", n, t) for n, t in zip(ns, (2.0, 20.0, 200.0))]  # never faster
    got = {(c["approx"], c["baseline"]): c for c in aps.crossovers(rows)}
    lin = got[("linear", "exact")]
    assert lin["faster_from"] == 4096 and lin["ratio_at_max"] == pytest.approx(0.16)
    # the ratio falls from 4 to 0.8 over a factor 4 in N: it reaches 1 at N = 1024 * 4^(ln 4 / ln 5)
    assert lin["interpolated"] == pytest.approx(1024 * 4 ** (math.log(4) / math.log(5)))
    assert got[("nystrom", "exact")]["faster_from"] == 16384  # faster at 1024 does not count
    assert got[("performer", "exact")]["faster_from"] is None
    assert got[("linear", "longformer")]["common_ns"] == []  # no banded rows measured
    assert "not faster up to N=16384" in aps.markdown(_head(aps), rows)


def test_causal_crossover_takes_the_fastest_exact_and_skips_missing_ns(aps):
    rows = [_row(aps, "sdpa_causal", "fwd+bwd", 1024, 1.0), _row(aps, "tiled_causal", "fwd+bwd", 1024, 2.0),
            _row(aps, "sdpa_causal", "fwd+bwd", 4096, 9.0), _row(aps, "tiled_causal", "fwd+bwd", 4096, 5.0),
            _row(aps, "sdpa_causal", "fwd+bwd", 16384, 0.0, status="timeout"),
            _row(aps, "linear_causal", "fwd+bwd", 1024, 0.5), _row(aps, "linear_causal", "fwd+bwd", 4096, 6.0),
            _row(aps, "linear_causal", "fwd+bwd", 16384, 8.0)]
    (c,) = aps.crossovers(rows)  # causal: no Longformer baseline
    assert c["common_ns"] == [1024, 4096] and c["fastest_exact"] == {1024: "sdpa_causal", 4096: "tiled_causal"}
    assert c["faster_from"] is None and c["ratio_at_max"] == pytest.approx(6.0 / 5.0)
    assert c["rel_err_at_max"] == 0.5


def _head(aps):
    head = {"date": "d", "cpu_model": "cpu", "cpu_count": 2, "torch_version": "t", "torch_num_threads": 1,
            "attnkit_version": "a", "sdpa_kernels": {"sdpa fwd": []},
            "settings": {**aps.asdict(aps.DIMS), "B": 1, "H": 8, "D": 64}}
    return head


# -- a measured row ----------------------------------------------------------------------------

def test_measured_rows_carry_their_error_against_exact_attention(aps):
    exact = aps.measure(aps.Case("sdpa_causal", "fwd+bwd", 256, reps=1))
    assert exact["rel_err"] < 1e-5 and exact["check_err"] == exact["rel_err"]
    assert len(exact["times_s"]) == 1 and exact["extra_peak_mb"] >= 0
    banded = aps.measure(aps.Case("banded_longformer", "fwd", 600, reps=1))  # the window misses keys here
    assert banded["check_err"] < 1e-5 < 1e-2 < banded["rel_err"]
    approx = aps.measure(aps.Case("nystrom", "fwd", 256, reps=1))
    assert 1e-3 < approx["rel_err"] and "check_err" not in approx
    row = aps.make_row(aps.Case("nystrom", "fwd", 256, reps=1), {"status": "ok", **approx})
    assert row["seconds"] == statistics.median(approx["times_s"])
    assert row["flops"] == aps.flops("nystrom", "fwd", 256) and row["kind"] == "approx"
    md = aps.markdown(_head(aps), [row])
    assert "| 256 | nystrom |" in md and "math path" in md


def test_rel_l2_and_rows_by_hand(aps):
    ref = torch.tensor([[3.0, 4.0]])
    assert aps.rel_l2(torch.tensor([[3.0, 4.0 + 5.0]]), ref) == pytest.approx(1.0)
    rows = aps.sample_rows(1000)
    assert {0, 1, 500, 998, 999} <= set(rows.tolist()) and len(rows) == aps.SAMPLED_ROWS
    assert rows.tolist() == sorted(set(rows.tolist()))


def test_cli_refuses_unknown_names(aps):
    with pytest.raises(SystemExit):
        aps.parse_args(["--contenders", "sdpa,flash"])
    assert aps.parse_args(["--ns", "256,512", "--reps", "1"]).ns == (256, 512)
