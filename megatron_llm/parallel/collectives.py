"""Tensor- and sequence-parallel collectives as tiny autograd Functions.

Each is named for its forward/backward pair. Activations are (batch, seq, hidden); sequence
parallelism splits dim 1. megatron-core's equivalents read its global parallel state, assume a
sequence-first layout and allocate their buffers on CUDA, so they cannot run on our CPU ranks;
these take the group explicitly and work on gloo and nccl alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

SEQ_DIM = 1


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def tp_shard(whole: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s shard of a whole tensor split over ``size`` ranks along ``dim``: the one
    slicing rule, the inverse of the all-gather above (shards concatenated in rank order). Split
    parameters (parallel/layers.py), the values that fill them and checkpoints' whole tensors
    (parallel/shard.py, checkpoint/state.py) and sequence shards all follow it."""
    return whole.chunk(size, dim=dim)[rank]


def _my_chunk(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {size} ranks")
    return tp_shard(x, dim, rank, size).contiguous()


def _reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not split over {size} ranks")
    parts = [part.contiguous() for part in x.chunk(size, dim=dim)]
    out = torch.empty_like(parts[rank])
    dist.reduce_scatter(out, parts, op=dist.ReduceOp.SUM, group=group)
    return out


class CopyToTensorParallel(torch.autograd.Function):
    """Identity forward, all-reduce backward: a replicated input entering split computation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class ReduceFromTensorParallel(torch.autograd.Function):
    """All-reduce forward, identity backward: partial sums leaving split computation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class ScatterToSequenceParallel(torch.autograd.Function):
    """Keep my sequence chunk forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _my_chunk(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(grad, ctx.group, SEQ_DIM), None


class GatherFromSequenceParallel(torch.autograd.Function):
    """All-gather the sequence forward, reduce-scatter backward (before a column-parallel op)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter(grad, ctx.group, SEQ_DIM), None


class Regather:
    """One all-gathered sequence shared by several column-parallel layers (q, k and v; fc_in
    and fc_gate): the first of their backwards re-gathers the shard, the last lets it go."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group, self.users, self.whole = group, 0, None

    def take(self, shard: torch.Tensor) -> torch.Tensor:
        whole = self.whole if self.whole is not None else _all_gather(shard, self.group, SEQ_DIM)
        self.users -= 1
        self.whole = whole if self.users > 0 else None
        return whole


class LinearRegatheringInput(torch.autograd.Function):
    """Column-parallel matmul on the all-gathered sequence forward, saving only this rank's
    sequence shard; backward re-gathers the shard for the weight gradient (Megatron-LM's
    sequence parallelism). F.linear would keep the whole gathered input, s instead of s/t, per
    layer. The input gradient is returned whole: ``GatherFromSequenceParallel``'s backward
    sums it over the layers sharing the gather and reduce-scatters it once, in the same order
    as before."""

    @staticmethod
    def forward(
        ctx,
        whole: torch.Tensor,
        shard: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        regather: Regather,
    ) -> torch.Tensor:
        regather.users += 1
        ctx.regather, ctx.has_bias = regather, bias is not None
        ctx.save_for_backward(shard, weight)
        return F.linear(whole, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        shard, weight = ctx.saved_tensors
        whole = ctx.regather.take(shard)
        # The same products autograd forms for F.linear (grad @ W, grad^T @ x, sum over
        # tokens), so the gradients are bitwise those of the layer it replaces.
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_input = grad.matmul(weight)
        grad_weight = grad2d.t().mm(whole.reshape(-1, whole.shape[-1]))
        grad_bias = grad2d.sum(0) if ctx.has_bias else None
        return grad_input, None, grad_weight, grad_bias, None


class ReduceScatterToSequenceParallel(torch.autograd.Function):
    """Reduce-scatter over the sequence forward, all-gather backward (after a row-parallel op)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(grad, ctx.group, SEQ_DIM), None


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return CopyToTensorParallel.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return ReduceFromTensorParallel.apply(x, group)


def scatter_to_sp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return ScatterToSequenceParallel.apply(x, group)


def gather_from_sp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The whole sequence for column-parallel layers; it carries its shard (``sequence_shard``)
    so that ``column_linear`` saves the shard, not the whole."""
    whole = GatherFromSequenceParallel.apply(x, group)
    whole.sequence_shard = (x.detach(), Regather(group))
    return whole


def column_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear for a column-parallel layer: on a gathered sequence (``gather_from_sp``) it
    keeps only the sequence shard for backward."""
    carried = getattr(x, "sequence_shard", None)
    if carried is None:
        return F.linear(x, weight, bias)
    shard, regather = carried
    return LinearRegatheringInput.apply(x, shard, weight, bias, regather)


def reduce_scatter_to_sp(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return ReduceScatterToSequenceParallel.apply(x, group)
