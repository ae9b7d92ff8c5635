"""Run a function on P local processes joined by a gloo process group (context-parallel tests).

``run_ranks(fn, world, *args)`` spawns ``world`` processes; each initializes gloo over a free local
port, calls ``fn(rank, world, *args)`` (a module-level function, so it pickles) and sends back its
return value or its traceback. The parent raises if any rank raised or did not answer in time, naming
the rank, and kills what is left, so a broken test never hangs the suite.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world: int, port: int, out, fn, args, threads: int) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(threads)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        result = fn(rank, world, *args)
        out.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - the parent reports it, with the rank
        out.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a failed group may not tear down cleanly
            pass


class RankError(AssertionError):
    """One or more ranks raised; ``errors[rank]`` holds each traceback."""

    def __init__(self, errors: dict[int, str], results: dict[int, object]):
        self.errors, self.results = errors, results
        super().__init__("\n".join(f"rank {r} raised:\n{tb}" for r, tb in sorted(errors.items())))


def run_ranks(fn, world: int, *args, timeout_s: float = 120.0, threads: int = 1,
              allow_errors: bool = False) -> list:
    """``[fn(0, world, *args), ..., fn(world - 1, world, *args)]``, each run in its own process.

    Raises RankError if a rank raised or died without answering (``allow_errors=True`` returns the
    RankError's content instead: a list holding each rank's result or its ``("error", traceback)``),
    TimeoutError if a rank neither answered, raised nor died within ``timeout_s``.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, out, fn, args, threads), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world:
            try:
                rank, status, value = out.get(timeout=0.5)
                (results if status == "ok" else errors)[rank] = value
                continue
            except queue.Empty:
                pass
            silent = set(range(world)) - set(results) - set(errors)
            dead = {r: procs[r].exitcode for r in silent if procs[r].exitcode not in (None, 0)}
            if dead and out.empty():  # died without answering (gloo aborts a process on some errors)
                for r, code in dead.items():
                    errors[r] = f"rank {r} died with exit code {code} without answering"
            elif time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(silent)} gave no answer within {timeout_s} s; errors so far: "
                                   f"{errors}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors and not allow_errors:
        raise RankError(errors, results)
    return [results[r] if r in results else ("error", errors[r]) for r in range(world)]
