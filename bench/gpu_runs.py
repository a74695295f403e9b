"""Steps 5 and 6 of bench/gpu_check.sh: real runs through launch/pretrain.sh (see gpu_check.py)."""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.gpu_check import Check

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/gpt_125m.yaml"
# The dry run's model and batch: tiny, so that a CPU rank takes seconds per step.
TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_heads=2",
    "model.seq_length=64",
    "train.micro_batch_size=2",
    "train.grad_accum_steps=2",
]


def ensure_data(check: Check, timeout: float) -> tuple[str, str]:
    """(shard prefix, tokenizer) of the default data, built as `make pretrain` builds it when
    missing (data/ is not in git); the dry run builds a tiny corpus under OUT/work instead."""
    where = check.work / "data" if check.dry else ROOT / "data" / "default"
    prefix, tokenizer = where / "stdlib_text_document", where / "tokenizer.model"
    if Path(f"{prefix}.bin").exists() and tokenizer.exists():
        return str(prefix), str(tokenizer)
    where.mkdir(parents=True, exist_ok=True)
    corpus = where / "stdlib.jsonl"
    size, vocab = ("300000", "512") if check.dry else ("8000000", "4096")
    py = check.python
    for name, cmd in (
        ("corpus", [py, "data_tools/make_corpus.py", "--output", str(corpus), "--max-bytes", size]),
        (
            "tokenizer",
            [py, "data_tools/train_tokenizer.py", "--input", str(corpus), "--vocab-size", vocab,
             "--output-prefix", str(where / "tokenizer")],
        ),
        (
            "shards",
            [py, "data_tools/preprocess.py", "--input", str(corpus), "--tokenizer",
             str(tokenizer), "--output-prefix", str(where / "stdlib"), "--workers", "2"],
        ),
    ):  # fmt: skip
        res = check.run(f"5_data_{name}", cmd, timeout)
        if res["rc"] != 0:
            raise RuntimeError(f"building the default data ({name}) failed: see {res['log']}")
    return str(prefix), str(tokenizer)


def pretrain(check: Check, name: str, overrides: list[str], timeout: float) -> dict[str, Any]:
    cmd = ["bash", "launch/pretrain.sh", CONFIG, *overrides, *(TINY if check.dry else [])]
    return check.run(name, cmd, timeout)


def metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    """step -> its last record in metrics.jsonl (a resumed run appends)."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records}


def accumulation_dtype(check: Check, overrides: list[str]) -> str:
    from bench.gpu_check import python_json

    args = json.dumps([CONFIG, overrides + (TINY if check.dry else [])])
    return python_json(
        check,
        "import json; from megatron_llm.config import load_config; "
        "from megatron_llm.parallel.engine import accumulation_dtype; "
        f"c, o = json.loads({args!r}); "
        "print(json.dumps(str(accumulation_dtype(load_config(c, o)))))",
    )


def step_pretrain(check: Check, timeout: float) -> dict[str, Any]:
    import time

    end = time.monotonic() + timeout
    prefix, tokenizer = ensure_data(check, timeout / 3)
    work = check.work / "pretrain"
    shutil.rmtree(work, ignore_errors=True)  # a previous check's checkpoints would be resumed
    overrides = [
        f"data.prefixes=[{prefix}]", f"data.tokenizer={tokenizer}", "train.steps=10",
        "train.exit_interval=5", "eval.interval=5", "eval.iters=2", "optim.warmup_steps=2",
        f"checkpoint.dir={work / 'checkpoints'}", "checkpoint.save_interval=5",
        f"logging.dir={work}", "logging.interval=1", "checkpoint.resume=auto",
    ]  # fmt: skip
    first = pretrain(check, "5_pretrain_to_5", overrides, end - time.monotonic())
    runs = {"to_5": first}
    if first["rc"] == 0:
        runs["resume_to_10"] = pretrain(
            check, "5_pretrain_resume", overrides, end - time.monotonic()
        )
    logs = "".join(Path(r["log"]).read_text(errors="replace") for r in runs.values())
    steps = metrics(work) if (work / "metrics.jsonl").exists() else {}
    losses = [steps[s]["loss"] for s in sorted(steps)]
    last = steps.get(10, {})
    # DeepSpeed logs its optimizer's name at INFO (often filtered); its bf16 optimizer, the one
    # ZeRO 1 with fp32 accumulation uses, also prints a marker.
    optimizer = re.findall(r"DeepSpeed Final Optimizer = (\w+)", logs)
    if not optimizer and "begin bf16_optimizer" in logs:
        optimizer = ["BF16_Optimizer"]
    found = dict(
        steps=sorted(steps), losses=losses, tokens_per_s=last.get("tokens_per_s"),
        mfu=last.get("mfu"), val_loss=last.get("val_loss"),
        saved_at_5=(work / "checkpoints" / "global_step5").exists(),
        resumed="resumed from" in logs and "at step 5" in logs,
        loss_falling=len(losses) == 10 and losses[-1] < losses[0],
        optimizer=optimizer[-1] if optimizer else None,
        accumulation_dtype=accumulation_dtype(check, overrides),
    )  # fmt: skip
    ok = all(r["rc"] == 0 for r in runs.values()) and len(runs) == 2
    ok = ok and found["saved_at_5"] and found["resumed"] and found["loss_falling"]
    mfu = "-" if found["mfu"] is None else f"{found['mfu']:.1%}"
    tps = "-" if found["tokens_per_s"] is None else f"{found['tokens_per_s']:,.0f}"
    summary = (
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {tps} tokens/s, MFU {mfu}, resumed "
        f"{found['resumed']}, {found['optimizer']}, accumulation {found['accumulation_dtype']}"
        if losses
        else "no metrics written"
    )
    return dict(status="ok" if ok else "failed", runs=runs, result=found, summary=summary)


def device_count(check: Check) -> int:
    from bench.gpu_check import python_json

    return python_json(check, "import torch; print(torch.cuda.device_count())")


def step_multi(check: Check, timeout: float) -> dict[str, Any]:
    import time

    gpus = 0 if check.dry else device_count(check)
    if not check.dry and gpus < 2:
        return dict(status="skipped", summary=f"needs 2+ GPUs; this machine has {gpus}")
    end = time.monotonic() + timeout
    prefix, tokenizer = ensure_data(check, timeout / 3)
    common = [
        f"data.prefixes=[{prefix}]", f"data.tokenizer={tokenizer}", "train.steps=6",
        "train.precision=fp32", "eval.interval=0", "eval.at_end=false",
        "checkpoint.save_at_end=false", "checkpoint.resume=never", "logging.interval=1",
        "optim.warmup_steps=2", "train.micro_batch_size=2", "train.grad_accum_steps=2",
    ]  # fmt: skip
    layouts = {
        "one": ["parallel.tp=1", "parallel.dp=1"],
        "tp2": ["parallel.tp=2", "parallel.dp=1"],
        "dp2": ["parallel.tp=1", "parallel.dp=2", "train.grad_accum_steps=1"],
    }
    commands = {}
    for name, layout in layouts.items():
        work = check.work / f"multi_{name}"
        shutil.rmtree(work, ignore_errors=True)
        overrides = [*common, *layout, f"logging.dir={work}", f"checkpoint.dir={work}/ckpt"]
        if check.dry:  # the tiny model shape only: the layouts set the batch
            overrides += TINY[:4]
        commands[name] = ["bash", "launch/pretrain.sh", CONFIG, *overrides]
    # One after the other on GPUs (they share them); side by side on CPU ranks, to save time.
    with ThreadPoolExecutor(max_workers=len(commands) if check.dry else 1) as pool:
        futures = {
            name: pool.submit(
                lambda n=name, c=cmd: check.run(f"6_multi_{n}", c, end - time.monotonic())
            )
            for name, cmd in commands.items()
        }
        runs = {name: f.result() for name, f in futures.items()}
    losses = {}
    for name, res in runs.items():
        work = check.work / f"multi_{name}"
        if res["rc"] == 0 and (work / "metrics.jsonl").exists():
            steps = metrics(work)
            losses[name] = [steps[s]["loss"] for s in sorted(steps)]
    diffs = {
        name: max(abs(a - b) / abs(b) for a, b in zip(losses[name], losses["one"]))
        for name in ("tp2", "dp2")
        if name in losses and "one" in losses and len(losses[name]) == len(losses["one"])
    }
    ok = len(diffs) == 2 and all(d < 1e-4 for d in diffs.values())
    summary = ", ".join(f"{k} vs 1: max rel. loss diff {v:.1e}" for k, v in diffs.items())
    return dict(
        status="ok" if ok else "failed", runs=runs, losses=losses, max_rel_diff=diffs,
        summary=summary or "no losses to compare",
    )  # fmt: skip
