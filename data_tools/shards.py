"""Writing one token shard (.bin/.idx) atomically with megatron-core's IndexedDatasetBuilder."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np


def _indexed_dataset_builder() -> type:
    # Imported on first use: megatron.core pulls in torch (seconds), which reuse runs and
    # tokenizing workers never need. Its import warns that Transformer Engine and Apex are
    # missing, which is irrelevant to writing shards.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    return IndexedDatasetBuilder


class ShardWriter:
    """Documents go to PREFIX.tmp-PID.bin; commit() renames .bin, .idx, then writes the manifest.

    Until commit() nothing at PREFIX changes, so a failed or interrupted run leaves the previous
    shard (if any) intact; abort() removes the temporary files.
    """

    def __init__(self, prefix: Path, dtype: type) -> None:
        self.prefix = prefix
        self.tmp = prefix.with_name(f"{prefix.name}.tmp-{os.getpid()}")
        self.builder = _indexed_dataset_builder()(f"{self.tmp}.bin", dtype=dtype)
        self.done = False

    def add(self, tokens: np.ndarray) -> None:
        self.builder.add_document(tokens, [len(tokens)])  # one sequence per document

    def commit(self, manifest: dict[str, Any]) -> None:
        self.builder.finalize(f"{self.tmp}.idx")
        manifest_file = self.prefix.with_name(self.prefix.name + ".manifest.json")
        # The old manifest goes first: from here until the new one lands, the shard is not
        # vouched for, so a crash in between makes the next run rebuild rather than reuse.
        manifest_file.unlink(missing_ok=True)
        os.replace(f"{self.tmp}.bin", f"{self.prefix}.bin")
        os.replace(f"{self.tmp}.idx", f"{self.prefix}.idx")
        files = {ext: os.path.getsize(f"{self.prefix}{ext}") for ext in (".bin", ".idx")}
        tmp_manifest = manifest_file.with_name(manifest_file.name + ".tmp")
        tmp_manifest.write_text(json.dumps({**manifest, "files": files}, indent=2) + "\n")
        os.replace(tmp_manifest, manifest_file)
        self.done = True

    def abort(self) -> None:
        if self.done:
            return
        self.builder.data_file.close()
        for ext in (".bin", ".idx"):
            Path(f"{self.tmp}{ext}").unlink(missing_ok=True)
        self.done = True
