"""Process groups, created once and passed explicitly.

Rank order is tensor-parallel fastest, then data-parallel, then pipeline (tp-dp-pp):
``rank = tp_rank + tp * (dp_rank + dp * pp_rank)``, so a tensor-parallel group stays on a node.
The object also answers DeepSpeed's ``mpu`` questions, so the engine reduces gradients over the
data-parallel group only. ``device`` is this rank's device (cuda:LOCAL_RANK or the CPU,
decided once by megatron_llm/cluster/ranks.py): every tensor a collective sees lives there.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from megatron_llm.parallel.config import ParallelConfig


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    @property
    def is_logging_rank(self) -> bool:
        # The last pipeline stage holds the loss; of those, the first tp and dp rank speaks.
        return self.tp_rank == 0 and self.dp_rank == 0 and self.pp_rank == self.pp - 1

    # DeepSpeed's mpu interface.
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.tp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup | None:
        return self.dp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.pp_group


def skip_cpu_shm_allreduce() -> None:
    """Keep DeepSpeed from loading its CPU shared-memory allreduce op.

    DeepSpeed's comm backend loads that op on CPU but our training collectives never use it,
    while it costs a JIT compile (30-80 s) and leaves a ~67 MB /dev/shm buffer per rank and
    port that nothing removes (21 GiB of RAM after a day of test runs here). Marking it
    incompatible makes DeepSpeed skip it; GPU runs are unaffected.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def init_distributed(timeout_minutes: float) -> None:
    """Join the job's process group (gloo on CPU, nccl on GPU) if not already in one.

    Ranks come from the launcher's variables, else from srun or MPI (megatron_llm/cluster/
    ranks.py). The rank's device is made current first (cluster/ranks.py use_local_device), so
    no collective, the first included, lands on cuda:0 by default. timeout_minutes bounds every
    collective, NCCL's included (its own default is 30); build_context's groups get it too.
    """
    import deepspeed  # heavy import: only when a run starts

    if dist.is_initialized():
        return
    from megatron_llm.cluster.ranks import cpu_threads, discover, use_local_device

    discover(os.environ)  # srun tasks and mpirun ranks: RANK etc. from Slurm or mpi4py
    use_local_device(os.environ)
    threads = cpu_threads(os.environ)
    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    from deepspeed.accelerator import get_accelerator

    skip_cpu_shm_allreduce()
    backend = get_accelerator().communication_backend_name()
    if backend == "ccl":  # DeepSpeed's CPU default; plain gloo needs no oneCCL
        backend = "gloo"
    deepspeed.init_distributed(
        dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes)
    )


def build_context(cfg: ParallelConfig) -> ParallelContext:
    """Create every group once; every rank must call this, in the same order."""
    from megatron_llm.cluster.ranks import local_device

    rank, world = dist.get_rank(), dist.get_world_size()
    dp = cfg.resolve_dp(world)
    tp, pp = cfg.tp, cfg.pp

    def index(t: int, d: int, p: int) -> int:
        return t + tp * (d + dp * p)

    mine: dict[str, dist.ProcessGroup | None] = {}
    timeout = datetime.timedelta(minutes=cfg.timeout_minutes)
    layouts = {
        "tp": [[index(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[index(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[index(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
    }
    for name, groups in layouts.items():
        for ranks in groups:
            # collective: every rank creates every group. A new group does not inherit the
            # world's timeout (torch gives it the backend default, 30 min), so pass ours.
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[name] = group
    return ParallelContext(
        rank=rank,
        world_size=world,
        tp=tp,
        pp=pp,
        dp=dp,
        tp_group=mine["tp"],
        dp_group=mine["dp"],
        pp_group=mine["pp"],
        device=local_device(),
    )


def mean_over_dp(value: torch.Tensor, ctx: ParallelContext) -> float:
    # gloo has no AVG reduction: sum, then divide.
    value = value.detach().float().clone()
    if ctx.dp > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=ctx.dp_group)
        value /= ctx.dp
    return value.item()
