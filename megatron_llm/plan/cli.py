"""python -m megatron_llm.plan: the command line (see megatron_llm/plan/__init__.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from megatron_llm.config import ConfigError, load_config
from megatron_llm.plan import search
from megatron_llm.plan.memory import Layout
from megatron_llm.plan.published import NARAYANAN_TABLE_1, NARAYANAN_TABLE_2, VOCAB
from megatron_llm.plan.steptime import DEVICES, EFFICIENCY, Device, step_time

GB = 1e9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from megatron_llm import plan

    parser = argparse.ArgumentParser(
        prog="python -m megatron_llm.plan",
        description=plan.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="run config YAML (model, train.precision)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides")
    parser.add_argument("--device", default="h100", choices=sorted(DEVICES))
    parser.add_argument("--memory-gb", type=float, help="memory per device (default: --device's)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak (default: --device's)")
    parser.add_argument("--intra-node-gbs", type=float, help="NVLink GB/s per GPU and direction")
    parser.add_argument("--inter-node-gbs", type=float, help="InfiniBand GB/s per GPU")
    parser.add_argument("--efficiency", type=float, default=EFFICIENCY, help="matmul share of peak")
    parser.add_argument(
        "--all-to-all-gbs", type=float, help="expert all-to-all GB/s per GPU (default: the link's)"
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--global-batch", type=int, help="samples per step (default: config's)")
    parser.add_argument("--vocab-size", type=int, help="default: model.vocab_size or tokenizer")
    parser.add_argument("--headroom", type=float, default=0.1, help="memory kept free (0.1)")
    parser.add_argument(
        "--layout", help="evaluate one layout: tp=8,pp=64,dp=6,zero=0,micro=1,ckpt=full[,cp=,ep=]"
    )
    parser.add_argument(
        "--max-seq",
        action="store_true",
        help="the longest model.seq_length each layout (micro-batch 1) fits, longest first",
    )
    parser.add_argument("--published", action="store_true", help="predicted vs published TFLOP/s")
    parser.add_argument("--top", type=int, default=20, help="rows to print (default 20)")
    parser.add_argument("--json", action="store_true", help="every layout, machine-readable")
    return parser.parse_intermixed_args(argv)  # overrides may follow the options  # fmt: skip


def device_of(args: argparse.Namespace) -> Device:
    d = DEVICES[args.device]
    return Device(
        args.memory_gb if args.memory_gb is not None else d.memory_gb,
        args.peak_tflops or d.peak_tflops,
        args.intra_node_gbs or d.intra_gbs,
        args.inter_node_gbs or d.inter_gbs,
    )


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


def row(e: search.Estimate) -> dict[str, Any]:
    out = {**dataclasses.asdict(e.layout), **dataclasses.asdict(e.memory), "total": e.total}
    out["fits"] = e.fits
    if e.time is not None:
        out.update(dataclasses.asdict(e.time))
    return out


LAYOUT_HEADER = f"{'tp':>3}{'cp':>3}{'pp':>4}{'dp':>5}{'ep':>4}{'zero':>5}"
HEADER = (
    f"{LAYOUT_HEADER}{'micro':>6}{'accum':>6}{'ckpt':>5}{'params':>8}"
    f"{'grads':>7}{'optim':>7}{'activ':>7}{'buffer':>7}{'gather':>7}{'bucket':>7}{'a2a':>6}"
    f"{'ring':>6}{'total':>7}{'step s':>9}{'tokens/s':>11}{'TFLOP/s':>8}{'MFU':>6}  fits"
)


def layout_cells(lay: Layout) -> str:
    return f"{lay.tp:>3}{lay.cp:>3}{lay.pp:>4}{lay.dp:>5}{lay.ep:>4}{lay.zero:>5}"


def line(e: search.Estimate) -> str:
    lay, m, t = e.layout, e.memory, e.time
    text = (
        f"{layout_cells(lay)}{lay.micro:>6}{lay.accum:>6}"
        f"{'full' if lay.checkpointing else 'none':>5}{m.params / GB:>8.2f}{m.grads / GB:>7.2f}"
        f"{m.optimizer / GB:>7.2f}{m.activations / GB:>7.2f}{m.buffers / GB:>7.2f}"
        f"{m.gathered / GB:>7.2f}{m.bucket / GB:>7.2f}{m.dispatch / GB:>6.2f}{m.ring / GB:>6.2f}"
        f"{m.total / GB:>7.2f}"
    )
    if t is not None:
        text += f"{t.step_s:>9.3f}{t.tokens_s:>11.4g}{t.tflops:>8.1f}{t.mfu:>6.1%}"
    return text + f"  {'yes' if e.fits else 'NO'}"


def published_table(device: Device, efficiency: float) -> list[dict[str, Any]]:
    """Narayanan et al. 2021's layouts: their TFLOP/s per GPU and ours predicted (A100)."""
    rows = []
    for p in NARAYANAN_TABLE_1 + NARAYANAN_TABLE_2:
        micro = p.micro or 1
        lay = Layout(p.tp, p.pp, p.dp, p.zero, micro, p.batch // p.dp // micro, True)
        t = step_time(p.model(), VOCAB, lay, "fp16", device, 8, efficiency)
        rows.append({"model": p.name, "gpus": p.gpus, "tp": p.tp, "pp": p.pp, "dp": p.dp,
                     "micro": micro, "published": p.tflops, "predicted": round(t.tflops, 1),
                     "ratio": round(t.tflops / p.tflops, 2)})  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def one_layout(args: argparse.Namespace, cfg: Any, vocab: int, device: Device, batch: int) -> int:
    lay = search.parse_layout(args.layout)
    if not lay.accum:
        if batch % (lay.dp * lay.micro):
            raise ValueError(
                f"--layout: global batch {batch} does not split into dp={lay.dp} x micro="
                f"{lay.micro}; pass accum= or --global-batch"
            )
        lay.accum = batch // (lay.dp * lay.micro)
    search.check_layout(cfg.model, lay)
    e = search.estimate(
        cfg.model, vocab, lay, cfg.train.precision, cfg.parallel.sequence_parallel,
        device, args.gpus_per_node, all_to_all_gbs=args.all_to_all_gbs,
    )  # fmt: skip
    e.fits = e.total <= (1 - args.headroom) * device.memory_gb * GB
    # Evaluated as given (e.g. a published Megatron-LM layout), but this project would refuse it.
    runnable = lay.pp == 1 or lay.zero == 1
    if args.json:
        print(json.dumps({**row(e), "runnable": runnable}, indent=1))
        return 0
    print(f"{lay.world} devices, stage {e.memory.stage} holds the most; GB")
    print(HEADER)
    print(line(e))
    if not runnable:
        print(
            f"note: zero={lay.zero} with pp={lay.pp} is evaluated, but this project runs "
            "pipelines with ZeRO 1 only (megatron_llm/config.py): use zero=1 to run it"
        )
    return 0


def longest_sequences(
    args: argparse.Namespace, cfg: Any, vocab: int, world: int, batch: int, budget: float
) -> int:
    """--max-seq: each layout's longest sequence that fits (search.max_seq_length)."""
    rows = search.longest_sequences(cfg, vocab, world, args.gpus_per_node, batch, budget)
    if args.json:
        print(json.dumps([{**dataclasses.asdict(lay), "max_seq": s} for lay, s in rows], indent=1))
        return 0
    print(
        f"{world} devices, {budget / GB:.1f} GB usable each, micro-batch 1, {cfg.train.precision}: "
        "the longest model.seq_length each layout fits"
    )
    print(f"{LAYOUT_HEADER}{'ckpt':>5}{'max seq':>10}")
    for lay, seq in rows[: args.top]:
        print(f"{layout_cells(lay)}{'full' if lay.checkpointing else 'none':>5}{seq:>10}")
    print(f"{len(rows)} layouts; showing {min(args.top, len(rows))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = device_of(args)
        if args.published:
            rows = published_table(device, args.efficiency)
            print(json.dumps(rows, indent=1) if args.json else markdown(rows))
            return 0
        if not args.config:
            raise ValueError("a run config YAML is needed (or --published)")
        cfg = load_config(args.config, args.overrides)
        vocab = vocab_of(cfg, args.vocab_size)
        if device.memory_gb <= 0 or args.nodes < 1 or args.gpus_per_node < 1:
            raise ValueError("--memory-gb, --nodes and --gpus-per-node must be > 0")
        t = cfg.train
        batch = args.global_batch or t.global_batch_size
        batch = batch or t.micro_batch_size * t.grad_accum_steps * (cfg.parallel.dp or 1)
        if args.layout:
            return one_layout(args, cfg, vocab, device, batch)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = args.nodes * args.gpus_per_node
    budget = (1 - args.headroom) * device.memory_gb * GB
    if args.max_seq:
        return longest_sequences(args, cfg, vocab, world, batch, budget)
    found = search.plan(
        cfg, vocab, world, args.gpus_per_node, batch, budget, device,
        all_to_all_gbs=args.all_to_all_gbs,
    )  # fmt: skip
    if args.json:
        print(json.dumps([row(e) for e in found], indent=1))
        return 0
    print(
        f"{world} devices ({args.nodes} x {args.gpus_per_node}), {device.memory_gb:g} GB each "
        f"({args.headroom:.0%} kept free), global batch {batch}, {t.precision}; GB per device"
    )
    print(HEADER)
    for e in found[: args.top]:
        print(line(e))
    fitting = sum(e.fits for e in found)
    print(f"{len(found)} layouts, {fitting} fit; showing {min(args.top, len(found))}")
    if not found:
        print("no layout: check that tp, pp and dp can divide the heads, layers and batch")
    return 0
