"""Reading raw text corpora: which files an input list names, and the documents in them.

Formats, picked by file name:
  *.jsonl, *.jsonl.gz   one JSON object per line; the text is under one or more keys
  *.txt, *.txt.gz       one document per line, or one per file (txt_doc_per_file)

Every document comes back as a Record with its file and 1-based line, so that a bad one can be
reported as ``file:line: reason``, and the byte offset where the next document starts, so that a
later run can resume there (``read_records(..., start=Position)``). A document longer than
max_doc_bytes is never held in memory: it is read past in blocks and reported as giant.

Bad documents are not errors here: they are Records whose ``problems`` say why, and the caller
decides whether to skip or stop.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

JSON_SUFFIXES = (".jsonl", ".jsonl.gz")
TEXT_SUFFIXES = (".txt", ".txt.gz")
SUFFIXES = JSON_SUFFIXES + TEXT_SUFFIXES
MAX_DOC_BYTES = 64 << 20  # default cap on one document (one JSONL line), in raw bytes
_SKIP_BLOCK = 1 << 20


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
class Record:
    path: Path
    line: int  # 1-based line where the document starts
    nbytes: int  # raw (decompressed) bytes the document took in the file, for progress
    end: Position = Position()  # where the next document of the file starts
    texts: dict[str, str] = field(default_factory=dict)  # key -> usable text
    problems: dict[str, Problem] = field(default_factory=dict)  # key -> why it is unusable

    def where(self) -> str:
        return f"{self.path}:{self.line}"


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


def source_fingerprint(paths: list[Path]) -> list[dict[str, Any]]:
    """Path, size and mtime of each input: cheap evidence that an input changed."""
    out = []
    for p in paths:
        st = p.stat()
        out.append({"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def read_records(
    path: Path,
    keys: list[str],
    txt_doc_per_file: bool = False,
    start: Position = Position(),
    max_doc_bytes: int = MAX_DOC_BYTES,
) -> Iterator[Record]:
    """The documents of one file from ``start`` on. Text files give their text under every key.

    Documents (lines; whole files with txt_doc_per_file) over max_doc_bytes are Records with a
    "giant document" problem, read past without being held in memory.
    """
    with _open_binary(path) as stream:
        if start.offset:
            stream.seek(start.offset)  # gzip streams decompress up to it, plain files jump
        if txt_doc_per_file:
            if start != Position():
                return  # the file's one document was done
            raw, nbytes = _read_capped(stream, max_doc_bytes)
            record = _text_record(path, 1, raw, keys) if raw is not None else None
            record = record or _giant(path, 1, nbytes, keys, max_doc_bytes)
            record.end = Position(nbytes, 2)
            yield record
            return
        offset, number = start.offset, start.line
        for raw, nbytes in _lines(stream, max_doc_bytes):
            if raw is None:
                record = _giant(path, number, nbytes, keys, max_doc_bytes)
            elif is_json(path):
                record = _json_record(path, number, raw, keys)
            else:
                record = _text_record(path, number, raw, keys, strip_newline=True)
            offset, number = offset + nbytes, number + 1
            record.end = Position(offset, number)
            yield record


def _lines(stream: IO[bytes], limit: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, its bytes) for each line; (None, its bytes) for a line longer than limit."""
    while raw := stream.readline(limit + 1):
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw, len(raw)
            continue
        nbytes = len(raw)
        while not raw.endswith(b"\n") and (raw := stream.readline(_SKIP_BLOCK)):
            nbytes += len(raw)
        yield None, nbytes


def _read_capped(stream: IO[bytes], limit: int) -> tuple[bytes | None, int]:
    raw = stream.read(limit + 1)
    if len(raw) <= limit:
        return raw, len(raw)
    nbytes = len(raw)
    while block := stream.read(_SKIP_BLOCK):
        nbytes += len(block)
    return None, nbytes


def _giant(path: Path, number: int, nbytes: int, keys: list[str], limit: int) -> Record:
    problem = Problem(
        "giant document",
        f"document of {nbytes} bytes, over --max-doc-bytes={limit}; raise it to keep such "
        "documents",
    )
    return Record(path, number, nbytes, problems={key: problem for key in keys})


def _open_binary(path: Path) -> IO[bytes]:
    # Binary on purpose: decoding each line ourselves turns bad UTF-8 into a counted problem at
    # its line instead of an exception that ends the whole file.
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _json_record(path: Path, number: int, raw: bytes, keys: list[str]) -> Record:
    record = Record(path, number, len(raw))
    obj, problem = _parse_json_line(raw)
    for key in keys:
        if problem is not None:
            record.problems[key] = problem
        else:
            _take_field(record, obj, key)
    return record


def _parse_json_line(raw: bytes) -> tuple[Any, Problem | None]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, Problem("invalid UTF-8", f"invalid UTF-8 at byte {e.start} of the line")
    if not line.strip():
        return None, Problem("blank line", "blank line, expected a JSON object")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, Problem("malformed JSON", f"malformed JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return None, Problem("malformed JSON", f"expected a JSON object, got {type(obj).__name__}")
    return obj, None


def _take_field(record: Record, obj: dict[str, Any], key: str) -> None:
    if key not in obj:
        present = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        record.problems[key] = Problem(
            "missing key",
            f"field {key!r} missing (fields present: {present}); use --json-keys to pick another",
        )
        return
    value = obj[key]
    if not isinstance(value, str):
        record.problems[key] = Problem(
            "non-string value", f"field {key!r} is {type(value).__name__}, expected a string"
        )
        return
    _take_text(record, key, value)


def _text_record(
    path: Path, number: int, raw: bytes, keys: list[str], strip_newline: bool = False
) -> Record:
    record = Record(path, number, len(raw))
    if strip_newline and raw.endswith(b"\n"):
        raw = raw[:-1]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = number + raw.count(b"\n", 0, e.start)
        problem = Problem("invalid UTF-8", f"invalid UTF-8 at byte {e.start} (line {line})")
        record.problems = {key: problem for key in keys}
        return record
    for key in keys:
        _take_text(record, key, text)
    return record


def _take_text(record: Record, key: str, text: str) -> None:
    if not text.strip():
        record.problems[key] = Problem("empty document", "empty document")
        return
    try:
        # JSON escapes can produce lone surrogates, which no tokenizer can encode.
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        record.problems[key] = Problem(
            "invalid UTF-8", f"text has a lone surrogate at character {e.start}"
        )
        return
    record.texts[key] = text
