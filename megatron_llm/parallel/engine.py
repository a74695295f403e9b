"""DeepSpeed engine setup: the config dict, AdamW, the schedule and deepspeed.initialize."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from megatron_llm.parallel.groups import ParallelContext

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from megatron_llm.config import RunConfig


def deepspeed_config(cfg: Any, dp: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for a RunConfig; the run config stays the single source."""
    global_batch = cfg.train.check_global_batch(dp)
    precision = cfg.train.precision
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # The pipeline engine sends 1/tp of each activation and all-gathers it over tp, which
        # assumes the tp ranks hold the same activation; under sequence parallelism each holds
        # its own sequence shard, so it must send them whole.
        "pipeline": {
            "pipe_partitioned": not cfg.parallel.sequence_parallel,
            "grad_partitioned": not cfg.parallel.sequence_parallel,
        },
        "steps_per_print": 2**31 - 1,  # our loop logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No weight decay on biases and norm gains (1-D tensors), as in GPT-2 / Megatron.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_engine(model: nn.Module, cfg: RunConfig, ctx: ParallelContext) -> DeepSpeedEngine:
    import deepspeed

    from megatron_llm.training.schedule import build_scheduler

    o = cfg.optim
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
    )
    scheduler = build_scheduler(optimizer, o, cfg.train.steps)
    pipelined = isinstance(model, deepspeed.PipelineModule)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, ctx.dp),
        mpu=None if pipelined else ctx,  # a PipelineModule brings its own grid of groups
    )
    return engine


def engine_device(engine: DeepSpeedEngine) -> torch.device:
    """The device of the engine's model, where every tensor fed to it or reduced beside it must
    live: DeepSpeed's (cuda:LOCAL_RANK on GPUs); the CPU where it names none (a CPU rank
    started without LOCAL_RANK)."""
    device = getattr(engine, "device", None)
    return torch.device("cpu") if device is None else torch.device(device)
