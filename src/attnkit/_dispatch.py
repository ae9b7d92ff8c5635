"""Which backend can run a call, why not, and the order ``impl="auto"`` tries them in.

Auto order: ``sdpa`` (torch's fused kernels) where it can express the call (on CUDA: where it
needs no materialized mask, so FlashAttention or cuDNN run it), then ``triton`` (the fused Triton
kernels for every mask structure, ALiBi and the lse; CUDA only: on the CPU they run only in
Triton's interpreter, for tests, and auto never picks them there), then ``banded``
(Longformer masks: sliding window, global tokens, padding; O(N·W)), then ``tiled`` (any
structured mask, ALiBi, lse, dropout and softcap on any device), then ``reference`` (what nothing
else runs, e.g. a bias that requires grad with ``return_lse``). A long call with dropout on the CPU
skips ``sdpa``, whose math path would materialize the probabilities (``_sdpa_dropout_why_not``).
An explicit ``impl`` never falls back: it raises with the backend's reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from ._validate import Call
from .ops import banded as _banded
from .ops import sdpa as _sdpa
from .ops import tiled as _tiled
from .ops import triton as _triton
from .ops.pattern import band_span, parse
from .ops.reference import reference_attention
from .ops.tiled import work_fraction

AUTO_ORDER = ("sdpa", "triton", "banded", "tiled", "reference")


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    why_not: Callable[[Call], str | None]
    run: Callable[[Call], tuple[Tensor, Tensor | None]]


def _reference_run(c: Call):
    return reference_attention(c.q, c.k, c.v, mask=c.mask, bias=c.bias, scale=c.scale, dropout_p=c.dropout_p,
                               softcap=c.softcap, dropout_seed=c.dropout_seed)


def _sdpa_run(c: Call):
    return _sdpa.sdpa_attention(c.q, c.k, c.v, mask=c.mask, bias=c.bias, scale=c.scale,
                                dropout_p=c.dropout_p, need_lse=c.need_lse)


def _tiled_why_not(c: Call) -> str | None:
    return _tiled.why_not(c.bias, c.dropout_p, c.softcap)


def _tiled_run(c: Call):
    return _tiled.tiled_attention(c.q, c.k, c.v, mask=c.mask, bias=c.bias, scale=c.scale, softcap=c.softcap,
                                  dropout_p=c.dropout_p, dropout_seed=c.dropout_seed)


def _banded_run(c: Call):
    return _banded.banded_attention(c.q, c.k, c.v, mask=c.mask, scale=c.scale, softcap=c.softcap,
                                    dropout_p=c.dropout_p, dropout_seed=c.dropout_seed)


def _triton_why_not(c: Call) -> str | None:
    return _triton.why_not(c.q, c.k, c.v, c.mask, c.bias, c.dropout_p, c.softcap)  # does not import triton


def _on_cuda(c: Call) -> bool:
    return c.q.device.type == "cuda"


def _triton_auto_why_not(c: Call) -> str | None:
    if not _on_cuda(c):
        return "auto uses the Triton kernels on CUDA devices only (on the CPU they run in Triton's interpreter)"
    return None


@dataclass(frozen=True)
class CudaCosts:
    """auto's cost model on CUDA, in seconds per call: host time plus the pairs a kernel computes
    at its rate. The rates are one H200's (2026-11-30, bf16, ../shared/anchors: SDPA's
    mem-efficient kernel ~120 TFLOP/s with a mask, the Triton kernels ~300); the host times and
    the mask's cost are estimates until ``benchmarks/gpu.py --issue14`` measures them on a lent GPU
    (no GPU was lent to issue 14). What matters is the shape: a small call goes to SDPA, whose host
    path is short; a long masked one to the kernels that skip the pairs the mask rules out."""

    sdpa_host_s: float = 20e-6
    triton_host_s: float = 80e-6
    sdpa_masked_flops: float = 120e12  # the mem-efficient kernel, which takes a materialized mask
    triton_flops: float = 300e12
    mask_bytes_per_s: float = 1e12  # building the bool mask (a few passes) and reading it


CUDA_COSTS = CudaCosts()


def _sdpa_masked_cost(c: Call) -> float:
    B, Hq, Nq, D = c.q.shape
    Nk = c.k.shape[2]
    return (CUDA_COSTS.sdpa_host_s + 4 * B * Hq * Nq * Nk * D / CUDA_COSTS.sdpa_masked_flops
            + B * Nq * Nk / CUDA_COSTS.mask_bytes_per_s)


def _sdpa_cuda_why_not(c: Call) -> str | None:
    """On CUDA a mask SDPA takes only materialized sends it to its mem-efficient kernel, which
    computes all Nq x Nk pairs and reads an Nq x Nk mask (FlashAttention and cuDNN take no mask);
    the Triton kernels read the mask's block plan, skip the tiles it rules out and mask only the
    partial ones, but cost more host time per call. ``CudaCosts`` decides; the tiles the kernels
    would visit are counted (from a cached plan, else from the tile kinds: no plan is built for
    the decision) only when SDPA's estimate is above the kernels' host time, the least they cost."""
    if c.q.shape[2] == 1:  # a decoding step: one row of a 128-row tile, a new Nk every call
        return None
    sdpa = _sdpa_masked_cost(c)
    if sdpa <= CUDA_COSTS.triton_host_s:
        return None  # small: SDPA whatever the plan would say (it is not built)
    from .ops import block_plan
    from .ops.triton.configs import default_blocks
    bm, bn = default_blocks(c.q.shape[-1], c.q.dtype)
    tiles = block_plan.visited_tiles(c.mask, c.q.shape[2], c.k.shape[2], bm, bn, c.q.device)  # builds no plan
    B, Hq, _, D = c.q.shape
    triton = CUDA_COSTS.triton_host_s + 4 * B * Hq * tiles * bm * bn * D / CUDA_COSTS.triton_flops
    if sdpa <= triton:
        return None
    return (f"mask {c.mask!r} needs materializing for torch SDPA (its mem-efficient kernel, all Nq x Nk pairs): "
            f"estimated {sdpa * 1e3:.3f} ms against {triton * 1e3:.3f} ms for the Triton kernels over the mask's "
            "block plan (auto's CUDA cost model, _dispatch.CudaCosts)")


def triton_config(c: Call) -> str:
    """The Triton kernels' config table row for this call (``configs.describe``): blocks, warps,
    stages, switches and where they were measured."""
    from .ops.block_plan import split_key_lengths
    from .ops.triton import configs
    return configs.describe(c.q.shape[-1], c.q.dtype, configs.mask_kind(split_key_lengths(c.mask)[0]))


def _triton_auto_cost_why_not(c: Call) -> str | None:
    """Why auto passes over the Triton kernels on CUDA for a call SDPA runs cheaper (the converse
    of ``_sdpa_cuda_why_not``)."""
    return ("a small call or a decoding step: torch SDPA's shorter host path costs less than the kernels' "
            "(auto's CUDA cost model, _dispatch.CudaCosts)")


def _triton_run(c: Call):
    from .ops.triton import op  # imports triton (~0.25 s) on the first call that runs it
    return op.run_checked(c.q, c.k, c.v, c.mask, c.bias, c.scale, softcap=c.softcap, dropout_p=c.dropout_p,
                          dropout_seed=c.dropout_seed)  # choose() ran why_not


MATERIALIZE_ELEMENTS = 1 << 24  # B*Hq*Nq*Nk from which a materializing path is "long" (64 MiB of float32)
BANDED_SPAN_LIMIT = 0.6  # auto takes banded while a query's window (+ one block) is <= 0.6 Nk
SMALL_PROBLEM = 1 << 19  # Nq * Nk below which sdpa's one dense call beats banded's set-up


def _banded_auto_why_not(c: Call) -> str | None:
    """Banded computes about (window span + one 64-row block) keys per query; past 0.6 Nk the dense
    paths do the same work in bigger matrices (measured 2026-11-23, CPU, H=12, D=64:
    N=4096 W=1024 banded 431 ms vs sdpa 852; N=2048 W=1024 banded 251 ms vs sdpa 201)."""
    span = band_span(parse(c.mask))
    if span + 64 > BANDED_SPAN_LIMIT * c.k.shape[2]:
        return (f"the window spans {span} keys plus one 64-row block = {span + 64} of Nk={c.k.shape[2]} keys; "
                f"auto prefers the dense paths past {BANDED_SPAN_LIMIT:.0%} of the keys")
    return None


def _sdpa_longformer_why_not(c: Call) -> str | None:
    """Why auto passes over sdpa for a mask banded runs well: SDPA computes all Nq x Nk pairs of a
    materialized mask (N=1024 W=256: sdpa 44 ms, banded 40; N=4096 W=256: 765 vs 166)."""
    if c.q.shape[2] * c.k.shape[2] < SMALL_PROBLEM:
        return None
    return (f"mask {c.mask!r} is a Longformer pattern: banded computes each query's window only, "
            "torch SDPA all Nq x Nk pairs of the materialized mask")


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", "textbook formula, materializes Nq x Nk; the test oracle",
                         lambda c: None, _reference_run),
    "sdpa": Backend("sdpa", "torch.nn.functional.scaled_dot_product_attention (flash/cuDNN/math)",
                    lambda c: _sdpa.why_not(c.q, c.k, c.v, c.mask, c.bias, c.dropout_p, c.need_lse, c.softcap),
                    _sdpa_run),
    "banded": Backend("banded", "Longformer: sliding window (+dilation) | global tokens & padding, O(N*W) "
                      "time and memory", lambda c: _banded.why_not(c.mask, c.bias, c.dropout_p, c.softcap),
                      _banded_run),
    "tiled": Backend("tiled", "FlashAttention-2 tiling in torch, skips masked-out tiles, O(N*block) memory",
                     _tiled_why_not, _tiled_run),
    "triton": Backend("triton", "fused Triton kernels (FlashAttention-2) over the mask's block plan, any mask, "
                      "ALiBi, GQA; CUDA (or TRITON_INTERPRET=1 on the CPU)", _triton_why_not, _triton_run),
}


def _sdpa_dropout_why_not(c: Call) -> str | None:
    """Why auto passes over sdpa for a long call with dropout on the CPU (``sdpa.drops_on_cpu``:
    torch's math path materializes the probabilities) while tiled, banded or the kernels can run
    it with the dropout mask drawn tile by tile."""
    B, Hq, Nq, Nk = c.q.shape[0], c.q.shape[1], c.q.shape[2], c.k.shape[2]
    if not _sdpa.drops_on_cpu(c.q, c.dropout_p) or B * Hq * Nq * Nk < MATERIALIZE_ELEMENTS:
        return None
    return (f"dropout_p={c.dropout_p} on the CPU: torch SDPA runs dropout only on its math path, which "
            f"materializes the (B, Hq, Nq, Nk) = ({B}, {Hq}, {Nq}, {Nk}) probabilities; auto prefers a backend "
            "that draws the dropout mask tile by tile")


def materializes(c: Call, name: str) -> bool:
    """Whether backend ``name`` builds an (Nq, Nk) matrix per sequence and head for this call."""
    return name == "reference" or (name == "sdpa" and (_sdpa.needs_materializing(c.q, c.k, c.mask)
                                                       or _sdpa.drops_on_cpu(c.q, c.dropout_p)))


def reasons(c: Call) -> dict[str, str | None]:
    """Each backend's reason it cannot run this call (None: it can)."""
    return {name: b.why_not(c) for name, b in BACKENDS.items()}


def auto_reasons(c: Call) -> dict[str, str | None]:
    """Like ``reasons``, plus why auto passes over a backend that could run but would be slow."""
    why = reasons(c)
    if why["triton"] is None:
        why["triton"] = _triton_auto_why_not(c)
    if all(why[name] is not None for name in ("triton", "banded", "tiled")):
        return why  # nothing skips the masked-out pairs: sdpa, even materializing, beats the reference
    if why["sdpa"] is None:
        why["sdpa"] = _sdpa_dropout_why_not(c)
    if why["sdpa"] is None and why["triton"] is None and _sdpa.needs_materializing(c.q, c.k, c.mask):
        why["sdpa"] = _sdpa_cuda_why_not(c)
        if why["sdpa"] is None:  # SDPA by the cost model: the CPU backends' rules below do not apply
            why["triton"] = _triton_auto_cost_why_not(c)
            return why
    if why["sdpa"] is None and _sdpa.needs_materializing(c.q, c.k, c.mask):
        why["sdpa"] = _sdpa.auto_why_not(
            c.q, c.k, c.mask, lambda: work_fraction(c.mask, c.bias, c.q.shape[2], c.k.shape[2], c.q.device))
    if why["banded"] is None:
        why["banded"] = _banded_auto_why_not(c)
    if why["banded"] is None and why["sdpa"] is None and _sdpa.needs_materializing(c.q, c.k, c.mask):
        why["sdpa"] = _sdpa_longformer_why_not(c)
    return why


def check_impl_name(impl: str) -> None:
    """Raise ValueError unless ``impl`` is "auto" or a backend's name."""
    if impl != "auto" and impl not in BACKENDS:
        raise ValueError(f"impl={impl!r} is not a backend; choose one of 'auto', "
                         + ", ".join(repr(n) for n in BACKENDS))


def choose(c: Call, impl: str) -> Backend:
    """The backend for ``impl`` (or the first capable one for "auto"); raises with reasons."""
    if impl == "auto":
        if BACKENDS["sdpa"].why_not(c) is None and not materializes(c, "sdpa"):
            return BACKENDS["sdpa"]  # first in AUTO_ORDER and nothing passes it over: the short path
        why = auto_reasons(c)
        for name in AUTO_ORDER:
            if why[name] is None:
                return BACKENDS[name]
        raise ValueError("no backend can run this call: " + "; ".join(f"{n}: {r}" for n, r in why.items()))
    check_impl_name(impl)
    reason = BACKENDS[impl].why_not(c)
    if reason is not None:
        raise ValueError(f"impl={impl!r} cannot run this call: {reason}")
    return BACKENDS[impl]
