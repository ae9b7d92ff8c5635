"""The Performer's FAVOR+ (Choromanski et al. 2020, "Rethinking Attention with Performers"): softmax
attention estimated with positive orthogonal random features, in O(N F Dv) and never N x N.

For w ~ N(0, I_D),  E[exp(w.x - |x|^2/2) exp(w.y - |y|^2/2)] = exp(x.y)  (Lemma 1), so with F rows
w_1..w_F the positive features

    phi(x) = exp(w_f.x - |x|^2 / 2)_f / sqrt(F)                  (FAVOR+, the SM+ map of Lemma 1)

give phi(x).phi(y), an unbiased estimate of exp(x.y) that is never negative (the trigonometric map
sin/cos is, and its normalizer can vanish). Taking x = q sqrt(scale), y = k sqrt(scale) estimates
the softmax kernel exp(q.k scale); the attention is then the kernelized form of ``kernelized``.
Rows drawn orthogonal (blocks of D, sec. 2.4 / Theorem 2) keep each row's marginal N(0, I) when
their lengths are chi-distributed ("norms"), so the estimate stays unbiased with a lower variance.
The generalized ReLU kernel phi(x) = (relu(w_f.x) + eps)_f / sqrt(F) (sec. 2.2, FAVOR+ with a
non-softmax kernel) is offered too.

Numerics. exp(w.x - |x|^2/2) over- and underflows in float32 for |x| of a few tens. A query's row is
divided by its own normalizer, so any per-query factor cancels: its features are exp(a - max_f a).
A key's factor does not cancel (keys compete in every row), so keys come as exp(a_j - s_j) with the
log scale s_j = max_f a_jf, which ``kernelized`` applies relative to a running maximum (exact, and
causal: a query never reads a later key's scale). Everything runs in float32 (float64 for float64
inputs); float16 / bfloat16 inputs are cast by ``prepare`` and the output cast back.

Differences from ``performer-pytorch`` (1.1.4, checked against its source and in the tests):

- its softmax features add eps = 1e-4 after stabilizing, ``ratio * (exp(a - max) + eps)``: a bias
  that does not cancel, whose size depends on the max; here there is no eps (the features are > 0).
- its keys are stabilized by one maximum over all keys and features of a head. In float32 a key far
  below that maximum underflows to 0 (or to eps), and in the causal path the maximum includes future
  keys, which leak into earlier outputs through eps. Here each key has its own scale.
- its ``Attention`` applies the padding mask by zeroing padded values only (``v.masked_fill_``):
  the padded keys still add phi(q).phi(k) to every row's normalizer. Here they leave both sums.
- its ReLU kernel is ``relu(w.x) + 1e-3`` without 1/sqrt(F) (the scale cancels); the same here.
- its causal path (without ``fast_transformers``' CUDA kernel) stores an (N, F, Dv) cumulative sum;
  here the causal form is computed by chunks with an (F, Dv) state (``kernelized.causal``).
- its ``ProjectionUpdater`` (one counter per model) redraws after ``feature_redraw_interval`` calls,
  then every ``feature_redraw_interval + 1`` calls (the call that redraws does not count itself);
  here each core counts its own calls and each draw serves exactly ``redraw_interval`` of them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import kernelized
from ._inputs import prepare
from .kernelized import KernelState

KERNELS = ("softmax", "relu")
SCALINGS = ("norms", "sqrt_d")
RELU_EPSILON = 1e-3  # performer-pytorch's generalized_kernel(kernel_epsilon=0.001), as the paper's JAX code


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")
    return value


def orthogonal_random_features(num_features: int, head_dim: int, *, generator: torch.Generator | None = None,
                               scaling: str = "norms", orthogonal: bool = True, dtype: torch.dtype = torch.float32,
                               device: torch.device | str | None = None) -> Tensor:
    """Random feature rows W (F, D) for FAVOR+ (Choromanski et al. 2020, sec. 2.4, "ORFs").

    ``orthogonal=True``: ceil(F / D) independent blocks, each the Q of a Gaussian D x D matrix's QR
    with the signs of R's diagonal moved into Q (so Q is Haar-distributed, not biased by the QR
    convention); the last block is cut to F rows. Rows are then scaled: ``"norms"`` by the lengths
    of independent N(0, I_D) vectors (chi_D), so each row is marginally N(0, I_D) and the softmax
    estimate is unbiased (the paper's choice); ``"sqrt_d"`` to length sqrt(D) (the "regularized"
    variant: lower variance, slightly biased). ``orthogonal=False``: iid N(0, I_D) rows (``"sqrt_d"``
    rescales them to length sqrt(D)).

    Drawn in float64 on the generator's device (the CPU without one), returned in ``dtype`` on
    ``device`` (default: where it was drawn).

    Raises:
        ValueError: num_features / head_dim not ints >= 1; an unknown scaling.
        TypeError: a non-floating dtype; a generator that is not a torch.Generator.
    """
    F, D = _positive_int("num_features", num_features), _positive_int("head_dim", head_dim)
    _choice("scaling", scaling, SCALINGS)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    where = generator.device if generator is not None else torch.device("cpu")
    draw = dict(generator=generator, device=where, dtype=torch.float64)
    if orthogonal:
        Q, R = torch.linalg.qr(torch.randn(-(-F // D), D, D, **draw))  # (blocks, D, D), batched
        signs = torch.where(torch.diagonal(R, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(Q)  # (blocks, D)
        W = (Q * signs[:, None, :]).transpose(-1, -2).reshape(-1, D)[:F]  # (F, D): orthonormal rows per block
        if scaling == "norms":
            W = W * torch.randn(F, D, **draw).norm(dim=1, keepdim=True)
    else:
        W = torch.randn(F, D, **draw)  # (F, D): already N(0, I) rows
    if scaling == "sqrt_d":
        W = W * (math.sqrt(D) / W.norm(dim=1, keepdim=True))
    return W.to(device=where if device is None else device, dtype=dtype)


def _project(x: Tensor, projection: Tensor) -> Tensor:
    """w_f.x for every row: x (..., N, D), projection (F, D) -> (..., N, F), in x's dtype."""
    if not isinstance(projection, Tensor) or projection.dim() != 2 or projection.shape[1] != x.shape[-1]:
        got = tuple(projection.shape) if isinstance(projection, Tensor) else type(projection).__name__
        raise ValueError(f"projection must be a (F, D={x.shape[-1]}) tensor of random feature rows, got {got}; "
                         "draw one with orthogonal_random_features(F, D)")
    if not projection.is_floating_point():
        raise TypeError(f"projection must be a floating tensor, got {projection.dtype}")
    return x @ projection.to(device=x.device, dtype=x.dtype).T


def softmax_features(x: Tensor, projection: Tensor) -> tuple[Tensor, Tensor]:
    """Positive random features of the softmax kernel, stabilized (Choromanski et al. 2020, Lemma 1).

    x (..., N, D) float, projection W (F, D) -> (phi (..., N, F), log_scale (..., N)) with

        phi * exp(log_scale)[..., None] = exp(W x - |x|^2 / 2) / sqrt(F)

    and max_f phi = 1 / sqrt(F): the paper's features never overflow and their largest entry never
    underflows. E_W[phi(x).phi(y) exp(s_x + s_y)] = exp(x.y) for W's rows N(0, I_D) (unbiased). The
    log scale carries no gradient (it is detached: it multiplies the numerator and the normalizer of
    every row alike); the gradient of exp(a) still flows through phi.

    Raises:
        ValueError / TypeError: a projection that is not a floating (F, D) tensor.
    """
    a = _project(x, projection) - 0.5 * (x * x).sum(-1, keepdim=True)  # (..., N, F)
    s = a.amax(-1).detach()  # (..., N)
    return torch.exp(a - s[..., None]) / math.sqrt(projection.shape[0]), s


def relu_features(x: Tensor, projection: Tensor, *, epsilon: float = RELU_EPSILON) -> Tensor:
    """Generalized-kernel features with f = ReLU (Choromanski et al. 2020, sec. 2.2):
    phi(x) = (relu(W x) + epsilon) / sqrt(F) > 0. x (..., N, D), W (F, D) -> (..., N, F).

    ``epsilon`` (performer-pytorch's ``kernel_epsilon``, 1e-3) keeps every row's normalizer > 0.

    Raises:
        ValueError: epsilon < 0 or not finite; a projection that is not (F, D).
    """
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"kernel_epsilon must be a finite number >= 0, got {epsilon!r}")
    return (torch.relu(_project(x, projection)) + epsilon) / math.sqrt(projection.shape[0])


def performer_features(q: Tensor, k: Tensor, projection: Tensor, *, kernel: str = "softmax", scale: float,
                       kernel_epsilon: float = RELU_EPSILON) -> tuple[Tensor, Tensor, Tensor | None]:
    """The features ``performer_attention`` feeds to ``kernelized``: q (B, H, Nq, D), k (B, H, Nk, D)
    -> phi_q (B, H, Nq, F), phi_k (B, H, Nk, F), key log scale (B, H, Nk) or None (ReLU).

    Both inputs are multiplied by sqrt(scale) first, so phi(q).phi(k) estimates exp(q.k scale)
    (softmax) or relu-feature products of the scaled inputs (ReLU). A query's softmax log scale is
    dropped: it multiplies its row's numerator and normalizer alike and cancels.

    Raises:
        ValueError: an unknown kernel; ``softmax_features`` / ``relu_features``' errors.
    """
    _choice("kernel", kernel, KERNELS)
    root = math.sqrt(scale)
    if kernel == "relu":
        return (relu_features(q * root, projection, epsilon=kernel_epsilon),
                relu_features(k * root, projection, epsilon=kernel_epsilon), None)
    phi_q, _ = softmax_features(q * root, projection)  # the query's scale cancels in its row
    phi_k, s_k = softmax_features(k * root, projection)
    return phi_q, phi_k, s_k


def performer_attention(q: Tensor, k: Tensor, v: Tensor, projection: Tensor, *, mask=None, kernel: str = "softmax",
                        scale: float | None = None, chunk_size: int = 128, state: KernelState | None = None,
                        kernel_epsilon: float = RELU_EPSILON) -> Tensor:
    """FAVOR+ attention: out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j), an estimate
    of softmax(q k^T scale) v (Choromanski et al. 2020, eq. 2-4 with the features of Lemma 1).

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv); float16/bfloat16/float32/float64,
            accumulated in float32 (float64 for float64 inputs). Hq % Hkv == 0 (GQA).
        projection: W (F, D), the random feature rows (``orthogonal_random_features``); cast to the
            compute dtype.
        mask: None, ``ak.causal()`` (bottom-right aligned, by chunks: never N x N),
            ``ak.key_padding(...)`` or both with ``&``. Padded keys leave numerator and normalizer.
        kernel: "softmax" (positive features, FAVOR+) or "relu" (generalized kernel).
        scale: the score scale (default 1/sqrt(D)); q and k are multiplied by sqrt(scale).
        chunk_size: C, rows per chunk of the causal form (memory O(N C + F Dv) per head).
        state: a ``KernelState`` to continue from and update in place (causal only): decoding.
        kernel_epsilon: the ReLU kernel's additive epsilon (``relu_features``).

    Returns:
        (B, Hq, Nq, Dv) in q's dtype. A query that sees no key gets 0.

    Raises:
        ValueError / TypeError: bad tensors; a mask outside ``causal() & key_padding()``; ``state``
            without a causal mask; an unknown kernel; a projection that is not a floating (F, D).
    """
    call = prepare("performer_attention", q, k, v, mask=mask, scale=scale)
    if state is not None and not call.causal:
        raise ValueError("performer_attention: state= is the causal recurrent form; pass mask=ak.causal() too")
    phi_q, phi_k, s_k = performer_features(call.q, call.k, projection, kernel=kernel, scale=call.scale,
                                           kernel_epsilon=kernel_epsilon)
    if call.causal:
        out = kernelized.causal(phi_q, phi_k, call.v, key_logscale=s_k, key_valid=call.key_valid,
                                chunk_size=chunk_size, state=state)
    else:
        out = kernelized.noncausal(phi_q, phi_k, call.v, key_logscale=s_k, key_valid=call.key_valid)
    return out.to(call.out_dtype)  # (B, Hq, Nq, Dv)


class PerformerAttention(nn.Module):
    """FAVOR+ as the attention core of ``attnkit.nn.MultiHeadAttention(core=...)``.

    The random feature rows are the buffer ``projection`` (F, D): saved in the state_dict and moved
    with the module, never trained. ``redraw()`` draws new ones; with ``redraw_interval=n`` each
    draw serves n forward calls in training mode (then the next call redraws first), as the
    paper's feature redrawing (sec. 4.2) and performer-pytorch's ``feature_redraw_interval``.
    Eval mode, calls with a decoding cache (the state was built with the current features) and a
    frozen core (``freeze()``) never redraw; an explicit ``redraw()`` always does. The call count is
    a Python int, not saved: a reloaded module restores its features and starts a new count.

    Args:
        head_dim: D.
        num_features: F (default int(D ln D), performer-pytorch's default, at least 1).
        kernel: "softmax" or "relu" (``performer_attention``).
        orthogonal, scaling: how rows are drawn (``orthogonal_random_features``).
        redraw_interval: None (never redraw by itself) or n >= 1.
        chunk_size: rows per chunk of the causal form.
        generator / seed: where draws come from (one of them; default the global CPU generator).

    Raises:
        ValueError: head_dim / num_features / redraw_interval / chunk_size not ints >= 1; an
            unknown kernel or scaling; both generator and seed.
    """

    def __init__(self, head_dim: int, num_features: int | None = None, *, kernel: str = "softmax",
                 orthogonal: bool = True, scaling: str = "norms", redraw_interval: int | None = None,
                 chunk_size: int = 128, generator: torch.Generator | None = None, seed: int | None = None):
        super().__init__()
        D = _positive_int("head_dim", head_dim)
        F = max(1, int(D * math.log(D))) if num_features is None else _positive_int("num_features", num_features)
        self.kernel, self.scaling = _choice("kernel", kernel, KERNELS), _choice("scaling", scaling, SCALINGS)
        self.orthogonal = bool(orthogonal)
        self.redraw_interval = None if redraw_interval is None else _positive_int("redraw_interval", redraw_interval)
        self.chunk_size = _positive_int("chunk_size", chunk_size)
        if generator is not None and seed is not None:
            raise ValueError("PerformerAttention: pass generator= or seed=, not both")
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else generator
        self.frozen, self.calls_since_redraw = False, 0
        self._draws = 0  # counts every change of the features (redraw, load_state_dict): tags decoding states
        self.register_buffer("projection", self._draw(F, D, torch.float32, None))  # (F, D)

    def _draw(self, F: int, D: int, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        return orthogonal_random_features(F, D, generator=self.generator, scaling=self.scaling,
                                          orthogonal=self.orthogonal, dtype=dtype, device=device)

    @property
    def num_features(self) -> int:
        return self.projection.shape[0]

    @torch.no_grad()
    def redraw(self) -> None:
        """Draw new feature rows into ``projection`` (same shape, dtype, device); restarts the count."""
        F, D = self.projection.shape
        self.projection.copy_(self._draw(F, D, self.projection.dtype, self.projection.device))
        self.calls_since_redraw = 0
        self._draws += 1

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._draws += 1  # new features: a decoding state built with the old ones no longer fits

    def freeze(self) -> "PerformerAttention":
        """Stop the automatic redraw (e.g. for fine-tuning or inference); returns self."""
        self.frozen = True
        return self

    def unfreeze(self) -> "PerformerAttention":
        """Let ``redraw_interval`` redraw again (training mode only); returns self."""
        self.frozen = False
        return self

    def new_cache(self) -> KernelState:
        """An empty decoding state; it is tied to the current features (a redraw makes it refused)."""
        return KernelState()

    def _tick(self) -> None:
        """Count one training call; the call after every ``redraw_interval`` ones redraws first."""
        if self.redraw_interval is None or self.frozen or not self.training:
            return
        if self.calls_since_redraw >= self.redraw_interval:
            self.redraw()
        self.calls_since_redraw += 1

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, mask=None, scale: float | None = None,
                cache: KernelState | None = None) -> Tensor:
        """q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D / Dv) -> (B, Hq, Nq, Dv); see ``performer_attention``.

        Raises:
            ValueError: q's D is not this core's head_dim; a ``cache`` built with features that were
                redrawn or reloaded since (reset() it); ``performer_attention``'s errors (cache
                without a causal mask, ...).
        """
        F, D = self.projection.shape
        if isinstance(q, Tensor) and q.dim() == 4 and q.shape[-1] != D:
            raise ValueError(f"PerformerAttention was built for head_dim={D} (projection ({F}, {D})), but q has "
                             f"D={q.shape[-1]}: build it for this layer, PerformerAttention(layer.head_dim, ...)")
        if cache is None:
            self._tick()
        elif isinstance(cache, KernelState):
            tag = (id(self), self._draws)
            if cache.S is not None and cache.features != tag:
                raise ValueError("PerformerAttention: this KernelState was built with other random features (this "
                                 "core redrew or reloaded them since, or the state is another layer's); its sums "
                                 "no longer match: call cache.reset() (or model.new_cache()) and rerun the sequence")
            cache.features = tag
        return performer_attention(q, k, v, self.projection, mask=mask, kernel=self.kernel, scale=scale,
                                   chunk_size=self.chunk_size, state=cache)

    def extra_repr(self) -> str:
        F, D = self.projection.shape
        return (f"head_dim={D}, num_features={F}, kernel={self.kernel}, orthogonal={self.orthogonal}, "
                f"scaling={self.scaling}, redraw_interval={self.redraw_interval}, frozen={self.frozen}, "
                f"chunk_size={self.chunk_size}")
