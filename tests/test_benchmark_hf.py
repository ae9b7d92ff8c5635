"""benchmarks/hf_train_step.py at N=64, in this process: the cases build the models they say
(eager and attnkit compute the same eval loss; attnkit's calls are seen), a training step runs and
is measured, a child's result line parses, the skips fire where the (H, N, N) tensors would not
fit, and the markdown table holds every case. No timing is asserted."""

from __future__ import annotations

import json
import math

import pytest
from conftest import load_benchmark

pytest.importorskip("transformers")



@pytest.fixture(scope="module")
def hts():
    yield from load_benchmark("hf_train_step")


@pytest.mark.parametrize("model", ["llama", "longformer"])
def test_eager_and_attnkit_cases_train_the_same_model(hts, model, monkeypatch):
    monkeypatch.setattr(hts, "LONGFORMER_WINDOW", 32)  # transformers pads N to the window: keep N=64
    got = {impl: hts.measure(hts.Case(model, impl, 64, reps=1)) for impl in ("eager", "attnkit")}
    eager, ours = got["eager"], got["attnkit"]
    assert math.isfinite(eager["eval_loss"])
    assert ours["eval_loss"] == pytest.approx(eager["eval_loss"], abs=1e-5)  # same weights, same inputs
    assert eager["attnkit_backends"] == [] and ours["attnkit_backends"], "attnkit's calls must be seen"
    for r in got.values():
        assert len(r["times_s"]) == 1 and len(r["train_losses"]) == 2  # warm-up + one timed step
        assert all(math.isfinite(x) for x in r["train_losses"])
        assert r["extra_peak_mb"] >= 0 and r["peak_rss_mb"] >= r["baseline_rss_mb"]


def test_attnkit_longformer_is_swapped_and_llama_is_not_eager(hts):
    from attnkit.integrations.transformers.longformer import DropInLongformerSelfAttention
    swapped = hts.build_model(hts.Case("longformer", "attnkit", 64))
    assert any(isinstance(m, DropInLongformerSelfAttention) for m in swapped.modules())
    assert not any(isinstance(m, DropInLongformerSelfAttention)
                   for m in hts.build_model(hts.Case("longformer", "eager", 64)).modules())
    llama = hts.build_model(hts.Case("llama", "attnkit", 64))
    assert llama.config._attn_implementation == "attnkit" and llama.training
    assert llama.config.attention_dropout == hts.ATTENTION_DROPOUT > 0


def test_child_main_prints_one_result_line(hts, capsys):
    case = hts.Case("llama", "sdpa", 64, reps=1)
    assert hts.child_main(json.dumps(hts.asdict(case))) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(hts.RESULT_TAG)]
    assert len(lines) == 1
    result = json.loads(lines[0][len(hts.RESULT_TAG):])
    assert result["status"] == "ok" and len(result["times_s"]) == 1


def test_skips_where_the_probabilities_would_not_fit(hts):
    budget = 16.0
    case = lambda model, impl, n: hts.Case(model, impl, n)  # noqa: E731
    for impl in ("eager", "sdpa"):
        assert hts.skip_reason(case("llama", impl, 4096), budget) is None
        reason = hts.skip_reason(case("llama", impl, 16384), budget)
        assert reason and "over the 16 GB budget" in reason
        # the estimate holds the (H, N, N) fp32 probabilities of every layer at least
        assert hts.estimate_gb("llama", impl, 16384) > hts.LAYERS * hts.HEADS * 16384 ** 2 * 4 / 1e9
    for model in ("llama", "longformer"):
        assert hts.skip_reason(case(model, "attnkit", 32768), budget) is None
    assert hts.skip_reason(case("longformer", "eager", 32768), budget) is None
    assert "does not support" in hts.skip_reason(case("longformer", "sdpa", 4096), budget)


def test_rows_and_markdown(hts):
    def fake(case, timeout_s):
        t = {"eager": 4.0, "sdpa": 2.0, "attnkit": 1.0}[case.impl]
        return {"status": "ok", "times_s": [t, t, t], "warmup_s": t, "extra_peak_mb": 10 * t, "eval_loss": 7.0,
                "attnkit_backends": ["tiled"] if case.impl == "attnkit" else []}

    rows = [hts.run_case(hts.Case(m, i, 4096), 16.0, 60.0, runner=fake)
            for m in ("longformer", "llama") for i in hts.IMPLS]
    assert [r["status"] for r in rows] == ["ok", "n/a", "ok", "ok", "ok", "ok"]
    head = {"date": "d", "cpu_model": "c", "cpu_count": 2, "torch": "t", "torch_threads": 2, "transformers": "x",
            "attnkit": "a", "machine_note": "shared", "options": {"reps": 3}}
    md = hts.markdown(head, rows)
    table = [ln for ln in md.splitlines() if ln.startswith(("| longformer |", "| llama |"))]
    assert len(table) == 2
    assert "| n/a |" in table[0] and "4.00x" in table[0] and "4.00x" in table[1] and "2.00x" in table[1]
    assert "does not support" in md and "tiled" in table[1]
