"""Multi-head attention (Vaswani et al. 2017) as a module over ``attnkit.attention``, and its KV cache.

    q = x W_q, k = m W_k, v = m W_v          per head h: (B, N, E) -> (B, H, N, D)
    head_h = softmax(q_h k_h^T / sqrt(D) + bias) v_h      (attnkit.attention, any mask / impl)
    out = concat(head_1 .. head_H) W_o       (B, N, H*D) -> (B, N, E)

m is x for self-attention and the encoder's output ("memory") for cross-attention. Keys and values
may have fewer heads than queries (``num_kv_heads``: GQA, MQA). This module holds parameters,
projections and the cache; the attention math is ``attnkit.attention``'s.

Legend: B batch, N new tokens, M memory tokens, E model width, Hq / Hkv query / kv heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..bias import Bias, DenseBias, SumBias
from ..functional import attention
from ..masks import And, Causal, Mask, Or, SlidingWindow
from .positional import AttentionPositional


class KVCache:
    """Keys and values of the tokens a self-attention layer has already seen, for decoding.

    ``update(k_new, v_new)`` appends the new tokens' keys/values (B, Hkv, n, D) and returns all the
    keys/values the new queries may look at. ``position`` counts every token seen, so positional
    modules place new tokens at ``position + arange(n)`` even when old keys were dropped.

    Without a window, under ``torch.no_grad()`` (inference, ``generate``), the cache writes into a
    buffer that doubles when full (O(1) amortized per token); with autograd on it joins with
    torch.cat instead, so no tensor autograd saved is ever written in place.
    ``window``: keep only the last ``window`` keys (sliding-window decoding, memory O(window)).
    The layer's mask must then never reach further back than ``window`` keys (for example
    ``causal() & sliding_window(window, 0)``); ``MultiHeadAttention`` checks this.
    """

    def __init__(self, window: int | None = None):
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"KVCache: window must be None or an int >= 1, got {window!r}")
        self.window = window
        self.k: Tensor | None = None  # (B, Hkv, L, D)
        self.v: Tensor | None = None  # (B, Hkv, L, Dv)
        self._k_buf: Tensor | None = None  # without a window: preallocated (B, Hkv, capacity, D)
        self._v_buf: Tensor | None = None
        self.position = 0

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    @property
    def dropped(self) -> int:
        """How many of the tokens seen are no longer stored (only with ``window``)."""
        return self.position - len(self)

    def update(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Append (B, Hkv, n, D) keys and values; return (B, Hkv, L + n, D) to attend to."""
        if self.k is not None and (k_new.shape[:2] != self.k.shape[:2] or k_new.shape[3] != self.k.shape[3]):
            raise ValueError(f"KVCache: new keys {tuple(k_new.shape)} do not continue the cached "
                             f"{tuple(self.k.shape)} (same B, Hkv, D expected); call reset() for a new sequence")
        self.position += k_new.shape[2]
        if self.window is not None or torch.is_grad_enabled():  # join (autograd-safe), keep the last W
            k = k_new if self.k is None else torch.cat([self.k, k_new], dim=2)  # (B, Hkv, L + n, D)
            v = v_new if self.v is None else torch.cat([self.v, v_new], dim=2)
            keep = k.shape[2] if self.window is None else min(self.window, k.shape[2])
            self.k, self.v = k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]
            self._k_buf = self._v_buf = None
            return k, v
        L, n = len(self), k_new.shape[2]
        if self._k_buf is None or L + n > self._k_buf.shape[2]:  # grow by doubling: O(1) amortized
            self._k_buf, self._v_buf = self._grown(self.k, k_new, L, n), self._grown(self.v, v_new, L, n)
        self._k_buf[:, :, L:L + n] = k_new
        self._v_buf[:, :, L:L + n] = v_new
        self.k, self.v = self._k_buf[:, :, :L + n], self._v_buf[:, :, :L + n]  # views, (B, Hkv, L + n, D)
        return self.k, self.v

    @staticmethod
    def _grown(old: Tensor | None, new: Tensor, L: int, n: int) -> Tensor:
        cap = max(2 * (L + n), 16)
        grown = new.new_empty(*new.shape[:2], cap, new.shape[3])  # (B, Hkv, cap, D)
        if old is not None:
            grown[:, :, :L] = old
        return grown

    def reset(self) -> None:
        self.k = self.v = self._k_buf = self._v_buf = None
        self.position = 0

    def __repr__(self) -> str:
        return f"KVCache(stored={len(self)}, position={self.position}, window={self.window})"


class MemoryKVCache:
    """Cross-attention's cache: the memory's keys and values, projected once and reused per step.

    It remembers which memory tensor it was filled from and refuses another one (a new source
    sequence needs ``reset()`` or a new cache), so stale keys are never used silently.
    """

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.source: tuple[Tensor, Tensor] | None = None  # (memory, value) the keys were projected from

    def reset(self) -> None:
        self.k = self.v = self.source = None

    def holds(self, memory: Tensor, value: Tensor) -> bool:
        """True if filled from exactly these tensors; raises if filled from others."""
        if self.source is None:
            return False
        if self.source[0] is memory and self.source[1] is value:
            return True
        raise ValueError(f"this MemoryKVCache holds the keys of another memory (shape {tuple(self.source[0].shape)}), "
                         f"got memory of shape {tuple(memory.shape)}; call cache.reset() or model.new_cache() "
                         "for a new source")


def _positional_superset(mask: Mask) -> Mask | None:
    """A mask built from causal / sliding_window only that allows at least what ``mask`` allows,
    or None when no such bound follows from the structure (a data-dependent part under ``|`` or
    ``~``, e.g. global tokens, which do reach every key)."""
    if isinstance(mask, (Causal, SlidingWindow)):
        return mask
    if isinstance(mask, And):
        a, b = _positional_superset(mask.a), _positional_superset(mask.b)
        return a if b is None else b if a is None else a & b
    if isinstance(mask, Or):
        a, b = _positional_superset(mask.a), _positional_superset(mask.b)
        return None if a is None or b is None else a | b
    return None  # padding, documents, global tokens, dense masks, negations: no positional bound


def _check_window_reach(mask: Mask | Tensor | None, n: int, Nk: int, dropped: int) -> None:
    """With a bounded cache, refuse a mask that could look at a key the cache already dropped.

    The check uses the mask's positional structure only (causal, sliding windows), evaluated on
    one virtual key just before the cache; data-dependent parts (padding, documents) only narrow
    what a query sees, so they cannot make a refused mask safe or a safe one unsafe.
    """
    if not dropped:
        return
    bound = _positional_superset(mask) if isinstance(mask, Mask) else None
    if bound is None:
        raise ValueError(f"the KV cache dropped {dropped} old keys (it keeps {Nk - n}), so every query must be "
                         f"limited to a window, e.g. ak.causal() & ak.sliding_window(W, 0) with W <= the cache "
                         f"window; mask={mask!r} has no such limit. Use KVCache(window=None) for this mask")
    rows = torch.arange(n)
    reach = bound.evaluate(rows, torch.zeros(1, dtype=torch.long), n, Nk + 1)  # the key just before the cache
    if bool(reach.any()):
        raise ValueError(f"mask {mask!r} lets a query see a key the sliding-window KV cache has dropped "
                         f"(cache keeps {Nk - n} keys); use a KVCache window >= the mask's left window")


def _check_positional_fits(positional: AttentionPositional | None, num_heads: int, head_dim: int) -> None:
    rope_dim = getattr(positional, "head_dim", head_dim)
    alibi_heads = getattr(positional, "num_heads", num_heads)
    if rope_dim != head_dim or alibi_heads != num_heads:
        raise ValueError(f"positional module {positional!r} is built for head_dim={rope_dim}, num_heads={alibi_heads}; "
                         f"this attention has head_dim={head_dim}, num_heads={num_heads}")


def _check_core_fits(core: nn.Module | None, dropout: float, softcap: float | None,
                     positional: AttentionPositional | None) -> None:
    """Refuse, at construction (or ``replace_attention``), a layer the core cannot serve.

    An approximate core takes no dropout, softcap or additive bias (ALiBi); an exact core
    (``core.exact``, e.g. ``attnkit.distributed.ContextParallelAttention``) takes bias and softcap
    but no dropout; a sharded one (``core.sharded``) no RoPE whose frequencies follow each call's
    longest position ("dynamic" NTK scaling), which would differ from rank to rank.
    """
    if core is None:
        return
    if not isinstance(core, nn.Module):
        raise TypeError(f"core must be an nn.Module (an attnkit.approx core), got {type(core).__name__}")
    name = type(core).__name__
    if getattr(core, "exact", False):
        if dropout:
            raise ValueError(f"core {name}: dropout={dropout} acts on the attention probabilities, and {name} has no "
                             "dropout; build the layer with dropout=0.0 (the block's dropout on its output stays)")
        scaling = getattr(positional, "scaling", None)
        if getattr(core, "sharded", False) and getattr(scaling, "rope_type", None) == "dynamic":
            raise ValueError(f"core {name}: dynamic NTK RoPE picks its frequencies from each call's largest "
                             "position, which differs between the ranks of a sharded sequence; use another "
                             "rope_type, or run the model on one device")
        return
    if dropout or softcap is not None:
        raise ValueError(f"core {name}: dropout={dropout} / softcap={softcap} act on attention "
                         "probabilities, which an approximate core never forms; use the block's dropout instead")
    if positional is not None and positional.bias() is not None:
        raise ValueError(f"core {name}: {type(positional).__name__} is an additive bias, which an "
                         "approximate core cannot take; use RotaryEmbedding or absolute positions")


def _rotates(positional: AttentionPositional | None) -> bool:
    """True if the positional module turns q and k by their positions (RoPE), so it needs them."""
    return positional is not None and type(positional).rotate is not AttentionPositional.rotate


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention with optional GQA, positional module and KV cache.

    Args:
        embed_dim: E, width of the input and output.
        num_heads: Hq query heads.
        num_kv_heads: Hkv key/value heads (default Hq); Hq % Hkv == 0. 1 is MQA.
        head_dim: D (default E // Hq).
        kdim, vdim: width of the memory for keys / values (default E), as in torch.
        bias: biases on the q/k/v projections; ``out_bias`` on W_o (default: ``bias``).
        dropout: dropout on the attention probabilities while training.
        impl: the ``attnkit.attention`` backend ("auto" picks).
        positional: RoPE or ALiBi (``AttentionPositional``), or None.
        scale: score scale (default 1/sqrt(D)).
        softcap: cap the scores at ±softcap, ``softcap * tanh(scores / softcap)`` before the mask and
            bias (Gemma 2's ``attn_logit_softcapping``; ``attnkit.attention``'s softcap). None: no cap.
        core: an approximate attention core (``attnkit.approx``: ``LinearAttention``,
            ``PerformerAttention``, ``LinformerAttention``, ``NystromAttention``, or any module with
            ``forward(q, k, v, *, mask, scale, cache) -> out``) that replaces exact attention; the
            projections, positional module and caches stay this module's. None: exact
            ``attnkit.attention``. A core with ``new_cache()`` decodes with that constant-size state
            (``new_cache``); otherwise a ``KVCache`` holds the keys and the core sees them all.
            A core takes no additive bias (ALiBi), dropout or softcap: refused at construction.
            An *exact* core (class attribute ``exact = True``; ``forward(q, k, v, *, mask, scale,
            cache, bias, softcap)``) is handed the layer's bias (the user's plus ALiBi's) and
            softcap; only dropout is refused. A *sharded* one (``sharded = True``:
            ``attnkit.distributed.ContextParallelAttention``, x is this rank's shard of one
            sequence) also refuses ``cache=``, ``new_cache()`` and cross-attention, and with RoPE
            needs ``positions=`` (the shard's global positions).
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: int | None = None,
                 head_dim: int | None = None, kdim: int | None = None, vdim: int | None = None,
                 bias: bool = True, out_bias: bool | None = None, dropout: float = 0.0, impl: str = "auto",
                 positional: AttentionPositional | None = None, scale: float | None = None,
                 softcap: float | None = None, core: nn.Module | None = None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MultiHeadAttention: {name} must be an int >= 1, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiHeadAttention: dropout must lie in [0, 1), got {dropout}")
        if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < float("inf")):
            raise ValueError(f"MultiHeadAttention: softcap must be a finite number > 0 or None, got {softcap!r}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}; "
                                 "pass head_dim= explicitly")
            head_dim = embed_dim // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads} (GQA)")
        if positional is not None and not isinstance(positional, AttentionPositional):
            raise TypeError(f"positional must be an AttentionPositional (RotaryEmbedding, ALiBi) or None, got "
                            f"{type(positional).__name__}; absolute encodings are added to the embeddings instead")
        _check_positional_fits(positional, num_heads, head_dim)
        _check_core_fits(core, dropout, softcap, positional)
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.dropout, self.impl, self.scale, self.positional = dropout, impl, scale, positional
        self.softcap = None if softcap is None else float(softcap)
        self.core = core
        self.observers: list = []  # callables (q, k, mask, bias, scale, *, v): attnkit.viz.capture, approx.audit
        self.q_proj = nn.Linear(embed_dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, num_kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias if out_bias is None else out_bias)

    def _heads(self, x: Tensor, H: int) -> Tensor:
        B, N, _ = x.shape
        return x.view(B, N, H, self.head_dim).transpose(1, 2)  # (B, H, N, D)

    def _bias(self, bias: Bias | Tensor | None) -> Bias | Tensor | None:
        """The user's bias plus the positional module's (ALiBi), kept structured (never N x N)."""
        pos_bias = self.positional.bias() if self.positional is not None else None
        if pos_bias is None or bias is None:
            return bias if pos_bias is None else pos_bias
        return SumBias((bias if isinstance(bias, Bias) else DenseBias(bias), pos_bias))

    def forward(self, x: Tensor, memory: Tensor | None = None, value: Tensor | None = None, *,
                mask: Mask | Tensor | None = None, bias: Bias | Tensor | None = None,
                cache: KVCache | MemoryKVCache | None = None, positions: Tensor | None = None) -> Tensor:
        """Attend: x (B, N, E), memory (B, M, kdim) for cross-attention -> (B, N, E).

        Args:
            x: (B, N, E) the queries' input (batch first), float in the module's dtype.
            memory: (B, M, kdim) keys' input for cross-attention; None: self-attention over x.
            value: (B, M, vdim) a separate value input (torch's ``mha(query, key, value)``);
                default: the memory.
            mask, bias: ``attnkit.attention``'s, over (N, keys): keys are the cached ones followed
                by the new ones (self-attention, L + N), or the memory (cross-attention, M). A bool
                mask tensor broadcasts to (B, Hq, N, keys), True = may attend; a float bias adds.
            cache: ``KVCache`` (self-attention: appends this call's keys/values) or
                ``MemoryKVCache`` (cross-attention: projects the memory once), updated in place.
            positions: (N,) or (B, N) integer positions of the new tokens, for the positional
                module's rotation (default: after the cached ones, ``cache.position + arange(N)``).
                Only rotations (RoPE) read them: ALiBi's ``-slope * |i - j|`` and the masks count
                array indices (key j against query i's index, bottom-right aligned), as cached keys
                do. A batch with padding between real tokens therefore needs its real tokens made
                contiguous first; ``Encoder`` and ``DecoderLM`` do this (or refuse, with a cache).
                With a sharded core (context parallelism) they are this rank's tokens' global
                positions (``core.positions(N)``), required when the positional module rotates.

        Returns:
            (B, N, E) in x's dtype.

        Raises:
            ValueError: x not (B, N, E); memory / value of mismatched shapes; value= without
                memory=; a bounded cache whose mask reaches a dropped key; a cache filled from
                another memory; ``attnkit.attention``'s errors (mask, bias, an impl that cannot run);
                with a sharded core: cache=, memory= (cross-attention), or no positions= with RoPE.
            TypeError: the wrong kind of cache for self- / cross-attention.
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"MultiHeadAttention: expected x of shape (B, N, E={self.embed_dim}), got "
                             f"{tuple(x.shape)}; inputs are batch-first")
        if getattr(self.core, "sharded", False):
            self._check_sharded_call(memory, cache, positions)
        q = self._heads(self.q_proj(x), self.num_heads)  # (B, Hq, N, D)
        if memory is None:
            if value is not None:
                raise ValueError("value= needs memory= (cross-attention); self-attention projects x")
            q, k, v, dropped = self._self_qkv(q, x, cache, positions)
        else:
            k, v = self._memory_kv(memory, memory if value is None else value, cache)
            dropped = 0
        Nq, Nk = q.shape[2], k.shape[2]
        _check_window_reach(mask, Nq, Nk, dropped)  # a core reads the same windowed KVCache: same check
        if self.core is not None:
            return self._core_forward(q, k, v, mask, bias, cache, cross=memory is not None)
        bias = self._bias(bias) if memory is None else bias
        for observe in self.observers:  # attnkit.viz.capture, approx.audit: keep references; compute nothing here
            observe(q, k, mask, bias, self.scale, v=v)
        out = attention(q, k, v, mask=mask, bias=bias, scale=self.scale, softcap=self.softcap,
                        dropout_p=self.dropout if self.training else 0.0, impl=self.impl)  # (B, Hq, N, D)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (B, N, E)

    def new_cache(self, window: int | None = None) -> object:
        """This layer's decoding state: the core's own (``KernelState``: constant size) if it has one,
        else a ``KVCache(window)``."""
        if getattr(self.core, "sharded", False):
            self._check_sharded_call(None, True, None)
        if self.core is not None and hasattr(self.core, "new_cache"):
            return self.core.new_cache()
        return KVCache(window)

    def _core_forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask | Tensor | None,
                      bias: Bias | Tensor | None, cache: object, cross: bool) -> Tensor:
        """The approximate core in place of exact attention; q, k, v (B, H, N, D) -> (B, N, E)."""
        if cross and getattr(self.core, "mixes_queries", False):
            raise ValueError(f"{type(self.core).__name__} mixes the queries (its landmarks average them), so in "
                             "cross-attention each target token would see later target tokens; use it for "
                             "self-attention only, or another core (Performer, linear, Linformer) here")
        state = None if cache is None or isinstance(cache, (KVCache, MemoryKVCache)) else cache
        if getattr(self.core, "exact", False):  # exact softmax attention: the layer's bias and softcap too
            out = self.core(q, k, v, mask=mask, scale=self.scale, cache=state,
                            bias=bias if cross else self._bias(bias), softcap=self.softcap)  # (B, Hq, N, Dv)
            return self.out_proj(out.transpose(1, 2).flatten(2))  # (B, N, E)
        if bias is not None:
            raise ValueError(f"MultiHeadAttention with core {type(self.core).__name__}: bias= given, but an "
                             "approximate core takes no additive bias; use RoPE or absolute positions")
        out = self.core(q, k, v, mask=mask, scale=self.scale, cache=state)  # (B, Hq, N, Dv)
        return self.out_proj(out.transpose(1, 2).flatten(2))  # (B, N, E)

    def _check_sharded_call(self, memory: Tensor | None, cache: object, positions: Tensor | None) -> None:
        """A sharded core (context parallelism): x is this rank's shard of one sequence, so refuse
        what needs the whole sequence here (decoding, cross-attention) or silently misplaces it."""
        name = type(self.core).__name__
        if cache is not None:
            raise ValueError(f"MultiHeadAttention with core {name}: a KV cache (decoding) was asked for, but the "
                             "sequence is sharded across ranks; context parallelism is for training and prefill of "
                             "long sequences. Decode on one device: attnkit.approx.replace_attention(model, None) "
                             "puts exact attention back")
        if memory is not None:
            raise ValueError(f"MultiHeadAttention with core {name}: memory= given (cross-attention), but the core "
                             "attends within one sharded sequence (self-attention); keep exact attention in "
                             "cross-attention layers")
        if positions is None and _rotates(self.positional):
            raise ValueError(f"MultiHeadAttention with core {name}: {type(self.positional).__name__} needs the global "
                             "positions of this rank's tokens; pass positions=core.positions(N) "
                             "(attnkit.distributed.positions(layout, rank, world, N))")

    def _owns_state(self, cache: object) -> bool:
        """A cache made by this layer's core (its recurrent state), not a KVCache (a core whose
        ``new_cache`` returns a KVCache decodes by re-reading the keys, which this layer stores)."""
        return (self.core is not None and hasattr(self.core, "new_cache")
                and not isinstance(cache, (KVCache, MemoryKVCache))
                and type(cache) is type(self.core.new_cache()))

    def _self_qkv(self, q: Tensor, x: Tensor, cache: KVCache | None,
                  positions: Tensor | None) -> tuple[Tensor, Tensor, Tensor, int]:
        """Project x to k, v, place q and k at their positions, join the cache.

        Returns q (B, Hq, N, D), k / v (B, Hkv, L + N, D) and how many old keys the cache dropped.
        """
        state = cache if self._owns_state(cache) else None
        if cache is not None and state is None and not isinstance(cache, KVCache):
            raise TypeError(f"self-attention takes a KVCache (or its core's state, from new_cache()), got "
                            f"{type(cache).__name__}")
        k = self._heads(self.k_proj(x), self.num_kv_heads)  # (B, Hkv, N, D)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if self.positional is not None:  # new keys are rotated once, before they enter the cache
            if positions is None:
                start = 0 if cache is None else cache.position
                positions = torch.arange(start, start + x.shape[1], device=x.device)  # (N,)
            q, k = self.positional.rotate(q, k, positions, positions)
        if cache is None or state is not None:  # a core's recurrent state takes the keys itself
            return q, k, v, 0
        dropped = cache.dropped
        k, v = cache.update(k, v)  # (B, Hkv, L + N, D)
        return q, k, v, dropped

    def _memory_kv(self, memory: Tensor, value: Tensor, cache: MemoryKVCache | None) -> tuple[Tensor, Tensor]:
        """memory (B, M, kdim), value (B, M, vdim) -> k (B, Hkv, M, D), v (B, Hkv, M, D); cached once."""
        if cache is not None and not isinstance(cache, MemoryKVCache):
            raise TypeError(f"cross-attention takes a MemoryKVCache, got {type(cache).__name__}")
        if cache is not None and cache.holds(memory, value):
            return cache.k, cache.v
        if memory.dim() != 3 or value.dim() != 3 or memory.shape[:2] != value.shape[:2]:
            raise ValueError(f"expected memory (B, M, kdim) and value (B, M, vdim) with the same B, M; got "
                             f"{tuple(memory.shape)} and {tuple(value.shape)}")
        k = self._heads(self.k_proj(memory), self.num_kv_heads)  # (B, Hkv, M, D)
        v = self._heads(self.v_proj(value), self.num_kv_heads)
        if cache is not None:
            cache.k, cache.v, cache.source = k, v, (memory, value)
        return k, v

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, **kwargs) -> "MultiHeadAttention":
        """An attnkit copy of ``torch.nn.MultiheadAttention`` with its weights (same outputs).

        attnkit modules are batch-first: for a torch module with ``batch_first=False`` feed
        ``x.transpose(0, 1)``. ``kwargs`` go to the constructor (``impl=``, ``positional=``, ...).
        """
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("from_torch: add_bias_kv=True / add_zero_attn=True append extra key positions; "
                             "attnkit does not model them. Build the module without them")
        E, H = mha.embed_dim, mha.num_heads
        has_bias = mha.in_proj_bias is not None
        new = cls(E, H, kdim=mha.kdim, vdim=mha.vdim, bias=has_bias, out_bias=mha.out_proj.bias is not None,
                  dropout=mha.dropout, **kwargs)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for proj, w in zip((new.q_proj, new.k_proj, new.v_proj), (wq, wk, wv)):
                proj.weight.copy_(w)
            if has_bias:
                for proj, b in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3)):
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}" + ("" if self.core is not None else f", impl={self.impl!r}") + ("" if self.softcap is None else f", softcap={self.softcap}"))
