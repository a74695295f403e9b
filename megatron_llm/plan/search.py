"""The layouts a config allows, each one's memory and step time, ranked.

Candidates: tp divides the query and key/value heads and the MLP width, tp <= GPUs per node;
pp divides the layers; dp = world / (tp * pp) and divides the global batch; ZeRO 0-3 without
pipelines, ZeRO 1 only with them (megatron_llm/config.py); micro-batch a power of two dividing
the global batch / dp; activation checkpointing off or around every block.
Memory per device is the larger of the first stage (most activations in flight) and the last
(the head, the logits). Ranking: layouts that fit first, then by predicted tokens/s, then by
lower memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron_llm.model.config import ModelConfig
from megatron_llm.plan.memory import (
    Attention,
    Layout,
    StageMemory,
    activation_bytes,
    model_state_bytes,
    pipeline_buffer_bytes,
    reduce_bucket_bytes,
    zero3_gathered_bytes,
)
from megatron_llm.plan.params import stage_parameters
from megatron_llm.plan.steptime import Device, StepTime, step_time


@dataclasses.dataclass
class Estimate:
    layout: Layout
    memory: StageMemory  # the stage with the most bytes
    time: StepTime | None = None
    fits: bool = False

    @property
    def params(self) -> float:
        return self.memory.params

    @property
    def grads(self) -> float:
        return self.memory.grads

    @property
    def optimizer(self) -> float:
        return self.memory.optimizer

    @property
    def activations(self) -> float:
        return self.memory.activations

    @property
    def total(self) -> float:
        return self.memory.total


def stage_memory(
    cfg: ModelConfig,
    rows: int,
    lay: Layout,
    precision: str,
    sp: bool,
    stage: int,
    attention: Attention = "flash",
) -> StageMemory:
    """Bytes per device on pipeline stage ``stage``; rows: the padded vocabulary."""
    n = stage_parameters(cfg, rows, lay.tp, lay.pp, stage)
    params, grads, optimizer = model_state_bytes(n, lay.zero, lay.dp, precision)
    return StageMemory(
        stage,
        params,
        grads,
        optimizer,
        activation_bytes(cfg, rows, lay, precision, sp, stage, attention),
        pipeline_buffer_bytes(cfg, lay, precision, stage),
        zero3_gathered_bytes(cfg, rows, lay, precision),
        reduce_bucket_bytes(lay, precision),
    )


def estimate(
    cfg: ModelConfig,
    vocab: int,
    lay: Layout,
    precision: str,
    sequence_parallel: bool = False,
    device: Device | None = None,
    gpus_per_node: int = 8,
    attention: Attention = "flash",
) -> Estimate:
    """vocab: the tokenizer's size (padded here for the layout's tp). Step time needs device."""
    rows = cfg.padded_vocab_size(vocab, lay.tp)
    sp = sequence_parallel and lay.tp > 1
    stages = {0, lay.pp - 1}
    worst = max(
        (stage_memory(cfg, rows, lay, precision, sp, s, attention) for s in stages),
        key=lambda m: m.total,
    )
    time = None
    if device is not None:
        time = step_time(cfg, rows, lay, precision, device, gpus_per_node)
    return Estimate(lay, worst, time)


def layouts(cfg: ModelConfig, world: int, gpus_per_node: int, global_batch: int) -> list[Layout]:
    out = []
    for tp in range(1, min(gpus_per_node, world) + 1):
        if cfg.num_heads % tp or cfg.num_kv_heads % tp or cfg.ffn_hidden_size % tp:
            continue
        for pp in range(1, cfg.num_layers + 1):
            if cfg.num_layers % pp or world % (tp * pp):
                continue
            dp = world // (tp * pp)
            if global_batch % dp:
                continue
            per_rank = global_batch // dp
            for zero in (1,) if pp > 1 else (0, 1, 2, 3):
                micro = 1
                while micro <= per_rank:
                    if per_rank % micro == 0:
                        for ckpt in (False, True):
                            out.append(Layout(tp, pp, dp, zero, micro, per_rank // micro, ckpt))
                    micro *= 2
    return out


def rank_key(e: Estimate) -> tuple:
    speed = e.time.tokens_s if e.time is not None else 0.0
    return (not e.fits, -speed, e.total)


def plan(
    cfg: Any,
    vocab: int,
    world: int,
    gpus_per_node: int,
    global_batch: int,
    budget: float,
    device: Device,
    attention: Attention = "flash",
) -> list[Estimate]:
    """Every feasible layout's estimate, best first; budget: bytes a device may use."""
    found = []
    for lay in layouts(cfg.model, world, gpus_per_node, global_batch):
        est = estimate(
            cfg.model,
            vocab,
            lay,
            cfg.train.precision,
            cfg.parallel.sequence_parallel,
            device,
            gpus_per_node,
            attention,
        )
        est.fits = est.total <= budget
        found.append(est)
    found.sort(key=rank_key)
    return found


def parse_layout(text: str, world: int | None = None) -> Layout:
    """'tp=8,pp=64,dp=6,zero=0,micro=1,ckpt=full[,accum=N]' -> Layout; accum defaults from
    the global batch by the caller (0 here)."""
    fields: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in ("tp", "pp", "dp", "zero", "micro", "accum", "ckpt"):
            raise ValueError(
                f"--layout item {item!r}: expected key=value with key one of tp, pp, dp, zero, "
                "micro, accum, ckpt (e.g. tp=8,pp=64,dp=6,zero=0,micro=1,ckpt=full)"
            )
        fields[key] = value
    ckpt = fields.pop("ckpt", "none")
    if ckpt not in ("none", "full"):
        raise ValueError(f"--layout ckpt={ckpt!r}: expected none or full (every block)")
    try:
        ints = {k: int(v) for k, v in fields.items()}
    except ValueError:
        raise ValueError(
            f"--layout {text!r}: tp, pp, dp, zero, micro, accum take integers"
        ) from None
    lay = Layout(
        ints.get("tp", 1),
        ints.get("pp", 1),
        ints.get("dp", 1),
        ints.get("zero", 0),
        ints.get("micro", 1),
        ints.get("accum", 0),
        ckpt == "full",
    )
    if min(lay.tp, lay.pp, lay.dp, lay.micro) < 1 or lay.zero not in (0, 1, 2, 3):
        raise ValueError(f"--layout {text!r}: tp, pp, dp, micro must be >= 1 and zero 0-3")
    return lay
