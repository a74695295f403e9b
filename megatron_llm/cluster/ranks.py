"""Where a rank learns RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.

1. A launcher set them (deepspeed, torchrun, our tests): nothing to do.
2. ``srun`` started one task per GPU and the batch script exported
   ``MEGATRON_LLM_RANKS_FROM=slurm``: they come from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
   and SLURM_NTASKS_PER_NODE (Slurm's own variables are set in the batch shell too, so reading
   them is opt-in rather than guessed).
3. ``mpirun``/``mpiexec`` started the ranks (PMI_RANK, OMPI_COMM_WORLD_RANK or PMIX_RANK set):
   they come from mpi4py, as DeepSpeed's MPI discovery does; rank 0 publishes its address and,
   unless MASTER_PORT is set, a free port. Works with the ``mpich`` wheel
   (``pip install mpi4py mpich``; its ``mpiexec`` is then on the venv's PATH).
4. None of these: a single process (rank 0 of 1).

:func:`use_local_device` is the one place that decides a rank's device (``cuda:LOCAL_RANK``, or
the CPU) and makes it current, before the first collective.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RANKS_FROM = "MEGATRON_LLM_RANKS_FROM"
MPI_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def from_slurm(env: MutableMapping[str, str]) -> str:
    missing = [v for v in ("SLURM_PROCID", "SLURM_NTASKS") if v not in env]
    if missing:
        raise RuntimeError(
            f"{RANKS_FROM}=slurm but {', '.join(missing)} not set: start the ranks with srun "
            "(one task per GPU)"
        )
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    # SLURM_NTASKS_PER_NODE may read "4" or "4(x2)"; SLURM_STEP_TASKS_PER_NODE likewise.
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE", "")
    if per_node.split("(")[0].isdigit():
        env["LOCAL_SIZE"] = per_node.split("(")[0]
    if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        raise RuntimeError(
            f"{RANKS_FROM}=slurm needs MASTER_ADDR and MASTER_PORT exported by the batch "
            "script (launch/slurm/pretrain.sbatch does)"
        )
    return f"srun task {env['RANK']} of {env['WORLD_SIZE']}"


def _own_address() -> str:
    # DeepSpeed's choice: the first address `hostname -I` prints, else the hostname's.
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return socket.gethostbyname(socket.gethostname())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def from_mpi(env: MutableMapping[str, str]) -> str:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(
            "started by mpirun/mpiexec (PMI_RANK or OMPI_COMM_WORLD_RANK set) but mpi4py cannot "
            f"be imported ({e}); `pip install mpi4py mpich` gives both, or build mpi4py against "
            "your cluster's MPI"
        ) from e
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this host
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if rank == 0:
        addr, port = addr or _own_address(), port or str(_free_port())
    addr, port = comm.bcast((addr, port), root=0)
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(node.Get_rank()),
        LOCAL_SIZE=str(node.Get_size()),
        MASTER_ADDR=addr,
        MASTER_PORT=port,
    )
    node.Free()
    return f"MPI rank {rank} of {world}"


def discover(env: MutableMapping[str, str] | None = None) -> str:
    """Fill in the rank variables if no launcher did; returns where they came from."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "launcher"
    if env.get(RANKS_FROM) == "slurm":
        return from_slurm(env)
    if any(v in env for v in MPI_VARS):
        return from_mpi(env)
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        env.setdefault(name, value)
    return "single process"


def cpu_threads(env: MutableMapping[str, str] | None = None) -> int | None:
    """Intra-op CPU threads for this rank: the cores this process may use, shared by the node's
    ranks (LOCAL_SIZE, which every launcher path above sets), as torchrun does. Without it each
    rank takes every core: ranks oversubscribe the node, and under load the math libraries may
    use fewer threads than asked, which changes how sums are split and so the last bits of a
    loss. None when OMP_NUM_THREADS is set: the user's choice stands."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return None
    try:
        local = max(1, int(env.get("LOCAL_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, len(os.sched_getaffinity(0)) // local)


def local_device(env: Mapping[str, str] | None = None) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is present (one GPU per local rank, as
    every launcher path above starts them), else the CPU. The one rule for the whole run."""
    import torch  # not at the top: the launcher and the cluster CLI import this module

    env = os.environ if env is None else env
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local, count = int(env.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local >= count:
        raise RuntimeError(
            f"LOCAL_RANK={local} but this process sees {count} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one rank "
            "per GPU with every GPU visible to each, and do not bind one GPU per task "
            "(srun --gpus-per-task)"
        )
    return torch.device("cuda", local)


def use_local_device(env: Mapping[str, str] | None = None) -> torch.device:
    """Decide this rank's device and make it current. Must run before the first collective:
    NCCL and the object collectives (broadcast_object_list, all_gather_object) put their
    tensors on the current device, which is cuda:0 on every rank until this is called."""
    import torch

    device = local_device(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device
