"""Megatron's MMIDIDX v1 token shards: the format, a writer, a memory-mapped reader, a checker.

A shard is two files sharing a prefix P. All integers are little-endian.

P.bin   the tokens of every sequence, back to back, in the dtype named by the index; nothing
        else (no header, no padding).

P.idx   the index:
        offset  size        field
        0       9           magic b"MMIDIDX\\x00\\x00"
        9       8           u64 version, 1
        17      1           u8 dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                            6 float64, 7 float32, 8 uint16
        18      8           u64 S, the number of sequences
        26      8           u64 D, the number of document boundaries (documents + 1)
        34      4*S         int32 sequence lengths, in tokens
        34+4S   8*S         int64 sequence start offsets in P.bin, in bytes
        34+12S  8*D         int64 document boundaries: document d is sequences
                            [bounds[d], bounds[d+1]); bounds[0] = 0, bounds[D-1] = S

Our writer stores one sequence per document (Megatron's tools do the same for GPT data): every
document's tokens end with the tokenizer's end-of-document id; a document without tokens (an
empty text, as Megatron-LM's tools write it) has no sequence. megatron-core's
``IndexedDatasetBuilder``/``IndexedDataset`` write and read the same bytes (without its optional
multimodal sequence modes), which the tests check in both directions.

Writing goes to P.tmp-PID.bin/.idx, renamed to P.bin then P.idx when complete: a reader never
sees half a shard, and an interrupted write leaves the previous shard, if any, untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from megatron_llm.atomic import write_failed

T = TypeVar("T")

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
DTYPES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODES = {np.dtype(t): c for c, t in DTYPES.items()}


class ShardError(ValueError):
    """A shard that is not valid MMIDIDX v1; the message names the file and what is wrong."""


class ShardWriter:
    """Appends documents to P.tmp-PID.bin; commit() writes the index and renames both files.

    It hashes what it writes (``sha256`` per extension after commit) and keeps the largest
    token id (``max_token_id``, -1 for no tokens), which manifests record for readers to check.
    A failing write (full disk, read-only folder) raises WriteFailed naming the file and the
    errno; the caller's abort() then removes the temporaries.
    """

    def __init__(self, prefix: str | Path, dtype: type) -> None:
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code; use one of {list(CODES)}")
        self.tmp = f"{self.prefix}.tmp-{os.getpid()}"
        self.lengths: list[np.ndarray] = []
        self.done = False
        self.bin_hash = hashlib.sha256()
        self.sha256: dict[str, str] = {}
        self.max_token_id = -1
        self.data = None
        self.data = self._guard(f"{self.tmp}.bin", lambda: open(f"{self.tmp}.bin", "wb"))  # noqa: SIM115

    def _guard(self, path: str, action: Callable[[], T]) -> T:
        try:
            return action()
        except OSError as e:
            raise write_failed(path, e) from e

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Documents whose tokens are concatenated in ``tokens``, ``lengths[i]`` each."""
        assert int(lengths.sum()) == len(tokens), "lengths must add up to the tokens"
        raw = np.ascontiguousarray(tokens, dtype=self.dtype)
        if len(raw):
            self.max_token_id = max(self.max_token_id, int(raw.max()))
        data = raw.tobytes()
        self.bin_hash.update(data)
        self._guard(f"{self.tmp}.bin", lambda: self.data.write(data))
        self.lengths.append(np.asarray(lengths, dtype=np.int32))

    def commit(self) -> None:
        self._guard(f"{self.tmp}.bin", self._close_data)
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int32)
        # A document of no tokens has no sequence (Megatron-LM's tools write it so).
        bounds = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths > 0, out=bounds[1:])
        lengths = lengths[lengths > 0]
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        index = b"".join(
            [
                MAGIC,
                np.array([VERSION], "<u8").tobytes(),
                np.array([CODES[self.dtype]], "<u1").tobytes(),
                np.array([len(lengths), len(bounds)], "<u8").tobytes(),
                lengths.astype("<i4").tobytes(),
                pointers.astype("<i8").tobytes(),
                bounds.astype("<i8").tobytes(),
            ]
        )
        self._guard(f"{self.tmp}.idx", lambda: _write_synced(f"{self.tmp}.idx", index))
        self.sha256 = {".bin": self.bin_hash.hexdigest(), ".idx": hashlib.sha256(index).hexdigest()}
        os.replace(f"{self.tmp}.bin", f"{self.prefix}.bin")
        os.replace(f"{self.tmp}.idx", f"{self.prefix}.idx")
        self.done = True

    def _close_data(self) -> None:
        # fsync before the rename: after a power cut a shard is whole or absent, never zeros.
        self.data.flush()
        os.fsync(self.data.fileno())
        self.data.close()

    def abort(self) -> None:
        if self.done:
            return
        if self.data is not None:
            with contextlib.suppress(OSError):  # a full disk fails the flush too: still remove
                self.data.close()
        for ext in (".bin", ".idx"):
            Path(f"{self.tmp}{ext}").unlink(missing_ok=True)
        self.done = True


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Index:
    dtype: np.dtype
    lengths: np.ndarray  # int32 (S,)
    pointers: np.ndarray  # int64 (S,), bytes into .bin
    bounds: np.ndarray  # int64 (D,)


def read_index(path: str | Path) -> Index:
    """Parse P.idx, checking the header and that the arrays fill the file exactly."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: no such file (a shard is PREFIX.bin + PREFIX.idx)")
    raw = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else b""
    size = len(raw)
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    if bytes(raw[: len(MAGIC)]) != MAGIC:
        raise ShardError(
            f"{path}: bad magic {bytes(raw[: len(MAGIC)])!r}, expected {MAGIC!r}: not an "
            "MMIDIDX index (or its start is corrupt)"
        )
    version = int(np.frombuffer(raw, "<u8", 1, 9)[0])
    if version != VERSION:
        raise ShardError(f"{path}: index version {version}, only version {VERSION} is read")
    code = int(raw[17])
    if code not in DTYPES:
        raise ShardError(f"{path}: unknown dtype code {code}, expected one of {sorted(DTYPES)}")
    sequences, documents = (int(x) for x in np.frombuffer(raw, "<u8", 2, 18))
    expected = HEADER_BYTES + 12 * sequences + 8 * documents
    if size != expected:
        raise ShardError(
            f"{path}: {size} bytes, but its header ({sequences} sequences, {documents} "
            f"document boundaries) needs {expected}: the index is truncated or corrupt"
        )
    offset = HEADER_BYTES
    lengths = np.frombuffer(raw, "<i4", sequences, offset)
    pointers = np.frombuffer(raw, "<i8", sequences, offset + 4 * sequences)
    bounds = np.frombuffer(raw, "<i8", documents, offset + 12 * sequences)
    return Index(np.dtype(DTYPES[code]), lengths, pointers, bounds)


class IndexedShard:
    """Documents of a shard, read through memory maps: ``shard[i]`` is document i's tokens.

    Opening checks the structure (header, pointers, boundaries, the .bin's length against the
    index: a read of the .idx only) and raises ShardError on the first problem, unless
    check=False.
    """

    def __init__(self, prefix: str | Path, check: bool = True) -> None:
        self.prefix = str(prefix)
        self.index = read_index(f"{self.prefix}.idx")
        bin_path = Path(f"{self.prefix}.bin")
        if not bin_path.is_file():
            raise ShardError(f"{bin_path}: no such file (the .idx is there)")
        if check and (problems := structure_problems(self.index, self.prefix)):
            raise ShardError(problems[0])
        self.tokens = (
            np.memmap(bin_path, dtype=self.index.dtype, mode="r")
            if bin_path.stat().st_size
            else np.zeros(0, self.index.dtype)
        )

    def __len__(self) -> int:
        return len(self.index.bounds) - 1

    def __getitem__(self, doc: int) -> np.ndarray:
        first, last = int(self.index.bounds[doc]), int(self.index.bounds[doc + 1])
        if last == first:
            return self.tokens[:0]
        start = int(self.index.pointers[first]) // self.index.dtype.itemsize
        end = int(self.index.pointers[last - 1]) // self.index.dtype.itemsize
        return self.tokens[start : end + int(self.index.lengths[last - 1])]


def structure_problems(index: Index, prefix: str | Path) -> list[str]:
    """What is wrong with a shard's index and its .bin's length, one line each naming the file.

    Reads the index arrays (tens of MB for a 10 GB shard) and stats the .bin, never its
    contents."""
    idx, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    problems = []
    lengths, pointers, bounds = index.lengths, index.pointers, index.bounds
    item = index.dtype.itemsize
    if (lengths < 0).any():
        problems.append(f"{idx}: sequence {int(np.argmax(lengths < 0))} has a negative length")
    # Monotonic and gap-free: each sequence starts where the one before it ends.
    expected = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=expected[1:])
    bad = np.nonzero(pointers != expected * item)[0]
    if len(bad):
        problems.append(
            f"{idx}: sequence {int(bad[0])} starts at byte {int(pointers[bad[0]])}, but the "
            f"lengths before it put it at {int(expected[bad[0]] * item)} ({len(bad)} such): "
            "the index is corrupt; re-run preprocess.py"
        )
    if (
        len(bounds) == 0
        or bounds[0] != 0
        or bounds[-1] != len(lengths)
        or (np.diff(bounds) < 0).any()
    ):
        problems.append(
            f"{idx}: document boundaries must rise from 0 to {len(lengths)} (the sequence "
            "count): the index is corrupt; re-run preprocess.py"
        )
    need = int(lengths.sum(dtype=np.int64)) * item
    have = bin_path.stat().st_size
    if have != need:
        what = "truncated" if have < need else "longer than its index (stray bytes)"
        problems.append(
            f"{bin_path}: {have} bytes, but {idx} describes {need} ({need // item} tokens of "
            f"{index.dtype}): the .bin is {what}; re-run preprocess.py to rewrite it"
        )
    return problems


SCAN_TOKENS = 1 << 24  # tokens per block when scanning a .bin: memory stays flat


def token_range(bin_path: str | Path, dtype: np.dtype) -> tuple[int, int]:
    """(smallest, largest) token id in a .bin, read in blocks; (0, -1) when it is empty."""
    path = Path(bin_path)
    if not path.stat().st_size:
        return 0, -1
    tokens = np.memmap(path, dtype=dtype, mode="r")
    low, high = None, None
    for start in range(0, len(tokens), SCAN_TOKENS):
        part = tokens[start : start + SCAN_TOKENS]
        low = int(part.min()) if low is None else min(low, int(part.min()))
        high = int(part.max()) if high is None else max(high, int(part.max()))
    del tokens
    assert low is not None and high is not None
    return low, high


def out_of_vocab(prefix: str | Path, dtype: np.dtype, vocab_size: int) -> str | None:
    """One line naming the first token id outside [0, vocab_size), or None."""
    bin_path = Path(f"{prefix}.bin")
    low, high = token_range(bin_path, dtype)
    if high < vocab_size and low >= 0:
        return None
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    for start in range(0, len(tokens), SCAN_TOKENS):
        part = tokens[start : start + SCAN_TOKENS]
        outside = np.nonzero((part >= vocab_size) | (part < 0))[0]
        if len(outside):
            at = start + int(outside[0])
            return (
                f"{bin_path}: token {at} is {int(tokens[at])}, outside the vocabulary [0, "
                f"{vocab_size}) (largest id {high}): the data is corrupt or from another tokenizer"
            )
    raise AssertionError("unreachable: token_range saw an id outside the vocabulary")


def verify(prefix: str | Path, vocab_size: int | None = None) -> list[str]:
    """Everything wrong with a shard, one line each naming the file; empty when it is sound."""
    idx, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    try:
        index = read_index(idx)
    except ShardError as e:
        return [str(e)]
    if not bin_path.is_file():
        return [f"{bin_path}: no such file (the .idx is there)"]
    problems = structure_problems(index, prefix)
    if not problems and vocab_size is not None and index.dtype.kind in "iu":
        if problem := out_of_vocab(prefix, index.dtype, vocab_size):
            problems.append(problem)
    return problems
