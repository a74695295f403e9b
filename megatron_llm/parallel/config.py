"""The ``parallel`` section: how ranks split the work."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1  # tensor-parallel size (ranks that split each layer)
    pp: int = 1  # pipeline-parallel size (stages)
    pipeline_partition: str = "parameters"  # blocks to stages: "parameters" (balanced) or "uniform"
    pipeline_split: list[int] | None = None  # explicit blocks per stage, e.g. [3, 5]; overrides it
    # data-parallel size; auto (or null) = world size / (tp * pp): every GPU present takes part
    dp: int | Literal["auto"] | None = None
    dp_on_cpu: int = 1  # dp when dp is auto and the machine has no GPU: launch starts tp*pp*this
    sequence_parallel: bool = False  # shard norms/dropout along the sequence (needs tp > 1)
    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0 off, 1 optimizer, 2 +gradients, 3 +parameters
    timeout_minutes: float = 10.0  # collective timeout: a rank that hangs ends the job after this
    heartbeat_timeout_s: float = 60.0  # a rank silent this long is named dead, all exit; 0: off

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)}: must be >= 1")
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
        return self.tp * self.pp * (self.dp if self.dp is not None else default_dp)

    def cpu_world_size(self) -> int:
        """Ranks to start on a machine without GPUs (launch.py): dp, or dp_on_cpu when auto."""
        return self.world_size(default_dp=self.dp_on_cpu)

    def resolve_dp(self, world_size: int) -> int:
        """The data-parallel size for world_size ranks, or a ValueError naming every factor."""
        model_parallel = self.tp * self.pp
        dp = self.dp if self.dp is not None else world_size // model_parallel
        if dp < 1 or self.tp * self.pp * dp != world_size:
            raise ValueError(
                f"world size {world_size} != tp ({self.tp}) x pp ({self.pp}) x dp "
                f"({self.dp if self.dp is not None else 'derived'}"
                f"{'' if self.dp is not None else ' = ' + str(dp)}); start tp*pp*dp ranks or "
                "change parallel.tp / parallel.pp / parallel.dp"
            )
        return dp
