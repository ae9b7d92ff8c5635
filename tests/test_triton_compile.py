"""The Triton kernels compile for an H100 (sm_90), ahead of time, on a machine without a GPU.

The interpreter tests (test_backends, test_triton) check the kernels' arithmetic but not that the
real compiler accepts them, nor what they cost in registers. Here every shipped configuration
(kernel x dtype x head dim at its GPU blocks) goes through ``triton.compile`` and ptxas for sm_90,
in a fresh process without ``TRITON_INTERPRET`` (the conftest sets it for this one), and must
compile with no register spill, within the H100's shared memory, and on the tensor cores (wgmma)
for float16 / bfloat16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its NVIDIA backend")

from attnkit.ops.triton import check as triton_check
from attnkit.ops.triton import configs as ft


def _run(code: str) -> str:
    """Run ``code`` in a fresh interpreter without TRITON_INTERPRET; its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900,
                          check=False)
    assert done.returncode == 0, f"compiling for sm_90 failed:\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def sm90() -> list[dict]:
    code = "import json; from attnkit.ops.triton.check import check_all; print(json.dumps(check_all((90,))))"
    return json.loads(_run(code).strip().splitlines()[-1])


def test_every_shipped_configuration_compiles_for_sm90(sm90):
    fields = ("kernel", "D", "block_m", "block_n", "variant")
    expected = {(triton_check.TRITON_DTYPES[c["dtype"]], *(c[f] for f in fields))
                for c in triton_check.shipped_configs((90,))}
    assert {(r["dtype"], *(r[f] for f in fields)) for r in sm90} == expected
    every = {(kernel, dtype, D) for kernel in triton_check.KERNELS for dtype in ("fp16", "bf16", "fp32")
             for D in ft.HEAD_DIMS}
    assert {(r["kernel"], r["dtype"], r["D"]) for r in sm90} == every
    assert {r["kernel"] for r in sm90 if r["variant"] == "alibi"} == {"_fwd", "_bwd_dq", "_bwd_dkdv"}
    assert {r["kernel"] for r in sm90 if r["variant"] == "padding"} == {"_fwd", "_bwd_dq", "_bwd_dkdv"}
    assert {r["kernel"] for r in sm90 if r["variant"] == "gqa"} == {"_bwd_dkdv"}
    assert {r["kernel"] for r in sm90 if r["variant"] == "ragged"} == set(triton_check.KERNELS)


def test_no_configuration_spills_registers(sm90):
    """float16 / bfloat16 (the fast path) spill nothing. float32, the exact fallback on the FMA
    units, may spill a few bytes (ptxas spills 8-40 bytes in some of its configurations whatever
    the warps and stages), never a tile's worth."""
    spilled = [r for r in sm90 if r["spill_bytes"] > (64 if r["dtype"] == "fp32" else 0)]
    assert not spilled, "register spills on sm_90 (pick smaller blocks or more warps in gpu_blocks / " \
                        f"launch_config):\n{triton_check._table(spilled)}"


def test_shared_memory_fits_the_h100(sm90):
    over = [r for r in sm90 if r["shared_bytes"] > triton_check.ARCHS[90]]
    assert not over, f"over the H100's {triton_check.ARCHS[90]} bytes of shared memory:\n{triton_check._table(over)}"


def test_half_precision_runs_on_the_tensor_cores(sm90):
    half = [r for r in sm90 if r["dtype"] in ("fp16", "bf16") and r["kernel"] != "_bwd_delta"]  # delta: no dot
    # dropout / softcap's dQ at D = 128 has 32-row tiles: mma.sync (test_dropout_and_softcap_compile_...)
    assert half and all(r["tensor_core_ops"] > 0 or (r["variant"] in triton_check.REGULARIZED and r["mma_sync_ops"] > 0)
                        for r in half), triton_check._table(half)
    assert all(r["registers"] <= 255 for r in sm90)


@pytest.fixture(scope="module")
def switches_sm90() -> list[dict]:
    code = ("import json; from attnkit.ops.triton.check import check_all, switch_configs, _compile; "
            "from concurrent.futures import ProcessPoolExecutor; import os; "
            "pool = ProcessPoolExecutor(os.cpu_count()); print(json.dumps(list(pool.map(_compile, switch_configs((90,))))))")
    return json.loads(_run(code).strip().splitlines()[-1])


def test_every_schedule_switch_compiles_for_sm90(switches_sm90):
    """Each ``configs.Schedule`` switch (off in the shipped table until timed on a GPU) compiles
    for an H100 on the tensor cores, within its shared memory; TMA loads are bulk tensor copies.
    Spills are reported, not refused (``python -m attnkit.ops.triton_check --switches``)."""
    expected = {(c["kernel"], c["D"], c["variant"]) for c in triton_check.switch_configs((90,))}
    assert {(r["kernel"], r["D"], r["variant"]) for r in switches_sm90} == expected
    assert {r["variant"] for r in switches_sm90} == set(triton_check.SWITCHES)
    assert all(r["tensor_core_ops"] > 0 and r["shared_bytes"] <= triton_check.ARCHS[90] for r in switches_sm90)
    assert all((r["tma_ops"] > 0) == (r["variant"] == "tma") for r in switches_sm90), triton_check._table(switches_sm90)


def test_the_check_sees_a_spill():
    """The spill detector can fail: the dk/dv kernel at 128 x 128, D = 128, 4 warps spills."""
    code = ("import torch; from attnkit.ops.triton.check import compile_kernel; "
            "s = compile_kernel('_bwd_dkdv', torch.bfloat16, 128, 128, 128, num_warps=4); "
            "print(s.spill_bytes, s.registers)")
    spills, registers = map(int, _run(code).split()[-2:])
    assert spills > 0 and registers == 255


def test_the_interpreter_kernels_are_refused():
    if not ft.interpreting():
        pytest.skip("this process compiles for the GPU (no interpreter)")
    import torch

    with pytest.raises(RuntimeError, match="interpreter is on"):
        triton_check.compile_kernel("_fwd", torch.float16, 64, 128, 64)


def test_dropout_and_softcap_compile_on_the_tensor_cores(sm90):
    """Dropout (Philox keep bits in the tiles) and softcap are compiled for the forward, dQ and
    dK/dV kernels at D = 64 and 128, at the blocks such a call takes (``configs.REGULARIZED_BWD``
    for the backward): no spill in bfloat16 (``test_no_configuration_spills_registers``), the dots
    on the tensor cores (wgmma, but for dQ's 32-row tiles at D = 128: mma.sync)."""
    rows = [r for r in sm90 if r["variant"] in triton_check.REGULARIZED]
    assert {(r["kernel"], r["dtype"], r["D"], r["variant"]) for r in rows} == {
        (kernel, dtype, D, variant) for kernel in ("_fwd", "_bwd_dq", "_bwd_dkdv") for D in (64, 128)
        for dtype, variants in (("bf16", tuple(triton_check.REGULARIZED)), ("fp32", ("dropout_softcap",)))
        for variant in variants}
    half = [r for r in rows if r["dtype"] == "bf16"]
    assert all(r["spill_bytes"] == 0 for r in half), triton_check._table(half)
    mma_sync = [r for r in half if r["tensor_core_ops"] == 0]
    assert {(r["kernel"], r["D"]) for r in mma_sync} <= {("_bwd_dq", 128)}, triton_check._table(mma_sync)
    assert all(r["mma_sync_ops"] > 0 for r in mma_sync)
    bwd = ft.lookup("bwd", 128, __import__("torch").bfloat16, regularized=True)
    assert {(r["block_m"], r["block_n"]) for r in half if r["kernel"] != "_fwd" and r["D"] == 128} == {
        (bwd.block_m, bwd.block_n)}
