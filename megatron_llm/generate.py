"""Sample text from a checkpoint.

    python -m megatron_llm.generate runs/default/checkpoints --prompt "def main(" \\
        --prompt "import" --max-new-tokens 64 --top-k 40 --temperature 0.8 --seed 1

CKPT is a checkpoint folder (global_step<N>) or a checkpoint dir (its latest, or --step N).
All prompts run as one batch with a KV cache (--no-kv-cache recomputes every position: slower,
same tokens). Decoding: --greedy, or sampling with --temperature, --top-k and --top-p (applied
in that order); --seed makes sampling reproducible. Each completion stops at the tokenizer's
end-of-document token, after --max-new-tokens, or at the model's seq_length. An empty prompt
starts a fresh document (the end-of-document token). --json prints
[{"prompt", "completion", "tokens"}] instead of text.
Exit status: 0 ok, 2 bad arguments or an unusable checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from megatron_llm.checkpoint.io import NO_VERIFY_FLAG, NO_VERIFY_HELP, CheckpointError
from megatron_llm.config import ConfigError
from megatron_llm.data.tokenizer import Tokenizer, TokenizerError
from megatron_llm.eval.generation import Sampling, generate
from megatron_llm.eval.loading import load_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_llm.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a checkpoint folder or a checkpoint dir")
    parser.add_argument("--step", type=int, help="in a checkpoint dir: this step, not latest")
    parser.add_argument(
        "--prompt", action="append", required=True, help="a prompt; repeat for a batch"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="per prompt (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off (default)")
    parser.add_argument("--greedy", action="store_true", help="always the most likely token")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute every position")
    parser.add_argument("--tokenizer", help="tokenizer file; default: the run's data.tokenizer")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        NO_VERIFY_FLAG, dest="no_verify_ckpt", action="store_true", help=NO_VERIFY_HELP
    )
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens={args.max_new_tokens}: must be >= 0")
    return args


def completion_text(tokenizer: Tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text the new tokens add after the prompt's, as transformers' text-generation pipeline
    gives it: decoded alone, they would lose the leading space that a sentencepiece model with a
    dummy prefix strips from the start of every text ("def" + "main" for "def main")."""
    return tokenizer.decode(prompt + new)[len(tokenizer.decode(prompt)) :]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sampling = Sampling(
            greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p
        )
        loaded = load_model(args.checkpoint, args.step, args.device, verify=not args.no_verify_ckpt)
        tokenizer = Tokenizer(args.tokenizer or loaded.cfg.data.tokenizer)
        prompts = [tokenizer.encode(p) or [tokenizer.eod] for p in args.prompt]
        start = time.perf_counter()
        outputs = generate(
            loaded.model,
            prompts,
            max_new_tokens=args.max_new_tokens,
            eod=tokenizer.eod,
            sampling=sampling,
            seed=args.seed,
            vocab_size=tokenizer.vocab_size,
            use_cache=not args.no_kv_cache,
        )
        seconds = time.perf_counter() - start
    except (CheckpointError, ConfigError, TokenizerError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [
        {"prompt": p, "completion": completion_text(tokenizer, ids_in, ids), "tokens": ids}
        for p, ids_in, ids in zip(args.prompt, prompts, outputs)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['prompt']}{row['completion']}\n{'-' * 40}")
    new = sum(len(ids) for ids in outputs)
    print(
        f"{loaded.path} (step {loaded.step}): {new} new tokens for {len(prompts)} prompts in "
        f"{seconds:.2f} s ({new / max(seconds, 1e-9):.1f} tokens/s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
