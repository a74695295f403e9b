"""Micro-batches in Megatron's pretraining order, resumable at any consumed sample count."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch


class SizedTokenDataset(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, idx: int) -> torch.Tensor: ...


def micro_batches(
    dataset: SizedTokenDataset,
    *,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
) -> Iterator[torch.Tensor]:
    """Endless micro-batches of shape (micro_batch_size, seq_length + 1) for one dp rank.

    Each micro-step takes the next micro_batch_size * dp_size consecutive sample indices of the
    global order, starting at consumed_samples; rank r gets the r-th contiguous slice (the order
    of Megatron's MegatronPretrainingSampler). The dataset's own shuffle index already randomizes
    which sample an index gives. So resuming with consumed_samples=k yields exactly the batches
    a straight run yields after k samples, on any rank.

    Indices wrap around modulo len(dataset) instead of stopping. That is a safety net only:
    megatron-core's GPTDataset builds as many epochs as the samples requested of it need, so a
    run that asked build_datasets for what it consumes never wraps.
    """
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(
            f"micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}: need "
            "micro_batch_size >= 1 and 0 <= dp_rank < dp_size"
        )
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples={consumed_samples}: must be >= 0")
    size = len(dataset)
    if size == 0:
        raise ValueError("the dataset is empty; there is nothing to batch")
    start = consumed_samples
    while True:
        first = start + dp_rank * micro_batch_size
        samples = [dataset[(first + i) % size] for i in range(micro_batch_size)]
        yield torch.stack(samples)  # (micro_batch_size, seq_length + 1)
        start += micro_batch_size * dp_size
