import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_llm import launch
from tests import cluster_runs
from tests.cluster_runs import PRETRAIN, losses, run_args
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
    # ZeRO 1: the stage pipelines run with (the layout alone is under test here).
    layout = [f"parallel.tp={tp}", f"parallel.pp={pp}", "parallel.zero_stage=1"]
    out = run_on_ranks(4, _context_or_error, [*layout, "model.num_heads=4"])
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


def test_launch_options_become_multinode_runner_flags(tmp_path, monkeypatch):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    argv = ["--hostfile", str(hostfile), "--node_rank=1", "--master_port", "6000", "c.yaml", "a=1"]
    opts, rest = launch.split_launch_options(argv)
    assert rest == ["c.yaml", "a=1"] and opts.node_rank == 1
    cmd = launch.launcher_command("/r/pretrain.sh", rest, None, opts)
    assert cmd[4:] == [
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        "1",
        "--master_addr",
        "node0",  # the hostfile's first host, unless --master_addr
        "--master_port",
        "6000",
        "/r/pretrain.sh",
        "c.yaml",
        "a=1",
    ]
    monkeypatch.delenv("MASTER_PORT", raising=False)
    no_port = launch.Multinode(hostfile=str(hostfile), node_rank=0)
    with pytest.raises(launch.ConfigError, match="needs --master_port"):
        launch.launcher_command("/r/pretrain.sh", rest, None, no_port)
    monkeypatch.setenv("SLURMD_NODENAME", "elsewhere")
    monkeypatch.setattr("socket.gethostname", lambda: "elsewhere")
    monkeypatch.setattr("socket.getfqdn", lambda: "elsewhere")
    monkeypatch.delenv("SLURM_NODEID", raising=False)
    with pytest.raises(launch.ConfigError, match="pass --node_rank N"):
        launch.multinode_args(launch.Multinode(hostfile=str(hostfile), master_port="1"))


# Real runs through launch/pretrain.sh: several nodes, signals, a dead rank.

_WATCHED = """
import os, signal, sys, time
import torch.distributed as dist
from megatron_llm.cluster.watchdog import Watchdog
dist.init_process_group("gloo")
Watchdog(dist.get_rank(), dist.get_world_size(), timeout=5.0, interval=1.0).start()
if dist.get_rank() == int(sys.argv[1]):
    time.sleep(2)
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(60)  # the others hang, as in a NCCL collective with a dead peer
sys.exit(3)
"""


@pytest.mark.parametrize(
    "victim, says",
    [
        (2, "rank 2 on host {host} (pid {pid}): the process is gone"),
        (
            0,
            "lost the rendezvous store at 127.0.0.1:{port}, which rank 0 on host {host} (pid",
        ),
    ],
)
def test_heartbeat_names_a_dead_rank_to_ranks_that_hang(tmp_path, victim, says):
    environ = cluster_runs.env(MASTER_ADDR="127.0.0.1", WORLD_SIZE="3")
    procs = []
    for rank in range(3):
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _WATCHED, str(victim)],
                cwd=cluster_runs.REPO,
                env={**environ, "RANK": str(rank)},
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    start = time.monotonic()
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert time.monotonic() - start < 30
    expected = says.format(
        host=socket.gethostname(), pid=procs[victim].pid, port=environ["MASTER_PORT"]
    )
    for rank, (p, err) in enumerate(zip(procs, errs)):
        if rank != victim:
            assert p.returncode == 1, err
            assert expected in err, err


@pytest.mark.slow
def test_two_nodes_without_ssh_match_one_launcher(tmp_path, email_shard, bpe_model):
    # Two launcher invocations on this machine, as two nodes of a hostfile, 2 ranks each.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=2\n")
    environ = cluster_runs.env()
    port = environ.pop("MASTER_PORT")
    two = tmp_path / "two_nodes"
    args = run_args(two, email_shard, bpe_model, "parallel.dp=4", "train.steps=4")
    nodes = [
        cluster_runs.start(
            ["bash", PRETRAIN, "--hostfile", hostfile, "--node_rank", str(n)]
            + ["--master_addr", "127.0.0.1", "--master_port", port, *args],
            tmp_path,
            environ,
            tmp_path / f"node{n}.log",
        )
        for n in (0, 1)
    ]
    outs = [cluster_runs.finish(p, tmp_path / f"node{n}.log") for n, p in enumerate(nodes)]
    for p, out in zip(nodes, outs):
        assert p.returncode == 0, out
    assert "--no_ssh --node_rank 1" in outs[1]
    assert "world 4 = tp 1 x pp 1 x dp 4" in outs[0]
    one = tmp_path / "one_launcher"
    args = run_args(one, email_shard, bpe_model, "parallel.dp=4", "train.steps=4")
    out = cluster_runs.run(["bash", PRETRAIN, *args], tmp_path, cluster_runs.env())
    assert "starting the deepspeed launcher on 4 CPU ranks" in out
    assert losses(two) == losses(one) and len(losses(one)) == 4


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{global rank: pid} of the ranks below a launch/pretrain.sh process."""
    found = {}
    for p in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if any(a.startswith("--local_rank=") for a in p.cmdline()):
                found[int(p.environ()["RANK"])] = p.pid
        except (psutil.NoSuchProcess, KeyError):
            continue
    return found


@pytest.mark.slow
def test_sigterm_to_the_launcher_saves_and_exits_zero(tmp_path, email_shard, bpe_model):
    run_dir = tmp_path / "run"
    args = run_args(run_dir, email_shard, bpe_model, "parallel.dp=2", "train.steps=1000")
    log = tmp_path / "run.log"
    proc = cluster_runs.start(["bash", PRETRAIN, *args], tmp_path, cluster_runs.env(), log)
    cluster_runs.wait_for(log, "step      2 |")
    proc.send_signal(signal.SIGTERM)  # the top-level process: bash exec'd into launch.py
    out = cluster_runs.finish(proc, log, timeout=120)
    assert proc.returncode == 0, out
    assert "[launch] SIGTERM received" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    step = summary["steps"]
    assert 2 <= step < 1000 and summary["stopped"].startswith("signal")
    latest = (run_dir / "checkpoints/latest").read_text().strip()
    assert latest == f"global_step{step}"
    assert losses(run_dir)[-1] == summary["losses"][-1] and len(losses(run_dir)) == step


@pytest.mark.slow
def test_a_killed_rank_ends_every_node_soon_and_is_named(tmp_path, email_shard, bpe_model):
    # Two "nodes" of one rank each: the survivor learns of the death only over the network.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    environ = cluster_runs.env()
    port = environ.pop("MASTER_PORT")
    args = run_args(tmp_path / "run", email_shard, bpe_model, "parallel.dp=2", "train.steps=1000")
    logs = [tmp_path / f"node{n}.log" for n in (0, 1)]
    nodes = [
        cluster_runs.start(
            ["bash", PRETRAIN, "--hostfile", hostfile, "--node_rank", str(n)]
            + ["--master_addr", "127.0.0.1", "--master_port", port, *args],
            tmp_path,
            environ,
            logs[n],
        )
        for n in (0, 1)
    ]
    cluster_runs.wait_for(logs[0], "step      2 |")
    victim = _rank_pids(nodes[1])[1]
    os_kill_time = time.monotonic()
    psutil.Process(victim).kill()
    outs = [cluster_runs.finish(p, log, timeout=120) for p, log in zip(nodes, logs)]
    assert time.monotonic() - os_kill_time < 90
    assert nodes[0].returncode != 0 and nodes[1].returncode != 0
    named = f"rank 1 on host {socket.gethostname()} (pid {victim})"
    assert named in outs[0], outs[0]  # the survivor's node says who died
