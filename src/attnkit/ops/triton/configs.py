"""The Triton kernels' choices as data: one table of block sizes, warps, stages and kernel switches.

``TABLE`` maps (pass, dtype class, D, mask kind) to a ``Config``: the blocks of that pass's plan,
the launch settings of each of its kernels, and the ``Schedule`` (which kernel variants run). Every
row says where its numbers came from (``source``: a device and a date for timed rows). The rows
shipped today come from compiled register counts for sm_90 (``python -m attnkit.ops.triton_check``:
no spills), **not from timings on a GPU**; ``benchmarks/gpu.py --tune`` measures the alternatives
on a lent GPU and prints the rows to paste here.

Each switch of ``Schedule`` is a constexpr of the kernels with the plain path kept: a variant that
has not run on a GPU stays off in every row (issue 15: compiling for sm_90 and passing the
interpreter do not show that a kernel works on the hardware).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

import torch

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DELTA_ROWS = 64  # rows per program of _bwd_delta
PASSES = ("fwd", "bwd")
MASK_KINDS = ("dense", "causal", "sparse")  # mask_kind(); "any" in a row matches each
KERNELS_OF = {"fwd": ("_fwd",), "bwd": ("_bwd_delta", "_bwd_dq", "_bwd_dkdv")}


def interpreting() -> bool:
    """Triton's interpreter runs the kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Schedule:
    """Which variant of each kernel runs (every field a constexpr switch; the defaults are the
    paths measured on a GPU).

    - ``dq``: "separate" (``_bwd_dq`` walks each query block's key tiles, FlashAttention-2's
      Algorithm 2 split in two kernels) or "atomic" (``_bwd_dkdv`` also adds each tile's
      dS K into a float32 dQ with atomics: one pass over the tiles, FlashAttention-2's original
      schedule; the sum's order, so its last bits, vary from run to run).
    - ``delta``: "kernel" (``_bwd_delta`` computes rowsum(dO * O) - dlse first) or "fused"
      (``_bwd_dq`` computes it for its rows, one launch and one read of dO fewer; needs
      dq="separate").
    - ``gqa``: "sum" (dK / dV per query head in float32, summed over each group afterwards) or
      "group" (one ``_bwd_dkdv`` program per kv head walks its group's query heads and writes
      dK / dV once, as FlashAttention-2/3: no per-query-head buffers, no second pass).
    - ``tma``: load K / V (forward, dQ) and Q / dO (dK / dV) through tensor descriptors (TMA on
      Hopper, ``tl.make_tensor_descriptor``) instead of pointer arithmetic.
    - ``warp_specialize``: ``tl.range(..., warp_specialize=True)`` on the kernels' main loops
      (producer / consumer warps, where the compiler supports it; for sm_90 triton 3.6 and 3.9
      compile the same PTX with and without it).
    - ``persistent``: 0 (one forward program per work item and sequence x head) or P (a grid of
      P programs per SM, each looping over the work: no tail of short-lived programs).

    Raises:
        ValueError: a value outside ``CHOICES`` (or of another type), or delta="fused" with
            dq="atomic".
    """

    dq: str = "separate"
    delta: str = "kernel"
    gqa: str = "sum"
    tma: bool = False
    warp_specialize: bool = False
    persistent: int = 0

    CHOICES = {"dq": ("separate", "atomic"), "delta": ("kernel", "fused"), "gqa": ("sum", "group"),
               "tma": (False, True), "warp_specialize": (False, True), "persistent": (0, 1, 2, 4)}

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)  # the exact type too: 2.0 == 2 would not survive spec() / parse()
            if type(value) is not type(f.default) or value not in self.CHOICES[f.name]:
                raise ValueError(f"Schedule {f.name}={value!r}: expected one of {self.CHOICES[f.name]} "
                                 f"({type(f.default).__name__})")
        if self.delta == "fused" and self.dq != "separate":
            raise ValueError("Schedule delta='fused' computes delta in the _bwd_dq kernel, which dq='atomic' does not "
                             "launch: use delta='kernel' with dq='atomic'")

    def spec(self) -> str:
        """A string naming the switches that differ from the defaults ("" for none): what the
        custom op carries (``parse`` reads it back). Each value is named through its place in
        CHOICES, so that under torch.compile an int field dynamo made symbolic (it changed between
        calls) becomes a constant, guarded, instead of a SymInt that cannot be formatted."""
        out = []
        for f in fields(self):
            choices = self.CHOICES[f.name]
            value = choices[choices.index(getattr(self, f.name))]
            if value != f.default:
                out.append(f"{f.name}={value}")
        return ",".join(out)

    @classmethod
    def parse(cls, spec: str) -> Schedule:
        """The Schedule of ``spec()``'s string."""
        if not spec:
            return cls()
        values = {}
        for item in spec.split(","):
            name, _, value = item.partition("=")
            if name not in cls.CHOICES:
                raise ValueError(f"schedule {spec!r}: unknown switch {name!r}; expected {tuple(cls.CHOICES)}")
            values[name] = {"True": True, "False": False}.get(value, int(value) if value.isdigit() else value)
        return cls(**values)


@dataclass(frozen=True)
class Config:
    """One pass's choices: its plan's blocks, each kernel's launch settings
    (kernel -> (num_warps, num_stages)), its Schedule, and where the numbers came from."""

    block_m: int
    block_n: int
    launch: dict = field(hash=False)
    schedule: Schedule = Schedule()
    source: str = ""


# Where the shipped rows come from (no row has been timed on a GPU yet).
UNTIMED = "sm_90 register counts (triton_check: no spills), not timed on a GPU; 2026-11-29"


def _half(D: int, backward: bool) -> Config:
    """float16 / bfloat16. Forward 128 x 64; backward 64 x 128 (the dk/dv kernel holds 128 keys
    and walks 64-row query blocks, as FlashAttention-2's backward; at 128 x 64 it spills), 64 x 64
    at D = 128. 8 warps for 128-row tiles, D = 128 and the dk/dv kernel (with 4 they spill), 4
    otherwise; two pipeline stages."""
    if not backward:
        return Config(128, 64, {"_fwd": (8, 2)}, source=UNTIMED)
    bm, bn = (64, 64) if D >= 128 else (64, 128)
    delta_warps = 8 if D >= 128 else 4
    return Config(bm, bn, {"_bwd_delta": (delta_warps, 2), "_bwd_dq": (8, 2), "_bwd_dkdv": (8, 2)}, source=UNTIMED)


def _float32(backward: bool) -> Config:
    """float32: 32 x 32 (its IEEE dots run on the FMA units and hold twice the bytes), 8 warps."""
    launch = {"_bwd_delta": (8, 2), "_bwd_dq": (8, 2), "_bwd_dkdv": (8, 2)} if backward else {"_fwd": (8, 2)}
    return Config(32, 32, launch, source=UNTIMED)


# (pass, dtype class "half" | "float32", D, mask kind | "any") -> Config. A lookup takes the row of
# its mask kind, else the "any" row. Rows timed by ``benchmarks/gpu.py --tune`` replace these.
TABLE: dict[tuple[str, str, int, str], Config] = {
    **{(p, "half", D, "any"): _half(D, p == "bwd") for p in PASSES for D in HEAD_DIMS},
    **{(p, "float32", D, "any"): _float32(p == "bwd") for p in PASSES for D in HEAD_DIMS},
}


def _regularized_half(D: int) -> Config:
    """The float16 / bfloat16 backward of a call with dropout or softcap: the keep bits (Philox's
    temporaries) and the cap's tanh need registers that the plain 64 x 128 (D = 64) and 64 x 64
    (D = 128) tiles do not leave (spills on sm_90, triton 3.9). 64 x 64 at D <= 64; 32 x 64 at
    D = 128 (dk/dv keeps 64 keys on wgmma; dQ's 32-row tiles run on mma.sync, too few rows for
    wgmma, with 4 warps: with 8 ptxas caps them at 128 registers and spills). 8 warps otherwise,
    two stages."""
    bm, bn = (32, 64) if D >= 128 else (64, 64)
    return Config(bm, bn, {"_bwd_delta": (8 if D >= 128 else 4, 2), "_bwd_dq": (4 if D >= 128 else 8, 2),
                           "_bwd_dkdv": (8, 2)}, source=UNTIMED)


# (dtype class, D) -> the backward's Config when dropout or softcap is on, where it differs from TABLE's.
REGULARIZED_BWD: dict[tuple[str, int], Config] = {("half", D): _regularized_half(D) for D in HEAD_DIMS if D >= 64}


def dtype_class(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else "half"


def mask_kind(mask) -> str:
    """"dense" (no mask), "causal" (``ak.causal()`` alone) or "sparse" (anything else): the
    mask kinds a table row may be tuned for."""
    if mask is None:
        return "dense"
    from ...masks import Causal
    return "causal" if type(mask) is Causal else "sparse"


def lookup(pass_: str, D: int, dtype: torch.dtype, kind: str = "any", regularized: bool = False) -> Config:
    """The table's Config for one pass ("fwd" / "bwd"), head dim, dtype and mask kind;
    ``regularized`` (dropout or softcap on): ``REGULARIZED_BWD``'s backward where it has one."""
    if pass_ not in PASSES:
        raise ValueError(f"pass {pass_!r}: expected one of {PASSES}")
    if regularized and pass_ == "bwd" and (dtype_class(dtype), D) in REGULARIZED_BWD:
        return REGULARIZED_BWD[dtype_class(dtype), D]
    key = (pass_, dtype_class(dtype), D)
    row = TABLE.get((*key, kind)) or TABLE.get((*key, "any"))
    if row is None:
        raise ValueError(f"no Triton config for pass={pass_}, dtype={dtype}, D={D}: expected D in {HEAD_DIMS}")
    return row


def gpu_blocks(D: int, dtype: torch.dtype, backward: bool = False, kind: str = "any",
               regularized: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of a pass on the GPU, from ``TABLE`` (``lookup``)."""
    row = lookup("bwd" if backward else "fwd", D, dtype, kind, regularized)
    return row.block_m, row.block_n


def default_blocks(D: int, dtype: torch.dtype, backward: bool = False, kind: str = "any",
                   regularized: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 16 x 16 in the interpreter (tests), ``gpu_blocks`` otherwise."""
    if interpreting():
        return 16, 16
    return gpu_blocks(D, dtype, backward, kind, regularized)


def default_schedule(D: int, dtype: torch.dtype, kind: str = "any") -> Schedule:
    """The call's Schedule from ``TABLE``: the backward row's switches, with the forward kernel's
    own (``tma``, ``warp_specialize``, ``persistent``) from the forward's row. (The op carries one
    Schedule: tma / warp_specialize then apply to both passes' kernels.)"""
    fwd, bwd = lookup("fwd", D, dtype, kind).schedule, lookup("bwd", D, dtype, kind).schedule
    return replace(bwd, tma=fwd.tma, warp_specialize=fwd.warp_specialize, persistent=fwd.persistent)


def launch_config(kernel: str, block_m: int, block_n: int, D: int, dtype: torch.dtype, kind: str = "any",
                  regularized: bool = False) -> dict:
    """num_warps / num_stages of one kernel launch: the row of its pass in ``TABLE`` (``lookup``,
    ``regularized``: dropout or softcap on) at that row's blocks; at other blocks (chosen by the
    caller) 8 warps for 128-row tiles, D = 128, the dk/dv kernel and float32 (with 4 they run out
    of registers, ``triton_check``), else 4, two stages."""
    row = lookup("fwd" if kernel == "_fwd" else "bwd", D, dtype, kind, regularized)
    if kernel == "_bwd_delta" or (block_m, block_n) == (row.block_m, row.block_n):
        warps, stages = row.launch[kernel]
        return {"num_warps": warps, "num_stages": stages}
    big = max(block_m, block_n) >= 128 or D >= 128 or kernel == "_bwd_dkdv" or dtype == torch.float32
    return {"num_warps": 8 if big else 4, "num_stages": 2}


def describe(D: int, dtype: torch.dtype, kind: str = "any") -> str:
    """One line on the config a call of this head dim, dtype and mask kind gets (``ak.explain``)."""
    fwd, bwd = lookup("fwd", D, dtype, kind), lookup("bwd", D, dtype, kind)
    launch = ", ".join(f"{k} {w}w/{st}s" for row in (fwd, bwd) for k, (w, st) in row.launch.items())
    switches = default_schedule(D, dtype, kind).spec() or "none"
    sources = " / ".join(dict.fromkeys((fwd.source, bwd.source)))
    if interpreting():
        return f"16 x 16 blocks in the interpreter; switches: {switches}; from: {sources}"
    return (f"forward {fwd.block_m} x {fwd.block_n}, backward {bwd.block_m} x {bwd.block_n}; {launch}; "
            f"switches: {switches}; from: {sources}")
