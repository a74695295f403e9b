"""Loss of one process's model over token shards, for ``python -m megatron_llm.eval``."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from megatron_llm.data.batch import DocumentMasking, model_inputs
from megatron_llm.data.indexed import IndexedShard
from megatron_llm.data.shard_checks import check_shard


def check_shards(
    prefixes: list[str], vocab_size: int, tokenizer_sha256: str | None, tokenizer_name: str
) -> None:
    """Every shard checked before the first window (megatron_llm/data/shard_checks.py): a
    truncated .bin or a corrupt .idx must not give a loss over part of the data."""
    for prefix in prefixes:
        check_shard(
            prefix,
            vocab_size=vocab_size,
            tokenizer_sha256=tokenizer_sha256,
            cache_dir=None,
            tokenizer_name=tokenizer_name,
        )


def token_windows(prefixes: list[str], seq_length: int) -> Iterator[np.ndarray]:
    """Windows of seq_length + 1 tokens over the shards' documents, back to back in order.

    Each window starts at the last token of the one before (as Megatron's GPT samples do), so
    every token but the very first is predicted exactly once; a last, partial window is
    dropped."""
    need = seq_length + 1
    pending = np.zeros(0, dtype=np.int64)
    for prefix in prefixes:
        shard = IndexedShard(prefix)
        for doc in range(len(shard)):
            pending = np.concatenate([pending, shard[doc].astype(np.int64)])
            start = 0
            while len(pending) - start >= need:
                yield pending[start : start + need]
                start += seq_length
            pending = pending[start:]


def model_loss(
    model: torch.nn.Module,
    windows: Iterable[np.ndarray],
    *,
    batch_size: int,
    max_samples: int | None = None,
    progress: bool = False,
    masking: DocumentMasking | None = None,
) -> tuple[float, int]:
    """Mean token loss of a single-process model over the windows, and the tokens predicted;
    ``masking``: the document rules the model was trained with (data/batch.py)."""
    device = next(model.parameters()).device
    vocab = model.embed.weight.shape[0]
    chosen = itertools.islice(windows, max_samples)
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad(), tqdm(disable=not progress, unit=" samples") as bar:
        while batch := list(itertools.islice(chosen, batch_size)):
            window = torch.from_numpy(np.stack(batch)).to(device)  # (batch, seq + 1)
            if int(window.max()) >= vocab:
                raise ValueError(
                    f"token id {int(window.max())} is outside the model's {vocab} embedding "
                    "rows: were these shards made with another tokenizer?"
                )
            inputs, labels, ids = model_inputs(window, masking)
            loss = model(inputs, labels, **ids).float()  # mean over the batch's tokens
            n = window[:, 1:].numel()
            total += float(loss) * n
            tokens += n
            bar.update(len(batch))
    model.train(was_training)
    if tokens == 0:
        raise ValueError("no complete window of seq_length + 1 tokens in these shards")
    return total / tokens, tokens
