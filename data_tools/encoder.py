"""Parsing and tokenizing chunks of raw input in order, in this process or in worker processes.

A chunk travels as raw bytes (Pieces of whole lines): the JSON parsing, UTF-8 checks and
tokenizing all happen in the worker, so the parent only reads, writes and keeps count.

Kept apart from preprocess.py and free of torch/megatron imports so that worker processes start
in a fraction of a second under any multiprocessing start method.
"""

from __future__ import annotations

import multiprocessing.process
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

from data_tools.inputs import Parsed, Piece, Position, Problem, parse_piece
from data_tools.megatron_tokenizers import DocumentTokenizer

_worker_tokenizer: DocumentTokenizer | None = None


@dataclass
class Chunk:
    pieces: list[Piece] = field(default_factory=list)  # raw input, in file order
    nbytes: int = 0  # raw input bytes the chunk covers, bad documents included
    end: tuple[int, Position] = (0, Position())  # input file index and position after it
    last_of_shard: bool = False  # the output shard is complete after this chunk


@dataclass
class Encoded:
    tokens: dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (all tokens, each doc's length)
    bad: list[tuple[str, dict[str, Problem]]]  # (file:line, key -> why) per bad document


def encode_chunk(
    tokenizer: DocumentTokenizer,
    pieces: list[Piece],
    keys: list[str],
    max_doc_bytes: int,
    dtype: type,
) -> Encoded:
    """Every usable document of the pieces as its token ids (data_tools/megatron_tokenizers.py:
    ids then EOS by default), per key.

    One array per key and chunk, not per document: it pickles from a worker and writes to disk
    in one call each.
    """
    parsed = Parsed.empty(keys)
    for piece in pieces:
        parse_piece(piece, keys, max_doc_bytes, parsed)
    tokens = {key: tokenizer.encode_documents(parsed.texts[key], dtype) for key in keys}
    return Encoded(tokens, parsed.bad)


def _init_worker(tokenizer: DocumentTokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer  # unpickled (loaded by path) once per worker, not per chunk


def _encode_in_worker(pieces: list[Piece], keys: list[str], limit: int, dtype: type) -> Encoded:
    assert _worker_tokenizer is not None, "worker started without _init_worker"
    return encode_chunk(_worker_tokenizer, pieces, keys, limit, dtype)


class WorkerDied(RuntimeError):
    """A worker process ended abruptly (killed, out of memory); the message is one line."""


class Encoder:
    """Maps chunks to their tokens, keeping input order.

    With one worker, in this process (no copies between processes). With several, at most
    2 x workers chunks are in flight: Pool.imap would be simpler but its feeder thread drains
    the input iterator without bound, i.e. reads the whole corpus into memory when tokenizing
    is slower than reading. The workers run under a ProcessPoolExecutor, not a
    multiprocessing.Pool: a Pool silently replaces a worker that dies (e.g. to the OOM killer)
    and waits forever for its task, while the executor fails every pending task at once
    (BrokenProcessPool), which becomes WorkerDied naming the worker and its signal.
    """

    def __init__(
        self,
        tokenizer: DocumentTokenizer,
        keys: list[str],
        max_doc_bytes: int,
        dtype: type,
        workers: int,
    ) -> None:
        self.tokenizer, self.workers = tokenizer, workers
        self.args = (keys, max_doc_bytes, dtype)
        self.pool: ProcessPoolExecutor | None = None
        self.processes: dict[int, multiprocessing.process.BaseProcess] = {}

    def __enter__(self) -> Encoder:
        if self.workers > 1:
            self.pool = ProcessPoolExecutor(
                self.workers, initializer=_init_worker, initargs=(self.tokenizer,)
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=exc_type is None, cancel_futures=True)
            for process in self.processes.values():  # on an error: stop now, not after a chunk
                if process.exitcode is None:
                    process.kill()
                process.join()
            self.pool = None

    def map(self, chunks: Iterable[Chunk]) -> Iterator[tuple[Chunk, Encoded]]:
        if self.pool is None:
            for chunk in chunks:
                yield chunk, encode_chunk(self.tokenizer, chunk.pieces, *self.args)
            return
        pending: deque[tuple[Chunk, Future[Encoded]]] = deque()
        try:
            for chunk in chunks:
                task = self.pool.submit(_encode_in_worker, chunk.pieces, *self.args)
                pending.append((chunk, task))
                # The executor starts workers as tasks arrive; remember them to name a dead one.
                self.processes.update(getattr(self.pool, "_processes", None) or {})
                if len(pending) >= 2 * self.workers:
                    done, future = pending.popleft()
                    yield done, self._result(future)
            while pending:
                done, future = pending.popleft()
                yield done, self._result(future)
        except BrokenProcessPool as e:  # from submit() or result(), whichever sees it first
            raise WorkerDied(self._death()) from e

    def _result(self, future: Future[Encoded]) -> Encoded:
        # The executor's own thread notices a death, unless the worker died half-way through
        # sending a result: then that thread waits for the rest forever (seen 1 in 30 kills).
        # So this thread also watches the workers, twice a second.
        while True:
            try:
                return future.result(timeout=0.5)
            except FutureTimeout:
                if any(p.exitcode not in (None, 0) for p in self.processes.values()):
                    raise WorkerDied(self._death()) from None

    def _death(self) -> str:
        # exitcode reaps a dead process without waiting (waitpid WNOHANG); survivors are alive.
        # The executor's own thread reaps and joins the workers too once one dies, and of two
        # threads calling waitpid on a pid one sees nothing: wait a moment for the status.
        # The executor terminates the survivors (SIGTERM) once one dies: name the first one.
        deadline = time.monotonic() + 5
        while True:
            dead = [p for p in self.processes.values() if p.exitcode not in (None, 0)]
            if any(p.exitcode != -signal.SIGTERM for p in dead) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not dead:
            return "a tokenizing worker process died; rerun the same command to resume"
        p = min(dead, key=lambda p: p.exitcode == -signal.SIGTERM)
        code = p.exitcode or 0
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        oom = "; the kernel's OOM killer sends SIGKILL: lower --workers" if code == -9 else ""
        return f"tokenizing worker pid {p.pid} died ({how}{oom}); rerun the same command to resume"
