"""Asynchronous checkpoint saves: the step loop waits only for a host copy of this rank's state;
writing, checksums, fsync and publishing (checkpoint/runtime.py ``write``) run in a thread."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_llm.checkpoint import io
from megatron_llm.checkpoint.runtime import (
    SaveFailed,
    Snapshot,
    save,
    snapshot,
    write,
    write_plan,
)
from megatron_llm.parallel.groups import ParallelContext


class Saver:
    """A run's saves: synchronous, or (``asynchronous``) in a background thread per save.

    Asynchronous: :meth:`save` blocks only while this rank's state is copied to host memory
    (pinned buffers on a GPU, reused from save to save); writing, checksums, fsync, the rename,
    ``latest`` and retention run in a thread whose collectives use a gloo group of their own,
    so they never interleave with the training loop's. The next save waits for the previous
    one; the loop calls :meth:`poll` at each step boundary and :meth:`wait` before it returns,
    and both raise :class:`SaveFailed` on every rank when the background save failed.
    """

    def __init__(self, ctx: ParallelContext, *, asynchronous: bool) -> None:
        self.ctx = ctx
        self.asynchronous = asynchronous
        # Collective: every rank builds its Saver at the same point of build_run.
        self._group = dist.new_group(backend="gloo") if asynchronous else None
        self._pinned = _PinnedPool()
        self._thread: threading.Thread | None = None
        self._failure: str | None = None
        self._plan: dict[str, list[tuple[int, int]]] | None = None  # who writes what, per run

    def save(self, engine: Any, model: nn.Module, **kwargs: Any) -> Path:
        """Save (keywords of :func:`snapshot`); asynchronous: the path it will be published at."""
        self.wait()
        if not self.asynchronous:
            return save(engine, model, self.ctx, **kwargs)
        self._pinned.rewind()
        if self._plan is None:  # collective, once
            self._plan = write_plan(engine, self.ctx, kwargs.get("names"))
        snap = snapshot(
            engine, model, self.ctx, to_host=self._pinned.copy, plan=self._plan, **kwargs
        )
        self._thread = threading.Thread(
            target=self._write, args=(snap,), name=f"checkpoint-step{snap.step}", daemon=True
        )
        self._thread.start()
        return snap.root / io.tag_for(snap.step)

    def _write(self, snap: Snapshot) -> None:
        try:
            write(snap, self.ctx, self._group)
        except SaveFailed as e:  # the same line on every rank (write agrees over the group)
            self._failure = str(e)
        except Exception as e:  # noqa: BLE001 (anything else: said, and the run stops)
            self._failure = f"checkpoint of step {snap.step} not saved: {type(e).__name__}: {e}"

    def poll(self) -> None:
        """At a step boundary (collective): raise SaveFailed on every rank if the background
        save failed on any; forget it once it is done everywhere."""
        if self._thread is None:
            return
        done = not self._thread.is_alive()
        flags = torch.tensor(
            [int(done and self._failure is not None), int(not done)], device=self.ctx.device
        )
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # no rank goes on alone
        failed, pending = flags.tolist()  # a host sync, only while a save is in flight
        if failed or not pending:
            self.wait()

    def wait(self) -> None:
        """Until the background save is done; SaveFailed (on every rank) if it failed."""
        if self._thread is None:
            return
        self._thread.join()
        failure, self._thread, self._failure = self._failure, None, None
        if failure:
            raise SaveFailed(failure)


class _PinnedPool:
    """Host buffers for the snapshot, reused from save to save (the previous save is done
    before the next snapshot starts), so a save after the first allocates and page-faults
    nothing. On a GPU they are pinned: the device-to-host copies run at full bus speed,
    queued without a sync per tensor. On the CPU the copy is still needed: the optimizer's
    next step changes the live tensors under the writer."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._next = 0

    def rewind(self) -> None:
        self._next = 0

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        i, self._next = self._next, self._next + 1
        old = self._buffers[i] if i < len(self._buffers) else None
        if old is not None and old.shape == t.shape and old.dtype == t.dtype:
            out = old
        else:
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
            self._buffers[i:] = [out]
        out.copy_(t.detach(), non_blocking=t.device.type == "cuda")
        return out
