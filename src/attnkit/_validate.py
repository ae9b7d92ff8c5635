"""Input checks for the public functions: every error says what was expected, what came, what to do."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .bias import Bias, DenseBias, SumBias, row_stabilized
from .masks import Dense, Mask, dense_mask

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Call:
    """A validated attention call: tensors plus normalized mask, bias and scale."""

    q: Tensor  # (B, Hq, Nq, D)
    k: Tensor  # (B, Hkv, Nk, D)
    v: Tensor  # (B, Hkv, Nk, Dv)
    mask: Mask | None
    bias: Bias | None
    scale: float
    dropout_p: float
    need_lse: bool
    lse_shift: Tensor | None = None  # (Bx, Hx, Nq or 1): rows of the bias shifted by validate, added back to lse
    softcap: float | None = None  # scores become softcap * tanh(scores / softcap) before bias and mask
    dropout_seed: int | None = None  # the Philox seed of the call's dropout mask (ops/dropout.py)

    @property
    def shape(self) -> dict[str, int]:
        B, Hq, Nq, D = self.q.shape
        return dict(B=B, Hq=Hq, Hkv=self.k.shape[1], Nq=Nq, Nk=self.k.shape[2], D=D, Dv=self.v.shape[-1])


def _check_tensors(q: object, k: object, v: object) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, N, D), got {type(t).__name__}")
        if t.is_nested:
            raise TypeError(f"{name} is a nested (jagged) tensor; attnkit takes dense (B, H, N, D) tensors. Pad the "
                            "sequences to one length and pass mask=ak.key_padding(lengths), or pack them into one "
                            "sequence and pass mask=ak.document(ids) (each sequence attends within itself)")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)} ({t.dim()}-D); "
                             "for (B, N, H, D) inputs use .transpose(1, 2)")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them with .to()")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (B, Hq, _, D), (Bk, Hkv, Nk, Dk), (Bv, Hv, Nv, _) = q.shape, k.shape, v.shape
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"  # every message names all three
    if not (B == Bk == Bv):  # never broadcast, not even a batch of 1
        raise ValueError(f"batch sizes differ: q has B={B}, k has {Bk}, v has {Bv} ({shapes}); q, k and v "
                         "need one batch size B in dim 0: expand or repeat the one that differs")
    if D != Dk:
        raise ValueError(f"head dims differ: q has D={D}, k has D={Dk} ({shapes}); q and k must share D "
                         "in dim 3 (v's Dv may differ): project them to one head dim")
    if Hkv != Hv or Nk != Nv:  # v is never broadcast over k's heads or keys
        raise ValueError(f"k and v must share (B, Hkv, Nk): k has Hkv={Hkv}, Nk={Nk}, v has Hkv={Hv}, Nk={Nv} "
                         f"({shapes}); give v one (Nk, Dv) slice per key/value head of k")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"Hq={Hq} query heads is not a multiple of Hkv={Hkv} key/value heads ({shapes}); "
                         "GQA/MQA needs Hkv >= 1 and Hq % Hkv == 0: use a number of k/v heads that divides Hq")


def _normalize_mask(mask: object) -> Mask | None:
    if mask is None or isinstance(mask, Mask):
        return mask
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"mask tensor has dtype {mask.dtype}; a mask is bool (True = may attend). "
                            "Pass an additive float mask as bias=")
        return dense_mask(mask)
    raise TypeError(f"mask must be None, an attnkit mask (ak.causal(), ...) or a bool tensor, "
                    f"got {type(mask).__name__}")


def _dense_parts(x: object) -> list[tuple[str, Tensor]]:
    """The (Nq x Nk-sized) user tensors inside a mask or bias expression: dense masks, dense biases."""
    if isinstance(x, Dense):
        return [("mask", x.tensor)]
    if isinstance(x, DenseBias):
        return [("bias", x.tensor)]
    children = [getattr(x, name) for name in ("a", "b") if isinstance(getattr(x, name, None), Mask)]
    children += list(x.parts) if isinstance(x, SumBias) else []
    return [part for child in children for part in _dense_parts(child)]


def _check_devices(q: Tensor, *exprs: object) -> None:
    """One rule for masks and biases: a dense tensor must already be on q's device (a silent copy of
    an Nq x Nk tensor on every call is a cost the caller should see). The small tensors structured
    masks and biases hold (lengths, document ids, indices, slopes) follow q's device by themselves."""
    for expr in exprs:
        for name, t in _dense_parts(expr):
            if t.device != q.device:
                raise ValueError(f"{name} tensor is on {t.device} but q is on {q.device}; move it once with "
                                 f"{name}.to({str(q.device)!r}) (attnkit does not copy Nq x Nk tensors "
                                 "between devices on every call)")


def _normalize_bias(bias: object, q: Tensor) -> Bias | None:
    if bias is None or isinstance(bias, Bias):
        return bias
    if isinstance(bias, Tensor):
        if not bias.is_floating_point():
            raise TypeError(f"bias tensor has dtype {bias.dtype}; a bias is an additive float tensor "
                            "(pass a bool tensor as mask=)")
        return DenseBias(bias)
    raise TypeError(f"bias must be None, a float tensor or a structured bias (ak.alibi), got {type(bias).__name__}")


def _real(name: str, x: object) -> float:
    """A real number of any numeric type (Python, NumPy, a one-element tensor without grad) as a float."""
    if type(x).__module__ == "numpy" and getattr(x, "shape", None) == () and getattr(x, "dtype", None) is not None \
            and x.dtype.kind in "iuf":  # a 0-d NumPy array, e.g. np.array(0.35)
        return float(x)
    if isinstance(x, Tensor) and x.numel() == 1 and not x.is_complex() and x.dtype != torch.bool:
        if x.requires_grad:
            raise ValueError(f"{name} is a tensor that requires grad; attnkit computes no gradient for {name}: "
                             f"pass float({name}) or {name}.detach()")
        return float(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a real number (int, float, NumPy scalar or one-element tensor), "
                         f"got {x!r} of type {type(x).__name__}")
    return float(x)


def _softcap(softcap: object) -> float | None:
    if softcap is None:
        return None
    value = _real("softcap", softcap)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"softcap must be a finite number > 0 (scores become softcap * tanh(scores / softcap), "
                         f"as Gemma 2's attn_logit_softcapping), or None for no capping; got {softcap!r}")
    return value


def validate(q, k, v, *, mask=None, bias=None, scale=None, dropout_p=0.0, need_lse=False, softcap=None) -> Call:
    """Check every argument of ``ak.attention`` and return the normalized call."""
    _check_tensors(q, k, v)
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    mask_n = _normalize_mask(mask)
    bias_n = _normalize_bias(bias, q)
    _check_devices(q, mask_n, bias_n)
    if mask_n is not None:
        mask_n.check(B, Hq, Nq, Nk)
    lse_shift = None
    if bias_n is not None:
        bias_n.check(B, Hq, Nq, Nk)
        bias_n, lse_shift = row_stabilized(bias_n, mask_n, Nq, Nk, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None and D > 0 else 1.0 if scale is None else _real("scale", scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number (None means 1/sqrt(D)), got {scale!r}")
    dropout_p = _real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return Call(q, k, v, mask_n, bias_n, float(scale), float(dropout_p), bool(need_lse), lse_shift, _softcap(softcap))
