"""The layouts a config allows, each one's memory and step time, ranked.

Candidates: tp divides the query and key/value heads and the MLP width, tp <= GPUs per node;
cp splits the sequence into 2 x cp equal chunks (the load-balanced causal split); pp divides
the layers; dp = world / (tp * cp * pp) and divides the global batch; ep (MoE models only)
divides dp and the number of experts; ZeRO 0-3 without
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
    dispatch_bytes,
    pipeline_buffer_bytes,
    reduce_bucket_bytes,
    ring_buffer_bytes,
    stage_state_bytes,
    zero3_gathered_bytes,
)
from megatron_llm.plan.params import expert_parameters, stage_parameters
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
    n = stage_parameters(cfg, rows, lay.tp, lay.pp, stage, lay.ep)
    experts = expert_parameters(cfg, lay.pp, stage, lay.ep)
    params, grads, optimizer = stage_state_bytes(n, experts, lay, precision)
    return StageMemory(
        stage,
        params,
        grads,
        optimizer,
        activation_bytes(cfg, rows, lay, precision, sp, stage, attention),
        pipeline_buffer_bytes(cfg, lay, precision, stage),
        zero3_gathered_bytes(cfg, rows, lay, precision),
        reduce_bucket_bytes(lay, precision),
        dispatch_bytes(cfg, lay, precision, sp, stage),
        ring_buffer_bytes(cfg, lay, precision),
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
    all_to_all_gbs: float | None = None,
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
        time = step_time(
            cfg, rows, lay, precision, device, gpus_per_node, all_to_all_gbs=all_to_all_gbs
        )
    return Estimate(lay, worst, time)


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def context_sizes(cfg: ModelConfig, world: int) -> list[int]:
    """cp values whose load-balanced split (2 x cp chunks) divides the sequence."""
    return [cp for cp in divisors(world) if cfg.seq_length % (2 * cp) == 0 or cp == 1]


def expert_sizes(cfg: ModelConfig, dp: int) -> list[int]:
    """ep values: divisors of dp that divide the experts (1 for a dense model)."""
    return (
        [ep for ep in divisors(dp) if cfg.moe.num_experts % ep == 0] if cfg.moe.num_experts else [1]
    )


def layouts(
    cfg: ModelConfig, world: int, gpus_per_node: int, global_batch: int, micro_batches: bool = True
) -> list[Layout]:
    """Every candidate layout (module docstring); micro_batches False: micro-batch 1 only."""
    out = []
    for tp in range(1, min(gpus_per_node, world) + 1):
        if world % tp or cfg.num_heads % tp or cfg.num_kv_heads % tp or cfg.ffn_hidden_size % tp:
            continue
        for cp in context_sizes(cfg, world // tp):
            for pp in range(1, cfg.num_layers + 1):
                if cfg.num_layers % pp or world % (tp * cp * pp):
                    continue
                dp = world // (tp * cp * pp)
                if global_batch % dp:
                    continue
                for ep in expert_sizes(cfg, dp):
                    out += _batch_layouts(tp, cp, pp, dp, ep, global_batch // dp, micro_batches)
    return out


def _batch_layouts(
    tp: int, cp: int, pp: int, dp: int, ep: int, per_rank: int, micro_batches: bool
) -> list[Layout]:
    out = []
    for zero in (1,) if pp > 1 else (0, 1, 2, 3):
        micro = 1
        while micro <= (per_rank if micro_batches else 1):
            if per_rank % micro == 0:
                for ckpt in (False, True):
                    accum = per_rank // micro
                    out.append(Layout(tp, pp, dp, zero, micro, accum, ckpt, cp, ep))
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
    all_to_all_gbs: float | None = None,
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
            all_to_all_gbs,
        )
        est.fits = est.total <= budget
        found.append(est)
    found.sort(key=rank_key)
    return found


LONGEST = 1 << 26  # tokens: the longest sequence --max-seq tries


def max_seq_length(
    cfg: ModelConfig, vocab: int, lay: Layout, precision: str, sp: bool, budget: float
) -> int:
    """The longest seq_length at which ``lay`` fits ``budget`` bytes per device (0: none).
    Memory grows with the sequence (activations, a learned-position table), so a bisection
    over the lengths the layout can split finds it: multiples of 2 x cp (the load-balanced
    chunks), times tp under sequence parallelism (parallel/context.py check_context)."""
    step = (2 * lay.cp if lay.cp > 1 else 1) * (lay.tp if sp else 1)

    def fits(chunks: int) -> bool:
        longer = dataclasses.replace(cfg, seq_length=chunks * step)
        return estimate(longer, vocab, lay, precision, sp).total <= budget

    lo, hi = 0, LONGEST // step  # fits(lo) (vacuously at 0); find the largest
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo * step


def longest_sequences(
    cfg: Any, vocab: int, world: int, gpus_per_node: int, global_batch: int, budget: float
) -> list[tuple[Layout, int]]:
    """Every layout at micro-batch 1 with its max_seq_length, longest first (ties: fewer
    model-parallel ranks, then no recompute). The layouts are those of a sequence any cp
    divides, not of the config's own seq_length."""
    model = cfg.model
    any_cp = dataclasses.replace(model, seq_length=LONGEST)
    sp = cfg.parallel.sequence_parallel
    rows = []
    for lay in layouts(any_cp, world, gpus_per_node, global_batch, micro_batches=False):
        seq = max_seq_length(model, vocab, lay, cfg.train.precision, sp and lay.tp > 1, budget)
        rows.append((lay, seq))
    rows.sort(key=lambda r: (-r[1], r[0].tp * r[0].cp * r[0].pp, r[0].checkpointing))
    return rows


LAYOUT_KEYS = ("tp", "cp", "pp", "dp", "ep", "zero", "micro", "accum", "ckpt")


def parse_layout(text: str, world: int | None = None) -> Layout:
    """'tp=8,pp=64,dp=6,zero=0,micro=1,ckpt=full[,cp=2][,ep=4][,accum=N]' -> Layout; accum
    defaults from the global batch by the caller (0 here)."""
    fields: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in LAYOUT_KEYS:
            raise ValueError(
                f"--layout item {item!r}: expected key=value with key one of "
                f"{', '.join(LAYOUT_KEYS)} (e.g. tp=8,pp=64,dp=6,zero=0,micro=1,ckpt=full)"
            )
        fields[key] = value
    ckpt = fields.pop("ckpt", "none")
    if ckpt not in ("none", "full"):
        raise ValueError(f"--layout ckpt={ckpt!r}: expected none or full (every block)")
    try:
        ints = {k: int(v) for k, v in fields.items()}
    except ValueError:
        raise ValueError(
            f"--layout {text!r}: {', '.join(LAYOUT_KEYS[:-1])} take integers"
        ) from None
    lay = Layout(
        ints.get("tp", 1),
        ints.get("pp", 1),
        ints.get("dp", 1),
        ints.get("zero", 0),
        ints.get("micro", 1),
        ints.get("accum", 0),
        ckpt == "full",
        ints.get("cp", 1),
        ints.get("ep", 1),
    )
    if min(lay.tp, lay.cp, lay.pp, lay.dp, lay.ep, lay.micro) < 1 or lay.zero not in (0, 1, 2, 3):
        raise ValueError(f"--layout {text!r}: tp, cp, pp, dp, ep, micro must be >= 1, zero 0-3")
    if lay.dp % lay.ep:
        raise ValueError(
            f"--layout ep={lay.ep} does not divide dp={lay.dp}: expert parallelism splits the "
            "experts over ranks of the data-parallel group"
        )
    return lay


def check_layout(cfg: ModelConfig, lay: Layout) -> None:
    """What the model needs of a layout given by hand (the search only makes valid ones)."""
    cfg.check_divisible_by_tp(lay.tp)
    if cfg.num_layers % lay.pp:
        raise ValueError(f"--layout pp={lay.pp} does not divide model.num_layers")
    if lay.cp > 1 and cfg.seq_length % (2 * lay.cp):
        raise ValueError(
            f"--layout cp={lay.cp}: model.seq_length={cfg.seq_length} does not split into "
            f"2 x cp = {2 * lay.cp} equal chunks (the load-balanced causal split)"
        )
    if lay.ep > 1 and cfg.moe.num_experts % lay.ep:
        raise ValueError(
            f"--layout ep={lay.ep} does not divide model.moe.num_experts="
            f"{cfg.moe.num_experts}; each ep rank holds an equal share of the experts"
        )
