"""Real runs through the real entry points (launch/pretrain.sh, the sbatch script, mpiexec) on
tiny models and real shards, for the launch, Slurm and MPI tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_llm.launch import free_port
from tests.checkpoint_runs import overrides

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch/pretrain.sh"
SBATCH = REPO / "launch/slurm/pretrain.sbatch"
BIN = Path(sys.executable).parent


def run_args(run_dir: Path, shard, tokenizer: Path, *extra: str) -> list[str]:
    return overrides(
        str(run_dir),
        shard.prefix,
        str(tokenizer),
        "train.micro_batch_size=2",
        "eval.interval=0",
        *extra,
    )


def env(**extra: str) -> dict[str, str]:
    out = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "PYTHONUNBUFFERED": "1",
        "MASTER_PORT": str(free_port()),
    }
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MEGATRON_LLM_RELAUNCHED"):
        out.pop(name, None)
    return {**out, **extra}


def start(cmd: list[str], cwd: Path, environ: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(c) for c in cmd],
        cwd=cwd,
        env=environ,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        text = log.read_text()
        raise AssertionError(f"{proc.args[:3]} still running after {timeout} s:\n{text}") from None
    return log.read_text()


def run(cmd: list[str], cwd: Path, environ: dict[str, str], timeout: float = 300) -> str:
    log = cwd / f"run-{time.monotonic_ns()}.log"
    proc = start(cmd, cwd, environ, log)
    out = finish(proc, log, timeout)
    assert proc.returncode == 0, f"{cmd[:3]} failed ({proc.returncode}):\n{out}"
    return out


def wait_for(log: Path, text: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {log} after {timeout} s:\n{log.read_text()}")


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").open()]


def has_mpi() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return shutil.which("mpiexec", path=f"{BIN}:{os.environ['PATH']}") is not None


@pytest.fixture(scope="session")
def sbatch_run(tmp_path_factory, email_shard, bpe_model) -> tuple[Path, str]:
    """launch/slurm/pretrain.sbatch under bash with the variables of a one-node allocation:
    the deepspeed launcher on 2 CPU ranks, 4 steps. Also the 2-rank reference for MPI."""
    # Once per session, though each test module that imports this fixture gets its own copy.
    key = id(tmp_path_factory)
    if key not in _SBATCH_RUNS:
        _SBATCH_RUNS[key] = _sbatch_run(tmp_path_factory, email_shard, bpe_model)
    return _SBATCH_RUNS[key]


_SBATCH_RUNS: dict[int, tuple[Path, str]] = {}


def _sbatch_run(tmp_path_factory, email_shard, bpe_model) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("sbatch")
    run_dir = work / "run"
    environ = env(
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES="1",
        SLURM_NODEID="0",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_SUBMIT_DIR=str(work),
    )
    environ.pop("MASTER_ADDR", None)
    args = run_args(run_dir, email_shard, bpe_model, "parallel.dp=2", "train.steps=4")
    out = run(["bash", SBATCH, *args], work, environ)
    return run_dir, out
