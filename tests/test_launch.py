import sys
from pathlib import Path

import pytest

from megatron_llm import launch
from tests.distributed import run_on_ranks


def test_launcher_command_on_cpu(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29999")
    cmd = launch.launcher_command("/r/launch/pretrain.sh", ["--local_rank=0", "c.yaml", "a.b=1"], 4)
    assert cmd == [
        sys.executable,
        "-u",
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "4",
        "--master_port",
        "29999",
        "/r/launch/pretrain.sh",
        "c.yaml",
        "a.b=1",
    ]


def test_ranks_needed_from_config():
    assert launch.ranks_needed(["parallel.dp=2", "parallel.tp=2", "model.num_heads=4"]) == 4
    assert launch.ranks_needed(["--local_rank=3"]) == 1  # dp derived: one rank per GPU


def _context_or_error(overrides: list[str]) -> str:
    from megatron_llm.config import load_config
    from megatron_llm.parallel.groups import build_context

    try:
        ctx = build_context(load_config(None, overrides).parallel)
    except ValueError as e:
        return str(e)
    return f"{ctx.tp_rank},{ctx.dp_rank},{ctx.pp_rank}"


def test_world_size_mismatch_fails_on_every_rank_with_factors():
    out = run_on_ranks(2, _context_or_error, ["parallel.dp=3"])
    for message in out:
        assert "world size 2 != tp (1) x pp (1) x dp (3)" in message


@pytest.mark.parametrize(
    "tp, pp, expected",
    [
        # rank order tp-dp-pp: tensor-parallel fastest
        (2, 1, ["0,0,0", "1,0,0", "0,1,0", "1,1,0"]),
        (1, 2, ["0,0,0", "0,1,0", "0,0,1", "0,1,1"]),
        (2, 2, ["0,0,0", "1,0,0", "0,0,1", "1,0,1"]),
    ],
)
def test_rank_order_tp_dp_pp(tp, pp, expected):
    out = run_on_ranks(
        4, _context_or_error, [f"parallel.tp={tp}", f"parallel.pp={pp}", "model.num_heads=4"]
    )
    assert out == expected


def _noop() -> int:
    import deepspeed.comm

    return int(deepspeed.comm.is_initialized())


def test_ranks_leave_no_shared_memory_behind():
    # DeepSpeed's CPU shm allreduce left ~67 MB per rank in /dev/shm after every run.
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*"))
    assert run_on_ranks(2, _noop) == [1, 1]  # DeepSpeed's comm backend did start
    assert set(shm.glob("deepspeed_allreduce_buffer_*")) - before == set()
