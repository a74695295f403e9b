"""The pretraining loop on top of a DeepSpeed engine."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.engine import PipelineEngine

from megatron_llm.checkpoint import runtime as ckpt_run
from megatron_llm.checkpoint.state import checked_weights
from megatron_llm.config import RunConfig
from megatron_llm.data.dataset import build_datasets
from megatron_llm.data.sampler import micro_batches
from megatron_llm.data.sft import input_label_pairs, inputs_and_labels, split_datasets
from megatron_llm.data.tokenizer import Tokenizer
from megatron_llm.eval.perplexity import perplexity, validation_loss
from megatron_llm.model import GPT
from megatron_llm.model.gpt import init_values, parameters_on_meta
from megatron_llm.parallel.engine import build_engine
from megatron_llm.parallel.groups import ParallelContext, mean_over_dp
from megatron_llm.parallel.pipeline import build_pipeline, global_names, stage_parameters
from megatron_llm.parallel.random import TensorParallelRNG
from megatron_llm.parallel.shard import materialize, shard_model
from megatron_llm.training.health import StepMonitor
from megatron_llm.training.metrics import MetricsLog
from megatron_llm.training.preemption import StopRequest


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
    if isinstance(engine, PipelineEngine):
        # The 1F1B schedule runs the accum micro-batches through the stages; the loss comes
        # back averaged over micro-batches and data-parallel ranks, on every stage.
        loss = engine.train_batch(input_label_pairs(batches))
        norm = engine.get_global_grad_norm()
        return loss.detach().float(), None if norm is None else float(norm)
    total = torch.zeros(())
    measured = None
    for _ in range(accum):
        tokens = next(batches)  # (micro_batch, seq + 1)
        loss = engine(*inputs_and_labels(tokens))
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary() and engine.zero_optimization_stage() == 0:
            measured = local_grad_norm(engine, tp_group)  # before step() clips and clears them
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        total += loss.detach().float()
    norm = engine.get_global_grad_norm()
    return total / accum, measured if norm is None else float(norm)


def reseeder(cfg: RunConfig, ctx: ParallelContext, model: torch.nn.Module) -> Callable[[int], None]:
    """Seeds the dropout streams for a run starting at ``step`` (0: a fresh run)."""

    def reseed(step: int) -> None:
        offset = step * 7919  # a resumed run at a new layout must not replay step 0's draws
        seed_everything(cfg.train.seed + 1 + ctx.dp_rank + offset)  # dropout differs across dp
        tp_rng = getattr(model, "tp_rng", None)
        if step and tp_rng is not None:
            fresh = TensorParallelRNG(
                TensorParallelRNG.seed_for(cfg.train.seed + offset, ctx.tp_rank, ctx.dp_rank)
            )
            tp_rng.state, tp_rng.cuda_state = fresh.state, fresh.cuda_state

    return reseed


def build(cfg: RunConfig, ctx: ParallelContext) -> dict[str, Any]:
    """Model, engine and data, from scratch or from the checkpoint to resume."""
    seed_everything(cfg.train.seed)  # the same init on every rank
    tokenizer = Tokenizer(cfg.data.tokenizer)
    ckpt = ckpt_run.choose(cfg.checkpoint.resume, cfg.checkpoint.dir, ctx)
    weights_only = ckpt is not None and not ckpt.has_optimizer  # e.g. from import-hf
    if ckpt is None and cfg.checkpoint.init_from:
        # A new run (fine-tuning, continued pretraining) from another run's weights.
        ckpt, weights_only = ckpt_run.choose(cfg.checkpoint.init_from, "", ctx), True
    if ckpt is not None and not weights_only:
        ckpt_run.check_compatible(ckpt, cfg.to_dict(), tokenizer.sha256)
    # Built with its parameters on the meta device and sharded there; then each rank fills in
    # only its slices, one whole parameter at a time (from the seed or the checkpoint).
    with parameters_on_meta():
        model = GPT(cfg.model, cfg.model.padded_vocab_size(tokenizer.vocab_size, ctx.tp))
    shapes = {name: p.shape for name, p in model.named_parameters()}
    parameters = model.num_parameters()  # the whole model, before this rank keeps its shard
    tensors = ckpt.tensors(optimizer=not weights_only) if ckpt else None
    model = shard_model(
        model, ctx, sequence_parallel=cfg.parallel.sequence_parallel, seed=cfg.train.seed
    )
    if tensors is not None:
        source = str(ckpt.path)
        values = checked_weights(shapes, {n: t["param"] for n, t in tensors.items()}, source)
    else:
        source = f"init from seed {cfg.train.seed}"
        values = init_values(cfg.model, shapes.items(), cfg.train.seed)
    # Under pipeline parallelism a rank fills only its stage's layers; the rest stay on meta.
    only = stage_parameters(model, ctx, cfg) if ctx.pp > 1 else None
    materialize(model, values, ctx, source, only)
    model.checkpoint_every = cfg.train.activation_checkpointing
    # Under pipeline parallelism the engine trains this stage's layers of the model.
    module = build_pipeline(model, ctx, cfg) if ctx.pp > 1 else model
    names = global_names(model, module) if module is not model else None
    engine = build_engine(module, cfg, ctx)
    run_state: dict[str, Any] = {"step": 0, "consumed_samples": 0}
    if ckpt is not None:
        run_state = ckpt_run.restore(
            engine, model, ctx, ckpt, tensors, reseeder(cfg, ctx, model), names, weights_only
        )
        if ctx.is_logging_rank:
            how = "weights of" if weights_only else "resumed from"
            print(f"[checkpoint] {how} {ckpt.path} at step {run_state['step']}", flush=True)
    else:
        reseeder(cfg, ctx, model)(0)
    del tensors
    t = cfg.train
    global_batch = t.check_global_batch(ctx.dp)
    step = run_state["step"]
    consumed = run_state["consumed_samples"] if step else 0
    # The dataset's shuffle depends on how many samples it is built for: a resumed run keeps the
    # count of the run it continues, so the samples it sees are the ones that run would have.
    needed = consumed + (t.steps - step) * global_batch
    train_samples = max(needed, run_state.get("train_samples", 0) if step else 0)
    if cfg.data.prompt_response_jsonl:
        train_set, valid_set = split_datasets(
            cfg.data.prompt_response_jsonl,
            tokenizer,
            cfg.model.seq_length,
            mask_prompt=cfg.data.mask_prompt,
            split=cfg.data.split,
        )
    else:
        train_set, valid_set = build_datasets(
            cfg.data,
            seq_length=cfg.model.seq_length,
            seed=t.seed,
            train_samples=train_samples,
            valid_samples=cfg.eval.iters * t.micro_batch_size * ctx.dp,
            tokenizer=tokenizer,
        )
    return dict(
        engine=engine,
        model=model,
        names=names,
        tokenizer=tokenizer,
        parameters=parameters,
        step=step,
        consumed=consumed,
        train_samples=train_samples,
        train_set=train_set,
        valid_set=valid_set,
        global_batch=global_batch,
    )


def save_checkpoint(cfg: RunConfig, ctx: ParallelContext, run: dict[str, Any], step: int) -> str:
    consumed = run["consumed"] + (step - run["step"]) * run["global_batch"]
    run_state = {
        "step": step,
        "consumed_samples": consumed,
        "tokens_seen": consumed * cfg.model.seq_length,
        "train_samples": run["train_samples"],
        "tokenizer_sha256": run["tokenizer"].sha256,
        **ckpt_run.engine_state(run["engine"]),
    }
    c = cfg.checkpoint
    path = ckpt_run.save(
        run["engine"],
        run["model"],
        ctx,
        root=c.dir,
        step=step,
        run_state=run_state,
        config=cfg.to_dict(),
        keep_last=c.keep_last,
        keep_every=c.keep_every,
        names=run["names"],
    )
    return str(path)


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
    run = build(cfg, ctx)
    engine, valid_set, t = run["engine"], run["valid_set"], cfg.train
    batches = micro_batches(
        run["train_set"],
        consumed_samples=run["consumed"],
        micro_batch_size=t.micro_batch_size,
        dp_rank=ctx.dp_rank,
        dp_size=ctx.dp,
    )
    log = MetricsLog(
        cfg.logging.dir,
        enabled=ctx.is_logging_rank,
        resume_step=run["step"],
        tensorboard=cfg.logging.tensorboard,
    )
    tokens_per_step = run["global_batch"] * cfg.model.seq_length
    monitor = StepMonitor(cfg, ctx.world_size, run["model"].vocab_size, run["global_batch"])
    summary: dict[str, Any] = {
        "parameters": run["parameters"],
        "world_size": ctx.world_size,
        "global_batch_size": run["global_batch"],
        "first_step": run["step"] + 1,
        "losses": [],
    }
    if ctx.is_logging_rank:
        print(
            f"model: {summary['parameters']:,} parameters, {cfg.model.style} style; "
            f"world {ctx.world_size} = tp {ctx.tp} x pp {ctx.pp} x dp {ctx.dp}; "
            f"global batch {run['global_batch']} x {cfg.model.seq_length} tokens",
            flush=True,
        )
    stop = StopRequest(t.exit_after_minutes, t.exit_interval)
    start, step = time.perf_counter(), run["step"]
    try:
        for step in range(run["step"] + 1, t.steps + 1):
            lr = engine.get_lr()[0]  # the rate this step uses; after step() it is the next one's
            local_loss, grad_norm = train_step(engine, batches, t.grad_accum_steps, ctx.tp_group)
            loss = mean_over_dp(local_loss, ctx)
            log.count_tokens(tokens_per_step)
            summary["losses"].append(loss)
            consumed = run["consumed"] + (step - run["step"]) * run["global_batch"]
            record: dict[str, Any] = {"step": step, "loss": loss, "consumed_samples": consumed}
            health, too_many_bad = monitor.check(loss, grad_norm, engine.skipped_steps)
            record.update(health)
            if step % cfg.logging.interval == 0 or step in (run["step"] + 1, t.steps) or health:
                tokens_per_s = log.throughput()
                record.update(lr=lr, tokens_per_s=tokens_per_s, grad_norm=grad_norm)
                record.update(monitor.throughput(tokens_per_s))
            if "loss_spike_z" in record and ctx.is_logging_rank:
                print(
                    monitor.spike_message(step, loss, record["loss_spike_z"], consumed), flush=True
                )
            last = step == t.steps
            if too_many_bad:
                summary["failed"] = bad_steps_message(cfg, step, consumed)
                log.write(record)
                if cfg.train.precision == "fp16":  # skipped steps left the weights intact
                    summary["checkpoint"] = save_checkpoint(cfg, ctx, run, step)
                break
            stopping = None if last else stop.reason(step)
            if valid_set is not None and not stopping and eval_due(cfg, step, last):
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
            if stopping or save_due(cfg, step, last):
                summary["checkpoint"] = save_checkpoint(cfg, ctx, run, step)
            if stopping:
                summary["stopped"] = stopping
                if ctx.is_logging_rank:
                    print(f"[preemption] stopped after step {step}: {stopping}", flush=True)
                break
    finally:
        stop.restore_handlers()
        log.close()
    elapsed = time.perf_counter() - start
    ran = step - run["step"]
    summary.update(
        steps=step,
        seconds=elapsed,
        tokens=ran * tokens_per_step,
        tokens_per_s=ran * tokens_per_step / max(elapsed, 1e-9),
    )
    if "val_loss" in summary:
        summary["val_perplexity"] = perplexity(summary["val_loss"])
    return summary
