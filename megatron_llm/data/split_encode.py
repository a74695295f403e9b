"""Encoding many documents at once: cut where ids cannot change, encode each distinct part once.

``encode_documents`` gives exactly the ids of encoding each text whole, followed by the
end-of-document id, for a tokenizer whose merges never cross certain character boundaries (the
tokenizer decides which, see megatron_llm/data/tokenizer.py):

  "lines"    cut before and after every "\\n";
  "words"    also before a run of spaces that follows another character;
  "symbols"  also between an ASCII letter and an ASCII punctuation character, either order.

Code and prose repeat their parts (indentation, names, keywords, punctuation): a megabyte holds
about 220k parts but only 15k distinct ones, and encoding the distinct ones is most of the work
saved. Finding and counting the parts is done on numpy arrays of code points rather than on
Python strings: parts are hashed (polynomial hash modulo 2^64 over their code points), grouped
by hash, and every part is then compared with its group's representative, code point by code
point, so a hash collision can never change the output (it sends the batch down an exact
dictionary-based path instead). Memory: about 40 bytes per character of a batch of at most
BATCH_CHARS characters (a longer document is cut at a newline into batches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import chain

import numpy as np

BATCH_CHARS = 1 << 20
SPLITS = ("documents", "lines", "words", "symbols")

_NL, _SPACE, _LETTER, _PUNCT, _OTHER = range(5)
_CLASS = np.full(129, _OTHER, np.uint8)  # code point (non-ASCII clipped to 128) -> class
_CLASS[ord("\n")], _CLASS[ord(" ")] = _NL, _SPACE
for _c in range(33, 127):
    if chr(_c).isalpha():
        _CLASS[_c] = _LETTER
    elif not chr(_c).isdigit():
        _CLASS[_c] = _PUNCT
ASCII_PUNCTUATION = "".join(chr(c) for c in range(128) if _CLASS[c] == _PUNCT)

_BASE = 0x9E3779B97F4A7C15  # odd, hence invertible modulo 2^64
_LENGTH_MIX = np.uint64(0x632BE59BD9B4E019)
_powers: dict[int, np.ndarray] = {}

EncodeBatch = Callable[[list[str]], list[list[int]]]


def encode_documents(
    texts: list[str], split: str, encode_batch: EncodeBatch, eod: int, dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """Each text's ids then eod, back to back, and each text's length (eod included)."""
    if not texts:
        return np.zeros(0, dtype), np.zeros(0, np.int32)
    if split == "documents":
        ids = encode_batch(texts)
        counts = np.fromiter(map(len, ids), np.int64, len(ids))
        tokens = np.fromiter(chain.from_iterable(ids), dtype, int(counts.sum()))
    else:
        owners, parts = [], []
        for doc, text in enumerate(texts):
            for window in _windows(text):
                owners.append(doc)
                parts.append(window)
        results = [_encode_parts(batch, split, encode_batch, dtype) for batch in _batches(parts)]
        tokens = np.concatenate([t for t, _ in results])
        per_part = np.concatenate([c for _, c in results])
        counts = np.bincount(owners, weights=per_part, minlength=len(texts)).astype(np.int64)
    return np.insert(tokens, np.cumsum(counts), eod), (counts + 1).astype(np.int32)


def _windows(text: str) -> Iterator[str]:
    # A newline is a cut in every split, so a long text is encoded in newline-ended windows.
    start = 0
    while len(text) - start > BATCH_CHARS:
        end = text.rfind("\n", start, start + BATCH_CHARS) + 1 or text.find("\n", start) + 1
        if end <= start:
            break
        yield text[start:end]
        start = end
    yield text[start:]


def _batches(parts: list[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for part in parts:
        batch.append(part)
        size += len(part)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode_parts(
    texts: list[str], split: str, encode_batch: EncodeBatch, dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """The texts' ids back to back (no eod) and each text's count of ids."""
    text = "".join(texts)
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)  # (chars,)
    n = len(points)
    text_len = np.fromiter(map(len, texts), np.int64, len(texts))
    text_start = np.cumsum(text_len) - text_len
    cut = np.zeros(n + 1, bool)  # (chars + 1,): a part starts at each True
    cut[text_start] = True
    cls = _CLASS[np.minimum(points, 128)]
    before, after = cls[:-1], cls[1:]
    inner = cut[1:n]
    inner |= (before == _NL) | (after == _NL)
    if split in ("words", "symbols"):
        inner |= (after == _SPACE) & (before != _SPACE)
    if split == "symbols":
        inner |= ((before == _LETTER) & (after == _PUNCT)) | (
            (before == _PUNCT) & (after == _LETTER)
        )
    starts = np.flatnonzero(cut[:n])  # (parts,)
    ends = np.append(starts[1:], n)
    inverse, first = _group(points, starts, ends)
    if inverse is None:  # a hash collision: group the part strings exactly instead
        strings = [text[s:e] for s, e in zip(starts.tolist(), ends.tolist())]
        index_of = {s: i for i, s in enumerate(dict.fromkeys(strings))}
        inverse = np.fromiter(map(index_of.__getitem__, strings), np.int64, len(strings))
        first = np.unique(inverse, return_index=True)[1]
    unique = [text[s:e] for s, e in zip(starts[first].tolist(), ends[first].tolist())]
    ids = encode_batch(unique)
    unique_len = np.fromiter(map(len, ids), np.int64, len(ids))
    unique_ids = np.fromiter(chain.from_iterable(ids), dtype, int(unique_len.sum()))
    unique_start = np.cumsum(unique_len) - unique_len
    part_len = unique_len[inverse]
    part_end = np.cumsum(part_len)
    # (tokens,): token t of the output comes from unique_ids[unique_start[part] + offset]
    source = np.repeat(unique_start[inverse] - (part_end - part_len), part_len)
    source += np.arange(len(source))
    owner = np.searchsorted(text_start, starts, "right") - 1
    counts = np.bincount(owner, weights=part_len, minlength=len(texts)).astype(np.int64)
    return unique_ids[source], counts


def _group(
    points: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray]:
    """(each part's group, one member of each group), grouping equal parts; (None, _) when two
    different parts share a hash."""
    n = len(points)
    length = ends - starts
    with np.errstate(over="ignore"):
        prefix = np.zeros(n + 1, np.uint64)
        np.cumsum(points * _power(_BASE, n), out=prefix[1:])
        inverse_base = pow(_BASE, -1, 1 << 64)
        key = (prefix[ends] - prefix[starts]) * _power(inverse_base, n)[starts]
        key += length.astype(np.uint64) * _LENGTH_MIX
    order = np.argsort(key)
    sorted_key = key[order]
    new = np.empty(len(key), bool)
    new[:1] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=new[1:])
    inverse = np.empty(len(key), np.int64)
    inverse[order] = np.cumsum(new) - 1
    first = order[new]
    member = first[inverse]
    same = np.array_equal(length[member], length) and np.array_equal(
        points[np.repeat(starts[member] - starts, length) + np.arange(n)], points
    )
    return (inverse, first) if same else (None, first)


def _power(base: int, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) modulo 2^64, cached and grown as needed."""
    cached = _powers.get(base)
    if cached is None or len(cached) < n:
        size = max(n, 2 * len(cached) if cached is not None else 1 << 16)
        factors = np.full(size, base, np.uint64)
        factors[0] = 1
        with np.errstate(over="ignore"):
            cached = _powers[base] = np.cumprod(factors)
    return cached[:n]
