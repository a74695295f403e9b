"""Step time of an MoE model at expert parallelism ep=2 against ep=1, same global batch (CPU),
and the share of the step spent in the dispatcher's all-to-all collectives.

    python bench/moe.py                          # dp=1; dp=2 ep=1; dp=2 ep=2
    python bench/moe.py --experts 8 --top-k 2 --hidden 256 --steps 20

Every layout trains the same Llama-style MoE GPT for --warmup + --steps optimizer steps on gloo
ranks started here (ZeRO 1, as ep needs); the figure is the median step time on rank 0, the
best of --rounds interleaved rounds (which damps other jobs on a shared machine), and the ratio
is against the first layout measured in the same run. Each rank gets cores / ranks threads.

The all-to-all share: parallel/experts.py's token all-to-all (forward, and the reverse one in
backward) and its count exchange are wrapped with a wall clock on rank 0; their summed time per
step over the step time. On gloo a collective's time includes waiting for the slower rank, so the
share is an upper bound on what moving the tokens costs. Prints figures; never a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.distributed import run_on_ranks  # noqa: E402  (spawns gloo ranks)

LAYOUTS = {  # name: (ranks, overrides)
    "dp=1": (1, ["parallel.dp=1"]),
    "dp=2 ep=1": (2, ["parallel.dp=2", "parallel.ep=1"]),
    "dp=2 ep=2": (2, ["parallel.dp=2", "parallel.ep=2"]),
}


def _timed_collectives() -> list[float]:
    """Wrap the dispatcher's collectives with a wall clock; returns the list they append to."""
    from megatron_llm.parallel import experts

    spent: list[float] = []
    for name in ("_all_to_all", "exchange_counts"):
        real = getattr(experts, name)

        def timed(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = _real(*args, **kwargs)
            spent.append(time.perf_counter() - start)
            return out

        setattr(experts, name, timed)
    return spent


def step_times(overrides: list[str], args: argparse.Namespace, threads: int) -> dict[str, list]:
    import torch

    from megatron_llm.config import load_config
    from megatron_llm.parallel.build import build_model
    from megatron_llm.parallel.engine import build_engine
    from megatron_llm.parallel.groups import build_context
    from megatron_llm.training.loop import train_step
    from megatron_llm.training.run import seed_everything

    torch.set_num_threads(threads)
    spent = _timed_collectives()
    cfg = load_config(
        None,
        [
            "model.style=llama",
            f"model.num_layers={args.layers}",
            f"model.hidden_size={args.hidden}",
            f"model.num_heads={args.heads}",
            f"model.seq_length={args.seq}",
            f"model.moe.num_experts={args.experts}",
            f"model.moe.top_k={args.top_k}",
            "parallel.zero_stage=1",
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
    times, collectives = [], []
    for _ in range(args.warmup + args.steps):
        spent.clear()
        start = time.perf_counter()
        train_step(engine, iter([mine]), 1, ctx.tp_group)
        times.append(time.perf_counter() - start)
        collectives.append(sum(spent))
    return {"step": times[args.warmup :], "all_to_all": collectives[args.warmup :]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2, help="rounds over all layouts; best kept")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset")
    args = p.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the ranks' import warnings hide the table
    cores = len(os.sched_getaffinity(0))
    print(
        f"MoE GPT llama: {args.layers} layers, hidden {args.hidden}, {args.experts} experts "
        f"top-{args.top_k}, seq {args.seq}, vocab {args.vocab}, global batch "
        f"{args.global_batch}; {cores} cores, median of {args.steps} steps after "
        f"{args.warmup} warmup",
        flush=True,
    )
    names = args.layouts.split(",")
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for name in names:
            ranks, overrides = LAYOUTS[name]
            threads = max(cores // ranks, 1)
            got = run_on_ranks(ranks, step_times, overrides, args, threads, timeout=1800)[0]
            step = statistics.median(got["step"])
            if step < best.get(name, (float("inf"), 0.0))[0]:
                best[name] = (step, statistics.median(got["all_to_all"]))
    baseline = best[names[0]][0]
    for name in names:
        step, a2a = best[name]
        print(
            f"{name:<10} ranks {LAYOUTS[name][0]}  step {step * 1e3:8.1f} ms  "
            f"x{step / baseline:.2f} of {names[0]}  all-to-all {a2a * 1e3:7.1f} ms "
            f"({a2a / step:.0%} of the step)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
