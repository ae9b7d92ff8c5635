"""benchmarks/gpu.py runs only on a lent GPU, where minutes are scarce: its checks and its reports
are exercised here on the CPU (the Triton kernels in the interpreter), so a typo does not cost a
GPU session."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import attnkit as ak  # noqa: E402
from attnkit.ops.block_plan import make_plan  # noqa: E402
from attnkit.ops.triton import configs  # noqa: E402
from attnkit.ops.triton.op import triton_attention  # noqa: E402

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(N=48, H=2, D=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, H, N, D, generator=g).requires_grad_() for _ in range(3)]


def test_check_passes_attnkit_and_stops_a_wrong_output(gpu):
    if not configs.interpreting():
        pytest.skip("the CPU run needs Triton's interpreter")
    q, k, v = _inputs()
    mask = ak.sliding_window(5) | ak.global_tokens([0, 1])
    rows = torch.linspace(0, q.shape[2] - 1, 16).long()
    want = gpu.reference_rows(q.detach(), k.detach(), v.detach(), mask, rows)
    plan = make_plan(mask, 48, 48, 16, 16, "cpu")

    def mine(q, k, v):
        return triton_attention(q, k, v, mask=mask, plan=plan)[0]

    assert gpu.check(mine, q, k, v, mask, rows, want, 48) < 1e-4  # output rows and dq, dk, dv
    with pytest.raises(RuntimeError, match="output differs from the reference"):
        gpu.check(lambda q, k, v: mine(q, k, v) + 0.1, q, k, v, mask, rows, want, 48)
    with pytest.raises(RuntimeError, match="dk differs from the reference"):  # right output, wrong gradient
        gpu.check(lambda q, k, v: mine(q, k.detach() + 0 * k, v), q, k, v, mask, rows, want, 48)


def test_the_longformer_mask_and_pair_count_match_the_anchors(gpu):
    N = 4096
    truth = gpu.longformer_mask().materialize(N, N)[0, 0]  # (N, N)
    # the anchors count N (2W + 1) + 2 G N pairs: the band, and the global rows and columns in full
    assert gpu.useful_pairs("longformer", N) == N * (2 * gpu.W + 1) + 2 * gpu.G * N
    assert abs(truth.sum().item() - gpu.useful_pairs("longformer", N)) / truth.sum().item() < 0.1
    assert truth[0].all() and truth[:, 0].all() and truth[500, 500 - gpu.W] and not truth[500, 500 - gpu.W - 1]


def test_an_exception_without_a_message_is_still_reported(gpu):
    assert gpu.error_text(AssertionError()) == "AssertionError: "
    assert gpu.error_text(RuntimeError("out of memory\nmore")) == "RuntimeError: out of memory"


def test_reports_render_rows_and_errors(gpu):
    rows = [{"case": "causal", "N": 4096, "D": 64, "H": 16, "contender": "attnkit triton", "fwd_ms": 0.5,
             "fwd_tflops": 300.0, "fwdbwd_ms": 1.5, "fwdbwd_tflops": 350.0, "peak_gib": 0.1, "max_err": 1e-3},
            {"case": "causal", "N": 4096, "D": 64, "H": 16, "contender": "sdpa FLASH", "error": "RuntimeError: x"}]
    md = gpu.markdown(rows, "NVIDIA H100")
    assert "NVIDIA H100" in md and "| causal | 4096 | 64 | attnkit triton | 0.500 | 300 |" in md
    assert "RuntimeError: x" in md
    tune = [{"case": "longformer", "N": 4096, "D": 64, "H": 12, "block_m": bm, "block_n": 64, "num_warps": 8,
             "num_stages": 2, "max_err": 0.0, "fwd_ms": ms, "bwd_ms": 2 * ms} for bm, ms in ((128, 0.3), (64, 0.2))]
    tune.append({**tune[0], "block_m": 256, "error": "OutOfResources: shared memory"})
    del tune[-1]["fwd_ms"]
    md = gpu.tune_markdown(tune, "NVIDIA H100")
    fastest, second = (md.index(f"| {bm} x 64 | 8 | 2 |") for bm in (64, 128))
    assert fastest < second and "OutOfResources" in md


def test_the_tuning_sweep_runs_end_to_end(gpu, monkeypatch, tmp_path):
    """--tune's loop on the CPU: the interpreter for the kernels, a stand-in for do_bench (which
    needs CUDA); launch_config is restored after the sweep."""
    if not configs.interpreting():
        pytest.skip("the CPU run needs Triton's interpreter")
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 1.0)[1])
    monkeypatch.setattr(gpu, "TUNE_BLOCKS", ((16, 16), (32, 16)))
    monkeypatch.setattr(gpu, "TUNE_WARPS", (4,))
    monkeypatch.setattr(gpu, "TUNE_STAGES", (2,))
    shipped = configs.launch_config
    rows = gpu.tune_case("longformer", 40, 16, 2, "cpu", tmp_path / "tune.jsonl", dtype=torch.float16)
    assert configs.launch_config is shipped
    assert [(r["block_m"], r["block_n"]) for r in rows] == [(16, 16), (32, 16)]
    assert all("error" not in r and r["max_err"] < 1e-2 and r["fwd_ms"] == 1.0 for r in rows), rows
    assert len((tmp_path / "tune.jsonl").read_text().splitlines()) == 2
