"""DeepSpeed engine setup: the config dict, AdamW, the schedule and deepspeed.initialize.

Gradient accumulation dtype: in bf16, micro-batch gradients are summed in fp32, as Megatron
does (``data_types.grad_accum_dtype``). DeepSpeed 0.19 honours that for ZeRO 1 (its bf16
optimizer keeps fp32 gradient buffers), 2 and 3 (fp32 gradient partitions); it has no fp32
accumulation for ZeRO 0 in bf16 (it raises NotImplementedError), so ZeRO 0 sums in bf16 and the
run says so when it accumulates more than one micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

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


def is_expert_param(p: torch.Tensor) -> bool:
    """Split over expert parallelism and marked for DeepSpeed (``mark_expert_params``): its
    gradient is reduced over the expert data-parallel group, not the dense one."""
    return getattr(p, "allreduce", True) is False


def expert_group_name(ctx: ParallelContext) -> str:
    return f"ep_size_{ctx.ep}"  # DeepSpeed's own naming of its expert groups


def mark_expert_params(model: nn.Module, ctx: ParallelContext) -> list[int]:
    """Give the expert-parallel parameters DeepSpeed's MoE markers and register our ep and
    expert-dp groups under their name; returns each MoE layer's number of experts.

    DeepSpeed 0.19 reduces a parameter with ``allreduce = False`` over the expert
    data-parallel group registered in ``deepspeed.utils.groups`` under its ``group_name``
    (engine: ZeRO 0 buckets; ZeRO 1/2: the optimizer group marked 'moe', partitioned over that
    group), dividing by the DENSE data-parallel size: an expert's gradient summed over the
    ranks that hold it, each having received the tokens of its whole ep group, divided by dp,
    is the single-process mean. The registry has no public setter for groups made elsewhere:
    we fill its dicts (cleared first: a process may build several layouts)."""
    from deepspeed.utils import groups

    from megatron_llm.model.moe import MoE

    layers = [m for m in model.modules() if isinstance(m, MoE)]
    name = expert_group_name(ctx)
    for layer in layers:
        for p in layer.experts.parameters():
            p.allreduce = False
            p.group_name = name
    registry = (
        (groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS, ctx.ep_group),
        (
            groups._EXPERT_DATA_PARALLEL_GROUP,
            groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
            ctx.expert_dp_group,
        ),
    )
    for by_name, ranks, group in registry:
        by_name.clear()
        ranks.clear()
        by_name[name] = group
        ranks[name] = dist.get_process_group_ranks(group)
    return [layer.router.weight.shape[0] for layer in layers]


@contextlib.contextmanager
def experts_known_to_deepspeed(num_experts: list[int]) -> Iterator[None]:
    """deepspeed.initialize inside sees our MoE layers: DeepSpeed turns on its MoE paths
    (expert gradient reduction, 'moe' optimizer groups, expert grad norms) only for instances
    of its own MoE class, which cannot run our tp or our checkpoint format; the engine is told
    after its own scan instead. A no-op without expert parallelism."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    if not num_experts:
        yield
        return
    scan = DeepSpeedEngine._configure_distributed_model

    def configure(self: DeepSpeedEngine, model: nn.Module) -> None:
        scan(self, model)
        self.has_moe_layers = True
        self.num_experts = list(num_experts)

    DeepSpeedEngine._configure_distributed_model = configure  # type: ignore[method-assign]
    try:
        yield
    finally:
        DeepSpeedEngine._configure_distributed_model = scan  # type: ignore[method-assign]


def check_expert_parallel(cfg: RunConfig, ctx: ParallelContext) -> None:
    if ctx.ep > 1 and cfg.parallel.zero_stage not in (1, 2):
        raise ValueError(
            f"parallel.ep={ctx.ep} with parallel.zero_stage={cfg.parallel.zero_stage}: expert "
            "parallelism needs ZeRO 1 or 2 (ZeRO 0's clipping averages the grad norm over ranks "
            "that hold different experts; ZeRO 3 does not partition our experts); set "
            "parallel.zero_stage=1"
        )


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
