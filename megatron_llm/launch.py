"""Start a run with the right number of ranks, or run as one of them.

``launch/pretrain.sh [LAUNCH OPTIONS] [CONFIG] [overrides]`` calls :func:`main`. Cases:

1. No launcher started this process (``bash launch/pretrain.sh ...``): start the deepspeed
   launcher on this script and stay its parent, so that SIGTERM/SIGUSR1/SIGINT sent to us make
   every rank save a checkpoint and exit 0 (megatron_llm/cluster/supervise.py). On a GPU
   machine it uses every visible GPU when ``parallel.dp`` is auto (dp = GPUs / (tp x pp)), else
   exactly tp x pp x dp of them; on a CPU-only machine it starts tp x pp x dp ranks from the
   config, with ``parallel.dp_on_cpu`` for an auto dp (DeepSpeed would otherwise start one).
   With ``--hostfile`` this is one node of a multi-node job (below), even if an MPI or Slurm
   step set rank variables.
2. The deepspeed launcher started this process on a CPU-only machine with fewer ranks than the
   config needs (plain ``deepspeed launch/pretrain.sh`` starts one CPU rank): start the launcher
   again with the right count, once.
3. Otherwise this is a rank of a correctly sized job (deepspeed launcher, ``srun`` with
   MEGATRON_LLM_RANKS_FROM=slurm, ``mpirun``/``mpiexec``): train.

Launch options (multi-node; each node runs the same command, nobody needs ssh):

  --hostfile FILE      DeepSpeed hostfile ("host slots=N" per node): the job's nodes in order
  --node_rank N        this node's index in FILE (default: found from SLURMD_NODENAME, the
                       hostname, or SLURM_NODEID)
  --master_addr ADDR   address of node 0 (default: the first host in FILE)
  --master_port PORT   rendezvous port (default: MASTER_PORT, else a free port; multi-node
                       jobs must give the same port on every node)
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys

from megatron_llm.cluster.ranks import MPI_VARS, RANKS_FROM
from megatron_llm.config import ConfigError, load_config
from megatron_llm.pretrain import split_args

RELAUNCHED = "MEGATRON_LLM_RELAUNCHED"
# Variables that mean "a launcher already made this process a rank".
_RANK_VARS = ("LOCAL_RANK", "RANK", *MPI_VARS)
# What a rank of an outer launcher or step carries; our own launcher's ranks must not inherit it.
_INHERITED_RANK_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_SIZE",
    "CROSS_RANK",
    "CROSS_SIZE",
    RANKS_FROM,
    *MPI_VARS,
)
_OPTIONS = ("--hostfile", "--node_rank", "--master_addr", "--master_port")


@dataclasses.dataclass
class Multinode:
    hostfile: str | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: str | None = None


def split_launch_options(argv: list[str]) -> tuple[Multinode, list[str]]:
    """(launch options, the rest): '--hostfile F' and '--hostfile=F' forms, anywhere in argv."""
    opts, rest, i = Multinode(), [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in _OPTIONS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name}: expected a value after it")
                value, i = argv[i + 1], i + 1
            field = name[2:]
            setattr(opts, field, int(value) if field == "node_rank" else value)
        else:
            rest.append(arg)
        i += 1
    return opts, rest


def cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def ranks_needed(argv: list[str]) -> int:
    """Ranks the config needs on a CPU-only machine (dp_on_cpu when dp is auto)."""
    config, overrides = split_args(argv)
    return load_config(config, overrides).parallel.cpu_world_size()


def gpu_ranks(argv: list[str], gpus: int) -> int | None:
    """Ranks to start on a machine with ``gpus`` GPUs: None (every GPU) when dp is auto, so that
    dp adapts to the machine; exactly tp x pp x dp when the config fixes dp."""
    config, overrides = split_args(argv)
    parallel = load_config(config, overrides).parallel
    if parallel.dp is None:
        return None
    needed = parallel.world_size()
    if needed > gpus:
        raise ConfigError(
            f"parallel: tp ({parallel.tp}) x pp ({parallel.pp}) x dp ({parallel.dp}) = {needed} "
            f"ranks, but this machine has {gpus} GPU(s); set parallel.dp=auto to use every GPU, "
            "or lower parallel.tp / parallel.pp / parallel.dp"
        )
    return needed


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multinode_args(opts: Multinode) -> list[str]:
    """The deepspeed runner's flags for one node of a hostfile job started on every node."""
    from megatron_llm.cluster.slurm import node_rank, read_hostfile

    hosts = read_hostfile(opts.hostfile)
    if not hosts:
        raise ConfigError(f"--hostfile {opts.hostfile}: no hosts in it")
    rank = opts.node_rank if opts.node_rank is not None else node_rank(hosts)
    if rank is None or not 0 <= rank < len(hosts):
        raise ConfigError(
            f"--hostfile {opts.hostfile}: cannot tell which of its {len(hosts)} hosts this node "
            f"is (node rank {rank}); pass --node_rank N"
        )
    if opts.master_port is None and not os.environ.get("MASTER_PORT"):
        raise ConfigError(
            "a multi-node job needs --master_port (or MASTER_PORT), the same on every node"
        )
    return [
        "--hostfile",
        opts.hostfile,
        "--no_ssh",
        "--node_rank",
        str(rank),
        "--master_addr",
        opts.master_addr or hosts[0],
    ]


def launcher_command(
    script: str, argv: list[str], ranks: int | None, opts: Multinode | None = None
) -> list[str]:
    """The deepspeed launcher command line; ranks=None lets it use every GPU."""
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    if opts is not None and opts.hostfile:
        cmd += multinode_args(opts)  # the hostfile's slots say how many ranks per node
    elif ranks is not None:
        cmd += ["--num_gpus", str(ranks)]
    port = (opts.master_port if opts else None) or os.environ.get("MASTER_PORT")
    cmd += ["--master_port", port or str(free_port())]
    user_args = [a for a in argv if not a.startswith("--local_rank")]
    return cmd + [script, *user_args]


def run_launcher(
    script: str, argv: list[str], ranks: int | None, why: str, opts: Multinode | None = None
) -> int:
    from megatron_llm.cluster.supervise import Supervisor

    env = dict(os.environ)
    for name in _INHERITED_RANK_VARS:
        env.pop(name, None)
    if ranks is not None:
        env["LOCAL_SIZE"] = str(ranks)  # the CPU accelerator's "device count"
    env[RELAUNCHED] = "1"
    cmd = launcher_command(script, argv, ranks, opts)
    print(f"[launch] {why}: {' '.join(cmd[2:])}", flush=True)
    return Supervisor(cmd, env).run()


def main(argv: list[str], script: str) -> int:
    try:
        opts, argv = split_launch_options(argv)
        needed = ranks_needed(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from_deepspeed = any(a.startswith("--local_rank") for a in argv)
    is_rank = from_deepspeed or os.environ.get(RANKS_FROM) == "slurm"
    is_rank = is_rank or any(v in os.environ for v in _RANK_VARS)
    try:
        if opts.hostfile and not from_deepspeed:
            why = f"starting the deepspeed launcher for one node of {opts.hostfile}"
            return run_launcher(script, argv, None, why, opts)
        if not is_rank:
            if cpu_only():
                ranks, where = needed, f"{needed} CPU ranks"
            else:
                ranks = gpu_ranks(argv, visible_gpus())
                where = f"{ranks} GPUs" if ranks else "every visible GPU (parallel.dp=auto)"
            why = f"starting the deepspeed launcher on {where}"
            return run_launcher(script, argv, ranks, why, opts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if from_deepspeed and cpu_only() and world < needed and RELAUNCHED not in os.environ:
        if os.environ.get("LOCAL_RANK", "0") != "0":
            return 0  # only one of the undersized job's ranks starts the replacement
        return run_launcher(
            script,
            argv,
            needed,
            f"the launcher started {world} CPU rank(s) but the "
            f"config needs tp x pp x dp = {needed}; relaunching",
        )
    from megatron_llm.pretrain import main as pretrain_main

    return pretrain_main(argv)
