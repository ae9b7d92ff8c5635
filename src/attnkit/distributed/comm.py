"""Point-to-point exchanges for context parallelism: posted at once, waited with a timeout, counted.

The only module of attnkit that calls ``torch.distributed`` (with ``context_parallel``'s imports of
it). Every wait has a timeout: a rank that raised, died or called with other arguments makes the
others raise ``ContextParallelError`` (naming the peer and what was awaited) instead of hanging.
After such an error the process group is in an unknown state: destroy it and start again.
"""

from __future__ import annotations

import dataclasses
import datetime
import zlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 300.0
TAG_CHECK = 10  # the call's first messages: each rank's shapes and checksums


class ContextParallelError(RuntimeError):
    """A peer failed, died, diverged or timed out during a context-parallel call."""


@dataclass
class CommStats:
    """What this rank sent and received, in bytes and messages, summed over the calls it was given
    to (``context_parallel_attention(..., stats=)``); ``sent_to[peer]`` per destination rank."""

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    sent_to: dict[int, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.bytes_sent = self.bytes_received = self.messages_sent = 0
        self.sent_to = {}


def world_of(group) -> tuple[int, int]:
    """(rank, world size) in ``group`` (None: the default group); raises if none is initialized."""
    if not dist.is_available() or not dist.is_initialized():
        raise ContextParallelError("context_parallel_attention needs torch.distributed initialized: call "
                                   "torch.distributed.init_process_group('gloo' or 'nccl', ...) on every rank first")
    return dist.get_rank(group), dist.get_world_size(group)


def _fail(rank: int, what: str, peer: int | str, timeout_s: float, err: Exception) -> ContextParallelError:
    return ContextParallelError(
        f"context_parallel_attention: rank {rank} failed {what} (peer {peer}) within {timeout_s:g} s: "
        f"{type(err).__name__}: {err}. A rank raised, died or called with other arguments; the process group "
        "is no longer usable (destroy_process_group and restart).")


class Exchange:
    """One phase's sends and receives, posted together (``batch_isend_irecv``) so that transfers
    run while this rank computes; ``recv(src)`` waits for one peer's message only."""

    def __init__(self, group, rank: int, timeout_s: float, stats: CommStats | None, what: str, tag: int):
        self.group, self.rank, self.timeout_s, self.stats, self.what, self.tag = group, rank, timeout_s, stats, what, tag
        self._recv: dict[int, tuple[Tensor, object]] = {}
        self._sent: list[tuple[int, object]] = []

    def _peer(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def post(self, sends: dict[int, Tensor], recvs: dict[int, Tensor]) -> None:
        """Start sending ``sends[dst]`` and receiving into ``recvs[src]`` (group ranks)."""
        ops, peers = [], []
        for dst, t in sends.items():
            ops.append(dist.P2POp(dist.isend, t, self._peer(dst), self.group, self.tag))
            peers.append(("send", dst, t))
        for src, t in recvs.items():
            ops.append(dist.P2POp(dist.irecv, t, self._peer(src), self.group, self.tag))
            peers.append(("recv", src, t))
        if not ops:
            return
        try:
            works = dist.batch_isend_irecv(ops)
        except Exception as err:  # a closed connection can surface here already
            raise _fail(self.rank, f"posting {self.what}", sorted({p for _, p, _ in peers}), self.timeout_s,
                        err) from err
        for (kind, peer, t), work in zip(peers, works):
            if kind == "send":
                self._sent.append((peer, work))
                if self.stats is not None:
                    n = t.numel() * t.element_size()
                    self.stats.bytes_sent += n
                    self.stats.messages_sent += 1
                    self.stats.sent_to[peer] = self.stats.sent_to.get(peer, 0) + n
            else:
                self._recv[peer] = (t, work)

    def _wait(self, work, what: str, peer: int) -> None:
        try:
            work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except Exception as err:
            raise _fail(self.rank, what, peer, self.timeout_s, err) from err

    def recv(self, src: int) -> Tensor:
        """The message from ``src``, once it has arrived."""
        t, work = self._recv.pop(src)
        self._wait(work, f"receiving {self.what}", src)
        if self.stats is not None:
            self.stats.bytes_received += t.numel() * t.element_size()
        return t

    def finish(self) -> None:
        """Wait until every send has left (the buffers may then be freed or reused)."""
        for peer, work in self._sent:
            self._wait(work, f"sending {self.what}", peer)
        self._sent = []


def digest(obj, crc: int = 0) -> int:
    """A CRC32 equal on every rank for equal masks / biases / values: over the types, the scalars'
    reprs and the tensors' dtypes, shapes and bytes (a device tensor is copied to the host once)."""
    if obj is None:
        return zlib.crc32(b"None", crc)
    if isinstance(obj, Tensor):
        t = obj.detach().contiguous()
        crc = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode(), crc)
        return zlib.crc32(t.flatten().view(torch.uint8).cpu().numpy().tobytes(), crc) if t.numel() else crc
    if dataclasses.is_dataclass(obj):
        crc = zlib.crc32(type(obj).__name__.encode(), crc)
        for f in dataclasses.fields(obj):
            crc = digest(getattr(obj, f.name), crc)
        return crc
    if isinstance(obj, (tuple, list)):
        for x in obj:
            crc = digest(x, zlib.crc32(b",", crc))
        return crc
    return zlib.crc32(repr(obj).encode(), crc)


def check_same_everywhere(group, rank: int, world: int, fields: dict[str, float], device,
                          timeout_s: float, per_rank: tuple[str, ...] = (),
                          names: dict[str, tuple] | None = None) -> list[dict[str, float]]:
    """Exchange ``fields`` with every peer (point to point, so a peer that never answers is named)
    and raise ValueError on every rank (the same message) if any field differs across ranks, except
    those named in ``per_rank`` (exchanged, not compared); ``names[field]`` spells a coded field's
    values in the message. Returns every rank's fields."""
    names, labels = list(fields), names or {}
    mine = torch.tensor([fields[n] for n in names], dtype=torch.float64, device=device)
    ex = Exchange(group, rank, timeout_s, None, "every rank's shapes and mask", TAG_CHECK)
    ex.post({r: mine for r in range(world) if r != rank},
            {r: torch.empty_like(mine) for r in range(world) if r != rank})
    rows = [mine if r == rank else ex.recv(r) for r in range(world)]
    ex.finish()
    table = [dict(zip(names, row.tolist())) for row in rows]
    for n in names:
        if n in per_rank:
            continue
        values = [row[n] for row in table]
        if any(v != values[0] for v in values):
            shown = ", ".join(f"rank {r}: {labels[n][int(v)] if n in labels else f'{v:g}'}"
                              for r, v in enumerate(values))
            raise ValueError(f"context_parallel_attention: {n} differs across ranks ({shown}); every rank must "
                             f"call with the same {n} (its shard of one problem, the same mask, bias and layout)")
    return table
