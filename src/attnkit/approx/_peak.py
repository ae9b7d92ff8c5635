"""The peak memory of the tensors one call allocates: what ``attnkit.approx.audit`` reports per method.

On CUDA the caching allocator counts: ``torch.cuda.max_memory_allocated`` after the call minus
``torch.cuda.memory_allocated`` before it (workspaces included). On the CPU no allocator keeps such a
count, so ``StoragePeak`` watches every operator through a ``TorchDispatchMode``: an output whose
storage it has not met before is a new allocation and adds its ``nbytes``; ``weakref.finalize`` on
that storage subtracts it when the last tensor holding it dies; the running total's maximum is the
peak. Storages that enter an operator as inputs before appearing as outputs (the call's arguments,
parameters, buffers, and every view of them) were allocated before the call and are never counted.

Not counted on the CPU: memory a kernel uses internally without returning it as a tensor (e.g. a
matmul's packing buffers) and Python objects; that is, the peak of *tensors*, in bytes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage(t: object) -> Any | None:
    """The untyped storage of a dense tensor (None for anything else: sparse, nested, non-tensors)."""
    if not isinstance(t, Tensor) or t.layout is not torch.strided:
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


class StoragePeak(TorchDispatchMode):
    """Count the bytes of the tensor storages created while the mode is active; ``peak`` their
    largest simultaneous total, ``current`` what is still alive (both in bytes)."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()  # id() of storages met (Python keeps one object per storage)

    def _forget(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.current -= nbytes

    def _meet(self, storage: Any, new: bool) -> None:
        key = id(storage)
        if key in self._seen:
            return
        self._seen.add(key)
        nbytes = storage.nbytes() if new else 0  # an input's storage existed before: remembered, not counted
        weakref.finalize(storage, self._forget, key, nbytes)
        if nbytes:
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            s = _storage(t)
            if s is not None:
                self._meet(s, new=False)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            s = _storage(t)
            if s is not None:
                self._meet(s, new=True)
        return out


def measure_peak(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, int]:
    """Run ``fn()`` once; return (its result, the peak bytes of tensors it allocated on ``device``).

    CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before the call (the peak statistics of
    that device are reset). CPU: ``StoragePeak`` (see the module docstring). The result is alive at
    the end, so it is part of the peak.

    Raises:
        ValueError: a device other than "cpu" or "cuda".
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, max(0, torch.cuda.max_memory_allocated(device) - before)
    if device.type != "cpu":
        raise ValueError(f"measure_peak: device {device} is not supported; expected a 'cpu' or 'cuda' device")
    with StoragePeak() as tracker:
        out = fn()
    return out, tracker.peak
