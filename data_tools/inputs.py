"""Reading raw text corpora: which files an input list names, and the documents in them.

Formats, picked by file name:
  *.jsonl, *.jsonl.gz, *.jsonl.zst   one JSON object per line; the text under one or more keys
  *.txt, *.txt.gz, *.txt.zst         one document per line, or one per file (txt_doc_per_file)

Compressed files are decompressed as a stream (.gz through zlib, .zst through the ``zstandard``
package; gzip members and zstd frames read one after another, as ``pigz``, ``zstd`` and ``pzstd``
write them); nothing is unpacked to disk. A truncated or corrupt stream raises CorruptInput
naming the file and the compressed offset (never a silent early end). One cut cannot be seen:
a file of several frames (pzstd, pigz) cut exactly at a frame boundary is a valid, shorter file.

Reading comes in two halves, so that the costly one can run in worker processes:

  read_pieces()  cheap, in one process: a file's decompressed bytes from a Position on, cut
      into Pieces of whole lines (about 1 MB each), each knowing its file, its first line
      number and the Position after it, where a later run can resume. A line longer than
      max_doc_bytes is read past in blocks, never held in memory, and becomes a Piece of its
      own without data.
  parse_piece()  anywhere: the documents of a Piece (UTF-8 and JSON checks, the text under each
      key), and the bad ones with why, so that they can be reported as ``file:line: reason``.

Bad documents are not errors here: the caller decides whether to skip them or stop.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
SUFFIXES = JSON_SUFFIXES + TEXT_SUFFIXES
COMPRESSED_SUFFIXES = (".gz", ".zst")
MAX_DOC_BYTES = 64 << 20  # default cap on one document (one JSONL line), in raw bytes
PIECE_BYTES = 1 << 20
_SKIP_BLOCK = 1 << 20
# A JSON escape of a UTF-16 surrogate (\ud800-\udfff); only such a line can decode to a string
# holding a lone surrogate, which no tokenizer can encode.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class InputError(ValueError):
    """An input list that names nothing readable; the message names the entry and the fix."""


@dataclass
class Problem:
    reason: str  # short category, counted in summaries: "malformed JSON", "missing key", ...
    detail: str  # one line for a human, with the fix where there is one


@dataclass(frozen=True)
class Position:
    """Where reading (re)starts: byte offset into a file's decompressed stream and its line."""

    offset: int = 0
    line: int = 1


@dataclass
class Piece:
    """Whole documents of one file, as read; or one giant document (data None) read past."""

    path: str
    kind: str  # "json" (a JSON object per line), "text" (a document per line), "file" (one)
    line: int  # 1-based line of data's first byte
    data: bytes | None
    nbytes: int  # raw (decompressed) bytes covered, for progress and shard sizes
    end: Position  # where the file's next document starts


@dataclass
class Parsed:
    """The documents of some Pieces: usable texts per key, in order, and the bad ones."""

    texts: dict[str, list[str]]
    bad: list[tuple[str, dict[str, Problem]]] = field(default_factory=list)  # file:line, problems

    @classmethod
    def empty(cls, keys: list[str]) -> Parsed:
        return cls({key: [] for key in keys})


def resolve_inputs(specs: list[str]) -> list[Path]:
    """Files named by specs (files, folders searched recursively, or globs), in a stable order.

    Folders and globs give their matches sorted by path; the order of specs is kept; a file
    named twice is read once.
    """
    found: list[Path] = []
    for spec in specs:
        matches = _expand(spec)
        if not matches:
            raise InputError(
                f"input {spec!r}: no such file or folder, and no {'/'.join(SUFFIXES)} file "
                "matches it as a glob"
            )
        found.extend(matches)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    for path in unique:
        if not path.name.endswith(SUFFIXES):
            raise InputError(
                f"input {path}: unsupported file type; expected a name ending in "
                f"{', '.join(SUFFIXES)}"
            )
    return unique


def _expand(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
    if path.is_file():
        return [path]
    matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
    return [p for p in matches if p.is_file() and p.name.endswith(SUFFIXES)]


def usable_cpus() -> int:
    # os.cpu_count() counts the host's cores, not the ones a container or taskset allows.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def is_json(path: Path) -> bool:
    return path.name.endswith(JSON_SUFFIXES)


def is_compressed(path: Path) -> bool:
    return path.name.endswith(COMPRESSED_SUFFIXES)


def source_fingerprint(paths: list[Path]) -> list[dict[str, Any]]:
    """Path, size and mtime of each input: cheap evidence that an input changed."""
    out = []
    for p in paths:
        st = p.stat()
        out.append({"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


class CorruptInput(Exception):
    """A compressed input that is truncated or corrupt; the message is one line."""

    def __init__(self, path: Path, offset: int, delivered: int, why: str) -> None:
        self.path, self.offset, self.delivered, self.why = path, offset, delivered, why
        self.lost = max(path.stat().st_size - offset, 0)  # compressed bytes never decoded
        self.kept = 0  # text bytes before the damage that were read (set by read_pieces)
        super().__init__(
            f"{path}: {why} at compressed byte {offset} of {path.stat().st_size} (after "
            f"{delivered} bytes of text); re-fetch or re-compress the file, or pass "
            "--on-error skip to keep what comes before it (the lost bytes are counted)"
        )


class _Decompressed(io.RawIOBase):
    """A compressed file's decompressed bytes, frame after frame (gzip members, zstd frames).

    Python's gzip module raises EOFError/BadGzipFile without the file's name, and zstandard's
    stream reader simply stops at a truncated frame: this reader raises CorruptInput for both,
    with the compressed offset up to which everything decoded."""

    FEED = 1 << 16  # compressed bytes per step: bounds what one step can hold in memory

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = path.open("rb")
        self.zstd = path.name.endswith(".zst")
        self.decoder = self._new_decoder()
        self.errors: tuple[type[Exception], ...] = (zlib.error,)
        if self.zstd:
            import zstandard

            self.errors = (zstandard.ZstdError,)
        self.fed = False  # the current frame has received bytes
        self.offset = 0  # compressed bytes consumed whole
        self.delivered = 0
        self.pending = b""
        self.failed: CorruptInput | None = None

    def _new_decoder(self) -> Any:
        if self.zstd:
            import zstandard  # only .zst inputs need it

            return zstandard.ZstdDecompressor().decompressobj()
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # one gzip member

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        # An error first reads as the end of the stream, and is raised at the next read: a
        # BufferedReader drops the bytes it gathered for a read that raises, i.e. up to a whole
        # buffer of good text before the damage.
        if self.failed is not None:
            raise self.failed
        while not self.pending:
            block = self.file.read(self.FEED)
            if not block:
                if self.fed:
                    self.failed = self._corrupt("stream ends inside a compressed frame (truncated)")
                return 0
            try:
                self.pending = self._decode(block)
            except CorruptInput as e:
                self.failed = e
                return 0
            self.offset += len(block)
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        self.delivered += n
        return n

    def _decode(self, block: bytes) -> bytes:
        out = []
        while block:
            if not self.fed and not self.zstd and not block.strip(b"\0"):
                break  # zeros after the last gzip member: padding (tape, some writers)
            self.fed = True
            try:
                out.append(self.decoder.decompress(block))
            except self.errors as e:
                raise self._corrupt(f"data is corrupt ({e})") from e
            if not self.decoder.eof:
                break
            block = self.decoder.unused_data  # the next gzip member or zstd frame
            self.decoder, self.fed = self._new_decoder(), False
        return b"".join(out)

    def _corrupt(self, why: str) -> CorruptInput:
        kind = "zstd" if self.zstd else "gzip"
        return CorruptInput(self.path, self.offset, self.delivered, f"{kind} {why}")

    def close(self) -> None:
        self.file.close()
        super().close()


def open_binary(path: Path) -> IO[bytes]:
    # Binary on purpose: decoding each line ourselves turns bad UTF-8 into a counted problem at
    # its line instead of an exception that ends the whole file.
    if is_compressed(path):
        return io.BufferedReader(_Decompressed(path), PIECE_BYTES)
    return path.open("rb")


def read_pieces(
    path: Path,
    start: Position = Position(),
    txt_doc_per_file: bool = False,
    max_doc_bytes: int = MAX_DOC_BYTES,
    piece_bytes: int = PIECE_BYTES,
    on_corrupt: Callable[[CorruptInput], None] | None = None,
) -> Iterator[Piece]:
    """The file's documents from ``start`` on, in Pieces of whole lines of about piece_bytes.

    A line over max_doc_bytes (a whole .txt file with txt_doc_per_file) is a Piece without
    data, read past in blocks: memory stays within max_doc_bytes + piece_bytes. A corrupt
    compressed stream raises CorruptInput, or, given on_corrupt, is reported to it and the
    file ends at its last whole line before the damage.
    """
    kept = start.offset
    with open_binary(path) as stream:
        try:
            for piece in _pieces(path, stream, start, txt_doc_per_file, max_doc_bytes, piece_bytes):
                yield piece
                kept = piece.end.offset
        except CorruptInput as e:
            if on_corrupt is None:
                raise
            e.kept = kept
            on_corrupt(e)


def _pieces(
    path: Path,
    stream: IO[bytes],
    start: Position,
    txt_doc_per_file: bool,
    max_doc_bytes: int,
    piece_bytes: int,
) -> Iterator[Piece]:
    _skip(stream, start.offset)
    if txt_doc_per_file and not is_json(path):
        if start == Position():  # else the file's one document was done
            piece = _whole_file(str(path), stream, max_doc_bytes)
            stream.read(1)  # raises a compressed stream's error, deferred to the next read
            yield piece
        return
    kind = "json" if is_json(path) else "text"
    line, offset = start.line, start.offset
    parts: list[bytes] = []  # the start of a line that goes on in the next block
    pending = 0
    block = stream.read(piece_bytes)
    while block:
        cut = block.rfind(b"\n") + 1
        if cut:
            data = b"".join([*parts, block[:cut]]) if parts else block[:cut]
            lines = data.count(b"\n")
            end = Position(offset + len(data), line + lines)
            yield Piece(str(path), kind, line, data, len(data), end)
            line, offset = end.line, end.offset
            parts, pending = [block[cut:]], len(block) - cut
        else:
            parts.append(block)
            pending += len(block)
        block = b""
        if pending > max_doc_bytes:  # a giant line: never held whole
            nbytes, block = _read_past_line(stream, pending)
            end = Position(offset + nbytes, line + 1)
            yield Piece(str(path), kind, line, None, nbytes, end)
            line, offset = end.line, end.offset
            parts, pending = [], 0
        block = block or stream.read(piece_bytes)
    stream.read(1)  # at the end: raises a compressed stream's error, deferred to this read
    if pending:  # a last line without "\n"
        data = b"".join(parts)
        yield Piece(str(path), kind, line, data, len(data), Position(offset + len(data), line + 1))


def _skip(stream: IO[bytes], offset: int) -> None:
    if not offset:
        return
    if isinstance(stream, io.BufferedReader) and isinstance(stream.raw, io.FileIO):
        stream.seek(offset)  # a plain file jumps; compressed streams decompress up to it
        return
    while offset > 0:
        block = stream.read(min(offset, _SKIP_BLOCK))
        if not block:
            return  # the file is shorter now; its source fingerprint will not match anyway
        offset -= len(block)


def _read_past_line(stream: IO[bytes], nbytes: int) -> tuple[bytes, int]:
    """Read to the end of the current line: (its total bytes, what follows it in the block)."""
    while block := stream.read(_SKIP_BLOCK):
        newline = block.find(b"\n")
        if newline >= 0:
            return nbytes + newline + 1, block[newline + 1 :]
        nbytes += len(block)
    return nbytes, b""


def _whole_file(path: str, stream: IO[bytes], limit: int) -> Piece:
    raw = stream.read(limit + 1)
    nbytes = len(raw)
    if nbytes > limit:
        while block := stream.read(_SKIP_BLOCK):
            nbytes += len(block)
        raw = None
    return Piece(path, "file", 1, raw, nbytes, Position(nbytes, 2))


def split_piece(piece: Piece, at: int) -> tuple[Piece, Piece]:
    """The piece cut after its first ``at`` bytes, which must end a line."""
    assert piece.data is not None and 0 < at < piece.nbytes
    head_data, tail_data = piece.data[:at], piece.data[at:]
    line = piece.line + head_data.count(b"\n")
    head = Piece(
        piece.path,
        piece.kind,
        piece.line,
        head_data,
        at,
        Position(piece.end.offset - len(tail_data), line),
    )
    tail = Piece(piece.path, piece.kind, line, tail_data, len(tail_data), piece.end)
    return head, tail


def parse_piece(piece: Piece, keys: list[str], max_doc_bytes: int, out: Parsed) -> None:
    """Append the piece's usable texts to out.texts and its bad documents to out.bad."""
    if piece.data is None:
        _bad(out, piece.path, piece.line, keys, _giant(piece.nbytes, max_doc_bytes))
    elif piece.kind == "file":
        _parse_text(piece.path, piece.line, piece.data, keys, out)
    else:
        lines = piece.data.split(b"\n")
        if piece.data.endswith(b"\n"):
            lines.pop()
        parse = _parse_json_line if piece.kind == "json" else _parse_text
        last = len(lines) - 1
        for i, raw in enumerate(lines):
            if len(raw) > max_doc_bytes:
                nbytes = len(raw) + (i < last or piece.data.endswith(b"\n"))
                _bad(out, piece.path, piece.line + i, keys, _giant(nbytes, max_doc_bytes))
            else:
                parse(piece.path, piece.line + i, raw, keys, out)


def _bad(out: Parsed, path: str, line: int, keys: list[str], problem: Problem) -> None:
    out.bad.append((f"{path}:{line}", dict.fromkeys(keys, problem)))


def _giant(nbytes: int, limit: int) -> Problem:
    return Problem(
        "giant document",
        f"document of {nbytes} bytes, over --max-doc-bytes={limit}; raise it to keep such "
        "documents",
    )


def _parse_json_line(path: str, number: int, raw: bytes, keys: list[str], out: Parsed) -> None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problem = Problem("invalid UTF-8", f"invalid UTF-8 at byte {e.start} of the line")
        return _bad(out, path, number, keys, problem)
    if not line or line.isspace():
        return _bad(
            out, path, number, keys, Problem("blank line", "blank line, expected a JSON object")
        )
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        problem = Problem("malformed JSON", f"malformed JSON: {e.msg} at column {e.colno}")
        return _bad(out, path, number, keys, problem)
    if not isinstance(obj, dict):
        problem = Problem("malformed JSON", f"expected a JSON object, got {type(obj).__name__}")
        return _bad(out, path, number, keys, problem)
    surrogates = _SURROGATE_ESCAPE.search(raw) is not None
    problems: dict[str, Problem] = {}
    for key in keys:
        value = obj.get(key, _MISSING)
        if value is _MISSING:
            present = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
            problems[key] = Problem(
                "missing key",
                f"field {key!r} missing (fields present: {present}); use --json-keys to pick "
                "another",
            )
        elif not isinstance(value, str):
            problems[key] = Problem(
                "non-string value", f"field {key!r} is {type(value).__name__}, expected a string"
            )
        elif problem := _unusable(value, surrogates):
            problems[key] = problem
        else:
            out.texts[key].append(value)
    if problems:
        out.bad.append((f"{path}:{number}", problems))


_MISSING = object()


def _parse_text(path: str, number: int, raw: bytes, keys: list[str], out: Parsed) -> None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = number + raw.count(b"\n", 0, e.start)
        problem = Problem("invalid UTF-8", f"invalid UTF-8 at byte {e.start} (line {line})")
        return _bad(out, path, number, keys, problem)
    if not text:
        return _bad(out, path, number, keys, Problem("empty document", "empty document"))
    for key in keys:
        out.texts[key].append(text)


def _unusable(text: str, surrogates: bool) -> Problem | None:
    if surrogates:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return Problem("invalid UTF-8", f"text has a lone surrogate at character {e.start}")
    return None
