"""Tensor-parallel layers, each built from the single-device layer it replaces.

Each layer's constructor takes the single-device layer and keeps this rank's shard of its
weights (``collectives.tp_shard``, the one slicing rule; on the meta device while training
assembles a model, parallel/build.py). Sharded parameters carry ``tensor_model_parallel = True`` and
``partition_dim``: DeepSpeed's gradient-norm code counts such parameters on every tp rank and
the others (replicated) on tp rank 0 only.

Our own layers rather than megatron-core's: its layers want a TransformerConfig, fall back to
its global ``parallel_state`` for groups, assume a sequence-first layout, and their
sequence-parallel collectives allocate on ``torch.cuda.current_device()``, so they do not run on
CPU ranks; ours take the group explicitly and keep the model's (batch, seq, hidden) layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_llm.model.gpt import IGNORE, Embedding, Norm
from megatron_llm.model.moe import GroupedExperts
from megatron_llm.parallel.collectives import (
    SEQ_DIM,
    column_linear,
    copy_to_tp,
    gather_from_sp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_sp,
    tp_shard,
)
from megatron_llm.parallel.groups import ParallelContext


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    group: dist.ProcessGroup
    rank: int
    size: int
    sequence_parallel: bool  # activations outside the parallel linears are sequence shards

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Input of a column-parallel op: the whole sequence, gradients summed over tp."""
        return (
            gather_from_sp(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)
        )

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        """Output of a row-parallel op: partial sums reduced (and re-split under sp)."""
        if self.sequence_parallel:
            return reduce_scatter_to_sp(x, self.group)
        return reduce_from_tp(x, self.group)


def part_index(p: torch.Tensor, shape: torch.Size, ctx: ParallelContext) -> tuple[slice, ...]:
    """Where this rank's part of parameter ``p`` lies in its whole tensor of ``shape``: the one
    slice rule for parameters. Expert-parallel parameters (``expert_parallel``, stacked experts
    with dim 0 the global expert index) keep rows [ep_rank * E/ep, (ep_rank + 1) * E/ep) of dim
    0; tensor-parallel ones (``tensor_model_parallel``) keep their tp rank's equal slice of
    ``partition_dim`` (``collectives.tp_shard``'s chunks); replicated ones all of it. Values
    that fill parameters (parallel/shard.py), checkpoints' reads and writes and reshapes
    (checkpoint/state.py) all go through here, so every layout agrees on global offsets."""
    index = [slice(None)] * len(shape)
    splits = []
    if ctx.ep > 1 and getattr(p, "expert_parallel", False):
        splits.append((0, ctx.ep_rank, ctx.ep, "parallel.ep"))
    if ctx.tp > 1 and getattr(p, "tensor_model_parallel", False):
        splits.append((p.partition_dim, ctx.tp_rank, ctx.tp, "parallel.tp"))
    for dim, rank, size, name in splits:
        if index[dim] != slice(None) or shape[dim] % size:
            raise ValueError(
                f"dimension {dim} of a parameter of shape {tuple(shape)} does not split over "
                f"{name}={size}; choose sizes it divides"
            )
        n = shape[dim] // size
        index[dim] = slice(rank * n, (rank + 1) * n)
    return tuple(index)


def local_part(whole: torch.Tensor, p: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """This rank's part of a whole value of parameter ``p`` (``part_index``): its expert rows
    and/or tp shard where ``p`` is split, all of it where ``p`` is replicated."""
    return whole[part_index(p, whole.shape, ctx)]


def whole_of(part: torch.Tensor, p: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """The inverse of ``local_part``: this rank's part of a value of ``p`` gathered whole, on
    the part's device. Collective over the tp group (tensor-parallel ``p``) and the ep group
    (expert-parallel ``p``): every rank of them must call it for the same parameter."""
    if ctx.tp > 1 and getattr(p, "tensor_model_parallel", False):
        part = _gather(part, ctx.tp_group, ctx.tp, p.partition_dim)
    if ctx.ep > 1 and getattr(p, "expert_parallel", False):
        part = _gather(part, ctx.ep_group, ctx.ep, 0)
    return part


def _gather(x: torch.Tensor, group: dist.ProcessGroup, size: int, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)  # rank order: part_index's slices, concatenated


def _shard(p: torch.Tensor, tp: TensorParallel, dim: int) -> nn.Parameter:
    shard = nn.Parameter(tp_shard(p.detach(), dim, tp.rank, tp.size).clone())
    shard.tensor_model_parallel = True  # DeepSpeed: counted once per shard in the grad norm
    shard.partition_dim = dim
    return shard


def _replicated_on_shards(p: torch.Tensor | None, tp: TensorParallel) -> torch.Tensor | None:
    # A replicated parameter applied to a sequence shard sees part of the batch: sum its
    # gradient over the tp group (identity forward, all-reduce backward).
    if p is None or not tp.sequence_parallel:
        return p
    return copy_to_tp(p, tp.group)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows (heads, ffn columns, vocab) split across tp ranks.

    ``entered=True``: the input has already passed ``tp.enter`` (see ``enter_once``), so q, k
    and v share one all-gather / all-reduce instead of paying one each.
    """

    def __init__(self, dense: nn.Linear, tp: TensorParallel, *, entered: bool = False) -> None:
        super().__init__()
        self.tp, self.entered = tp, entered
        self.weight = _shard(dense.weight, tp, 0)
        self.bias = None if dense.bias is None else _shard(dense.bias, tp, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.entered else self.tp.enter(x)
        return column_linear(x, self.weight, self.bias)  # (batch, seq, out / tp)


def enter_once(module: nn.Module, tp: TensorParallel) -> None:
    """Apply ``tp.enter`` to ``module``'s input, once for all its column-parallel layers."""

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (tp.enter(args[0]), *args[1:])

    module.register_forward_pre_hook(hook)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's input columns split; the bias is replicated."""

    def __init__(self, dense: nn.Linear, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.weight = _shard(dense.weight, tp, 1)
        self.bias = None if dense.bias is None else nn.Parameter(dense.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.leave(F.linear(x, self.weight))  # (batch, seq or seq / tp, out)
        bias = _replicated_on_shards(self.bias, self.tp)
        return y if bias is None else y + bias


class TensorParallelExperts(GroupedExperts):
    """An MoE layer's stacked experts with each expert's MLP split over tp like the dense MLP:
    w_in and w_gate by ffn columns (dim 2), w_out by ffn rows (dim 1), on top of the ep split of
    dim 0. Every tp rank routes the same replicated tokens the same way, so each computes its
    slice of every expert on the same tokens: they enter with an identity forward and an
    all-reduce backward, and the partial outputs are summed over tp (all-reduce forward)."""

    def __init__(self, experts: GroupedExperts, tp: TensorParallel) -> None:
        nn.Module.__init__(self)
        self.tp = tp
        self.expert_offset = experts.expert_offset
        self.w_in = _shard(experts.w_in, tp, 2)
        self.w_gate = None if experts.w_gate is None else _shard(experts.w_gate, tp, 2)
        self.w_out = _shard(experts.w_out, tp, 1)
        for key, p in self._parameters.items():
            if p is not None:  # expert_parallel (and the ep markers) travel with the shard
                p.__dict__.update({**getattr(experts, key).__dict__, **p.__dict__})

    def forward(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        tokens = copy_to_tp(tokens, self.tp.group)
        return reduce_from_tp(super().forward(tokens, counts), self.tp.group)  # (n, hidden)


class GatherSequenceForReplicated(torch.autograd.Function):
    """All-gather the sequence forward, keep my chunk of the gradient backward: the input of a
    computation every tp rank repeats on the whole sequence (an MoE layer under sequence
    parallelism), whose gradient each rank then holds whole and identical, so nothing is summed
    (Megatron's gather with tensor_parallel_output_grad=False)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:  # type: ignore[override]
        ctx.tp = tp
        return _gather(x, tp.group, tp.size, SEQ_DIM)  # (batch, seq, hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return tp_shard(grad, SEQ_DIM, ctx.tp.rank, ctx.tp.size).contiguous(), None


def on_whole_sequence(module: nn.Module, tp: TensorParallel) -> None:
    """Run ``module`` on the whole sequence under sequence parallelism: its input gathered
    (GatherSequenceForReplicated), its output cut back to this rank's chunk (``scatter_to_sp``:
    my chunk forward, all-gather backward)."""

    def gather(_: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (GatherSequenceForReplicated.apply(args[0], tp), *args[1:])

    def scatter(_: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        return scatter_to_sp(out, tp.group)  # (batch, seq / tp, hidden)

    module.register_forward_pre_hook(gather)
    module.register_forward_hook(scatter)


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by vocabulary; ``attend`` gives this rank's slice of the logits."""

    def __init__(self, dense: Embedding, tp: TensorParallel) -> None:
        super().__init__()
        rows = dense.num_embeddings // tp.size
        self.tp = tp
        self.vocab_start = tp.rank * rows
        self.weight = _shard(dense.weight, tp, 0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # (batch, seq, hidden)
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(x, self.tp.group)  # every rank contributed its rows

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return column_linear(self.tp.enter(x), self.weight)  # (batch, seq, vocab / tp)


class SequenceParallelNorm(Norm):
    """The same norm on a sequence shard; its gains' gradients are summed over tp."""

    def __init__(self, norm: Norm, tp: TensorParallel) -> None:
        nn.Module.__init__(self)
        self.kind, self.eps, self.kernels, self.tp = norm.kind, norm.eps, norm.kernels, tp
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _replicated_on_shards(self.weight, self.tp)
        return self.normalize(x, weight, _replicated_on_shards(self.bias, self.tp))


class ScatterSequence(nn.Module):
    """Enter sequence parallelism: keep this rank's chunk of the sequence."""

    def __init__(self, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scatter_to_sp(x, self.tp.group)  # (batch, seq / tp, hidden)


class ForkedDropout(nn.Dropout):
    """Dropout on a tensor split across tp ranks: its own RNG stream, different on each rank."""

    def __init__(self, p: float, rng: Callable[[], AbstractContextManager]) -> None:
        super().__init__(p)
        self.rng = rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.rng():
            return super().forward(x)


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split by vocabulary; the full logits are never gathered.

    Forward all-reduces three (tokens,)-sized vectors: the max, the target logit and the sum
    of exponentials. Backward needs no communication: softmax minus one-hot, locally.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_start: int,
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        logits = logits.float()  # (tokens, vocab / tp)
        vocab = logits.shape[-1]
        top = logits.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        z = logits - top.unsqueeze(-1)
        local = labels - vocab_start
        mine = (local >= 0) & (local < vocab)
        local = local.masked_fill(~mine, 0)
        target = z.gather(1, local.unsqueeze(-1)).squeeze(-1) * mine
        dist.all_reduce(target, group=group)
        exp = z.exp()
        total = exp.sum(dim=-1)
        dist.all_reduce(total, group=group)
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), local, mine)
        return total.log() - target  # (tokens,)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        softmax, local, mine = ctx.saved_tensors
        d = softmax.clone()
        rows = torch.arange(d.shape[0], device=d.device)
        d[rows, local] -= mine.to(d.dtype)
        return d * grad.unsqueeze(-1), None, None, None


@dataclasses.dataclass(frozen=True)
class VocabParallelLoss:
    """Drop-in for the model's ``loss_fn`` when its logits are split by vocabulary."""

    vocab_start: int
    group: dist.ProcessGroup

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = logits.reshape(-1, logits.shape[-1])  # (batch * seq, vocab / tp)
        labels = labels.reshape(-1)
        keep = labels != IGNORE  # masked labels (fine-tuning prompts, padding) add nothing
        losses = VocabParallelCrossEntropy.apply(
            flat, labels.masked_fill(~keep, 0), self.vocab_start, self.group
        )
        return (losses * keep).sum() / keep.sum().clamp(min=1)
