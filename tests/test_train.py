"""``attnkit train``: the tasks' answers, the mean-mixing baseline, a short run that learns, the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tqdm import tqdm

import attnkit as ak
from attnkit.cli.main import main
from attnkit.cli.train import (MeanMixing, ModelConfig, TrainConfig, build_model, evaluate, make_task,
                               summary_table, train)


def _brute_lookup(row: list[int], num_symbols: int) -> int:
    *symbols, query = row
    index = query - num_symbols
    assert all(0 <= s < num_symbols for s in symbols) and 0 <= index < len(symbols)
    return symbols[index]


def _brute_recall(row: list[int], num_symbols: int) -> int:
    *pairs, query = row
    keys, values = pairs[0::2], pairs[1::2]
    assert len(set(keys)) == len(keys) and all(k >= num_symbols for k in keys)
    assert all(0 <= v < num_symbols for v in values)
    hits = [v for k, v in zip(keys, values) if k == query]
    assert len(hits) == 1  # the query is one of the keys, exactly once
    return hits[0]


@pytest.mark.parametrize("name, length, brute", [("lookup", 7, _brute_lookup), ("lookup", 32, _brute_lookup),
                                                 ("recall", 5, _brute_recall), ("recall", 12, _brute_recall)])
def test_task_answers_match_brute_force(name, length, brute):
    task = make_task(name, length, num_symbols=16)
    ids, answers = task.sample(300, torch.Generator().manual_seed(3))
    assert ids.shape == (300, task.seq_len) and int(ids.max()) < task.vocab_size and int(ids.min()) >= 0
    assert [brute(row, 16) for row in ids.tolist()] == answers.tolist()
    assert len(set(answers.tolist())) > 8  # the answers vary, not a constant
    if name == "lookup":  # every queried position occurs
        assert set((ids[:, -1] - 16).tolist()) == set(range(length))


def test_make_task_rejects_impossible_configs():
    with pytest.raises(ValueError, match="distinct keys"):
        make_task("recall", length=20, num_symbols=16)
    with pytest.raises(ValueError, match="lookup' or 'recall"):
        make_task("sort")


def _running_mean_by_hand(layer: MeanMixing, x: torch.Tensor) -> torch.Tensor:
    v = x @ layer.v_proj.weight.T + layer.v_proj.bias  # (B, N, E)
    rows = [sum(v[:, s] for s in range(t + 1)) / (t + 1) for t in range(x.shape[1])]
    return torch.stack(rows, dim=1) @ layer.out_proj.weight.T + layer.out_proj.bias


def test_mean_mixing_is_a_causal_running_mean():
    torch.manual_seed(0)
    layer = MeanMixing(8)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    layer = layer.double()
    out = layer(x, mask=ak.causal())
    torch.testing.assert_close(out, _running_mean_by_hand(layer, x), rtol=1e-12, atol=1e-12)
    later = x.clone()
    later[:, 5:] = torch.randn(2, 4, 8, dtype=torch.float64)  # change the future
    changed = layer(later)
    torch.testing.assert_close(changed[:, :5], out[:, :5], rtol=0, atol=0)
    assert (changed[:, 5:] - out[:, 5:]).abs().min() > 0  # ... and the present does see its own token


def test_mean_mixing_refuses_what_it_cannot_do():
    layer = MeanMixing(8)
    with pytest.raises(ValueError, match="causally"):
        layer(torch.randn(1, 4, 8), mask=ak.sliding_window(2))
    with pytest.raises(ValueError, match="memory=None"):
        layer(torch.randn(1, 4, 8), torch.randn(1, 3, 8))


@pytest.mark.parametrize("variant", ["full", "nopos", "mean"])
def test_variants_build_with_the_right_parts(variant):
    task = make_task("lookup", 8)
    model = build_model(task, variant, ModelConfig(embed_dim=16, num_heads=2, num_layers=1))
    mixers = [type(b.attn).__name__ for b in model.blocks]
    assert mixers == ["MeanMixing" if variant == "mean" else "MultiHeadAttention"]
    assert (model.embeddings.positional is None) == (variant == "nopos")
    logits = model(task.sample(3, torch.Generator().manual_seed(0))[0])
    assert logits.shape == (3, task.seq_len, task.vocab_size)


def test_short_training_run_lowers_the_loss():
    task = make_task("lookup", 6, num_symbols=4)
    torch.manual_seed(0)
    model = build_model(task, "full", ModelConfig(embed_dim=16, num_heads=2, num_layers=1))
    held = task.sample(512, torch.Generator().manual_seed(1))
    before, _ = evaluate(model, *held)
    cfg = TrainConfig(steps=60, time_budget=60.0, eval_every=20, eval_size=256, lr=1e-2, warmup=5)
    record = train(model, task, cfg, seed=0, progress=lambda label, total: tqdm(total=total, disable=True))
    after, _ = evaluate(model, *held)
    assert record["steps"] == 60 and [h["step"] for h in record["history"]] == [0, 20, 40, 60]
    assert after < before - 0.1, (before, after)


def test_cli_runs_all_variants_and_writes_json(tmp_path, capsys):
    out = tmp_path / "train.json"
    argv = ["train", "--variant", "all", "--length", "6", "--num-symbols", "4", "--embed-dim", "16",
            "--layers", "1", "--steps", "6", "--eval-every", "3", "--seed", "0", "1", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert re.search(r"full  seed 1: 100%.*6/6 .*loss [0-9.]+ acc", captured.err)  # the progress, on stderr
    doc = json.loads(out.read_text())
    runs = doc["runs"]
    assert [(r["variant"], r["seed"]) for r in runs] == [(v, s) for s in (0, 1) for v in ("full", "nopos", "mean")]
    for r in runs:
        assert r["steps"] == 6 and [h["step"] for h in r["history"]] == [0, 3, 6]
        assert set(r["history"][0]) >= {"step", "seconds", "loss", "accuracy"}
        assert 0.0 <= r["final_accuracy"] <= 1.0
    assert doc["environment"]["torch"] == torch.__version__ and doc["command"].startswith("attnkit train")
    assert summary_table(runs) in captured.out


def test_cli_rejects_bad_budgets():
    with pytest.raises(SystemExit):
        main(["train", "--steps", "0"])
