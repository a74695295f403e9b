"""Checking token shards before a run reads them: what a reader must know before work starts.

For each shard, unless the reader opts out (``data.verify=false``, ``eval --no-verify-data``):

1. structure (always; reads the .idx, stats the .bin): magic, version, dtype, the index's size
   against its header, pointers rising gap-free, document boundaries, the .bin's length against
   the index. A flipped .idx header or a truncated .bin stops here.
2. its manifest, if one vouches for it (megatron_llm/data/manifest.py): the shard must be
   listed (a leftover of another run is refused), its file sizes and the .idx's sha256 must
   match (the .idx is small: hashed every time), and so must the .bin's sha256. Hashing a .bin
   reads all of it (10 GB: about 5 s of one core at 2 GB/s, plus reading it from disk), so it
   is done once and remembered in a stamp (below); a .bin that changes afterwards has a new
   size or mtime and is hashed again. The manifest's tokenizer sha256 must be the run's.
3. token ids: the largest id must be inside the tokenizer's vocabulary (Megatron-LM's
   SentencePieceTokenizer puts its EOD at vocab + 2: such shards are refused at start, not at
   some later step, and not silently masked under tensor parallelism). The manifest records the
   largest id; without a manifest the .bin is scanned once (about 20 GB/s of CPU, so disk-bound)
   and the result remembered in the stamp.

The stamp is JSON (never a pickle), one file per shard in ``CACHE/shard_checks/`` where CACHE is
data.cache_dir or megatron-core's default cache folder beside the shard (``PREFIX/cache``). It
holds the .bin's size, mtime_ns and inode, and what was learned: the verified sha256 and the
token id range. If the cache folder cannot be written, the work is simply redone next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_llm.atomic import WriteFailed, write_atomic
from megatron_llm.data.indexed import ShardError, read_index, structure_problems, token_range
from megatron_llm.data.manifest import Vouched, find_manifest
from megatron_llm.hashing import file_sha256

STAMP_VERSION = 1
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checked:
    prefix: str
    documents: int
    tokens: int
    max_token_id: int  # -1 when the shard holds no tokens
    manifest: Path | None


def check_shard(
    prefix: str,
    *,
    vocab_size: int,
    tokenizer_sha256: str | None,
    cache_dir: str | None,
    tokenizer_name: str = "the tokenizer",
) -> Checked:
    """Everything above, for one shard; ShardError with one line on the first problem."""
    index = read_index(f"{prefix}.idx")
    if not Path(f"{prefix}.bin").is_file():
        raise ShardError(f"{prefix}.bin: no such file (the .idx is there)")
    if problems := structure_problems(index, prefix):
        raise ShardError(problems[0])
    vouched = find_manifest(prefix)
    if vouched is not None:
        _check_vouched(prefix, vouched, tokenizer_sha256, tokenizer_name)
    stamp = _Stamp(prefix, cache_dir)
    entry = vouched.entry if vouched else None
    if entry and "sha256" in entry:
        want = entry["sha256"][".bin"]
        if stamp.get("sha256") != want:
            have = file_sha256(f"{prefix}.bin")
            if have != want:
                raise ShardError(
                    f"{prefix}.bin: sha256 {have[:12]}... but {vouched.path} lists "
                    f"{want[:12]}...: the data changed or is corrupt; re-run preprocess.py "
                    "(data.verify=false skips this check)"
                )
            stamp.put(sha256=want)
        high = int(entry["max_token_id"])
    else:
        if "max_token_id" not in stamp.data:
            low, high = token_range(f"{prefix}.bin", index.dtype)
            stamp.put(min_token_id=low, max_token_id=high)
        low, high = stamp.data["min_token_id"], stamp.data["max_token_id"]
        if low < 0:
            raise ShardError(f"{prefix}.bin: holds a negative token id ({low}): corrupt data")
    if high >= vocab_size:
        raise ShardError(
            f"{prefix}: largest token id {high}, but {tokenizer_name} has {vocab_size} ids "
            f"(0..{vocab_size - 1}): the shard was made with another tokenizer (Megatron-LM's "
            "SentencePieceTokenizer puts EOD at vocab + 2); re-make it with data_tools/"
            "preprocess.py, or point data.tokenizer at the one it was made with"
        )
    lengths = index.lengths
    tokens = int(lengths.sum(dtype="int64"))
    return Checked(prefix, len(index.bounds) - 1, tokens, high, vouched.path if vouched else None)


def _check_vouched(
    prefix: str, vouched: Vouched, tokenizer_sha256: str | None, tokenizer_name: str
) -> None:
    m, path = vouched.manifest, vouched.path
    made_with = m.get("tokenizer_sha256")
    if tokenizer_sha256 is not None and made_with is not None and made_with != tokenizer_sha256:
        raise ShardError(
            f"{prefix}: made with a different tokenizer than {tokenizer_name} (sha256 "
            f"{made_with[:12]}... in {path} vs {tokenizer_sha256[:12]}...); point "
            "data.tokenizer at the model the shard was made with, or re-run preprocess.py"
        )
    if "shards" not in m:
        return  # a manifest of an older kind, without a shard list
    entry = vouched.entry
    if entry is None:
        raise ShardError(
            f"{prefix}: not listed in {path}: a leftover of an earlier or interrupted run; "
            "re-run preprocess.py, or remove the stray files"
        )
    if m.get("complete") is not True:
        log.warning(f"{prefix}: {path} says its run did not finish: the output is incomplete")
    for ext, size in entry.get("files", {}).items():
        have = os.path.getsize(f"{prefix}{ext}")
        if have != size:
            raise ShardError(
                f"{prefix}{ext}: {have} bytes, but {path} lists {size}: the file changed "
                "after preprocess.py wrote it; re-run preprocess.py"
            )
    want = entry.get("sha256", {}).get(".idx")
    if want is not None and (have_idx := file_sha256(f"{prefix}.idx")) != want:
        raise ShardError(
            f"{prefix}.idx: sha256 {have_idx[:12]}... but {path} lists {want[:12]}...: the index "
            "is corrupt; re-run preprocess.py"
        )


class _Stamp:
    """What earlier checks learned about a .bin, valid while its size, mtime and inode hold."""

    def __init__(self, prefix: str, cache_dir: str | None) -> None:
        folder = Path(cache_dir) if cache_dir else Path(prefix, "cache")
        key = hashlib.sha256(str(Path(prefix).resolve()).encode()).hexdigest()[:16]
        self.path = folder / "shard_checks" / f"{Path(prefix).name}-{key}.json"
        st = os.stat(f"{prefix}.bin")
        self.file = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
        self.data: dict[str, Any] = {}
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):  # unreadable, not UTF-8 or not JSON: check again
            return
        if not isinstance(saved, dict):  # a cache dir may be shared: trust no shape
            return
        if saved.get("version") == STAMP_VERSION and saved.get("bin") == self.file:
            self.data = saved.get("learned", {})

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, **learned: Any) -> None:
        self.data.update(learned)
        record = {"version": STAMP_VERSION, "bin": self.file, "learned": self.data}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(record, indent=1) + "\n")
        except (OSError, WriteFailed) as e:
            log.warning(f"{self.path}: cannot remember the shard check ({e}); redone next run")
