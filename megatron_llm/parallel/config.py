"""The ``parallel`` section: how ranks split the work."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1  # tensor-parallel size (ranks that split each layer)
    cp: int = 1  # context-parallel size (ranks that split each sequence, attention included)
    # cp attention: "ring" (K/V blocks around the ring) or "all_to_all" (DeepSpeed-Ulysses: heads
    # exchanged for the whole sequence; the heads per tp rank must divide by cp)
    cp_attention: Literal["ring", "all_to_all"] = "ring"
    pp: int = 1  # pipeline-parallel size (stages)
    ep: int = 1  # expert-parallel size: ranks of the data-parallel group that split the experts
    pipeline_partition: str = "parameters"  # blocks to stages: "parameters" (balanced) or "uniform"
    pipeline_split: list[int] | None = None  # explicit blocks per stage, e.g. [3, 5]; overrides it
    # data-parallel size; auto (or null) = world size / (tp * cp * pp): every GPU takes part
    dp: int | Literal["auto"] | None = None
    dp_on_cpu: int = 1  # dp when dp is auto and there is no GPU: launch starts tp*cp*pp*this
    sequence_parallel: bool = False  # shard norms/dropout along the sequence (needs tp > 1)
    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0 off, 1 optimizer, 2 +gradients, 3 +parameters
    timeout_minutes: float = 10.0  # collective timeout: a rank that hangs ends the job after this
    heartbeat_timeout_s: float = 60.0  # a rank silent this long is named dead, all exit; 0: off

    def __post_init__(self) -> None:
        for name in ("tp", "cp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)}: must be >= 1")
        if self.cp_attention not in ("ring", "all_to_all"):
            raise ValueError(
                f"parallel.cp_attention={self.cp_attention!r}: must be 'ring' or 'all_to_all'"
            )
        if self.pipeline_partition not in ("parameters", "uniform"):
            raise ValueError(
                f"parallel.pipeline_partition={self.pipeline_partition!r}: expected "
                "'parameters' or 'uniform'"
            )
        if self.pipeline_split is not None and len(self.pipeline_split) != self.pp:
            raise ValueError(
                f"parallel.pipeline_split={self.pipeline_split}: expected one block count per "
                f"stage (parallel.pp={self.pp})"
            )
        if self.dp == "auto":
            self.dp = None  # one spelling inside the program: None means derived
        if self.dp is not None and self.dp < 1:
            raise ValueError(f"parallel.dp={self.dp}: must be >= 1, or auto to derive it")
        if self.dp_on_cpu < 1:
            raise ValueError(f"parallel.dp_on_cpu={self.dp_on_cpu}: must be >= 1")
        if self.dp is not None and self.dp % self.ep:
            raise ValueError(
                f"parallel.ep={self.ep} does not divide parallel.dp={self.dp}: expert-parallel "
                "ranks are taken from the data-parallel group"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage={self.zero_stage}: must be 0, 1, 2 or 3")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tp > 1")
        if self.timeout_minutes <= 0:
            raise ValueError(f"parallel.timeout_minutes={self.timeout_minutes}: must be > 0")
        if self.heartbeat_timeout_s != 0 and self.heartbeat_timeout_s < 5:
            raise ValueError(
                f"parallel.heartbeat_timeout_s={self.heartbeat_timeout_s}: must be >= 5 "
                "(seconds), or 0 to turn the heartbeat off"
            )

    def world_size(self, default_dp: int = 1) -> int:
        """Ranks this layout needs; dp=auto counts as default_dp."""
        return self.tp * self.cp * self.pp * (self.dp if self.dp is not None else default_dp)

    def cpu_world_size(self) -> int:
        """Ranks to start on a machine without GPUs (launch.py): dp, or dp_on_cpu when auto."""
        return self.world_size(default_dp=self.dp_on_cpu)

    def resolve_dp(self, world_size: int) -> int:
        """The data-parallel size for world_size ranks, or a ValueError naming every factor."""
        model_parallel = self.tp * self.cp * self.pp
        dp = self.dp if self.dp is not None else world_size // model_parallel
        if dp < 1 or model_parallel * dp != world_size:
            cp = f" x cp ({self.cp})" if self.cp > 1 else ""
            raise ValueError(
                f"world size {world_size} != tp ({self.tp}){cp} x pp ({self.pp}) x dp "
                f"({self.dp if self.dp is not None else 'derived'}"
                f"{'' if self.dp is not None else ' = ' + str(dp)}); start tp*cp*pp*dp ranks or "
                "change parallel.tp / parallel.cp / parallel.pp / parallel.dp"
            )
        if dp % self.ep:
            raise ValueError(
                f"parallel.ep={self.ep} does not divide the data-parallel size {dp} "
                f"(world size {world_size}); expert-parallel ranks come from the data-parallel "
                "group"
            )
        return dp
