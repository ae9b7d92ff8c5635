"""The public functional API: ``attention``, ``attention_weights``, ``explain``."""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import _compiled, _dispatch
from ._validate import _check_devices, _check_tensors, _normalize_bias, _normalize_mask, validate
from .bias import Bias
from .masks import Mask
from .ops import dropout as _dropout
from .ops import reference as _reference
from .ops import sdpa as _sdpa
from .ops.precision import compute_dtype, expand_kv


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | Tensor | None = None,
              bias: Bias | Tensor | None = None, scale: float | None = None, dropout_p: float = 0.0,
              impl: str = "auto", return_lse: bool = False,
              softcap: float | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Exact scaled dot-product attention ``softmax(q k^T * scale + bias) v`` under ``mask``.

    Args:
        q: (B, Hq, Nq, D) queries.
        k: (B, Hkv, Nk, D) keys; Hq must be a multiple of Hkv (GQA/MQA).
        v: (B, Hkv, Nk, Dv) values.
        mask: an attnkit mask (``ak.causal() & ak.sliding_window(128)``, ...) or a bool tensor
            broadcastable to (B, Hq, Nq, Nk); True = may attend.
        bias: additive float tensor broadcastable to (B, Hq, Nq, Nk), or a structured bias
            (``ak.alibi(slopes)``) that fast paths compute per tile.
        scale: score scale, default 1/sqrt(D).
        dropout_p: dropout on the attention probabilities (training), in [0, 1). The keep mask is a
            function of a seed drawn from torch's CPU generator and of (b, h, i, j) (Philox, as
            FlashAttention; ``attnkit.ops.dropout``): reference, tiled, banded and triton drop the
            same pairs for one seed, and ``torch.manual_seed`` makes a call reproducible. ``sdpa``
            uses torch's own dropout.
        impl: "auto", "reference", "sdpa", "tiled", "banded" or "triton". Explicit choices never fall back.
        return_lse: also return the log-sum-exp of the scores (natural log; before dropout).
        softcap: cap the scores at ±softcap: ``softcap * tanh(q k^T * scale / softcap)``, before
            the bias and the mask (Gemma 2's attention logit soft-capping, Gemma Team 2024). None: no cap.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype; with ``return_lse`` also lse (B, Hq, Nq) in float32
        (float64 for float64 inputs). A query that may attend to no key gets out = 0, lse = -inf.

    Raises:
        TypeError / ValueError: tensors, mask, bias or numbers that do not fit (the message says
            what was expected and what came); an explicit ``impl`` that cannot run the call.

    Under ``torch.compile`` a call with a structured mask or a bias becomes one opaque op, so
    ``fullgraph=True`` captures it (``attnkit._compiled``).
    """
    if torch.compiler.is_compiling() and _compiled.routes(mask, bias, scale, dropout_p, impl, softcap):
        return _compiled.attention_call(q, k, v, mask=mask, bias=bias, scale=scale, dropout_p=dropout_p,
                                        impl=impl, return_lse=return_lse, softcap=softcap)  # one op for dynamo
    call = validate(q, k, v, mask=mask, bias=bias, scale=scale, dropout_p=dropout_p, need_lse=return_lse,
                    softcap=softcap)
    if call.dropout_p > 0:
        call = dataclasses.replace(call, dropout_seed=_dropout.draw_seed())
    if q.shape[2] == 0 or k.shape[2] == 0:
        _dispatch.check_impl_name(impl)
        if impl != "auto":  # an explicit impl still refuses what it cannot run, with its reason
            _dispatch.choose(call, impl)
        out, lse = _empty_attention(call.q, call.k, call.v)
    else:
        backend = _dispatch.choose(call, impl)
        if impl == "auto":
            _warn_if_materializing(call, backend.name)
        out, lse = backend.run(call)
    if return_lse and call.lse_shift is not None:  # the rows validate shifted (bias.row_stabilized)
        lse = lse + _finite_in(call.lse_shift, lse.dtype)
    return (out, lse) if return_lse else out


def _finite_in(shift: Tensor, dtype: torch.dtype) -> Tensor:
    """The shift in the lse's dtype, saturated at its finite range: a float64 bias past float32's
    range would otherwise turn a row that sees keys into lse = -inf, the mark of a row that sees none."""
    info = torch.finfo(dtype)
    return shift.clamp(info.min, info.max).to(dtype)


class MaterializationWarning(UserWarning):
    """``impl="auto"`` ran a long call on a path that builds an (Nq, Nk) matrix per sequence and head."""


MATERIALIZE_WARN_ELEMENTS = _dispatch.MATERIALIZE_ELEMENTS  # B*Hq*Nq*Nk from which auto says so
_warned: set[tuple] = set()
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _warn_if_materializing(call, chosen: str) -> None:
    """Once per backend and set of refusals: auto could only run a long call on a path that builds
    Nq x Nk (the reference; sdpa with a materialized mask or with dropout on the CPU), because no
    backend that avoids it can run the call."""
    B, Hq, Nq, Nk = call.q.shape[0], call.q.shape[1], call.q.shape[2], call.k.shape[2]
    if B * Hq * Nq * Nk < MATERIALIZE_WARN_ELEMENTS or not _dispatch.materializes(call, chosen):
        return
    refused = {n: r for n, r in _dispatch.reasons(call).items() if r is not None and n != chosen}
    key = (chosen, tuple(sorted(refused.items())))
    if key in _warned:
        return
    _warned.add(key)
    what = ("score matrix" if chosen == "reference" else "probability matrix (torch SDPA's math path, for dropout)"
            if not _sdpa.needs_materializing(call.q, call.k, call.mask) else "bool mask for torch SDPA")
    warnings.warn(
        f"ak.attention(impl='auto') runs this call on {chosen!r}, which materializes a (B, Hq, Nq, Nk) = "
        f"({B}, {Hq}, {Nq}, {Nk}) {what}, because the backends that skip masked-out pairs cannot run it: "
        + "; ".join(f"{n}: {r}" for n, r in refused.items())
        + ". Shown once per reason; ak.explain(q, k, v, ...) lists every backend.",
        MaterializationWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The stacklevel of the first caller outside attnkit and torch (attnkit's nn modules call
    ak.attention through torch's Module.__call__)."""
    inside = (_PACKAGE_DIR + os.sep, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _empty_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Nq = 0: an empty output; Nk = 0: every query sees no key, so out = 0 and lse = -inf (the
    rule for a row with nothing to attend to), as torch's SDPA gives. Written as (q k^T) v over the
    empty dimension so that autograd gives q, k, v zero gradients of their own shapes."""
    empty = q @ expand_kv(k, q.shape[1]).transpose(-1, -2)  # (B, Hq, Nq, Nk), one dim 0
    out = empty @ expand_kv(v, q.shape[1])  # (B, Hq, Nq, Dv): zeros, or nothing
    lse = torch.full(q.shape[:3], float("-inf"), dtype=compute_dtype(q.dtype), device=q.device)
    return out, lse


def attention_weights(q: Tensor, k: Tensor, v: Tensor | None = None, *, mask: Mask | Tensor | None = None,
                      bias: Bias | Tensor | None = None, scale: float | None = None,
                      rows: Sequence[int] | Tensor | None = None, num_queries: int | None = None,
                      softcap: float | None = None) -> Tensor:
    """The attention probabilities (B, Hq, Nq, Nk) from the reference path (materialized).

    ``v`` is only used for shape checks and may be None. Rows that may attend nowhere are 0.

    ``rows``: the positions, among ``num_queries`` queries (default Nk: self-attention), of the
    Nq rows q holds. Without it q's rows are the *last* Nq queries (bottom-right alignment, what a
    KV cache needs), so ``attention_weights(q[:, :, :16], k, mask=ak.causal())`` is the causal
    map of the last 16 positions; ``rows=range(16)`` gives the first 16. The mask and bias are
    checked against, and evaluated on, the full (num_queries, Nk) problem.

    Raises:
        ValueError: rows not of length Nq, outside [0, num_queries), or num_queries < 1; the
            errors of ``ak.attention`` for the tensors, mask and bias.
    """
    v_check = v if v is not None else k
    if rows is not None or num_queries is not None:
        mask, bias = _on_rows(q, k, mask, bias, rows, num_queries)
    call = validate(q, k, v_check, mask=mask, bias=bias, scale=scale, softcap=softcap)
    if q.shape[2] == 0 or k.shape[2] == 0:  # nothing to normalize: an empty map
        return q.new_zeros(*q.shape[:3], k.shape[2])
    return _reference.attention_weights(call.q, call.k, call.mask, call.bias, call.scale, call.softcap).to(q.dtype)


def _positions(rows) -> Tensor:
    """rows as a 1-D int64 tensor; anything but integers (floats, bools) is refused."""
    t = torch.as_tensor(list(rows) if isinstance(rows, range) else rows)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"rows must be integer positions (a list, range or integer tensor), got dtype {t.dtype}")
    return t.long().flatten()


def _on_rows(q: Tensor, k: Tensor, mask, bias, rows, num_queries) -> tuple[Tensor | None, Tensor | None]:
    """The mask and bias of the full (num_queries, Nk) problem evaluated on ``rows``: dense
    (Bm, Hm, Nq, Nk) bool and float tensors."""
    _check_tensors(q, k, k)
    Nq, Nk = q.shape[2], k.shape[2]
    total = Nk if num_queries is None else num_queries
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"num_queries must be an int >= 1 (the full query count rows index into), got {total!r}")
    idx = torch.arange(total - Nq, total) if rows is None else _positions(rows)  # default: the last Nq
    if idx.numel() != Nq:
        raise ValueError(f"rows has {idx.numel()} positions but q holds Nq={Nq} rows; give one position per row")
    if Nq and (int(idx.min()) < 0 or int(idx.max()) >= total):
        raise ValueError(f"rows must lie in [0, num_queries={total}), got min={int(idx.min())} max={int(idx.max())}")
    idx, cols = idx.to(q.device), torch.arange(Nk, device=q.device)
    B, Hq = q.shape[:2]
    mask_n, bias_n = _normalize_mask(mask), _normalize_bias(bias, q)
    _check_devices(q, mask_n, bias_n)
    if mask_n is not None:
        mask_n.check(B, Hq, total, Nk)
    if bias_n is not None:
        bias_n.check(B, Hq, total, Nk)
    return (None if mask_n is None else mask_n.evaluate(idx, cols, total, Nk),
            None if bias_n is None else bias_n.evaluate(idx, cols, total, Nk))


@dataclass(frozen=True)
class Explanation:
    """What ``impl="auto"`` would pick for a call and why it passes over each other backend.

    ``reasons[name]`` is None for the backend auto may take, else why auto does not take it;
    ``runnable[name]`` says whether ``impl=name`` would run the call anyway (auto passed over it
    as slower) or refuse it.
    """

    chosen: str
    reasons: dict[str, str | None]
    shape: dict[str, int]
    runnable: dict[str, bool]
    triton_config: str | None = None  # the kernels' config row where impl="triton" can run the call

    def __str__(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.shape.items())
        lines = [f"call: {dims}", f"auto picks: {self.chosen}"]
        for name, reason in self.reasons.items():
            mark = "yes " if reason is None else "skip" if self.runnable[name] else "no  "
            lines.append(f"  {name:<10} {mark}  {_dispatch.BACKENDS[name].summary}")
            if reason is not None and self.runnable[name]:
                lines.append(f"  {'':<10}       auto passes over it: {reason} (impl={name!r} runs it)")
            elif reason is not None:
                lines.append(f"  {'':<10}       why not: {reason}")
            if name == "triton" and self.triton_config is not None:
                lines.append(f"  {'':<10}       config: {self.triton_config}")
        return "\n".join(lines)


def backends() -> dict[str, str]:
    """Every backend ``impl`` can name, with a one-line summary, in auto's order of preference."""
    return {name: _dispatch.BACKENDS[name].summary for name in _dispatch.AUTO_ORDER}


def explain(q: Tensor, k: Tensor, v: Tensor, *, mask=None, bias=None, scale=None, dropout_p=0.0,
            return_lse: bool = False, softcap: float | None = None) -> Explanation:
    """List every backend with whether it can run this call and why not; prints nicely."""
    call = validate(q, k, v, mask=mask, bias=bias, scale=scale, dropout_p=dropout_p, need_lse=return_lse,
                    softcap=softcap)
    runnable = {name: reason is None for name, reason in _dispatch.reasons(call).items()}
    config = _dispatch.triton_config(call) if runnable["triton"] else None
    return Explanation(_dispatch.choose(call, "auto").name, _dispatch.auto_reasons(call), call.shape, runnable, config)

