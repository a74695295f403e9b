"""The output of one --json-keys key: its shards and the manifest that vouches for them.

Without --shard-size there is one shard, PREFIX.bin/.idx. With it, shards are PREFIX_00000,
PREFIX_00001, ...: shard n ends at the first document boundary after n+1 times --shard-size
bytes of input (counted from where shard n began), so the boundaries depend on the input
alone, never on the number of workers or on where an earlier run stopped.

PREFIX.manifest.json (format "megatron_llm/preprocess", version 2) holds what made the output
(sources with sizes and mtimes, tokenizer sha256, settings), ``complete`` (false while a run is
under way), and ``shards``: for each finished shard its prefix, documents, tokens, bad documents
skipped by reason, file sizes, and ``end``, the input position after its last document. It is
rewritten (temp name, then rename) after each shard is renamed into place, so it only ever
lists complete shards; a rerun keeps those whose files still have the listed sizes and resumes
reading the input at the end of the last one.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools.inputs import Position
from megatron_llm.atomic import write_atomic

MANIFEST_FORMAT = "megatron_llm/preprocess"
MANIFEST_VERSION = 2


def shard_prefix(prefix: Path, number: int, sharded: bool) -> Path:
    return prefix.with_name(f"{prefix.name}_{number:05d}") if sharded else prefix


def manifest_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".manifest.json")


def load_manifest(prefix: Path) -> dict[str, Any] | None:
    try:
        return json.loads(manifest_path(prefix).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_manifest(prefix: Path, manifest: dict[str, Any]) -> None:
    write_atomic(manifest_path(prefix), json.dumps(manifest, indent=2) + "\n")


@dataclass
class ShardStats:
    documents: int = 0
    tokens: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def shard_entry(prefix: Path, stats: ShardStats, end: tuple[int, Position]) -> dict[str, Any]:
    return {
        "prefix": str(prefix),
        "documents": stats.documents,
        "tokens": stats.tokens,
        "skipped": dict(sorted(stats.skipped.items())),
        "files": {ext: os.path.getsize(f"{prefix}{ext}") for ext in (".bin", ".idx")},
        "end": {"file": end[0], "offset": end[1].offset, "line": end[1].line},
    }


def intact_shards(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's shards, up to the first whose files are missing or changed size."""
    kept = []
    for shard in manifest.get("shards", []):
        files = shard.get("files", {})
        if not all(
            Path(f"{shard['prefix']}{ext}").is_file()
            and os.path.getsize(f"{shard['prefix']}{ext}") == files.get(ext)
            for ext in (".bin", ".idx")
        ):
            break
        kept.append(shard)
    return kept


def end_of(shard: dict[str, Any]) -> tuple[int, Position]:
    end = shard["end"]
    return end["file"], Position(end["offset"], end["line"])


def remove_stale_temporaries(prefix: Path) -> None:
    # Left by a run that was killed: PREFIX[_NNNNN].tmp-PID.bin/.idx. Never read by anyone.
    for pattern in (f"{prefix.name}.tmp-*", f"{prefix.name}_[0-9][0-9][0-9][0-9][0-9].tmp-*"):
        for path in prefix.parent.glob(pattern):
            path.unlink(missing_ok=True)
