"""Look at, check and merge Megatron token shards (.bin/.idx).

    python data_tools/shards_cli.py inspect data/stdlib_text_document [--decode 3 --tokenizer M]
    python data_tools/shards_cli.py verify data/out_text_document_*.idx
    python data_tools/shards_cli.py merge --output data/all_text_document data/out_text_document

A SHARD argument is a prefix (PATH without .bin/.idx), a .bin/.idx path, or the prefix of a
sharded preprocess.py output (OUT_KEY_document, whose manifest lists OUT_KEY_document_NNNNN).

inspect   documents, tokens, dtype, a histogram of document lengths; --decode N prints
          document N as text (needs --tokenizer); --json for a script
verify    checks each .idx (magic, version, dtype, sizes) against its .bin (pointers, length;
          token ids against the manifest's vocabulary when there is one); prints what is wrong,
          naming the file; exit status 1 if anything is
merge     concatenates shards (same dtype) into one, streaming, written to a temporary name and
          renamed; its manifest names the sources and keeps their tokenizer's sha256
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a file: the repo root is importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from data_tools.shards import load_manifest, write_manifest
from megatron_llm.data.indexed import IndexedShard, ShardError, ShardWriter, verify

COPY_TOKENS = 1 << 24  # merge copies this many tokens at a time: memory stays flat


def expand(spec: str) -> list[Path]:
    """The shard prefixes an argument names."""
    for ext in (".bin", ".idx"):
        if spec.endswith(ext):
            return [Path(spec[: -len(ext)])]
    prefix = Path(spec)
    manifest = load_manifest(prefix)
    if manifest and manifest.get("shards"):
        return [Path(s["prefix"]) for s in manifest["shards"]]
    return [prefix]


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
    bad = 0
    for prefix in (p for spec in args.shards for p in expand(spec)):
        vocab = args.vocab_size
        manifest = load_manifest(prefix.parent / prefix.name)
        parent = load_manifest(Path(str(prefix).rsplit("_", 1)[0]))
        for m in (manifest, parent):
            if vocab is None and m and "tokenizer" in m:
                vocab = m["tokenizer"].get("vocab_size")
        problems = verify(prefix, vocab)
        bad += bool(problems)
        for problem in problems:
            print(f"BAD {problem}")
        if not problems:
            print(f"ok  {prefix}")
    if bad:
        print(f"{bad} shard(s) failed verification; re-run preprocess.py for them", file=sys.stderr)
    return 1 if bad else 0


def merge(args: argparse.Namespace) -> int:
    prefixes = [p for spec in args.shards for p in expand(spec)]
    shards = [IndexedShard(p) for p in prefixes]
    dtypes = {s.index.dtype for s in shards}
    if len(dtypes) != 1:
        names = ", ".join(f"{p} ({s.index.dtype})" for p, s in zip(prefixes, shards))
        raise SystemExit(f"error: shards of different dtypes cannot merge: {names}")
    manifests = [
        load_manifest(p) or load_manifest(Path(str(p).rsplit("_", 1)[0])) for p in prefixes
    ]
    hashes = {m.get("tokenizer_sha256") for m in manifests if m}
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
    write_manifest(
        args.output,
        {
            "format": "megatron_llm/merge",
            "version": 1,
            "sources": [str(p) for p in prefixes],
            "tokenizer_sha256": hashes.pop() if hashes else None,
            "documents": len(merged),
            "tokens": int(merged.index.lengths.sum(dtype=np.int64)),
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
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
