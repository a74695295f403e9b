"""The decoder as DeepSpeed pipeline layers (``PipelineModule``, 1F1B schedule).

The GPT is built on the meta device and sharded for tensor parallelism as without pipelines,
and each rank fills in only its stage's layers (parallel/build.py); its modules then become a
flat list of pipeline layers, in the order of ``GPT.layer_prefixes``:

    [embedding] [positions + dropout (+ sequence scatter)] [block 0] ... [block L-1]
    [final norm] [head]

With document masking (data.reset_attention_mask / reset_position_ids) the activations between
layers and stages are the tuple (hidden, *document ids), the ids in ``DocumentMasking.fields``
order (int64, no grad: DeepSpeed's engine sends non-float tensors forward and no gradient back):
every block reads them, and the final norm drops them. They are activations, not a shared
context, because under 1F1B with activation checkpointing a block recomputes micro-batch i
after the forward of micro-batch i + 1.

The first stage holds the embedding, the last the final norm, the head and the loss. With tied
embeddings the head is the embedding itself: a ``TiedLayerSpec`` builds it on both stages and
DeepSpeed sums the two gradients (``allreduce_tied_weight_gradients``). Blocks are split across
stages by count (``uniform``), by parameter count (``parameters``), or as the user lists them
(``parallel.pipeline_split``: blocks per stage).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_llm.data.batch import document_fields
from megatron_llm.model.gpt import GPT, Block, token_positions
from megatron_llm.parallel.groups import ParallelContext

if TYPE_CHECKING:
    from megatron_llm.config import RunConfig


class EmbeddingPipe(nn.Module):
    """Token embedding; on the last stage of a tied model, also the output head."""

    def __init__(self, embed: nn.Module, carries: bool = False) -> None:
        super().__init__()
        self.embed = embed
        self.carries = carries  # the input is (tokens, *document ids): pass the ids on

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> Any:
        if self.carries:
            tokens, *ids = inputs
            return (self.embed(tokens), *ids)  # (batch, seq, hidden), ids unchanged
        return self.embed(inputs)  # (batch, seq, hidden)


def tied_head(module: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    return module.embed.attend(x)  # (batch, seq, vocab or vocab / tp)


class InputPipe(nn.Module):
    """Learned positions, embedding dropout and, under sequence parallelism, the scatter."""

    def __init__(self, model: GPT, fields: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.pos_embed = model.pos_embed
        self.scatter_sequence = model.scatter_sequence
        self.dropout = model.dropout
        self.fields = fields  # the document ids carried after the hidden states
        self.context = model.context  # cp: the tokens are this rank's chunks (global positions)

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> Any:
        x, ids = (inputs[0], inputs[1:]) if self.fields else (inputs, ())
        if self.pos_embed is not None:
            positions = dict(zip(self.fields, ids, strict=True)).get("positions")
            if positions is None:
                positions = token_positions(self.context, 0, x.shape[1], x.device)
            x = x + self.pos_embed(positions)
        x = self.dropout(self.scatter_sequence(x))
        return (x, *ids) if self.fields else x


class BlockPipe(nn.Module):
    """A block reading the document ids carried beside the hidden states, and passing them on."""

    def __init__(self, block: Block, fields: tuple[str, ...]) -> None:
        super().__init__()
        self.block = block
        self.fields = fields

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, *ids = inputs
        return (self.block(x, None, **dict(zip(self.fields, ids, strict=True))), *ids)


class DropIds(nn.Module):
    """The final norm, dropping the document ids: the head and the loss read hidden states."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.norm(inputs[0])


class Pipeline(PipelineModule):
    """A PipelineModule whose blocks go to stages as ``blocks_per_stage`` says."""

    def __init__(self, layers: list, blocks_per_stage: Sequence[int], **kwargs: Any) -> None:
        self._blocks_per_stage = list(blocks_per_stage)
        super().__init__(layers, partition_method="ours", **kwargs)

    def _partition_layers(self, method: str = "ours") -> None:
        self.parts = stage_parts(self._blocks_per_stage)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def stage_parts(blocks_per_stage: Sequence[int]) -> list[int]:
    """Stage s holds layers [parts[s], parts[s + 1]) of build_pipeline's list: its
    blocks_per_stage[s] blocks, the two input layers (embedding, positions) on the first stage
    and the final norm and head on the last."""
    parts, at = [0], 2
    for count in blocks_per_stage[:-1]:
        at += count
        parts.append(at)
    parts.append(2 + sum(blocks_per_stage) + 2)
    return parts


def split_blocks(model: GPT, stages: int, method: str, split: Sequence[int] | None) -> list[int]:
    """Blocks per stage: as listed, uniform by count, or balanced by parameter count."""
    n = len(model.blocks)
    if split:
        if len(split) != stages or sum(split) != n or min(split) < 1:
            raise ValueError(
                f"parallel.pipeline_split={list(split)}: expected {stages} positive block counts "
                f"(one per stage) summing to model.num_layers={n}"
            )
        return list(split)
    if n < stages:
        raise ValueError(f"model.num_layers={n} < parallel.pp={stages}: a stage would be empty")
    if method == "uniform":
        return [n // stages + (1 if s < n % stages else 0) for s in range(stages)]
    # "parameters": the first and last stages also carry the embedding and the head, so give
    # them fewer blocks when those are large; greedy over cumulative parameter targets.
    block = sum(p.numel() for p in model.blocks[0].parameters())
    embed = sum(p.numel() for p in model.embed.parameters())
    head = embed if model.head is None else sum(p.numel() for p in model.head.parameters())
    weights = [embed] + [block] * n + [head]
    total = sum(weights)
    counts, start = [], 1
    for s in range(stages - 1):
        target, acc, i = total * (s + 1) / stages, sum(weights[:start]), start
        while i < n + 1 - (stages - 1 - s) and acc + weights[i] / 2 <= target:
            acc += weights[i]
            i += 1
        counts.append(max(1, i - start))
        start += counts[-1]
    counts.append(n - sum(counts))
    return counts


def build_pipeline(model: GPT, ctx: ParallelContext, cfg: RunConfig) -> Pipeline:
    """The (tp-sharded) GPT as a PipelineModule over this job's (pp, dp, tp) topology."""
    p = cfg.parallel
    counts = split_blocks(model, ctx.pp, p.pipeline_partition, p.pipeline_split)
    tied = model.head is None
    fields = document_fields(cfg.data)
    carries = bool(fields)
    layers: list[Any] = [
        TiedLayerSpec(
            "embed", EmbeddingPipe, model.embed, carries, tied_weight_attr=["embed.weight"]
        )
        if tied
        else EmbeddingPipe(model.embed, carries),
        InputPipe(model, fields),
        *(BlockPipe(block, fields) if carries else block for block in model.blocks),
        DropIds(model.final_norm) if carries else model.final_norm,
        TiedLayerSpec(
            "embed",
            EmbeddingPipe,
            model.embed,
            forward_fn=tied_head,
            tied_weight_attr=["embed.weight"],
        )
        if tied
        else model.head,
    ]
    every = cfg.train.activation_checkpointing
    return Pipeline(
        layers,
        counts,
        # cp ranks reduce gradients like dp ranks and sit between tp and dp in the rank order,
        # so DeepSpeed's "data" axis is dp x cp (its data-parallel group = our dp_cp_group).
        topology=PipeModelDataParallelTopology(
            num_pp=ctx.pp, num_mp=ctx.tp, num_dp=ctx.dp * ctx.cp
        ),
        loss_fn=model.loss_fn,
        activation_checkpoint_interval=every,
        activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False),
        checkpointable_layers=[Block.__name__, BlockPipe.__name__],
    )


def stage_parameter_names(model: GPT, ctx: ParallelContext, cfg: RunConfig) -> set[str]:
    """The single-device names of the parameters build_pipeline puts on this rank's stage: the
    embedding and positions on the first, its blocks, the final norm and head on the last (and
    the embedding again there when the head is tied to it)."""
    p = cfg.parallel
    parts = stage_parts(split_blocks(model, ctx.pp, p.pipeline_partition, p.pipeline_split))
    prefixes = tuple(model.layer_prefixes()[parts[ctx.pp_rank] : parts[ctx.pp_rank + 1]])
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


def global_names(model: GPT, pipe: nn.Module) -> dict[str, str]:
    """Pipeline parameter name -> the single-device model's name, for this stage's params."""
    ours = {id(p): name for name, p in model.named_parameters()}
    return {name: ours[id(p)] for name, p in pipe.named_parameters() if id(p) in ours}
