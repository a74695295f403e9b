"""Turn a single-device GPT into this rank's tensor- and expert-parallel shard of it.

``shard_model`` swaps a few named layers for their parallel versions (megatron_llm.parallel
.layers), each keeping this rank's slice of the weight:

    q, k, v, fc_in, fc_gate, untied head   column-parallel (heads / ffn / vocab split)
    attention out, fc_out                  row-parallel, partial sums reduced
    embedding                              vocab-parallel; the tied head reuses its shard
    loss                                   vocab-parallel cross-entropy (logits never gathered)
    norms, residual dropout                on sequence shards when sequence_parallel
    MoE routed experts (parallel.ep)       E/ep experts per rank (rows of the stacked weights),
                                           tokens moved by parallel/experts.py's all-to-all;
                                           each expert's MLP split over tp like a dense MLP
                                           (TensorParallelExperts); router replicated; under
                                           sequence parallelism the MoE layer runs on the
                                           gathered sequence and keeps its chunk
    MoE shared experts                     split over tp like a dense MLP

Training builds the model with its parameters on the meta device, shards it there, and
``materialize`` then fills in each rank's slices from whole values handed over one parameter at
a time (the seeded init, or a checkpoint's tensors): every tp size starts from the same weights,
and no rank holds more than its shard plus one whole parameter (parallel/build.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from megatron_llm.model.gpt import GPT
from megatron_llm.model.moe import MoE
from megatron_llm.parallel.experts import AllToAllDispatcher
from megatron_llm.parallel.groups import ParallelContext
from megatron_llm.parallel.layers import (
    ColumnParallelLinear,
    ForkedDropout,
    RowParallelLinear,
    ScatterSequence,
    SequenceParallelNorm,
    TensorParallel,
    TensorParallelExperts,
    VocabParallelEmbedding,
    VocabParallelLoss,
    enter_once,
    local_part,
    on_whole_sequence,
)
from megatron_llm.parallel.random import TensorParallelRNG


def shard_model(model: GPT, ctx: ParallelContext, *, sequence_parallel: bool, seed: int) -> GPT:
    """Shard ``model`` in place for this rank's ep and tp groups (no-op at ep=tp=1); returns it."""
    moe = [m for m in model.modules() if isinstance(m, MoE)]
    if ctx.ep > 1:
        if not moe:
            raise ValueError(
                f"parallel.ep={ctx.ep} needs MoE layers to split; set model.moe.num_experts or "
                "parallel.ep=1"
            )
        for layer in moe:
            shard_experts(layer, ctx)
    if ctx.tp == 1:
        return model
    model.cfg.check_divisible_by_tp(ctx.tp, sequence_parallel=sequence_parallel)
    if model.vocab_size % ctx.tp:
        raise ValueError(f"vocabulary of {model.vocab_size} rows does not split over tp={ctx.tp}")
    tp = TensorParallel(
        group=ctx.tp_group, rank=ctx.tp_rank, size=ctx.tp, sequence_parallel=sequence_parallel
    )
    rng = TensorParallelRNG(TensorParallelRNG.seed_for(seed, ctx.tp_rank, ctx.dp_rank))
    model.tp_rng = rng  # checkpoints save and restore its state
    model.embed = VocabParallelEmbedding(model.embed, tp)
    if model.head is not None:
        model.head = ColumnParallelLinear(model.head, tp)
    model.loss_fn = VocabParallelLoss(model.embed.vocab_start, tp.group)
    for block in model.blocks:
        attn = block.attn
        # Attention and MLP inputs enter the tp region once, shared by their column layers.
        enter_once(attn, tp)
        attn.q, attn.k, attn.v = (
            ColumnParallelLinear(x, tp, entered=True) for x in (attn.q, attn.k, attn.v)
        )
        attn.out = RowParallelLinear(attn.out, tp)
        attn.dropout_rng = rng.fork
        if isinstance(block.mlp, MoE):
            _shard_moe(block.mlp, tp)
        else:
            _shard_mlp(block.mlp, tp)
        if sequence_parallel:
            block.attn_norm = SequenceParallelNorm(block.attn_norm, tp)
            block.mlp_norm = SequenceParallelNorm(block.mlp_norm, tp)
            block.dropout = ForkedDropout(block.dropout.p, rng.fork)
    if sequence_parallel:
        model.scatter_sequence = ScatterSequence(tp)
        model.dropout = ForkedDropout(model.dropout.p, rng.fork)
        model.final_norm = SequenceParallelNorm(model.final_norm, tp)
    return model


def _shard_moe(layer: MoE, tp: TensorParallel) -> None:
    """An MoE layer's router stays whole on every tp rank and every rank routes the same whole
    sequence the same way (under sequence parallelism the layer gathers it and keeps its chunk
    of the output); its experts and shared experts split like an MLP on those tokens."""
    whole = dataclasses.replace(tp, sequence_parallel=False)  # inside: replicated tokens
    if tp.sequence_parallel:
        on_whole_sequence(layer, tp)
    if layer.shared is not None:
        _shard_mlp(layer.shared, whole)
    layer.experts = _shard_experts_over_tp(layer.experts, whole)


def _shard_mlp(mlp: nn.Module, tp: TensorParallel) -> None:
    width = mlp.fc_in.out_features  # the model's ffn width, or an MoE's shared experts'
    if width % tp.size:
        raise ValueError(
            f"an MLP of width {width} does not split over parallel.tp={tp.size}; choose "
            "model.ffn_hidden_size (or model.moe.shared_experts x expert width) divisible by tp"
        )
    enter_once(mlp, tp)
    mlp.fc_in = ColumnParallelLinear(mlp.fc_in, tp, entered=True)
    if mlp.fc_gate is not None:
        mlp.fc_gate = ColumnParallelLinear(mlp.fc_gate, tp, entered=True)
    mlp.fc_out = RowParallelLinear(mlp.fc_out, tp)


def _shard_experts_over_tp(experts: nn.Module, tp: TensorParallel) -> TensorParallelExperts:
    width = experts.w_in.shape[2]
    if width % tp.size:
        raise ValueError(
            f"MoE experts of width {width} do not split over parallel.tp={tp.size}; choose "
            "model.moe.expert_ffn_hidden_size divisible by tp"
        )
    return TensorParallelExperts(experts, tp)


def shard_experts(layer: MoE, ctx: ParallelContext) -> None:
    """Keep this rank's E/ep experts of ``layer`` (layers.part_index: rows [ep_rank * E/ep,
    (ep_rank + 1) * E/ep) of each stacked weight, on meta too) and route through the
    all-to-all. The parameters keep their names: checkpoints stay layout-free."""
    experts = layer.experts
    num_experts = layer.router.weight.shape[0]
    if num_experts % ctx.ep:
        raise ValueError(
            f"model.moe.num_experts={num_experts} does not split over parallel.ep={ctx.ep}; "
            "choose a number of experts divisible by parallel.ep"
        )
    for key, p in list(experts._parameters.items()):
        if p is None:
            continue
        p.expert_parallel = True  # dim 0 is the global expert index
        part = nn.Parameter(local_part(p.detach(), p, ctx).clone(), p.requires_grad)
        part.__dict__.update(p.__dict__)  # expert_parallel
        experts._parameters[key] = part
    experts.expert_offset = ctx.ep_rank * (num_experts // ctx.ep)
    layer.dispatcher = AllToAllDispatcher(ctx.ep_group, ctx.ep)


def materialize(
    model: GPT,
    values: Iterable[tuple[str, torch.Tensor]],
    ctx: ParallelContext,
    source: str,
    only: set[str] | None = None,
) -> None:
    """Give the meta parameters of ``model`` (built under build.parameters_on_meta, then
    sharded) storage on the CPU and their values: ``values`` yields (name, whole tensor) by the
    single-device model's names, one at a time, and each rank copies its part (layers.local_part:
    its shard of split parameters, all of the others). ``source`` names where
    the values come from, for errors. With ``only`` (the parameters of this pipeline stage),
    the others stay on the meta device: no memory, and no values."""
    wanted = {id(p) for name, p in model.named_parameters() if only is None or name in only}
    fresh: dict[int, nn.Parameter] = {}  # a tied weight is one parameter in two modules
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is None or not p.is_meta or id(p) not in wanted:
                continue
            if id(p) not in fresh:
                new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
                new.__dict__.update(p.__dict__)  # tensor_model_parallel, partition_dim
                fresh[id(p)] = new
            module._parameters[key] = fresh[id(p)]
    params = dict(model.named_parameters())
    filled: set[str] = set()
    with torch.no_grad():
        for name, whole in values:
            p = params.get(name)
            if p is None:
                raise ValueError(f"{source}: no parameter {name} in this model")
            if p.is_meta:  # another stage's
                continue
            whole = local_part(whole, p, ctx)
            if tuple(whole.shape) != tuple(p.shape):
                raise ValueError(
                    f"{source}: {name} has shape {tuple(whole.shape)} on this rank, the model "
                    f"expects {tuple(p.shape)}"
                )
            p.copy_(whole)
            filled.add(name)
    missing = sorted(n for n, p in params.items() if n not in filled and not p.is_meta)
    if missing:
        raise ValueError(f"{source}: no values for {missing[:5]}")
