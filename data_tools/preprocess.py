"""Tokenize a raw corpus into Megatron token shards (.bin/.idx) with a manifest.

    python data_tools/preprocess.py --input data/stdlib.jsonl --tokenizer data/tok.model \\
        --output-prefix data/stdlib

Inputs: *.jsonl, *.txt, each optionally compressed (.gz, .zst). The tokenizer: a sentencepiece
.model, or a Hugging Face tokenizer.json (a path ending in .json, or a folder holding one; needs
the tokenizers package); documents end with its eos token either way, or as Megatron-LM's
--tokenizer-type writes them (data_tools/megatron_tokenizers.py). Every JSON string is a document,
whitespace and "" included (a document without tokens), as in Megatron-LM's tool.

Outputs, for each --json-keys KEY, the prefix P = OUTPUT_PREFIX_KEY_document (Megatron's naming):

  P.bin/.idx   Megatron's MMIDIDX v1 shard (format: megatron_llm/data/indexed.py): every
          document's token ids followed by the EOS id; uint16 when the vocabulary has fewer than
          65500 ids, else int32. With --shard-size S: shards P_00000, P_00001, ..., each ending
          at the first document boundary after S bytes of input.
  P.manifest.json   the shards (documents, tokens, file sizes, input position they end at),
          totals, dtype, the tokenizer (path, sha256), the sources (path, bytes, mtime_ns), the
          settings, bad documents skipped by reason (format: data_tools/shards.py)

Every shard is written under a temporary name and renamed into place when complete, then the
manifest is rewritten to list it, so a reader never sees half a shard. A rerun whose manifest
matches the inputs, the tokenizer and the settings reuses the output; if the earlier run was
interrupted, it keeps the complete shards and resumes reading after the last of them (nothing is
tokenized or written twice). Memory stays flat: raw input streams through at most 2 x workers
chunks of about 1 MB; the workers parse, check and tokenize them.

Bad documents (malformed JSON, missing key, non-string value, invalid UTF-8, an empty line of a
.txt file, giant document over --max-doc-bytes) are counted by reason, and the first few are
printed as file:line: reason. A truncated or corrupt compressed file stops the run with exit
status 1, naming the file and the compressed offset. --on-error fail stops at the first bad
document too; --on-error skip also goes on after a corrupt compressed file, keeping its text up
to the damage and printing the compressed bytes lost (also in the manifest's lost_input). A run
that stops keeps only shards completed before it: without --shard-size, no output (an earlier
one is left as it was). A worker process that dies (e.g. the OOM killer) stops the run the same
way, with exit status 1 and the worker's pid and signal; a rerun resumes after the complete
shards. A full disk or unwritable output stops it with one line naming the file and the errno.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a file: the repo root is importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tqdm import tqdm

from data_tools.encoder import Chunk, Encoder, WorkerDied
from data_tools.inputs import (
    MAX_DOC_BYTES,
    CorruptInput,
    InputError,
    Piece,
    Position,
    Problem,
    is_compressed,
    is_json,
    read_pieces,
    resolve_inputs,
    source_fingerprint,
    split_piece,
    usable_cpus,
)
from data_tools.megatron_tokenizers import DEFAULT_TYPE, TYPES, DocumentTokenizer
from data_tools.shards import (
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    ShardStats,
    end_of,
    intact_shards,
    load_manifest,
    remove_stale_temporaries,
    shard_entry,
    shard_path,
    shard_prefix,
    write_manifest,
)
from megatron_llm.atomic import WriteFailed, write_failed
from megatron_llm.data.indexed import ShardWriter
from megatron_llm.data.manifest import manifest_path, stored_prefix
from megatron_llm.data.tokenizer import TokenizerError

CHUNK_BYTES = 1 << 20  # raw input per worker task: amortizes the hand-over, bounds memory
SHOWN_PROBLEMS = 5


class BadInput(Exception):
    """A bad document under --on-error fail; the message starts with file:line."""


@dataclass
class Job:
    """Everything decided before reading the corpus."""

    paths: list[Path]
    sources: list[dict[str, Any]]
    prefixes: dict[str, Path]  # json key -> output prefix
    tokenizer: DocumentTokenizer  # the tokenizer and the Megatron-LM type of its documents
    dtype: type[np.unsignedinteger] | type[np.signedinteger]
    txt_doc_per_file: bool
    on_error: str | None  # None: skip bad documents, stop at corrupt files
    workers: int
    shard_size: int | None  # input bytes per shard; None: one shard
    max_doc_bytes: int
    shards: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # key -> done shards
    problems_shown: list[str] = field(default_factory=list)
    lost: list[dict[str, Any]] = field(default_factory=list)  # corrupt input skipped
    bytes_read: int = 0
    seconds: float = 0.0  # tokenizing and writing, without the one-off imports and pool start


def output_prefix(base: Path, key: str) -> Path:
    return base.with_name(f"{base.name}_{key}_document")


def token_dtype(vocab_size: int) -> type[np.unsignedinteger] | type[np.signedinteger]:
    # Megatron-core's rule (DType.optimal_dtype), so its readers expect the same width.
    return np.uint16 if vocab_size < 65500 else np.int32


def identity(job: Job, key: str) -> dict[str, Any]:
    """The manifest fields that must match for existing shards to be reused or resumed."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "json_key": key,
        "sources": job.sources,
        "tokenizer_sha256": job.tokenizer.sha256,
        "settings": {
            "txt_doc_per_file": job.txt_doc_per_file,
            "append_eod": True,
            "tokenizer_type": job.tokenizer.tokenizer_type,
            "shard_size": job.shard_size,
            "max_doc_bytes": job.max_doc_bytes,
        },
    }


def previous_shards(job: Job, force: bool) -> tuple[bool, dict[str, list[dict[str, Any]]]]:
    """(all done, the shards per key a rerun keeps). Every key keeps the same number."""
    kept: dict[str, list[dict[str, Any]]] = {}
    complete = True
    for key, prefix in job.prefixes.items():
        m = None if force else load_manifest(prefix)
        if m is None or any(m.get(k) != v for k, v in identity(job, key).items()):
            return False, {k: [] for k in job.prefixes}
        kept[key] = intact_shards(prefix, m)
        complete = complete and m.get("complete") is True and kept[key] == m.get("shards")
    count = min(len(v) for v in kept.values())
    return complete, {k: v[:count] for k, v in kept.items()}


def screen(
    job: Job, bad: list[tuple[str, dict[str, Problem]]], stats: dict[str, ShardStats]
) -> None:
    """Count and show bad documents (file:line, key -> problem), or raise under --on-error fail."""
    for where, problems in bad:
        details = dict.fromkeys(p.detail for p in problems.values())
        if job.on_error == "fail":
            raise BadInput(f"{where}: {next(iter(details))}")
        for key, problem in problems.items():
            stats[key].skipped[problem.reason] += 1
        for detail in details:
            if len(job.problems_shown) < SHOWN_PROBLEMS:
                job.problems_shown.append(f"{where}: {detail}")


def all_pieces(job: Job, start: tuple[int, Position]) -> Iterator[tuple[int, Piece]]:
    for index in range(start[0], len(job.paths)):
        position = start[1] if index == start[0] else Position()
        path = job.paths[index]
        skip = (lambda e: note_lost(job, e)) if job.on_error == "skip" else None
        pieces = read_pieces(
            path, position, job.txt_doc_per_file, job.max_doc_bytes, on_corrupt=skip
        )
        for piece in pieces:
            yield index, piece


def note_lost(job: Job, e: CorruptInput) -> None:
    lost = {
        "file": str(e.path),
        "offset": e.offset,
        "lost_bytes": e.lost,
        "text_kept": e.kept,
        "text_dropped": e.delivered - e.kept,
        "why": e.why,
    }
    print(f"LOST INPUT: {lost_line(lost)} (--on-error skip)", file=sys.stderr)
    job.lost.append(lost)


def lost_line(lost: dict[str, Any]) -> str:
    return (
        f"{lost['file']}: {lost['why']} at compressed byte {lost['offset']}: kept its text up "
        f"to byte {lost['text_kept']}; lost {lost['lost_bytes']} compressed bytes after the "
        f"damage and {lost['text_dropped']} decoded bytes of a partial line"
    )


def shard_cut(piece: Piece, need: int) -> int:
    """Bytes of the piece up to the end of the document holding its need-th byte."""
    if piece.data is None or piece.kind == "file":
        return piece.nbytes
    newline = piece.data.find(b"\n", need - 1)
    return piece.nbytes if newline < 0 else newline + 1


def chunked(job: Job, start: tuple[int, Position]) -> Iterator[Chunk]:
    """Chunks of raw input from ``start``; a chunk also ends where a shard must end."""
    chunk, in_shard = Chunk(end=start), 0
    for index, whole in all_pieces(job, start):
        piece: Piece | None = whole
        while piece is not None:
            rest = None
            if job.shard_size is not None and in_shard + piece.nbytes >= job.shard_size:
                at = shard_cut(piece, job.shard_size - in_shard)
                if at < piece.nbytes:
                    piece, rest = split_piece(piece, at)
                chunk.last_of_shard = True
            chunk.pieces.append(piece)
            chunk.nbytes += piece.nbytes
            chunk.end = (index, piece.end)
            in_shard = 0 if chunk.last_of_shard else in_shard + piece.nbytes
            if chunk.last_of_shard or chunk.nbytes >= CHUNK_BYTES:
                yield chunk
                chunk = Chunk(end=chunk.end)
            piece = rest
    if chunk.pieces or in_shard:  # in_shard: the chunks since the last shard ended are not
        chunk.last_of_shard = True  # one yet (an empty chunk just closes the shard)
        yield chunk


class Output:
    """The shard being written for every key, and committing it with its manifest entry."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.writers: dict[str, ShardWriter] = {}
        self.stats = {key: ShardStats() for key in job.prefixes}

    def add(self, key: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if key not in self.writers:
            number = len(self.job.shards[key])
            name = shard_prefix(self.job.prefixes[key], number, self.job.shard_size is not None)
            self.writers[key] = ShardWriter(name, self.job.dtype)
        self.writers[key].add(tokens, lengths)
        self.stats[key].documents += len(lengths)
        self.stats[key].tokens += int(lengths.sum())

    def finish_shard(self, end: tuple[int, Position]) -> None:
        for key in self.job.prefixes:
            if key not in self.writers:
                self.add(key, np.zeros(0, self.job.dtype), np.zeros(0, np.int32))
            writer = self.writers.pop(key)
            if not self.job.shards[key]:
                # A fresh output: the old manifest describes files about to be replaced. Kept
                # until now, so that a failure before this point leaves the old output whole.
                manifest_path(self.job.prefixes[key]).unlink(missing_ok=True)
            writer.commit()
            prefix = self.job.prefixes[key]
            entry = shard_entry(prefix, Path(writer.prefix), self.stats[key], end, writer)
            self.job.shards[key].append(entry)
            write_manifest(self.job.prefixes[key], manifest(self.job, key, complete=False))
        self.stats = {key: ShardStats() for key in self.job.prefixes}

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def tokenize_into(job: Job, output: Output, start: tuple[int, Position]) -> None:
    total = None
    if not any(is_compressed(p) for p in job.paths):
        total = sum(p.stat().st_size for p in job.paths)
        done = sum(p.stat().st_size for p in job.paths[: start[0]]) + start[1].offset
    documents = tokens = 0
    keys = list(job.prefixes)
    with Encoder(job.tokenizer, keys, job.max_doc_bytes, job.dtype, job.workers) as encoder:
        begin = time.perf_counter()
        with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing") as bar:
            if total is not None:
                bar.update(done)
            for chunk, encoded in encoder.map(chunked(job, start)):
                screen(job, encoded.bad, output.stats)
                for key, (key_tokens, lengths) in encoded.tokens.items():
                    output.add(key, key_tokens, lengths)
                    documents, tokens = documents + len(lengths), tokens + len(key_tokens)
                if chunk.last_of_shard:
                    output.finish_shard(chunk.end)
                job.bytes_read += chunk.nbytes
                bar.update(chunk.nbytes)
                seconds = time.perf_counter() - begin
                bar.set_postfix_str(
                    f"{documents / seconds:,.0f} docs/s, {tokens / seconds:,.0f} tokens/s"
                )
        job.seconds = time.perf_counter() - begin


def totals(job: Job, key: str) -> ShardStats:
    out = ShardStats()
    for shard in job.shards[key]:
        out.documents += shard["documents"]
        out.tokens += shard["tokens"]
        out.skipped.update(shard["skipped"])
    return out


def manifest(job: Job, key: str, complete: bool) -> dict[str, Any]:
    total = totals(job, key)
    shards = job.shards[key]
    single = job.shard_size is None and len(shards) == 1
    return {
        **identity(job, key),
        "complete": complete,
        "prefix": stored_prefix(manifest_path(job.prefixes[key]), job.prefixes[key]),
        "documents": total.documents,
        "tokens": total.tokens,
        "dtype": np.dtype(job.dtype).name,
        "tokenizer": {
            "path": str(job.tokenizer.path),
            "type": job.tokenizer.tokenizer_type,
            "vocab_size": job.tokenizer.vocab_size,  # with Megatron-LM's added specials, if any
            "eod": job.tokenizer.eod,
            "bos": job.tokenizer.bos,  # before every document, or None
        },
        "max_token_id": max((s["max_token_id"] for s in shards), default=-1),
        "skipped": dict(sorted(total.skipped.items())),
        "lost_input": job.lost,
        "encoding": job.tokenizer.split,  # how texts were cut before encoding (same ids)
        "shards": shards,
        **({"files": shards[0]["files"]} if single else {}),
    }


def run(job: Job) -> None:
    """Tokenize the inputs from where the kept shards end; commit shard by shard."""
    kept = next(iter(job.shards.values()))
    start = end_of(kept[-1]) if kept else (0, Position())
    output = Output(job)
    try:
        tokenize_into(job, output, start)
    finally:
        output.abort()  # anything not committed: a partial shard is never renamed into place
    empty = [key for key in job.prefixes if totals(job, key).documents == 0]
    if empty:
        raise BadInput(f"no usable documents for key(s) {', '.join(map(repr, empty))}")
    for key, prefix in job.prefixes.items():
        write_manifest(prefix, manifest(job, key, complete=True))


def plan(args: argparse.Namespace) -> Job:
    paths = resolve_inputs(args.inputs)
    keys = list(dict.fromkeys(args.json_keys))
    if len(keys) > 1 and not all(is_json(p) for p in paths):
        raise InputError(
            f"--json-keys {' '.join(keys)}: several keys need JSON inputs, but "
            f"{next(p for p in paths if not is_json(p))} is a text file"
        )
    tokenizer = DocumentTokenizer.load(args.tokenizer, args.tokenizer_type)
    return Job(
        paths=paths,
        sources=source_fingerprint(paths),
        prefixes={key: output_prefix(args.output_prefix, key) for key in keys},
        tokenizer=tokenizer,
        dtype=token_dtype(tokenizer.vocab_size),
        txt_doc_per_file=args.txt_doc_per_file,
        on_error=args.on_error,
        workers=args.workers,
        shard_size=args.shard_size,
        max_doc_bytes=args.max_doc_bytes,
    )


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    number = text.upper().rstrip("B") + ("B" if text.upper().endswith("B") else "")
    digits = number.rstrip("KMGB")
    unit = number[len(digits) :]
    try:
        value = int(float(digits) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected bytes like 500M or 2G") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1 byte")
    return value


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
        help="*.jsonl / *.txt files (also .gz, .zst), folders (searched recursively) or quoted "
        "globs; may be repeated",
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        type=Path,
        help="sentencepiece .model file, or Hugging Face tokenizer.json (or its folder)",
    )
    p.add_argument(
        "--tokenizer-type",
        choices=TYPES,
        default=DEFAULT_TYPE,
        help="write documents as Megatron-LM's preprocess_data.py does with this --tokenizer-type "
        "(sentencepiece models): Llama2Tokenizer puts the bos id first, SentencePieceTokenizer "
        "ends documents with its <EOD> id after the vocabulary (data_tools/megatron_tokenizers.py)",
    )
    p.add_argument("--output-prefix", required=True, type=Path, help="e.g. data/stdlib")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenize")
    p.add_argument(
        "--txt-doc-per-file", action="store_true", help="a .txt file is one document, not a line"
    )
    p.add_argument(
        "--workers", type=int, default=usable_cpus(), help="tokenizing processes (default: cores)"
    )
    p.add_argument(
        "--on-error",
        choices=["skip", "fail"],
        help="skip: count bad documents and go on, also past a corrupt compressed file (the "
        "lost bytes are reported); fail: stop at the first bad document. Default: skip bad "
        "documents, stop at a corrupt compressed file",
    )
    p.add_argument(
        "--shard-size",
        type=parse_size,
        help="input bytes per output shard, e.g. 2G (default: one shard); a rerun after a crash "
        "keeps complete shards and resumes after them",
    )
    p.add_argument(
        "--max-doc-bytes",
        type=parse_size,
        default=MAX_DOC_BYTES,
        help=f"longer documents are skipped as giant (default {MAX_DOC_BYTES >> 20}Mi)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    p.add_argument(
        "--summary-json", type=Path, help="also write the summary here as JSON ('-': stdout)"
    )
    return p.parse_args(argv)


def summary(job: Job, reused: bool) -> dict[str, Any]:
    seconds = max(job.seconds, 1e-9)
    outputs = []
    for key in job.prefixes:
        total = totals(job, key)
        outputs.append(
            {
                "prefix": str(job.prefixes[key]),
                "json_key": key,
                "shards": [str(shard_path(job.prefixes[key], s)) for s in job.shards[key]],
                "documents": total.documents,
                "tokens": total.tokens,
                "skipped": dict(sorted(total.skipped.items())),
            }
        )
    tokens = sum(o["tokens"] for o in outputs)
    return {
        "reused": reused,
        "seconds": round(job.seconds, 3),
        "bytes": job.bytes_read,
        "workers": job.workers,
        "lost_input": job.lost,
        "mb_per_s": round(job.bytes_read / 1e6 / seconds, 3) if job.seconds else None,
        "tokens_per_s": round(tokens / seconds) if job.seconds else None,
        "outputs": outputs,
    }


def report(job: Job, result: dict[str, Any], resumed: int) -> None:
    if job.problems_shown:
        print("skipped bad documents; the first ones:", file=sys.stderr)
        for line in job.problems_shown:
            print(f"  {line}", file=sys.stderr)
    if resumed:
        print(f"resumed after {resumed} complete shard(s) of an earlier run")
    seconds = max(result["seconds"], 1e-9)
    for out in result["outputs"]:
        skipped = ", ".join(f"{n} {why}" for why, n in out["skipped"].items()) or "none"
        where = f"{out['prefix']}.bin/.idx"
        if job.shard_size is not None:
            where = f"{len(out['shards'])} shards {out['prefix']}_NNNNN.bin/.idx"
        print(
            f"wrote {where}: {out['documents']:_} documents, {out['tokens']:_} tokens; "
            f"skipped: {skipped}"
        )
    for lost in job.lost:  # again at the end, where it is seen
        print(f"LOST INPUT: {lost_line(lost)}", file=sys.stderr)
    docs = sum(o["documents"] for o in result["outputs"])
    print(
        f"{result['bytes'] / 1e6:.1f} MB in {seconds:.1f}s with {job.workers} worker(s): "
        f"{result['bytes'] / 1e6 / seconds:.2f} MB/s, {docs / seconds:,.0f} docs/s (this run)"
    )


def make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failed(folder, e) from e


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
    reused, job.shards = previous_shards(job, args.force)
    resumed = len(next(iter(job.shards.values())))
    if reused:
        for prefix in job.prefixes.values():
            print(f"reusing {prefix}: the manifest matches inputs and tokenizer (--force redoes)")
    else:
        kept = "; the complete shards are kept" if job.shard_size else "; no output written"
        try:
            for prefix in job.prefixes.values():
                make_folder(prefix.parent)
                remove_stale_temporaries(prefix)
            run(job)
        except BadInput as e:
            print(f"error: {e}{kept}", file=sys.stderr)
            if job.on_error == "fail":
                print("  (--on-error skip counts and skips bad documents)", file=sys.stderr)
            return 1
        except (CorruptInput, WorkerDied, WriteFailed) as e:
            print(f"error: {e}{kept}", file=sys.stderr)
            return 1
    result = summary(job, reused)
    if not reused:
        report(job, result, resumed)
    if args.summary_json:
        text = json.dumps(result, indent=2) + "\n"
        if str(args.summary_json) == "-":
            print(text, end="")
        else:
            args.summary_json.write_text(text)
    return 0


if __name__ == "__main__":
    status = main()
    # os._exit, not sys.exit: after a worker's death the executor's thread may wait forever for
    # the rest of a result the worker was sending, and interpreter exit would wait for it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
