"""benchmarks/gpu.py and its modules (gpu_*.py) run only on a lent GPU, where minutes are scarce:
their checks and reports are exercised here on the CPU (the Triton kernels in the interpreter), so
a typo does not cost a GPU session."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import attnkit as ak  # noqa: E402
from attnkit.ops.block_plan import make_plan  # noqa: E402
from attnkit.ops.triton import configs  # noqa: E402
from attnkit.ops.triton.op import triton_attention  # noqa: E402


PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _inputs(N=48, H=2, D=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, H, N, D, generator=g).requires_grad_() for _ in range(3)]


def test_check_passes_attnkit_and_stops_a_wrong_output(peers):
    if not configs.interpreting():
        pytest.skip("the CPU run needs Triton's interpreter")
    q, k, v = _inputs()
    mask = ak.sliding_window(5) | ak.global_tokens([0, 1])
    rows = torch.linspace(0, q.shape[2] - 1, 16).long()
    want = peers.reference_rows(q.detach(), k.detach(), v.detach(), mask, rows)
    plan = make_plan(mask, 48, 48, 16, 16, "cpu")

    def mine(q, k, v):
        return triton_attention(q, k, v, mask=mask, plan=plan)[0]

    assert peers.check(mine, q, k, v, mask, rows, want, 48) < 1e-4  # output rows and dq, dk, dv
    with pytest.raises(RuntimeError, match="output differs from the reference"):
        peers.check(lambda q, k, v: mine(q, k, v) + 0.1, q, k, v, mask, rows, want, 48)
    with pytest.raises(RuntimeError, match="dk differs from the reference"):  # right output, wrong gradient
        peers.check(lambda q, k, v: mine(q, k.detach() + 0 * k, v), q, k, v, mask, rows, want, 48)


def test_the_longformer_mask_and_pair_count_match_the_anchors(peers):
    N = 4096
    truth = peers.longformer_mask().materialize(N, N)[0, 0]  # (N, N)
    # the anchors count N (2W + 1) + 2 G N pairs: the band, and the global rows and columns in full
    assert peers.useful_pairs("longformer", N) == N * (2 * peers.W + 1) + 2 * peers.G * N
    assert abs(truth.sum().item() - peers.useful_pairs("longformer", N)) / truth.sum().item() < 0.1
    assert truth[0].all() and truth[:, 0].all() and truth[500, 500 - peers.W] and not truth[500, 500 - peers.W - 1]


def test_an_exception_without_a_message_is_still_reported(peers):
    assert peers.error_text(AssertionError()) == "AssertionError: "
    assert peers.error_text(RuntimeError("out of memory\nmore")) == "RuntimeError: out of memory"


def test_reports_render_rows_and_errors(peers):
    rows = [{"case": "causal", "N": 4096, "D": 64, "H": 16, "contender": "attnkit triton", "fwd_ms": 0.5,
             "fwd_tflops": 300.0, "fwdbwd_ms": 1.5, "fwdbwd_tflops": 350.0, "peak_gib": 0.1, "max_err": 1e-3},
            {"case": "causal", "N": 4096, "D": 64, "H": 16, "contender": "sdpa FLASH", "error": "RuntimeError: x"}]
    md = peers.markdown(rows, "NVIDIA H100")
    assert "NVIDIA H100" in md and "| causal | 4096 | 64 | attnkit triton | 0.500 | 300 |" in md
    assert "RuntimeError: x" in md


# -- issue 14: plan builds, host overhead, the one-call driver -----------------------------------------

@pytest.fixture
def eager_flex(pb, monkeypatch):
    """Flex's create_block_mask uncompiled (eager, N x N: tiny N only) in place of the compiled one,
    whose CPU compile would take the test's whole budget."""
    from torch.nn.attention.flex_attention import create_block_mask
    monkeypatch.setattr(pb, "_compiled_cbm", create_block_mask)


@pytest.mark.parametrize("name", ["longformer", "causal", "causal_window", "docs1", "docs8", "docs64", "docs512"])
def test_the_flex_mask_mods_are_the_attnkit_masks(pb, name):
    """Flex is timed on the same masks: each mask_mod, written out, equals attnkit's mask."""
    N = 1100  # past W + G, and 512 documents of 2 or 3 tokens
    case = pb.MASKS[name]
    data = case.data(N, torch.device("cpu"))
    q, k = torch.arange(N)[:, None], torch.arange(N)[None, :]
    want = case.build(data).materialize(N, N)[0, 0]
    assert torch.equal(case.flex(data)(0, 0, q, k).expand(N, N), want)
    if name.startswith("docs"):
        assert len(torch.unique(data["ids"])) == int(name[4:])


def test_plan_build_rows_tables_and_files(pb, eager_flex, tmp_path):
    """make_plan rows (T, P, U as the plan has them), Flex rows, cache hits that build nothing,
    and the JSON and markdown written after each row."""
    from attnkit.ops.block_plan import make_plan
    rows = []
    head = pb.header(torch.device("cpu"), "a test")

    def on_row(row):
        rows.append(row)
        pb.write(tmp_path, "pb", head, rows)
    pb.run((192, 256), ("longformer", "docs8"), ((32, 16), (16, 16)), torch.device("cpu"), reps=2, flex=True,
           cache_n=256, cache_calls=3, on_row=on_row)
    assert [r["what"] for r in rows].count("make_plan") == 8 and not [r for r in rows if "error" in r], rows
    for r in (r for r in rows if r["what"] == "make_plan"):
        plan = make_plan(pb.MASKS[r["mask"]].build(pb.MASKS[r["mask"]].data(r["N"], "cpu")), r["N"], r["N"],
                         r["block_m"], r["block_n"], "cpu")
        assert (r["T"], r["U"]) == (len(plan.kv_idx), plan.tiles.shape[2]) and len(r["times_ms"]) == 2
        assert r["min_ms"] <= r["median_ms"]
    flex = [r for r in rows if r["what"] == "flex create_block_mask"]
    assert len(flex) == 4 and all(r["T"] > 0 and "first_call_ms" in r for r in flex)
    cache = [r for r in rows if r["what"] == "cached_plan hit"]
    assert [r["mask"] for r in cache] == ["longformer", "docs8"] and all(r["plans_built"] == 0 for r in cache)
    doc = json.loads((tmp_path / "pb.json").read_text())
    assert len(doc["rows"]) == len(rows) and doc["header"]["note"] == "a test"
    md = (tmp_path / "pb.md").read_text()
    assert "| longformer | 32x16 |" in md and "## FlexAttention create_block_mask" in md
    assert "| docs8 | 256 | 32x16 |" in md and "a test" in md


def test_plan_build_reports_a_failing_case_and_the_time_limit(pb, monkeypatch):
    monkeypatch.setattr(pb, "make_plan", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory")))
    rows = pb.run((64,), ("causal",), ((16, 16),), torch.device("cpu"), cache_n=None, on_row=lambda r: None)
    assert rows[0]["error"] == "RuntimeError: out of memory"
    rows = pb.run((64,), ("causal",), ((16, 16),), torch.device("cpu"), cache_n=64, on_row=lambda r: None,
                  deadline=0.0)
    assert [r["error"] for r in rows] == ["skipped: time limit"] * 2
    assert "skipped: time limit" in pb.markdown(pb.header(torch.device("cpu")), rows)


def test_plan_build_command_line(pb, tmp_path, capsys):
    """The CLI end to end at a small size, and its refusals."""
    code = pb.main(["--ns", "128", "--masks", "causal", "--blocks", "32x16", "--reps", "1", "--cache-n", "128",
                    "--cache-calls", "2", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| causal | 32x16 |" in out
    assert len(list(tmp_path.glob("plan_build_cpu_*_1t.json"))) == 1
    for bad, says in ((["--masks", "nope"], "unknown"), (["--blocks", "100x64"], "powers of two"),
                      (["--blocks", "128"], "BMxBN"), (["--device", "tpu"], "cpu or cuda")):
        with pytest.raises(SystemExit):
            pb.parse_args(bad)
        assert says in capsys.readouterr().err
    assert pb.default_blocks() == ((128, 64), (64, 128), (64, 64))


def test_per_call_ms_synchronizes_around_loops_not_calls(overhead, monkeypatch):
    calls, syncs = [], []
    monkeypatch.setattr(overhead.plan_build, "_sync", lambda device: syncs.append(len(calls)))
    ms, per_loop, means = overhead.per_call_ms(lambda: calls.append(1), torch.device("cpu"), rounds=3, max_calls=7,
                                          min_calls=7)
    assert per_loop == 7 and len(means) == 3 and ms == pytest.approx(sorted(means)[1], abs=1e-5)
    assert len(calls) == 2 + 3 * 7  # a warm-up, one estimate, three loops of 7
    assert len(syncs) == 2 * (1 + 3)  # around the estimate and around each loop


def test_host_overhead_rows_checks_and_ratios(overhead, monkeypatch):
    """Every contender of the host-overhead table runs (the Triton ones in the interpreter), each
    output is checked against its SDPA counterpart first, and the ratios are to SDPA."""
    if not configs.interpreting():
        pytest.skip("the CPU run needs Triton's interpreter")
    monkeypatch.setattr(overhead, "per_call_ms", lambda fn, device, **kw: (2.0, 1, [2.0]))
    rows = overhead.host_overhead(torch.device("cpu"), dtype=torch.float16, ns=(32,), on_row=lambda r: None)
    assert len(rows) == 12 and not [r for r in rows if "error" in r], rows
    assert all(r["max_err_vs_sdpa"] < 1e-2 for r in rows)
    by = {(r["contender"], r["mask_mode"]): r for r in rows}
    assert by[("ak triton window+global", "rebuilt")]["baseline"] == "sdpa window+global (bool mask)"
    assert by[("sdpa causal", "reused")]["ratio_to_sdpa_causal"] == 1.0
    assert by[("ak auto causal", "rebuilt")]["auto_picks"] in ("sdpa", "tiled", "reference", "triton", "banded")
    md = overhead.overhead_markdown(rows)
    assert "| 32 | ak triton window+global |" in md


def test_host_overhead_stops_a_wrong_contender(overhead, monkeypatch):
    real = overhead.overhead_contenders

    def wrong(q, k, v):
        runs = real(q, k, v)
        reused, rebuilt, same = runs["ak auto causal"]
        runs = {"sdpa causal": runs["sdpa causal"], "ak auto causal": (lambda: reused() + 1, rebuilt, same)}
        return runs
    monkeypatch.setattr(overhead, "overhead_contenders", wrong)
    monkeypatch.setattr(overhead, "per_call_ms", lambda fn, device, **kw: (1.0, 1, [1.0]))
    rows = overhead.host_overhead(torch.device("cpu"), dtype=torch.float32, ns=(16,), on_row=lambda r: None)
    bad = [r for r in rows if r["contender"] == "ak auto causal" and r["mask_mode"] == "reused"][0]
    assert "output differs from sdpa causal" in bad["error"] and "ms_per_call" not in bad


def test_the_issue14_run_on_the_cpu(overhead, steps, pb, eager_flex, monkeypatch, tmp_path):
    """--issue14's steps end to end with stand-ins for what needs CUDA (pytest child, do_bench's
    measure, per-call timing): one issue14.json with every step, markdown, the rows' log."""
    if not configs.interpreting():
        pytest.skip("the CPU run needs Triton's interpreter")
    children = []
    monkeypatch.setattr(steps, "run_child", lambda cmd, env, timeout_s: (children.append(cmd), (0, "3 passed in 9.1s\n"))[1])
    monkeypatch.setattr(overhead, "per_call_ms", lambda fn, device, **kw: (1.5, 1, [1.5]))
    monkeypatch.setattr(steps, "OVERHEAD_NS", (32,))
    monkeypatch.setattr(steps, "OVERHEAD_DTYPE", torch.float16)  # the interpreter refuses bfloat16
    monkeypatch.setattr(steps, "PLAN_NS", (256,))
    monkeypatch.setattr(steps, "PLAN_MASKS", ("longformer", "docs512"))
    monkeypatch.setattr(steps, "PLAN_CACHE_N", 256)
    monkeypatch.setattr(steps, "LONGFORMER_NS", (4096, 1 << 20))
    measured = []

    def measure(kind, N, D, H, dev, rows, log_path):
        measured.append((kind, N, D, H))
        row = {"case": kind, "N": N, "D": D, "H": H, "contender": "attnkit triton", "fwd_ms": 1.0, "fwd_tflops": 1.0,
               "fwdbwd_ms": 2.0, "fwdbwd_tflops": 1.0, "peak_gib": 0.1, "max_err": 1e-3}
        rows.append(row)
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    monkeypatch.setattr(steps, "measure", measure)
    assert steps.issue14(tmp_path, ("tests", "overhead"), device="cpu", limits={"overhead": 600}) == 0
    assert steps.issue14(tmp_path, ("plans", "longformer"), device="cpu") == 0  # another process, the same files
    doc = json.loads((tmp_path / "issue14.json").read_text())
    assert list(doc["steps"]) == ["tests", "overhead", "plans", "longformer"] and len(doc["meta"]["runs"]) == 2
    assert doc["steps"]["tests"]["info"]["returncode"] == 0
    assert children[0][1:5] == ["-m", "pytest", "-m", "gpu"] and "tests/test_triton.py" in children[0]
    assert "3 passed" in (tmp_path / "issue14_pytest.log").read_text()
    assert len(doc["steps"]["overhead"]["rows"]) == 12 and "ratio_to_sdpa_causal" in doc["steps"]["overhead"]["rows"][0]
    plans = doc["steps"]["plans"]["rows"]
    assert {r["what"] for r in plans} == {"make_plan", "flex create_block_mask", "cached_plan hit"}
    assert not [r for r in plans if "error" in r], plans
    assert measured == [("longformer", 4096, 64, 12), ("longformer", 1 << 20, 64, 12)]
    md = (tmp_path / "issue14.md").read_text()
    for text in ("## tests", "3 passed", "## overhead", "| 32 | ak triton causal |", "## plans",
                 "| longformer | 128x64 |", "## longformer", "| longformer | 1048576 | 64 | attnkit triton |"):
        assert text in md, text
    steps = [json.loads(line)["step"] for line in (tmp_path / "issue14_rows.jsonl").read_text().splitlines()]
    assert set(steps) == {"overhead", "plans", "longformer"}


def test_the_issue14_steps_respect_their_time_limits(steps, monkeypatch, tmp_path):
    monkeypatch.setattr(steps, "run_child", lambda cmd, env, timeout_s: ("timeout", "collected 5 items\n(stopped)"))
    monkeypatch.setattr(steps, "measure", lambda *a: pytest.fail("measure ran past the time limit"))
    steps.issue14(tmp_path, steps.ISSUE14_STEPS, device="cpu", limits=dict.fromkeys(steps.ISSUE14_STEPS, 0))
    doc = json.loads((tmp_path / "issue14.json").read_text())
    assert doc["steps"]["tests"]["info"]["returncode"] == "timeout"
    assert "collected 5 items" in (tmp_path / "issue14_pytest.log").read_text()
    for step in ("overhead", "plans", "longformer"):
        rows = doc["steps"][step]["rows"]
        assert rows and all(r["error"] == "skipped: time limit" for r in rows), (step, rows)


def test_the_issue14_options_parse(gpu):
    args = gpu.parse_args(["--issue14", "--step", "plans", "--step", "tests", "--limit-s", "30", "--out", "x"])
    assert args.issue14 and args.step == ["plans", "tests"] and args.limit_s == 30.0
    with pytest.raises(SystemExit):
        gpu.parse_args(["--issue14", "--step", "nope"])


def test_the_issue14_shell_script_runs_each_step_under_a_timeout(tmp_path):
    """benchmarks/gpu_issue14.sh with a stand-in python: every step is started, in order, with the
    options gpu.py takes, under `timeout`, and the log says how each ended."""
    import subprocess
    script = PATH.parent / "gpu_issue14.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "ARGS $*"\necho "PYTHONPATH=$PYTHONPATH"\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": str(fake), "PATH": os.environ["PATH"]}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    log = (out / "issue14_log.txt").read_text()
    steps = [line.split("--step ")[1].split()[0] for line in log.splitlines() if line.startswith("ARGS benchmarks/gpu.py")]
    assert steps == ["tests", "overhead", "plans", "longformer"]
    assert all(f"== {s} exit 0" in log for s in steps)
    assert f"ARGS benchmarks/gpu_profile_call.py --out {out} --n 4096" in log  # the profile last
    assert f"--out {out}" in log and "/src" in log.split("PYTHONPATH=")[1].split(":")[0]


def test_a_child_past_its_time_is_killed_with_its_own_children(steps, tmp_path):
    """run_child (the tests step's pytest) kills the child's whole process group at the timeout:
    a grandchild (an xdist worker, say) does not outlive it to load the GPU under the next step."""
    import subprocess
    import sys
    marker = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "  # holds no pipe: communicate() does not wait on it
            f"open({str(marker)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(300)")
    rc, out = steps.run_child([sys.executable, "-c", code], dict(os.environ), 3)
    assert rc == "timeout" and "started" in out and "stopped after 3 s" in out
    pid = int(marker.read_text())
    try:
        for _ in range(50):  # the kill is immediate; reaping by init may take a moment
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            if subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                              text=True).stdout.strip().startswith("Z"):
                break
            __import__("time").sleep(0.1)
        else:
            pytest.fail(f"the grandchild {pid} outlived the timeout")
    finally:
        try:
            os.kill(pid, 9)  # the test's own grandchild, should it have survived
        except ProcessLookupError:
            pass
    assert steps.run_child([sys.executable, "-c", "print('ok')"], dict(os.environ), 30) == (0, "ok\n")
