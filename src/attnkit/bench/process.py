"""Measure one attention call in a fresh process, so its peak memory (ru_maxrss) is its own."""

from __future__ import annotations

import ctypes
import gc
import multiprocessing as mp
import resource
import time

import torch

import attnkit as ak

SAMPLE_ROWS = 17  # every n // SAMPLE_ROWS-th output row comes back for cross-checking


def release_memory() -> None:
    """Collect garbage and ask glibc to hand freed heap pages back, so the RSS at a reset is what
    the measured call starts from."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak_rss() -> None:
    """Start a new peak-RSS measurement (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: ru_maxrss below is then the process peak
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset (MB = 2**20 bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


LONGFORMER_WINDOW, LONGFORMER_GLOBALS = 256, 16


def named_mask(name: str, n: int) -> ak.Mask | None:
    """Masks a child process can rebuild from their name: "none", or "longformer" (one-sided
    window 256, 16 global tokens spread evenly from position 0 to n - 1)."""
    if name == "none":
        return None
    if name == "longformer":
        idx = torch.linspace(0, n - 1, LONGFORMER_GLOBALS).round().long()
        return ak.sliding_window(LONGFORMER_WINDOW) | ak.global_tokens(idx)
    raise ValueError(f"unknown mask name {name!r}; expected 'none' or 'longformer'")


def _sample_error(q, k, v, out, mask: ak.Mask | None) -> float:
    """max |out - float64 reference| on SAMPLE_ROWS rows, from those rows of the mask only."""
    n = q.shape[2]
    rows = torch.arange(0, n, max(1, n // SAMPLE_ROWS))
    truth = None if mask is None else mask.evaluate(rows, torch.arange(n), n, n)  # (1, 1, r, n)
    ref = ak.attention(q[:, :, rows].double(), k.double(), v.double(), mask=truth, impl="reference")
    return (out[:, :, rows].double() - ref).abs().max().item()


def _child(impl: str, n: int, heads: int, d: int, mask_name: str, queue) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        small = torch.randn(1, heads, 64, d)
        ak.attention(small, small, small, impl=impl, mask=named_mask(mask_name, 64))  # start-up outside
        q, k, v = (torch.randn(1, heads, n, d) for _ in range(3))
        mask = named_mask(mask_name, n)
        reset_peak_rss()
        base = peak_rss_mb()
        t0 = time.perf_counter()
        out = ak.attention(q, k, v, impl=impl, mask=mask)
        ms = (time.perf_counter() - t0) * 1e3
        extra = peak_rss_mb() - base
        err = _sample_error(q, k, v, out, mask)
    rows = out[0, :, :: max(1, n // SAMPLE_ROWS)]
    queue.put(dict(ms=ms, extra_mb=extra, sample=rows.tolist(), max_err=err))


def measure_in_child(impl: str, n: int, heads: int = 1, d: int = 64, mask: str = "none") -> dict:
    """Time (ms) and extra peak RSS (MB) of one fp32 forward ``ak.attention(impl=impl)`` at
    (1, heads, n, d) with ``named_mask(mask)``, plus ``sample``: a few output rows for comparing
    backends, and ``max_err``: their distance to the float64 reference on those rows."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(impl, n, heads, d, mask, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Exception:  # queue.Empty: still running, unless the child died (e.g. out of memory)
            if not proc.is_alive():
                raise RuntimeError(f"the {impl} child process at N={n} ended with exit code "
                                   f"{proc.exitcode} before reporting (out of memory?)") from None
    proc.join()
    return result


def compare_samples(a: dict, b: dict) -> float:
    """max |difference| between the sampled output rows of two measurements."""
    return (torch.tensor(a["sample"]) - torch.tensor(b["sample"])).abs().max().item()
