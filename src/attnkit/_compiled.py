"""``ak.attention`` under ``torch.compile``: the whole call as one opaque custom op.

What. While dynamo traces (``torch.compiler.is_compiling()``), ``ak.attention`` hands calls with
structured masks or biases to ``attention_call`` here, which puts the call into the graph as one
``torch.library`` op, ``attnkit::attention_call``. Its inputs are q, k, v, the flat list of the
tensors found inside the mask and the bias (and a tensor scale or dropout_p), scale and
dropout_p as floats otherwise, and a *spec*: a string (JSON) that describes the mask and bias
trees (each node's class and scalar fields, and which list entry each tensor is). At run time
the op rebuilds the mask and bias from spec and tensors and calls the ordinary eager
``ak.attention``, so validation, dispatch, plan caches and every backend run unchanged, on real
tensors.

Why. Validation and the backends do data-dependent Python work: ``int()`` / ``bool()`` on
tensors (index bounds, NaN checks, huge-bias rows), Python loops over blocks, caches keyed by
tensor identity. Traced by dynamo each of those is a graph break (torch 2.13, B=2, H=2, N=48:
9 for a sliding_window | global_tokens mask, 2 for key padding, 4 for ALiBi; issue 14 counted
22, 5 and 6), and ``fullgraph=True`` refuses the function. Making every path traceable would
mean rewriting each backend; behind one opaque op dynamo sees a call whose output shapes
``register_fake`` gives, and nothing else. The spec is a string because custom ops take
strings but not arbitrary Python objects; dynamo treats it as a constant, so a new mask
*structure* (another class, another window size) recompiles while a new mask object of the same
structure with new tensors (lengths, document ids) reuses the compiled graph.

Which calls. ``routes`` keeps inline the calls that trace into one graph already (no mask or
``causal()``, no bias, impl "auto" / "sdpa" / "reference", no tensor scale or dropout_p):
inductor sees torch's SDPA there and their backward needs no recompute. Everything else goes
through the op, impl="triton" too (its kernels are their own custom op, called from inside this
one).

Gradients. ``register_autograd`` gives q, k, v and every floating tensor of the bias that
requires grad (a dense bias, ALiBi slopes) their gradient through a second op,
``attnkit::attention_call_backward``, which re-runs the eager call with autograd recording on
detached copies and calls ``torch.autograd.grad`` with (dout, dlse). That costs one extra
forward per backward (no autograd graph survives an op boundary, so there is nothing to reuse).
A custom op's kernel runs below autograd, so the recompute lifts that exclusion for its body
with ``torch._C._ForceDispatchKeyGuard`` (private; torch's own ``invoke_leaf_function`` does
the same). The forward op runs the eager call with the traced grad mode and with leaves that
require grad where the traced inputs did (``grad_idx``), recording nothing, so it picks the
backend eager would pick and the recompute will pick (``impl="tiled"`` refuses a bias that
requires grad in both). The spec carries a hash of this module's source, so that torch's on-disk
compile caches (keyed by the graph, not by a custom op's Python) miss after this module changes.

Dropout. ``dropout_p > 0`` is supported and reproducible: the forward op draws a seed from the
CPU generator (so ``torch.manual_seed`` before a call fixes the result, as in eager), runs the
call with the device's generator seeded by it (and restored afterwards), and returns the seed as
a third output that the backward's recompute reuses, so forward and backward drop the same
probabilities. The dropout pattern differs from an eager call's under the same global seed.

Limits. A mask or bias built *inside* the compiled function must come from constructors that
read no tensor values: ``causal``, ``sliding_window``, ``key_padding(bool valid)``,
``document``, ``dense_mask`` and ``&``, ``|``, ``~`` are fine; ``key_padding(lengths)``,
``global_tokens(...)`` and ``alibi(...)`` check their tensors' values when built and break the
graph there (build them outside, or pass them in). Float fields of a user's mask class must be
constants (dynamo cannot write a symbolic float into the spec).

Legend: B batch, Hq / Hkv query / key-value heads, Nq / Nk queries / keys, D / Dv head dims.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import math
import operator
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from .bias import Bias
from .masks import Causal, Mask
from .ops.precision import compute_dtype

INLINE_IMPLS = ("auto", "sdpa", "reference")  # impls that trace into one graph for causal / no mask


def _source_version() -> str:
    """A hash of this module's source, written into every spec. torch's on-disk FX-graph and
    AOTAutograd caches key a compiled graph by the graph (the spec is one of its constants), not by
    the Python of a custom op's fake kernel or backward formula: without it, after this module
    changes they serve graphs traced with the old ones (seen: a stale stride assertion)."""
    try:
        with open(__file__, "rb") as source:
            return hashlib.sha256(source.read()).hexdigest()[:16]
    except OSError:
        return "unknown"


SOURCE_VERSION = _source_version()


def routes(mask: object, bias: object, scale: object, dropout_p: object, impl: object, softcap: object = None) -> bool:
    """True when a call that dynamo traces should go through the custom op (``ak.attention``
    asks at its top): every call but those with no mask or ``causal()``, no bias, scale and
    dropout_p that are not tensors and impl auto, sdpa or reference, which trace into one graph
    without breaks (and there inductor sees torch's SDPA)."""
    simple_mask = mask is None or type(mask) is Causal
    plain_numbers = not isinstance(scale, Tensor) and not isinstance(dropout_p, Tensor)
    return not (simple_mask and bias is None and softcap is None and plain_numbers and impl in INLINE_IMPLS)


# -- the spec: mask / bias trees as a string ------------------------------------------------------
# A node is JSON: null, true/false, an int, a float, {"t": i} (tensor i of the list), {"l": [...]}
# (a tuple), or {"c": "module:qualname", "f": {field: node}} (a Mask or Bias dataclass). The encoder
# uses string operations only, which dynamo folds into a constant (it does not trace json.dumps);
# ints go through operator.index, which makes dynamo specialize an int it had made symbolic (a
# window that changed between calls) instead of failing on str(); the decoder runs inside the op,
# eagerly, with json.


class _Encoder:
    """Walks a mask / bias, collecting its tensors and writing its spec node."""

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []

    def node(self, x: object, where: str) -> str:
        if x is None:
            return "null"
        if isinstance(x, Tensor):
            self.tensors.append(x)
            return '{"t": ' + str(len(self.tensors) - 1) + "}"
        if isinstance(x, bool):
            return "true" if x else "false"
        if isinstance(x, int):
            return str(operator.index(x))
        if isinstance(x, float):  # attnkit's masks and biases hold none; a user's must be a constant
            return str(x) if math.isfinite(x) else "NaN" if math.isnan(x) else "Infinity" if x > 0 else "-Infinity"
        if isinstance(x, tuple):
            return '{"l": [' + ", ".join([self.node(item, where) for item in x]) + "]}"
        if isinstance(x, (Mask, Bias)):
            return self._structure(x, where)
        raise TypeError(f"ak.attention under torch.compile: {where} holds a {type(x).__name__}, which the compiled "
                        "call cannot pass to its op; expected None, a bool, int, float, tuple of them, tensor or "
                        "attnkit mask/bias. Build masks and biases from attnkit's constructors, or call "
                        "ak.attention outside the compiled region")

    def _structure(self, x: Mask | Bias, where: str) -> str:
        cls = type(x)
        if not dataclasses.is_dataclass(cls) or "<" in cls.__qualname__:
            raise TypeError(f"ak.attention under torch.compile: {where} is a {cls.__qualname__}, which is not a "
                            "module-level dataclass, so the compiled call cannot rebuild it from its fields; expected "
                            "attnkit's masks and biases, or a dataclass subclass of Mask / Bias defined at module "
                            "level. Make it one, or call ak.attention outside the compiled region")
        fields = [f.name for f in dataclasses.fields(x) if f.init]
        items = ['"' + f + '": ' + self.node(getattr(x, f), where + "." + f) for f in fields]
        return '{"c": "' + cls.__module__ + ":" + cls.__qualname__ + '", "f": {' + ", ".join(items) + "}}"


def encode(mask: object, bias: object, scale: object = None, dropout_p: object = None,
           softcap: object = None) -> tuple[str, list[Tensor]]:
    """The spec of (mask, bias, softcap) and of scale / dropout_p where those are tensors (else
    null: they travel as the op's float arguments), and the tensors the spec refers to, in order.

    Raises:
        TypeError: a part the spec cannot describe (a Mask / Bias that is not a module-level
            dataclass, a field of another type), named by its class and field.
    """
    enc = _Encoder()
    parts = [("mask", mask), ("bias", bias), ("scale", scale if isinstance(scale, Tensor) else None),
             ("dropout_p", dropout_p if isinstance(dropout_p, Tensor) else None), ("softcap", softcap)]
    body = ", ".join(['"' + key + '": ' + enc.node(value, key) for key, value in parts])
    return '{"version": "' + SOURCE_VERSION + '", ' + body + "}", enc.tensors


def _find_class(name: str) -> type:
    module, _, qualname = name.partition(":")
    obj: object = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, (Mask, Bias)) and dataclasses.is_dataclass(obj)):
        raise TypeError(f"attnkit::attention_call spec names {name!r}, which is not a Mask or Bias dataclass")
    return obj


def _decode(node: object, tensors: list[Tensor]) -> object:
    if isinstance(node, dict) and "t" in node:
        return tensors[node["t"]]
    if isinstance(node, dict) and "l" in node:
        return tuple(_decode(item, tensors) for item in node["l"])
    if isinstance(node, dict):
        cls = _find_class(node["c"])
        return cls(**{field: _decode(value, tensors) for field, value in node["f"].items()})
    return node


@functools.lru_cache(maxsize=256)
def _parse(spec: str) -> dict:
    return json.loads(spec)


def decode(spec: str, tensors: list[Tensor]) -> dict[str, object]:
    """The mask, bias, scale and dropout_p that ``encode`` described, rebuilt on ``tensors``
    (scale and dropout_p: None where they were not tensors)."""
    return {key: _decode(node, tensors) for key, node in _parse(spec).items() if key != "version"}


# -- the ops --------------------------------------------------------------------------------------

@contextmanager
def _seeded(device: torch.device, seed: int | None) -> Iterator[None]:
    """Run with ``device``'s generator and the CPU one (where attnkit's own dropout draws its Philox
    seed, ``ops/dropout.py``) seeded by ``seed`` (None: untouched), restored afterwards."""
    if seed is None:
        yield
        return
    gens = [torch.default_generator]
    if device.type == "cuda":
        gens.append(torch.cuda.default_generators[device.index or 0])
    states = [gen.get_state() for gen in gens]
    for gen in gens:
        gen.manual_seed(seed)
    try:
        yield
    finally:
        for gen, state in zip(gens, states):
            gen.set_state(state)


@contextmanager
def _autograd_recording() -> Iterator[None]:
    """Autograd on inside a custom op's kernel. The dispatcher runs a custom op's kernels below
    autograd (its keys are in the thread's exclude set, so nothing records a graph even under
    ``torch.enable_grad()``); the backward's recompute needs a graph, so it lifts that exclusion
    for its own body, as torch's ``invoke_leaf_function`` does, and restores it on exit."""
    keys = torch._C.DispatchKey
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor, keys.ADInplaceOrView):
        if excluded.has(key):
            excluded = excluded.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded), torch.enable_grad():
        yield


def _call_args(spec: str, tensors: list[Tensor], scale: float | None, dropout_p: float) -> dict[str, object]:
    """ak.attention's mask, bias, scale and dropout_p for the op's inputs."""
    args = decode(spec, tensors)
    args["scale"] = scale if args["scale"] is None else args["scale"]
    args["dropout_p"] = dropout_p if args["dropout_p"] is None else args["dropout_p"]
    return args


def _drops(args: dict[str, object]) -> bool:
    return float(args["dropout_p"]) > 0.0


def _eager(q: Tensor, k: Tensor, v: Tensor, args: dict[str, object], impl: str, return_lse: bool,
           seed: int | None) -> tuple[Tensor, Tensor]:
    """The eager ``ak.attention`` call: (out, lse); lse is (0,) without return_lse."""
    from .functional import attention  # functional imports this module
    with _seeded(q.device, seed):
        result = attention(q, k, v, impl=impl, return_lse=return_lse, **args)
    out, lse = result if return_lse else (result, q.new_empty((0,)))
    return out, lse.to(compute_dtype(q.dtype))


def _leaves(tensors: list[Tensor], grad_idx: list[int]) -> list[Tensor]:
    """Detached copies; those at ``grad_idx`` require grad (so dispatch sees what eager saw)."""
    want = set(grad_idx)
    return [t.detach().requires_grad_(i in want) for i, t in enumerate(tensors)]


def _fresh(t: Tensor, inputs: list[Tensor]) -> Tensor:
    """``t`` contiguous and sharing memory with no input (a custom op's outputs may not alias)."""
    t = t.detach().contiguous()
    ptr = t.untyped_storage().data_ptr()
    return t.clone() if any(x.untyped_storage().data_ptr() == ptr for x in inputs) else t


# The ops' arguments after q, k, v: the tensors of the mask / bias / scale / dropout_p (``encode``),
# the spec, scale and dropout_p when they are not tensors, impl, return_lse, and ``grad_idx``: the
# indices into [q, k, v, *tensors] of the floating inputs that required grad when the call was traced.

@torch.library.custom_op("attnkit::attention_call", mutates_args=())
def _attention_call(q: Tensor, k: Tensor, v: Tensor, tensors: list[Tensor], spec: str, scale: float | None,
                    dropout_p: float, impl: str, return_lse: bool, grad_enabled: bool,
                    grad_idx: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """out (B, Hq, Nq, Dv); lse (B, Hq, Nq), or (0,) without return_lse; seed () int64 (0: no dropout).

    Runs with the caller's grad mode and leaves that require grad where the traced inputs did, so
    that dispatch decides as eager would; nothing records a graph (custom-op kernels run below
    autograd)."""
    inputs = [q, k, v, *tensors]
    leaves = _leaves(inputs, grad_idx if grad_enabled else [])
    args = _call_args(spec, leaves[3:], scale, dropout_p)
    seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64)) if _drops(args) else None
    with torch.set_grad_enabled(grad_enabled):
        out, lse = _eager(*leaves[:3], args, impl, return_lse, seed)
    # on q's device (a CUDA graph takes no CPU output); without dropout no host value is copied
    seed_t = q.new_zeros((), dtype=torch.int64) if seed is None else torch.tensor(seed, device=q.device)
    return _fresh(out, inputs), _fresh(lse, inputs), seed_t


@_attention_call.register_fake
def _(q, k, v, tensors, spec, scale, dropout_p, impl, return_lse, grad_enabled, grad_idx):
    B, Hq, Nq, _ = q.shape
    out = q.new_empty((B, Hq, Nq, v.shape[-1]))
    lse = q.new_empty((B, Hq, Nq) if return_lse else (0,), dtype=compute_dtype(q.dtype))
    return out, lse, q.new_empty((), dtype=torch.int64)


@torch.library.custom_op("attnkit::attention_call_backward", mutates_args=())
def _attention_call_backward(q: Tensor, k: Tensor, v: Tensor, tensors: list[Tensor], spec: str, scale: float | None,
                             dropout_p: float, impl: str, return_lse: bool, grad_idx: list[int], seed: Tensor,
                             dout: Tensor, dlse: Tensor | None) -> list[Tensor]:
    """The gradients of [q, k, v, *tensors][i] for i in grad_idx: the forward re-run with autograd
    recording (the same seed, so the same dropout) and ``torch.autograd.grad`` with (dout, dlse);
    dlse is None without return_lse (autograd hands zeros, not None, for an output a loss skips)."""
    inputs = [q, k, v, *tensors]
    leaves = _leaves(inputs, grad_idx)
    args = _call_args(spec, leaves[3:], scale, dropout_p)
    wanted = [leaves[i] for i in grad_idx]
    with _autograd_recording():
        out, lse = _eager(*leaves[:3], args, impl, return_lse, int(seed) if _drops(args) else None)
        pairs = [(out, dout)] + ([(lse, dlse)] if return_lse and dlse is not None else [])
        pairs = [(t, g.to(t.dtype)) for t, g in pairs if t.requires_grad]
        found = torch.autograd.grad([t for t, _ in pairs], wanted, [g for _, g in pairs],
                                    allow_unused=True) if pairs else [None] * len(wanted)
    return [x.new_zeros(x.shape) if g is None else _fresh(g, inputs) for x, g in zip(wanted, found)]


@_attention_call_backward.register_fake
def _(q, k, v, tensors, spec, scale, dropout_p, impl, return_lse, grad_idx, seed, dout, dlse):
    inputs = [q, k, v, *tensors]
    return [inputs[i].new_empty(inputs[i].shape) for i in grad_idx]  # contiguous, as _fresh makes them


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, tensors, spec, scale, dropout_p, impl, return_lse, grad_enabled, grad_idx = inputs
    ctx.save_for_backward(q, k, v, *tensors, output[2])
    ctx.config = (spec, scale, dropout_p, impl, return_lse, list(grad_idx))
    ctx.n_tensors = len(tensors)


def _backward(ctx, dout, dlse, dseed):
    q, k, v, *tensors, seed = ctx.saved_tensors
    spec, scale, dropout_p, impl, return_lse, grad_idx = ctx.config
    found = _attention_call_backward(q, k, v, tensors, spec, scale, dropout_p, impl, return_lse, grad_idx, seed,
                                     dout, dlse if return_lse else None)
    grads: list[Tensor | None] = [None] * (3 + ctx.n_tensors)
    for i, g in zip(grad_idx, found):
        grads[i] = g
    # one gradient per op input: q, k, v, the tensor list, then the 7 non-tensor arguments
    return (grads[0], grads[1], grads[2], grads[3:]) + (None,) * 7


_attention_call.register_autograd(_backward, setup_context=_setup_context)


def _real_or_tensor(name: str, x: object) -> float | None:
    """scale / dropout_p as the op's float argument: None and tensors (which travel in the spec's
    tensor list) give None; anything else must be a real number, as eager's validation says."""
    if x is None or isinstance(x, Tensor):
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{name} must be a real number (int, float or one-element tensor) under torch.compile, "
                         f"got {type(x).__name__}; pass float({name})")
    return float(x)


def attention_call(q: Tensor, k: Tensor, v: Tensor, *, mask: object, bias: object, scale: object,
                   dropout_p: object, impl: str, return_lse: bool,
                   softcap: object = None) -> Tensor | tuple[Tensor, Tensor]:
    """``ak.attention`` as one ``attnkit::attention_call`` node (see the module docstring).

    Args: as ``ak.attention``: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), mask,
    bias, scale, dropout_p, impl, return_lse, softcap.

    Returns:
        out (B, Hq, Nq, Dv) in q's dtype; with ``return_lse`` also lse (B, Hq, Nq) in float32
        (float64 for float64 inputs).

    Raises:
        TypeError / ValueError: while tracing, q, k, v that ``ak.attention`` refuses, a scale or
            dropout_p that is no real number, a mask or bias part the spec cannot describe; at
            run time, every error of the eager ``ak.attention`` (from inside the compiled function).
    """
    from ._validate import _check_tensors
    _check_tensors(q, k, v)  # shapes and dtypes, so that the fake outputs are well formed
    spec, tensors = encode(mask, bias, scale, dropout_p, softcap)
    scale_f = _real_or_tensor("scale", scale)
    dropout_f = _real_or_tensor("dropout_p", dropout_p)
    grad_enabled = torch.is_grad_enabled()
    grad_idx = [i for i, t in enumerate([q, k, v, *tensors]) if t.is_floating_point() and t.requires_grad]
    out, lse, _ = _attention_call(q, k, v, tensors, spec, scale_f, 0.0 if dropout_f is None else dropout_f, impl,
                                  bool(return_lse), grad_enabled, grad_idx)
    return (out, lse) if return_lse else out
