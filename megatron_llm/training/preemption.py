"""Stopping cleanly: on SIGTERM / SIGUSR1 or a time budget, every rank stops after the same step.

Slurm signals a job before it kills it (``#SBATCH --signal=USR1@300``: SIGUSR1 five minutes
before the end); a scheduler's pre-emption sends SIGTERM. A rank that gets either finishes the
step it is in; after each step the ranks agree (one all-reduce of a flag) on whether any of them
was signalled or the budget ``train.exit_after_minutes`` is spent, so all stop after the same
step, save a checkpoint and exit 0.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

import torch
import torch.distributed as dist

from megatron_llm.cluster.ranks import local_device

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, exit_after_minutes: float = 0.0, exit_interval: int = 0) -> None:
        self.start = time.monotonic()
        self.budget_s = exit_after_minutes * 60.0
        self.exit_interval = exit_interval
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        print(f"[preemption] {self.signal_name} received: saving after this step", flush=True)

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def reason(self, step: int) -> str | None:
        """Why to stop after ``step`` (a signal, the time budget, ...), agreed by every rank."""
        if self.exit_interval and step % self.exit_interval == 0:
            return f"train.exit_interval={self.exit_interval} reached"  # the same on every rank
        over_budget = self.budget_s > 0 and time.monotonic() - self.start >= self.budget_s
        # 2: a signal (reported first), 1: the time budget, 0: go on.
        # On the rank's device: NCCL reduces no CPU tensor. One deliberate host sync per step.
        code = torch.tensor(
            2 if self.signal_name else 1 if over_budget else 0, device=local_device()
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
        agreed = code.item()
        if agreed == 2:
            return f"signal {self.signal_name}" if self.signal_name else "signal on another rank"
        if agreed == 1:
            return f"time budget of train.exit_after_minutes={self.budget_s / 60:g} spent"
        return None
