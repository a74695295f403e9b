"""Saving and resuming inside a running job: collective calls every rank makes together."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from megatron_llm.atomic import WriteFailed, write_failed
from megatron_llm.checkpoint import io, rng
from megatron_llm.checkpoint.state import gather_state, optimizer_step, restore_state
from megatron_llm.parallel.groups import ParallelContext

# Config fields a resumed run may not change: they would make the weights, the data order or
# the token ids mean something else. Every other change (steps, schedule, logging, eval,
# checkpointing, parallel layout) is allowed and printed.
UNSAFE = {
    "model": None,  # every field but SAFE_MODEL_FIELDS: the shapes and the computation
    "data": ("prefixes", "weights", "split", "tokenizer"),
    "train": ("seed",),
}
# Model fields that change how, not what, is computed.
SAFE_MODEL_FIELDS = ("kernels",)


def _broadcast(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _layout(ctx: ParallelContext, zero_stage: int) -> dict[str, int]:
    return {
        "tp": ctx.tp,
        "pp": ctx.pp,
        "dp": ctx.dp,
        "world_size": ctx.world_size,
        "zero": zero_stage,
    }


def save(
    engine: Any,
    model: nn.Module,
    ctx: ParallelContext,
    *,
    root: str,
    step: int,
    run_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int = 0,
    keep_every: int = 0,
    names: dict[str, str] | None = None,
) -> Path:
    """Save a complete checkpoint for ``step`` atomically; every rank calls this.

    Raises :class:`SaveFailed` on every rank, with nothing published and the temporary folder
    removed, when any rank's weights are not finite or any file cannot be written (full disk,
    read-only file system): earlier checkpoints and ``latest`` stay as they were.
    """
    root_path = Path(root)
    weights: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    for name, whole in gather_state(engine, ctx, names=names):
        weights[name] = whole["param"]
        optim[name] = {k: v for k, v in whole.items() if k != "param"}
    bad = [n for part in _all(ctx, non_finite(weights, optim)) for n in part]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SaveFailed(
            f"checkpoint of step {step} not saved: non-finite values (nan or inf) in "
            f"{', '.join(bad[:3])}{more}; the run diverged: resume from the last checkpoint "
            f"in {root} (--resume auto) with a lower optim.lr, or skip the data"
        )
    tmp, error = None, None
    if ctx.rank == 0:
        try:
            tmp = io.new_tmp_dir(root_path, step)
        except OSError as e:
            error = str(write_failed(e.filename or root_path, e))
    tmp, error = _broadcast((tmp, error))
    if error:
        raise SaveFailed(f"checkpoint of step {step} not saved: {error}")
    writer = io.FolderWriter(tmp)
    index: dict[str, Any] = {}
    try:
        if weights:
            model_file, optim_file = f"model-{ctx.rank:05d}.pt", f"optim-{ctx.rank:05d}.pt"
            writer.tensors(model_file, weights)
            writer.tensors(optim_file, optim)
            index = {n: {"file": model_file, "shape": list(t.shape)} for n, t in weights.items()}
        writer.tensors(f"rng-{ctx.rank:05d}.pt", rng.capture(model))
        if ctx.rank == 0:
            writer.text("run_state.json", json.dumps(run_state, indent=2) + "\n")
            writer.text("config.yaml", yaml.safe_dump(config, sort_keys=False))
        entries = writer.entries()
    except WriteFailed as e:  # the other ranks learn it below, and nobody publishes
        writer.abort()
        entries, error = {}, str(e)
    del weights, optim
    pieces = _all(ctx, (entries, index, error))
    errors = [part[2] for part in pieces if part[2]]
    final = None
    if ctx.rank == 0 and not errors:
        files: dict[str, Any] = {}
        for part_files, part_index, _ in pieces:
            files.update(part_files)
            index.update(part_index)
        try:
            final = io.finish(
                tmp,
                root_path,
                step=step,
                layout=_layout(ctx, engine.zero_optimization_stage()),
                optimizer=True,
                tensors=index,
                files=files,
            )
        except OSError as e:
            errors.append(str(write_failed(e.filename or tmp, e)))
        except WriteFailed as e:
            errors.append(str(e))
        else:
            io.prune(root_path, keep_last=keep_last, keep_every=keep_every)
    if ctx.rank == 0 and errors:
        shutil.rmtree(tmp, ignore_errors=True)
    final, errors = _broadcast((str(final) if final else None, errors))
    if errors:
        raise SaveFailed(f"checkpoint of step {step} not saved: {errors[0]}")
    return Path(final)


class SaveFailed(io.CheckpointError):
    """A checkpoint that was not saved (full disk, non-finite weights); earlier ones intact.
    The same one-line message on every rank."""


def non_finite(
    weights: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]]
) -> list[str]:
    """Names of the tensors holding nan or inf: a diverged run must not publish them."""
    bad = []
    for name, t in weights.items():
        # One deliberate host sync per tensor, at save time only.
        if not bool(torch.isfinite(t).all()):
            bad.append(name)
    for name, states in optim.items():
        for key, t in states.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"{name} ({key})")
    return bad


def _all(ctx: ParallelContext, mine: Any) -> list[Any]:
    pieces: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(pieces, mine)
    return pieces


def _verify_shared(ckpt: io.Checkpoint, ctx: ParallelContext) -> list[str]:
    # Every rank checksums a share of the files; all ranks learn every problem.
    names = sorted(ckpt.manifest["files"])
    mine = [n for i, n in enumerate(names) if i % ctx.world_size == ctx.rank]
    found = ckpt.problems(checksums=True, files=mine)
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, found)
    return [p for part in gathered for p in part]


def choose(resume: str, root: str, ctx: ParallelContext) -> io.Checkpoint | None:
    """The checkpoint to start from, the same on every rank; None to start fresh.

    resume="auto": the newest valid checkpoint under ``root`` (``latest`` first); a corrupt
    one is skipped with a warning. resume="never": None. Otherwise a path (a checkpoint
    folder, or a checkpoint root whose newest valid one is taken): it must load.
    """
    if resume == "never":
        return None
    explicit = resume != "auto"
    where = Path(resume if explicit else root)
    if explicit and (where / "manifest.json").exists():
        paths = [where]
    else:
        paths = _broadcast([str(p) for p in io.candidates(where)] if ctx.rank == 0 else None)
        paths = [Path(p) for p in paths]
    if explicit and not paths:
        raise io.CheckpointError(f"checkpoint.resume={resume}: no checkpoint found there")
    for path in paths:
        try:
            ckpt = io.Checkpoint.open(path)
            problems = _verify_shared(ckpt, ctx)
        except io.CheckpointError as e:
            problems = [str(e)]
        if not problems:
            return ckpt
        message = f"checkpoint {path} is not loadable: " + "; ".join(problems[:3])
        if explicit:
            raise io.CheckpointError(message)
        if ctx.rank == 0:
            warnings.warn(message + "; trying the previous one", stacklevel=2)
    return None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_drift(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(unsafe changes, safe changes) between a checkpoint's config and this run's."""
    old, new = _flatten(saved), _flatten(current)
    unsafe, safe = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        line = f"{key}: {old.get(key, '<unset>')!r} -> {new.get(key, '<unset>')!r}"
        section, _, field = key.partition(".")
        rule = UNSAFE.get(section, ())
        if section == "model" and field in SAFE_MODEL_FIELDS:
            rule = ()
        (unsafe if rule is None or field in rule else safe).append(line)
    return unsafe, safe


def check_compatible(ckpt: io.Checkpoint, config: dict[str, Any], tokenizer_sha256: str) -> None:
    """Refuse unsafe config changes on resume (ValueError naming them); print the safe ones.

    A weights-only checkpoint (``import-hf``) starts a new run: its data and schedule are this
    run's own, and ``state.checked_weights`` checks the model's names and shapes.
    """
    if not ckpt.has_optimizer:
        return
    unsafe, safe = config_drift(ckpt.config(), config)
    saved_sha = ckpt.run_state().get("tokenizer_sha256")
    if saved_sha and saved_sha != tokenizer_sha256:
        unsafe.append(
            f"tokenizer file content: sha256 {saved_sha[:12]}… -> {tokenizer_sha256[:12]}…"
        )
    if unsafe:
        raise io.CheckpointError(
            f"cannot resume from {ckpt.path}: these config changes would change what the "
            "checkpoint's weights or data position mean:\n  "
            + "\n  ".join(unsafe)
            + "\nrestore them, or start a new run with checkpoint.resume=never and another "
            "checkpoint.dir"
        )
    if safe and dist.get_rank() == 0:
        print(f"[checkpoint] resuming with config changes: {'; '.join(safe)}", flush=True)


def restore(
    engine: Any,
    model: nn.Module,
    ctx: ParallelContext,
    ckpt: io.Checkpoint,
    tensors: dict[str, dict[str, torch.Tensor]],
    reseed: Callable[[int], None],
    names: dict[str, str] | None = None,
    weights_only: bool = False,
) -> dict[str, Any]:
    """Put the engine where the checkpoint's run was; returns its run state.

    The weights are already in the model (``state.checked_weights`` into ``shard.materialize``,
    each rank reading only its slices, before the engine was built).
    Weights only (``import-hf`` checkpoints, ``checkpoint.init_from``): a new run at step 0 with
    a fresh optimizer, schedule and data position.
    """
    if weights_only or not ckpt.has_optimizer:
        restore_state(engine, ctx, {n: {"param": t["param"]} for n, t in tensors.items()}, 0, names)
        reseed(0)
        return {"step": 0, "consumed_samples": 0}
    run = ckpt.run_state()
    step = run["step"]
    restore_state(engine, ctx, tensors, run.get("optimizer_step", step) if step else 0, names)
    sched = engine.lr_scheduler
    if step and sched is not None:
        # The lr is a function of the step: recompute it for this run's (possibly changed)
        # schedule rather than trusting a saved value.
        sched.last_epoch = step
        lrs = [base * fn(step) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs
    engine.global_steps = step
    engine.global_samples = run.get("consumed_samples", 0) if step else 0
    engine.micro_steps = step * engine.gradient_accumulation_steps()
    engine.skipped_steps = run.get("skipped_steps", 0) if step else 0
    scaler = _loss_scaler(engine)
    for key, value in (run.get("loss_scaler") or {}).items():
        if scaler is not None and hasattr(scaler, key):
            setattr(scaler, key, value)
    same_layout = all(ckpt.layout.get(k) == v for k, v in _layout(ctx, 0).items() if k != "zero")
    saved_rng = _saved_rng(ckpt, ctx) if same_layout and step else None
    if saved_rng is not None:
        rng.restore(model, saved_rng)
    else:
        reseed(step)
        if step and ctx.rank == 0:
            why = (
                f"{ckpt.path} holds no random states"
                if same_layout
                else f"layout changed ({ckpt.layout} -> {_layout(ctx, 0)})"
            )
            print(
                f"[checkpoint] {why}: random streams re-seeded from the seed and step", flush=True
            )
    return run


def _saved_rng(ckpt: io.Checkpoint, ctx: ParallelContext) -> dict[str, Any] | None:
    # Each rank reads its own file; a refusal on one rank stops every rank with its message
    # (the others would otherwise wait in the first collective).
    state, problem = None, None
    try:
        state = ckpt.rng(ctx.rank)
    except io.CheckpointError as e:
        problem = str(e)
    problems: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(problems, problem)
    found = [p for p in problems if p is not None]
    if found:
        raise io.CheckpointError(found[0] + (f" (and {len(found) - 1} more)" if found[1:] else ""))
    return state


def engine_state(engine: Any) -> dict[str, Any]:
    """The engine's counters a resumed run must continue from (for run_state.json)."""
    return {
        "optimizer_step": optimizer_step(engine),
        "skipped_steps": engine.skipped_steps,
        "loss_scaler": loss_scaler_state(engine),
    }


def _loss_scaler(engine: Any) -> Any:
    # ZeRO's optimizers hold a `loss_scaler`; DeepSpeed's ZeRO-0 16-bit one a `loss_scale_config`.
    opt = engine.optimizer
    return getattr(opt, "loss_scaler", None) or getattr(opt, "loss_scale_config", None)


def loss_scaler_state(engine: Any) -> dict[str, Any] | None:
    # The dynamic loss scale and its counters (fp16; static 1.0 in bf16, absent in fp32).
    scaler = _loss_scaler(engine)
    if scaler is None:
        return None
    keys = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
    return {
        k: getattr(scaler, k) for k in keys if isinstance(getattr(scaler, k, None), int | float)
    }
