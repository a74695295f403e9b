"""The pretraining loop on top of a DeepSpeed engine."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_llm.checkpoint import io as ckpt_io
from megatron_llm.config import RunConfig
from megatron_llm.data.dataset import build_datasets
from megatron_llm.data.sampler import micro_batches
from megatron_llm.data.tokenizer import Tokenizer
from megatron_llm.eval.perplexity import perplexity, validation_loss
from megatron_llm.model import GPT
from megatron_llm.parallel.engine import build_engine
from megatron_llm.parallel.groups import ParallelContext, mean_over_dp
from megatron_llm.parallel.shard import shard_model
from megatron_llm.training.metrics import MetricsLog


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def local_grad_norm(engine: Any, tp_group: dist.ProcessGroup | None = None) -> float:
    # DeepSpeed records the global norm for ZeRO >= 1 and bf16, not for plain ZeRO 0: there the
    # gradients are whole and already reduced over data parallelism before step(). Under tensor
    # parallelism each rank holds one shard of the split parameters (sum their squares over the
    # tp group) and a full copy of the replicated ones (count them once).
    split, replicated = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for p in engine.module.parameters():
        if p.grad is None:
            continue
        square = p.grad.detach().double().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False):
            split += square
        else:
            replicated += square
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(split, group=tp_group)
    return (split + replicated).sqrt().item()


def train_step(
    engine: Any,
    batches: Iterator[torch.Tensor],
    accum: int,
    tp_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, float | None]:
    """One optimizer step over ``accum`` micro-batches: (this rank's mean loss, grad norm)."""
    total = torch.zeros(())
    measured = None
    for _ in range(accum):
        tokens = next(batches)  # (micro_batch, seq + 1)
        loss = engine(tokens[:, :-1], tokens[:, 1:])
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0:
            measured = local_grad_norm(engine, tp_group)  # before step() clips and clears them
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        total += loss.detach().float()
    norm = engine.get_global_grad_norm()
    return total / accum, measured if norm is None else float(norm)


def train(cfg: RunConfig, ctx: ParallelContext) -> dict[str, Any]:
    """Train for cfg.train.steps steps; returns the run summary (same on every rank)."""
    seed_everything(cfg.train.seed)  # the same init on every rank
    tokenizer = Tokenizer(cfg.data.tokenizer)
    model = GPT(cfg.model, cfg.model.padded_vocab_size(tokenizer.vocab_size, ctx.tp))
    parameters = model.num_parameters()  # the whole model, before this rank keeps its shard
    model = shard_model(
        model, ctx, sequence_parallel=cfg.parallel.sequence_parallel, seed=cfg.train.seed
    )
    engine = build_engine(model, cfg, ctx)
    seed_everything(cfg.train.seed + 1 + ctx.dp_rank)  # dropout differs across dp ranks

    t = cfg.train
    global_batch = t.check_global_batch(ctx.dp)
    eval_samples = cfg.eval.iters * t.micro_batch_size * ctx.dp
    train_set, valid_set = build_datasets(
        cfg.data,
        seq_length=cfg.model.seq_length,
        seed=t.seed,
        train_samples=t.steps * global_batch,
        valid_samples=eval_samples,
        tokenizer=tokenizer,
    )
    batches = micro_batches(
        train_set,
        consumed_samples=0,
        micro_batch_size=t.micro_batch_size,
        dp_rank=ctx.dp_rank,
        dp_size=ctx.dp,
    )
    log = MetricsLog(cfg.logging.dir, enabled=ctx.is_logging_rank)
    tokens_per_step = global_batch * cfg.model.seq_length
    summary: dict[str, Any] = {
        "parameters": parameters,
        "world_size": ctx.world_size,
        "global_batch_size": global_batch,
        "losses": [],
    }
    if ctx.is_logging_rank:
        print(
            f"model: {summary['parameters']:,} parameters, {cfg.model.style} style; "
            f"world {ctx.world_size} = tp {ctx.tp} x pp {ctx.pp} x dp {ctx.dp}; "
            f"global batch {global_batch} x {cfg.model.seq_length} tokens",
            flush=True,
        )

    start = time.perf_counter()
    for step in range(1, t.steps + 1):
        lr = engine.get_lr()[0]  # the rate this step uses; after step() it is the next one's
        local_loss, grad_norm = train_step(engine, batches, t.grad_accum_steps, ctx.tp_group)
        loss = mean_over_dp(local_loss, ctx)
        log.count_tokens(tokens_per_step)
        summary["losses"].append(loss)
        record: dict[str, Any] = {
            "step": step,
            "loss": loss,
            "consumed_samples": step * global_batch,
        }
        if step % cfg.logging.interval == 0 or step in (1, t.steps):
            record.update(lr=lr, tokens_per_s=log.throughput(), grad_norm=grad_norm)
        last = step == t.steps
        if valid_set is not None and (
            (cfg.eval.interval and step % cfg.eval.interval == 0) or (last and cfg.eval.at_end)
        ):
            record["val_loss"] = validation_loss(
                engine,
                valid_set,
                iters=cfg.eval.iters,
                micro_batch_size=t.micro_batch_size,
                ctx=ctx,
            )
            summary["val_loss"] = record["val_loss"]
        if "lr" in record or "val_loss" in record:
            log.print_step(record)
        log.write(record)
        if (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0) or (
            last and cfg.checkpoint.save_at_end
        ):
            run_state = {
                "step": step,
                "consumed_samples": step * global_batch,
                "tokens_seen": step * tokens_per_step,
            }
            summary["checkpoint"] = str(
                ckpt_io.save(
                    engine, cfg.checkpoint.dir, step=step, run_state=run_state, config=cfg.to_dict()
                )
            )
    elapsed = time.perf_counter() - start
    summary.update(
        steps=t.steps,
        seconds=elapsed,
        tokens=t.steps * tokens_per_step,
        tokens_per_s=t.steps * tokens_per_step / elapsed,
    )
    if "val_loss" in summary:
        summary["val_perplexity"] = perplexity(summary["val_loss"])
    return summary
