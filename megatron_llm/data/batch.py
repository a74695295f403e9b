"""From a micro-batch of samples to the model's inputs and labels, for every run.

A sample is ``seq_length + 1`` token ids; the model reads the first ``seq_length`` and predicts
the last ``seq_length``. Positions that must not be predicted (a fine-tuning prompt, padding:
see data/sft.py) are stored as ``-(id + 1)`` and get the label ``IGNORE``. Pretraining samples
hold no negative ids, so for them this is the usual shift by one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megatron_llm.model.gpt import IGNORE

__all__ = ["IGNORE", "inputs_and_labels", "input_label_pairs"]


def inputs_and_labels(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq + 1) samples -> inputs (batch, seq), labels (batch, seq), on tokens' device."""
    masked = tokens < 0
    ids = torch.where(masked, -tokens - 1, tokens)
    labels = ids[:, 1:].masked_fill(masked[:, 1:], IGNORE)
    return ids[:, :-1], labels


def input_label_pairs(
    batches: Iterator[torch.Tensor],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) micro-batches, as DeepSpeed's pipeline engine reads them (it moves them
    to its device itself)."""
    for tokens in batches:  # (micro_batch, seq + 1)
        yield inputs_and_labels(tokens)
