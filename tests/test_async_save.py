"""Asynchronous checkpoint saves (checkpoint.async_save): the loop trains on while a save is
written; its snapshot is the state at the save's step; a failed background write stops every
rank at the next step boundary with the one-line error; kill -9 during a background write
leaves the previous checkpoint valid. Real loops on gloo ranks, real files; the background
writer is held with an event at a hook, never timed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from megatron_llm.checkpoint import io
from megatron_llm.hashing import CHUNKED, file_digest
from megatron_llm.launch import free_port
from tests.checkpoint_runs import overrides
from tests.data_fixtures import Shard
from tests.distributed import run_on_ranks
from tests.test_faults import _mount_tmpfs

COMMON = ["parallel.dp=2", "train.micro_batch_size=2", "checkpoint.keep_last=0"]


def _held_writer(argv: list[str]) -> dict[str, Any]:
    """Train 4 steps saving at step 2; the background writer of step 2 is held at the hook until
    step 3 has finished: returns whether the loop finished step 3 while the writer was held."""
    import megatron_llm.checkpoint.runtime as ckpt_run
    import megatron_llm.training.loop as loop
    from tests.checkpoint_runs import train_run

    holding, released = threading.Event(), threading.Event()
    seen: dict[str, Any] = {"step3_during_write": False}

    def hold(snap: Any) -> None:
        if snap.step == 2:
            holding.set()
            seen["writer_released"] = released.wait(timeout=60)
            holding.clear()

    real_step = loop.measured_step

    def observed(run: Any, batches: Any, monitor: Any, log: Any, step: int) -> Any:
        out = real_step(run, batches, monitor, log, step)
        if step == 3:  # step 3 is done: the writer of step 2 must be (or get) held, unreleased
            seen["step3_during_write"] = holding.wait(timeout=60)
            released.set()
        return out

    ckpt_run.before_write, loop.measured_step = hold, observed
    try:
        summary = train_run(argv)
    finally:
        ckpt_run.before_write, loop.measured_step = None, real_step
    return {**seen, "losses": summary["losses"]}


def _synchronous(argv: list[str]) -> dict[str, Any]:
    from tests.checkpoint_runs import train_run

    return {"losses": train_run(argv)["losses"]}


def _runs(items: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
    import torch.distributed as dist

    kinds = {"held": _held_writer, "sync": _synchronous, "failing": _failing_write}
    out = []
    for kind, argv in items:
        out.append(kinds[kind](argv))
        dist.barrier()
    return out


def _failing_write(argv: list[str]) -> dict[str, Any]:
    """Steps 1-8 saving every 2 steps on a full disk; step 5 does not end until the failing
    background save of step 4 has finished, so the failure must stop the run at step 5's
    boundary (not at the next save)."""
    import megatron_llm.training.loop as loop
    from megatron_llm.checkpoint.runtime import SaveFailed
    from tests.checkpoint_runs import train_run

    steps: list[int] = []
    real_step = loop.measured_step

    def observed(run: Any, batches: Any, monitor: Any, log: Any, step: int) -> Any:
        out = real_step(run, batches, monitor, log, step)
        steps.append(step)
        if step == 5 and run.saver._thread is not None:
            run.saver._thread.join(timeout=120)  # the save of step 4 is over (it failed)
        return out

    loop.measured_step = observed
    try:
        train_run(argv)
        error = None
    except SaveFailed as e:
        error = str(e)
    finally:
        loop.measured_step = real_step
    return {"error": error, "steps": steps}


def test_the_loop_trains_on_while_the_save_is_written_and_saves_the_step_state(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    """dp=2, ZeRO 0 fp32 (the snapshot of a CPU rank must be a copy, not the live tensors):
    the async checkpoint of step 2, written after step 3 ran, equals the synchronous one."""
    args = [*COMMON, "train.steps=4", "checkpoint.save_interval=2"]
    held = overrides(str(tmp_path / "async"), email_shard.prefix, str(bpe_model), *args)
    sync = overrides(str(tmp_path / "sync"), email_shard.prefix, str(bpe_model), *args)
    sync.append("checkpoint.async_save=false")
    per_rank = run_on_ranks(2, _runs, [("held", held), ("sync", sync)])
    for rank in per_rank:
        held_result, sync_result = rank
        assert held_result["step3_during_write"], held_result
        assert held_result["writer_released"], held_result
        assert held_result["losses"] == sync_result["losses"]  # bitwise
    ours = io.Checkpoint.open(tmp_path / "async/checkpoints/global_step2")
    theirs = io.Checkpoint.open(tmp_path / "sync/checkpoints/global_step2")
    assert ours.problems(checksums=True) == []
    assert io.read_latest(tmp_path / "async/checkpoints") == "global_step4"  # saved at 4 too
    a, b = ours.tensors(optimizer=True), theirs.tensors(optimizer=True)
    assert sorted(a) == sorted(b)
    for name in a:
        for kind in a[name]:
            assert torch.equal(a[name][kind], b[name][kind]), (name, kind)
    assert ours.rng(0)["torch"].equal(theirs.rng(0)["torch"])


def test_a_failing_background_write_stops_every_rank_at_the_next_step(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    full = tmp_path / "full"
    _mount_tmpfs(full, "700k")  # room for one checkpoint of the tiny model
    try:
        argv = overrides(str(tmp_path / "run"), email_shard.prefix, str(bpe_model), *COMMON)
        argv += ["train.steps=8", "checkpoint.save_interval=2", f"checkpoint.dir={full}/ckpt"]
        per_rank = run_on_ranks(2, _runs, [("failing", argv)])
        listing = sorted(p.name for p in (full / "ckpt").iterdir())
        problems = io.Checkpoint.open(full / "ckpt/global_step2").problems(checksums=True)
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)
    results = [rank[0] for rank in per_rank]
    print(results[0]["error"])
    assert len({r["error"] for r in results}) == 1  # the same line on every rank
    error = results[0]["error"]
    assert error.startswith("checkpoint of step 4 not saved: "), error
    assert "cannot write (ENOSPC: No space left on device)" in error and "\n" not in error
    assert all(r["steps"] == [1, 2, 3, 4, 5] for r in results), results  # stopped at step 5
    assert listing == ["global_step2", "latest"] and problems == []


HELD_RUN = """
import sys, time
from pathlib import Path
import megatron_llm.checkpoint.runtime as ckpt_run

def hold(snap):
    if snap.step == 3:  # the writer of step 3 stops inside its temporary folder, for good
        (snap.root.parent / "writer_held").write_text("")
        time.sleep(3600)

ckpt_run.before_write = hold
from megatron_llm.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_a_background_write_leaves_the_previous_checkpoint_valid(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", PYTHONUNBUFFERED="1")
    argv = overrides(str(tmp_path), email_shard.prefix, str(bpe_model), "train.steps=6")
    argv.append("checkpoint.save_interval=1")
    proc = subprocess.Popen(
        [sys.executable, "-c", HELD_RUN, *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ckpt_dir, metrics = tmp_path / "checkpoints", tmp_path / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 240
        # Held in step 3's save while the loop trains on: step 4 is logged (its save then waits).
        while not (
            (tmp_path / "writer_held").exists()
            and metrics.exists()
            and '"step": 4' in _text(metrics)
        ):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, out
    assert any(ckpt_dir.glob(f"{io.TMP_PREFIX}{io.TAG_PREFIX}3-*"))  # killed mid-save
    assert io.read_latest(ckpt_dir) == "global_step2"
    from megatron_llm.checkpoint.__main__ import main as ckpt_cli

    assert ckpt_cli(["verify", str(ckpt_dir)]) == 0
    env["MASTER_PORT"] = str(free_port())
    done = subprocess.run(
        [sys.executable, "-m", "megatron_llm.pretrain", *argv[:-1], "train.steps=3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {ckpt_dir / 'global_step2'} at step 2" in done.stdout
    assert not any(ckpt_dir.glob(f"{io.TMP_PREFIX}{io.TAG_PREFIX}*"))  # the next save cleaned up


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def test_the_sha256_taken_while_writing_is_the_files(tmp_path: Path) -> None:
    """Large buffers are hashed on helper threads while written, small ones inline: the
    manifest entries must equal a separate read of each file (what verify does)."""
    writer = io.FolderWriter(tmp_path)
    big = torch.randn(3 << 20, generator=torch.Generator().manual_seed(0))  # 12 MB: helper thread
    writer.tensors("model-00000.pt", {"big": big, "small": torch.ones(3)})
    writer.text("run_state.json", '{"step": 1, "note": "é"}\n')
    entries = writer.entries()
    assert sorted(entries) == ["model-00000.pt", "run_state.json"]
    for name, entry in entries.items():
        path = tmp_path / name
        digest = file_digest(path, CHUNKED)
        assert entry == {"bytes": path.stat().st_size, "algorithm": CHUNKED, "digest": digest}
    assert torch.equal(io.load_tensors(tmp_path / "model-00000.pt")["big"], big)
