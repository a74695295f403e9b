"""Where a shard's manifest lives, and finding the manifest that vouches for a given shard.

The manifest of the output prefix DIR/NAME is DIR/manifests/NAME.manifest.json (format:
data_tools/shards.py). It sits in a subfolder, not beside the shards, so that a folder of shards
holds nothing but .bin/.idx files: Megatron-LM's tools/merge_datasets.py takes every file of a
folder for a shard prefix (and skips folders). Shard prefixes inside a manifest are relative to
the manifest's own folder ("../NAME_00000"), so a copied or moved folder checks its own files,
never the ones at the path where it was made.

A shard DIR/NAME_NNNNN of a --shard-size output is vouched for by DIR/manifests/NAME's manifest
(which lists it), a single shard DIR/NAME by its own. Manifests of earlier versions, written
beside the shards as DIR/NAME.manifest.json, are still read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_DIR = "manifests"
_NUMBERED = re.compile(r"^(?P<base>.+)_\d{5}$")


class ManifestError(ValueError):
    """A manifest that exists but cannot be used; the message names the file and the fix."""


def manifest_path(prefix: str | Path) -> Path:
    prefix = Path(prefix)
    return prefix.parent / MANIFEST_DIR / f"{prefix.name}.manifest.json"


def legacy_manifest_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.manifest.json")


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at path; None if there is none; ManifestError if it is unreadable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ManifestError(f"{path}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError:  # binary content: never parsed, let alone unpickled
        raise ManifestError(
            f"{path}: not valid JSON (not UTF-8 text); re-run preprocess.py"
        ) from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}); re-run preprocess.py"
        ) from e
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: not a JSON object; re-run preprocess.py")
    return manifest


def shard_prefixes(path: Path, manifest: dict[str, Any]) -> list[Path]:
    """The prefixes of the shards a manifest lists, resolved against the manifest's folder."""
    return [resolve_shard(path, s["prefix"]) for s in manifest.get("shards", [])]


def resolve_shard(path: Path, stored: str) -> Path:
    if path.parent.name == MANIFEST_DIR:
        return Path(os.path.normpath(path.parent / stored))  # "../NAME_00000": from the manifest
    # An older manifest beside its shards stored the prefix as given to preprocess.py (relative
    # to that run's working directory): only the name still points at the right files.
    return path.parent / Path(stored).name


def stored_prefix(path: Path, prefix: Path) -> str:
    """How the manifest at path names a shard prefix: relative to the manifest's folder."""
    return os.path.relpath(prefix, path.parent)


@dataclass(frozen=True)
class Vouched:
    path: Path  # the manifest file
    manifest: dict[str, Any]
    entry: dict[str, Any] | None  # the shard's entry in manifest["shards"] (None: not listed)


def find_manifest(prefix: str | Path) -> Vouched | None:
    """The manifest that lists the shard at prefix, or None when no manifest speaks for it.

    A manifest found for the shard's output that does not list it is returned with entry None:
    the shard is a leftover of another run, or the manifest was cut short.
    """
    prefix = Path(prefix)
    names = [prefix.name]
    if m := _NUMBERED.match(prefix.name):
        names.append(m["base"])
    for name in names:
        owner = prefix.with_name(name)
        for path in (manifest_path(owner), legacy_manifest_path(owner)):
            manifest = read_manifest(path)
            if manifest is None:
                continue
            target = prefix.resolve()
            for entry, listed in zip(manifest.get("shards", []), shard_prefixes(path, manifest)):
                if listed.resolve() == target:
                    return Vouched(path, manifest, entry)
            if name == prefix.name or manifest.get("settings", {}).get("shard_size"):
                return Vouched(path, manifest, None)  # its output, but not a shard it lists
    return None
