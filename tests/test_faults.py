"""Faults on the run side (issue 14): each either works or fails with one line, exits non-zero
and leaves earlier outputs intact. Real launches (launch/pretrain.sh), real files, real
file systems (a full tmpfs where we may mount one)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_llm.checkpoint.lock import LOCK_NAME, DirLock, LockHeld
from tests import cluster_runs
from tests.cluster_runs import PRETRAIN, run_args

# ---------------------------------------------------------------------------------------------
# One run per checkpoint dir; kill -9 of the launcher. One set of real launches serves both.


def _job(launcher: int) -> list[psutil.Process]:
    """Every process below the launcher: deepspeed runner, deepspeed launch, the ranks."""
    try:
        return psutil.Process(launcher).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, email_shard, bpe_model) -> dict:
    """Run A trains (dp=2, no checkpoint until its end); run B starts on the same checkpoint
    dir and must be refused; then A's launcher gets kill -9; run C then starts on the dir."""
    work = tmp_path_factory.mktemp("two_runs")
    run_dir = work / "a"
    a_args = run_args(run_dir, email_shard, bpe_model, "parallel.dp=2", "train.steps=100000")
    a_log = work / "a.log"
    a = cluster_runs.start(["bash", PRETRAIN, *a_args], work, cluster_runs.env(), a_log)
    cluster_runs.wait_for(a_log, "step      2 |")
    holder = json.loads((run_dir / "checkpoints" / LOCK_NAME).read_text())
    # B: the same checkpoint dir, another logging dir and seed.
    b_args = [*run_args(work / "b", email_shard, bpe_model, "train.seed=8", "train.steps=2")]
    b_args.append(f"checkpoint.dir={run_dir}/checkpoints")
    b_log = work / "b.log"
    b = cluster_runs.start(["bash", PRETRAIN, *b_args], work, cluster_runs.env(), b_log)
    b_out = cluster_runs.finish(b, b_log, timeout=240)
    a_still_running = a.poll() is None
    job = _job(a.pid)
    killed_at = time.monotonic()
    os.kill(a.pid, signal.SIGKILL)  # the process the user started: bash exec'd into launch.py
    a.wait()
    left = _alive(job)
    while left and time.monotonic() - killed_at < 60:
        time.sleep(0.2)
        left = _alive(job)
    seconds = time.monotonic() - killed_at
    time.sleep(2)  # anything still writing would show
    ckpts = run_dir / "checkpoints"
    saved = sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(LOCK_NAME))
    # C: the lock's holder is gone; C takes it over and finishes.
    c_args = [*run_args(work / "c", email_shard, bpe_model, "train.steps=2")]
    c_args.append(f"checkpoint.dir={run_dir}/checkpoints")
    c_log = work / "c.log"
    c = cluster_runs.start(["bash", PRETRAIN, *c_args], work, cluster_runs.env(), c_log)
    c_out = cluster_runs.finish(c, c_log, timeout=240)
    return {
        "run_dir": run_dir,
        "holder": holder,
        "b": (b.returncode, b_out),
        "a_still_running": a_still_running,
        "job": [p.pid for p in job],
        "left": [p.pid for p in left],
        "seconds_to_stop": seconds,
        "saved_after_kill": saved,
        "a_log": a_log.read_text(),
        "c": (c.returncode, c_out),
    }


@pytest.mark.slow
def test_a_second_run_on_the_same_checkpoint_dir_is_refused_naming_the_holder(two_runs):
    code, out = two_runs["b"]
    holder = two_runs["holder"]
    assert code == 2, out
    assert holder["host"] == socket.gethostname()
    refusals = [line for line in out.splitlines() if line.startswith("error: checkpoint dir")]
    assert len(refusals) == 1, out
    assert f"a run on host {holder['host']} (pid {holder['pid']}" in refusals[0]
    assert two_runs["a_still_running"]  # the refused run did not disturb the holder


@pytest.mark.slow
def test_kill_9_of_the_launcher_stops_every_rank_without_a_checkpoint(two_runs):
    assert len(two_runs["job"]) >= 4, two_runs["job"]  # runner, launch, 2 ranks
    assert two_runs["left"] == [], f"still running: {two_runs['left']}"
    print(f"every process of the job gone {two_runs['seconds_to_stop']:.1f} s after kill -9")
    assert two_runs["seconds_to_stop"] < 15, two_runs["seconds_to_stop"]
    assert "SIGTERM received" not in two_runs["a_log"]  # not asked to save...
    assert two_runs["saved_after_kill"] == []  # ...and nothing saved, not even a temporary


@pytest.mark.slow
def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_warning(two_runs):
    code, out = two_runs["c"]
    assert code == 0, out
    pid = two_runs["holder"]["pid"]
    assert f"taking over the lock of a run on host {socket.gethostname()} (pid {pid}" in out
    assert f"pid {pid} is not running" in out
    ckpts = two_runs["run_dir"] / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "global_step2"
    assert not (ckpts / LOCK_NAME).exists()  # released at the end


# ---------------------------------------------------------------------------------------------
# The lock itself, on real files: holders on other hosts, stale heartbeats, release.


def _plant(folder: Path, age_s: float, **holder: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"run_id": "x", "started": "then", **holder}))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_a_live_holder_on_another_host_is_never_judged_by_local_pids(tmp_path):
    # pid 1 of another host: our own pid 1 says nothing about it; only its heartbeat counts.
    _plant(tmp_path, age_s=5, host="node-elsewhere", boot_id="b", pid=999999, pid_start=1.0)
    with pytest.raises(LockHeld, match="a run on host node-elsewhere \\(pid 999999"):
        DirLock.acquire(tmp_path, stale_after_s=60)


def test_a_holder_without_heartbeat_is_taken_over(tmp_path, capsys):
    _plant(tmp_path, age_s=120, host="node-elsewhere", boot_id="b", pid=1, pid_start=1.0)
    lock = DirLock.acquire(tmp_path, stale_after_s=60)
    try:
        assert "no heartbeat for 120 s (more than 60 s)" in capsys.readouterr().err
        assert lock.holds()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_reused_pid_on_this_host_is_not_the_holder(tmp_path):
    from megatron_llm.cluster.supervise import created

    # Our own pid, but another start time: the holder was an earlier process with this pid.
    me = json.loads(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    _plant(tmp_path, age_s=1, boot_id=boot, pid_start=(created(os.getpid()) or 0) - 5, **me)
    DirLock.acquire(tmp_path, stale_after_s=60).release()


def test_the_heartbeat_keeps_a_long_run_from_being_taken_over(tmp_path):
    lock = DirLock.acquire(tmp_path, stale_after_s=3)  # beats every 0.5 s
    try:
        time.sleep(4)
        with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
            DirLock.acquire(tmp_path, stale_after_s=3)
    finally:
        lock.release()


def test_only_one_of_many_simultaneous_starters_gets_the_lock(tmp_path):
    code = (
        "import sys, time\n"
        "from megatron_llm.checkpoint.lock import DirLock, LockHeld\n"
        "time.sleep(float(sys.argv[2]) - time.time())\n"
        "try:\n"
        "    DirLock.acquire(sys.argv[1]); print('got'); time.sleep(3)\n"
        "except LockHeld:\n"
        "    print('refused')\n"
    )
    at = str(time.time() + 3)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path), at], stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["got"] + ["refused"] * 5, outs


# ---------------------------------------------------------------------------------------------
# Non-finite settings.


@pytest.mark.parametrize(
    "override", ["optim.lr=inf", "optim.grad_clip=nan", "optim.beta2=-inf", "model.rope_theta=nan"]
)
def test_non_finite_settings_are_refused_naming_the_field(override):
    from megatron_llm.config import ConfigError, load_config

    field, value = override.split("=")
    with pytest.raises(ConfigError, match=f"{field}={value}: not a finite number"):
        load_config(None, [override])


# ---------------------------------------------------------------------------------------------
# Saves that must not happen (non-finite weights) or cannot (a full disk): nothing published,
# no temporary left, earlier checkpoints intact. Real runs on 2 gloo ranks.


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")


@pytest.fixture(scope="module")
def refused_saves(tmp_path_factory, email_shard, bpe_model) -> dict:
    """Two runs on the same spawned ranks (dp=2): one diverging (optim.lr=1e30, weights become
    nan by its last step); one with its checkpoint dir on a tmpfs with room for one checkpoint
    (saves at steps 2 and 4)."""
    from tests.checkpoint_runs import overrides
    from tests.distributed import run_on_ranks

    work = tmp_path_factory.mktemp("refused_saves")
    full = work / "full"
    _mount_tmpfs(full, "700k")
    try:
        common = ["parallel.dp=2", "train.micro_batch_size=2", "checkpoint.keep_last=0"]
        diverging = overrides(str(work / "nan"), email_shard.prefix, str(bpe_model), *common)
        diverging += ["optim.lr=1e30", "optim.warmup_steps=0", "train.steps=3"]
        diverging += ["train.max_bad_steps=0", "checkpoint.save_interval=1"]
        disk = overrides(str(work / "disk"), email_shard.prefix, str(bpe_model), *common)
        disk += ["train.steps=4", "checkpoint.save_interval=2", f"checkpoint.dir={full}/ckpt"]
        runs = [diverging, disk]
        per_rank = run_on_ranks(2, _runs, runs)
        listing = sorted(p.name for p in (full / "ckpt").iterdir())
        from megatron_llm.checkpoint import io

        ckpt = io.Checkpoint.open(full / "ckpt/global_step2")
        problems = ckpt.problems(checksums=True)
        latest = io.read_latest(full / "ckpt")
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)
    return {
        "nan": [r[0] for r in per_rank],
        "nan_dir": work / "nan/checkpoints",
        "disk": [r[1] for r in per_rank],
        "disk_listing": listing,
        "disk_problems": problems,
        "disk_latest": latest,
    }


def _runs(runs: list[list[str]]) -> list[dict]:
    import torch.distributed as dist

    from tests.checkpoint_runs import train_or_refusal

    out = []
    for argv in runs:
        out.append(train_or_refusal(argv))
        dist.barrier()
    return out


def test_a_diverged_run_never_publishes_non_finite_weights(refused_saves):
    results, root = refused_saves["nan"], refused_saves["nan_dir"]
    assert all(r.get("type") == "SaveFailed" for r in results), results
    assert len({r["error"] for r in results}) == 1  # the same one line on every rank
    error = results[0]["error"]
    assert "not saved: non-finite values (nan or inf) in" in error and "\n" not in error
    saved = sorted(p.name for p in root.iterdir())
    print(error, saved)
    assert "global_step1" in saved  # step 1's weights were finite and saved
    # Saved while finite, refused once not: never a published nan checkpoint, no temporary.
    from megatron_llm.checkpoint import io

    for name in saved:
        assert not name.startswith(io.TMP_PREFIX), saved
        if name.startswith(io.TAG_PREFIX):
            weights = io.Checkpoint.open(root / name).weights()
            assert all(bool(t.isfinite().all()) for t in weights.values()), name


def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(
    refused_saves,
):
    results = refused_saves["disk"]
    assert all(r.get("type") == "SaveFailed" for r in results), results
    error = results[0]["error"]
    print(error)
    assert error.startswith("checkpoint of step 4 not saved: "), error
    assert "cannot write (ENOSPC: No space left on device)" in error and "\n" not in error
    assert refused_saves["disk_listing"] == ["global_step2", "latest"]  # no temporaries
    assert refused_saves["disk_latest"] == "global_step2"
    assert refused_saves["disk_problems"] == []


# ---------------------------------------------------------------------------------------------
# Readers of a checkpoint verify it first (as resume does): eval, generate, export-hf.


@pytest.fixture(scope="module")
def corrupt_checkpoint(tmp_path_factory, bpe_model) -> Path:
    import torch

    from megatron_llm.checkpoint.__main__ import write_weights_only
    from megatron_llm.config import load_config
    from megatron_llm.model import GPT

    overrides = ["model.style=gpt2", "model.num_layers=1", "model.hidden_size=32"]
    overrides += ["model.num_heads=2", "model.seq_length=16", f"data.tokenizer={bpe_model}"]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("corrupt") / "ckpt"
    write_weights_only(root, dict(GPT(cfg.model, 512).state_dict()), cfg.to_dict())
    (model_file,) = root.glob("global_step0/model-*.pt")
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside the embedding's values: still loadable
    model_file.write_bytes(bytes(data))
    return root


def _reader(name: str):
    if name == "eval":
        from megatron_llm.eval.__main__ import main
    elif name == "generate":
        from megatron_llm.generate import main
    else:
        from megatron_llm.checkpoint.__main__ import main
    return main


READERS = {
    "eval": lambda ckpt, shard, out: [ckpt, "--data-prefix", shard, "--max-samples", "2"],
    "generate": lambda ckpt, shard, out: [ckpt, "--prompt", "def f(", "--max-new-tokens", "2"],
    "export-hf": lambda ckpt, shard, out: ["export-hf", ckpt, out],
}


@pytest.mark.parametrize("reader", list(READERS))
def test_readers_refuse_a_corrupt_checkpoint_in_one_line(
    reader, corrupt_checkpoint, small_shard, tmp_path, capsys
):
    main = _reader(reader)
    args = READERS[reader](str(corrupt_checkpoint), small_shard.prefix, str(tmp_path / "hf"))
    assert main(args) != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "global_step0 failed verification: " in lines[0]
    assert "model-00000.pt: sha256 differs from the manifest (corrupted)" in lines[0]
    assert not (tmp_path / "hf").exists()
    # For people who know what they are doing:
    assert main([*args, "--no-verify-checkpoint"]) == 0, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The one atomic writer (megatron_llm/atomic.py) on a full file system.


def test_the_atomic_writer_on_a_full_disk_keeps_the_old_file_and_no_temporary(tmp_path):
    from megatron_llm.atomic import WriteFailed, open_atomic, write_atomic

    full = tmp_path / "full"
    _mount_tmpfs(full, "64k")
    try:
        write_atomic(full / "manifest.json", "old\n")
        with pytest.raises(WriteFailed) as e:
            write_atomic(full / "manifest.json", b"x" * (1 << 20))
        message = str(e.value)
        assert message.startswith(f"{full}/manifest.json: cannot write (ENOSPC: ")
        assert "\n" not in message
        with pytest.raises(FileNotFoundError):  # the caller's own error passes through as is
            with open_atomic(full / "manifest.json", "w") as f:
                f.write("half")
                open(full / "missing")  # noqa: SIM115
        assert sorted(p.name for p in full.iterdir()) == ["manifest.json"]
        assert (full / "manifest.json").read_text() == "old\n"
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)


def test_export_hf_on_a_full_disk_is_one_line_and_leaves_nothing(
    corrupt_checkpoint, tmp_path, capsys
):
    # The weights do not fit (safetensors reports ENOSPC only in its message text): one line,
    # no staging folder, no half-written export.
    from megatron_llm.checkpoint.__main__ import main

    full = tmp_path / "full"
    _mount_tmpfs(full, "48k")
    try:
        args = ["export-hf", str(corrupt_checkpoint), str(full / "hf"), "--no-verify-checkpoint"]
        assert main(args) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error")]  # no progress bars
        assert "Traceback" not in err and len(lines) == 1, err
        assert lines[0].startswith(f"error: {full}/hf: cannot write (ENOSPC: ")
        assert list(full.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)
