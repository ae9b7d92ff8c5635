"""Longformer self-attention (Beltagy et al., 2020) as an attnkit module, a drop-in for HF's.

``LongformerSelfAttention`` computes what ``transformers``' module of the same name computes
(same parameter names, same output), but states the pattern in the attnkit mask language and
lets ``attnkit.attention`` pick the kernel, so it has no "N must be a multiple of the window"
rule and no chunking code of its own:

- local rows: ``(sliding_window(w) | global_tokens(g)) & key_padding(valid)`` with the
  ``query / key / value`` projections, w the one-sided window (HF's ``attention_window // 2``);
- global rows: every real key, with the ``query_global / key_global / value_global``
  projections; they overwrite the local result at the global positions;
- padding rows: 0 (HF zeroes their attention probabilities).

``attnkit.viz.capture`` records both attentions through the module's ``observers`` (references to
tensors the forward pass computes anyway), so the dense map can be rebuilt on demand.

Legend: B batch, N tokens, E hidden size, H heads, D head dim (E = H * D), G the most global
tokens any sample of the batch has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ..functional import attention, backends
from ..masks import Mask, global_tokens, sliding_window
from ..masks import key_padding as key_padding_mask  # forward's key_padding= argument is data, not this

PROJECTIONS = ("query", "key", "value", "query_global", "key_global", "value_global")  # HF's names
HF_MASK_HELP = ("attention_mask uses HF's user-facing convention: shape (B, N), 0 = padding, 1 = local "
                "attention, 2 = global attention (LongformerModel's attention_mask * (global_attention_mask "
                "+ 1)), not the extended 0 / -inf / +inf mask HF passes between layers")


# -- which tokens are real, which are global ---------------------------------------------------

@dataclass(frozen=True)
class TokenRoles:
    """Per-sample token roles, normalized. ``None`` means "no token of that kind" so the masks
    (and the backend choice) stay as simple as the input allows."""

    valid: Tensor | None  # (B, N) bool, True = real token; None: every token is real
    is_global: Tensor | None  # (B, N) bool, True = global (always a real token); None: no global token


def roles_from_hf_mask(attention_mask: Tensor, B: int, N: int, device: torch.device) -> TokenRoles:
    """Parse HF's 0 (padding) / 1 (local) / 2 (global) mask (B, N); bool reads as 0/1."""
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}; {HF_MASK_HELP}")
    if tuple(attention_mask.shape) != (B, N):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (B, N) = ({B}, {N}) "
                         f"to match hidden_states. {HF_MASK_HELP}")
    m = attention_mask.to(device)
    if m.dtype == torch.bool:
        return normalized_roles(m, None)
    bad = (m != 0) & (m != 1) & (m != 2)
    if bool(bad.any()):
        raise ValueError(f"attention_mask holds {m[bad][0].item()!r}; expected only the values 0, 1, 2. "
                         f"{HF_MASK_HELP}")
    return normalized_roles(m != 0, m == 2)


def valid_from_key_padding(kp: Tensor | Sequence[int], B: int, N: int, device: torch.device) -> Tensor:
    """key_padding as bool (B, N) (True = real token) or lengths (B,) -> bool (B, N)."""
    t = torch.as_tensor(kp, device=device)
    if t.dtype == torch.bool:
        if tuple(t.shape) != (B, N):
            raise ValueError(f"key_padding as a bool mask has shape {tuple(t.shape)}; expected (B, N) = "
                             f"({B}, {N}) with True = real token (or pass lengths of shape (B,))")
        return t
    if t.is_floating_point() or t.is_complex() or tuple(t.shape) != (B,):
        raise ValueError(f"key_padding got dtype={t.dtype} shape={tuple(t.shape)}; expected integer lengths "
                         f"of shape (B,) = ({B},) or a bool mask (B, N) = ({B}, {N}) with True = real token")
    if B and (int(t.min()) < 0 or int(t.max()) > N):
        raise ValueError(f"key_padding lengths must lie in [0, N={N}], got min={int(t.min())} max={int(t.max())}")
    return torch.arange(N, device=device)[None, :] < t[:, None]  # (B, N)


def flags_from_global_indices(gi: Tensor | Sequence[int], B: int, N: int, device: torch.device) -> Tensor:
    """global_indices as 1-D positions shared by the batch, or bool (B, N) -> bool (B, N)."""
    t = torch.as_tensor(gi, device=device)
    if t.dtype == torch.bool:
        if tuple(t.shape) != (B, N):
            raise ValueError(f"global_indices as a bool mask has shape {tuple(t.shape)}; expected (B, N) = "
                             f"({B}, {N}) with True = global token (or pass 1-D positions shared by the batch)")
        return t
    if t.numel() == 0:
        t = t.long().reshape(0)
    if t.is_floating_point() or t.is_complex() or t.dim() != 1:
        raise ValueError(f"global_indices got dtype={t.dtype} shape={tuple(t.shape)}; expected 1-D integer "
                         f"positions shared by the batch, or a bool mask (B, N) = ({B}, {N})")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= N):
        raise ValueError(f"global_indices must lie in [0, N={N}), got min={int(t.min())} max={int(t.max())}")
    flags = torch.zeros(B, N, dtype=torch.bool, device=device)
    flags[:, t.long()] = True
    return flags  # (B, N)


def normalized_roles(valid: Tensor | None, is_global: Tensor | None) -> TokenRoles:
    """Padding wins over global (a padding token is never global, as in HF's 0/1/2 mask, where a
    token is one or the other); all-real -> valid None, no global -> is_global None."""
    if valid is not None:
        if is_global is not None:
            is_global = is_global & valid
        if bool(valid.all()):
            valid = None
    if is_global is not None and not bool(is_global.any()):
        is_global = None
    return TokenRoles(valid, is_global)


def token_roles(B: int, N: int, device: torch.device, attention_mask: Tensor | None,
                kp: Tensor | Sequence[int] | None, gi: Tensor | Sequence[int] | None) -> TokenRoles:
    """One of the two conventions (HF's 0/1/2 mask, or key_padding / global_indices), never both."""
    if attention_mask is not None:
        if kp is not None or gi is not None:
            raise ValueError("got attention_mask (HF's 0/1/2 convention) and key_padding= / global_indices= "
                             "together; use one convention: either attention_mask alone, or key_padding and/or "
                             "global_indices")
        return roles_from_hf_mask(attention_mask, B, N, device)
    valid = None if kp is None else valid_from_key_padding(kp, B, N, device)
    is_global = None if gi is None else flags_from_global_indices(gi, B, N, device)
    return normalized_roles(valid, is_global)


def local_mask(window: int, roles: TokenRoles) -> Mask:
    """The local rows' pattern: a +-window band, plus the global columns (and rows), minus padding keys."""
    mask = sliding_window(window)
    if roles.is_global is not None:
        mask = mask | global_tokens(roles.is_global)
    if roles.valid is not None:
        mask = mask & key_padding_mask(roles.valid)
    return mask


def global_slots(is_global: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's global positions, in order, left-aligned and padded to the batch's most, G.

    Returns ``idx`` (B, G) long and ``real`` (B, G) bool (False on filler slots). Filler slots
    hold the sample's first non-global positions, so the G indices of a row are distinct and a
    scatter through them never collides.
    """
    counts = is_global.sum(1)  # (B,)
    G = int(counts.max())
    idx = torch.sort((~is_global).to(torch.int8), dim=1, stable=True).indices[:, :G]  # (B, G)
    real = torch.arange(G, device=is_global.device)[None, :] < counts[:, None]  # (B, G)
    return idx, real


@dataclass(frozen=True)
class GlobalRows:
    """The second attention of a layer: the global tokens' queries, by slot (``global_slots``),
    over every real key, with the global projections."""

    idx: Tensor  # (B, G) long: the position each slot holds
    real: Tensor  # (B, G) bool: False on filler slots (the sample has fewer than G global tokens)
    q: Tensor  # (B, H, G, D) query_global of the slots' tokens
    k: Tensor  # (B, H, N, D) key_global of every token
    v: Tensor  # (B, H, N, D) value_global of every token
    mask: Mask | None  # key_padding(valid) over (G, N); None when every token is real


@dataclass(frozen=True)
class LongformerPass:
    """What one call computed: the output and what its attention maps can be rebuilt from."""

    out: Tensor  # (B, N, E) the layer's output
    q: Tensor  # (B, H, N, D) local queries (query projection)
    k: Tensor  # (B, H, N, D) local keys (key projection)
    mask: Mask  # the local pass's mask over (N, N)
    roles: TokenRoles
    glob: GlobalRows | None  # None without global tokens


# -- the module --------------------------------------------------------------------------------

def _check_config(hidden_size: int, num_heads: int, attention_window: int, dropout: float, impl: str) -> None:
    sizes = (("hidden_size", hidden_size), ("num_heads", num_heads), ("attention_window", attention_window))
    for name, n in sizes:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"{name} must be an int, got {type(n).__name__}")
        if n <= 0:
            raise ValueError(f"{name}={n}: expected a positive integer")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}; pick num_heads "
                         f"dividing it (head_dim = hidden_size // num_heads)")
    if attention_window % 2:
        raise ValueError(f"attention_window={attention_window} is odd; it is the total two-sided window "
                         f"(HF's config.attention_window[layer_id]) and must be even: each token sees "
                         f"attention_window // 2 tokens on each side (e.g. {attention_window + 1})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout}: expected a probability in [0, 1)")
    if impl != "auto" and impl not in backends():
        raise ValueError(f"impl={impl!r} is not a backend; choose 'auto' or one of {sorted(backends())}")


class LongformerSelfAttention(nn.Module):
    """Longformer self-attention, output-identical to ``transformers``' ``LongformerSelfAttention``.

    Args:
        hidden_size: E, the model width (input and output size).
        num_heads: H; E must be a multiple of H (D = E // H).
        attention_window: the total two-sided window, even (HF's ``config.attention_window[layer_id]``);
            each token attends to ``attention_window // 2`` tokens on each side, plus itself.
        dropout: dropout on the attention probabilities, used in training mode only.
        impl: the attnkit backend of the windowed attention (``"banded"`` is the O(N·W) one). The
            global rows (G queries over every key, no window) use the same backend, except that
            ``"banded"``, which runs windowed masks only, leaves them to ``"auto"``.

    Parameters carry HF's names (``query``, ``key``, ``value``, ``query_global``, ``key_global``,
    ``value_global``), so HF state dicts load as they are. Unlike HF, any N works.
    """

    def __init__(self, hidden_size: int, num_heads: int, attention_window: int, dropout: float = 0.0,
                 impl: str = "auto", *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        _check_config(hidden_size, num_heads, attention_window, dropout, impl)
        self.embed_dim, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        self.one_sided_attn_window_size = attention_window // 2
        self.dropout, self.impl = float(dropout), impl
        kw = dict(device=device, dtype=dtype)
        self.query = nn.Linear(hidden_size, hidden_size, **kw)
        self.key = nn.Linear(hidden_size, hidden_size, **kw)
        self.value = nn.Linear(hidden_size, hidden_size, **kw)
        self.query_global = nn.Linear(hidden_size, hidden_size, **kw)
        self.key_global = nn.Linear(hidden_size, hidden_size, **kw)
        self.value_global = nn.Linear(hidden_size, hidden_size, **kw)
        # callables (q, k, mask, roles, global_rows) with the local pass's q, k (B, H, N, D) and mask,
        # the TokenRoles and the GlobalRows (None without global tokens); set by attnkit.viz.capture
        self.observers: list = []

    @classmethod
    def from_hf(cls, hf_module: nn.Module, *, impl: str = "auto",
                share_weights: bool = False) -> LongformerSelfAttention:
        """Build from a ``transformers`` ``LongformerSelfAttention``: same sizes, window, dropout,
        device, dtype and train/eval mode.

        ``share_weights=False`` copies the weights (later changes to HF's do not leak in);
        ``share_weights=True`` reuses HF's six ``nn.Linear`` submodules themselves (the same
        Parameter objects: no copy, an optimizer built on either sees both).

        Raises:
            TypeError: hf_module is not transformers' LongformerSelfAttention (lacks its attributes).
            ValueError: num_heads * head_dim != embed_dim.
        """
        needed = ("num_heads", "head_dim", "embed_dim", "one_sided_attn_window_size", "dropout", "query")
        missing = [a for a in needed if not hasattr(hf_module, a)]
        if missing:
            raise TypeError(f"from_hf expects transformers' LongformerSelfAttention; {type(hf_module).__name__} "
                            f"lacks {missing}")
        if hf_module.num_heads * hf_module.head_dim != hf_module.embed_dim:
            raise ValueError(f"HF module has num_heads={hf_module.num_heads} * head_dim={hf_module.head_dim} != "
                             f"embed_dim={hf_module.embed_dim}; attnkit needs embed_dim = num_heads * head_dim")
        w = hf_module.query.weight
        module = cls(hf_module.embed_dim, hf_module.num_heads, 2 * hf_module.one_sided_attn_window_size,
                     dropout=hf_module.dropout, impl=impl, device="meta" if share_weights else w.device,
                     dtype=w.dtype)
        if share_weights:  # the meta placeholders are replaced by HF's own layers
            for name in PROJECTIONS:
                setattr(module, name, getattr(hf_module, name))
        else:
            module.load_state_dict(hf_module.state_dict())  # copies values into our own parameters
        return module.train(hf_module.training)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *,
                key_padding: Tensor | Sequence[int] | None = None,
                global_indices: Tensor | Sequence[int] | None = None) -> Tensor:
        """Attend and return the per-head outputs concatenated, (B, N, E), before any output projection.

        Args:
            hidden_states: (B, N, E).
            attention_mask: HF's user-facing mask (B, N): 0 = padding, 1 = local, 2 = global
                (``attention_mask * (global_attention_mask + 1)`` in LongformerModel). A bool mask
                reads as 0/1. Not the extended -inf/0/+inf mask HF passes between its layers.
            key_padding: instead of attention_mask: bool (B, N), True = real token, or lengths (B,).
            global_indices: instead of attention_mask: 1-D positions shared by the batch, or bool
                (B, N). A position that is also padding counts as padding.

        Padding rows come out 0, as in HF. Without any mask every token is real and local.

        Returns:
            (B, N, E) in hidden_states' dtype (E = H * D, head h in channels h*D .. (h+1)*D - 1).

        Raises:
            TypeError: hidden_states or attention_mask not a tensor.
            ValueError: hidden_states not (B, N, E) with N >= 1; a mask of another shape, values
                other than 0/1/2, lengths or indices out of range; attention_mask together with
                key_padding= / global_indices=.
        """
        B, N = self._check_hidden(hidden_states)
        roles = token_roles(B, N, hidden_states.device, attention_mask, key_padding, global_indices)
        return self._attend(hidden_states, roles).out

    def _attend(self, x: Tensor, roles: TokenRoles) -> LongformerPass:
        """The layer on checked hidden states x (B, N, E) and parsed roles; keeps what it computed
        (the transformers integration rebuilds HF's ``output_attentions`` from it)."""
        B, N, _ = x.shape
        dropout_p = self.dropout if self.training else 0.0
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))  # (B, H, N, D)
        # scale=None is 1/sqrt(D): HF divides q by sqrt(D) before q k^T, the same up to rounding
        mask = local_mask(self.one_sided_attn_window_size, roles)
        out = attention(q, k, v, mask=mask, dropout_p=dropout_p, impl=self.impl)  # (B, H, N, D)
        glob = None if roles.is_global is None else self._global_rows(x, roles)
        if glob is not None:
            out = self._overwrite_global_rows(out, glob, dropout_p)
        for observe in self.observers:  # attnkit.viz.capture: keeps references; computes nothing here
            observe(q, k, mask, roles, glob)
        if roles.valid is not None:  # HF zeroes the attention probabilities of padding queries
            out = out.masked_fill(~roles.valid[:, None, :, None], 0.0)  # (B, H, N, D)
        out = out.transpose(1, 2).reshape(B, N, self.embed_dim)  # (B, N, E)
        return LongformerPass(out, q, k, mask, roles, glob)

    def _global_rows(self, x: Tensor, roles: TokenRoles) -> GlobalRows:
        """The global projections: queries of the global tokens (by slot), keys and values of all."""
        idx, real = global_slots(roles.is_global)  # (B, G), (B, G)
        B, G = idx.shape
        x_g = x.gather(1, idx[:, :, None].expand(B, G, self.embed_dim))  # (B, G, E)
        q_g = self._heads(self.query_global(x_g))  # (B, H, G, D)
        k_g, v_g = self._heads(self.key_global(x)), self._heads(self.value_global(x))  # (B, H, N, D)
        mask = None if roles.valid is None else key_padding_mask(roles.valid)
        return GlobalRows(idx, real, q_g, k_g, v_g, mask)

    def _overwrite_global_rows(self, out: Tensor, glob: GlobalRows, dropout_p: float) -> Tensor:
        """Global tokens' rows of ``out`` (B, H, N, D), recomputed with the global projections over
        every real key. Samples with fewer than G global tokens fill their slots and drop them."""
        B, G = glob.idx.shape
        impl = "auto" if self.impl == "banded" else self.impl  # no window here: nothing for banded
        out_g = attention(glob.q, glob.k, glob.v, mask=glob.mask, dropout_p=dropout_p,
                          impl=impl)  # (B, H, G, D)
        idx4 = glob.idx[:, None, :, None].expand(B, self.num_heads, G, self.head_dim)  # (B, H, G, D)
        keep = out.gather(2, idx4)  # filler slots write back what was there
        return out.scatter(2, idx4, torch.where(glob.real[:, None, :, None], out_g, keep))  # (B, H, N, D)

    def _heads(self, t: Tensor) -> Tensor:
        """(B, N, E) -> (B, H, N, D); head h owns channels h*D .. (h+1)*D - 1, as in HF."""
        B, N, _ = t.shape
        return t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def _check_hidden(self, x: object) -> tuple[int, int]:
        if not isinstance(x, Tensor):
            raise TypeError(f"hidden_states must be a tensor (B, N, E), got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"hidden_states has shape {tuple(x.shape)}; expected (B, N, E) with "
                             f"E = hidden_size = {self.embed_dim}")
        if x.shape[1] == 0:
            raise ValueError("hidden_states has N = 0 tokens; expected at least one")
        return x.shape[0], x.shape[1]

    def extra_repr(self) -> str:
        return (f"hidden_size={self.embed_dim}, num_heads={self.num_heads}, "
                f"attention_window={2 * self.one_sided_attn_window_size}, dropout={self.dropout}, "
                f"impl={self.impl!r}")
