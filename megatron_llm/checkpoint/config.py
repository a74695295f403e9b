"""The ``checkpoint`` section: where and when a run saves, and what it resumes from."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"  # folder holding one sub-folder per saved step
    save_interval: int = 0  # save every N steps (0 = only at the end of the run)
    save_at_end: bool = True  # save after the last step
    # auto: the newest valid checkpoint in `dir` if any, else start fresh; never: start fresh;
    # or a path to a checkpoint folder (or to another run's checkpoint dir) to start from.
    resume: str = "auto"
    # Start a new run from this checkpoint's weights (a folder, or a checkpoint dir's newest):
    # fresh optimizer, schedule and data position; for fine-tuning and continued pretraining.
    # A checkpoint of this run in `dir` takes precedence, so a pre-empted fine-tune resumes.
    init_from: str | None = None
    keep_last: int = 3  # keep the newest N checkpoints (0 = keep all)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of K (0 = none)
    # One run per `dir`: rank 0 holds `dir/.lock` (host, pid, start, heartbeat). A lock whose
    # heartbeat is older than this many seconds (or whose pid is gone on its host) is taken over.
    lock_stale_s: float = 60.0
    lock: bool = True  # false: no lock (only for file systems without hard links)
    # true: a save blocks the step loop only while this rank's state is copied to host memory
    # (pinned on a GPU; one extra copy of the rank's state held in RAM); writing, sha256, fsync,
    # the rename, `latest` and retention run in a background thread while training goes on.
    # The next save, a stop and the run's end wait for it; if it fails (full disk, non-finite
    # weights) every rank stops at the next step boundary with the one-line error, exit 1.
    # false: the loop waits for the whole save.
    async_save: bool = True

    def __post_init__(self) -> None:
        if self.save_interval < 0:
            raise ValueError(f"checkpoint.save_interval={self.save_interval}: must be >= 0")
        if not self.dir:
            raise ValueError("checkpoint.dir: must not be empty")
        if not self.resume:
            raise ValueError("checkpoint.resume: expected auto, never or a checkpoint path")
        if not self.lock_stale_s > 0:
            raise ValueError(f"checkpoint.lock_stale_s={self.lock_stale_s}: must be > 0")
        for name in ("keep_last", "keep_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"checkpoint.{name}={getattr(self, name)}: must be >= 0")
