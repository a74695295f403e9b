"""Tokenize a raw corpus into Megatron token shards (.bin/.idx) with a manifest.

    python data_tools/preprocess.py --input data/stdlib.jsonl --tokenizer data/tok.model \\
        --output-prefix data/stdlib

Outputs, for each --json-keys KEY, the prefix P = OUTPUT_PREFIX_KEY_document (Megatron's naming):

  P.bin   every document's token ids followed by the EOS id, concatenated; uint16 when the
          vocabulary has fewer than 65500 ids, else int32
  P.idx   Megatron's MMIDIDX v1 index, written by megatron-core's IndexedDatasetBuilder:
          magic b"MMIDIDX\\x00\\x00", u64 version 1, u8 dtype code (8 uint16, 4 int32),
          u64 sequence count, u64 document count, int32[count] lengths, int64[count] byte
          offsets, int64[documents + 1] document boundaries. One sequence per document.
  P.manifest.json   documents, tokens, dtype, the tokenizer (path, sha256), the sources (path,
          bytes, mtime_ns), the settings, skipped documents counted by reason, the file sizes

Every file is written under a temporary name and renamed into place (.bin, then .idx, then the
manifest), so a reader never sees half a shard, and a manifest only describes finished files. A
rerun whose manifest matches the inputs, the tokenizer and the settings reuses the shard.

Bad documents (malformed JSON, missing key, non-string value, invalid UTF-8, empty document) are
counted by reason, and the first few are printed as file:line: reason. --on-error fail stops at
the first one with exit status 1 and leaves no output behind.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script: make the repo root importable for `data_tools` and `megatron_llm`.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data_tools.encoder import Chunk, Encoder  # noqa: E402
from data_tools.inputs import (  # noqa: E402
    InputError,
    Record,
    is_json,
    read_records,
    resolve_inputs,
    source_fingerprint,
    usable_cpus,
)
from data_tools.shards import ShardWriter  # noqa: E402
from megatron_llm.data.tokenizer import Tokenizer, TokenizerError  # noqa: E402

MANIFEST_FORMAT = "megatron_llm/preprocess"
MANIFEST_VERSION = 1
CHUNK_BYTES = 1 << 20  # text per pool task: big enough to amortize pickling, small for memory
SHOWN_PROBLEMS = 5


class BadInput(Exception):
    """A bad document under --on-error fail; the message starts with file:line."""


@dataclass
class KeyStats:
    documents: int = 0
    tokens: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


@dataclass
class Job:
    """Everything decided before reading the corpus."""

    paths: list[Path]
    sources: list[dict[str, Any]]
    prefixes: dict[str, Path]  # json key -> output prefix
    tokenizer: Tokenizer
    dtype: type[np.unsignedinteger] | type[np.signedinteger]
    txt_doc_per_file: bool
    on_error: str
    workers: int
    stats: dict[str, KeyStats] = field(default_factory=dict)
    problems_shown: list[str] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0  # tokenizing and writing, without the one-off imports and pool start


def output_prefix(base: Path, key: str) -> Path:
    return base.with_name(f"{base.name}_{key}_document")


def manifest_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".manifest.json")


def token_dtype(vocab_size: int) -> type[np.unsignedinteger] | type[np.signedinteger]:
    # Megatron-core's rule (DType.optimal_dtype), so its readers expect the same width.
    return np.uint16 if vocab_size < 65500 else np.int32


def identity(job: Job, key: str) -> dict[str, Any]:
    """The manifest fields that must match for an existing shard to be reused."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "json_key": key,
        "sources": job.sources,
        "tokenizer_sha256": job.tokenizer.sha256,
        "settings": {"txt_doc_per_file": job.txt_doc_per_file, "append_eod": True},
    }


def load_manifest(prefix: Path) -> dict[str, Any] | None:
    try:
        return json.loads(manifest_path(prefix).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def up_to_date(job: Job, key: str) -> bool:
    prefix = job.prefixes[key]
    manifest = load_manifest(prefix)
    if manifest is None or any(manifest.get(k) != v for k, v in identity(job, key).items()):
        return False
    files = manifest.get("files", {})
    return all(
        Path(f"{prefix}{ext}").is_file() and Path(f"{prefix}{ext}").stat().st_size == files.get(ext)
        for ext in (".bin", ".idx")
    )


def screened(job: Job, records: Iterator[Record]) -> Iterator[Record]:
    """Count and show each record's problems (or raise under --on-error fail), pass it on."""
    for record in records:
        details = dict.fromkeys(p.detail for p in record.problems.values())
        if details and job.on_error == "fail":
            raise BadInput(f"{record.where()}: {next(iter(details))}")
        for key, problem in record.problems.items():
            job.stats[key].skipped[problem.reason] += 1
        for detail in details:
            if len(job.problems_shown) < SHOWN_PROBLEMS:
                job.problems_shown.append(f"{record.where()}: {detail}")
        yield record


def chunked(records: Iterator[Record]) -> Iterator[Chunk]:
    chunk = Chunk()
    for record in records:
        chunk.items.extend(record.texts.items())
        chunk.nbytes += record.nbytes
        if chunk.nbytes >= CHUNK_BYTES:
            yield chunk
            chunk = Chunk()
    if chunk.nbytes:
        yield chunk


def all_records(job: Job) -> Iterator[Record]:
    keys = list(job.prefixes)
    for path in job.paths:
        yield from read_records(path, keys, job.txt_doc_per_file)


def tokenize_into(job: Job, writers: dict[str, ShardWriter]) -> None:
    gz = any(p.name.endswith(".gz") for p in job.paths)
    total = None if gz else sum(p.stat().st_size for p in job.paths)
    with Encoder(job.tokenizer, job.dtype, job.workers) as encoder:
        start = time.perf_counter()
        with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing") as bar:
            for chunk, arrays in encoder.map(chunked(screened(job, all_records(job)))):
                for (key, _), tokens in zip(chunk.items, arrays):
                    writers[key].add(tokens)
                    job.stats[key].documents += 1
                    job.stats[key].tokens += len(tokens)
                job.bytes_read += chunk.nbytes
                bar.update(chunk.nbytes)
                docs = sum(s.documents for s in job.stats.values())
                bar.set_postfix_str(f"{docs / (time.perf_counter() - start):,.0f} docs/s")
        job.seconds = time.perf_counter() - start


def manifest(job: Job, key: str) -> dict[str, Any]:
    stats = job.stats[key]
    return {
        **identity(job, key),
        "prefix": str(job.prefixes[key]),
        "documents": stats.documents,
        "tokens": stats.tokens,
        "dtype": np.dtype(job.dtype).name,
        "tokenizer": {
            "path": str(job.tokenizer.path),
            "vocab_size": job.tokenizer.vocab_size,
            "eod": job.tokenizer.eod,
        },
        "skipped": dict(sorted(stats.skipped.items())),
        "encoding": "lines" if job.tokenizer.line_split_exact else "whole documents",
    }


def run(job: Job) -> None:
    """Tokenize every input into all outputs; commit them all, or leave nothing."""
    writers = {key: ShardWriter(prefix, job.dtype) for key, prefix in job.prefixes.items()}
    try:
        tokenize_into(job, writers)
        empty = [key for key in writers if job.stats[key].documents == 0]
        if empty:
            raise BadInput(f"no usable documents for key(s) {', '.join(map(repr, empty))}")
        for key, writer in writers.items():
            writer.commit(manifest(job, key))
    finally:
        for writer in writers.values():
            writer.abort()  # no-op for committed writers


def plan(args: argparse.Namespace) -> Job:
    paths = resolve_inputs(args.inputs)
    keys = list(dict.fromkeys(args.json_keys))
    if len(keys) > 1 and not all(is_json(p) for p in paths):
        raise InputError(
            f"--json-keys {' '.join(keys)}: several keys need JSON inputs, but "
            f"{next(p for p in paths if not is_json(p))} is a text file"
        )
    tokenizer = Tokenizer(args.tokenizer)
    job = Job(
        paths=paths,
        sources=source_fingerprint(paths),
        prefixes={key: output_prefix(args.output_prefix, key) for key in keys},
        tokenizer=tokenizer,
        dtype=token_dtype(tokenizer.vocab_size),
        txt_doc_per_file=args.txt_doc_per_file,
        on_error=args.on_error,
        workers=args.workers,
    )
    job.stats = {key: KeyStats() for key in keys}
    return job


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input",
        dest="inputs",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH",
        help="*.jsonl(.gz) / *.txt(.gz) files, folders (searched recursively) or quoted globs; "
        "may be repeated",
    )
    p.add_argument("--tokenizer", required=True, type=Path, help="sentencepiece .model file")
    p.add_argument("--output-prefix", required=True, type=Path, help="e.g. data/stdlib")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenize")
    p.add_argument(
        "--txt-doc-per-file", action="store_true", help="a .txt file is one document, not a line"
    )
    p.add_argument(
        "--workers", type=int, default=usable_cpus(), help="tokenizing processes (default: cores)"
    )
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip", help="on a bad document")
    p.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    p.add_argument("--summary-json", type=Path, help="also write the summary here as JSON")
    return p.parse_args(argv)


def summary(job: Job, reused: bool) -> dict[str, Any]:
    return {
        "reused": reused,
        "seconds": round(job.seconds, 3),
        "bytes": job.bytes_read,
        "workers": job.workers,
        "outputs": [
            {
                "prefix": str(job.prefixes[key]),
                "json_key": key,
                "documents": s.documents,
                "tokens": s.tokens,
                "skipped": dict(sorted(s.skipped.items())),
            }
            for key, s in job.stats.items()
        ],
    }


def report(job: Job, result: dict[str, Any]) -> None:
    if job.problems_shown:
        print("skipped bad documents; the first ones:", file=sys.stderr)
        for line in job.problems_shown:
            print(f"  {line}", file=sys.stderr)
    seconds = max(result["seconds"], 1e-9)
    for out in result["outputs"]:
        skipped = ", ".join(f"{n} {why}" for why, n in out["skipped"].items()) or "none"
        print(
            f"wrote {out['prefix']}.bin/.idx: {out['documents']:_} documents, "
            f"{out['tokens']:_} tokens; skipped: {skipped}"
        )
    docs = sum(o["documents"] for o in result["outputs"])
    print(
        f"{result['bytes'] / 1e6:.1f} MB in {seconds:.1f}s with {job.workers} worker(s): "
        f"{result['bytes'] / 1e6 / seconds:.2f} MB/s, {docs / seconds:,.0f} docs/s"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers < 1:
        print(f"error: --workers={args.workers}: must be at least 1", file=sys.stderr)
        return 2
    try:
        job = plan(args)
    except (InputError, TokenizerError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reused = not args.force and all(up_to_date(job, key) for key in job.prefixes)
    if reused:
        for key, prefix in job.prefixes.items():
            m = load_manifest(prefix) or {}
            job.stats[key] = KeyStats(
                m.get("documents", 0), m.get("tokens", 0), Counter(m.get("skipped", {}))
            )
            print(f"reusing {prefix}: the manifest matches inputs and tokenizer (--force redoes)")
    else:
        for prefix in job.prefixes.values():
            prefix.parent.mkdir(parents=True, exist_ok=True)
        try:
            run(job)
        except BadInput as e:
            print(f"error: {e}; no output written", file=sys.stderr)
            if job.on_error == "fail":
                print("  (--on-error skip counts and skips bad documents)", file=sys.stderr)
            return 1
    result = summary(job, reused)
    if not reused:
        report(job, result)
    if args.summary_json:
        args.summary_json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
