"""Slurm: node lists, GPUs per node, hostfiles, srun rank variables, and the batch script."""

import io
import json
import os
from contextlib import redirect_stdout

import pytest

from megatron_llm.cluster import ranks, slurm
from megatron_llm.cluster.__main__ import main as cluster_main
from megatron_llm.cluster.checks import problems
from megatron_llm.parallel.config import ParallelConfig
from tests import cluster_runs
from tests.cluster_runs import losses, sbatch_run  # noqa: F401  (session fixture)

NODELISTS = [
    ("node001", ["node001"]),
    ("gpu[001-004,010],cpu07", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "cpu07"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),  # no padding
    ("node[08-11]", ["node08", "node09", "node10", "node11"]),  # padded to the first number
    ("nid[001234-001236]", ["nid001234", "nid001235", "nid001236"]),  # Cray
    ("gpu-a100-[1,3,5-6]", ["gpu-a100-1", "gpu-a100-3", "gpu-a100-5", "gpu-a100-6"]),
    ("node[01-02]-ib", ["node01-ib", "node02-ib"]),  # suffix after the range
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),  # two ranges
    ("a[7],b,c[09-10]", ["a7", "b", "c09", "c10"]),
    ("host1.cluster.org,host2.cluster.org", ["host1.cluster.org", "host2.cluster.org"]),
    ("dgx[1-2],dgx-login", ["dgx1", "dgx2", "dgx-login"]),
    ("", []),
]


@pytest.mark.parametrize("nodelist, hosts", NODELISTS)
def test_expand_nodelist(nodelist, hosts):
    assert slurm.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "bad, says",
    [
        ("node[1-", "never closed"),
        ("node]1", "without '['"),
        ("node[a-b]", "bad range 'a-b'"),
        ("node[5-3]", "runs backwards"),
        ("n[1[2]]", "nested"),
    ],
)
def test_bad_nodelist_names_the_part(bad, says):
    with pytest.raises(slurm.SlurmError) as err:
        slurm.expand_nodelist(bad)
    assert says in str(err.value)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"SLURM_GPUS_ON_NODE": "8"}, 8),
        ({"SLURM_GPUS_PER_NODE": "4"}, 4),
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4),
        ({"SLURM_GPUS_PER_NODE": "gpu:h100:8"}, 8),
        ({"SLURM_GPUS_PER_NODE": "a100:2,v100:2"}, 4),
        ({"SLURM_JOB_GPUS": "0,1,2"}, 3),
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, 2),
    ],
)
def test_gpus_per_node(env, expected):
    assert slurm.gpus_per_node(env)[0] == expected


def test_job_from_env_master_port_and_cpu_ranks(monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)  # no scontrol, no nvidia-smi
    env = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "cn[01-02]"}
    job = slurm.job_from_env(env, cpu_ranks=4)
    assert job.hosts == ["cn01", "cn02"] and job.master_addr == "cn01"
    assert job.master_port == 10000 + 123456 % 20000  # the same on every node, below 32768
    assert job.ranks_per_node == 2 and job.world_size == 4
    gpu = slurm.job_from_env({**env, "SLURM_GPUS_ON_NODE": "8", "MASTER_PORT": "6000"})
    assert (gpu.ranks_per_node, gpu.world_size, gpu.master_port) == (8, 16, 6000)
    with pytest.raises(slurm.SlurmError, match="do not split evenly over 2 nodes"):
        slurm.job_from_env(env, cpu_ranks=3)
    with pytest.raises(slurm.SlurmError, match="SLURM_JOB_NODELIST is not set"):
        slurm.job_from_env({})


def test_cli_writes_hostfile_and_exports(tmp_path, monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    for name, value in {
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "gpu[001-002]",
        "SLURM_GPUS_PER_NODE": "h100:4",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    out = io.StringIO()
    with redirect_stdout(out):
        assert cluster_main(["slurm", "--hostfile", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf").read_text() == "gpu001 slots=4\ngpu002 slots=4\n"
    assert out.getvalue().splitlines() == [
        "export MASTER_ADDR=gpu001",
        "export MASTER_PORT=10077",
        "export NNODES=2",
        "export RANKS_PER_NODE=4",
        "export NODES='gpu001 gpu002'",
    ]
    assert slurm.node_rank(["gpu001", "gpu002"], {"SLURMD_NODENAME": "gpu002"}) == 1
    assert slurm.node_rank(["x", "y"], {"SLURM_NODEID": "1"}) == 1


def test_srun_task_variables_become_rank_variables():
    env = {
        "SLURM_PROCID": "13",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "5",
        "SLURM_NTASKS_PER_NODE": "8(x2)",
        "MASTER_ADDR": "gpu001",
        "MASTER_PORT": "10077",
        ranks.RANKS_FROM: "slurm",
    }
    assert ranks.discover(env) == "srun task 13 of 16"
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_SIZE"]) == (
        "13",
        "16",
        "5",
        "8",
    )
    with pytest.raises(RuntimeError, match="MASTER_ADDR and MASTER_PORT"):
        ranks.discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", ranks.RANKS_FROM: "slurm"})


def test_ranks_of_a_node_share_its_cores(monkeypatch):
    monkeypatch.setattr(ranks.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert ranks.cpu_threads({"LOCAL_SIZE": "8"}) == 2
    assert ranks.cpu_threads({"LOCAL_SIZE": "32"}) == 1  # never 0
    assert ranks.cpu_threads({}) == 16  # a single process takes them all
    assert ranks.cpu_threads({"LOCAL_SIZE": "4", "OMP_NUM_THREADS": "3"}) is None  # user's choice


def _report(rank, host, code="abc", gpus=0, local_rank=0):
    return dict(
        rank=rank,
        host=host,
        local_rank=local_rank,
        code=code,
        git=None,
        versions="torch x",
        gpus=gpus,
        visible=None,
        nccl={},
    )


def test_environment_check_names_hosts_with_other_code_and_missing_gpus():
    good = [_report(r, f"n{r // 2}") for r in range(4)]
    assert problems(good, ParallelConfig(dp=4)) == []
    stale = [_report(r, f"n{r // 2}", code="abc" if r < 2 else "def") for r in range(4)]
    (found,) = problems(stale, ParallelConfig())
    assert "abc (ranks 0-1 on n0); def (ranks 2-3 on n1)" in found
    short = [_report(r, "g0", gpus=2, local_rank=r) for r in range(3)]
    (found,) = problems(short, ParallelConfig())
    assert "rank 2 on g0 has LOCAL_RANK 2 but sees only 2 GPU(s)" in found
    (found,) = problems(good, ParallelConfig(dp=2))
    assert "world size 4 != tp (1) x pp (1) x dp (2)" in found


@pytest.mark.slow
def test_sbatch_script_trains_under_simulated_slurm(sbatch_run):  # noqa: F811
    run_dir, out = sbatch_run
    assert "[slurm] job 4242: 1 node(s) (localhost), 2 rank(s) per node" in out
    assert "--hostfile" in out and "--no_ssh --node_rank 0" in out
    assert "[env] 2 ranks on 1 host(s)" in out and "[env] NCCL variables" in out
    assert "[slurm] finished with exit code 0" in out
    assert len(losses(run_dir)) == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["checkpoint"].endswith("global_step4")


# A stand-in for srun on a machine without Slurm: one task per (node, task), with the task
# variables srun sets, all on this machine.
FAKE_SRUN = """#!/usr/bin/env bash
nodes=1; per_node=1
while [[ $1 == -* ]]; do
  case $1 in
    --nodes=*) nodes=${1#*=} ;;
    --ntasks-per-node=*) per_node=${1#*=} ;;
  esac
  shift
done
pids=()
for ((n = 0; n < nodes; n++)); do
  for ((t = 0; t < per_node; t++)); do
    SLURM_PROCID=$((n * per_node + t)) SLURM_LOCALID=$t SLURM_NODEID=$n \\
      SLURM_NTASKS=$((nodes * per_node)) SLURM_NTASKS_PER_NODE=$per_node "$@" &
    pids+=($!)
  done
done
for _ in "${pids[@]}"; do  # --kill-on-bad-exit: the first failed task ends the others
  wait -n && continue
  status=$?
  kill "${pids[@]}" 2> /dev/null
  exit $status
done
"""


@pytest.mark.slow
def test_sbatch_srun_mode_one_task_per_rank(tmp_path, sbatch_run, email_shard, bpe_model):  # noqa: F811
    reference, _ = sbatch_run  # the same run through the deepspeed launcher
    fake = tmp_path / "bin/srun"
    fake.parent.mkdir()
    fake.write_text(FAKE_SRUN)
    fake.chmod(0o755)
    run_dir = tmp_path / "run"
    environ = cluster_runs.env(
        PATH=f"{fake.parent}:{cluster_runs.BIN}:{os.environ['PATH']}",
        LAUNCHER="srun",
        SLURM_JOB_ID="4243",
        SLURM_JOB_NODELIST="localhost",
        SLURM_SUBMIT_DIR=str(tmp_path),
        MASTER_ADDR="127.0.0.1",
    )
    args = cluster_runs.run_args(run_dir, email_shard, bpe_model, "parallel.dp=2", "train.steps=4")
    out = cluster_runs.run(["bash", cluster_runs.SBATCH, *args], tmp_path, environ)
    assert "[slurm] srun: srun --kill-on-bad-exit=1 --mpi=none --nodes=1 --ntasks-per-node=2" in out
    assert "[launch]" not in out  # srun made the ranks; no deepspeed launcher
    assert "world 2 = tp 1 x pp 1 x dp 2" in out
    assert losses(run_dir) == losses(reference)
