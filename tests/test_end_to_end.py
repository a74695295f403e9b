"""The README's default run, shortened: the real scripts, launcher, ranks and files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_llm.launch import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SHORT = [
    "train.steps=60",
    "eval.interval=0",
    "eval.iters=4",
    "logging.interval=10",
    "optim.warmup_steps=10",
]


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    full_env["MASTER_PORT"] = str(free_port())  # never collide with another run's 29500
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[Path, str]:
    work = tmp_path_factory.mktemp("default_run")
    proc = run(
        ["bash", str(REPO / "launch/default_run.sh"), *SHORT], cwd=work, CORPUS_BYTES="3000000"
    )
    return work, proc.stdout + proc.stderr


def test_default_run_builds_data_and_trains_on_two_ranks(default_run):
    work, out = default_run
    data = work / "data/default"
    for name in (
        "stdlib.jsonl",
        "tokenizer.model",
        "stdlib_text_document.bin",
        "stdlib_text_document.idx",
    ):
        assert (data / name).stat().st_size > 0, name
    # The literal `deepspeed launch/pretrain.sh` starts one CPU rank; ours relaunches with 2.
    assert "relaunching" in out
    assert "world 2 = tp 1 x pp 1 x dp 2" in out


def test_default_run_loss_falls_and_reports(default_run):
    work, out = default_run
    summary = json.loads((work / "runs/default/summary.json").read_text())
    losses = summary["losses"]
    assert len(losses) == 60
    assert losses[-1] < losses[0] - 2.0, losses  # from ~ln(4096)=8.3 to well below
    assert 1.0 < summary["val_perplexity"] < 200
    assert summary["tokens_per_s"] > 0
    assert "run summary" in out and "perplexity" in out and "tokens/s" in out
    ckpt = Path(summary["checkpoint"])
    ckpt = ckpt if ckpt.is_absolute() else work / ckpt
    assert (ckpt / "run_state.json").exists() and (ckpt / "config.yaml").exists()
    assert json.loads((ckpt / "run_state.json").read_text())["step"] == 60
    assert (ckpt.parent / "latest").read_text().strip() == ckpt.name
    metrics = [json.loads(line) for line in (work / "runs/default/metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == list(range(1, 61))
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(metrics[9])


def test_rerun_reuses_data_and_bash_entry_works(default_run):
    work, _ = default_run
    before = {p.name: p.stat().st_mtime_ns for p in (work / "data/default").iterdir()}
    out = run(
        [
            "bash",
            str(REPO / "launch/default_run.sh"),
            "train.steps=3",
            "eval.iters=1",
            "checkpoint.save_at_end=false",
        ],
        cwd=work,
    ).stdout
    assert "reusing" in out
    after = {p.name: p.stat().st_mtime_ns for p in (work / "data/default").iterdir()}
    assert before == after
    # `bash launch/pretrain.sh` starts the launcher itself with the config's 2 ranks.
    out = run(
        [
            "bash",
            str(REPO / "launch/pretrain.sh"),
            str(REPO / "configs/default.yaml"),
            "train.steps=2",
            "eval.at_end=false",
            "checkpoint.save_at_end=false",
        ],
        cwd=work,
    ).stdout
    assert "starting the deepspeed launcher on 2 CPU ranks" in out
    assert "world 2 = tp 1 x pp 1 x dp 2" in out


def test_bad_override_fails_fast_with_the_field(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch/pretrain.sh"),
            str(REPO / "configs/default.yaml"),
            "train.stepz=3",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key 'train.stepz'; did you mean 'train.steps'?" in proc.stderr
