"""Perplexity of a checkpoint on any token shards.

    python -m megatron_llm.eval runs/default/checkpoints \\
        --data-prefix data/default/stdlib_text_document [more prefixes ...] --max-samples 200

CKPT is a checkpoint folder (global_step<N>) or a checkpoint dir (its latest, or --step N).
The shards' documents are read back to back, in the order given, and cut into windows of
seq_length + 1 tokens (the model's seq_length unless --seq-length), each starting at the last
token of the one before, so every token but the first is predicted once; a last partial window
is dropped. Printed: the mean loss per predicted token (nats) and its exp, the perplexity;
--json prints {"checkpoint", "step", "loss", "perplexity", "tokens", "samples"}.
--tokenizer names the tokenizer the shards were made with: it must be the one the checkpoint
was trained with (compared by sha256), since a loss over other ids means nothing.
Before the first window every shard is checked (structure, its manifest's sha256 and
tokenizer, token ids inside the vocabulary; see megatron_llm/data/shard_checks.py);
--no-verify-data skips that.
A checkpoint trained on packed documents (data.reset_attention_mask, data.reset_position_ids)
is evaluated with the same rules, the EOD id from --tokenizer or its data.tokenizer.
Exit status: 0 ok, 2 bad arguments, an unusable checkpoint or shards.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from megatron_llm.checkpoint.io import NO_VERIFY_FLAG, NO_VERIFY_HELP, CheckpointError
from megatron_llm.config import ConfigError
from megatron_llm.data.batch import DocumentMasking, document_masking
from megatron_llm.data.indexed import ShardError
from megatron_llm.data.tokenizer import Tokenizer, TokenizerError
from megatron_llm.eval.loading import load_model
from megatron_llm.eval.perplexity import perplexity
from megatron_llm.eval.shards import check_shards, model_loss, token_windows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_llm.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a checkpoint folder or a checkpoint dir")
    parser.add_argument("--step", type=int, help="in a checkpoint dir: this step, not latest")
    parser.add_argument(
        "--data-prefix", nargs="+", required=True, help="shard prefixes (path without .bin/.idx)"
    )
    parser.add_argument("--tokenizer", help="the shards' tokenizer, checked against the run's")
    parser.add_argument("--seq-length", type=int, help="window length; default model.seq_length")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (8)")
    parser.add_argument("--max-samples", type=int, help="stop after this many windows")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        NO_VERIFY_FLAG, dest="no_verify_ckpt", action="store_true", help=NO_VERIFY_HELP
    )
    parser.add_argument(
        "--no-verify-data", action="store_true", help="skip the shard checks before evaluating"
    )
    args = parser.parse_args(argv)
    for name in ("seq_length", "batch_size", "max_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value}: must be >= 1")
    return args


def check_tokenizer(path: str, ckpt_path: str) -> None:
    from megatron_llm.checkpoint.io import Checkpoint

    saved = Checkpoint.open(ckpt_path).run_state().get("tokenizer_sha256")
    given = Tokenizer(path).sha256
    if saved and saved != given:
        raise ValueError(
            f"--tokenizer {path} (sha256 {given[:12]}…) is not the tokenizer {ckpt_path} was "
            f"trained with (sha256 {saved[:12]}…); evaluate on shards made with that one"
        )


def verify_data(args: argparse.Namespace, loaded: Any) -> None:
    from megatron_llm.checkpoint.io import Checkpoint

    saved = Checkpoint.open(loaded.path).run_state().get("tokenizer_sha256")
    if args.tokenizer:
        vocab, name = Tokenizer(args.tokenizer).vocab_size, args.tokenizer
    else:  # the checkpoint's padded vocabulary: ids past it cannot be scored at all
        vocab, name = loaded.model.embed.weight.shape[0], f"the model of {loaded.path}"
    check_shards(args.data_prefix, vocab, saved, name)


def document_rules(args: argparse.Namespace, loaded: Any) -> DocumentMasking | None:
    """The packed-document rules the checkpoint was trained with (data.reset_attention_mask,
    data.reset_position_ids), evaluated the same way; the EOD id comes from the tokenizer."""
    data = loaded.cfg.data
    if not (data.reset_attention_mask or data.reset_position_ids):
        return None
    path = args.tokenizer or data.tokenizer
    if not path or not Path(path).exists():
        raise ValueError(
            f"{loaded.path} was trained with data.reset_attention_mask/reset_position_ids, which "
            f"need the tokenizer's EOD id, and its data.tokenizer {data.tokenizer!r} is not "
            "here; pass --tokenizer"
        )
    return document_masking(data, Tokenizer(path).eod)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        loaded = load_model(args.checkpoint, args.step, args.device, verify=not args.no_verify_ckpt)
        if args.tokenizer:
            check_tokenizer(args.tokenizer, loaded.path)
        seq_length = args.seq_length or loaded.cfg.model.seq_length
        if seq_length > loaded.cfg.model.seq_length:
            raise ValueError(
                f"--seq-length={seq_length} exceeds the model's seq_length "
                f"{loaded.cfg.model.seq_length}"
            )
        if not args.no_verify_data:
            verify_data(args, loaded)
        masking = document_rules(args, loaded)
        start = time.perf_counter()
        loss, tokens = model_loss(
            loaded.model,
            token_windows(args.data_prefix, seq_length),
            batch_size=args.batch_size,
            max_samples=args.max_samples,
            progress=not args.json,
            masking=masking,
        )
        seconds = time.perf_counter() - start
    except (CheckpointError, ConfigError, ShardError, TokenizerError, ValueError, OSError) as e:
        # ShardError and ManifestError are ValueErrors: one line naming the file.
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {
        "checkpoint": loaded.path,
        "step": loaded.step,
        "loss": loss,
        "perplexity": perplexity(loss),
        "tokens": tokens,
        "samples": tokens // seq_length,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{loaded.path} (step {loaded.step}): loss {loss:.4f}, perplexity "
            f"{result['perplexity']:.2f} over {tokens:,} tokens ({result['samples']} windows "
            f"of {seq_length}) in {seconds:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
