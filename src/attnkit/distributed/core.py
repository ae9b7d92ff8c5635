"""Context-parallel attention as the core of ``attnkit.nn.MultiHeadAttention``: a model trains on a
sequence sharded across ranks, each rank running every layer on its own shard of the tokens.

Everything outside attention is per token (embeddings, projections, norms, feed-forward, the LM
head), so it runs on a shard as it would on the whole sequence; only attention mixes tokens, and
``context_parallel_attention`` does that exactly across ranks. Two things must know where a rank's
tokens sit in the whole sequence: the positions (RoPE rotations, learned position tables), given to
the model as ``positions=`` (``ContextParallelAttention.positions(N)``), and the mask and bias,
which stay those of the whole (N, N) problem (``ak.causal()``, ALiBi's ``-slope * |i - j|``).

    cp = ContextParallelAttention(group, layout="zigzag")       # or parallelize(model, group)
    ids_local = cp.shard(ids, dim=1)                             # (B, n) of (B, N)
    logits = model(ids_local, positions=cp.positions(N))         # (B, n, V): this rank's rows
    loss = cross_entropy(logits, cp.shard(targets, dim=1), reduction="sum") / (B * N)
    loss.backward(); all_reduce(grad, SUM) for every parameter; optimizer.step()

That step equals the one on the whole sequence on one device (tests/test_distributed_modules.py).
Sequence (context) parallelism for training: Liu et al. 2023 (Ring Attention), Dubey et al. 2024
section 3.3.2 (Llama 3's context parallelism, the zigzag layout).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..bias import Bias
from ..masks import Mask
from .comm import DEFAULT_TIMEOUT_S, CommStats, world_of
from .context_parallel import context_parallel_attention
from .layout import check_layout, local_size, positions, shard
from .plan import KEY_BLOCK, SCHEDULES


class ContextParallelAttention(nn.Module):
    """Exact attention over a sequence sharded across ``group``, as a ``MultiHeadAttention`` core.

    ``MultiHeadAttention(core=ContextParallelAttention(group))`` (or ``parallelize(model, group)``)
    then runs on this rank's shard x (B, n, E) of a whole sequence of N tokens and returns this
    rank's rows of the whole sequence's output. Being exact (``exact = True``), it takes the layer's
    additive bias (ALiBi, the user's ``bias=``, both of the whole (N, N) problem) and softcap; it has
    no dropout on the probabilities (a layer with ``dropout > 0`` is refused) and does not decode
    (``sharded = True``: the layer refuses ``cache=``, ``new_cache()`` and cross-attention).

    Args:
        group: the torch.distributed process group holding the sequence's ranks (None: the default).
        layout: how the sequence is sharded: "zigzag" (default), "contiguous", "striped"
            (``attnkit.distributed.layout``); every rank's input must be cut this way.
        schedule: "mask" (send only the keys some query may see) or "ring".
        impl: the backend of each rank's local attention (``ak.attention``'s impl).
        timeout_s: how long a wait for a peer may take before ``ContextParallelError``.
        stats: a ``CommStats`` that every call adds its bytes and messages to (share one across
            layers to count a whole step).
        key_block: keys per block when deciding what to send.

    Raises:
        ValueError: a layout or schedule attnkit does not know.
    """

    exact = True  # computes softmax attention exactly: MultiHeadAttention passes it bias and softcap
    sharded = True  # q, k, v are this rank's shard of one sequence: no cache, no cross-attention

    def __init__(self, group=None, *, layout: str = "zigzag", schedule: str = "mask", impl: str = "auto",
                 timeout_s: float = DEFAULT_TIMEOUT_S, stats: CommStats | None = None, key_block: int = KEY_BLOCK):
        super().__init__()
        check_layout(layout)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: choose 'mask' (mask-aware) or 'ring' (every key to every rank)")
        self.group, self.layout, self.schedule, self.impl = group, layout, schedule, impl
        self.timeout_s, self.stats, self.key_block = timeout_s, stats, key_block

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Mask | Tensor | None = None,
                scale: float | None = None, cache: object = None, bias: Bias | Tensor | None = None,
                softcap: float | None = None) -> Tensor:
        """This rank's attention output: q (B, Hq, n, D), k (B, Hkv, n, D), v (B, Hkv, n, Dv) ->
        (B, Hq, n, Dv) in q's dtype, rows in this rank's local order. Call it on every rank.

        ``mask`` and ``bias`` are of the whole (N, N) problem (``context_parallel_attention``).

        Raises:
            ValueError: ``cache`` given (context parallelism is for training and prefill of long
                sequences, not decoding); ``context_parallel_attention``'s errors.
            ContextParallelError: torch.distributed not initialized; a peer failed or timed out.
        """
        if cache is not None:
            raise ValueError(f"ContextParallelAttention: cache={type(cache).__name__} given, but the sequence is "
                             "sharded across ranks; context parallelism is for training and prefill of long "
                             "sequences, not decoding. Decode on one device with exact attention")
        return context_parallel_attention(q, k, v, mask=mask, bias=bias, scale=scale, softcap=softcap,
                                          group=self.group, layout=self.layout, schedule=self.schedule,
                                          impl=self.impl, timeout_s=self.timeout_s, stats=self.stats,
                                          key_block=self.key_block)

    def rank_world(self) -> tuple[int, int]:
        """(this rank, world size) in the group. Raises ContextParallelError if not initialized."""
        return world_of(self.group)

    def positions(self, N: int, device=None) -> Tensor:
        """(n,) int64: the global positions of this rank's tokens of a whole sequence of N, in local
        order; pass them as ``positions=`` to ``DecoderLM`` / ``Encoder`` / ``MultiHeadAttention``
        (RoPE, learned position tables). Raises ContextParallelError if torch.distributed is not
        initialized (as ``local_size`` and ``shard`` do)."""
        rank, world = self.rank_world()
        return positions(self.layout, rank, world, N, device=device)

    def local_size(self, N: int) -> int:
        """n: how many of the N tokens this rank holds."""
        rank, world = self.rank_world()
        return local_size(self.layout, rank, world, N)

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's shard of a whole-sequence tensor, the sequence along ``dim`` (default 1:
        (B, N) token ids, (B, N, E) activations) -> the same tensor with n positions there."""
        rank, world = self.rank_world()
        return shard(x, rank, world, dim=dim, layout=self.layout)

    def extra_repr(self) -> str:
        return f"layout={self.layout!r}, schedule={self.schedule!r}, impl={self.impl!r}"


def parallelize(model: nn.Module, group=None, *, layout: str = "zigzag", schedule: str = "mask",
                impl: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, stats: CommStats | None = None,
                key_block: int = KEY_BLOCK) -> list[str]:
    """Give every ``attnkit.nn.MultiHeadAttention`` of ``model`` a ``ContextParallelAttention``
    core over ``group`` (in place, weights kept); returns the names of the layers changed.

    Then feed each rank its shard of the inputs (``attnkit.distributed.shard(ids, rank, world,
    dim=1, layout=layout)``) with ``positions=`` (``attnkit.distributed.positions``), and all-reduce
    the parameter gradients (SUM) after backward, as data parallelism does. Undo with
    ``attnkit.approx.replace_attention(model, None)`` (exact attention on one device again).

    Raises:
        ValueError: a layout / schedule attnkit does not know; no attnkit MultiHeadAttention in
            the model; a layer the core cannot serve (dropout > 0 on the probabilities, dynamic
            NTK RoPE); nothing is changed then.
    """
    from ..approx.swap import replace_attention  # the one swap (with its checks); approx is optional here

    ContextParallelAttention(group, layout=layout, schedule=schedule)  # check the arguments once, before any layer

    def make_core(layer: nn.Module) -> ContextParallelAttention:
        return ContextParallelAttention(group, layout=layout, schedule=schedule, impl=impl, timeout_s=timeout_s,
                                        stats=stats, key_block=key_block)

    return replace_attention(model, make_core)
