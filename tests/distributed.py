"""Run a function on N real torch.distributed ranks (gloo, one process each)."""

from __future__ import annotations

import os
import queue as queue_module
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from megatron_llm.launch import free_port


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_SIZE=str(world),
    )
    try:
        import torch.distributed as dist

        from megatron_llm.parallel.groups import init_distributed

        init_distributed(timeout_minutes=2.0)
        result = fn(*args)
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, "ok", result))
    except BaseException:  # report any failure to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))


def run_on_ranks(world_size: int, fn: Callable, *args: Any, timeout: float = 300) -> list[Any]:
    """fn(*args) on every rank; returns the results in rank order or raises the first error."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size and not errors:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except queue_module.Empty:
                # A rank that died without reporting (killed, or failed before its first line
                # ran) would otherwise leave us waiting for the whole timeout.
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    errors.append(
                        f"ranks {dead} died with exit codes "
                        f"{[procs[r].exitcode for r in dead]} before reporting"
                    )
                elif time.monotonic() > deadline:
                    errors.append(f"no result from every rank within {timeout:.0f} s")
                continue
            if status == "ok":
                results[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")  # the others likely hang
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
