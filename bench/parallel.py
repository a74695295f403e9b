"""Step time of tensor and data parallelism against one process, same global batch (CPU).

    python bench/parallel.py                  # tp=1, tp=2, tp=2+sp, dp=2 (ZeRO 0 and 1)
    python bench/parallel.py --hidden 512 --steps 20

Every layout trains the same GPT for --warmup + --steps optimizer steps on gloo ranks started
here; the figure is the median step time on rank 0 (the best of --rounds interleaved rounds,
which damps other jobs on a shared machine), and the ratio is against tp=1 measured in the
same run. Each rank gets cores / ranks threads, so a layout never uses more cores than
tp=1 does: on a CPU the ratio shows what our collectives and the split matmuls cost, not a
speedup from extra hardware. Prints figures; never a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.distributed import run_on_ranks  # noqa: E402  (spawns gloo ranks)

LAYOUTS = {  # name: (ranks, overrides)
    "tp=1": (1, ["parallel.tp=1"]),
    "tp=2": (2, ["parallel.tp=2"]),
    "tp=2 sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "dp=2 zero0": (2, ["parallel.dp=2", "parallel.zero_stage=0"]),
    "dp=2 zero1": (2, ["parallel.dp=2", "parallel.zero_stage=1"]),
}


def step_times(overrides: list[str], args: argparse.Namespace, threads: int) -> list[float]:
    import torch

    from megatron_llm.config import load_config
    from megatron_llm.parallel.build import build_model
    from megatron_llm.parallel.engine import build_engine
    from megatron_llm.parallel.groups import build_context
    from megatron_llm.training.loop import train_step
    from megatron_llm.training.run import seed_everything

    torch.set_num_threads(threads)
    cfg = load_config(
        None,
        [
            f"model.style={args.style}",
            f"model.num_layers={args.layers}",
            f"model.hidden_size={args.hidden}",
            f"model.num_heads={args.heads}",
            f"model.seq_length={args.seq}",
            f"train.steps={args.warmup + args.steps}",
            *overrides,
        ],
    )
    ctx = build_context(cfg.parallel)
    cfg.train.micro_batch_size = args.global_batch // ctx.dp
    seed_everything(cfg.train.seed)
    engine = build_engine(build_model(cfg, ctx, args.vocab).module, cfg, ctx)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (args.global_batch, args.seq + 1), generator=gen)
    mine = data.view(ctx.dp, -1, args.seq + 1)[ctx.dp_rank]
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        train_step(engine, iter([mine]), 1, ctx.tp_group)
        times.append(time.perf_counter() - start)
    return times[args.warmup :]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--style", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="rounds over all layouts; best kept")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset")
    args = p.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the ranks' import warnings hide the table
    cores = len(os.sched_getaffinity(0))
    print(
        f"GPT {args.style}: {args.layers} layers, hidden {args.hidden}, seq {args.seq}, "
        f"vocab {args.vocab}, global batch {args.global_batch}; {cores} cores, "
        f"median of {args.steps} steps after {args.warmup} warmup",
        flush=True,
    )
    names = args.layouts.split(",")
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name in names:
            ranks, overrides = LAYOUTS[name]
            threads = max(cores // ranks, 1)
            times = run_on_ranks(ranks, step_times, overrides, args, threads, timeout=1800)[0]
            best[name] = min(best.get(name, float("inf")), statistics.median(times))
    baseline = best[names[0]]
    for name in names:
        ranks = LAYOUTS[name][0]
        print(
            f"{name:<12} ranks {ranks}  threads/rank {max(cores // ranks, 1)}  "
            f"step {best[name] * 1e3:8.1f} ms  x{best[name] / baseline:.2f} of {names[0]}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
