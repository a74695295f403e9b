"""Process groups, created once and passed explicitly.

Rank order is tensor-parallel fastest, then context-parallel, then data-parallel, then pipeline
(tp-cp-dp-pp): ``rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))``, so a
tensor-parallel group stays on a node and a context-parallel ring next to it.

Expert parallelism takes its ranks from the data-parallel group: ``ep_rank = dp_rank % ep``, and
the ranks that hold the same experts (``expert_dp_group``, dp/ep of them times cp) reduce the
expert gradients, while the dense gradients are reduced over ``dp_cp_group`` (every dp and cp
rank of this tp rank and stage; the dp group itself when cp = 1).

The object also answers DeepSpeed's ``mpu`` questions, so the engine reduces dense gradients over
``dp_cp_group`` only. ``device`` is this rank's device (cuda:LOCAL_RANK or the CPU,
decided once by megatron_llm/cluster/ranks.py): every tensor a collective sees lives there.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable

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
    cp: int = 1
    ep: int = 1
    cp_group: dist.ProcessGroup | None = None  # the ring that splits one sequence
    dp_cp_group: dist.ProcessGroup | None = None  # dense gradients: dp x cp ranks
    ep_group: dist.ProcessGroup | None = None  # the ranks that split the experts
    expert_dp_group: dist.ProcessGroup | None = None  # expert gradients: same experts held

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def cp_rank(self) -> int:
        return (self.rank // self.tp) % self.cp

    @property
    def dp_rank(self) -> int:
        return (self.rank // (self.tp * self.cp)) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.cp * self.dp)

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def expert_dp(self) -> int:
        """Ranks that hold the same experts and reduce their gradients: dp / ep of each cp."""
        return self.dp // self.ep * self.cp

    @property
    def is_logging_rank(self) -> bool:
        # The last pipeline stage holds the loss; of those, the first tp, cp and dp rank speaks.
        return (
            self.tp_rank == 0
            and self.cp_rank == 0
            and self.dp_rank == 0
            and self.pp_rank == self.pp - 1
        )

    # DeepSpeed's mpu interface.
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self.tp_group

    # DeepSpeed reduces (averages) dense gradients over this group: every dp and cp rank.
    def get_data_parallel_rank(self) -> int:
        return self.dp_rank * self.cp + self.cp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp * self.cp

    def get_data_parallel_group(self) -> dist.ProcessGroup | None:
        return self.dp_cp_group

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
    mine: dict[str, dist.ProcessGroup | None] = {}
    timeout = datetime.timedelta(minutes=cfg.timeout_minutes)
    for name, groups in group_layouts(cfg, world).items():
        for ranks in groups:
            # collective: every rank creates every group, in the same order. A new group does
            # not inherit the world's timeout (torch gives it the backend default, 30 min).
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[name] = group
    dense = mine.get("dp_cp", mine["dp"])
    return ParallelContext(
        rank=rank,
        world_size=world,
        tp=cfg.tp,
        pp=cfg.pp,
        dp=cfg.resolve_dp(world),
        cp=cfg.cp,
        ep=cfg.ep,
        tp_group=mine["tp"],
        dp_group=mine["dp"],
        pp_group=mine["pp"],
        cp_group=mine.get("cp"),
        dp_cp_group=dense,
        ep_group=mine.get("ep"),
        expert_dp_group=mine.get("expert_dp", dense),
        device=local_device(),
    )


def group_layouts(cfg: ParallelConfig, world: int) -> dict[str, list[list[int]]]:
    """Every group of each kind, as sorted rank lists, in creation order.

    Pure arithmetic, tested without processes. tp, dp and pp always exist (of one rank when
    their size is 1, as before); cp and dp_cp only when cp > 1, ep and expert_dp only when
    ep > 1 (build_context then uses dp_cp, or dp, in their place).
    """
    dp = cfg.resolve_dp(world)
    tp, cp, pp, ep = cfg.tp, cfg.cp, cfg.pp, cfg.ep
    coords = [
        (t, c, d, p) for p in range(pp) for d in range(dp) for c in range(cp) for t in range(tp)
    ]

    def groups(key: Callable[[int, int, int, int], tuple[int, ...]]) -> list[list[int]]:
        """One group per distinct key: the ranks that share it."""
        out: dict[tuple[int, ...], list[int]] = {}
        for t, c, d, p in coords:
            out.setdefault(key(t, c, d, p), []).append(t + tp * (c + cp * (d + dp * p)))
        return [sorted(ranks) for ranks in out.values()]

    kinds = {
        "tp": groups(lambda t, c, d, p: (c, d, p)),
        "dp": groups(lambda t, c, d, p: (t, c, p)),
        "pp": groups(lambda t, c, d, p: (t, c, d)),
    }
    if cp > 1:
        kinds["cp"] = groups(lambda t, c, d, p: (t, d, p))
        kinds["dp_cp"] = groups(lambda t, c, d, p: (t, p))
    if ep > 1:
        kinds["ep"] = groups(lambda t, c, d, p: (t, c, d // ep, p))
        kinds["expert_dp"] = groups(lambda t, c, d, p: (t, d % ep, p))
    return kinds


def mean_over_dp(value: torch.Tensor, ctx: ParallelContext) -> float:
    """The mean of a per-rank value (a loss) over the dp and cp ranks: a cp rank's loss is its
    share of the micro-batch's (parallel/context.py ContextLoss), so their mean is the whole."""
    # gloo has no AVG reduction: sum, then divide.
    value = value.detach().float().clone()
    if ctx.dp * ctx.cp > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=ctx.dp_cp_group)
        value /= ctx.dp * ctx.cp
    return value.item()
