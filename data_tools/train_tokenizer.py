"""Train a SentencePiece tokenizer on JSONL / text corpora.

    python data_tools/train_tokenizer.py --input data/stdlib.jsonl --output-prefix data/tok \\
        --vocab-size 4096

Writes PREFIX.model, PREFIX.vocab and PREFIX.model.json (the settings and the inputs' sizes and
mtimes). A rerun with the same inputs and settings reuses the model; --force retrains.

Documents are fed to sentencepiece line by line (its sentences; longer lines than
--max-sentence-length are skipped and counted), so no piece ever contains a newline: newlines
become the byte token <0x0A>. The model keeps text byte for byte (identity normalization, no
dummy prefix, spaces never squeezed, runs of spaces are pieces of their own), which suits source
code, and lets data_tools/preprocess.py encode BPE-tokenized documents line by line. Ids: 0 <unk>,
1 <s>, 2 </s> (end of document), 3 <pad>. Unknown characters fall back to UTF-8 bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a file: the repo root is importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sentencepiece
from tqdm import tqdm

from data_tools.inputs import (
    MAX_DOC_BYTES,
    InputError,
    Parsed,
    is_compressed,
    parse_piece,
    read_pieces,
    resolve_inputs,
    source_fingerprint,
    usable_cpus,
)
from megatron_llm.atomic import WriteFailed, write_atomic
from megatron_llm.data.tokenizer import Tokenizer, TokenizerError

SIDECAR_VERSION = 1


def trainer_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that changes the trained model; stored in the sidecar and compared on reuse."""
    symbols = [s for s in args.user_defined_symbols.split(",") if s]
    return {
        "model_type": args.model_type,
        "vocab_size": args.vocab_size,
        "json_key": args.json_key,
        "user_defined_symbols": symbols,
        "input_sentence_size": args.input_sentence_size,
        "max_sentence_length": args.max_sentence_length,
        "character_coverage": args.character_coverage,
        "seed": args.seed,
        "byte_fallback": True,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": False,
        "split_by_whitespace": True,
        "allow_whitespace_only_pieces": True,
        "split_digits": True,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 3,
    }


def sidecar_path(prefix: Path) -> Path:
    return prefix.with_name(prefix.name + ".model.json")


def reusable(prefix: Path, settings: dict[str, Any], sources: list[dict[str, Any]]) -> bool:
    model, sidecar = prefix.with_name(prefix.name + ".model"), sidecar_path(prefix)
    if not (model.is_file() and sidecar.is_file()):
        return False
    try:
        saved = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        saved.get("version") == SIDECAR_VERSION
        and saved.get("settings") == settings
        and saved.get("inputs") == sources
        and saved.get("model_sha256") == hashlib.sha256(model.read_bytes()).hexdigest()
    )


class SentenceFeed:
    """Lines of every document, as sentencepiece reads them, with counts for the summary."""

    def __init__(self, paths: list[Path], json_key: str, max_length: int) -> None:
        self.paths, self.json_key, self.max_length = paths, json_key, max_length
        self.documents = 0
        self.lines = 0
        self.skipped: Counter[str] = Counter()

    def __iter__(self) -> Iterator[str]:
        compressed = any(is_compressed(p) for p in self.paths)
        total = None if compressed else sum(p.stat().st_size for p in self.paths)
        with tqdm(total=total, unit="B", unit_scale=True, desc="reading") as bar:
            for path in self.paths:
                for piece in read_pieces(path):
                    parsed = Parsed.empty([self.json_key])
                    parse_piece(piece, [self.json_key], MAX_DOC_BYTES, parsed)
                    for text in parsed.texts[self.json_key]:
                        yield from self._lines(text)
                    for _, problems in parsed.bad:
                        self.skipped.update(p.reason for p in problems.values())
                    bar.update(piece.nbytes)

    def _lines(self, text: str) -> Iterator[str]:
        self.documents += 1
        for line in text.split("\n"):
            if not line.strip():
                continue
            # sentencepiece drops over-long sentences itself, but silently from our view.
            if len(line.encode("utf-8")) > self.max_length:
                self.skipped["line too long"] += 1
                continue
            self.lines += 1
            yield line


def train(feed: SentenceFeed, settings: dict[str, Any], threads: int) -> bytes:
    """The serialized model. Trained in memory: with files, sentencepiece would store the
    (temporary) output path inside the model, and the same training would give other bytes."""
    sentencepiece.set_random_generator_seed(settings["seed"])
    trainer_args = {
        k: v for k, v in settings.items() if k not in ("json_key", "seed", "user_defined_symbols")
    }
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(feed),
        model_writer=model,
        user_defined_symbols=settings["user_defined_symbols"],
        shuffle_input_sentence=True,
        num_threads=threads,
        minloglevel=2,  # sentencepiece's own log is thousands of lines; our summary says enough
        **trainer_args,
    )
    return model.getvalue()


def vocab_text(model: bytes) -> str:
    """The .vocab file sentencepiece writes beside a model: piece TAB score, one per line."""
    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))


def commit(model: bytes, prefix: Path, record: dict[str, Any]) -> None:
    """Write PREFIX.model, .vocab, then the sidecar, each atomically; the old sidecar goes
    first, so a sidecar only ever vouches for the model beside it."""
    sidecar = sidecar_path(prefix)
    sidecar.unlink(missing_ok=True)
    write_atomic(prefix.with_name(prefix.name + ".model"), model)
    write_atomic(prefix.with_name(prefix.name + ".vocab"), vocab_text(model).encode("utf-8"))
    record["model_sha256"] = hashlib.sha256(model).hexdigest()
    write_atomic(sidecar, (json.dumps(record, indent=2) + "\n").encode())


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
    p.add_argument("--output-prefix", required=True, type=Path, help="writes PREFIX.model/.vocab")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--vocab-size", type=int, default=32000, help="default 32000")
    p.add_argument("--json-key", default="text", help="JSON field holding the text (default text)")
    p.add_argument(
        "--user-defined-symbols", default="", help="comma list of pieces never split, e.g. <tab>"
    )
    p.add_argument(
        "--input-sentence-size",
        type=int,
        default=1_000_000,
        help="train on a random sample of this many lines (default 1_000_000; 0 = all)",
    )
    p.add_argument("--max-sentence-length", type=int, default=4192, help="in bytes; longer skipped")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=0, help="seed of the line sampling")
    p.add_argument("--threads", type=int, default=usable_cpus(), help="default: cores")
    p.add_argument("--force", action="store_true", help="retrain even if the model is up to date")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.vocab_size < 300:
        # Byte fallback alone takes 256 pieces plus the 4 specials.
        print(f"error: --vocab-size={args.vocab_size}: must be at least 300", file=sys.stderr)
        return 2
    try:
        paths = resolve_inputs(args.inputs)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prefix: Path = args.output_prefix
    settings, sources = trainer_settings(args), source_fingerprint(paths)
    if not args.force and reusable(prefix, settings, sources):
        print(f"reusing {prefix}.model: same inputs and settings (--force retrains)")
        return 0
    prefix.parent.mkdir(parents=True, exist_ok=True)
    feed = SentenceFeed(paths, args.json_key, args.max_sentence_length)
    start = time.perf_counter()
    try:
        model = train(feed, settings, args.threads)
    except RuntimeError as e:  # sentencepiece reports every training failure this way
        print(f"error: sentencepiece training failed: {e}", file=sys.stderr)
        if feed.lines == 0:
            hint = f"no text lines under key {args.json_key!r} in the inputs; check --json-key"
            print(f"  {hint}", file=sys.stderr)
        elif "vocab" in str(e).lower():
            print("  the corpus is too small for this --vocab-size; lower it", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    record = {
        "version": SIDECAR_VERSION,
        "settings": settings,
        "inputs": sources,
        "documents": feed.documents,
        "lines": feed.lines,
        "skipped": dict(feed.skipped),
        "seconds": round(seconds, 2),
    }
    try:
        commit(model, prefix, record)
    except WriteFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return summarize(prefix, feed, seconds)


def summarize(prefix: Path, feed: SentenceFeed, seconds: float) -> int:
    try:
        tok = Tokenizer(prefix.with_name(prefix.name + ".model"))
    except (TokenizerError, FileNotFoundError) as e:
        print(f"error: the trained model does not load: {e}", file=sys.stderr)
        return 1
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(feed.skipped.items())) or "none"
    print(
        f"wrote {prefix}.model: vocab {tok.vocab_size}, eod id {tok.eod}, pad id {tok.pad}; "
        f"trained on {feed.lines:_} lines of {feed.documents:_} documents in {seconds:.1f}s; "
        f"skipped: {skipped}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
