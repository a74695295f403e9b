"""Megatron-LM's tools/preprocess_data.py command line, run by data_tools/preprocess.py.

    python data_tools/megatron_preprocess_data.py --input corpus.jsonl --output-prefix data/c \\
        --tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --append-eod --workers 8

For scripts written for Megatron-LM (tag core_r0.11.0): the same flags, the same output files
(PREFIX_KEY_document.bin/.idx, byte-identical to its tool's for the same model, see
data_tools/megatron_tokenizers.py), plus our manifest in PREFIX's folder/manifests/. Flags that
change what its tool writes in ways ours does not are refused with the reason: tokenizer types
other than GPTSentencePieceTokenizer, Llama2Tokenizer and SentencePieceTokenizer (use
preprocess.py --tokenizer with a tokenizer.json instead), no --append-eod, --split-sentences and
--partitions above 1. --log-interval, --keep-sequential-samples and --lang are accepted and
unused. Megatron-LM's test of its tool (tests/unit_tests/data/test_preprocess_data.py) passes
with this in its place: tests/megatron_lm_check.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: the repo root is importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools import preprocess
from data_tools.megatron_tokenizers import TYPES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="a .jsonl file (also .gz, .zst)")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", required=True)
    p.add_argument("--tokenizer-model", help="the sentencepiece .model")
    p.add_argument("--append-eod", action="store_true")
    p.add_argument("--workers", type=int, required=True)
    p.add_argument("--partitions", type=int, default=1)
    p.add_argument("--split-sentences", action="store_true")
    p.add_argument("--keep-newlines", action="store_true")
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--vocab-extra-ids", type=int, default=0)
    for unused in ("--log-interval", "--lang"):
        p.add_argument(unused)
    p.add_argument("--keep-sequential-samples", action="store_true")
    return p.parse_args(argv)


def refusal(args: argparse.Namespace) -> str | None:
    """Why ours would not write what Megatron-LM's tool writes for these flags, or None."""
    if args.tokenizer_type not in TYPES:
        return (
            f"--tokenizer-type {args.tokenizer_type}: supported are {', '.join(TYPES)}; for a "
            "Hugging Face tokenizer use data_tools/preprocess.py --tokenizer tokenizer.json"
        )
    if not args.tokenizer_model:
        return f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model MODEL.model"
    if not args.append_eod:
        return "--append-eod is required: our documents always end with the end-of-document id"
    if args.split_sentences or args.keep_newlines:
        return "--split-sentences: sentence splitting is not supported; pass whole documents"
    if args.partitions != 1:
        return "--partitions: only 1 (workers already run in parallel over one input)"
    if args.vocab_file or args.merge_file or args.vocab_size or args.vocab_extra_ids:
        return "--vocab-file/--merge-file/--vocab-size/--vocab-extra-ids: not used by these types"
    return None


def main(argv: list[str] | None = None) -> None:
    """Like Megatron-LM's main(): reads sys.argv when argv is None; raises SystemExit on failure."""
    args = parse_args(argv)
    why = refusal(args)
    if why:
        print(f"error: {why}", file=sys.stderr)
        raise SystemExit(2)
    code = preprocess.main(
        ["--input", args.input, "--output-prefix", args.output_prefix]
        + ["--tokenizer", args.tokenizer_model, "--tokenizer-type", args.tokenizer_type]
        + ["--json-keys", *args.json_keys, "--workers", str(args.workers)]
        + ["--on-error", "fail", "--force"]  # its tool stops at a bad line and always rewrites
    )
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
