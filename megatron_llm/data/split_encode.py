"""Encoding many documents at once: cut where ids cannot change, encode each distinct part once.

``encode_documents`` gives exactly the ids of encoding each text whole, followed by the
end-of-document id, for a tokenizer whose merges never cross certain character boundaries (the
tokenizer decides which, see megatron_llm/data/tokenizer.py and hf_tokenizer.py):

  "lines"    cut before and after every "\\n";
  "words"    also before a run of spaces that follows another character;
  "symbols"  also between an ASCII letter and an ASCII punctuation character, either order;
  "gpt2-regex"    cut before every whitespace character that follows a non-whitespace one, and
             where ASCII letters, digits and punctuation (but the apostrophe: 's 't ...) meet,
             and nowhere else (not after newlines): where GPT-2's pre-tokenizer regex always cuts;
  "cl100k-regex"  the same, except before "\\r" or "\\n" that follow anything but an ASCII
             letter or digit, and between punctuation and a letter after it (that regex keeps
             "):\\n" and ".name" together): Llama-3's and GPT-4's regex.

Sentencepiece models with a dummy prefix ("\u2581" before every text) encode their parts
without it, and the text gets a leading space instead (``Splitting.prefix``): with the identity
normalizer that is the same normalized text. A text holding one of ``Splitting.whole_if`` (added
tokens, which tokenizers match before anything else) is encoded whole.

Code and prose repeat their parts (indentation, names, keywords, punctuation): a megabyte holds
about 220k parts but only 15k distinct ones, and encoding the distinct ones is most of the work
saved; short parts are also remembered across calls (``Splitting.cache``). Finding and counting
the parts is done on numpy arrays of code points rather than on Python strings: parts are hashed
(polynomial hash modulo 2^64 over their code points), grouped by hash, and every part is then
compared with its group's representative, code point by code point, so a hash collision can
never change the output (it sends the batch down an exact dictionary-based path instead).
Memory: about 40 bytes per character of a batch of at most BATCH_CHARS characters (a longer
document is cut into batches at a cut of its split), plus the cache (at most CACHE_PARTS
parts of at most CACHED_PART_CHARS characters).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

BATCH_CHARS = 1 << 20
CACHE_PARTS = 1 << 18  # parts remembered (some 60 MB at most); the cache is emptied beyond it
CACHED_PART_CHARS = 64  # longer parts rarely repeat: not remembered
LINE_SPLITS = ("lines", "words", "symbols")
PRETOKEN_SPLITS = ("gpt2-regex", "cl100k-regex")
SPLITS = ("documents", *LINE_SPLITS, *PRETOKEN_SPLITS)

_NL, _SPACE, _LETTER, _PUNCT, _OTHER = range(5)
_CLASS = np.full(129, _OTHER, np.uint8)  # code point (non-ASCII clipped to 128) -> class
_CLASS[ord("\n")], _CLASS[ord(" ")] = _NL, _SPACE
for _c in range(33, 127):
    if chr(_c).isalpha():
        _CLASS[_c] = _LETTER
    elif not chr(_c).isdigit():
        _CLASS[_c] = _PUNCT
ASCII_PUNCTUATION = "".join(chr(c) for c in range(128) if _CLASS[c] == _PUNCT)

# Whitespace to every regex flavour (Rust regex, Oniguruma, Python): a cut goes before one.
_SURE_SPACE = np.zeros(129, bool)
_SURE_SPACE[[ord(c) for c in "\t\n\v\f\r "]] = True
# Whitespace to any flavour (Python's str.isspace adds \x1c-\x1f; Unicode adds U+0085 ...): a
# cut goes only after a character that is none of these.
_MAYBE_SPACE = _SURE_SPACE.copy()
_MAYBE_SPACE[0x1C:0x20] = True
_UNICODE_SPACES = np.array(
    [c for c in range(128, 0x3001) if chr(c).isspace()] + [0x180E, 0x200B, 0x2060, 0xFEFF],
    np.uint32,
)
# ASCII letters, digits, punctuation but the apostrophe (contractions: 's 't ...), other.
_W_LETTER, _W_DIGIT, _W_PUNCT, _W_OTHER = range(4)
_WORD_CLASS = np.full(129, _W_OTHER, np.uint8)
for _c in range(33, 127):
    _WORD_CLASS[_c] = (
        _W_LETTER if chr(_c).isalpha() else _W_DIGIT if chr(_c).isdigit() else _W_PUNCT
    )
_WORD_CLASS[ord("'")] = _W_OTHER
_ALNUM = np.zeros(129, bool)
_ALNUM[[c for c in range(128) if chr(c).isalnum()]] = True

_BASE = 0x9E3779B97F4A7C15  # odd, hence invertible modulo 2^64
_LENGTH_MIX = np.uint64(0x632BE59BD9B4E019)
_powers: dict[int, np.ndarray] = {}

EncodeBatch = Callable[[list[str]], list[list[int]]]


@dataclass
class Splitting:
    """How a tokenizer's texts may be cut (``split``, one of SPLITS) and their parts encoded."""

    split: str
    encode_parts: EncodeBatch  # ids of each text; with split "documents", of whole documents
    prefix: str = ""  # put before every non-empty text before it is cut (see the module doc)
    whole_if: tuple[str, ...] = ()  # a text holding one of these is encoded whole
    cache: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        assert self.split in SPLITS, self.split
        self._screen = tuple(dict.fromkeys(s[:2] for s in self.whole_if))

    def is_whole(self, text: str) -> bool:
        # A scan per distinct two-character start first: Llama-3's 256 specials all start "<|".
        return any(s in text for s in self._screen) and any(s in text for s in self.whole_if)

    def encode_cached(self, parts: list[str]) -> list[list[int]]:
        found = [self.cache.get(p) for p in parts]
        missing = [p for p, ids in zip(parts, found) if ids is None]
        if not missing:
            return found  # type: ignore[return-value]
        new = self.encode_parts(missing)
        short = [(p, ids) for p, ids in zip(missing, new) if len(p) <= CACHED_PART_CHARS]
        if len(self.cache) + len(short) > CACHE_PARTS:
            self.cache.clear()
        self.cache.update(short[:CACHE_PARTS])
        fresh = iter(new)
        return [ids if ids is not None else next(fresh) for ids in found]


def encode_documents(
    texts: list[str], splitting: Splitting, eod: int, dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """Each text's ids then eod, back to back, and each text's length (eod included)."""
    if not texts:
        return np.zeros(0, dtype), np.zeros(0, np.int32)
    if splitting.split == "documents":
        ids = splitting.encode_parts(texts)
        counts = np.fromiter(map(len, ids), np.int64, len(ids))
        tokens = np.fromiter(chain.from_iterable(ids), dtype, int(counts.sum()))
    else:
        owners, parts, whole = [], [], []
        for doc, text in enumerate(texts):
            keep = bool(splitting.whole_if) and splitting.is_whole(text)
            text = splitting.prefix + text if text else text
            for window in [text] if keep else _windows(text, splitting.split):
                owners.append(doc)
                parts.append(window)
                whole.append(keep)
        results = [
            _encode_parts(batch, flags, splitting, dtype) for batch, flags in _batches(parts, whole)
        ]
        tokens = np.concatenate([t for t, _ in results])
        per_part = np.concatenate([c for _, c in results])
        counts = np.bincount(owners, weights=per_part, minlength=len(texts)).astype(np.int64)
    return np.insert(tokens, np.cumsum(counts), eod), (counts + 1).astype(np.int32)


def _windows(text: str, split: str) -> Iterator[str]:
    # A long text is encoded in windows that end at a cut of its split.
    start = 0
    while len(text) - start > BATCH_CHARS:
        end = _window_end(text, start, split)
        if end <= start:
            break
        yield text[start:end]
        start = end
    yield text[start:]


def _window_end(text: str, start: int, split: str) -> int:
    """Where a window from start ends: a cut of the split, near BATCH_CHARS; -1 for none."""
    if split in LINE_SPLITS:  # after a newline
        return text.rfind("\n", start, start + BATCH_CHARS) + 1 or text.find("\n", start) + 1
    # Before a space that follows printable ASCII: a cut of every pretoken split.
    pos = text.rfind(" ", start + 1, start + BATCH_CHARS + 1)
    while pos > start and not "!" <= text[pos - 1] <= "~":
        pos = text.rfind(" ", start + 1, pos)
    if pos > start:
        return pos
    pos = start + BATCH_CHARS
    while (pos := text.find(" ", pos + 1)) > 0:
        if "!" <= text[pos - 1] <= "~":
            return pos
    return -1


def _batches(parts: list[str], whole: list[bool]) -> Iterator[tuple[list[str], list[bool]]]:
    batch: list[str] = []
    flags: list[bool] = []
    size = 0
    for part, keep in zip(parts, whole):
        batch.append(part)
        flags.append(keep)
        size += len(part)
        if size >= BATCH_CHARS:
            yield batch, flags
            batch, flags, size = [], [], 0
    if batch:
        yield batch, flags


def _encode_parts(
    texts: list[str], whole: list[bool], splitting: Splitting, dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """The texts' ids back to back (no eod) and each text's count of ids."""
    text = "".join(texts)
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)  # (chars,)
    n = len(points)
    text_len = np.fromiter(map(len, texts), np.int64, len(texts))
    text_start = np.cumsum(text_len) - text_len
    cut = np.zeros(n + 1, bool)  # (chars + 1,): a part starts at each True
    cut[1:n] = _cuts(points, splitting.split)
    if any(whole):
        cut[:n][np.repeat(np.array(whole), text_len)] = False
    cut[text_start] = True
    starts = np.flatnonzero(cut[:n])  # (parts,)
    ends = np.append(starts[1:], n)
    inverse, first = _group(points, starts, ends)
    if inverse is None:  # a hash collision: group the part strings exactly instead
        strings = [text[s:e] for s, e in zip(starts.tolist(), ends.tolist())]
        index_of = {s: i for i, s in enumerate(dict.fromkeys(strings))}
        inverse = np.fromiter(map(index_of.__getitem__, strings), np.int64, len(strings))
        first = np.unique(inverse, return_index=True)[1]
    unique = [text[s:e] for s, e in zip(starts[first].tolist(), ends[first].tolist())]
    ids = splitting.encode_cached(unique)
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


def _cuts(points: np.ndarray, split: str) -> np.ndarray:
    """(chars - 1,): True where a part may start, between each character and the next."""
    if split in PRETOKEN_SPLITS:
        clipped = np.minimum(points, 128)
        space_before = _MAYBE_SPACE[clipped[:-1]]
        other = points[:-1] >= 128
        if other.any():
            space_before[other] = np.isin(points[:-1][other], _UNICODE_SPACES)
        inner = ~space_before & _SURE_SPACE[clipped[1:]]
        if split == "cl100k-regex":
            newline = (points[1:] == ord("\n")) | (points[1:] == ord("\r"))
            inner &= ~newline | _ALNUM[clipped[:-1]]
        cls = _WORD_CLASS[clipped]
        before, after = cls[:-1], cls[1:]
        change = (before != after) & (before != _W_OTHER) & (after != _W_OTHER)
        if split == "cl100k-regex":
            change &= ~((before == _W_PUNCT) & (after == _W_LETTER))
        return inner | change
    cls = _CLASS[np.minimum(points, 128)]
    cls[points == 0x2581] = _SPACE  # sentencepiece's own space symbol, written in the text
    before, after = cls[:-1], cls[1:]
    inner = (before == _NL) | (after == _NL)
    if split in ("words", "symbols"):
        inner |= (after == _SPACE) & (before != _SPACE)
    if split == "symbols":
        inner |= ((before == _LETTER) & (after == _PUNCT)) | (
            (before == _PUNCT) & (after == _LETTER)
        )
    return inner


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
