"""The ``attnkit`` command: info and demo run and say what they should."""

from __future__ import annotations

import re

from attnkit.cli.main import main


def test_info_lists_every_backend_with_reasons(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for name in ("reference", "sdpa", "banded", "tiled"):
        assert re.search(rf"^\s+{name}\s", text, re.M)
    assert "auto picks: tiled" in text  # the long structured-mask probe
    assert "why not: bias alibi" in text


def test_demo_runs_and_backends_agree(capsys):
    assert main(["demo", "--long-n", "2048"]) == 0
    text = capsys.readouterr().out
    errors = [float(x) for x in re.findall(r"max \|out - float64 reference\| = ([0-9.e+-]+)", text)]
    assert len(errors) == 5 and max(errors) < 1e-5  # reference, sdpa, banded, tiled, auto
    assert "███··\n████·\n█████" in text  # causal, Nq=3 Nk=5, bottom-right
    m = re.search(r"tiled uses (\d+)x less memory .* max \|difference\| ([0-9.e+-]+)", text)
    assert m and float(m.group(2)) < 1e-5
    lf = re.search(r"Longformer, banded .* max \|error\| vs float64 reference rows ([0-9.e+-]+)", text)
    assert lf and float(lf.group(1)) < 1e-5


def test_bench_writes_json_and_markdown(tmp_path):
    import json

    argv = ["bench", "--ns", "128", "--impls", "tiled,sdpa", "--masks", "causal", "--modes", "fwd",
            "--reps", "1", "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    (json_path,) = tmp_path.glob("cpu_*.json")
    doc = json.loads(json_path.read_text())
    assert [r["status"] for r in doc["rows"]] == ["ok", "ok"]
    assert all(r["median_ms"] > 0 and r["flops"] == 4 * 12 * 64 * 128 * 129 / 2 for r in doc["rows"])
    assert "| 128 | causal | fwd |" in json_path.with_suffix(".md").read_text()
