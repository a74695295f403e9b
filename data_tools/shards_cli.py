"""Look at, check and merge Megatron token shards (.bin/.idx).

    python data_tools/shards_cli.py inspect data/stdlib_text_document [--decode 3 --tokenizer M]
    python data_tools/shards_cli.py verify data/out_text_document_*.idx
    python data_tools/shards_cli.py merge --output data/all_text_document data/out_text_document

A SHARD argument is a prefix (PATH without .bin/.idx), a .bin/.idx path, or the prefix of a
sharded preprocess.py output (OUT_KEY_document, whose manifest lists OUT_KEY_document_NNNNN).

inspect   documents, tokens, dtype, a histogram of document lengths; --decode N prints
          document N as text (needs --tokenizer); --json for a script
verify    checks each .idx (magic, version, dtype, sizes) against its .bin (pointers, length;
          token ids against the manifest's vocabulary when there is one), and against the
          manifest that lists it (sizes, sha256; found relative to the shard, never the current
          folder); an output prefix whose manifest says its run did not finish is INCOMPLETE.
          Prints what is wrong, naming the file; exit status 1 if anything is
merge     concatenates shards (same dtype) into one, streaming, written to a temporary name and
          renamed; its manifest (OUT_DIR/manifests/) names the sources, keeps their tokenizer's
          sha256 and records the merged files' sha256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a file: the repo root is importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from data_tools.shards import write_manifest
from megatron_llm.atomic import WriteFailed
from megatron_llm.data.indexed import IndexedShard, ShardError, ShardWriter, verify
from megatron_llm.data.manifest import (
    ManifestError,
    find_manifest,
    legacy_manifest_path,
    manifest_path,
    read_manifest,
    shard_prefixes,
    stored_prefix,
)
from megatron_llm.hashing import file_sha256

COPY_TOKENS = 1 << 24  # merge copies this many tokens at a time: memory stays flat


def expand(spec: str) -> list[Path]:
    """The shard prefixes an argument names."""
    for ext in (".bin", ".idx"):
        if spec.endswith(ext):
            return [Path(spec[: -len(ext)])]
    prefix = Path(spec)
    found = output_manifest(prefix)
    if found and found[1].get("shards") and not Path(f"{prefix}.idx").exists():
        return shard_prefixes(*found)
    return [prefix]


def output_manifest(prefix: Path) -> tuple[Path, dict[str, Any]] | None:
    """The manifest of output prefix (sharded or not), in its current or its legacy place."""
    for path in (manifest_path(prefix), legacy_manifest_path(prefix)):
        if (manifest := read_manifest(path)) is not None:
            return path, manifest
    return None


def histogram(lengths: np.ndarray, bins: int = 8) -> list[tuple[int, int, int]]:
    """(low, high, count) over log-spaced length ranges."""
    if len(lengths) == 0:
        return []
    top = int(lengths.max()) + 1
    edges = np.unique(np.geomspace(1, max(top, 2), bins + 1).astype(np.int64))
    counts, _ = np.histogram(lengths, bins=edges)
    return [(int(a), int(b) - 1, int(c)) for a, b, c in zip(edges[:-1], edges[1:], counts)]


def inspect(args: argparse.Namespace) -> int:
    prefixes = [p for spec in args.shards for p in expand(spec)]
    shards = [IndexedShard(p) for p in prefixes]
    lengths = np.concatenate([s.index.lengths for s in shards])
    info: dict[str, Any] = {
        "shards": [str(p) for p in prefixes],
        "documents": int(sum(len(s) for s in shards)),
        "tokens": int(lengths.sum(dtype=np.int64)),
        "dtype": sorted({s.index.dtype.name for s in shards}),
        "length": {
            "min": int(lengths.min()) if len(lengths) else 0,
            "mean": float(lengths.mean()) if len(lengths) else 0.0,
            "max": int(lengths.max()) if len(lengths) else 0,
        },
        "histogram": histogram(lengths),
    }
    if args.decode is not None:
        info["decoded"] = decode(shards, args.decode, args.tokenizer)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['documents']:_} documents, {info['tokens']:_} tokens, dtype {info['dtype']}")
    print(
        "document length (tokens): min {min}, mean {mean:.1f}, max {max}".format(**info["length"])
    )
    for low, high, count in info["histogram"]:
        print(f"  {low:>9}-{high:<9} {count:>10_} {'#' * round(40 * count / len(lengths))}")
    if "decoded" in info:
        print(f"--- document {args.decode} ---\n{info['decoded']}")
    return 0


def decode(shards: list[IndexedShard], number: int, tokenizer: Path | None) -> str:
    if tokenizer is None:
        raise SystemExit(
            "error: --decode needs --tokenizer MODEL (the one the shard was made with)"
        )
    from megatron_llm.data.tokenizer import Tokenizer

    total = sum(len(s) for s in shards)
    if not 0 <= number < total:
        raise SystemExit(f"error: --decode {number}: there are documents 0 to {total - 1}")
    for shard in shards:
        if number < len(shard):
            return Tokenizer(tokenizer).decode(shard[number].tolist())
        number -= len(shard)
    raise AssertionError("unreachable")


def verify_cmd(args: argparse.Namespace) -> int:
    """Each SHARD's structure, its manifest's sizes and sha256, its token ids; and for an output
    prefix, that its manifest says complete and lists only shards that are there."""
    bad = 0
    for spec in args.shards:
        output = None if spec.endswith((".bin", ".idx")) else output_manifest(Path(spec))
        if output and output[1].get("complete") is False:
            listed = len(output[1].get("shards", []))
            print(
                f"INCOMPLETE {spec}: {output[0]} says the run that made it did not finish "
                f"({listed} shard(s) listed); rerun the same preprocess.py command to complete it"
            )
            bad += 1
        for prefix in expand(spec):
            problems = verify_one(prefix, args.vocab_size)
            bad += bool(problems)
            for problem in problems:
                print(f"BAD {problem}")
            if not problems:
                print(f"ok  {prefix}")
    if bad:
        print(f"{bad} problem(s) found; re-run preprocess.py for them", file=sys.stderr)
    return 1 if bad else 0


def verify_one(prefix: Path, vocab_size: int | None) -> list[str]:
    try:
        vouched = find_manifest(prefix)
    except ManifestError as e:
        return [str(e)]
    if vouched is not None and vocab_size is None:
        vocab_size = vouched.manifest.get("tokenizer", {}).get("vocab_size")
    problems = verify(prefix, vocab_size)
    if problems or vouched is None or "shards" not in vouched.manifest:
        return problems
    entry = vouched.entry
    if entry is None:
        return [f"{prefix}: not listed in {vouched.path}: a leftover of another or unfinished run"]
    for ext in (".bin", ".idx"):
        size, digest = entry.get("files", {}).get(ext), entry.get("sha256", {}).get(ext)
        have = Path(f"{prefix}{ext}").stat().st_size
        if size is not None and have != size:
            problems.append(f"{prefix}{ext}: {have} bytes, but {vouched.path} lists {size}")
        elif digest is not None and file_sha256(f"{prefix}{ext}") != digest:
            problems.append(f"{prefix}{ext}: sha256 differs from {vouched.path}: corrupt data")
    return problems


def merge(args: argparse.Namespace) -> int:
    prefixes = [p for spec in args.shards for p in expand(spec)]
    shards = [IndexedShard(p) for p in prefixes]  # structure checked on opening
    dtypes = {s.index.dtype for s in shards}
    if len(dtypes) != 1:
        names = ", ".join(f"{p} ({s.index.dtype})" for p, s in zip(prefixes, shards))
        raise SystemExit(f"error: shards of different dtypes cannot merge: {names}")
    vouched = [find_manifest(p) for p in prefixes]
    hashes = {v.manifest.get("tokenizer_sha256") for v in vouched if v}
    if len(hashes) > 1:
        raise SystemExit(
            "error: the shards' manifests name different tokenizers; merge each set apart"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(args.output, dtypes.pop())
    try:
        for shard in shards:
            bounds = shard.index.bounds
            lengths = shard.index.lengths
            # Documents in groups of about COPY_TOKENS tokens, copied straight from the mmap.
            doc = 0
            while doc < len(shard):
                first_seq = int(bounds[doc])
                stop = doc + 1
                tokens = int(lengths[bounds[doc] : bounds[stop]].sum())
                while stop < len(shard) and tokens < COPY_TOKENS:
                    tokens += int(lengths[bounds[stop] : bounds[stop + 1]].sum())
                    stop += 1
                seqs = lengths[first_seq : int(bounds[stop])]
                start = int(shard.index.pointers[first_seq]) // shard.index.dtype.itemsize
                writer.add(shard.tokens[start : start + int(seqs.sum())], seqs)
                doc = stop
        writer.commit()
    finally:
        writer.abort()
    merged = IndexedShard(args.output)
    path = manifest_path(args.output)
    write_manifest(
        args.output,
        {
            "format": "megatron_llm/merge",
            "version": 2,
            "complete": True,
            "sources": [str(p.resolve()) for p in prefixes],
            "tokenizer_sha256": hashes.pop() if hashes else None,
            "prefix": stored_prefix(path, args.output),
            "documents": len(merged),
            "tokens": int(merged.index.lengths.sum(dtype=np.int64)),
            "max_token_id": writer.max_token_id,
            "shards": [
                {
                    "prefix": stored_prefix(path, args.output),
                    "documents": len(merged),
                    "files": {e: os.path.getsize(f"{args.output}{e}") for e in (".bin", ".idx")},
                    "sha256": writer.sha256,
                    "max_token_id": writer.max_token_id,
                }
            ],
        },
    )
    print(f"merged {len(prefixes)} shard(s) into {args.output}.bin/.idx: {len(merged):_} documents")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="counts, dtype, length histogram, decode a document")
    i.add_argument("shards", nargs="+", metavar="SHARD")
    i.add_argument("--decode", type=int, metavar="N", help="print document N as text")
    i.add_argument(
        "--tokenizer", type=Path, help="tokenizer (.model or tokenizer.json), for --decode"
    )
    i.add_argument("--json", action="store_true", help="print the figures as JSON")
    i.set_defaults(func=inspect)
    v = sub.add_parser("verify", help="check .idx against .bin; exit 1 on any problem")
    v.add_argument("shards", nargs="+", metavar="SHARD")
    v.add_argument("--vocab-size", type=int, help="check token ids (default: from the manifest)")
    v.set_defaults(func=verify_cmd)
    m = sub.add_parser("merge", help="concatenate shards into one")
    m.add_argument("shards", nargs="+", metavar="SHARD")
    m.add_argument("--output", required=True, type=Path, help="prefix of the merged shard")
    m.set_defaults(func=merge)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except (ShardError, ManifestError, WriteFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
