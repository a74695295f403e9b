"""One place assembles a training run: tokenizer, checkpoint to resume, model, engine, data.

``build_run`` returns a typed :class:`Run`; training/loop.py only loops over it. The order:

    seed -> tokenizer -> checkpoint (resume, or init_from) -> model (parallel/build.py: meta ->
    shard -> fill from the seed or the checkpoint -> pipeline) -> DeepSpeed engine -> optimizer,
    schedule, counters and random streams restored -> train and validation data (data/sources.py)
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from megatron_llm.checkpoint import runtime as ckpt_run
from megatron_llm.checkpoint.saver import Saver
from megatron_llm.config import RunConfig
from megatron_llm.data.sampler import SizedTokenDataset, micro_batches
from megatron_llm.data.sources import train_and_valid
from megatron_llm.data.tokenizer import Tokenizer
from megatron_llm.model import GPT
from megatron_llm.parallel.build import build_model
from megatron_llm.parallel.engine import build_engine
from megatron_llm.parallel.groups import ParallelContext
from megatron_llm.parallel.random import TensorParallelRNG

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts in its steps and its data."""

    step: int  # the last step done before this run: 0 for a fresh one
    consumed: int  # samples consumed by those steps
    global_batch: int  # samples per step, over every data-parallel rank

    def consumed_after(self, step: int) -> int:
        """Samples consumed once ``step`` is done: the data position, for logs and saves."""
        return self.consumed + (step - self.step) * self.global_batch


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a training loop needs, as assembled by :func:`build_run`."""

    cfg: RunConfig
    ctx: ParallelContext
    engine: DeepSpeedEngine  # trains ``model``, or this rank's pipeline stage of it
    model: GPT  # single-device names, this rank's tensor-parallel shards
    names: dict[str, str] | None  # pipeline parameter names -> the model's (None without pp)
    tokenizer: Tokenizer
    parameters: int  # the whole model's
    train_set: SizedTokenDataset
    valid_set: SizedTokenDataset | None
    start: Start
    train_samples: int  # the train set was built for this many (it fixes the shuffle)
    saver: Saver  # synchronous or background saves (checkpoint.async_save)

    @property
    def step(self) -> int:
        return self.start.step  # the last step done before this run

    @property
    def global_batch(self) -> int:
        return self.start.global_batch

    def consumed(self, step: int) -> int:
        return self.start.consumed_after(step)

    def batches(self) -> Iterator[torch.Tensor]:
        """This rank's micro-batches (micro_batch, seq + 1) from the next sample on (CPU)."""
        return micro_batches(
            self.train_set,
            consumed_samples=self.consumed(self.step),
            micro_batch_size=self.cfg.train.micro_batch_size,
            dp_rank=self.ctx.dp_rank,
            dp_size=self.ctx.dp,
        )

    def save(self, step: int) -> str:
        """A checkpoint after ``step`` (collective: every rank calls it); returns its path.
        With checkpoint.async_save it is published in the background: ``saver.poll`` /
        ``saver.wait`` report how that went."""
        consumed = self.consumed(step)
        run_state = {
            "step": step,
            "consumed_samples": consumed,
            "tokens_seen": consumed * self.cfg.model.seq_length,
            "train_samples": self.train_samples,
            "tokenizer_sha256": self.tokenizer.sha256,
            **ckpt_run.engine_state(self.engine),
        }
        c = self.cfg.checkpoint
        path = self.saver.save(
            self.engine,
            self.model,
            root=c.dir,
            step=step,
            run_state=run_state,
            config=self.cfg.to_dict(),
            keep_last=c.keep_last,
            keep_every=c.keep_every,
            names=self.names,
        )
        return str(path)


def build_run(cfg: RunConfig, ctx: ParallelContext) -> Run:
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
    tensors = ckpt.tensors(optimizer=not weights_only) if ckpt else None
    vocab = cfg.model.padded_vocab_size(tokenizer.vocab_size, ctx.tp)
    if tensors is None:
        built = build_model(cfg, ctx, vocab)
    else:
        weights = dict(tensors.params())  # read one at a time as the model is filled
        built = build_model(cfg, ctx, vocab, weights, str(ckpt.path))
    engine = build_engine(built.module, cfg, ctx)
    run_state: dict[str, Any] = {"step": 0, "consumed_samples": 0}
    reseed = reseeder(cfg, ctx, built.model)
    if ckpt is not None:
        run_state = ckpt_run.restore(
            engine, built.model, ctx, ckpt, tensors, reseed, built.names, weights_only
        )
        if ctx.is_logging_rank:
            how = "weights of" if weights_only else "resumed from"
            print(f"[checkpoint] {how} {ckpt.path} at step {run_state['step']}", flush=True)
    else:
        reseed(0)
    del tensors
    t = cfg.train
    step = run_state["step"]
    start = Start(
        step=step,
        consumed=run_state["consumed_samples"] if step else 0,
        global_batch=t.check_global_batch(ctx.dp),
    )
    # The dataset's shuffle depends on how many samples it is built for: a resumed run keeps the
    # count of the run it continues, so the samples it sees are the ones that run would have.
    train_samples = max(
        start.consumed_after(t.steps), run_state.get("train_samples", 0) if step else 0
    )
    train_set, valid_set = train_and_valid(
        cfg.data,
        tokenizer,
        seq_length=cfg.model.seq_length,
        seed=t.seed,
        train_samples=train_samples,
        valid_samples=cfg.eval.iters * t.micro_batch_size * ctx.dp,
    )
    return Run(
        cfg=cfg,
        ctx=ctx,
        engine=engine,
        model=built.model,
        names=built.names,
        tokenizer=tokenizer,
        parameters=built.parameters,
        train_set=train_set,
        valid_set=valid_set,
        start=start,
        train_samples=train_samples,
        saver=Saver(ctx, asynchronous=cfg.checkpoint.async_save),
    )
