"""The ``checkpoint`` section: where and when a run saves."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"  # folder holding one sub-folder per saved step
    save_interval: int = 0  # save every N steps (0 = only at the end of the run)
    save_at_end: bool = True  # save after the last step

    def __post_init__(self) -> None:
        if self.save_interval < 0:
            raise ValueError(f"checkpoint.save_interval={self.save_interval}: must be >= 0")
        if not self.dir:
            raise ValueError("checkpoint.dir: must not be empty")
