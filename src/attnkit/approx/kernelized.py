"""Kernelized attention, the shared core of linear attention and the Performer.

With a feature map phi >= 0 the softmax kernel exp(q.k) is replaced by phi(q).phi(k), and

    out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)         (Katharopoulos et al.
                                                                            2020, eq. 4-6)

regroups as phi(q_i) (sum_j phi(k_j) v_j^T) / phi(q_i) (sum_j phi(k_j)): O(N F Dv), never N x N.
Causal attention keeps the sums as a running state (S, z) over the keys so far (eq. 8-9); it is
computed by chunks of C rows: inside a chunk the C x C masked form, between chunks the state, so
memory stays O(N C + F Dv) (the chunked form of Hua et al. 2022 and flash-linear-attention).

Key features may carry a per-key log scale s_j: the key's features are phi_k[j] * exp(s_j). The
Performer's positive features are exp(w.k - |k|^2 / 2), which overflow or underflow in float32 for
large keys; they come in as exp(a_j - s_j) with s_j = max_f a_jf, and the state is kept relative
to a running maximum m of the s_j seen so far (rescaled as it grows, like the online softmax). Every
query divides by the same factor it multiplies, so the result is exact, and a query never reads a
scale of a later key: causality holds bit for bit.

Everything runs in float32 (float64 for float64 inputs); a row with no visible key gets 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


class KernelState:
    """The recurrent state of causal kernelized attention: one constant-size cache per layer.

    S (B, H, F, Dv) = sum_j exp(s_j - m) phi(k_j) v_j^T, z (B, H, F) = sum_j exp(s_j - m) phi(k_j),
    m (B, H) the running maximum of the key log scales (-inf before any key; 0 without scales).
    ``position`` counts the tokens seen (RoPE places new tokens after them). Decoding with it takes
    O(F Dv) memory and time per token whatever the length (Katharopoulos et al. 2020, sec. 3.4).
    ``features``: a core's tag for the feature map the sums were built with (the Performer refuses
    a state built before its features were redrawn); None until a core sets it.
    """

    def __init__(self):
        self.S: Tensor | None = None
        self.z: Tensor | None = None
        self.m: Tensor | None = None
        self.position = 0
        self.features: object = None

    def __len__(self) -> int:
        return 0  # no keys are stored: the state stands for all of them

    @property
    def dropped(self) -> int:
        return self.position

    def reset(self) -> None:
        """Forget every key (and the features tag): the next call starts a new sequence at position 0."""
        self.S = self.z = self.m = self.features = None
        self.position = 0

    def empty_like(self, phi_k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A zero state for phi_k (B, H, n, F), v (B, H, n, Dv): S (B, H, F, Dv), z (B, H, F), m (B, H) = -inf."""
        B, H, _, F = phi_k.shape
        return (phi_k.new_zeros(B, H, F, v.shape[-1]), phi_k.new_zeros(B, H, F),
                phi_k.new_full((B, H), NEG_INF))

    def read(self, phi_k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(S, z, m) to continue from with keys phi_k (B, H, n, F) and values v (B, H, n, Dv); zeros when empty.

        Raises:
            ValueError: a held state of another (B, H, F, Dv), dtype or device (call reset()).
        """
        if self.S is None:
            return self.empty_like(phi_k, v)
        B, H, _, F = phi_k.shape
        if self.S.shape != (B, H, F, v.shape[-1]):
            raise ValueError(f"KernelState holds a state of shape {tuple(self.S.shape)} (B, H, F, Dv); these "
                             f"inputs need {(B, H, F, v.shape[-1])}: call reset() for a new sequence")
        if self.S.dtype != phi_k.dtype or self.S.device != phi_k.device:
            raise ValueError(f"KernelState holds a {self.S.dtype} state on {self.S.device}, but these inputs are "
                             f"computed in {phi_k.dtype} on {phi_k.device} (the model was moved or cast, e.g. "
                             ".double() / .to(device), during decoding): call reset() and run the sequence "
                             "again, or cast / move the model before decoding starts")
        return self.S, self.z, self.m

    def __repr__(self) -> str:
        shape = None if self.S is None else tuple(self.S.shape)
        return f"KernelState(position={self.position}, S={shape})"


def _safe(m: Tensor) -> Tensor:
    """A running maximum with -inf (nothing seen yet) replaced by 0, so exp(x - m) stays defined."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _divide(num: Tensor, den: Tensor) -> Tensor:
    """num (..., Dv) / den (...) per row; a row whose denominator is 0 saw no key and gets 0, with a
    zero gradient (never NaN: dividing by a clamped den would send 1 / tiny ~ 1e38 back into the
    state, which overflows to inf and turns into NaN at the padded keys' zeroed features)."""
    seen = den > 0
    safe = torch.where(seen, den.clamp_min(torch.finfo(den.dtype).tiny), torch.ones_like(den))
    return torch.where(seen[..., None], num / safe[..., None], torch.zeros_like(num))


def _weighted(phi_k: Tensor, s: Tensor | None, m: Tensor) -> Tensor:
    """phi_k (B, H, n, F) times exp(s_j - m) (B, H, n) against the reference m (B, H)."""
    if s is None:
        return phi_k
    return phi_k * torch.exp(s - _safe(m)[..., None])[..., None]


def _absorb(state: tuple[Tensor, Tensor, Tensor], phi_k: Tensor, v: Tensor,
            s: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Add keys phi_k (B, H, n, F) with values v (B, H, n, Dv) to the state (S, z, m)."""
    S, z, m = state
    if s is None:
        m_new = torch.zeros_like(m)
        decay = torch.ones_like(m)
    else:
        m_new = torch.maximum(m, s.amax(-1))  # (B, H)
        decay = torch.exp(m - _safe(m_new))  # 0 where m was -inf
    pk = _weighted(phi_k, s, m_new)  # (B, H, n, F)
    S = S * decay[..., None, None] + pk.transpose(-1, -2) @ v  # (B, H, F, Dv)
    z = z * decay[..., None] + pk.sum(-2)  # (B, H, F)
    return S, z, m_new


def _chunk(state: tuple[Tensor, Tensor, Tensor], phi_q: Tensor, phi_k: Tensor, v: Tensor,
           s: Tensor | None) -> Tensor:
    """Outputs of one aligned chunk: query i sees the state and keys 0..i of the chunk.

    phi_q, phi_k (B, H, C, F), v (B, H, C, Dv), s (B, H, C) or None -> (B, H, C, Dv).
    """
    S, z, m = state
    C = phi_q.shape[2]
    future = torch.ones(C, C, dtype=torch.bool, device=phi_q.device).triu(1)  # (C, C), key j > query i
    scores = phi_q @ phi_k.transpose(-1, -2)  # (B, H, C, C)
    if s is None:
        A = scores.masked_fill(future, 0.0)
        num = A @ v + phi_q @ S  # (B, H, C, Dv)
        den = A.sum(-1) + (phi_q @ z[..., None])[..., 0]  # (B, H, C)
        return _divide(num, den)
    m_rows = torch.maximum(m[..., None], s.cummax(-1).values)  # (B, H, C): the max scale row i has seen
    m_rows = _safe(m_rows)
    log_w = (s[..., None, :] - m_rows[..., :, None]).masked_fill(future, NEG_INF)  # (B, H, C, C)
    A = scores * torch.exp(log_w)  # (B, H, C, C)
    decay = torch.exp(m[..., None] - m_rows)  # (B, H, C): the state's scale against row i's
    num = A @ v + decay[..., None] * (phi_q @ S)  # (B, H, C, Dv)
    den = A.sum(-1) + decay * (phi_q @ z[..., None])[..., 0]  # (B, H, C)
    return _divide(num, den)


def _state_only(state: tuple[Tensor, Tensor, Tensor], phi_q: Tensor) -> Tensor:
    """Queries that see only the state (none of this call's keys): phi_q (B, H, n, F) -> (B, H, n, Dv)."""
    S, z, _ = state
    return _divide(phi_q @ S, (phi_q @ z[..., None])[..., 0])


def _masked_keys(phi_k: Tensor, s: Tensor | None, key_valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Padded keys leave numerator and normalizer alike: features 0 and log scale -inf."""
    if key_valid is None:
        return phi_k, s
    valid = key_valid[:, None, :]  # (B, 1, Nk)
    phi_k = phi_k.masked_fill(~valid[..., None], 0.0)  # not * valid: a padded key's NaN features * 0 is NaN
    return phi_k, None if s is None else s.masked_fill(~valid, NEG_INF)


def noncausal(phi_q: Tensor, phi_k: Tensor, v: Tensor, *, key_logscale: Tensor | None = None,
              key_valid: Tensor | None = None) -> Tensor:
    """Every query sees every (valid) key.

    phi_q (B, H, Nq, F), phi_k (B, H, Nk, F) >= 0, v (B, H, Nk, Dv), key_logscale (B, H, Nk) or None,
    key_valid (B, Nk) bool or None -> (B, H, Nq, Dv).
    """
    phi_k, s = _masked_keys(phi_k, key_logscale, key_valid)
    B, H, _, F = phi_k.shape
    state = (phi_k.new_zeros(B, H, F, v.shape[-1]), phi_k.new_zeros(B, H, F),
             phi_k.new_full((B, H), NEG_INF))
    S, z, _ = _absorb(state, phi_k, v, s)
    return _divide(phi_q @ S, (phi_q @ z[..., None])[..., 0])  # (B, H, Nq, Dv)


def causal(phi_q: Tensor, phi_k: Tensor, v: Tensor, *, key_logscale: Tensor | None = None,
           key_valid: Tensor | None = None, chunk_size: int = 128, state: KernelState | None = None) -> Tensor:
    """Causal kernelized attention by chunks, bottom-right aligned like ``ak.causal()``: query i sees
    key j when j <= i + (Nk - Nq). With ``state`` the keys it holds come before these and it is
    updated in place (recurrent decoding).

    phi_q (B, H, Nq, F), phi_k (B, H, Nk, F), v (B, H, Nk, Dv), key_logscale (B, H, Nk) or None,
    key_valid (B, Nk) or None -> (B, H, Nq, Dv).

    Raises:
        ValueError: chunk_size < 1; a state of another shape, dtype or device; Nq > Nk with a state
            that holds keys (bottom-right aligned over all the keys, the first Nq - Nk queries would
            see only part of the state's keys, which its sums cannot separate).
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    phi_k, s = _masked_keys(phi_k, key_logscale, key_valid)
    Nq, Nk = phi_q.shape[2], phi_k.shape[2]
    if state is not None and state.S is not None and Nq > Nk:
        raise ValueError(f"causal attention with a KernelState that holds {state.position} tokens got Nq={Nq} "
                         f"queries for Nk={Nk} new keys: aligned bottom-right over all the keys, the first "
                         f"{Nq - Nk} queries would see only part of the state's keys, which its sums cannot "
                         "separate. Pass as many new keys as queries (decoding: one key per new token)")
    carry = (KernelState() if state is None else state).read(phi_k, v)
    if s is None:
        carry = (carry[0], carry[1], torch.zeros_like(carry[2]))
    lead = Nk - Nq  # keys every query sees (lead > 0) or queries that see no key of these (lead < 0)
    if lead > 0:
        carry = _absorb(carry, phi_k[:, :, :lead], v[:, :, :lead], None if s is None else s[:, :, :lead])
    start = max(lead, 0)
    first = max(-lead, 0)
    outs = [_state_only(carry, phi_q[:, :, :first])] if first else []  # queries before every key of these
    # split once: a slice per chunk would make autograd add a full-size (N, F) gradient per chunk
    # in the backward, O(N^2 / C) work; split's backward joins the chunks' gradients once
    chunks = [t.split(chunk_size, dim=2) for t in (phi_q[:, :, first:], phi_k[:, :, start:], v[:, :, start:])]
    scales = [None] * len(chunks[0]) if s is None else s[:, :, start:].split(chunk_size, dim=2)
    for pq, pk, vc, sc in zip(*chunks, scales):
        outs.append(_chunk(carry, pq, pk, vc, sc))
        carry = _absorb(carry, pk, vc, sc)
    if state is not None:
        state.S, state.z, state.m = carry
        state.position += Nk
    return torch.cat(outs, dim=2) if len(outs) != 1 else outs[0]  # (B, H, Nq, Dv)


def quadratic(phi_q: Tensor, phi_k: Tensor, v: Tensor, *, causal: bool, key_logscale: Tensor | None = None,
              key_valid: Tensor | None = None) -> Tensor:
    """The same estimate as an explicit (B, H, Nq, Nk) matrix: phi(q) phi(k)^T, masked, row-normalized.

    O(N^2) memory: the definition the chunked and recurrent forms are tested against, and what
    ``attnkit.approx`` functions return as weights for inspection. Same shapes as ``causal``.
    """
    phi_k, s = _masked_keys(phi_k, key_logscale, key_valid)
    A = phi_q @ phi_k.transpose(-1, -2)  # (B, H, Nq, Nk)
    if s is not None:
        A = A * torch.exp(s - _safe(s.amax(-1, keepdim=True)))[..., None, :]
    if causal:
        Nq, Nk = A.shape[-2:]
        A = A.masked_fill(torch.ones(Nq, Nk, dtype=torch.bool, device=A.device).triu(Nk - Nq + 1), 0.0)
    return _divide(A @ v, A.sum(-1))
