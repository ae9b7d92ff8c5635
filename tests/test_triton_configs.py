"""The Triton kernels' choices as data (``ops/triton/configs.py``): one table of blocks, launch
settings and Schedule switches; switches that have not been timed on a GPU stay off; the table's
row reaches the kernels. The switches' arithmetic is checked on the case table (tests/test_backends.py,
runners ``triton-*-switches``, ``triton-atomic-dq``, ...); their compilation for sm_90 in
tests/test_triton_compile.py."""

from __future__ import annotations

import itertools
from dataclasses import fields, replace

import pytest
import torch

import attnkit as ak
from attnkit.ops.block_plan import split_key_lengths
from attnkit.ops.triton import configs
from attnkit.ops.triton.configs import Config, Schedule


def test_every_row_is_well_formed():
    for key, row in configs.TABLE.items():
        pass_, dtype_class, D, kind = key
        assert pass_ in configs.PASSES and dtype_class in ("half", "float32") and D in configs.HEAD_DIMS, key
        assert kind in (*configs.MASK_KINDS, "any"), key
        for size in (row.block_m, row.block_n):
            assert size >= 16 and size & (size - 1) == 0, (key, row)
        assert set(row.launch) == set(configs.KERNELS_OF[pass_]), (key, row.launch)
        for warps, stages in row.launch.values():
            assert warps in (1, 2, 4, 8, 16) and stages >= 1, (key, row.launch)
        assert isinstance(row.schedule, Schedule) and row.source, (key, row)
    for pass_, dtype, D in itertools.product(configs.PASSES, configs.DTYPES, configs.HEAD_DIMS):
        assert configs.lookup(pass_, D, dtype) is not None  # every shipped combination has an "any" row


def test_switches_not_timed_on_a_gpu_stay_off():
    """Issue 15: a kernel variant that has not run on a GPU ships switched off. A row may turn a
    switch on only with a timed source ("timed: <device>, <date>, ..." from gpu.py --tune)."""
    for key, row in configs.TABLE.items():
        if row.schedule != Schedule():
            assert row.source.startswith("timed:"), f"{key}: switches {row.schedule.spec()} on in an untimed row"


def test_a_kind_row_wins_over_any(monkeypatch):
    causal = Config(64, 32, {"_fwd": (4, 3)}, Schedule(tma=True), source="timed: test")
    monkeypatch.setitem(configs.TABLE, ("fwd", "half", 64, "causal"), causal)
    assert configs.gpu_blocks(64, torch.bfloat16, kind="causal") == (64, 32)
    assert configs.gpu_blocks(64, torch.bfloat16, kind="sparse") == configs.gpu_blocks(64, torch.bfloat16)
    assert configs.launch_config("_fwd", 64, 32, 64, torch.float16, "causal") == {"num_warps": 4, "num_stages": 3}
    assert configs.default_schedule(64, torch.bfloat16, "causal").tma  # the forward's tma reaches the schedule
    assert not configs.default_schedule(64, torch.bfloat16, "dense").tma


@pytest.mark.parametrize("mask,kind", [
    (None, "dense"), (ak.causal(), "causal"), (ak.causal() & ak.key_padding([5, 3]), "causal"),
    (ak.sliding_window(4), "sparse"), (ak.causal() & ak.sliding_window(4), "sparse"),
    (ak.key_padding([5, 3]), "dense"),
])
def test_mask_kinds(mask, kind):
    """The kind of a mask without its key lengths (the kernels read those per call)."""
    assert configs.mask_kind(split_key_lengths(mask)[0]) == kind


def test_schedule_round_trips_through_its_spec():
    choices = Schedule.CHOICES
    for values in itertools.product(*choices.values()):
        switches = dict(zip(choices, values))
        if switches["delta"] == "fused" and switches["dq"] == "atomic":
            continue
        schedule = Schedule(**switches)
        assert Schedule.parse(schedule.spec()) == schedule
    assert Schedule().spec() == ""


@pytest.mark.parametrize("kwargs,match", [
    (dict(dq="fast"), r"dq='fast': expected one of \('separate', 'atomic'\)"),
    (dict(tma=1.5), "tma=1.5"),
    (dict(dq="atomic", delta="fused"), "use delta='kernel' with dq='atomic'"),
    (dict(persistent=2.0), r"persistent=2.0: expected one of \(0, 1, 2, 4\) \(int\)"),  # would not survive spec()
    (dict(persistent=True), "persistent=True"),
    (dict(tma=1), r"tma=1: expected one of \(False, True\) \(bool\)"),
])
def test_bad_schedules_say_what_to_do(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_unknown_switch_in_a_spec():
    with pytest.raises(ValueError, match="unknown switch 'fast'"):
        Schedule.parse("fast=True")


def test_launch_settings_follow_the_table(monkeypatch):
    """The op's launch list is the table's (warps, stages) of each kernel at the pass's blocks;
    at other blocks the size rule applies."""
    from attnkit.ops.triton.op import LAUNCHED, launch_settings

    row = configs.lookup("bwd", 64, torch.bfloat16)
    monkeypatch.setitem(configs.TABLE, ("bwd", "half", 64, "any"),
                        replace(row, launch={"_bwd_delta": (2, 1), "_bwd_dq": (4, 3), "_bwd_dkdv": (16, 4)}))
    fwd = configs.gpu_blocks(64, torch.bfloat16)
    got = launch_settings((*fwd, row.block_m, row.block_n), 64, torch.bfloat16, "any")
    want = dict(_fwd=configs.lookup("fwd", 64, torch.bfloat16).launch["_fwd"], _bwd_delta=(2, 1), _bwd_dq=(4, 3),
                _bwd_dkdv=(16, 4))
    assert got == [x for kernel in LAUNCHED for x in want[kernel]]
    assert configs.launch_config("_bwd_dq", 16, 16, 64, torch.bfloat16) == {"num_warps": 4, "num_stages": 2}


def test_the_schedule_argument_is_checked():
    pytest.importorskip("triton")
    from attnkit.ops.triton.op import triton_attention

    q = torch.randn(1, 1, 16, 16)
    with pytest.raises(TypeError, match="expected an attnkit.ops.triton.configs.Schedule"):
        triton_attention(q, q, q, schedule="dq=atomic")


def test_the_schedule_fields_are_the_choices():
    assert [f.name for f in fields(Schedule)] == list(Schedule.CHOICES)
    assert all(getattr(Schedule(), name) == values[0] for name, values in Schedule.CHOICES.items())  # plain first


def test_the_tables_schedule_reaches_the_kernels(monkeypatch):
    """A row's Schedule is what runs: with dq='atomic' in the table the backward launches no
    _bwd_dq, and its gradients still match the reference."""
    pytest.importorskip("triton")
    from attnkit.ops.triton import op

    class NotLaunched:
        def __getitem__(self, grid):
            raise AssertionError("_bwd_dq was launched under dq='atomic'")

    for pass_ in configs.PASSES:
        key = (pass_, "float32", 16, "causal")
        monkeypatch.setitem(configs.TABLE, key, replace(configs.lookup(pass_, 16, torch.float32),
                                                        schedule=Schedule(dq="atomic"), source="timed: test"))
    monkeypatch.setattr(op, "_bwd_dq", NotLaunched())
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    out = op.triton_attention(q, k, v, mask=ak.causal())[0]
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want = torch.autograd.grad(ak.attention(q, k, v, mask=ak.causal(), impl="reference").sum(), (q, k, v))
    for got, ref in zip(grads, want):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(AssertionError, match="was launched"):  # the sentinel works: the sparse row is the plain one
        torch.autograd.grad(op.triton_attention(q, k, v, mask=ak.sliding_window(3))[0].sum(), (q, k, v))


def test_explain_names_the_config_a_call_gets(monkeypatch):
    """ak.explain shows the table row the kernels would use: its switches and where its numbers
    came from (untimed rows say so)."""
    pytest.importorskip("triton")
    q = torch.randn(1, 2, 40, 16)
    text = str(ak.explain(q, q, q, mask=ak.causal() & ak.key_padding([30])))
    assert "config: " in text and "switches: none" in text and "not timed on a GPU" in text
    for pass_ in configs.PASSES:
        monkeypatch.setitem(configs.TABLE, (pass_, "float32", 16, "causal"),
                            replace(configs.lookup(pass_, 16, torch.float32), schedule=Schedule(gqa="group"),
                                    source="timed: H200, 2026-12-01"))
    text = str(ak.explain(q, q, q, mask=ak.causal() & ak.key_padding([30])))  # the causal row, lengths aside
    assert "switches: gqa=group; from: timed: H200, 2026-12-01" in text


def test_forward_switches_come_from_the_forward_row(monkeypatch):
    """tma / warp_specialize / persistent are the forward row's; the backward row gives the rest
    (whatever the forward row holds)."""
    for fwd in (Schedule(), Schedule(warp_specialize=True)):
        monkeypatch.setitem(configs.TABLE, ("fwd", "half", 64, "causal"),
                            replace(configs.lookup("fwd", 64, torch.float16), schedule=fwd, source="timed: test"))
        monkeypatch.setitem(configs.TABLE, ("bwd", "half", 64, "causal"),
                            replace(configs.lookup("bwd", 64, torch.float16), source="timed: test",
                                    schedule=Schedule(dq="atomic", tma=True, persistent=2)))
        got = configs.default_schedule(64, torch.float16, "causal")
        assert got == Schedule(dq="atomic", warp_specialize=fwd.warp_specialize), got


def test_a_schedule_argument_under_torch_compile():
    """A Schedule passed into a compiled function: its int switch changing between calls (dynamo
    then makes it symbolic) still names its kernels (spec() turns it into a guarded constant)."""
    pytest.importorskip("triton")
    from attnkit.ops.block_plan import make_plan
    from attnkit.ops.triton.op import triton_attention

    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    plan = make_plan(ak.causal(), 40, 40, 16, 16, "cpu")
    f = torch.compile(lambda q, k, v, s: triton_attention(q, k, v, mask=ak.causal(), plan=plan, schedule=s)[0],
                      fullgraph=True)
    want = ak.attention(q, k, v, mask=ak.causal(), impl="reference")
    for persistent in (1, 2, 4):
        torch.testing.assert_close(f(q, k, v, Schedule(persistent=persistent)), want, atol=2e-5, rtol=1e-4)


def test_tma_backward_on_another_thread():
    """Triton keeps its allocator (the scratch of in-kernel tensor descriptors) per thread, and
    autograd runs a CUDA backward on a worker thread: the backward must set it there too."""
    pytest.importorskip("triton")
    import threading

    from attnkit.ops.triton.op import triton_attention

    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    out = triton_attention(q, k, v, mask=ak.causal(), schedule=Schedule(tma=True))[0]
    result = {}

    def backward():
        from triton.runtime._allocation import _allocator  # the context variable set_allocator sets

        try:
            result["grads"] = torch.autograd.grad(out.sum(), (q, k, v))
            result["scratch"] = _allocator.get()(256, 128, None)  # the interpreter itself never calls it
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e

    worker = threading.Thread(target=backward)
    worker.start()
    worker.join()
    assert "error" not in result, result.get("error")
    assert result["scratch"].device == q.device and result["scratch"].numel() == 256
    want = torch.autograd.grad(ak.attention(q, k, v, mask=ak.causal(), impl="reference").sum(), (q, k, v))
    for got, ref in zip(result["grads"], want):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
