"""Real training runs (megatron_llm.training.loop.train) for the checkpoint tests, on gloo ranks.

``train_run`` runs the real loop on real shards and also records, per step, a digest of every
micro-batch this rank trained on, so a test can compare the samples two runs saw.
"""

from __future__ import annotations

import hashlib
from typing import Any

TINY = [
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_heads=4",
    "model.seq_length=16",
    "optim.warmup_steps=2",
    "optim.lr=1e-2",
    "train.seed=7",
    "eval.at_end=false",
    "logging.interval=1",
    "checkpoint.keep_last=0",
]


def overrides(run_dir: str, prefix: str, tokenizer: str, *extra: str) -> list[str]:
    return [
        *TINY,
        f"data.prefixes=[{prefix}]",
        f"data.tokenizer={tokenizer}",
        f"data.cache_dir={run_dir}/cache",
        f"checkpoint.dir={run_dir}/checkpoints",
        f"logging.dir={run_dir}",
        *extra,
    ]


def train_run(argv: list[str]) -> dict[str, Any]:
    """The real loop; returns its summary plus this rank's micro-batch digests."""
    import megatron_llm.training.loop as loop
    from megatron_llm.config import load_config
    from megatron_llm.parallel.groups import build_context

    cfg = load_config(None, argv)
    ctx = build_context(cfg.parallel)
    seen: list[str] = []
    real = loop.micro_batches

    def recording(*args: Any, **kwargs: Any) -> Any:
        for batch in real(*args, **kwargs):
            seen.append(hashlib.sha256(batch.numpy().tobytes()).hexdigest()[:16])
            yield batch

    loop.micro_batches = recording  # observe the batches; the loop and data are untouched
    try:
        summary = loop.train(cfg, ctx)
    finally:
        loop.micro_batches = real
    summary["batches"] = seen
    summary["rank"] = ctx.rank
    return summary


def train_runs(runs: list[list[str]]) -> list[dict[str, Any]]:
    """Several runs one after the other on the same ranks (a spawn costs seconds per rank)."""
    import torch.distributed as dist

    results = []
    for argv in runs:
        results.append(train_run(argv))
        dist.barrier()
    return results
