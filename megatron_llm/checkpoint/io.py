"""Saving a run through the DeepSpeed engine.

Layout of ``checkpoint.dir``::

    latest                  text: the tag of the newest complete checkpoint (DeepSpeed's)
    global_step<N>/         DeepSpeed's model and optimizer shards for step N
        run_state.json      step, consumed samples, tokens seen (human-readable copy)
        config.yaml         the resolved run config
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml


def tag_for(step: int) -> str:
    return f"global_step{step}"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(
    engine: Any, ckpt_dir: str, *, step: int, run_state: dict[str, Any], config: dict[str, Any]
) -> Path:
    """Save model, optimizer, scheduler and run state for ``step``; every rank calls this."""
    tag = tag_for(step)
    engine.save_checkpoint(
        ckpt_dir, tag=tag, client_state={"run_state": run_state, "config": config}
    )
    path = Path(ckpt_dir) / tag
    if dist.get_rank() == 0:
        _write_atomic(path / "run_state.json", json.dumps(run_state, indent=2) + "\n")
        _write_atomic(path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    dist.barrier()
    return path
