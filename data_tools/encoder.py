"""Tokenizing chunks of documents in order, in this process or in a pool of worker processes.

Kept apart from preprocess.py and free of torch/megatron imports so that worker processes start
in a fraction of a second under any multiprocessing start method.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult, Pool
from types import TracebackType

import numpy as np

from data_tools.inputs import Position
from megatron_llm.data.tokenizer import Tokenizer

_worker_tokenizer: Tokenizer | None = None


@dataclass
class Chunk:
    items: list[tuple[str, str]] = field(default_factory=list)  # (json key, text) in file order
    nbytes: int = 0  # raw input bytes the chunk covers, bad documents included
    end: tuple[int, Position] = (0, Position())  # input file index and position after it
    last_of_shard: bool = False  # the output shard is complete after this chunk
    skipped: dict[str, Counter[str]] = field(default_factory=dict)  # key -> reason -> count


Encoded = tuple[np.ndarray, np.ndarray]  # (all tokens concatenated, each document's length)


def encode_documents(tokenizer: Tokenizer, texts: list[str], dtype: type) -> Encoded:
    """Token ids of each text followed by the EOS id, concatenated in the shard's dtype.

    One array per chunk, not per document: it pickles from a worker and writes to disk in one
    call each.
    """
    eod = tokenizer.eod
    encoded = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int32, count=len(encoded))
    flat = [i for ids in encoded for i in (*ids, eod)]
    return np.array(flat, dtype=dtype), lengths


def _init_worker(model_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(model_path)  # once per worker, not once per chunk


def _encode_in_worker(texts: list[str], dtype: type) -> Encoded:
    assert _worker_tokenizer is not None, "worker started without _init_worker"
    return encode_documents(_worker_tokenizer, texts, dtype)


class Encoder:
    """Maps chunks to their token arrays, keeping input order.

    With several workers, at most 2 x workers chunks are in flight: Pool.imap would be simpler
    but its feeder thread drains the input iterator without bound, i.e. reads the whole corpus
    into memory when tokenizing is slower than reading.
    """

    def __init__(self, tokenizer: Tokenizer, dtype: type, workers: int) -> None:
        self.tokenizer, self.dtype, self.workers = tokenizer, dtype, workers
        self.pool: Pool | None = None

    def __enter__(self) -> Encoder:
        if self.workers > 1:
            self.pool = multiprocessing.Pool(
                self.workers, initializer=_init_worker, initargs=(str(self.tokenizer.path),)
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def map(self, chunks: Iterable[Chunk]) -> Iterator[tuple[Chunk, Encoded]]:
        if self.pool is None:
            for chunk in chunks:
                yield chunk, encode_documents(self.tokenizer, _texts(chunk), self.dtype)
            return
        pending: deque[tuple[Chunk, AsyncResult[Encoded]]] = deque()
        for chunk in chunks:
            task = self.pool.apply_async(_encode_in_worker, (_texts(chunk), self.dtype))
            pending.append((chunk, task))
            if len(pending) >= 2 * self.workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def _texts(chunk: Chunk) -> list[str]:
    return [text for _, text in chunk.items]
