"""The pretraining loop over a Run (training/run.py assembles it)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from deepspeed import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine

from megatron_llm.config import RunConfig
from megatron_llm.data.batch import (
    DocumentMasking,
    document_masking,
    input_label_pairs,
    model_inputs,
)
from megatron_llm.eval.perplexity import perplexity, validation_loss
from megatron_llm.model.shape import model_parameters
from megatron_llm.parallel.context import ContextParallel, split_batch, split_batches
from megatron_llm.parallel.engine import engine_device
from megatron_llm.parallel.groups import ParallelContext, mean_over_dp
from megatron_llm.training.health import StepMonitor
from megatron_llm.training.metrics import MetricsLog, moe_metrics
from megatron_llm.training.preemption import StopRequest
from megatron_llm.training.run import Run, build_run


def local_grad_norm(engine: DeepSpeedEngine, tp_group: dist.ProcessGroup | None = None) -> float:
    # DeepSpeed records the global norm for ZeRO >= 1 and bf16, not for plain ZeRO 0: there the
    # gradients are whole and already reduced over data parallelism before step(). Under tensor
    # parallelism each rank holds one shard of the split parameters (sum their squares over the
    # tp group) and a full copy of the replicated ones (count them once). The sums stay on the
    # engine's device in fp64 (NCCL reduces device tensors only).
    device = engine_device(engine)
    split = torch.zeros((), dtype=torch.float64, device=device)
    replicated = torch.zeros((), dtype=torch.float64, device=device)
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
    return (split + replicated).sqrt().item()  # host sync: once per step, for the log


def train_step(
    engine: DeepSpeedEngine,
    batches: Iterator[torch.Tensor],
    accum: int,
    tp_group: dist.ProcessGroup | None = None,
    masking: DocumentMasking | None = None,
    context: ContextParallel | None = None,
) -> tuple[torch.Tensor, float | None]:
    """One optimizer step over ``accum`` micro-batches: (this rank's mean loss, grad norm).
    ``masking``: packed documents' ids for the model (data.reset_attention_mask / positions)."""
    if isinstance(engine, PipelineEngine):
        # The 1F1B schedule runs the accum micro-batches through the stages (DeepSpeed moves
        # them to its device); the loss comes back averaged over micro-batches and data-parallel
        # ranks, on every stage.
        # cp: each micro-batch cut into this rank's chunks (parallel/context.py)
        loss = engine.train_batch(split_batches(input_label_pairs(batches, masking), context))
        norm = engine.get_global_grad_norm()  # float() below: a host sync when it is a tensor
        return loss.detach().float(), None if norm is None else float(norm)
    device = engine_device(engine)
    total = torch.zeros((), dtype=torch.float32, device=device)
    measured = None
    for _ in range(accum):
        # (micro_batch, seq + 1), read on the CPU; the copy is queued behind the device's work
        tokens = next(batches).to(device, non_blocking=True)
        inputs, labels, ids = model_inputs(tokens, masking)  # ids on the device, from the tokens
        inputs, labels, ids = split_batch((inputs, labels, ids), context)  # cp: my chunks
        loss = engine(inputs, labels, **ids)
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0:
            measured = local_grad_norm(engine, tp_group)  # before step() clips and clears them
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        total += loss.detach().float()
    norm = engine.get_global_grad_norm()  # float() below: a host sync when it is a tensor
    return total / accum, measured if norm is None else float(norm)


def eval_due(cfg: RunConfig, step: int, last: bool) -> bool:
    return bool((cfg.eval.interval and step % cfg.eval.interval == 0) or (last and cfg.eval.at_end))


def save_due(cfg: RunConfig, step: int, last: bool) -> bool:
    c = cfg.checkpoint
    return bool((c.save_interval and step % c.save_interval == 0) or (last and c.save_at_end))


def bad_steps_message(cfg: RunConfig, step: int, consumed: int) -> str:
    k = cfg.train.max_bad_steps
    if cfg.train.precision == "fp16":
        return (
            f"{k} steps in a row up to step {step} had a non-finite loss or gradients (the loss "
            f"scaler skipped them; data position consumed_samples={consumed}); a checkpoint was "
            "saved. Lower optim.lr or check the data, then resume."
        )
    return (
        f"{k} steps in a row up to step {step} had a non-finite loss or gradient norm (data "
        f"position consumed_samples={consumed}); the weights are no longer trustworthy, so no "
        f"checkpoint was saved. Resume from the last one in {cfg.checkpoint.dir} (--resume auto) "
        "with a lower optim.lr, or skip the data."
    )


def train(cfg: RunConfig, ctx: ParallelContext) -> dict[str, Any]:
    """Train up to cfg.train.steps steps; returns the run summary (same on every rank)."""
    run = build_run(cfg, ctx)
    batches = run.batches()
    log = MetricsLog(
        cfg.logging.dir,
        enabled=ctx.is_logging_rank,
        resume_step=run.step,
        tensorboard=cfg.logging.tensorboard,
    )
    monitor = StepMonitor(cfg, ctx.world_size, run.model.vocab_size, run.global_batch)
    summary = opening_summary(run)
    stop = StopRequest(cfg.train.exit_after_minutes, cfg.train.exit_interval)
    start, step = time.perf_counter(), run.step
    try:
        for step in range(run.step + 1, cfg.train.steps + 1):
            record, too_many_bad = measured_step(run, batches, monitor, log, step)
            run.saver.poll()  # a background save that failed stops every rank here
            summary["losses"].append(record["loss"])
            last = step == cfg.train.steps
            if too_many_bad:
                summary["failed"] = bad_steps_message(cfg, step, record["consumed_samples"])
                log.write(record)
                if cfg.train.precision == "fp16":  # skipped steps left the weights intact
                    summary["checkpoint"] = run.save(step)
                break
            stopping = None if last else stop.reason(step)
            if run.valid_set is not None and not stopping and eval_due(cfg, step, last):
                summary["val_loss"] = record["val_loss"] = evaluate(run)
            if "lr" in record or "val_loss" in record:
                log.print_step(record)
            log.write(record)
            if stopping or save_due(cfg, step, last):
                summary["checkpoint"] = run.save(step)
            if stopping:
                summary["stopped"] = stopping
                if ctx.is_logging_rank:
                    print(f"[preemption] stopped after step {step}: {stopping}", flush=True)
                break
        run.saver.wait()  # the last save is published (or its failure raised) before we return
    finally:
        stop.restore_handlers()
        log.close()
    return closing_summary(run, summary, step, time.perf_counter() - start)


def measured_step(
    run: Run, batches: Iterator[torch.Tensor], monitor: StepMonitor, log: MetricsLog, step: int
) -> tuple[dict[str, Any], bool]:
    """Train ``step``: its metrics record, and whether too many bad steps came in a row."""
    cfg, engine = run.cfg, run.engine
    lr = engine.get_lr()[0]  # the rate this step uses; after step() it is the next one's
    local_loss, grad_norm = train_step(
        engine,
        batches,
        cfg.train.grad_accum_steps,
        run.ctx.tp_group,
        document_masking(cfg.data, run.tokenizer.eod),
        run.model.context,
    )
    loss = mean_over_dp(local_loss, run.ctx)  # host sync: the loss every rank logs and checks
    log.count_tokens(run.global_batch * cfg.model.seq_length)
    consumed = run.consumed(step)
    record: dict[str, Any] = {"step": step, "loss": loss, "consumed_samples": consumed}
    if cfg.model.moe.num_experts:  # collective on every rank; starts the next step's sums
        record.update(moe_metrics(engine.module, run.ctx))
    health, too_many_bad = monitor.check(loss, grad_norm, engine.skipped_steps)
    record.update(health)
    if step % cfg.logging.interval == 0 or step in (run.step + 1, cfg.train.steps) or health:
        tokens_per_s = log.throughput()
        record.update(lr=lr, tokens_per_s=tokens_per_s, grad_norm=grad_norm)
        record.update(monitor.throughput(tokens_per_s))
    if "loss_spike_z" in record and run.ctx.is_logging_rank:
        print(monitor.spike_message(step, loss, record["loss_spike_z"], consumed), flush=True)
    return record, too_many_bad


def evaluate(run: Run) -> float:
    return validation_loss(
        run.engine,
        run.valid_set,
        iters=run.cfg.eval.iters,
        micro_batch_size=run.cfg.train.micro_batch_size,
        ctx=run.ctx,
        masking=document_masking(run.cfg.data, run.tokenizer.eod),
        context=run.model.context,
    )


def opening_summary(run: Run) -> dict[str, Any]:
    """The summary's fields known before the first step; printed by the logging rank."""
    cfg, ctx = run.cfg, run.ctx
    # MoE: what a token runs through, the count MFU is measured on (model/shape.py)
    active = model_parameters(cfg.model, run.model.vocab_size, active=True)
    moe = f" ({active:,} active per token)" if cfg.model.moe.num_experts else ""
    cp = f" x cp {ctx.cp}" if ctx.cp > 1 else ""
    if ctx.is_logging_rank:
        print(
            f"model: {run.parameters:,} parameters{moe}, {cfg.model.style} style; "
            f"world {ctx.world_size} = tp {ctx.tp}{cp} x pp {ctx.pp} x dp {ctx.dp}; "
            f"global batch {run.global_batch} x {cfg.model.seq_length} tokens",
            flush=True,
        )
    return {
        "parameters": run.parameters,
        "active_parameters": active,
        "world_size": ctx.world_size,
        "global_batch_size": run.global_batch,
        "first_step": run.step + 1,
        "losses": [],
    }


def closing_summary(run: Run, summary: dict[str, Any], step: int, elapsed: float) -> dict[str, Any]:
    """The summary with the steps run up to ``step``, their tokens and time."""
    tokens = (step - run.step) * run.global_batch * run.cfg.model.seq_length
    summary.update(
        steps=step, seconds=elapsed, tokens=tokens, tokens_per_s=tokens / max(elapsed, 1e-9)
    )
    if "val_loss" in summary:
        summary["val_perplexity"] = perplexity(summary["val_loss"])
    return summary
