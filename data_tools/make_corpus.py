"""Build a small real text corpus without downloading anything.

The corpus is the standard library's ``.py`` sources of the running Python (``site-packages``
skipped), one document per file, in sorted relative-path order, written as JSON lines:

    {"text": "<file contents>", "source": "<path relative to the stdlib folder>"}

Files that are empty or not valid UTF-8 are skipped. ``--max-bytes`` caps the total text (UTF-8
bytes): files are taken in order until the next one would pass the cap, so a smaller cap gives a
prefix of a larger one. The same Python installation always gives the same corpus.

    python data_tools/make_corpus.py --output data/stdlib.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from megatron_llm.atomic import WriteFailed, open_atomic

DEFAULT_MAX_BYTES = 8_000_000


@dataclass
class CorpusSummary:
    documents: int = 0
    bytes: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    capped: bool = False  # stopped before the last file because of --max-bytes


def stdlib_sources(root: Path) -> list[Path]:
    """Every .py file under root except site-packages, sorted by relative path."""
    found = []
    for folder, dirs, files in os.walk(root):
        # Installed third-party packages differ between machines; the stdlib does not.
        dirs[:] = [d for d in dirs if d != "site-packages"]
        found.extend(Path(folder, f) for f in files if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_documents(root: Path, summary: CorpusSummary) -> Iterator[tuple[str, str]]:
    """(relative path, text) for every usable source file; skips are counted in summary."""
    for path in tqdm(stdlib_sources(root), desc="reading", unit="file"):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            _count(summary, "invalid UTF-8")
            continue
        except OSError:
            _count(summary, "unreadable")
            continue
        if not text.strip():
            _count(summary, "empty")
            continue
        yield path.relative_to(root).as_posix(), text


def _count(summary: CorpusSummary, reason: str) -> None:
    summary.skipped[reason] = summary.skipped.get(reason, 0) + 1


def write_corpus(root: Path, output: Path, max_bytes: int) -> CorpusSummary:
    summary = CorpusSummary()
    output.parent.mkdir(parents=True, exist_ok=True)
    # Readers see the old corpus or the new one, never half a file.
    try:
        with open_atomic(output, "w", encoding="utf-8") as out:
            for source, text in read_documents(root, summary):
                size = len(text.encode("utf-8"))
                if summary.bytes + size > max_bytes:
                    summary.capped = True
                    break
                out.write(json.dumps({"text": text, "source": source}, ensure_ascii=False))
                out.write("\n")
                summary.documents += 1
                summary.bytes += size
            if summary.documents == 0:  # an empty corpus is an error: leave no file behind
                raise _Empty
    except _Empty:
        pass
    return summary


class _Empty(Exception):  # noqa: N818 (aborts the atomic write of an empty corpus)
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write the Python standard library's .py sources as a JSONL corpus "
        '({"text", "source"} per line), one document per file, in a deterministic order.',
    )
    parser.add_argument("--output", required=True, type=Path, help="JSONL file to write")
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help=f"cap on total UTF-8 text bytes (default {DEFAULT_MAX_BYTES:_})",
    )
    parser.add_argument(
        "--stdlib",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="folder to read (default: this Python's standard library)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.max_bytes <= 0:
        print(f"error: --max-bytes={args.max_bytes}: must be positive", file=sys.stderr)
        return 2
    if not args.stdlib.is_dir():
        print(f"error: --stdlib {args.stdlib}: not a folder", file=sys.stderr)
        return 2
    try:
        summary = write_corpus(args.stdlib, args.output, args.max_bytes)
    except WriteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary.documents == 0:
        why = (
            f"the first file is larger than --max-bytes {args.max_bytes:_}; raise it"
            if summary.capped
            else f"no non-empty UTF-8 .py files under {args.stdlib}"
        )
        print(f"error: nothing written to {args.output}: {why}", file=sys.stderr)
        return 1
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(summary.skipped.items())) or "none"
    cap = f" (stopped at --max-bytes {args.max_bytes:_})" if summary.capped else ""
    print(
        f"wrote {args.output}: {summary.documents} documents, {summary.bytes:_} bytes{cap}; "
        f"skipped: {skipped}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
