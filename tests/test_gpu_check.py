"""bench/gpu_check.sh --dry-run: the prepared GPU run's six steps, on CPU ranks with tiny shapes,
so that the one GPU run a task may get cannot fail for a reason a CPU could have shown."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_reports_every_step(tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert list(steps) == ["build", "tests", "kernels", "model", "pretrain", "multi"]
    summaries = {name: s["summary"] for name, s in steps.items()}
    assert all(s["status"] == "ok" for s in steps.values()), summaries
    # 1: the dispatch answers for every mode, and on CPU says why ours cannot run.
    assert set(steps["build"]["dispatch"]) == {"auto", "ours", "torch"}
    assert steps["build"]["dispatch"]["auto"].startswith("torch: ")
    # 3, 4: torch's figures are there, ours say why not.
    kernels = steps["kernels"]["result"]
    assert kernels["ours_unavailable"] and kernels["measured"] == []
    assert {r["bench"] for r in kernels["rows"]} == {"norm", "attention"}
    assert all(r["ms"]["torch"]["fwd+bwd"] > 0 for r in kernels["rows"])
    assert [r["kernels"] for r in steps["model"]["result"]["runs"]] == ["torch", "ours"]
    # 5: saved at step 5, resumed, 10 steps, loss falling, bf16 summed in fp32 (ZeRO 1).
    pretrain = steps["pretrain"]["result"]
    assert pretrain["steps"] == list(range(1, 11))
    assert pretrain["saved_at_5"] and pretrain["resumed"] and pretrain["loss_falling"]
    assert pretrain["accumulation_dtype"] == "torch.float32"
    assert pretrain["optimizer"] == "BF16_Optimizer"
    # 6: tp=2 and dp=2 (gloo here) against one rank.
    assert set(steps["multi"]["max_rel_diff"]) == {"tp2", "dp2"}
    table = out.stdout[out.stdout.index("figures") :]  # the table after the step lines
    assert all(f" {name} " in table for name in steps)
