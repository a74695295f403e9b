"""Expert parallelism: all-to-all token dispatch and combine over the ep group.

Under ``parallel.ep`` each rank of an ep group (consecutive dp ranks, parallel/groups.py) holds
``E / ep`` consecutive experts of every MoE layer. The MoE layer (model/moe.py) sorts its kept
token-expert assignments by global expert and hands them to its Dispatcher; the
``AllToAllDispatcher`` here sends each rank the tokens of its experts and brings the outputs
back:

    dispatch  exchange the per-expert counts (one all-to-all of E integers, one host sync), then
              all-to-all the tokens with those uneven split sizes (dropless: nothing is padded);
              the received tokens, grouped by source rank, are regrouped by local expert
    combine   the inverse: regroup by source rank, all-to-all back with the splits swapped

The token all-to-all is a tiny autograd Function (``AllToAll``: all-to-all forward, the reverse
all-to-all backward), so gradients follow the tokens home. Every rank computes the same
collectives in the same order, so recomputation under activation checkpointing and 1F1B
pipelines stay matched.

gloo (torch 2.13) supports ``all_to_all_single`` with uneven split sizes, and NCCL does; gloo's
list form ``all_to_all`` refuses uneven tensors, so only the single-tensor form is used. The
counts stay on the device for the exchange (NCCL reduces device tensors only) and come to the
host once per dispatch, as the split sizes must.

DeepSpeed's side of the experts (which group reduces their gradients, which optimizer group
holds them, what ZeRO stages can) lives here too: parallel/engine.py calls it.
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


def _all_to_all(
    x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv), *x.shape[1:]))  # (received rows, ...)
    dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """All-to-all forward (``send[r]`` rows to rank r, ``recv[r]`` rows from it), the reverse
    all-to-all backward: each gradient row goes back to the rank its token came from."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup
    ) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all(
    x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    return AllToAll.apply(x, send, recv, group)


def exchange_counts(per_rank: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """per_rank (ep, local experts): what I send to each rank's experts -> (ep, local experts):
    what each rank sends to mine. Equal splits of one small integer tensor, on its device."""
    out = torch.empty_like(per_rank)
    dist.all_to_all_single(out, per_rank.contiguous(), group=group)
    return out


def _regroup(x: torch.Tensor, sizes: list[int], rows: int, cols: int) -> torch.Tensor:
    """x is ``rows x cols`` chunks of ``sizes`` in row-major order -> the same chunks in
    column-major order (source-major <-> local-expert-major)."""
    chunks = x.split(sizes)
    return torch.cat([chunks[r * cols + c] for c in range(cols) for r in range(rows)])


class AllToAllDispatcher:
    """model/moe.py's Dispatcher over an ep group (installed by parallel/shard.py)."""

    def __init__(self, group: dist.ProcessGroup, ep: int) -> None:
        self.group, self.ep = group, ep
        # The last dispatch's split sizes, for its combine (set in dispatch, read once).
        self._send: list[int] = []
        self._recv: list[int] = []
        self._by_source: list[int] = []  # (ep x local) counts, source-major
        self._by_expert: list[int] = []  # the same, local-expert-major

    def dispatch(
        self, tokens: torch.Tensor, per_expert: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ep = self.ep
        local = per_expert.numel() // ep
        if local * ep != per_expert.numel():
            raise ValueError(
                f"{per_expert.numel()} experts do not split over parallel.ep={ep}; choose "
                "model.moe.num_experts divisible by parallel.ep"
            )
        received = exchange_counts(per_expert.view(ep, local), self.group)  # (ep, local)
        # One deliberate host sync per dispatch: the all-to-all needs its split sizes.
        host = torch.cat([per_expert, received.flatten()]).tolist()
        sent, got = host[: ep * local], host[ep * local :]
        self._send = [sum(sent[r * local : (r + 1) * local]) for r in range(ep)]
        self._recv = [sum(got[r * local : (r + 1) * local]) for r in range(ep)]
        self._by_source = got
        self._by_expert = [got[s * local + e] for e in range(local) for s in range(ep)]
        x = all_to_all(tokens, self._send, self._recv, self.group)  # grouped by source rank
        x = _regroup(x, self._by_source, ep, local)  # grouped by local expert
        return x, received.sum(dim=0)  # (received, hidden), (local,)

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        local = len(self._by_source) // self.ep
        out = _regroup(out, self._by_expert, local, self.ep)  # grouped by source rank
        return all_to_all(out, self._recv, self._send, self.group)  # in dispatch's input order


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
    """What the engine cannot do with experts, refused in one line before it is built."""
    moe = cfg.model.moe
    if (
        moe.num_experts
        and cfg.train.precision == "fp16"
        and (moe.aux_loss_coeff or moe.z_loss_coeff)
    ):
        # DeepSpeed scales the loss by a dynamic fp16 loss scale the aux losses never see
        # (their backward starts at aux_grad_scale), so unscaling would shrink them to nothing.
        raise ValueError(
            "model.moe aux/z-losses with train.precision=fp16: their gradients would miss "
            "DeepSpeed's dynamic loss scale; use train.precision=bf16 (or coefficients of 0)"
        )
    if ctx.ep > 1 and cfg.parallel.zero_stage not in (1, 2):
        raise ValueError(
            f"parallel.ep={ctx.ep} with parallel.zero_stage={cfg.parallel.zero_stage}: expert "
            "parallelism needs ZeRO 1 or 2 (ZeRO 0's clipping averages the grad norm over ranks "
            "that hold different experts; ZeRO 3 does not partition our experts); set "
            "parallel.zero_stage=1"
        )
