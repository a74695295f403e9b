"""Ranks started by mpiexec (the mpich wheel): rank variables from mpi4py, same losses."""

import pytest

from tests.cluster_runs import PRETRAIN, env, has_mpi, losses, run, run_args, sbatch_run  # noqa: F401

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not has_mpi(), reason="needs mpi4py and mpiexec: pip install mpi4py mpich"),
]


def test_mpiexec_run_matches_the_deepspeed_launcher(tmp_path, sbatch_run, email_shard, bpe_model):  # noqa: F811
    reference, _ = sbatch_run  # 2 ranks through the deepspeed launcher, 4 steps
    run_dir = tmp_path / "run"
    environ = env()
    environ.pop("MASTER_PORT")  # rank 0 picks a free port and tells the others over MPI
    environ["MASTER_ADDR"] = "127.0.0.1"  # `hostname -I` is not loopback on every machine
    args = run_args(run_dir, email_shard, bpe_model, "parallel.dp=2", "train.steps=4")
    out = run(["mpiexec", "-n", "2", "bash", PRETRAIN, *args], tmp_path, environ)
    assert "[launch]" not in out  # no deepspeed launcher: mpiexec made the ranks
    assert "world 2 = tp 1 x pp 1 x dp 2" in out
    assert losses(run_dir) == losses(reference)
