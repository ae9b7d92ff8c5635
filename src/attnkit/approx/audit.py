"""What each approximation would cost on *your* model, before you swap it in: ``audit(model, inputs)``.

    report = attnkit.approx.audit(model, ids)          # one forward pass, then every method per layer
    print(report.table())                              # markdown: error, time, memory vs exact
    report.per_head("performer F=256")                 # per head errors of one method
    attnkit.viz.plot.plot_audit(report, "audit.png")   # error per layer and method, head spread

The model runs once (no grad). Every attention call it makes is recorded with its real q, k, v,
mask, bias, scale and softcap: attnkit ``nn.MultiHeadAttention`` layers without a core (through
their ``observers``) and every call of a Hugging Face transformers model built with
``attn_implementation="attnkit"`` (through ``attnkit.integrations.transformers.observing``). Then,
per call, exact attention ``softmax(q k^T * scale + bias) v`` (Vaswani et al. 2017, eq. 1; as
``ak.attention``) is the reference, and each approximate core runs on the same q, k, v, mask and
scale. Reported per layer and head: relative L2 error ||A - E|| / ||E|| over (B, Nq, Dv), max |A - E|,
mean cosine similarity of the output rows; per layer and method: the median time of ``repeats`` calls
and the peak bytes of the tensors one call allocates (``_peak.measure_peak``), the exact call
measured the same way.

A core sees what it would see inside ``MultiHeadAttention(core=...)``: the layer's dtype, the mask,
and the scale (``None`` when the layer's scale is the default 1/sqrt(D), which every core takes as
its default: ``LinearAttention`` has no scale and refuses an explicit one). The reference is computed
in float32 (float64 for a float64 model), so the "exact" row shows the layer's own rounding error.
A core cannot add a bias (ALiBi, T5, a float mask) or a softcap: such a layer is refused for every
method, with the reason, as is any call a core refuses itself (a ``ValueError``: causal Linformer /
Nyström, a mask other than causal & key_padding, ...).

Legend: B batch, Hq / Hkv query / kv heads, Nq / Nk queries / keys, D head dim, Dv value dim.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..functional import attention
from ..nn.attention import MultiHeadAttention
from ._peak import measure_peak
from .linear import LinearAttention

EXACT = "exact"  # the method name of the reference rows
HF_IMPLEMENTATION = "attnkit"
Core = Callable[..., Tensor]  # forward(q, k, v, *, mask=None, scale=None, cache=None) -> (B, Hq, Nq, Dv)


@dataclass(frozen=True)
class RecordedCall:
    """One attention call of the audited model: references to its tensors, nothing copied.

    q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) after RoPE and the KV cache."""

    name: str
    q: Tensor
    k: Tensor
    v: Tensor
    mask: object
    bias: object
    scale: float | None
    softcap: float | None


@dataclass(frozen=True)
class AuditRow:
    """One method on one recorded call. Per head (Hq entries): ``rel_l2`` ||A - E|| / ||E|| over
    (B, Nq, Dv), ``max_abs`` max |A - E|, ``cosine`` the mean over output rows of cos(A_row, E_row)
    (rows whose exact output is 0, e.g. fully masked, left out). ``seconds`` median wall time of one
    call, ``peak_bytes`` the peak of the tensors one call allocates; ``exact_*`` the same for exact
    attention on this call. ``refused``: the reason the method could not run here (numbers empty).
    ``shape`` is (B, Hq, Hkv, Nq, Nk, D, Dv)."""

    layer: str
    method: str
    shape: tuple[int, ...]
    mask: str
    rel_l2: tuple[float, ...] = ()
    max_abs: tuple[float, ...] = ()
    cosine: tuple[float, ...] = ()
    seconds: float | None = None
    peak_bytes: int | None = None
    exact_seconds: float | None = None
    exact_peak_bytes: int | None = None
    refused: str | None = None

    @property
    def mean_rel_l2(self) -> float:
        return sum(self.rel_l2) / len(self.rel_l2) if self.rel_l2 else math.nan

    @property
    def worst_head(self) -> int | None:
        """The head with the largest relative error (None when refused)."""
        if not self.rel_l2:
            return None
        return max(range(len(self.rel_l2)), key=lambda h: (not math.isnan(self.rel_l2[h]), self.rel_l2[h]))

    @property
    def max_abs_error(self) -> float:
        return max(self.max_abs) if self.max_abs else math.nan

    @property
    def mean_cosine(self) -> float:
        return sum(self.cosine) / len(self.cosine) if self.cosine else math.nan

    @property
    def time_ratio(self) -> float:
        """seconds / exact_seconds (nan when refused)."""
        return _ratio(self.seconds, self.exact_seconds)

    @property
    def memory_ratio(self) -> float:
        """peak_bytes / exact_peak_bytes (nan when refused or when exact allocated nothing)."""
        return _ratio(self.peak_bytes, self.exact_peak_bytes)


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else math.nan


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _finite_or_none(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (tuple, list)):
        return [_finite_or_none(y) for y in x]
    return x


@dataclass(frozen=True)
class AuditReport:
    """The result of ``audit``: ``rows`` (one ``AuditRow`` per recorded call and method, the "exact"
    row first), ``methods`` in order, ``notes`` (what the numbers mean for the default methods),
    the device, dtype and repeats they were measured with."""

    rows: tuple[AuditRow, ...]
    methods: tuple[str, ...]
    notes: tuple[str, ...]
    device: str
    dtype: str
    repeats: int

    @property
    def layers(self) -> list[str]:
        """The recorded calls' names, in call order."""
        return list(dict.fromkeys(row.layer for row in self.rows))

    def row(self, layer: str, method: str) -> AuditRow:
        """Raises: KeyError: no such layer / method (the message lists them)."""
        for r in self.rows:
            if r.layer == layer and r.method == method:
                return r
        raise KeyError(f"no row for layer {layer!r}, method {method!r}; layers {self.layers}, methods "
                       f"{list(self.methods)}")

    def per_head(self, method: str) -> dict[str, dict[str, tuple[float, ...]]]:
        """{layer: {"rel_l2": (Hq,), "max_abs": (Hq,), "cosine": (Hq,)}} for the layers where
        ``method`` ran (refused layers left out).

        Raises:
            KeyError: an unknown method (the message lists the known ones).
        """
        if method not in self.methods:
            raise KeyError(f"unknown method {method!r}; this report has {list(self.methods)}")
        return {r.layer: {"rel_l2": r.rel_l2, "max_abs": r.max_abs, "cosine": r.cosine}
                for r in self.rows if r.method == method and r.refused is None}

    def table(self) -> str:
        """A markdown table: per layer and method the mean relative L2 error over heads, the worst
        head, max abs error, mean cosine, time (ms) and peak memory (MB), each with its ratio to
        exact; a refused method shows its reason."""
        head = ("| layer | method | rel L2 (mean over heads) | worst head | max abs | cosine | time ms | "
                "x exact | peak MB | x exact |")
        lines = [head, "|" + "---|" * 10]
        for r in self.rows:
            name = r.layer.replace("|", "\\|")
            if r.refused is not None:
                reason = " ".join(r.refused.split()).replace("|", "\\|")
                lines.append(f"| {name} | {r.method} | refused: {reason} |  |  |  |  |  |  |  |")
                continue
            worst = r.worst_head
            worst_s = "-" if worst is None else f"{worst}: {_fmt(r.rel_l2[worst])}"
            mb = None if r.peak_bytes is None else r.peak_bytes / 2**20
            lines.append(f"| {name} | {r.method} | {_fmt(r.mean_rel_l2)} | {worst_s} | {_fmt(r.max_abs_error)} | "
                         f"{_fmt(r.mean_cosine, '.6f')} | {_fmt(None if r.seconds is None else 1e3 * r.seconds)} | "
                         f"{_fmt(r.time_ratio, '.2f')} | {_fmt(mb)} | {_fmt(r.memory_ratio, '.2f')} |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain data (lists, numbers, strings); non-finite numbers become None."""
        rows = [{k: _finite_or_none(v) for k, v in asdict(r).items()} for r in self.rows]
        return {"device": self.device, "dtype": self.dtype, "repeats": self.repeats, "methods": list(self.methods),
                "notes": list(self.notes), "rows": rows}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        header = f"attention audit: {len(self.layers)} calls, {self.device}, {self.dtype}, median of {self.repeats}"
        return "\n".join([header, "", self.table(), ""] + [f"- {note}" for note in self.notes])


# -- recording -----------------------------------------------------------------------------------------


def _transformers_model_inside(model: nn.Module) -> bool:
    """Whether ``model`` holds a transformers ``PreTrainedModel`` (never imports transformers: a
    model of it exists only if it is imported already)."""
    transformers = sys.modules.get("transformers")
    base = getattr(transformers, "PreTrainedModel", None)
    return base is not None and any(isinstance(m, base) for m in model.modules())


def _nothing_recorded(model: nn.Module, layers: int, cores: int, hf: bool) -> ValueError:
    found = (f"it has {layers} exact attnkit MultiHeadAttention layer(s) but none was called" if layers else
             "it has no attnkit MultiHeadAttention layer without a core" +
             (f" ({cores} already run an approximate core)" if cores else ""))
    hf_note = (" Its transformers model made no attention call through 'attnkit': build it with "
               f"attn_implementation={HF_IMPLEMENTATION!r} (import attnkit.integrations.transformers first)."
               if hf else "")
    return ValueError(f"audit: no attention call to audit in {type(model).__name__}: {found}.{hf_note} audit "
                      "records attnkit.nn.MultiHeadAttention layers without a core (DecoderLM, Encoder, "
                      "attnkit.pretrained models) and transformers models built with "
                      f"attn_implementation={HF_IMPLEMENTATION!r}; not torch.nn.MultiheadAttention, "
                      "LongformerSelfAttention or other attention code")


def _mha_observer(calls: list[RecordedCall], name: str, module: MultiHeadAttention) -> Callable[..., None]:
    def observe(q, k, mask, bias, scale, v=None):
        if v is None:
            raise TypeError(f"audit: {name} handed its observers no v=; this attnkit version's "
                            "MultiHeadAttention cannot be audited")
        calls.append(RecordedCall(name, q, k, v, mask, bias, scale, module.softcap))
    return observe


def record_calls(model: nn.Module, *args: object, **kwargs: object) -> list[RecordedCall]:
    """Run ``model(*args, **kwargs)`` once under no_grad and return its attention calls, in order,
    named as ``model.named_modules()`` names the layers (the model itself by its class name); a layer
    called more than once gets " #i" (i = 0, 1, ...) on each name. Observers are removed afterwards,
    also when the model raises.

    Raises:
        TypeError: ``model`` is not an nn.Module.
        ValueError: no call was recorded (the message says what ``audit`` can record).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"audit: expected a torch nn.Module, got {type(model).__name__}")
    root = type(model).__name__
    mhas = [(name or root, m) for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)]
    layers = [(name, m) for name, m in mhas if m.core is None]
    hf = _transformers_model_inside(model)
    calls: list[RecordedCall] = []
    with ExitStack() as stack:
        if hf:  # imported only for a transformers model: audit itself never imports transformers
            from ..integrations.transformers import observing

            names = {m: name or root for name, m in model.named_modules()}

            def observe_hf(c) -> None:
                if c.module in names:  # else another model's call
                    calls.append(RecordedCall(names[c.module], c.q, c.k, c.v, c.mask, c.bias, c.scale, c.softcap))
            stack.enter_context(observing(observe_hf))
        for name, module in layers:
            observe = _mha_observer(calls, name, module)
            module.observers.append(observe)
            stack.callback(module.observers.remove, observe)
        with torch.no_grad():
            model(*args, **kwargs)
    if not calls:
        raise _nothing_recorded(model, len(layers), len(mhas) - len(layers), hf)
    return _numbered(calls)


def _numbered(calls: list[RecordedCall]) -> list[RecordedCall]:
    counts: dict[str, int] = {}
    for c in calls:
        counts[c.name] = counts.get(c.name, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for c in calls:
        if counts[c.name] > 1:
            i = seen[c.name] = seen.get(c.name, -1) + 1
            c = RecordedCall(f"{c.name} #{i}", c.q, c.k, c.v, c.mask, c.bias, c.scale, c.softcap)
        out.append(c)
    return out


# -- the default methods -------------------------------------------------------------------------------


class _PerHeadDim(nn.Module):
    """One core per head dim D, picked by q's last dim: the Performer's feature rows are (F, D), and a
    model's layers may differ in D (an encoder and a decoder with other head counts)."""

    def __init__(self, cores: Mapping[int, nn.Module]):
        super().__init__()
        self.cores = nn.ModuleDict({str(D): core for D, core in cores.items()})

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, mask=None, scale: float | None = None,
                cache: object = None) -> Tensor:
        """q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D / Dv) -> (B, Hq, Nq, Dv): the core built for D."""
        return self.cores[str(q.shape[-1])](q, k, v, mask=mask, scale=scale, cache=cache)


def default_methods(head_dim: int | Sequence[int], max_keys: int) -> tuple[dict[str, nn.Module], list[str]]:
    """The methods ``audit`` runs when none are given, and the notes that say what they are.

    linear attention (Katharopoulos et al. 2020, phi = elu + 1), Performer / FAVOR+ (Choromanski et
    al. 2020, F = 256 orthogonal random features, seed 0), Linformer (Wang et al. 2020, k =
    min(256, Nk) with *random, untrained* E, F ~ N(0, 1/k), seed 0), Nyströmformer (Xiong et al. 2021,
    m = min(64, Nk) landmarks, 6 pseudo-inverse iterations). Built without touching the global RNG.

    Args:
        head_dim: D of the calls, or every D they have (the Performer's feature rows are (F, D): one
            Performer per D, each seeded 0).
        max_keys: the largest Nk of the calls (the Linformer projection's length).
    """
    from .linformer import LinformerAttention
    from .nystrom import NystromAttention

    k, m = min(256, max_keys), min(64, max_keys)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        methods = {"linear (elu+1)": LinearAttention(),
                   "performer F=256": _performer_per_dim(head_dim),
                   f"linformer k={k}": LinformerAttention.build(max_keys, k),
                   f"nystrom m={m}": NystromAttention(num_landmarks=m)}
    notes = [f"linformer k={k}: E, F are random N(0, 1/k) projections, untrained; a trained Linformer learns "
             "them, so this is the error of swapping it in *before* fine-tuning",
             "performer F=256: one draw of orthogonal random features (seed 0); the error varies with the draw",
             "linformer and nystrom cannot be causal: they are refused on causal layers"]
    return {name: core.eval() for name, core in methods.items()}, notes


def _performer_per_dim(head_dim: int | Sequence[int]) -> nn.Module:
    from .performer import PerformerAttention

    dims = sorted({head_dim} if isinstance(head_dim, int) else set(head_dim))
    cores = {D: PerformerAttention(D, num_features=256, seed=0) for D in dims}
    return cores[dims[0]] if len(dims) == 1 else _PerHeadDim(cores)


# -- measuring -----------------------------------------------------------------------------------------


def head_errors(out: Tensor, exact: Tensor) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Per head: (relative L2 error, max abs error, mean row cosine) of ``out`` against ``exact``.

    Args:
        out, exact: (B, Hq, Nq, Dv), any float dtype (compared in float64).

    Returns:
        Three tuples of Hq floats: ||out - exact|| / ||exact|| over (B, Nq, Dv) (0 when both are 0,
        inf when only exact is); max |out - exact|; the mean over the rows whose exact output is not 0
        of cos(out_row, exact_row) (a zero ``out`` row counts as 0; nan when no row qualifies).

    Raises:
        ValueError: the shapes differ.
    """
    if out.shape != exact.shape:
        raise ValueError(f"head_errors: out {tuple(out.shape)} and exact {tuple(exact.shape)} differ; expected both "
                         "(B, Hq, Nq, Dv)")
    a, e = out.double(), exact.double()
    diff = a - e  # (B, Hq, Nq, Dv)
    num, den = diff.square().sum((0, 2, 3)).sqrt(), e.square().sum((0, 2, 3)).sqrt()  # (Hq,)
    rel = torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num > 0, math.inf, 0.0))
    max_abs = diff.abs().amax((0, 2, 3)) if diff.numel() else torch.zeros_like(num)  # (Hq,)
    e_norm, a_norm = e.norm(dim=-1), a.norm(dim=-1)  # (B, Hq, Nq)
    cos = (a * e).sum(-1) / (e_norm * a_norm).clamp_min(1e-300)  # (B, Hq, Nq)
    rows = e_norm > 0
    cos_mean = (cos * rows).sum((0, 2)) / rows.sum((0, 2))  # (Hq,), nan where no row counts
    return tuple(rel.tolist()), tuple(max_abs.tolist()), tuple(cos_mean.tolist())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """The median wall time of ``repeats`` calls of ``fn``, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _reference(c: RecordedCall) -> Tensor:
    """Exact attention of the call in float32 (float64 for float64 inputs): (B, Hq, Nq, Dv)."""
    dtype = torch.promote_types(c.q.dtype, torch.float32)
    bias = c.bias.to(dtype) if isinstance(c.bias, Tensor) else c.bias
    return attention(c.q.to(dtype), c.k.to(dtype), c.v.to(dtype), mask=c.mask, bias=bias, scale=c.scale,
                     softcap=c.softcap)


def _core_scale(c: RecordedCall) -> float | None:
    """The scale a core is given: None when the layer's is the default 1/sqrt(D) (see the module docstring)."""
    if c.scale is None or math.isclose(float(c.scale), c.q.shape[-1] ** -0.5, rel_tol=1e-6):
        return None
    return float(c.scale)


def _refused_layer(c: RecordedCall) -> str | None:
    if c.bias is not None:
        return (f"the layer adds a bias ({type(c.bias).__name__}: ALiBi, a relative-position bias or a float "
                "mask), which an approximate core cannot take")
    if c.softcap is not None:
        return f"the layer soft-caps its scores (softcap={c.softcap}), which an approximate core cannot do"
    return None


def _audit_call(c: RecordedCall, methods: Mapping[str, Core], repeats: int) -> list[AuditRow]:
    """The "exact" row and one row per method for one recorded call."""
    device = c.q.device
    B, Hq, Nq, D = c.q.shape
    shape = (B, Hq, c.k.shape[1], Nq, c.k.shape[2], D, c.v.shape[3])
    mask = repr(c.mask) if len(repr(c.mask)) <= 80 else repr(c.mask)[:77] + "..."
    ref = _reference(c)

    def exact_call() -> Tensor:
        return attention(c.q, c.k, c.v, mask=c.mask, bias=c.bias, scale=c.scale, softcap=c.softcap)
    out, exact_peak = measure_peak(exact_call, device)
    exact_s = _median_seconds(exact_call, repeats, device)
    timing = dict(exact_seconds=exact_s, exact_peak_bytes=exact_peak)
    rows = [AuditRow(c.name, EXACT, shape, mask, *head_errors(out, ref), seconds=exact_s, peak_bytes=exact_peak,
                     **timing)]
    scale, layer_reason = _core_scale(c), _refused_layer(c)
    for name, core in methods.items():
        def approx_call(core=core) -> Tensor:
            return core(c.q, c.k, c.v, mask=c.mask, scale=scale)
        reason = layer_reason
        if reason is None:
            try:
                out, peak = measure_peak(approx_call, device)
            except ValueError as e:  # the core refuses this call and says why
                reason = str(e)
        if reason is not None:
            rows.append(AuditRow(c.name, name, shape, mask, refused=reason, **timing))
            continue
        seconds = _median_seconds(approx_call, repeats, device)
        rows.append(AuditRow(c.name, name, shape, mask, *head_errors(out, ref), seconds=seconds, peak_bytes=peak,
                             **timing))
    return rows


def _checked_methods(methods: Mapping[str, Core] | None, calls: list[RecordedCall],
                     ) -> tuple[Mapping[str, Core], list[str]]:
    if methods is None:
        first = calls[0]
        built, notes = default_methods(sorted({c.q.shape[-1] for c in calls}), max(c.k.shape[2] for c in calls))
        return {name: core.to(first.q.device) for name, core in built.items()}, notes
    if not isinstance(methods, Mapping):
        raise TypeError(f"audit: methods must be a mapping name -> core module, got {type(methods).__name__}")
    for name, core in methods.items():
        if not isinstance(name, str) or name == EXACT:
            raise ValueError(f"audit: method names must be strings other than {EXACT!r}, got {name!r}")
        if not callable(core):
            raise TypeError(f"audit: method {name!r} is a {type(core).__name__}; expected an attention core, a "
                            "module with forward(q, k, v, *, mask=None, scale=None, cache=None)")
    return methods, []


def audit(model: nn.Module, *args: object, methods: Mapping[str, Core] | None = None, repeats: int = 3,
          **kwargs: object) -> AuditReport:
    """Run ``model(*args, **kwargs)`` once and measure every approximation on every attention call's
    real q, k, v against exact attention (see the module docstring for what is recorded and how).

    Args:
        model: an nn.Module holding attnkit ``nn.MultiHeadAttention`` layers (without a core), or a
            transformers model built with ``attn_implementation="attnkit"``, or both.
        args, kwargs: the model's inputs, e.g. token ids (B, N) and ``attention_mask=`` (B, N).
        methods: name -> attention core (``forward(q, k, v, *, mask=None, scale=None, cache=None)``
            -> (B, Hq, Nq, Dv)), run as given (not moved or put in eval mode). None:
            ``default_methods`` for the first call's D and the longest Nk, on its device.
        repeats: timed calls per method and layer (the median is reported), an int >= 1.

    Returns:
        An ``AuditReport``: per call, an "exact" row (the layer's own call against the float32
        reference) and one row per method, with per-head errors, time and peak memory.

    Raises:
        TypeError: ``model`` not an nn.Module; ``methods`` not a mapping of callables.
        ValueError: the model made no attention call audit can record (the message says which it can);
            a method named "exact"; ``repeats`` not an int >= 1. Errors of the model itself pass through.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"audit: repeats must be an int >= 1, got {repeats!r}")
    if methods is not None:
        _checked_methods(methods, [])
    calls = record_calls(model, *args, **kwargs)
    methods, notes = _checked_methods(methods, calls)
    rows: list[AuditRow] = []
    with torch.no_grad():
        for c in calls:
            rows.extend(_audit_call(c, methods, repeats))
    first = calls[0].q
    return AuditReport(tuple(rows), (EXACT, *methods), tuple(notes), str(first.device),
                       str(first.dtype).removeprefix("torch."), repeats)
