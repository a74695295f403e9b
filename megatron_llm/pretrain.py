"""Entry point of one training rank: ``python -m megatron_llm.pretrain [CONFIG] [a.b=value ...]``.

Normally started through ``launch/pretrain.sh``, which starts the right number of ranks.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, NoReturn

from megatron_llm.atomic import write_atomic
from megatron_llm.config import ConfigError, load_config


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """(config path or None, overrides); drops the --local_rank the deepspeed launcher adds."""
    config, overrides, skip, resume_next = None, [], False, False
    for arg in argv:
        if skip:
            skip = False
            continue
        if resume_next:
            overrides.append(f"checkpoint.resume={arg}")
            resume_next = False
            continue
        if arg.startswith("--local_rank"):
            skip = arg == "--local_rank"  # "--local_rank N" form
            continue
        if arg == "--resume" or arg.startswith("--resume="):
            if arg == "--resume":
                resume_next = True
            else:
                overrides.append(f"checkpoint.resume={arg.split('=', 1)[1]}")
            continue
        if arg in ("-h", "--help"):
            print(
                __doc__ + "\nCONFIG: a YAML file in configs/; overrides: section.field=value "
                "(e.g. train.steps=100 parallel.zero_stage=1).\n--resume auto|never|PATH: "
                "resume from the newest valid checkpoint in checkpoint.dir (auto, the "
                "default), start fresh (never), or start from a checkpoint folder (PATH)."
            )
            sys.exit(0)
        if "=" in arg:
            overrides.append(arg)
        elif config is None and not overrides and not arg.startswith("-"):
            config = arg
        else:
            raise ConfigError(
                f"argument {arg!r}: expected one config file first, then "
                "section.field=value overrides"
            )
    if resume_next:
        raise ConfigError("--resume: expected auto, never or a checkpoint path after it")
    return config, overrides


def print_summary(summary: dict, cfg_path: str | None) -> None:
    losses, first = summary["losses"], summary["first_step"]
    lines = [
        "=" * 64,
        f"run summary ({cfg_path or 'defaults'})",
        f"  steps              {first} to {summary['steps']} on {summary['world_size']} ranks, "
        f"global batch {summary['global_batch_size']}",
    ]
    if losses:
        lines.append(
            f"  loss               {losses[0]:.4f} (step {first}) -> {losses[-1]:.4f} "
            f"(step {summary['steps']})"
        )
    else:
        lines.append(f"  nothing to do: the run was already at step {summary['steps']}")
    if "stopped" in summary:
        lines.append(f"  stopped early      {summary['stopped']}")
    if "failed" in summary:
        lines.append(f"  FAILED             {summary['failed']}")
    if "val_loss" in summary:
        lines.append(
            f"  validation         loss {summary['val_loss']:.4f}, "
            f"perplexity {summary['val_perplexity']:.2f}"
        )
    lines.append(
        f"  throughput         {summary['tokens_per_s']:,.0f} tokens/s "
        f"({summary['tokens']:,} tokens in {summary['seconds']:.1f} s)"
    )
    if "checkpoint" in summary:
        lines.append(f"  checkpoint         {summary['checkpoint']}")
    lines.append("=" * 64)
    print("\n".join(lines), flush=True)


def quiet_known_warnings() -> None:
    # Two warnings every rank would print that ask nothing of the user: megatron-core reports
    # that apex is absent (we do not use apex; csrc/ replaces it), and DeepSpeed's ZeRO calls a
    # torch.distributed function that torch has deprecated.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings(
        "ignore", message=".*all_gather_into_tensor` is deprecated", category=FutureWarning
    )


def fail(watchdog: Any, error: Exception) -> NoReturn:
    """Training raised. If another rank died (the usual cause of a failed collective), say
    which; otherwise this rank's own error: print it and post it, so the others stop too."""
    # DeepSpeed's launcher SIGTERMs the other ranks of a node where one died, and kills them
    # 30 s later: long enough to say who died first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    verdict = watchdog.explain_failure(error)
    if verdict is not None:
        print(
            f"error ({watchdog.me}): {type(error).__name__} in training, because {verdict}",
            file=sys.stderr,
            flush=True,
        )
    else:
        traceback.print_exc()
        watchdog.post(f"{watchdog.me} failed: {type(error).__name__}: {error}"[:2000])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # not sys.exit: a group with a dead member can hang at interpreter exit


def lock_checkpoint_dir(cfg: Any, rank: int) -> tuple[Any, str | None]:
    """(the lock, or None; the refusal every rank returns 2 on, or None). Rank 0 takes the
    checkpoint dir's lock before anything is written; the verdict reaches every rank."""
    import torch.distributed as dist

    from megatron_llm.checkpoint.lock import DirLock, LockHeld

    lock, refusal = None, None
    if rank == 0 and cfg.checkpoint.lock:
        try:
            lock = DirLock.acquire(cfg.checkpoint.dir, stale_after_s=cfg.checkpoint.lock_stale_s)
        except LockHeld as e:
            refusal = str(e)
        except OSError as e:
            refusal = f"checkpoint.dir {cfg.checkpoint.dir}: cannot take its lock ({e})"
    box = [refusal]
    dist.broadcast_object_list(box, src=0)
    return lock, box[0]


def refuse(ctx: Any, watchdog: Any, lock: Any, line: str | None, code: int) -> int:
    """Ends a run that stopped with a known failure: its one line (if this rank prints it), the
    watchdog and the checkpoint dir's lock released, the group torn down, the exit code."""
    import torch.distributed as dist

    if line is not None:
        print(line, file=sys.stderr, flush=True)
    watchdog.stop()
    if lock is not None:
        lock.release()
    dist.destroy_process_group()
    return code


def main(argv: list[str] | None = None) -> int:
    from megatron_llm.cluster.supervise import watch_launcher

    watch_launcher()  # first: a rank whose launcher was kill -9-ed must not train on
    quiet_known_warnings()
    import torch.distributed as dist

    from megatron_llm.checkpoint.io import CheckpointError
    from megatron_llm.checkpoint.runtime import SaveFailed
    from megatron_llm.cluster.checks import EnvironmentCheckError, check_environment
    from megatron_llm.cluster.watchdog import Watchdog
    from megatron_llm.data.indexed import ShardError
    from megatron_llm.parallel.groups import build_context, init_distributed
    from megatron_llm.training.loop import train

    try:
        cfg_path, overrides = split_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(cfg_path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        init_distributed(cfg.parallel.timeout_minutes)
    except RuntimeError as e:  # rank discovery (srun, MPI) says what is missing
        print(f"error: {e}", file=sys.stderr)
        return 2
    watchdog = Watchdog(
        dist.get_rank(), dist.get_world_size(), cfg.parallel.heartbeat_timeout_s
    ).start()
    try:
        check_environment(cfg.parallel)
        ctx = build_context(cfg.parallel)
    except (ValueError, EnvironmentCheckError) as e:  # the same verdict on every rank
        if dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        watchdog.stop()
        return 2
    lock, refusal = lock_checkpoint_dir(cfg, ctx.rank)
    if refusal is not None:
        if ctx.rank == 0:
            print(f"error: {refusal}", file=sys.stderr, flush=True)
        watchdog.stop()
        return 2
    try:
        summary = train(cfg, ctx)
    except SaveFailed as e:  # the same line on every rank; nothing published
        return refuse(ctx, watchdog, lock, f"error: {e}" if ctx.rank == 0 else None, 1)
    except (CheckpointError, ShardError) as e:  # a refused resume, or shards that fail their
        # checks before the first step (megatron_llm/data/shard_checks.py): say why, no traceback
        return refuse(ctx, watchdog, lock, f"error (rank {ctx.rank}): {e}", 2)
    except Exception as e:
        fail(watchdog, e)
    if lock is not None:
        lock.release()
    watchdog.stop()  # before the last barrier: rank 0, which serves the store, may leave first
    if ctx.is_logging_rank:
        print_summary(summary, cfg_path)
        out = Path(cfg.logging.dir) / "summary.json"
        write_atomic(
            out,
            json.dumps(
                {k: v for k, v in summary.items() if not (isinstance(v, float) and math.isnan(v))},
                indent=2,
            ),
        )
        print(f"summary written to {out}", flush=True)
    if "failed" in summary and ctx.rank == 0:
        print(f"error: {summary['failed']}", file=sys.stderr, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if "failed" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
