"""Models composed from blocks: a BERT-style encoder, a decoder-only LM, an encoder-decoder.

Each model takes its parts as constructor arguments (embeddings, a list of blocks, a final norm,
a head), so BERT, GPT-2- and Llama-style models are the same classes with different parts; the
builders in ``attnkit.pretrained`` assemble them from checkpoints.

Legend: B batch, N tokens, T generated tokens, S source tokens, E width, V vocabulary.
"""

from __future__ import annotations

import operator
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..masks import And, Causal, KeyPadding, Mask, Not, Or, SlidingWindow, causal, key_padding
from .attention import KVCache, MultiHeadAttention
from .block import BlockCache, Context
from .positional import LearnedPositionalEmbedding, _positions


class TokenEmbeddings(nn.Module):
    """ids (B, N) -> (B, N, E): token embedding, optional absolute position encoding and
    token-type (segment) embedding, optional norm and dropout (BERT's embedding layer)."""

    def __init__(self, vocab_size: int, embed_dim: int, *, positional: nn.Module | None = None,
                 num_token_types: int = 0, norm: nn.Module | None = None, dropout: float = 0.0):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, embed_dim)
        self.positional = positional
        self.token_types = nn.Embedding(num_token_types, embed_dim) if num_token_types else None
        self.norm = norm
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None, offset: int | Tensor = 0) -> Tensor:
        """Embed token ids: (B, N) -> (B, N, E).

        Args:
            input_ids: (B, N) int64 / int32 ids in 0..V-1.
            token_type_ids: (B, N) segment ids in 0..num_token_types-1 (default all 0); used only
                when the module was built with ``num_token_types``.
            offset: the position of the first token (int, for a KV cache), or positions (N,) /
                (B, N) per token (left-padded batches); read by the absolute positional encoding.

        Returns:
            (B, N, E) in the embedding table's dtype.

        Raises:
            ValueError: input_ids not (B, N) integers, or ids outside the vocabulary.
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected input_ids of shape (B, N) and an integer dtype, got "
                             f"{tuple(input_ids.shape)} {input_ids.dtype}")
        V = self.tokens.num_embeddings
        checkable = input_ids.numel() and not torch.compiler.is_compiling()  # the check syncs; graphs skip it
        if checkable and (int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            raise ValueError(f"input_ids hold {int(input_ids.min())}..{int(input_ids.max())}; the vocabulary "
                             f"has ids 0..{V - 1}")
        x = self.tokens(input_ids)  # (B, N, E)
        if self.positional is not None:
            x = self.positional(x, offset)
        if self.token_types is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            x = x + self.token_types(types)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


def _check_mask(owner: str, mask: object, optional: bool) -> None:
    """A model's ``mask`` is an attnkit mask (it is combined with the padding by ``&``)."""
    if isinstance(mask, Mask) or (optional and mask is None):
        return
    allowed = "an attnkit Mask" + (" or None" if optional else "")
    raise TypeError(f"{owner}: mask must be {allowed} (e.g. ak.causal(), ak.sliding_window(128)), got "
                    f"{type(mask).__name__}; padding goes in attention_mask=, per call")


# -- padding: HF's attention_mask, and where real tokens sit ------------------------------------------
#
# Everything that measures distance inside attention counts array indices, not tokens: ALiBi's
# -slope * |i - j|, sliding windows, global-token indices, a learned table's row when positions are
# not given. A row padded on the right has every real token at its true index, so the models run a
# padded batch in that layout: rows padded elsewhere (left, between tokens) are reordered, real
# tokens first in their order, run, and put back. A KV cache cannot be reordered (its keys are
# stored): there, padding between real tokens is refused when the model measures distance (ALiBi,
# windows), and padding before them when its mask picks absolute indices (global tokens); see
# ``DecoderLM._check_cached_layout``. Left padding is fine for distances: they do not change under a
# shift.

def _token_mask(attention_mask: object, what: str = "attention_mask") -> Tensor:
    """HF-style mask, 1 = real token / 0 = padding, as bool. Only 0 and 1 are accepted (bool, or
    integer / float tensors holding nothing else): a 2 or a 0.5 is not silently read as "token"."""
    if not isinstance(attention_mask, Tensor):
        try:
            attention_mask = torch.as_tensor(attention_mask)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{what} must be a tensor (B, N) of 0 (padding) and 1 (real token), got "
                            f"{type(attention_mask).__name__}") from None
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_complex():
        raise ValueError(f"{what} has dtype {attention_mask.dtype}; expected bool, or integers / floats holding "
                         "only 0 (padding) and 1 (real token)")
    bad = (attention_mask != 0) & (attention_mask != 1)
    if bool(bad.any()):
        where = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(f"{what} holds {attention_mask[bad][0].item()!r} at {where}; expected only 0 "
                         f"(padding) and 1 (real token), as bool or integer / float. Build it as "
                         f"(ids != pad_id).long(), or lengths -> arange(N) < lengths[:, None]")
    return attention_mask != 0


def _padding_mask(attention_mask: Tensor | None, shape: tuple[int, int],
                  what: str = "attention_mask") -> Mask | None:
    """HF-style (B, N) 1 = token / 0 = padding -> ak.key_padding, or None."""
    valid = _valid_tokens(attention_mask, shape, what)
    return None if valid is None else key_padding(valid)


def _valid_tokens(attention_mask: Tensor | None, shape: tuple[int, int], what: str = "attention_mask",
                  device: torch.device | None = None, expected: str | None = None) -> Tensor | None:
    """Checked bool (B, N), True = real token; None when there is no mask or no padding (so the
    mask-free fast paths stay). ``expected`` explains the shape in the error (default (B, N))."""
    if attention_mask is None:
        return None
    valid = _token_mask(attention_mask, what)
    if tuple(valid.shape) != shape:
        raise ValueError(f"{what} has shape {tuple(valid.shape)}; expected "
                         f"{expected or f'(B, N) = {shape}, 1 for real tokens and 0 for padding'}")
    valid = valid if device is None else valid.to(device)
    return None if bool(valid.all()) else valid


def _real_first(valid: Tensor) -> Tensor | None:
    """(B, N) permutation that moves each row's real tokens to its front, in order (right padding,
    where a real token's index is its position), or None when every row already is laid out so."""
    if bool((valid[:, 1:] <= valid[:, :-1]).all()):
        return None
    return torch.sort(valid.to(torch.uint8), dim=1, descending=True, stable=True).indices  # (B, N)


def _restore(x: Tensor, order: Tensor) -> Tensor:
    """Undo ``_real_first``: x (B, N, ...) in the reordered layout -> the caller's layout."""
    inverse = order.argsort(dim=1).to(x.device)  # (B, N)
    return x.gather(1, inverse.view(*inverse.shape, *([1] * (x.dim() - 2))).expand_as(x))


def _token_positions(valid: Tensor, N: int) -> Tensor:
    """Positions (B, N) of the last N tokens of ``valid`` (B, L + N): real tokens before, from 0.
    A padding token takes its left neighbour's (0 at the start), so a table never overflows."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)[:, valid.shape[1] - N:]


def _reorder_query_mask(mask: Mask | Tensor | None, order: Tensor, N: int, S: int) -> Mask | Tensor | None:
    """A cross-attention mask over (N queries, S keys) for queries reordered by ``order`` (B, N).
    Key padding does not depend on the query; anything else is made dense (B, H?, N, S) and gathered."""
    if mask is None or isinstance(mask, KeyPadding):
        return mask
    dense = mask.materialize(N, S, order.device) if isinstance(mask, Mask) else mask
    dense = dense.reshape((1,) * (4 - dense.dim()) + tuple(dense.shape))  # (B?, H?, N?, S)
    if dense.shape[2] != N:  # one row for every query (or a shape attention will refuse): as given
        return mask
    dense = dense.expand(order.shape[0], -1, N, -1)
    idx = order.to(dense.device)[:, None, :, None].expand(-1, dense.shape[1], -1, dense.shape[3])
    return dense.gather(2, idx)


def _order_only(mask: Mask) -> bool:
    """True if the mask depends only on whether key j comes before or after the query (causal and
    its compositions): it means the same when padding sits between real tokens."""
    if isinstance(mask, Causal):
        return True
    if isinstance(mask, (And, Or)):
        return _order_only(mask.a) and _order_only(mask.b)
    return isinstance(mask, Not) and _order_only(mask.a)


def _shift_invariant(mask: Mask) -> bool:
    """True if the mask depends only on j - i (causal, sliding windows and their compositions): it
    means the same when every real token is shifted by left padding."""
    if isinstance(mask, (Causal, SlidingWindow)):
        return True
    if isinstance(mask, (And, Or)):
        return _shift_invariant(mask.a) and _shift_invariant(mask.b)
    return isinstance(mask, Not) and _shift_invariant(mask.a)


def _distance_biases(model: nn.Module) -> list[str]:
    """Names of the attention layers that add a distance bias (ALiBi), which counts array indices."""
    return [name for name, m in model.named_modules()
            if isinstance(m, MultiHeadAttention) and m.positional is not None and m.positional.bias() is not None]


def _sharded(blocks: Sequence[nn.Module]) -> bool:
    """True if a block's self-attention has a sharded core (context parallelism: each rank runs a
    shard of the sequence, so the model cannot number its tokens 0..N-1 itself)."""
    return any(getattr(getattr(getattr(b, "attn", None), "core", None), "sharded", False) for b in blocks)


def _explicit_positions(owner: str, positions: Tensor | None, blocks: Sequence[nn.Module], input_ids: Tensor,
                        attention_mask: Tensor | None, cache: object = None) -> Tensor | None:
    """Check the caller's ``positions`` (N,) / (B, N) for the tokens of ``input_ids`` (B, N); with a
    sharded core they are required, since a rank's tokens are not 0..n-1 of the sequence."""
    if positions is None:
        if _sharded(blocks):
            raise ValueError(f"{owner}: its attention is sharded across ranks (context parallelism), so pass "
                             "positions= (n,), the global positions of this rank's tokens: core.positions(N) or "
                             "attnkit.distributed.positions(layout, rank, world, N)")
        return None
    if attention_mask is not None or cache is not None:
        raise ValueError(f"{owner}: positions= places the tokens itself; with attention_mask= (padding) or cache= "
                         "the model places them from the padding / the cache. Give positions= alone (no padding, "
                         "no cache), or leave it out")
    if not isinstance(positions, Tensor):
        raise TypeError(f"{owner}: positions must be an integer tensor (N,) or (B, N), got {type(positions).__name__}")
    B, N = input_ids.shape[0], input_ids.shape[-1]
    return _positions(positions, B, N, input_ids.device)  # checks integers, shape (N,) / (B, N), >= 0


def _check_position_budget(embeddings: nn.Module, longest: int, max_new_tokens: int, owner: str) -> None:
    """Before decoding: a learned position table must hold every position generation will feed.

    Generating T tokens after a prompt of n real tokens feeds the model n + T - 1 tokens (the last
    new token is never fed back), positions 0 .. n + T - 2.
    """
    if max_new_tokens == 0:
        return
    needed = longest + max_new_tokens - 1
    for name, m in embeddings.named_modules():
        if isinstance(m, LearnedPositionalEmbedding) and needed > m.max_positions:
            room = m.max_positions - longest + 1
            advice = (f"ask for at most {room} new tokens, or shorten the prompt" if room >= 1 else
                      f"the prompt alone is too long: shorten it to at most {m.max_positions} tokens")
            raise ValueError(f"{owner}: the prompt ({longest} real tokens in its longest row) and max_new_tokens="
                             f"{max_new_tokens} need positions 0..{needed - 1} (the last new token is not fed "
                             f"back), but the LearnedPositionalEmbedding {'embeddings.' + name if name else 'embeddings'}"
                             f" has {m.max_positions} rows (positions 0..{m.max_positions - 1}); {advice}")


class Encoder(nn.Module):
    """Bidirectional encoder (BERT): embeddings, blocks, optional final norm. -> (B, N, E).

    ``mask`` is every block's self-attention mask, as in ``DecoderLM`` (default None: every token
    sees every token, BERT; e.g. ``ak.sliding_window(W)`` for a local encoder, or
    ``ak.sliding_window(W) | ak.global_tokens(idx)`` for Longformer's pattern). A padded batch's
    ``attention_mask`` is combined with it: ``mask & ak.key_padding(attention_mask)``.

    Padding may sit anywhere (left, right, between tokens): each row's real tokens come out as that
    row alone would give them. Rows not padded on the right are run with their real tokens moved
    to the front (in order) and put back, because windows, ALiBi distances, global-token indices
    and absolute positions all count indices: after the move a real token's index is its position.
    """

    def __init__(self, embeddings: nn.Module, blocks: Sequence[nn.Module], norm: nn.Module | None = None, *,
                 mask: Mask | None = None):
        super().__init__()
        _check_mask("Encoder", mask, optional=True)
        self.embeddings, self.blocks, self.norm, self.mask = embeddings, nn.ModuleList(blocks), norm, mask

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                token_type_ids: Tensor | None = None, return_all: bool = False,
                positions: Tensor | None = None) -> Tensor | list[Tensor]:
        """Encode token ids: (B, N) -> hidden states (B, N, E).

        Args:
            input_ids: (B, N) int64 / int32 token ids.
            attention_mask: (B, N), 1 = token, 0 = padding (HF's convention): bool, or integers /
                floats holding only 0 and 1. Padding keys are hidden from every query, on top of the
                model's ``mask``; padding may sit anywhere (see the class docstring).
            token_type_ids: (B, N) segment ids, for embeddings with token types (BERT).
            return_all: return [embeddings, after block 1, ..., after the last block (normed)],
                each (B, N, E), like HF's ``hidden_states``.
            positions: (N,) or (B, N) integer positions of the tokens (default 0..N-1), read by the
                absolute encoding and RoPE; required when the attention is sharded across ranks
                (``attnkit.distributed.parallelize``: this rank's global positions). Not with
                ``attention_mask``.

        Returns:
            (B, N, E) in the model's dtype (or the list above). Rows of padding tokens are computed
            but meaningless.

        Raises:
            ValueError: attention_mask not of shape (B, N) or holding values other than 0 and 1;
                ids outside the vocabulary; positions not (N,) / (B, N) integers >= 0, given with
                attention_mask, or missing with sharded attention.
        """
        positions = _explicit_positions("Encoder", positions, self.blocks, input_ids, attention_mask)
        valid = _valid_tokens(attention_mask, tuple(input_ids.shape), device=input_ids.device)
        order = None if valid is None else _real_first(valid)
        if order is not None:  # real tokens first: each one's index is then its position
            input_ids, valid = input_ids.gather(1, order), valid.gather(1, order)
            if token_type_ids is not None:
                token_type_ids = token_type_ids.gather(1, order.to(token_type_ids.device))
        x = self.embeddings(input_ids, token_type_ids, **({} if positions is None else {"offset": positions}))
        padding = None if valid is None else key_padding(valid.sum(-1))  # a prefix now: lengths (B,)
        mask = padding if self.mask is None else self.mask if padding is None else self.mask & padding
        ctx = Context(mask=mask, positions=positions)
        states = [x]
        for block in self.blocks:
            x = block(x, ctx)
            states.append(x)
        if self.norm is not None:
            states[-1] = x = self.norm(x)
        if order is not None:
            states = [_restore(state, order) for state in states]
            x = states[-1]
        return states if return_all else x


def _layer_cache(block: nn.Module, window: int | None) -> object:
    attn = getattr(block, "attn", None)
    return attn.new_cache(window) if isinstance(attn, MultiHeadAttention) else KVCache(window)


class DecoderLM(nn.Module):
    """Decoder-only language model: embeddings, causal blocks, final norm, LM head. -> logits (B, N, V).

    ``mask`` is every block's self-attention mask (default ``causal()``; Mistral-style models use
    ``causal() & sliding_window(W, 0)`` and ``cache_window=W`` so the KV cache stays O(W)). Blocks
    with cross-attention make it the decoder of an ``EncoderDecoder``.

    Padding (``attention_mask``) without a cache may sit anywhere: rows not padded on the right are
    run with their real tokens moved to the front (in order) and the logits put back, so windows,
    ALiBi distances and positions count real tokens. With a cache the stored keys cannot move: rows
    must be padded on the left (``generate`` arranges that), or, for a model whose attention only
    asks "before or after" (a causal mask, RoPE or absolute positions, no ALiBi, no window), padded
    anywhere; other layouts are refused with the reason.
    """

    def __init__(self, embeddings: TokenEmbeddings, blocks: Sequence[nn.Module], norm: nn.Module | None,
                 lm_head: nn.Linear, *, mask: Mask = causal(), cache_window: int | None = None):
        super().__init__()
        _check_mask("DecoderLM", mask, optional=False)
        self.embeddings, self.blocks, self.norm, self.lm_head = embeddings, nn.ModuleList(blocks), norm, lm_head
        self.mask, self.cache_window = mask, cache_window

    def new_cache(self) -> list[BlockCache]:
        """Empty decoding state, one per block: each layer's ``new_cache`` (a ``KVCache``, or the
        constant-size state of an approximate core such as ``attnkit.approx.LinearAttention``)."""
        return [BlockCache(self_attn=_layer_cache(block, self.cache_window)) for block in self.blocks]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                cache: list[BlockCache] | None = None, memory: Tensor | None = None,
                memory_mask: Mask | Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Next-token logits: input_ids (B, N) -> logits (B, N, V).

        Args:
            input_ids: (B, N) int64 / int32 token ids; with ``cache``, the N tokens after the L
                cached ones.
            attention_mask: (B, L + N), 1 = token, 0 = padding, over every token so far (the L
                cached ones and these N), HF's convention: bool, or integers / floats holding only
                0 and 1. Padded prompts of different lengths then batch exactly: padding keys are
                masked (on top of the model's ``mask``) and each sample's positions and distances
                count its real tokens only. Without ``cache`` padding may sit anywhere; with one,
                see the class docstring.
            cache: ``model.new_cache()``, updated in place (KV-cache decoding).
            memory: (B, S, E) the encoder's output, for blocks with cross-attention.
            memory_mask: the cross-attention mask over (N, S), e.g. ``ak.key_padding(source_mask)``.
            positions: (N,) or (B, N) integer positions of the tokens (default 0..N-1, or after
                the cached ones), read by the absolute encoding and RoPE. Required when the
                attention is sharded across ranks (``attnkit.distributed.parallelize``): this
                rank's tokens' global positions. Not with ``attention_mask`` or ``cache``.

        Returns:
            (B, N, V) logits in the LM head's dtype.

        Raises:
            ValueError: attention_mask not (B, L + N) or holding values other than 0 and 1; with a
                cache, padding the model cannot place (between real tokens with ALiBi or a window;
                before them with a mask that picks absolute indices); a cache of another model; a
                bounded cache whose mask would reach a dropped key; blocks with cross-attention but
                no memory; positions not (N,) / (B, N) integers >= 0, given with attention_mask or
                cache, or missing with sharded attention.
        """
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} entries for {len(self.blocks)} blocks; use model.new_cache()")
        B, N = input_ids.shape[0], input_ids.shape[-1]
        given = _explicit_positions("DecoderLM", positions, self.blocks, input_ids, attention_mask, cache)
        offset = 0 if cache is None else cache[0].self_attn.position
        stored = 0 if cache is None else len(cache[0].self_attn)
        valid = _valid_tokens(attention_mask, (B, offset + N), device=self.lm_head.weight.device,
                              expected=f"(B, L + N) = ({B}, {offset + N}): one entry per token so far, cached "
                                       f"({offset}) and new ({N})")
        order = None
        if valid is None:
            positions, mask = given, self.mask
        elif cache is None:
            order = _real_first(valid)
            if order is not None:  # real tokens first: each one's index is then its position
                input_ids, valid = input_ids.gather(1, order.to(input_ids.device)), valid.gather(1, order)
                if memory is not None:
                    memory_mask = _reorder_query_mask(memory_mask, order, N, memory.shape[1])
            # real tokens first: the padding is a prefix, given as lengths (B,), which the Triton kernels
            # read per call (a bool (B, N) mask would be a new block plan every batch)
            positions, mask = _token_positions(valid, N), self.mask & key_padding(valid.sum(-1))
        else:
            if len({len(c.self_attn) for c in cache}) > 1:  # one padding mask is sized for every layer's keys
                raise ValueError("a padded batch with a cache needs every layer to keep the same keys, but this "
                                 "model mixes KV caches and constant-size core states (a core on some layers "
                                 "only); decode it without a cache (generate(use_cache=False)) or unpadded")
            self._check_cached_layout(valid)
            # A bounded cache holds only the last `stored` keys; with left padding the dropped ones are
            # the oldest, so the window check in MultiHeadAttention sees the structure of self.mask.
            positions = _token_positions(valid, N)
            mask = self.mask & key_padding(valid[:, valid.shape[1] - stored - N:])
        x = self.embeddings(input_ids, offset=offset if positions is None else positions)  # (B, N, E)
        ctx = Context(mask=mask, memory=memory, memory_mask=memory_mask, positions=positions)
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, None if cache is None else cache[i])
        if self.norm is not None:
            x = self.norm(x)
        logits = self.lm_head(x)  # (B, N, V)
        return logits if order is None else _restore(logits, order)

    def _check_cached_layout(self, valid: Tensor) -> None:
        """With a KV cache, refuse padding this model would misplace: the cached keys keep their
        indices, and ALiBi / windows measure distance in indices, global tokens / documents pick
        absolute indices. valid: (B, L + N) bool over every token so far."""
        count = valid.sum(1)  # (B,)
        n = valid.shape[1]
        first = valid.to(torch.uint8).argmax(1)  # (B,) index of the first real token (0 when none)
        last = n - 1 - valid.flip(1).to(torch.uint8).argmax(1)
        has = count > 0
        inner = (has & (last - first + 1 != count)).nonzero().flatten().tolist()
        leading = (has & (first > 0)).nonzero().flatten().tolist()
        if not inner and not leading:
            return
        alibi = _distance_biases(self) if inner else []
        if inner and (alibi or not _order_only(self.mask)):
            why = (f"ALiBi in {alibi[0]!r} measures distance" if alibi else
                   f"the mask {self.mask!r} measures distance")
            row = inner[0]
            raise ValueError(f"attention_mask rows {inner} have padding between real tokens (row {row}: "
                             f"{valid[row].long().tolist()}), and with a KV cache the cached keys keep their "
                             f"indices: {why} in indices, so the padding would count as tokens. Pad on the "
                             f"left for cached decoding (generate() does this for you), or run without cache= "
                             f"(generate(use_cache=False)), which handles padding anywhere")
        if leading and not _shift_invariant(self.mask):
            row = leading[0]
            raise ValueError(f"attention_mask rows {leading} start with padding (row {row}: "
                             f"{valid[row].long().tolist()}), and with a KV cache the cached keys keep their "
                             f"indices: the mask {self.mask!r} picks tokens by absolute index (global tokens, "
                             f"documents, a dense mask), which left padding shifts. Run without cache= "
                             f"(generate(use_cache=False)), which moves real tokens to their true indices")

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, attention_mask: Tensor | None = None,
                 temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, eos_token_id: int | None = None) -> Tensor:
        """Continue (B, N) prompts by ``max_new_tokens`` = T tokens -> (B, N + T) int64.

        ``out[:, :N]`` is ``input_ids`` as given and ``out[:, N:]`` each row's T new tokens (fewer
        columns if every row stopped at ``eos_token_id``; a stopped row repeats it).

        ``attention_mask`` (B, N): 1 = token, 0 = padding, for prompts of different lengths. Each
        row continues from its last real token, as the row's real tokens alone would, wherever the
        padding is: left (the usual layout for decoding), right (the usual layout for training)
        or between tokens. Rows not padded on the left are compacted internally (real tokens moved
        to the end, in order); the returned prompt part is left as given. The mask holds only 0 and
        1 (bool, or integers / floats); anything else is refused.

        ``temperature=0`` is greedy; otherwise sample from softmax(logits / temperature), over the
        ``top_k`` most likely tokens if given. ``use_cache=False`` recomputes the whole sequence at
        every step (the slow oracle the cache is tested against). The module's mode is left as it
        is: call ``model.eval()`` first unless dropout is wanted.

        Raises:
            ValueError: max_new_tokens not an int >= 0; input_ids not (B, N) with N >= 1;
                attention_mask not (B, N), holding values other than 0 and 1, or a row without any
                real token; a ``LearnedPositionalEmbedding`` table too short for the longest prompt
                plus max_new_tokens (checked before anything is generated); temperature < 0;
                top_k < 1.
        """
        check_max_new_tokens(max_new_tokens)
        _check_prompt(input_ids)
        prompt = input_ids
        if attention_mask is not None:  # right / inner padding: decode the rows compacted to the left
            prompt, attention_mask = _to_left_padding(input_ids, attention_mask)
        P = input_ids.shape[1]
        longest = P if attention_mask is None else int(attention_mask.sum(1).max())
        _check_position_budget(self.embeddings, longest, check_max_new_tokens(max_new_tokens), "DecoderLM.generate")

        def step(ids: Tensor, cache: list[BlockCache] | None) -> Tensor:
            if attention_mask is None:
                return self(ids, cache=cache)
            total = ids.shape[1] + (0 if cache is None else cache[0].self_attn.position)
            grown = attention_mask.new_ones(attention_mask.shape[0], total - P)  # generated tokens are real
            return self(ids, torch.cat([attention_mask, grown], dim=1), cache=cache)

        out = generate_tokens(step, self.new_cache, prompt, max_new_tokens, temperature=temperature,
                              top_k=top_k, generator=generator, use_cache=use_cache, eos_token_id=eos_token_id)
        return out if prompt is input_ids else torch.cat([input_ids, out[:, P:]], dim=1)  # (B, N + T)


class EncoderDecoder(nn.Module):
    """Encoder + decoder with cross-attention (Vaswani et al.): logits (B, N, V) for target ids."""

    def __init__(self, encoder: Encoder, decoder: DecoderLM):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, source_ids: Tensor, target_ids: Tensor, source_mask: Tensor | None = None, *,
                cache: list[BlockCache] | None = None, memory: Tensor | None = None) -> Tensor:
        """Logits for target ids given source ids: (B, S), (B, N) -> (B, N, V).

        Args:
            source_ids: (B, S) int64 / int32 source token ids.
            target_ids: (B, N) int64 / int32 target ids (with ``cache``: the ones after the cached).
            source_mask: (B, S), 1 = token, 0 = padding; padding is hidden from the encoder and
                from the decoder's cross-attention.
            cache: ``model.decoder.new_cache()``, updated in place.
            memory: (B, S, E) an encoding of source_ids to reuse (skips the encoder).

        Returns:
            (B, N, V) logits in the LM head's dtype.

        Raises:
            ValueError: source_mask not (B, S) or holding values other than 0 and 1; see ``Encoder``
                and ``DecoderLM``.
        """
        memory_mask = _padding_mask(source_mask, tuple(source_ids.shape), "source_mask")
        if memory is None:
            memory = self.encoder(source_ids, source_mask)  # (B, S, E)
        return self.decoder(target_ids, cache=cache, memory=memory, memory_mask=memory_mask)

    @torch.no_grad()
    def generate(self, source_ids: Tensor, start_ids: Tensor, max_new_tokens: int, *,
                 source_mask: Tensor | None = None, use_cache: bool = True, **sampling) -> Tensor:
        """Decode from ``start_ids`` (B, N) (e.g. a BOS column) -> (B, N + T); the source (B, S),
        padded anywhere per ``source_mask`` (B, S), is encoded once. ``sampling``: temperature,
        top_k, generator, eos_token_id as in ``DecoderLM.generate``.

        Raises:
            ValueError: max_new_tokens not an int >= 0; start_ids not (B, N) with N >= 1;
                source_mask not (B, S) or holding values other than 0 and 1; the decoder's
                ``LearnedPositionalEmbedding`` too short for N + max_new_tokens (checked first).
        """
        count = check_max_new_tokens(max_new_tokens)
        _check_prompt(start_ids)
        _padding_mask(source_mask, tuple(source_ids.shape), "source_mask")
        _check_position_budget(self.decoder.embeddings, start_ids.shape[1], count, "EncoderDecoder.generate")
        memory = self.encoder(source_ids, source_mask)  # (B, S, E)
        step = lambda ids, cache: self(source_ids, ids, source_mask, cache=cache, memory=memory)  # noqa: E731
        return generate_tokens(step, self.decoder.new_cache, start_ids, max_new_tokens, use_cache=use_cache,
                               **sampling)


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """logits (B, V) -> next ids (B,): argmax at temperature 0, else a top-k softmax sample."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def check_max_new_tokens(max_new_tokens: object) -> int:
    """max_new_tokens as an int >= 0 (0 returns the prompt), or a ValueError that says so."""
    try:
        count = None if isinstance(max_new_tokens, bool) else operator.index(max_new_tokens)
    except TypeError:
        count = None
    if count is None or count < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0 (how many tokens to add; 0 returns the prompt), "
                         f"got {max_new_tokens!r}")
    return count


def _check_prompt(input_ids: Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"expected prompt ids of shape (B, N) with N >= 1, got {tuple(input_ids.shape)}")


def _to_left_padding(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Prompts padded anywhere -> the same rows padded on the left: (B, N) ids and bool mask.

    Returns ``input_ids`` itself when every row already is (zeros, then ones). Otherwise each row's
    real tokens move to its end in their order (a stable sort on the mask): padding keys are
    masked and positions count real tokens only, so a row means the same, and decoding continues
    from its true last token.
    """
    valid = _token_mask(attention_mask)
    if tuple(valid.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(valid.shape)}; expected (B, N) = "
                         f"{tuple(input_ids.shape)}, the prompt's shape: 1 for real tokens and 0 for padding")
    valid = valid.to(input_ids.device)  # (B, N)
    empty = (~valid.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask rows {empty} hold no real token (all 0): a prompt needs at least one "
                         "token to continue from; give each row one (e.g. a BOS token)")
    if not bool((valid[:, 1:] >= valid[:, :-1]).all()):  # some 1 is followed by a 0: not left-padded
        order = torch.sort(valid.to(torch.uint8), dim=1, stable=True).indices  # (B, N): padding first
        return input_ids.gather(1, order), valid.gather(1, order)
    return input_ids, valid


def generate_tokens(step: Callable[[Tensor, list | None], Tensor], new_cache: Callable[[], list],
                    input_ids: Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                    generator: torch.Generator | None = None, use_cache: bool = True,
                    eos_token_id: int | None = None) -> Tensor:
    """The decoding loop shared by the models. ``step(ids, cache) -> logits (B, n, V)``.

    input_ids (B, N) -> (B, N + T); ``max_new_tokens`` = T must be an int >= 0.
    """
    check_max_new_tokens(max_new_tokens)
    _check_prompt(input_ids)
    ids, cache = input_ids, new_cache() if use_cache else None
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    fresh = ids
    for _ in range(max_new_tokens):
        logits = step(fresh, cache) if use_cache else step(ids, None)  # (B, n, V)
        nxt = sample_next(logits[:, -1], temperature, top_k, generator)  # (B,)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        fresh = nxt[:, None]
        if eos_token_id is not None and bool(done.all()):
            break
    return ids
