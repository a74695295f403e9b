"""Fine-tuning data: a jsonl of {"prompt": ..., "response": ...}, with the prompt masked out of
the loss when asked.

A sample is ``seq_length + 1`` token ids, as for pretraining: ``[prompt, response, eod, pad...]``
truncated to fit. Positions that must not be predicted (the prompt when ``mask_prompt``, and
the padding) are stored as ``-(id + 1)``; data/batch.py turns a batch back into the model's
inputs and labels, with ``IGNORE`` where a label is masked.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_llm.data.tokenizer import Tokenizer


class PromptResponseDataset:
    """Samples from a jsonl file of prompt/response records, in file order."""

    def __init__(
        self, path: str, tokenizer: Tokenizer, seq_length: int, *, mask_prompt: bool
    ) -> None:
        self.samples: list[torch.Tensor] = []
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt, response = record["prompt"], record["response"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{number}: expected a JSON object with string fields 'prompt' and "
                    f"'response' ({type(e).__name__}: {e})"
                ) from None
            self.samples.append(self._sample(tokenizer, prompt, response, seq_length, mask_prompt))
        if not self.samples:
            raise ValueError(f"{path}: no prompt/response records")

    @staticmethod
    def _sample(
        tokenizer: Tokenizer, prompt: str, response: str, seq_length: int, mask_prompt: bool
    ) -> torch.Tensor:
        p, r = tokenizer.encode(prompt), tokenizer.encode(response) + [tokenizer.eod]
        ids = torch.tensor((p + r)[: seq_length + 1], dtype=torch.long)
        predict = torch.zeros(seq_length + 1, dtype=torch.bool)
        predict[: len(ids)] = True
        if mask_prompt:
            predict[: len(p)] = False  # a label at position i is token i: the prompt's own
        sample = torch.full((seq_length + 1,), tokenizer.eod, dtype=torch.long)
        sample[: len(ids)] = ids
        return torch.where(predict, sample, -sample - 1)  # (seq_length + 1,)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> torch.Tensor:
        return self.samples[idx]


def split_datasets(
    path: str, tokenizer: Tokenizer, seq_length: int, *, mask_prompt: bool, split: str
) -> tuple[PromptResponseDataset, PromptResponseDataset | None]:
    """Train and validation sets: the records split by the train,valid proportions of
    ``data.split`` (the test share is left out)."""
    whole = PromptResponseDataset(path, tokenizer, seq_length, mask_prompt=mask_prompt)
    train, valid, _ = (float(x) for x in split.split(","))
    n_valid = round(len(whole) * valid / (train + valid + 1e-12)) if valid else 0
    valid_set = None
    if n_valid:
        valid_set = PromptResponseDataset.__new__(PromptResponseDataset)
        valid_set.samples = whole.samples[len(whole) - n_valid :]
        whole.samples = whole.samples[: len(whole) - n_valid]
    return whole, valid_set
