"""The ``optim``, ``train``, ``eval`` and ``logging`` sections: the training loop's knobs."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate, reached at the end of warmup
    min_lr: float = 3e-5  # learning rate at the end of the decay
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    warmup_steps: int = 0  # linear warmup from 0 to lr over this many steps
    decay_steps: int | None = None  # steps from the end of warmup to min_lr; null = the rest
    weight_decay: float = 0.1  # AdamW decoupled weight decay (not applied to norms and biases)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr}: must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr}: must be in [0, optim.lr={self.lr}]")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps}: must be >= 0")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError(f"optim.decay_steps={self.decay_steps}: must be >= 1 or null")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optim.{name}={getattr(self, name)}: must be in [0, 1)")
        if self.weight_decay < 0 or self.eps <= 0 or self.grad_clip < 0:
            raise ValueError("optim.weight_decay and optim.grad_clip must be >= 0, optim.eps > 0")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    steps: int = 100  # optimizer steps to run
    micro_batch_size: int = 4  # samples per rank per forward/backward
    grad_accum_steps: int = 1  # micro-batches accumulated per optimizer step
    global_batch_size: int | None = None  # optional check: must equal micro x accum x dp
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 needs a GPU
    seed: int = 1234  # seeds model init, dropout and data order
    # stop, save a checkpoint and exit 0 after this many minutes of training (0 = no limit);
    # set it a few minutes under the job's wall time
    exit_after_minutes: float = 0.0
    # recompute activations in backward instead of keeping them: 0 = off, 1 = every block,
    # k = one checkpoint per k blocks (less memory, about one extra forward of compute)
    activation_checkpointing: int = 0
    # stop after this many steps in a row with a non-finite loss or gradient norm, or skipped
    # by the fp16 loss scaler (0 = never)
    max_bad_steps: int = 5
    exit_interval: int = 0  # stop, save and exit 0 after a step that is a multiple of N (0 = off)

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}: must be >= 1")
        if self.activation_checkpointing < 0:
            raise ValueError(
                f"train.activation_checkpointing={self.activation_checkpointing}: must be >= 0"
            )
        if self.max_bad_steps < 0:
            raise ValueError(f"train.max_bad_steps={self.max_bad_steps}: must be >= 0")
        if self.exit_interval < 0:
            raise ValueError(f"train.exit_interval={self.exit_interval}: must be >= 0")
        if self.exit_after_minutes < 0:
            raise ValueError(f"train.exit_after_minutes={self.exit_after_minutes}: must be >= 0")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"train.global_batch_size={self.global_batch_size}: must be >= 1")

    def check_global_batch(self, dp: int) -> int:
        gbs = self.micro_batch_size * self.grad_accum_steps * dp
        if self.global_batch_size is not None and self.global_batch_size != gbs:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} != micro_batch_size "
                f"({self.micro_batch_size}) x grad_accum_steps ({self.grad_accum_steps}) x dp "
                f"({dp}) = {gbs}; change one of them or set train.global_batch_size=null"
            )
        return gbs


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
    interval: int = 0  # validate every N steps (0 = only at the end)
    iters: int = 10  # validation micro-batches per evaluation (per data-parallel rank)
    at_end: bool = True  # validate after the last step

    def __post_init__(self) -> None:
        if self.interval < 0 or self.iters < 1:
            raise ValueError(
                f"eval.interval={self.interval} must be >= 0 and eval.iters={self.iters} >= 1"
            )


@dataclasses.dataclass(kw_only=True)
class LoggingConfig:
    interval: int = 10  # print loss, lr, grad norm and tokens/s every N steps
    dir: str = "runs/default"  # run folder: metrics.jsonl and summary.json go here
    tensorboard: bool = True  # also write TensorBoard event files to <dir>/tensorboard
    spike_window: int = 100  # loss spike detector: steps of history for mean and std
    spike_z: float = 6.0  # a loss this many std above the window's mean is a spike (0 = off)

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"logging.interval={self.interval}: must be >= 1")
        if self.spike_window < 2 or self.spike_z < 0:
            raise ValueError(
                f"logging.spike_window={self.spike_window} must be >= 2 and "
                f"logging.spike_z={self.spike_z} >= 0"
            )
