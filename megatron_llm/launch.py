"""Start a run with the right number of ranks, or run as one of them.

``launch/pretrain.sh`` calls :func:`main`. Three cases:

1. No launcher started this process (``bash launch/pretrain.sh ...``): start the deepspeed
   launcher on this script. On a GPU machine it uses every visible GPU; on a CPU-only machine
   it starts tp x pp x dp ranks from the config (DeepSpeed would otherwise start one).
2. The deepspeed launcher started this process on a CPU-only machine with fewer ranks than the
   config needs (plain ``deepspeed launch/pretrain.sh`` starts one CPU rank): start the launcher
   again with the right count, once.
3. Otherwise this is a rank of a correctly sized job: train.
"""

from __future__ import annotations

import os
import socket
import sys

from megatron_llm.config import ConfigError, load_config
from megatron_llm.pretrain import split_args

RELAUNCHED = "MEGATRON_LLM_RELAUNCHED"
# Variables that mean "a launcher already made this process a rank".
_RANK_VARS = ("LOCAL_RANK", "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def ranks_needed(argv: list[str]) -> int:
    config, overrides = split_args(argv)
    return load_config(config, overrides).parallel.world_size(default_dp=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_command(script: str, argv: list[str], ranks: int | None) -> list[str]:
    """The deepspeed launcher command line; ranks=None lets it use every GPU."""
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    if ranks is not None:
        cmd += ["--num_gpus", str(ranks)]
    cmd += ["--master_port", os.environ.get("MASTER_PORT") or str(free_port())]
    user_args = [a for a in argv if not a.startswith("--local_rank")]
    return cmd + [script, *user_args]


def exec_launcher(script: str, argv: list[str], ranks: int | None, why: str) -> None:
    env = dict(os.environ)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE"):
        env.pop(name, None)
    if ranks is not None:
        env["LOCAL_SIZE"] = str(ranks)  # the CPU accelerator's "device count"
    env[RELAUNCHED] = "1"
    cmd = launcher_command(script, argv, ranks)
    print(f"[launch] {why}: {' '.join(cmd[2:])}", flush=True)
    os.execve(cmd[0], cmd, env)


def main(argv: list[str], script: str) -> int:
    try:
        needed = ranks_needed(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    is_rank = any(v in os.environ for v in _RANK_VARS)
    from_deepspeed = any(a.startswith("--local_rank") for a in argv)
    if not is_rank:
        ranks = needed if cpu_only() else None
        where = f"{needed} CPU ranks" if ranks else "every visible GPU"
        exec_launcher(script, argv, ranks, f"starting the deepspeed launcher on {where}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if from_deepspeed and cpu_only() and world < needed and RELAUNCHED not in os.environ:
        if os.environ.get("LOCAL_RANK", "0") != "0":
            return 0  # only one of the undersized job's ranks starts the replacement
        exec_launcher(
            script,
            argv,
            needed,
            f"the launcher started {world} CPU rank(s) but the "
            f"config needs tp x pp x dp = {needed}; relaunching",
        )
    from megatron_llm.pretrain import main as pretrain_main

    return pretrain_main(argv)
