"""Benchmark checkpoint save and load against plain torch.save / torch.load of the same tensors.

    python bench/checkpoint.py                    # ~1.3 GB of state (108M params, fp32 AdamW)
    python bench/checkpoint.py --hidden 512       # smaller

One rank, ZeRO 0, fp32. After one training step (so AdamW has its state), it times:
  - ours: megatron_llm.checkpoint.runtime.save (gather whole tensors, torch.save per file with
    the sha256 computed on the way, fsync, rename into place) and the load a resume does
    (verify checksums, memory-map the files, copy weights and AdamW state into the engine);
  - async: saver.Saver(asynchronous=True).save, what the step loop waits for (the copy of the
    state to host memory; the write runs in a background thread), and the whole save to its
    publication (that plus the wait for the thread);
  - baseline: torch.save of the same {name: {param, exp_avg, exp_avg_sq}} dict into one file on
    the same disk, with fsync, and torch.load of it.
Prints seconds, MB/s and the ratio ours/baseline (time). Loads read from the page cache, the
files having just been written; both sides alike. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir in /tmp)")
    p.add_argument("--repeat", type=int, default=3, help="best of N for each measurement")
    return p.parse_args()


def best_of_alternating(n: int, *fns) -> tuple[float, ...]:
    # a, b, a, b, ...: all see the same disk and page-cache conditions; the best of each.
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(n):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return tuple(min(t) for t in times)


def main() -> None:
    args = parse_args()
    from megatron_llm.launch import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    from megatron_llm.checkpoint import io
    from megatron_llm.checkpoint import runtime as ckpt_run
    from megatron_llm.checkpoint.saver import Saver
    from megatron_llm.checkpoint.state import gather_state, restore_state
    from megatron_llm.config import load_config
    from megatron_llm.parallel.build import build_model
    from megatron_llm.parallel.engine import build_engine
    from megatron_llm.parallel.groups import build_context, init_distributed
    from megatron_llm.training.loop import train_step

    cfg = load_config(
        None,
        [
            f"model.hidden_size={args.hidden}",
            f"model.num_layers={args.layers}",
            "model.num_heads=8",
            "model.seq_length=64",
            "train.micro_batch_size=1",
        ],
    )
    init_distributed(10)
    ctx = build_context(cfg.parallel)
    built = build_model(cfg, ctx, args.vocab)
    engine = build_engine(built.module, cfg, ctx)
    train_step(engine, iter([torch.randint(0, args.vocab, (1, 65))]), 1)
    root = Path(args.dir or tempfile.mkdtemp(prefix="megatron_llm_bench_ckpt_"))
    root.mkdir(parents=True, exist_ok=True)
    state = dict(gather_state(engine, ctx))
    nbytes = sum(t.numel() * t.element_size() for d in state.values() for t in d.values())
    params = sum(d["param"].numel() for d in state.values())
    print(f"model: {params / 1e6:.1f}M params, {nbytes / 1e9:.2f} GB of fp32 state; dir {root}")

    def ours_save() -> None:
        ckpt_run.save(
            engine,
            built.model,
            ctx,
            root=str(root / "ours"),
            step=1,
            run_state={},
            config=cfg.to_dict(),
            keep_last=1,
        )

    saver = Saver(ctx, asynchronous=True)
    async_block: list[float] = []
    async_total: list[float] = []

    def async_save() -> None:
        start = time.perf_counter()
        saver.save(
            engine,
            built.model,
            root=str(root / "async"),
            step=1,
            run_state={},
            config=cfg.to_dict(),
            keep_last=1,
        )
        async_block.append(time.perf_counter() - start)  # what the step loop waits for
        saver.wait()  # the background thread's write, fsync, rename
        async_total.append(time.perf_counter() - start)

    def ours_load() -> None:
        ckpt = ckpt_run.choose("auto", str(root / "ours"), ctx)  # checksums every file
        restore_state(engine, ctx, ckpt.tensors(optimizer=True), 1)

    baseline_file = root / "baseline.pt"

    def baseline_save() -> None:
        with open(baseline_file, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    def baseline_load() -> None:
        torch.load(baseline_file, map_location="cpu", weights_only=True)

    sync, _, base = best_of_alternating(args.repeat, ours_save, async_save, baseline_save)
    block = min(async_block)
    rows = [
        ("save", sync, base),
        ("async", min(async_total), base),
        ("load", *best_of_alternating(args.repeat, ours_load, baseline_load)),
    ]
    size = sum(f.stat().st_size for f in (root / "ours" / io.tag_for(1)).iterdir())
    base_size = baseline_file.stat().st_size
    print(f"checkpoint folder {size / 1e9:.2f} GB; baseline file {base_size / 1e9:.2f} GB")
    print(f"{'':6}{'ours s':>9}{'MB/s':>9}{'torch s':>10}{'MB/s':>9}{'ours/torch time':>17}")
    for name, ours, theirs in rows:
        print(
            f"{name:6}{ours:9.2f}{nbytes / 1e6 / ours:9.0f}{theirs:10.2f}"
            f"{nbytes / 1e6 / theirs:9.0f}{ours / theirs:16.2f}x"
        )
    print(
        f"async save: the step loop waits {block:.3f} s per save (copy to host memory), "
        f"{block / sync:.1%} of our synchronous save ({sync:.2f} s) and {block / base:.1%} of "
        f"torch.save + fsync of the same bytes ({base:.2f} s); the whole async save to its "
        f"publication: {min(async_total):.2f} s"
    )
    if args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
