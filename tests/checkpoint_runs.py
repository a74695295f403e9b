"""Real training runs (megatron_llm.training.loop.train) for the checkpoint tests, on gloo ranks.

``train_run`` runs the real loop on real shards and also records, per step, a digest of every
micro-batch this rank trained on, so a test can compare the samples two runs saw.
"""

from __future__ import annotations

import hashlib
from typing import Any

from tests.parallel_runs import TINY_MODEL

TINY = [
    *TINY_MODEL,
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
    import megatron_llm.training.run as assembly
    from megatron_llm.config import load_config
    from megatron_llm.parallel.groups import build_context

    cfg = load_config(None, argv)
    ctx = build_context(cfg.parallel)
    seen: list[str] = []
    first: list[Any] = []
    real = assembly.micro_batches

    def recording(*args: Any, **kwargs: Any) -> Any:
        for batch in real(*args, **kwargs):
            if not seen:
                first.append(batch.numpy().copy())
            seen.append(hashlib.sha256(batch.numpy().tobytes()).hexdigest()[:16])
            yield batch

    assembly.micro_batches = recording  # observe the batches; the loop and data are untouched
    try:
        summary = loop.train(cfg, ctx)
    finally:
        assembly.micro_batches = real
    summary["batches"] = seen
    summary["first_batch"] = first[0] if first else None
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


def hf_round_trip(argv: list[str], work: str) -> dict[str, Any]:
    """Train, export to transformers, compare logits, import back, train from the import."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_llm.checkpoint import io
    from megatron_llm.checkpoint.__main__ import main as ckpt_cli
    from megatron_llm.checkpoint.state import load_weights
    from megatron_llm.config import from_dict
    from megatron_llm.model import GPT

    trained = train_run(argv)
    ckpt = io.Checkpoint.open(trained["checkpoint"])
    cfg = from_dict(ckpt.config())
    weights = ckpt.weights()
    ours = GPT(cfg.model, weights["embed.weight"].shape[0])
    load_weights(ours, weights, "test")
    assert ckpt_cli(["export-hf", trained["checkpoint"], f"{work}/hf"]) == 0
    theirs = AutoModelForCausalLM.from_pretrained(f"{work}/hf", dtype=torch.float32)
    tokens = torch.randint(
        0, 500, (2, cfg.model.seq_length), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        diff = (ours.eval()(tokens) - theirs.eval()(tokens).logits).abs().max().item()
    tokenizer = [a for a in argv if a.startswith("data.tokenizer=")]
    assert ckpt_cli(["import-hf", f"{work}/hf", f"{work}/imported", *tokenizer]) == 0
    imported = io.Checkpoint.open(f"{work}/imported/global_step0").weights()
    same = sorted(imported) == sorted(weights) and all(
        torch.equal(imported[n], weights[n]) for n in weights
    )
    resumed = train_run([*argv, f"checkpoint.resume={work}/imported/global_step0"])
    return {
        "class": type(theirs).__name__,
        "max_logit_diff": diff,
        "weights_identical": same,
        "first_step_from_import": resumed["first_step"],
        "first_loss_from_import": resumed["losses"][0],
        "first_loss_trained": trained["losses"][0],
    }


def hf_round_trips(runs: list[tuple[list[str], str]]) -> list[dict[str, Any]]:
    return [hf_round_trip(argv, work) for argv, work in runs]


def finetune_from(pretrain: list[str], finetune: list[str]) -> dict[str, Any]:
    """Pretrain, then fine-tune from its checkpoint; the checkpoint's loss on the fine-tuning
    run's first batch, computed apart."""
    import torch

    from megatron_llm.checkpoint import io
    from megatron_llm.checkpoint.state import load_weights
    from megatron_llm.config import from_dict
    from megatron_llm.data.batch import inputs_and_labels
    from megatron_llm.model import GPT

    pretrained = train_run(pretrain)
    tuned = train_run(finetune)
    ckpt = io.Checkpoint.open(pretrained["checkpoint"])
    weights = ckpt.weights()
    model = GPT(from_dict(ckpt.config()).model, weights["embed.weight"].shape[0])
    load_weights(model, weights, "test")
    with torch.no_grad():
        loss = model(*inputs_and_labels(torch.from_numpy(tuned["first_batch"]))).item()
    return {"tuned": tuned, "checkpoint_loss_on_first_batch": loss}


def train_or_refusal(argv: list[str]) -> dict[str, Any]:
    """A run that may end in a refused save: its summary, or {"error": the one line}."""
    from megatron_llm.checkpoint.io import CheckpointError

    try:
        return train_run(argv)
    except CheckpointError as e:
        return {"error": str(e), "type": type(e).__name__}


def restored_state_gap(argv: list[str]) -> dict[str, Any]:
    """Resume from ``checkpoint.resume`` at this argv's layout and compare what the engine holds
    right after the restore with the checkpoint's tensors, directly: {kind: largest absolute
    difference} for param, exp_avg and exp_avg_sq, and the names this rank compared."""
    import torch.distributed as dist

    from megatron_llm.checkpoint import io
    from megatron_llm.checkpoint.state import gather_state
    from megatron_llm.config import load_config
    from megatron_llm.parallel.groups import build_context
    from megatron_llm.training.run import build_run

    cfg = load_config(None, argv)
    ctx = build_context(cfg.parallel)
    run = build_run(cfg, ctx)
    saved = io.Checkpoint.open(cfg.checkpoint.resume).tensors(optimizer=True)
    gap = {"param": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    names = []
    for name, whole in gather_state(run.engine, ctx, names=run.names):
        names.append(name)
        for kind, value in whole.items():
            diff = (value.float() - saved[name][kind].float()).abs().max().item()
            gap[kind] = max(gap[kind], diff)
    dist.barrier()
    return {"gap": gap, "names": names, "saved_names": sorted(saved)}


def run_all(items: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
    """Runs of several kinds one after the other on the same ranks: ("train", argv),
    ("restored", argv) for :func:`restored_state_gap`, ("refusal", argv)."""
    import torch.distributed as dist

    kinds = {"train": train_run, "restored": restored_state_gap, "refusal": train_or_refusal}
    results = []
    for kind, argv in items:
        results.append(kinds[kind](argv))
        dist.barrier()
    return results
