"""Context parallelism on CPU ranks: step time of cp=2 against cp=1 for the same tokens, and the
activation memory a rank holds against the planner's estimate (megatron_llm/plan).

    python bench/context.py                       # gpt2, 2 layers, hidden 256, seq 1024
    python bench/context.py --seq 4096 --steps 5

Both layouts train the same GPT on the same sample (micro-batch 1, dp=1): cp=1 on one rank,
cp=2 on two gloo ranks, each rank with cores / ranks threads (so cp=2 never uses more cores
than cp=1; the ratio shows what the ring and the split cost on a CPU, not a speedup), or
--threads each (on a loaded machine 1 thread per rank avoids oversubscription, and cp=2 then
uses twice the cores). The step time is the median over --steps, the best of --rounds
interleaved rounds (which damps other jobs on a shared machine).

Memory, measured on rank 0 in one training forward and backward, two ways:
  kept   every tensor autograd saves for backward (torch.autograd.graph.saved_tensors_hooks,
         counted once per storage, parameters and buffers excluded), plus the fp32 gradient of
         the logits that backward allocates: what the planner's "activations" count
         (tests/test_plan_activations.py measures the same way)
  peak   the most bytes torch's allocator had live above the step's start during forward and
         backward (its memory profiler's per-op allocations less frees, in the order the ops
         started; the parameter gradients made beforehand, so not counted): against the
         planner's activations plus its ring buffers (the transient K/V blocks)
Prints figures and the ratios measured / planned; never a pass/fail test.
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


def overrides(args: argparse.Namespace, cp: int) -> list[str]:
    return [
        f"model.style={args.style}",
        f"model.num_layers={args.layers}",
        f"model.hidden_size={args.hidden}",
        f"model.num_heads={args.heads}",
        f"model.seq_length={args.seq}",
        "model.dropout=0",
        "model.attention_dropout=0",
        "train.micro_batch_size=1",
        "train.grad_accum_steps=1",
        f"train.steps={args.warmup + args.steps}",
        f"parallel.cp={cp}",
        "parallel.dp=1",
        "parallel.zero_stage=0",
    ]


def kept_bytes(model: Any, step: Any) -> tuple[Any, int]:
    """step()'s result and the bytes autograd saved during it (module docstring: kept)."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    return out, sum(saved.values())


def peak_bytes(step: Any) -> int:
    """The highest running sum of torch's allocations less frees during step() (module
    docstring: peak): each op's own (self) memory, in the order the ops started."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        step()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def measure(cp: int, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    import torch

    from megatron_llm.config import load_config
    from megatron_llm.parallel.build import build_model
    from megatron_llm.parallel.context import split_batch
    from megatron_llm.parallel.engine import build_engine
    from megatron_llm.parallel.groups import build_context
    from megatron_llm.training.loop import train_step
    from megatron_llm.training.run import seed_everything

    torch.set_num_threads(threads)
    cfg = load_config(None, overrides(args, cp))
    ctx = build_context(cfg.parallel)
    seed_everything(cfg.train.seed)
    built = build_model(cfg, ctx, args.vocab)
    engine = build_engine(built.module, cfg, ctx)
    context = built.model.context if cp > 1 else None
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (1, args.seq + 1), generator=gen)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        train_step(engine, iter([tokens]), 1, ctx.tp_group, None, context)
        times.append(time.perf_counter() - start)
    inputs, labels = split_batch((tokens[:, :-1], tokens[:, 1:]), context)

    def forward() -> Any:
        return engine(inputs, labels)

    loss, kept = kept_bytes(engine.module, forward)
    engine.backward(loss)
    engine.step()

    def forward_backward() -> None:
        engine.backward(engine(inputs, labels))

    # Parameter gradients exist before the measured step, so that backward accumulates into
    # them and the peak holds only activations and transients.
    for param in engine.module.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    peak = peak_bytes(forward_backward)
    engine.step()
    rows = cfg.model.padded_vocab_size(args.vocab, 1)
    return {
        "step_s": statistics.median(times[args.warmup :]),
        "kept": kept,
        "peak": peak,
        "rows": rows,
        "model": cfg.model,
    }


def planned(model: Any, rows: int, cp: int) -> tuple[float, float]:
    """The planner's activations and ring buffers of this rank (fp32, micro-batch 1)."""
    from megatron_llm.plan import memory

    lay = memory.Layout(1, 1, 1, 0, 1, 1, False, cp=cp)
    act = memory.activation_bytes(model, rows, lay, "fp32", False)
    return act, memory.ring_buffer_bytes(model, lay, "fp32")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--style", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="rounds over both layouts; best kept")
    p.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks)")
    args = p.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the ranks' import warnings hide the table
    cores = len(os.sched_getaffinity(0))
    print(
        f"GPT {args.style}: {args.layers} layers, hidden {args.hidden}, heads {args.heads}, "
        f"seq {args.seq}, vocab {args.vocab}, micro-batch 1, fp32; {cores} cores, median of "
        f"{args.steps} steps after {args.warmup} warmup",
        flush=True,
    )
    results: dict[int, dict[str, Any]] = {}
    for _ in range(args.rounds):
        for cp in (1, 2):
            threads = args.threads or max(cores // cp, 1)
            r = run_on_ranks(cp, measure, cp, args, threads, timeout=3600)[0]
            if cp not in results or r["step_s"] < results[cp]["step_s"]:
                results[cp] = r
    base = results[1]["step_s"]
    mb = 2**20
    for cp, r in results.items():
        act, ring = planned(r["model"], r["rows"], cp)
        logits_grad = 4 * args.seq / cp * r["rows"]  # allocated by backward, counted by the plan
        kept = r["kept"] + logits_grad
        print(
            f"cp={cp}  step {r['step_s'] * 1e3:9.1f} ms  x{r['step_s'] / base:.2f} of cp=1  | "
            f"rank 0 kept {kept / mb:7.1f} MiB vs planned {act / mb:7.1f} "
            f"(x{kept / act:.3f})  peak {r['peak'] / mb:7.1f} MiB vs planned + ring "
            f"{(act + ring) / mb:7.1f} (x{r['peak'] / (act + ring):.3f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
