"""The one way the project checksums a file it wrote or is about to trust (checkpoints, shards)."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 24  # 16 MiB reads: hashing, not syscalls, is the cost


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()
