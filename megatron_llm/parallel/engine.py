"""DeepSpeed engine setup: the config dict, AdamW, the schedule and deepspeed.initialize.

Gradient accumulation dtype: in bf16, micro-batch gradients are summed in fp32, as Megatron
does (``data_types.grad_accum_dtype``). DeepSpeed 0.19 honours that for ZeRO 1 (its bf16
optimizer keeps fp32 gradient buffers), 2 and 3 (fp32 gradient partitions); it has no fp32
accumulation for ZeRO 0 in bf16 (it raises NotImplementedError), so ZeRO 0 sums in bf16 and the
run says so when it accumulates more than one micro-batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from megatron_llm.parallel.experts import (
    check_expert_parallel,
    experts_known_to_deepspeed,
    is_expert_param,
    mark_expert_params,
)
from megatron_llm.parallel.groups import ParallelContext

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from megatron_llm.config import RunConfig


def deepspeed_config(cfg: Any, dp: int, cp: int = 1) -> dict[str, Any]:
    """The DeepSpeed JSON config for a RunConfig; the run config stays the single source."""
    global_batch = cfg.train.check_global_batch(dp)
    precision = cfg.train.precision
    config: dict[str, Any] = {
        # DeepSpeed counts every rank of its data-parallel group (dp x cp) as taking micro-
        # batches of its own; the cp ranks share theirs, so its "batch" is ours times cp.
        "train_batch_size": global_batch * cp,
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
    if precision == "bf16" and accumulation_dtype(cfg) == torch.float32:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return config


def accumulation_dtype(cfg: Any) -> torch.dtype:
    """The dtype micro-batch gradients are summed in (see the module docstring)."""
    if cfg.train.precision == "fp32" or (
        cfg.train.precision == "bf16" and cfg.parallel.zero_stage >= 1
    ):
        return torch.float32
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No weight decay on biases and norm gains (1-D tensors), as in GPT-2 / Megatron.
    params = [p for p in model.parameters() if p.requires_grad]
    dense = [p for p in params if not is_expert_param(p)]
    groups = [
        {"params": [p for p in dense if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in dense if p.ndim < 2], "weight_decay": 0.0},
    ]
    experts = [p for p in params if is_expert_param(p)]
    if experts:
        # DeepSpeed's ZeRO 1/2 partition an optimizer group marked 'moe' over the expert
        # data-parallel group registered under its 'name' (deepspeed.moe.utils' convention).
        groups.append(
            {
                "params": experts,
                "weight_decay": weight_decay,
                "moe": True,
                "name": experts[0].group_name,
            }
        )
    return groups


def build_engine(model: nn.Module, cfg: RunConfig, ctx: ParallelContext) -> DeepSpeedEngine:
    import deepspeed

    from megatron_llm.model.moe import set_aux_grad_scale
    from megatron_llm.training.schedule import build_scheduler

    o = cfg.optim
    check_expert_parallel(cfg, ctx)
    num_experts = mark_expert_params(model, ctx) if ctx.ep > 1 else []
    # DeepSpeed divides the loss by the accumulation steps (pipelines too); the aux losses too.
    set_aux_grad_scale(model, 1.0 / cfg.train.grad_accum_steps)
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
    optimizer = torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
    )
    scheduler = build_scheduler(optimizer, o, cfg.train.steps)
    pipelined = isinstance(model, deepspeed.PipelineModule)
    low = accumulation_dtype(cfg) != torch.float32
    if low and cfg.train.grad_accum_steps > 1 and ctx.rank == 0:
        print(
            f"[engine] warning: ZeRO {cfg.parallel.zero_stage} in {cfg.train.precision} sums "
            f"{cfg.train.grad_accum_steps} micro-batch gradients in {cfg.train.precision} "
            "(DeepSpeed has no fp32 accumulation there); parallel.zero_stage=1 sums in fp32",
            flush=True,
        )
    with experts_known_to_deepspeed(num_experts):
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(cfg, ctx.dp, ctx.cp),
            mpu=None if pipelined else ctx,  # a PipelineModule brings its own grid of groups
        )
    return engine


def engine_device(engine: DeepSpeedEngine) -> torch.device:
    """The device of the engine's model, where every tensor fed to it or reduced beside it must
    live: DeepSpeed's (cuda:LOCAL_RANK on GPUs); the CPU where it names none (a CPU rank
    started without LOCAL_RANK)."""
    device = getattr(engine, "device", None)
    return torch.device("cpu") if device is None else torch.device(device)
