"""Validation loss and perplexity, averaged over every data-parallel and context-parallel rank."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from megatron_llm.data.batch import DocumentMasking, input_label_pairs, model_inputs
from megatron_llm.data.sampler import SizedTokenDataset, micro_batches
from megatron_llm.parallel.context import ContextParallel, split_batch, split_batches
from megatron_llm.parallel.engine import engine_device
from megatron_llm.parallel.groups import ParallelContext, mean_over_dp

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def validation_loss(
    engine: DeepSpeedEngine,
    dataset: SizedTokenDataset,
    *,
    iters: int,
    micro_batch_size: int,
    ctx: ParallelContext,
    masking: DocumentMasking | None = None,
    context: ContextParallel | None = None,
) -> float:
    """Mean token loss over ``iters`` micro-batches per rank, always the same samples;
    ``masking``: packed documents' ids for the model, as in training; ``context``: under
    context parallelism each micro-batch is cut into this rank's chunks, as in training."""
    batches = micro_batches(
        dataset,
        consumed_samples=0,
        micro_batch_size=micro_batch_size,
        dp_rank=ctx.dp_rank,
        dp_size=ctx.dp,
    )
    if hasattr(engine, "eval_batch"):  # a pipeline engine: the schedule runs the stages
        pairs = split_batches(input_label_pairs(batches, masking), context)
        loss = engine.eval_batch(pairs, num_micro_batches=iters)
        return mean_over_dp(loss.detach().float(), ctx)
    engine.eval()
    device = engine_device(engine)
    total = torch.zeros((), dtype=torch.float32, device=device)
    with torch.no_grad():
        for _ in range(iters):
            tokens = next(batches).to(device, non_blocking=True)  # (micro_batch, seq + 1)
            inputs, labels, ids = model_inputs(tokens, masking)
            inputs, labels, ids = split_batch((inputs, labels, ids), context)
            total += engine(inputs, labels, **ids).float()
    engine.train()
    return mean_over_dp(total / iters, ctx)  # host sync: one per evaluation


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # beyond that exp overflows a float
