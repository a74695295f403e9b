"""Which (tp, pp, dp, ZeRO stage, micro-batch, activation checkpointing) fits a model on a cluster.

    python -m megatron_llm.plan configs/llama_1b.yaml --device h100 --nodes 2 --gpus-per-node 8
    python -m megatron_llm.plan configs/gpt_125m.yaml --memory-gb 40 --nodes 1 \\
        --gpus-per-node 4 --global-batch 256 train.precision=bf16

Candidates: tp divides the query and key/value heads and the MLP width, tp <= GPUs per node;
pp divides the layers; dp = world / (tp * pp) and divides the global batch (default: the
config's train.global_batch_size, else micro_batch_size x grad_accum_steps x parallel.dp);
ZeRO 0-3 without pipelines, ZeRO 1 only with them (megatron_llm/config.py); micro-batch a
power of two dividing the global batch / dp; activation checkpointing off or every block.

Memory per device, with N the parameters a device holds before ZeRO (its tensor-parallel shard
of the largest pipeline stage, blocks split uniformly; the padded vocabulary; replicated norms
and row-parallel biases counted whole), b = 4 bytes (fp32) or 2 (bf16/fp16), d = dp:
  parameters  b*N; ZeRO 3: b*N/d
  gradients   b*N for ZeRO 0 and 1 (stage 1 holds whole gradients until they are reduced at the
              end of a step's backward, and through gradient accumulation); ZeRO 2/3: b*N/d
  optimizer   AdamW's two moments in fp32, plus an fp32 master copy where DeepSpeed keeps one:
              ZeRO 0: 8*N (fp32, the parameters are the master) or 12*N (16-bit);
              ZeRO 1-3: 12*N/d (DeepSpeed's ZeRO optimizers always keep an fp32 partition)
  activations Korthikanti et al. 2022 ("Reducing activation recomputation"), per layer and
              micro-batch of s tokens x m samples x hidden h, with b-byte activations,
              scaled from their 2-byte count: s*m*h*(b/2)*(10 + 24/tp) (34/tp with sequence
              parallelism), attention scores not stored (flash/fused attention); with
              checkpointing every block, b*s*m*h per layer plus one layer's full set; times
              layers per stage and the micro-batches in flight on the first stage (min(pp,
              accumulation steps) under 1F1B); plus the logits, 2 * 4*s*m*V/tp (fp32 cross
              entropy and its gradient).
A layout fits when the total is <= (1 - headroom) x memory (headroom 10% by default: CUDA
context, allocator fragmentation, communication buckets).

Ranking: layouts that fit first, then by a throughput proxy (higher is better, not a time):
  proxy = util(m*s) / ((1 + bubble) * (1 + recompute) * (1 + comm))
  util(t) = t / (t + 1024)                micro-batch tokens keep the matmuls busy
  bubble = (pp - 1) / accumulation steps  1F1B pipeline bubble
  recompute = 1/3 with checkpointing      one more forward per forward + backward (3 passes)
  comm = 0.05 * (tp - 1) + 0.1 [ZeRO 3]   tensor-parallel all-reduces, ZeRO 3 all-gathers
then by lower memory. The parameter, gradient and optimizer figures are checked against bytes
held by real DeepSpeed engines on CPU ranks (tests/test_plan.py, fp32); activations and the
proxy are estimates.
Exit status: 0 ok (even if nothing fits: the table says so), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any

from megatron_llm.config import ConfigError, load_config
from megatron_llm.model.config import ModelConfig

DEVICE_MEMORY_GB = {"a100": 80.0, "a100-40gb": 40.0, "h100": 80.0, "h200": 141.0, "cpu": 0.0}
GB = 1e9


@dataclasses.dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int
    micro: int
    accum: int
    checkpointing: bool


@dataclasses.dataclass
class Estimate:
    layout: Layout
    params: float  # bytes per device
    grads: float
    optimizer: float
    activations: float
    proxy: float = 0.0
    fits: bool = False

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def block_parameters(cfg: ModelConfig, tp: int) -> int:
    """One block's parameters on one tensor-parallel rank."""
    h, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    split = h * (q + 2 * kv) + q * h + h * f * (3 if cfg.activation == "swiglu" else 2)
    if cfg.bias:  # column-parallel biases split; the row-parallel outputs' are replicated
        split += q + 2 * kv + f * (2 if cfg.activation == "swiglu" else 1)
    replicated = (2 * h if cfg.bias else 0) + 2 * norm_parameters(cfg)
    return split // tp + replicated


def norm_parameters(cfg: ModelConfig) -> int:
    return cfg.hidden_size * (2 if cfg.norm == "layernorm" else 1)


def stage_parameters(cfg: ModelConfig, vocab: int, tp: int, pp: int) -> int:
    """Parameters per tensor-parallel rank of the largest pipeline stage (uniform split)."""
    embed = vocab * cfg.hidden_size // tp
    first = embed + (cfg.seq_length * cfg.hidden_size if cfg.position == "learned" else 0)
    # With pipelines and tied embeddings the last stage holds its own copy of the embedding.
    last = norm_parameters(cfg) + (embed if pp > 1 or not cfg.tie_embeddings else 0)
    per_stage = cfg.num_layers // pp * block_parameters(cfg, tp)
    if pp == 1:
        return first + per_stage + last
    return max(first, last) + per_stage


def model_state_bytes(n: int, zero: int, dp: int, precision: str) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer) bytes per device for n parameters (see the docstring)."""
    b = 4 if precision == "fp32" else 2
    params = b * n / (dp if zero == 3 else 1)
    grads = b * n / (dp if zero >= 2 else 1)
    if zero == 0:
        optimizer = (8 if precision == "fp32" else 12) * n
    else:
        optimizer = 12 * n / dp
    return params, grads, optimizer


def activation_bytes(
    cfg: ModelConfig, vocab: int, lay: Layout, precision: str, sequence_parallel: bool
) -> float:
    s, m, h, b = cfg.seq_length, lay.micro, cfg.hidden_size, 4 if precision == "fp32" else 2
    per_layer = s * m * h * b / 2 * (34 / lay.tp if sequence_parallel else 10 + 24 / lay.tp)
    layers = cfg.num_layers // lay.pp
    if lay.checkpointing:
        stored = layers * b * s * m * h + per_layer
    else:
        stored = layers * per_layer
    in_flight = min(lay.pp, lay.accum)
    logits = 2 * 4 * s * m * vocab / lay.tp
    return stored * in_flight + logits


def proxy(cfg: ModelConfig, lay: Layout) -> float:
    tokens = lay.micro * cfg.seq_length
    util = tokens / (tokens + 1024)
    bubble = (lay.pp - 1) / lay.accum
    recompute = 1 / 3 if lay.checkpointing else 0.0
    comm = 0.05 * (lay.tp - 1) + (0.1 if lay.zero == 3 else 0.0)
    return util / ((1 + bubble) * (1 + recompute) * (1 + comm))


def padded_vocab(cfg: ModelConfig, vocab: int, tp: int) -> int:
    multiple = math.lcm(cfg.pad_vocab_multiple, tp)
    return -(-vocab // multiple) * multiple


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


def estimate(
    cfg: ModelConfig, vocab: int, lay: Layout, precision: str, sequence_parallel: bool = False
) -> Estimate:
    """vocab: the tokenizer's size (padded here for the layout's tp)."""
    rows = padded_vocab(cfg, vocab, lay.tp)
    n = stage_parameters(cfg, rows, lay.tp, lay.pp)
    params, grads, optimizer = model_state_bytes(n, lay.zero, lay.dp, precision)
    sp = sequence_parallel and lay.tp > 1
    acts = activation_bytes(cfg, rows, lay, precision, sp)
    return Estimate(lay, params, grads, optimizer, acts, proxy(cfg, lay))


def plan(
    cfg: Any, vocab: int, world: int, gpus_per_node: int, global_batch: int, budget: float
) -> list[Estimate]:
    """Every feasible layout's estimate, best first."""
    found = []
    for lay in layouts(cfg.model, world, gpus_per_node, global_batch):
        est = estimate(cfg.model, vocab, lay, cfg.train.precision, cfg.parallel.sequence_parallel)
        est.fits = est.total <= budget
        found.append(est)
    found.sort(key=lambda e: (not e.fits, -e.proxy, e.total))
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_llm.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="run config YAML (its model and train.precision)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    parser.add_argument("--device", default="h100", choices=sorted(DEVICE_MEMORY_GB))
    parser.add_argument("--memory-gb", type=float, help="memory per device (default: --device's)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--global-batch", type=int, help="samples per step (default: config's)")
    parser.add_argument("--vocab-size", type=int, help="default: model.vocab_size or tokenizer")
    parser.add_argument("--headroom", type=float, default=0.1, help="memory kept free (0.1)")
    parser.add_argument("--top", type=int, default=20, help="rows to print (default 20)")
    parser.add_argument("--json", action="store_true", help="every layout, machine-readable")
    return parser.parse_args(argv)


def vocab_of(cfg: Any, given: int | None) -> int:
    if given or cfg.model.vocab_size:
        return given or cfg.model.vocab_size
    from megatron_llm.data.tokenizer import Tokenizer

    try:
        return Tokenizer(cfg.data.tokenizer).vocab_size
    except (ValueError, OSError) as e:
        raise ValueError(
            f"vocabulary size unknown: model.vocab_size is null and the tokenizer "
            f"{cfg.data.tokenizer!r} cannot be read ({e}); pass --vocab-size"
        ) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        vocab = vocab_of(cfg, args.vocab_size)
        memory = args.memory_gb if args.memory_gb is not None else DEVICE_MEMORY_GB[args.device]
        if memory <= 0 or args.nodes < 1 or args.gpus_per_node < 1:
            raise ValueError("--memory-gb, --nodes and --gpus-per-node must be > 0")
        t = cfg.train
        global_batch = args.global_batch or t.global_batch_size
        global_batch = global_batch or t.micro_batch_size * t.grad_accum_steps * (
            cfg.parallel.dp or 1
        )
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = args.nodes * args.gpus_per_node
    budget = (1 - args.headroom) * memory * GB
    found = plan(cfg, vocab, world, args.gpus_per_node, global_batch, budget)
    if args.json:
        rows = [
            {**dataclasses.asdict(e.layout), "params": e.params, "grads": e.grads,
             "optimizer": e.optimizer, "activations": e.activations, "total": e.total,
             "fits": e.fits, "proxy": e.proxy}
            for e in found
        ]  # fmt: skip
        print(json.dumps(rows, indent=1))
        return 0
    print(
        f"{world} devices ({args.nodes} x {args.gpus_per_node}), {memory:g} GB each "
        f"({args.headroom:.0%} kept free), global batch {global_batch}, {t.precision}; "
        "GB per device"
    )
    print(
        f"{'tp':>3}{'pp':>3}{'dp':>5}{'zero':>5}{'micro':>6}{'accum':>6}{'ckpt':>5}"
        f"{'params':>9}{'grads':>8}{'optim':>8}{'activ':>8}{'total':>8}  {'proxy':>5}  fits"
    )
    for e in found[: args.top]:
        lay = e.layout
        print(
            f"{lay.tp:>3}{lay.pp:>3}{lay.dp:>5}{lay.zero:>5}{lay.micro:>6}{lay.accum:>6}"
            f"{'yes' if lay.checkpointing else 'no':>5}{e.params / GB:>9.2f}{e.grads / GB:>8.2f}"
            f"{e.optimizer / GB:>8.2f}{e.activations / GB:>8.2f}{e.total / GB:>8.2f}  "
            f"{e.proxy:>5.3f}  {'yes' if e.fits else 'NO'}"
        )
    fitting = sum(e.fits for e in found)
    print(f"{len(found)} layouts, {fitting} fit; showing {min(args.top, len(found))}")
    if not found:
        print("no layout: check that tp, pp and dp can divide the heads, layers and batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
