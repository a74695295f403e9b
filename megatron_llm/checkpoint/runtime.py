"""Saving and resuming inside a running job: collective calls every rank makes together."""

from __future__ import annotations

import dataclasses
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
from megatron_llm.checkpoint import io, rng, shards
from megatron_llm.checkpoint.state import OPTIM_KEYS, held_fragments, optimizer_step, restore_state
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


def _broadcast(obj: Any, group: dist.ProcessGroup | None = None) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _layout(ctx: ParallelContext, zero_stage: int) -> dict[str, int]:
    return {
        "tp": ctx.tp,
        "pp": ctx.pp,
        "dp": ctx.dp,
        "world_size": ctx.world_size,
        "zero": zero_stage,
    }


@dataclasses.dataclass
class Snapshot:
    """One rank's part of a checkpoint, in host memory: all a writer needs, nothing live."""

    root: Path
    step: int
    weights: dict[str, torch.Tensor]  # name -> the 1-d elements this rank writes
    optim: dict[str, dict[str, torch.Tensor]]  # name -> {moment: the same elements of it}
    index: dict[str, Any]  # name -> {"shape", "pieces"}: where those elements go (shards.py)
    rng: dict[str, Any]
    run_state: dict[str, Any]
    config: dict[str, Any]
    layout: dict[str, int]
    keep_last: int
    keep_every: int


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A synchronous save's host tensor of exactly these elements: torch.save of a view
    writes its whole storage (a flat ZeRO partition), so a view is copied; a CPU tensor that
    is its whole storage (ZeRO 0) is written as it is (the loop waits for the write)."""
    t = t.detach()
    whole = t.is_contiguous() and t.storage_offset() == 0
    if t.device.type == "cpu" and whole and t.untyped_storage().nbytes() == t.nbytes:
        return t
    return t.to("cpu", copy=True)


def _elements(fragment: torch.Tensor, ranges: shards.Ranges, first: int) -> torch.Tensor:
    # The ranges' elements of a fragment starting at element ``first`` of its box: a view when
    # one range (almost always), else one tensor of them all.
    parts = [fragment[start - first : stop - first].float() for start, stop in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def write_plan(
    engine: Any, ctx: ParallelContext, names: dict[str, str] | None = None
) -> dict[str, shards.Ranges]:
    """{name: the flat ranges of its box this rank writes} (collective: every rank's fragments
    are gathered, as metadata only). Fixed for a run: a Saver computes it once."""
    mine = [held for held, _ in held_fragments(engine, ctx, names)]
    return shards.assign(_all(ctx, mine), ctx.rank)


def snapshot(
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
    to_host: Callable[[torch.Tensor], torch.Tensor] = _host_copy,
    plan: dict[str, shards.Ranges] | None = None,
) -> Snapshot:
    """Copy this rank's share of the checkpoint to host memory: the elements :func:`write_plan`
    (or ``plan``, its result) gives it, nothing gathered. Collective only without ``plan``."""
    plan = write_plan(engine, ctx, names) if plan is None else plan
    model_file = f"model-{ctx.rank:05d}.pt"
    weights: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    index: dict[str, Any] = {}
    for held, fetch in held_fragments(engine, ctx, names):
        if held.name not in plan:
            continue
        ranges = plan[held.name]
        weights[held.name] = to_host(_elements(fetch(None), ranges, held.start))
        optim[held.name] = {k: to_host(_elements(fetch(k), ranges, held.start)) for k in OPTIM_KEYS}
        pieces = shards.pieces_of(held, ranges, model_file)
        index[held.name] = {"shape": list(held.shape), "pieces": pieces}
    if ctx.device.type == "cuda":
        torch.cuda.current_stream(ctx.device).synchronize()  # the non-blocking copies landed
    return Snapshot(
        root=Path(root),
        step=step,
        weights=weights,
        optim=optim,
        index=index,
        # Cloned: a stream's state may be a live tensor that the next step advances.
        rng=_cloned(rng.capture(model)),
        run_state=run_state,
        config=config,
        layout=_layout(ctx, engine.zero_optimization_stage()),
        keep_last=keep_last,
        keep_every=keep_every,
    )


def save(engine: Any, model: nn.Module, ctx: ParallelContext, **kwargs: Any) -> Path:
    """Save a complete checkpoint atomically, waiting for all of it; every rank calls this.
    Keywords: those of :func:`snapshot`. Raises :class:`SaveFailed` as :func:`write` does."""
    return write(snapshot(engine, model, ctx, **kwargs), ctx)


def write(snap: Snapshot, ctx: ParallelContext, group: dist.ProcessGroup | None = None) -> Path:
    """Write, checksum, fsync and publish a snapshot; every rank calls this (collective over
    ``group``, the default group when None: a background writer passes its own).

    Raises :class:`SaveFailed` on every rank, with nothing published and the temporary folder
    removed, when any rank's weights are not finite or any file cannot be written (full disk,
    read-only file system): earlier checkpoints and ``latest`` stay as they were.
    """
    step, root_path = snap.step, snap.root
    bad = [n for part in _all(ctx, non_finite(snap.weights, snap.optim), group) for n in part]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SaveFailed(
            f"checkpoint of step {step} not saved: non-finite values (nan or inf) in "
            f"{', '.join(bad[:3])}{more}; the run diverged: resume from the last checkpoint "
            f"in {root_path} (--resume auto) with a lower optim.lr, or skip the data"
        )
    tmp, error = None, None
    if ctx.rank == 0:
        try:
            tmp = io.new_tmp_dir(root_path, step)
        except OSError as e:
            error = str(write_failed(e.filename or root_path, e))
    tmp, error = _broadcast((tmp, error), group)
    if error:
        raise SaveFailed(f"checkpoint of step {step} not saved: {error}")
    entries, mine, error = _write_files(io.FolderWriter(tmp), snap, ctx)
    pieces = _all(ctx, (entries, mine, error), group)
    index: dict[str, Any] = {}
    errors = [part[2] for part in pieces if part[2]]
    final = None
    if ctx.rank == 0 and not errors:
        files: dict[str, Any] = {}
        for part_files, part_index, _ in pieces:
            files.update(part_files)
            for name, entry in part_index.items():  # a tensor's pieces come from many ranks
                merged = index.setdefault(name, {"shape": entry["shape"], "pieces": []})
                merged["pieces"] += entry["pieces"]
        try:
            final = io.finish(
                tmp,
                root_path,
                step=step,
                layout=snap.layout,
                optimizer=True,
                tensors=index,
                files=files,
            )
        except OSError as e:
            errors.append(str(write_failed(e.filename or tmp, e)))
        except WriteFailed as e:
            errors.append(str(e))
        else:
            io.prune(root_path, keep_last=snap.keep_last, keep_every=snap.keep_every)
    if ctx.rank == 0 and errors:
        shutil.rmtree(tmp, ignore_errors=True)
    final, errors = _broadcast((str(final) if final else None, errors), group)
    if errors:
        raise SaveFailed(f"checkpoint of step {step} not saved: {errors[0]}")
    return Path(final)


# A test's hook: called by the writer before its first file (tests/test_async_save.py holds the
# background writer there, deterministically, while the training loop goes on).
before_write: Callable[[Snapshot], None] | None = None


def _write_files(
    writer: io.FolderWriter, snap: Snapshot, ctx: ParallelContext
) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """This rank's files: (manifest entries, tensor index, the one-line error or None)."""
    if before_write is not None:
        before_write(snap)
    index: dict[str, Any] = {}
    try:
        if snap.weights:
            model_file, optim_file = f"model-{ctx.rank:05d}.pt", f"optim-{ctx.rank:05d}.pt"
            writer.tensors(model_file, snap.weights)
            writer.tensors(optim_file, snap.optim)
            index = snap.index
        writer.tensors(f"rng-{ctx.rank:05d}.pt", snap.rng)
        if ctx.rank == 0:
            writer.text("run_state.json", json.dumps(snap.run_state, indent=2) + "\n")
            writer.text("config.yaml", yaml.safe_dump(snap.config, sort_keys=False))
        return writer.entries(), index, None
    except WriteFailed as e:  # the other ranks learn it, and nobody publishes
        writer.close()
        return {}, {}, str(e)


def _cloned(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _cloned(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cloned(v) for v in obj)
    return obj


class SaveFailed(io.CheckpointError):
    """A checkpoint that was not saved (full disk, non-finite weights); earlier ones intact.
    The same one-line message on every rank."""


def non_finite(
    weights: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]]
) -> list[str]:
    """Names of the tensors holding nan or inf: a diverged run must not publish them."""
    bad = [name for name, t in weights.items() if not _finite(t)]
    for name, states in optim.items():
        bad += [f"{name} ({key})" for key, t in states.items() if not _finite(t)]
    return bad


def _finite(t: torch.Tensor) -> bool:
    # min and max are finite iff every value is (nan propagates through both): one reduction
    # pass and no tensor-sized mask (isfinite().all() took as long as writing the file).
    if not t.is_floating_point() or t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) & torch.isfinite(high))  # one host sync per tensor


def _all(ctx: ParallelContext, mine: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    pieces: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(pieces, mine, group=group)
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
        restore_state(engine, ctx, tensors, 0, names, with_optimizer=False)
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
    found = [p for p in _all(ctx, problem) if p is not None]
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
