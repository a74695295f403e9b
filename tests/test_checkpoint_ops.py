"""Checkpoints under operations: kill -9 during a save, SIGTERM / SIGUSR1 / time budget,
a corrupt latest, refused config drift, retention, and the CLI. Real single-rank runs of
``python -m megatron_llm.pretrain`` in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_llm.checkpoint import io
from megatron_llm.checkpoint.runtime import config_drift
from megatron_llm.launch import free_port
from tests.checkpoint_runs import overrides
from tests.data_fixtures import Shard


def _start(run_dir: Path, shard: Shard, bpe_model: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", PYTHONUNBUFFERED="1")
    argv = overrides(str(run_dir), shard.prefix, str(bpe_model), *extra)
    cmd = [sys.executable, "-m", "megatron_llm.pretrain", *argv]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _run(run_dir: Path, shard: Shard, bpe_model: Path, *extra: str) -> tuple[int, str]:
    proc = _start(run_dir, shard, bpe_model, *extra)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


def _wait_for(predicate, timeout: float = 120, interval: float = 0.0005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(interval)


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    ckpt_dir = tmp_path / "checkpoints"
    caught_mid_save = False
    for _ in range(5):  # kill until one kill lands inside a save
        proc = _start(
            tmp_path, email_shard, bpe_model, "train.steps=100000", "checkpoint.save_interval=1"
        )
        try:
            _wait_for(
                lambda: (
                    io.read_latest(ckpt_dir) is not None
                    and any(ckpt_dir.glob(f"{io.TMP_PREFIX}{io.TAG_PREFIX}*"))
                )
            )
        finally:
            proc.kill()  # SIGKILL
            proc.communicate()
        if any(ckpt_dir.glob(f"{io.TMP_PREFIX}{io.TAG_PREFIX}*")):
            caught_mid_save = True
            break
    assert caught_mid_save, "no kill landed inside a save in 5 tries"
    latest = ckpt_dir / io.read_latest(ckpt_dir)
    assert io.Checkpoint.open(latest).problems(checksums=True) == []
    step = io.Checkpoint.open(latest).step
    code, out = _run(tmp_path, email_shard, bpe_model, f"train.steps={step + 1}")
    assert code == 0, out
    assert f"resumed from {latest} at step {step}" in out
    assert not any(ckpt_dir.glob(f"{io.TMP_PREFIX}{io.TAG_PREFIX}*"))  # the next save cleaned up


@pytest.mark.parametrize("how", ["SIGTERM", "SIGUSR1", "budget"])
def test_preemption_saves_and_exits_zero(
    tmp_path: Path, email_shard: Shard, bpe_model: Path, how: str
) -> None:
    extra = ["train.exit_after_minutes=0.05"] if how == "budget" else []
    proc = _start(tmp_path, email_shard, bpe_model, "train.steps=100000", *extra)
    metrics = tmp_path / "metrics.jsonl"
    if how != "budget":
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
        proc.send_signal(getattr(signal, how))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    last_step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert io.read_latest(tmp_path / "checkpoints") == io.tag_for(last_step)
    assert "stopped early" in out
    assert (f"signal {how}" if how != "budget" else "time budget") in out


def test_corrupt_latest_falls_back_and_drift_is_refused(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    code, out = _run(
        tmp_path, email_shard, bpe_model, "train.steps=4", "checkpoint.save_interval=2"
    )
    assert code == 0, out
    ckpt_dir = tmp_path / "checkpoints"
    cli = [sys.executable, "-m", "megatron_llm.checkpoint"]
    listing = subprocess.run(
        [*cli, "list", str(ckpt_dir), "--json"], capture_output=True, text=True
    )
    assert [r["step"] for r in json.loads(listing.stdout)] == [2, 4]
    # Flip one byte of the newest checkpoint's weights: verify names the file and fails.
    weights = ckpt_dir / "global_step4/model-00000.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    verify = subprocess.run([*cli, "verify", str(ckpt_dir)], capture_output=True, text=True)
    assert verify.returncode == 1 and "global_step4/model-00000.pt" in verify.stdout
    ok = subprocess.run(
        [*cli, "verify", str(ckpt_dir), "--step", "2"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout
    # An unsafe change is refused, naming the field, before anything is loaded or written.
    code, out = _run(tmp_path, email_shard, bpe_model, "train.steps=6", "model.hidden_size=64")
    assert code == 2 and "model.hidden_size: 32 -> 64" in out, out
    # auto resume skips the corrupt step 4 with a warning and continues from step 2.
    code, out = _run(tmp_path, email_shard, bpe_model, "train.steps=6", "optim.lr=5e-3")
    assert code == 0, out
    assert "global_step4 is not loadable" in out and "sha256" in out
    assert f"resumed from {ckpt_dir / 'global_step2'} at step 2" in out
    assert "optim.lr: 0.01 -> 0.005" in out  # a safe change, logged


def test_config_drift_rules() -> None:
    saved = {"model": {"hidden_size": 32, "kernels": "auto"}, "train": {"steps": 10, "seed": 1}}
    unsafe, safe = config_drift(
        saved, {"model": {"hidden_size": 64, "kernels": "torch"}, "train": {"steps": 20, "seed": 2}}
    )
    assert unsafe == ["model.hidden_size: 32 -> 64", "train.seed: 1 -> 2"]
    assert safe == ["model.kernels: 'auto' -> 'torch'", "train.steps: 10 -> 20"]


def test_retention_keeps_the_last_n_and_every_kth(tmp_path: Path) -> None:
    for step in range(1, 11):
        (tmp_path / io.tag_for(step)).mkdir()
    io.write_atomic(tmp_path / "latest", io.tag_for(10) + "\n")
    io.prune(tmp_path, keep_last=3, keep_every=4)
    assert sorted(io.step_of(p) for p in tmp_path.iterdir() if io.step_of(p)) == [4, 8, 9, 10]
