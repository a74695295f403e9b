"""The output of one --json-keys key: its shards and the manifest that vouches for them.

Without --shard-size there is one shard, PREFIX.bin/.idx. With it, shards are PREFIX_00000,
PREFIX_00001, ...: shard n ends at the first document boundary after n+1 times --shard-size
bytes of input (counted from where shard n began), so the boundaries depend on the input
alone, never on the number of workers or on where an earlier run stopped.

The manifest of DIR/PREFIX is DIR/manifests/PREFIX.manifest.json (a subfolder, so that DIR holds
only shards: see megatron_llm/data/manifest.py), format "megatron_llm/preprocess", version 3:

  format, version, json_key, sources (path, bytes, mtime_ns), tokenizer_sha256, settings
          what made the output; a rerun reuses or resumes it only if all of these match
  complete    false while a run is under way (or after it failed): the output is incomplete
  prefix      the output prefix, relative to the manifest's folder ("../NAME")
  documents, tokens, dtype, skipped (bad documents by reason), encoding, tokenizer (path,
          vocab_size, eod), max_token_id (largest id in any shard; -1 when there are none)
  lost_input  compressed input dropped under --on-error skip (file, offset, bytes, why)
  shards      for each finished shard: prefix (relative to the manifest's folder), documents,
          tokens, skipped, files (sizes of .bin/.idx), sha256 (of .bin/.idx), max_token_id,
          and end, the input position after its last document

It is rewritten atomically after each shard is renamed into place, so it only ever lists
complete shards; a rerun keeps those whose files still have the listed sizes and resumes
reading the input at the end of the last one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools.inputs import Position
from megatron_llm.atomic import write_atomic
from megatron_llm.data.manifest import (
    ManifestError,
    legacy_manifest_path,
    manifest_path,
    read_manifest,
    resolve_shard,
    stored_prefix,
)

MANIFEST_FORMAT = "megatron_llm/preprocess"
MANIFEST_VERSION = 3


def shard_prefix(prefix: Path, number: int, sharded: bool) -> Path:
    return prefix.with_name(f"{prefix.name}_{number:05d}") if sharded else prefix


def load_manifest(prefix: Path) -> dict[str, Any] | None:
    """The manifest of an output prefix, or None if it has none or it is unreadable."""
    try:
        return read_manifest(manifest_path(prefix))
    except ManifestError:
        return None  # a rerun rebuilds; readers report it (megatron_llm/data/manifest.py)


def write_manifest(prefix: Path, manifest: dict[str, Any]) -> None:
    path = manifest_path(prefix)
    path.parent.mkdir(exist_ok=True)
    write_atomic(path, json.dumps(manifest, indent=2) + "\n")
    # One written by an earlier version beside the shards would now be stale, and it breaks
    # Megatron-LM's merge_datasets.py on the folder.
    legacy_manifest_path(prefix).unlink(missing_ok=True)


def shard_path(prefix: Path, shard: dict[str, Any]) -> Path:
    """The files of a manifest's shard entry (the manifest of output ``prefix``)."""
    return resolve_shard(manifest_path(prefix), shard["prefix"])


@dataclass
class ShardStats:
    documents: int = 0
    tokens: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def shard_entry(
    output: Path, shard: Path, stats: ShardStats, end: tuple[int, Position], writer: Any
) -> dict[str, Any]:
    return {
        "prefix": stored_prefix(manifest_path(output), shard),
        "documents": stats.documents,
        "tokens": stats.tokens,
        "skipped": dict(sorted(stats.skipped.items())),
        "files": {ext: os.path.getsize(f"{shard}{ext}") for ext in (".bin", ".idx")},
        "sha256": writer.sha256,
        "max_token_id": writer.max_token_id,
        "end": {"file": end[0], "offset": end[1].offset, "line": end[1].line},
    }


def intact_shards(prefix: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's shards, up to the first whose files are missing or changed size."""
    kept = []
    for shard in manifest.get("shards", []):
        files, path = shard.get("files", {}), shard_path(prefix, shard)
        if not all(
            Path(f"{path}{ext}").is_file() and os.path.getsize(f"{path}{ext}") == files.get(ext)
            for ext in (".bin", ".idx")
        ):
            break
        kept.append(shard)
    return kept


def end_of(shard: dict[str, Any]) -> tuple[int, Position]:
    end = shard["end"]
    return end["file"], Position(end["offset"], end["line"])


def remove_stale_temporaries(prefix: Path) -> None:
    # Left by a run that was killed: PREFIX[_NNNNN].tmp-PID.bin/.idx beside the shards, and
    # the atomic writer's .NAME.tmp-* of the manifest. Never read by anyone.
    patterns = [
        (prefix.parent, f"{prefix.name}.tmp-*"),
        (prefix.parent, f"{prefix.name}_[0-9][0-9][0-9][0-9][0-9].tmp-*"),
        (manifest_path(prefix).parent, f".{manifest_path(prefix).name}.tmp-*"),
        (prefix.parent, f"{legacy_manifest_path(prefix).name}.tmp-*"),
    ]
    for folder, pattern in patterns:
        for path in folder.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
