"""Nyström attention (Xiong et al. 2021, "Nyströmformer: A Nyström-Based Algorithm for Approximating
Self-Attention"): softmax(Q K^T) V approximated through m landmarks,

    out = softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V          (paper eq. 14-16)

with Q~, K~ (m, D) the means of m segments of the queries and keys, and pinv the iterative
Moore-Penrose pseudo-inverse of Razavi et al. 2014 (paper eq. 18 / Algorithm 1). Time and memory
O(N m) per head: no Nq x Nk matrix is formed.

Landmarks and padding. Segments are formed over the *valid* tokens only: the valid key of rank r
(its index among the valid keys of its row b, of which there are L_b) belongs to segment
floor(r m / L_b), so segments are contiguous, their sizes differ by at most one when m does not divide
L_b, and appending padded keys never changes the landmarks or the outputs. When L_b < m, m - L_b
segments are empty: their landmark rows and columns are removed from the three softmaxes (set to 0),
which makes softmax(Q~ K~^T) block diagonal with a zero block, whose pseudo-inverse (exact or
iterative) is the pseudo-inverse of the valid block padded with zeros — as if m were L_b. With
L_b <= m every valid key is its own landmark, and self-attention is then exact (with an exact
pseudo-inverse). A row with no valid key gets 0, as in ``ak.attention``.

Self- or cross-attention. When Nq == Nk the call is taken as self-attention: query position i is the
token of key position i, so a padded key is a padded query too and the query landmarks average the
valid positions only (padded queries still get an output, as in ``ak.attention``). When Nq != Nk
every query counts and the query landmarks are m segments of all Nq queries.

Causal masks are refused: a landmark averages a segment, so any query would see its segment's future.

Differences from the ``nystrom-attention`` package (lucidrains, v0.0.x), checked in
tests/test_approx_nystrom.py:
  * Pseudo-inverse start: the package (like the paper's official code with ``init_option="original"``)
    scales Z0 = A^T by the largest column sum over the whole batch and all heads (``torch.max`` with
    no dim); the paper's Algorithm 1 and attnkit use each (b, h) matrix's own ||A||_1 ||A||_inf, so a
    sample's output does not depend on the rest of its batch. Equal when B * H = 1; both converge to
    the same pseudo-inverse as the iterations grow.
  * N not a multiple of m: the package pads the sequence at the front with ceil(N/m) m - N zero
    tokens and forms m segments of ceil(N/m) positions. Without a mask those zero tokens are not
    masked: they are keys with score 0 and value 0 and enter the first landmark's mean. attnkit forms
    m segments of floor/ceil(N/m) real tokens instead.
  * Padding: the package's segments are fixed runs of positions with a masked mean; a run that is all
    padding is filled with -finfo.max, which leaves a uniform row in softmax(Q~ K~^T), so padding can
    change the outputs. attnkit's segments are over valid tokens only and empty landmarks are removed.
  * The package's depthwise-convolution residual on v is ``NystromAttention(residual_kernel=...)``
    here (off by default, as the package's ``residual=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from ._inputs import ApproxCall, prepare

CAUSAL_WHY_NOT = ("each landmark is the mean of a segment of keys and queries, so every query would see "
                  "the future tokens of its segment; use linear_attention or the Performer for causal "
                  "attention, or exact ak.attention")


def iterative_pinv(a: Tensor, iterations: int = 6) -> Tensor:
    """The Moore-Penrose pseudo-inverse by the iteration of Razavi et al. 2014 (Nyströmformer eq. 18,
    Algorithm 1): Z0 = A^T / (||A||_1 ||A||_inf), then ``iterations`` times
    Z <- 1/4 Z (13 I - A Z (15 I - A Z (7 I - A Z))).

    Args:
        a: (..., n, p) float; every matrix is scaled by its own norms (a zero matrix gives 0).
        iterations: >= 1. Each singular value s starts at t = s^2 / (||A||_1 ||A||_inf) <= 1 and
            converges to 1/s; small t grow by about 13/4 per iteration.

    Returns:
        (..., p, n), a's dtype.

    Raises:
        ValueError: ``iterations`` not an int >= 1.
    """
    _check_iterations(iterations)
    absolute = a.abs()
    norms = absolute.sum(-2).amax(-1) * absolute.sum(-1).amax(-1)  # (...,) max column sum x max row sum
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    z = a.transpose(-1, -2) / norms[..., None, None]  # (..., p, n)
    eye = torch.eye(a.shape[-2], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z  # (..., n, n)
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _check_iterations(iterations: object) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"pinv_iterations must be an int >= 1 (6 is the paper's), or None for the exact "
                         f"torch.linalg.pinv; got {iterations!r}")


def _check_landmarks(num_landmarks: object) -> None:
    if isinstance(num_landmarks, bool) or not isinstance(num_landmarks, int) or num_landmarks < 1:
        raise ValueError(f"num_landmarks must be an int >= 1 (m, the number of segments), got {num_landmarks!r}")


def segment_means(valid: Tensor, m: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The averaging matrix of m segments over the valid tokens of each row.

    Args:
        valid: (B, N) bool, True = a real token. The valid token of rank r among the L_b of row b
            belongs to segment floor(r m / L_b).

    Returns:
        W (B, m, N) in ``dtype`` (row s holds 1 / |segment s| on its tokens, 0 elsewhere; a landmark is
        ``W @ x``) and nonempty (B, m) bool.
    """
    rank = valid.long().cumsum(-1) - 1  # (B, N)
    count = valid.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    segment = torch.div(rank.clamp(min=0) * m, count, rounding_mode="floor")  # (B, N)
    ids = torch.arange(m, device=valid.device)
    member = (segment[:, None, :] == ids[None, :, None]) & valid[:, None, :]  # (B, m, N)
    sizes = member.sum(-1)  # (B, m)
    return member.to(dtype) / sizes.clamp(min=1)[..., None].to(dtype), sizes > 0


def _softmax(scores: Tensor, keep: Tensor) -> Tensor:
    """softmax over the kept columns, 0 on the others; a row that keeps nothing is 0 (never NaN)."""
    row_any = keep.any(-1, keepdim=True)
    scores = scores.masked_fill(~keep, float("-inf")).masked_fill(~row_any, 0.0)
    return torch.where(keep, torch.softmax(scores, dim=-1), 0.0)


def _is_self_attention(self_attention: bool | None, Nq: int, Nk: int) -> bool:
    if self_attention is None:
        return Nq == Nk
    if not isinstance(self_attention, bool):
        raise TypeError(f"self_attention must be True, False or None, got {self_attention!r}")
    if self_attention and Nq != Nk:
        raise ValueError(f"self_attention=True needs Nq == Nk (query i is key i's token), got Nq={Nq}, Nk={Nk}")
    return self_attention


def _nystrom(call: ApproxCall, m: int, iterations: int | None, self_attention: bool | None = None) -> Tensor:
    """Nyström attention on a prepared call: (B, Hq, Nq, Dv) in the call's dtype."""
    q, k, v = call.q * call.scale, call.k, call.v  # (B, H, N, D); the scale enters every score
    Nq, Nk = q.shape[2], k.shape[2]
    # more landmarks than tokens only adds empty segments, which are removed: same result, less work
    m = min(m, max(Nq, Nk))
    ones = torch.ones(1, Nk, dtype=torch.bool, device=k.device)
    key_valid = ones if call.key_valid is None else call.key_valid  # (B or 1, Nk)
    query_valid = (key_valid if _is_self_attention(self_attention, Nq, Nk)
                   else torch.ones(1, Nq, dtype=torch.bool, device=q.device))
    w_k, k_nonempty = segment_means(key_valid, m, q.dtype)  # (Bk, m, Nk), (Bk, m)
    w_q, q_nonempty = segment_means(query_valid, m, q.dtype)  # (Bq, m, Nq), (Bq, m)
    k_land = w_k[:, None] @ k  # (B, H, m, D): K~, eq. 14
    q_land = w_q[:, None] @ q  # (B, H, m, D): Q~
    kn, qn = k_nonempty[:, None, None, :], q_nonempty[:, None, :, None]  # (Bk, 1, 1, m), (Bq, 1, m, 1)
    attn1 = _softmax(q @ k_land.transpose(-1, -2), kn)  # (B, H, Nq, m): softmax(Q K~^T)
    attn2 = _softmax(q_land @ k_land.transpose(-1, -2), qn & kn)  # (B, H, m, m): softmax(Q~ K~^T)
    attn3 = _softmax(q_land @ k.transpose(-1, -2), qn & key_valid[:, None, None, :])  # (B, H, m, Nk)
    z = torch.linalg.pinv(attn2) if iterations is None else iterative_pinv(attn2, iterations)  # (B, H, m, m)
    return attn1 @ (z @ (attn3 @ v))  # (B, H, Nq, Dv): eq. 15, m x m and m x Dv products first


def nystrom_attention(q: Tensor, k: Tensor, v: Tensor, *, num_landmarks: int, mask=None,
                      scale: float | None = None, pinv_iterations: int | None = 6,
                      self_attention: bool | None = None) -> Tensor:
    """Nyström attention: softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V.

    Xiong et al. 2021, eq. 14-16 (segment-mean landmarks Q~, K~) and eq. 18 / Algorithm 1 (iterative
    pseudo-inverse). Time and memory O((Nq + Nk) m) per head; no Nq x Nk matrix is formed. See the
    module docstring for the landmarks over valid tokens, empty segments, self- vs cross-attention
    (Nq == Nk is taken as self-attention) and the differences from the ``nystrom-attention`` package.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv); float16/bfloat16/float32/float64,
            computed in float32 (float64 for float64 inputs). Hq % Hkv == 0 (GQA).
        num_landmarks: m >= 1 segments of the queries and of the keys. m >= the valid length makes
            every token its own landmark.
        mask: None or ``ak.key_padding(...)``: padded keys leave every softmax and every landmark;
            for self-attention (Nq == Nk) the padded positions leave the query landmarks too.
        scale: score scale, default 1/sqrt(D).
        pinv_iterations: iterations of ``iterative_pinv`` (6, the paper's); None for the exact
            ``torch.linalg.pinv`` (an SVD: slower, for tests and for m small).
        self_attention: True: query i is key i's token, so padded keys are padded queries too and
            leave the query landmarks; False: every query counts (cross-attention); None: True
            when Nq == Nk. Note that the query landmarks average the queries, so every output
            depends on the other queries: never use it where queries must not see each other
            (a decoder's cross-attention).

    Returns:
        (B, Hq, Nq, Dv) in q's dtype. A row with no valid key gets 0.

    Raises:
        ValueError / TypeError: bad tensors; ``ak.causal()`` (landmarks average over future tokens);
            any mask other than ``ak.key_padding``; num_landmarks or pinv_iterations not an int >= 1.
    """
    _check_landmarks(num_landmarks)
    if pinv_iterations is not None:
        _check_iterations(pinv_iterations)
    call = prepare("nystrom_attention", q, k, v, mask=mask, scale=scale, causal_why_not=CAUSAL_WHY_NOT)
    return _nystrom(call, num_landmarks, pinv_iterations, self_attention).to(call.out_dtype)


class NystromAttention(nn.Module):
    """Nyström attention (Xiong et al. 2021, eq. 14-18) as the attention core of
    ``attnkit.nn.MultiHeadAttention(core=...)``: q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D / Dv) ->
    (B, Hq, Nq, Dv).

    Args:
        num_landmarks, pinv_iterations: as in ``nystrom_attention``.
        residual_kernel: None (default: no parameters), or an odd kernel size K for the
            ``nystrom-attention`` package's residual: out + depthwise_conv(v) along the sequence, one
            (K,) kernel per query head, with v zeroed at padded positions (so appended padding still
            changes nothing). Self-attention only (Nq == Nk); needs ``num_heads``.
        num_heads: Hq, the query heads (the residual's channels); only with ``residual_kernel``.

    No recurrent form: decoding re-reads the KVCache, and a causal mask is refused.
    """

    def __init__(self, num_landmarks: int = 64, pinv_iterations: int | None = 6, *,
                 residual_kernel: int | None = None, num_heads: int | None = None):
        super().__init__()
        _check_landmarks(num_landmarks)
        if pinv_iterations is not None:
            _check_iterations(pinv_iterations)
        self.num_landmarks, self.pinv_iterations = num_landmarks, pinv_iterations
        self.residual_kernel, self.residual = residual_kernel, None
        if residual_kernel is not None:
            ok = isinstance(residual_kernel, int) and not isinstance(residual_kernel, bool)
            if not (ok and residual_kernel >= 1 and residual_kernel % 2 == 1):
                raise ValueError(f"NystromAttention: residual_kernel must be an odd int >= 1 (the package's 33) "
                                 f"or None, got {residual_kernel!r}")
            if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
                raise ValueError(f"NystromAttention: residual_kernel needs num_heads= (Hq, an int >= 1), "
                                 f"got {num_heads!r}")
            bound = residual_kernel ** -0.5  # nn.Conv2d's default init for fan_in = K
            self.residual = nn.Parameter(torch.empty(num_heads, 1, residual_kernel, 1).uniform_(-bound, bound))
        elif num_heads is not None:
            raise ValueError("NystromAttention: num_heads= is only used by residual_kernel=; leave it out")

    # Q~ averages the queries, so each output depends on the other queries: MultiHeadAttention
    # refuses such a core on cross-attention (a decoder's later target tokens would leak into earlier)
    mixes_queries = True

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, mask=None, scale: float | None = None,
                cache: object = None) -> Tensor:
        """q (B, Hq, Nq, D), k, v (B, Hkv, Nk, D / Dv) -> (B, Hq, Nq, Dv); see ``nystrom_attention``
        (Nq == Nk is taken as self-attention).

        Raises:
            ValueError: a ``cache`` (Nyström attention has no recurrent state); with the residual,
                Nq != Nk or a head count other than ``num_heads``; ``nystrom_attention``'s errors.
        """
        if cache is not None:
            raise ValueError(f"NystromAttention: cache={type(cache).__name__} given, but Nyström attention has no "
                             "recurrent form (its landmarks average the whole sequence); decode with exact "
                             "attention or a KVCache")
        call = prepare("NystromAttention", q, k, v, mask=mask, scale=scale, causal_why_not=CAUSAL_WHY_NOT)
        out = _nystrom(call, self.num_landmarks, self.pinv_iterations)  # (B, Hq, Nq, Dv)
        if self.residual is not None:
            out = out + self._residual(call)
        return out.to(call.out_dtype)

    def _residual(self, call: ApproxCall) -> Tensor:
        """depthwise_conv(v) along the sequence, padded positions zeroed: (B, Hq, N, Dv)."""
        H, Nq, Nk = call.q.shape[1], call.q.shape[2], call.k.shape[2]
        if Nq != Nk or H != self.residual.shape[0]:
            raise ValueError(f"NystromAttention: the residual conv needs self-attention with num_heads="
                             f"{self.residual.shape[0]} query heads; got Hq={H}, Nq={Nq}, Nk={Nk}")
        v = call.v if call.key_valid is None else call.v * call.key_valid[:, None, :, None].to(call.dtype)
        weight = self.residual.to(call.dtype)
        return Fn.conv2d(v, weight, padding=(self.residual_kernel // 2, 0), groups=H)

    def extra_repr(self) -> str:
        extra = "" if self.residual is None else f", residual_kernel={self.residual_kernel}"
        return f"num_landmarks={self.num_landmarks}, pinv_iterations={self.pinv_iterations}{extra}"
