"""Benchmark sharded checkpoint saves against plain torch.save of the same bytes, per rank.

    python bench/checkpoint.py                     # 108M params, 1.30 GB fp32 + AdamW; dp 1,2,4
    python bench/checkpoint.py --hidden 1536 --layers 12 --dp 1    # ~390M params
    python bench/checkpoint.py --hidden 512 --dp 1,2   # smaller

For each dp (ZeRO 1 when dp > 1, fp32, one process per rank over gloo), after one training step
(so AdamW has its state), every rank times, best of --repeat:
  - sync: checkpoint.runtime.save (copy this rank's shard to host, torch.save per file with the
    sha256 taken on the way, fsync, agree, rename into place, ``latest``);
  - block: what the step loop waits for in an asynchronous save (saver.Saver): the copy of this
    rank's shard to host memory; total: that plus the background write to its publication;
  - torch: torch.save of the same tensors (this rank's shard, {name: {param, exp_avg,
    exp_avg_sq}}) into one file on the same disk, with fsync (``torch+fsync``) and without
    (``torch``: page cache only);
  - bytes: what this rank wrote (its model/optim/rng files) against the whole state / world;
  - memory: the host buffers of the asynchronous snapshot (reused from save to save), and the
    rise of the process's peak RSS over the saves.
Prints per dp the slowest rank's times and the ratios the issue asks for:
  block / torch (target <= 10%), torch+fsync / total and torch+fsync / sync (targets >= 0.8),
  bytes per rank / (state / world) (target 1 +- one tensor). Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dp", default="1,2,4", help="data-parallel sizes to run, comma-separated")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir in /tmp)")
    p.add_argument("--repeat", type=int, default=3, help="best of N for each measurement")
    return p.parse_args()


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: Any) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_PORT=str(port)
    )
    import torch.distributed as dist

    from megatron_llm.checkpoint import io
    from megatron_llm.checkpoint import runtime as ckpt_run
    from megatron_llm.checkpoint.saver import Saver
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
            f"parallel.dp={world}",
            f"parallel.zero_stage={1 if world > 1 else 0}",
        ],
    )
    init_distributed(10)
    ctx = build_context(cfg.parallel)
    built = build_model(cfg, ctx, args.vocab)
    engine = build_engine(built.module, cfg, ctx)
    train_step(engine, iter([torch.randint(0, args.vocab, (1, 65))]), 1)
    root = Path(args.root)
    kwargs = {"run_state": {}, "config": cfg.to_dict(), "keep_last": 1, "step": 1}
    plan = ckpt_run.write_plan(engine, ctx)
    snap = ckpt_run.snapshot(engine, built.model, ctx, root=str(root), plan=plan, **kwargs)
    mine = {n: {"param": w, **snap.optim[n]} for n, w in snap.weights.items()}
    shard_bytes = sum(t.numel() * t.element_size() for d in mine.values() for t in d.values())
    state_bytes = 3 * 4 * built.parameters
    largest = 3 * 4 * max(p.numel() for p in built.model.parameters())
    del snap
    saver = Saver(ctx, asynchronous=True)
    baseline = root / f"baseline-{rank}.pt"

    def sync() -> None:
        ckpt_run.save(engine, built.model, ctx, root=str(root / "sync"), **kwargs)

    def asynchronous() -> tuple[float, float]:
        start = time.perf_counter()
        saver.save(engine, built.model, root=str(root / "async"), **kwargs)
        block = time.perf_counter() - start
        saver.wait()
        return block, time.perf_counter() - start

    def torch_save(fsync: bool) -> None:
        with open(baseline, "wb") as f:
            torch.save(mine, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    times: dict[str, list[float]] = {k: [] for k in ("sync", "block", "total", "torch", "fsync")}
    rss_before = _peak_rss()
    for _ in range(args.repeat):  # alternating: all see the same disk and page-cache state
        dist.barrier()
        times["sync"].append(_timed(sync))
        dist.barrier()
        block, total = asynchronous()
        times["block"].append(block)
        times["total"].append(total)
        dist.barrier()
        times["torch"].append(_timed(lambda: torch_save(False)))
        dist.barrier()
        times["fsync"].append(_timed(lambda: torch_save(True)))
    folder = root / "sync" / io.tag_for(1)
    wrote = sum(
        (folder / f"{kind}-{rank:05d}.pt").stat().st_size for kind in ("model", "optim", "rng")
    )
    result = {k: min(v) for k, v in times.items()}
    result.update(
        rank=rank,
        shard_bytes=shard_bytes,
        wrote=wrote,
        state_bytes=state_bytes,
        largest=largest,
        params=built.parameters,
        pinned=sum(b.numel() * b.element_size() for b in saver._pinned._buffers),
        rss_rise=_peak_rss() - rss_before,
    )
    out.put(result)
    dist.barrier()
    dist.destroy_process_group()


def run_dp(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    from megatron_llm.launch import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, args, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sorted(results, key=lambda r: r["rank"])


def report(world: int, ranks: list[dict[str, Any]]) -> None:
    slow = {k: max(r[k] for r in ranks) for k in ("sync", "block", "total", "torch", "fsync")}
    first = ranks[0]
    gb = 1e9
    print(
        f"dp={world}: {first['params'] / 1e6:.1f}M params, state {first['state_bytes'] / gb:.2f}"
        f" GB; per rank {max(r['shard_bytes'] for r in ranks) / gb:.3f} GB of tensors"
    )
    for r in ranks:
        share = r["state_bytes"] / world
        print(
            f"  rank {r['rank']}: wrote {r['wrote'] / gb:.3f} GB = {r['wrote'] / share:.3f} x "
            f"state/world (+- one tensor: {r['largest'] / share:.3f}); host buffers "
            f"{r['pinned'] / gb:.3f} GB; peak RSS rose {r['rss_rise'] / gb:.3f} GB"
        )
    print(
        f"  slowest rank, s: sync save {slow['sync']:.2f} | async: loop blocked "
        f"{slow['block']:.3f}, published after {slow['total']:.2f} | torch.save "
        f"{slow['torch']:.2f}, + fsync {slow['fsync']:.2f}"
    )
    print(
        f"  ratios: block / torch.save {slow['block'] / slow['torch']:.1%} (target <= 10%); "
        f"torch.save+fsync / async total {slow['fsync'] / slow['total']:.2f}x, / sync save "
        f"{slow['fsync'] / slow['sync']:.2f}x (target >= 0.8); write rate "
        f"{first['shard_bytes'] / slow['total'] / 1e6:.0f} MB/s per rank",
        flush=True,
    )


def main() -> None:
    args = parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="megatron_llm_bench_ckpt_"))
    for world in (int(d) for d in args.dp.split(",")):
        args.root = str(root / f"dp{world}")
        Path(args.root).mkdir(parents=True, exist_ok=True)
        report(world, run_dp(world, args))
        shutil.rmtree(args.root, ignore_errors=True)
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
