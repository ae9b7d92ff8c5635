"""benchmarks/approx_train.py on tiny tasks, in this process: each variant builds the model it names
(Linformer with identity projections and the window with W >= N give exact attention's logits, the
logits are the head on the last position), variant specs parse or are refused, and a run of every
variant on two tiny tasks writes JSON / markdown / PNG with a record per run. No timing is asserted."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.approx.linear import LinearAttention
from attnkit.approx.linformer import LinformerAttention
from attnkit.approx.nystrom import NystromAttention
from attnkit.approx.performer import PerformerAttention
from attnkit.cli.train import ModelConfig, TrainConfig, make_task
from conftest import load_benchmark



@pytest.fixture(scope="module")
def at():
    yield from load_benchmark("approx_train")


def tiny_setups(at) -> dict:
    train = TrainConfig(batch_size=8, eval_every=5, eval_size=64, final_eval_size=64)
    model = ModelConfig(embed_dim=16, num_heads=2)
    return {"lookup": at.Setup("lookup", make_task("lookup", 8, 4), model, train, 0.3, 2),
            "recall": at.Setup("recall", make_task("recall", 4, 8), ModelConfig(16, 2, positional="sinusoidal"),
                               train, 0.3, 2)}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_window_variant_masks_the_longformer_pattern(at):
    setup = tiny_setups(at)["lookup"]
    N, W = setup.task.seq_len, setup.window
    got = at.encoder_mask(at.parse_variant("window"), setup).materialize(N, N)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    expected = ((i - j).abs() <= W) | (i == N - 1) | (j == N - 1)  # local band, query token global both ways
    assert torch.equal(got.reshape(N, N), expected)
    assert at.encoder_mask(at.parse_variant("exact"), setup) is None  # bidirectional, every token sees all


@pytest.mark.parametrize("name", ["lookup", "recall"])
def test_linformer_with_identity_projections_and_wide_window_equal_exact(at, name):
    """Linformer with E = F = I (Kp = N) and the window with W >= N compute exact attention, so with
    exact's weights the three models give the same logits: same family, same wiring, no causal mask."""
    setup = tiny_setups(at)[name]
    N = setup.task.seq_len
    torch.manual_seed(0)
    exact = at.build_classifier(setup, at.parse_variant("exact"))
    linformer = at.build_classifier(setup, at.parse_variant(f"linformer:{N}"))
    window = at.build_classifier(setup, at.parse_variant(f"window:{N}"))
    state = exact.state_dict()
    for block in linformer.encoder.blocks:
        proj = block.attn.core.projection
        with torch.no_grad():
            proj.E.copy_(torch.eye(N))
            proj.F.copy_(torch.eye(N))
    assert not linformer.load_state_dict(state, strict=False).unexpected_keys
    window.load_state_dict(state)
    ids, _ = setup.task.sample(5, torch.Generator().manual_seed(1))
    ref = _logits(exact, ids)
    torch.testing.assert_close(_logits(linformer, ids), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_logits(window, ids), ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_logits(at.build_classifier(setup, at.parse_variant("linear")), ids), ref)


def test_logits_are_the_head_on_the_last_position(at):
    setup = tiny_setups(at)["recall"]
    torch.manual_seed(0)
    model = at.build_classifier(setup, at.parse_variant("nystrom:3"))
    ids, _ = setup.task.sample(4, torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model.head(model.encoder(ids))  # (B, N, V), every position
    got = _logits(model, ids)
    assert got.shape == (4, 1, setup.task.vocab_size)
    torch.testing.assert_close(got[:, 0], full[:, -1])
    assert not torch.allclose(got[:, 0], full[:, -2])


def test_each_variant_plugs_its_core_into_every_layer(at):
    setup = tiny_setups(at)["lookup"]
    expected = {"exact": (type(None), {}), "linear": (LinearAttention, {}),
                "performer": (PerformerAttention, {"num_features": at.DEFAULTS["performer"], "redraw_interval": 1000}),
                "performer:64": (PerformerAttention, {"num_features": 64}),
                "linformer": (LinformerAttention, {}), "nystrom:5": (NystromAttention, {"num_landmarks": 5})}
    for spec, (kind, attrs) in expected.items():
        model = at.build_classifier(setup, at.parse_variant(spec))
        assert len(model.encoder.blocks) == setup.model.num_layers
        for block in model.encoder.blocks:
            assert type(block.attn.core) is kind, spec
            for attr, value in attrs.items():
                assert getattr(block.attn.core, attr) == value, (spec, attr)
    lin = at.build_classifier(setup, at.parse_variant("linformer")).encoder.blocks[0].attn.core.projection
    assert (lin.proj_len, lin.max_len) == (at.DEFAULTS["linformer"], setup.task.seq_len)


@pytest.mark.parametrize("spec, words", [("flash", "unknown variant"), ("linear:4", "takes no size"),
                                         ("performer:0", "int >= 1"), ("nystrom:x", "int >= 1")])
def test_bad_variant_specs_are_refused(at, spec, words):
    with pytest.raises(ValueError, match=words):
        at.parse_variant(spec)


@pytest.mark.parametrize("kw", [{}, {"length": 30, "num_pairs": 3, "num_keys": 5, "num_symbols": 6, "num_filler": 4}])
def test_pair_recall_answers_the_value_of_the_queried_key(at, kw):
    """Decode every row by hand: P pair tokens with distinct keys, fillers elsewhere, and the answer is
    the value of the one pair whose key the query token names."""
    task = at.PairRecall(**kw)
    K, S, F, P = task.num_keys, task.num_symbols, task.num_filler, task.num_pairs
    ids, answers = task.sample(64, torch.Generator().manual_seed(3))
    assert ids.shape == (64, task.seq_len) and int(ids.max()) < task.vocab_size and int(ids.min()) >= 0
    for row, answer in zip(ids.tolist(), answers.tolist()):
        *context, query = row
        pairs = {t // S: t % S for t in context if t < K * S}  # key -> value
        fillers = [t for t in context if t >= K * S]
        assert len(pairs) == P and len(fillers) == task.length - P  # distinct keys, nothing overwritten
        assert all(K * S <= t < K * S + F for t in fillers)
        assert K * S + F <= query < task.vocab_size and pairs[query - K * S - F] == answer


def test_pair_recall_refuses_impossible_settings(at):
    with pytest.raises(ValueError, match="num_pairs <= num_keys"):
        at.PairRecall(num_pairs=5, num_keys=4)


def test_first_time_at(at):
    hist = [{"seconds": s, "accuracy": a} for s, a in [(0, 0.1), (1, 0.6), (2, 0.4), (3, 0.95)]]
    for level in (0.05, 0.5, 0.6, 0.9, 0.99):
        brute = min((h["seconds"] for h in hist if h["accuracy"] >= level), default=None)
        assert at.first_time_at(hist, level) == brute


def test_every_variant_runs_and_writes_results(at, tmp_path, monkeypatch):
    monkeypatch.setattr(at, "SETUPS", tiny_setups(at))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert at.main(["--tasks", "lookup,recall", "--budget-s", "0.3", "--out-dir", str(tmp_path / "out"),
                        "--variants", "exact,window,linear,performer:32,linformer:8,nystrom:4"]) == 0
    finally:
        torch.set_num_threads(threads)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    stem = files[0].rsplit(".", 1)[0]
    assert files == [f"{stem}.json", f"{stem}.md", f"{stem}_lookup.png", f"{stem}_recall.png"]
    for png in files[2:]:
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
    assert set(doc["tasks"]) == {"lookup", "recall"} and "cpu_model" in doc["header"]
    variants = ["exact", "window", "linear", "performer:32", "linformer:8", "nystrom:4"]
    assert [(r["task"], r["variant"]) for r in doc["runs"]] == [(t, v) for t in ("lookup", "recall") for v in variants]
    for r in doc["runs"]:
        hist = r["history"]
        assert hist[0]["step"] == 0 and hist[-1]["step"] == r["steps"] >= 1
        assert all(a["seconds"] <= b["seconds"] for a, b in zip(hist, hist[1:]))
        assert all(0.0 <= h["accuracy"] <= 1.0 for h in hist) and 0.0 <= r["final_accuracy"] <= 1.0
        assert r["reached_target"] or hist[-1]["seconds"] >= 0.3  # stops only at the target or the budget
        assert (r["backend"] is not None) == (r["method"] in ("exact", "window"))
    md = (tmp_path / "out" / f"{stem}.md").read_text()
    assert all(f"| {v} | 0 |" in md for v in variants)
    assert md.count("## ") == 2


def test_bad_arguments_exit(at, tmp_path):
    for argv in (["--tasks", "nope"], ["--variants", "exact,flash"], ["--budget-s", "0"]):
        with pytest.raises(SystemExit):
            at.main([*argv, "--out-dir", str(tmp_path)])
