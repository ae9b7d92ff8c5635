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

from ..masks import Mask, causal, key_padding
from .attention import KVCache
from .block import BlockCache, Context


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


def _padding_mask(attention_mask: Tensor | None, shape: tuple[int, int]) -> Mask | None:
    """HF-style (B, N) 1 = token / 0 = padding -> ak.key_padding, or None."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (B, N) = {shape}, "
                         "1 for real tokens and 0 for padding")
    valid = attention_mask.bool()
    return None if bool(valid.all()) else key_padding(valid)  # no padding: keep the mask-free fast paths


class Encoder(nn.Module):
    """Bidirectional encoder (BERT): embeddings, blocks, optional final norm. -> (B, N, E).

    ``mask`` is every block's self-attention mask, as in ``DecoderLM`` (default None: every token
    sees every token, BERT; e.g. ``ak.sliding_window(W)`` for a local encoder, or
    ``ak.sliding_window(W) | ak.global_tokens(idx)`` for Longformer's pattern). A padded batch's
    ``attention_mask`` is combined with it: ``mask & ak.key_padding(attention_mask)``.
    """

    def __init__(self, embeddings: nn.Module, blocks: Sequence[nn.Module], norm: nn.Module | None = None, *,
                 mask: Mask | None = None):
        super().__init__()
        _check_mask("Encoder", mask, optional=True)
        self.embeddings, self.blocks, self.norm, self.mask = embeddings, nn.ModuleList(blocks), norm, mask

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                token_type_ids: Tensor | None = None, return_all: bool = False) -> Tensor | list[Tensor]:
        """Encode token ids: (B, N) -> hidden states (B, N, E).

        Args:
            input_ids: (B, N) int64 / int32 token ids.
            attention_mask: (B, N), 1 = token, 0 = padding (HF's convention; any dtype, nonzero =
                token). Padding keys are hidden from every query, on top of the model's ``mask``.
            token_type_ids: (B, N) segment ids, for embeddings with token types (BERT).
            return_all: return [embeddings, after block 1, ..., after the last block (normed)],
                each (B, N, E), like HF's ``hidden_states``.

        Returns:
            (B, N, E) in the model's dtype (or the list above). Rows of padding tokens are computed
            but meaningless.

        Raises:
            ValueError: attention_mask not of shape (B, N); ids outside the vocabulary.
        """
        x = self.embeddings(input_ids, token_type_ids)  # (B, N, E)
        padding = _padding_mask(attention_mask, tuple(input_ids.shape))
        mask = padding if self.mask is None else self.mask if padding is None else self.mask & padding
        ctx = Context(mask=mask)
        states = [x]
        for block in self.blocks:
            x = block(x, ctx)
            states.append(x)
        if self.norm is not None:
            states[-1] = x = self.norm(x)
        return states if return_all else x


class DecoderLM(nn.Module):
    """Decoder-only language model: embeddings, causal blocks, final norm, LM head. -> logits (B, N, V).

    ``mask`` is every block's self-attention mask (default ``causal()``; Mistral-style models use
    ``causal() & sliding_window(W, 0)`` and ``cache_window=W`` so the KV cache stays O(W)). Blocks
    with cross-attention make it the decoder of an ``EncoderDecoder``.
    """

    def __init__(self, embeddings: TokenEmbeddings, blocks: Sequence[nn.Module], norm: nn.Module | None,
                 lm_head: nn.Linear, *, mask: Mask = causal(), cache_window: int | None = None):
        super().__init__()
        _check_mask("DecoderLM", mask, optional=False)
        self.embeddings, self.blocks, self.norm, self.lm_head = embeddings, nn.ModuleList(blocks), norm, lm_head
        self.mask, self.cache_window = mask, cache_window

    def new_cache(self) -> list[BlockCache]:
        """Empty decoding state, one per block."""
        return [BlockCache(self_attn=KVCache(self.cache_window)) for _ in self.blocks]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                cache: list[BlockCache] | None = None, memory: Tensor | None = None,
                memory_mask: Mask | Tensor | None = None) -> Tensor:
        """Next-token logits: input_ids (B, N) -> logits (B, N, V).

        Args:
            input_ids: (B, N) int64 / int32 token ids; with ``cache``, the N tokens after the L
                cached ones.
            attention_mask: (B, L + N), 1 = token, 0 = padding, over every token so far (the L
                cached ones and these N), HF's convention. Padded prompts of different lengths
                then batch exactly: padding keys are masked (on top of the model's ``mask``) and
                each sample's positions count its real tokens only.
            cache: ``model.new_cache()``, updated in place (KV-cache decoding).
            memory: (B, S, E) the encoder's output, for blocks with cross-attention.
            memory_mask: the cross-attention mask over (N, S), e.g. ``ak.key_padding(source_mask)``.

        Returns:
            (B, N, V) logits in the LM head's dtype.

        Raises:
            ValueError: attention_mask not (B, L + N); a cache of another model; a bounded cache
                whose mask would reach a dropped key; blocks with cross-attention but no memory.
        """
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} entries for {len(self.blocks)} blocks; use model.new_cache()")
        offset = 0 if cache is None else cache[0].self_attn.position
        stored = 0 if cache is None else len(cache[0].self_attn)
        positions, mask = self._left_padding(attention_mask, input_ids.shape, offset, stored)
        x = self.embeddings(input_ids, offset=offset if positions is None else positions)  # (B, N, E)
        ctx = Context(mask=mask, memory=memory, memory_mask=memory_mask, positions=positions)
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, None if cache is None else cache[i])
        if self.norm is not None:
            x = self.norm(x)
        return self.lm_head(x)  # (B, N, V)

    def _left_padding(self, attention_mask: Tensor | None, shape: torch.Size, offset: int,
                      stored: int) -> tuple[Tensor | None, Mask]:
        """Per-sample positions (B, N) and the self-attention mask for a padded batch."""
        B, N = shape
        if attention_mask is None:
            return None, self.mask
        if tuple(attention_mask.shape) != (B, offset + N):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (B, L + N) = "
                             f"({B}, {offset + N}): one entry per token so far, cached ({offset}) and new ({N})")
        valid = attention_mask.to(device=self.lm_head.weight.device).bool()  # (B, L + N)
        if bool(valid.all()):
            return None, self.mask
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, -N:]  # (B, N): real tokens before, from 0
        # A bounded cache holds only the last `stored` keys; with left padding the dropped ones are
        # the oldest, so the window check in MultiHeadAttention sees the structure of self.mask.
        return positions, self.mask & key_padding(valid[:, valid.shape[1] - stored - N:])

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
        to the end, in order); the returned prompt part is left as given.

        ``temperature=0`` is greedy; otherwise sample from softmax(logits / temperature), over the
        ``top_k`` most likely tokens if given. ``use_cache=False`` recomputes the whole sequence at
        every step (the slow oracle the cache is tested against). The module's mode is left as it
        is: call ``model.eval()`` first unless dropout is wanted.

        Raises:
            ValueError: max_new_tokens not an int >= 0; input_ids not (B, N) with N >= 1;
                attention_mask not (B, N) or a row without any real token; temperature < 0;
                top_k < 1.
        """
        check_max_new_tokens(max_new_tokens)
        _check_prompt(input_ids)
        prompt = input_ids
        if attention_mask is not None:  # right / inner padding: decode the rows compacted to the left
            prompt, attention_mask = _to_left_padding(input_ids, attention_mask)
        P = input_ids.shape[1]

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
            ValueError: source_mask not (B, S); see ``Encoder`` and ``DecoderLM``.
        """
        if memory is None:
            memory = self.encoder(source_ids, source_mask)  # (B, S, E)
        return self.decoder(target_ids, cache=cache, memory=memory,
                            memory_mask=_padding_mask(source_mask, tuple(source_ids.shape)))

    @torch.no_grad()
    def generate(self, source_ids: Tensor, start_ids: Tensor, max_new_tokens: int, *,
                 source_mask: Tensor | None = None, use_cache: bool = True, **sampling) -> Tensor:
        """Decode from ``start_ids`` (B, N) (e.g. a BOS column) -> (B, N + T); the source (B, S),
        padded anywhere per ``source_mask`` (B, S), is encoded once. ``sampling``: temperature,
        top_k, generator, eos_token_id as in ``DecoderLM.generate``.

        Raises:
            ValueError: max_new_tokens not an int >= 0; start_ids not (B, N) with N >= 1.
        """
        check_max_new_tokens(max_new_tokens)
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
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected (B, N) = "
                         f"{tuple(input_ids.shape)}, the prompt's shape: 1 for real tokens and 0 for padding")
    valid = attention_mask.to(input_ids.device).bool()  # (B, N)
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
