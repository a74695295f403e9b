"""The one way the project checksums a file it wrote or is about to trust (checkpoints, shards).

Two digests, named by the algorithm string a manifest records beside each digest:

- ``sha256`` (:data:`PLAIN`): sha256 of the file's bytes. Data shards, and checkpoints written
  before the chunked digest (a file entry ``{"bytes", "sha256"}``).
- ``sha256-chunked-4MiB`` (:data:`CHUNKED`): cut the file into consecutive :data:`CHUNK`-byte
  chunks (the last one shorter, none empty; an empty file has no chunk); the digest is the
  sha256 of the concatenated 32-byte sha256 digests of the chunks, in file order. Checkpoints.
  Why: one sha256 stream runs at ~0.7-2 GB/s, slower than writing to the page cache or a
  parallel file system, and cannot be split over cores; chunks hash on as many threads as
  there are, while writing (:class:`ChunkedSha256`) and when verifying
  (:func:`file_digest`). Changing the chunk size is a new algorithm string, never a new meaning
  of an old one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BLOCK = 1 << 24  # 16 MiB reads: hashing, not syscalls, is the cost
PLAIN = "sha256"
CHUNK = 1 << 22  # 4 MiB: even a 10 MB tensor's write spreads over 3 threads
CHUNKED = "sha256-chunked-4MiB"
ALGORITHMS = (PLAIN, CHUNKED)


def threads() -> int:
    """Hashing threads: one per core, at most 16 (sha256 is CPU-bound and releases the GIL)."""
    return max(2, min(16, os.cpu_count() or 1))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def chunks_digest(chunk_digests: list[bytes]) -> str:
    """The :data:`CHUNKED` digest from the chunks' raw sha256 digests, in file order."""
    return hashlib.sha256(b"".join(chunk_digests)).hexdigest()


def file_chunked_sha256(path: str | Path, pool: ThreadPoolExecutor | None = None) -> str:
    """The :data:`CHUNKED` digest of a file, chunks hashed in parallel (reads stay in order)."""
    own = pool is None
    pool = pool or ThreadPoolExecutor(threads(), thread_name_prefix="sha256")
    try:
        pending = []
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                pending.append(pool.submit(lambda c: hashlib.sha256(c).digest(), chunk))
                if len(pending) >= 4 * threads():  # bound the chunks held in memory
                    pending[-4 * threads()].result()
        return chunks_digest([p.result() for p in pending])
    finally:
        if own:
            pool.shutdown()


def file_digest(path: str | Path, algorithm: str) -> str:
    """The digest of a file under a manifest's ``algorithm`` (one of :data:`ALGORITHMS`)."""
    if algorithm == PLAIN:
        return file_sha256(path)
    if algorithm == CHUNKED:
        return file_chunked_sha256(path)
    raise ValueError(
        f"{path}: unknown checksum algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)}); "
        "written by a newer version of the project? use that version"
    )


class ChunkedSha256:
    """The :data:`CHUNKED` digest of a stream, fed by :meth:`jobs` as the bytes pass.

    :meth:`jobs` cuts a buffer at chunk boundaries (file offsets) and returns one call per
    piece; the caller may run them on any threads, but must finish a buffer's calls before
    passing the next buffer (two buffers may share a chunk, whose sha256 takes bytes in order).
    """

    def __init__(self) -> None:
        self._chunks: list[hashlib._Hash] = []
        self.size = 0

    def jobs(self, view: memoryview) -> list[Callable[[], None]]:
        found, start = [], 0
        while start < len(view):
            if self.size % CHUNK == 0:
                self._chunks.append(hashlib.sha256())
            n = min(len(view) - start, CHUNK - self.size % CHUNK)
            found.append(_update(self._chunks[-1], view[start : start + n]))
            start += n
            self.size += n
        return found

    def hexdigest(self) -> str:
        return chunks_digest([c.digest() for c in self._chunks])


def _update(sha: hashlib._Hash, piece: memoryview) -> Callable[[], None]:
    return lambda: sha.update(piece)
