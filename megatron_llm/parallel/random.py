"""Dropout RNG under tensor parallelism.

Where a tensor is replicated across the tp group (the residual stream without sequence
parallelism), every tp rank must drop the same elements: the default torch RNG, seeded the same
on a tp group, does that. Where a tensor is split (attention heads, sequence shards), each rank
needs its own stream: ``TensorParallelRNG.fork()`` swaps in a second RNG state seeded per rank.
megatron-core's tracker (``model_parallel_cuda_manual_seed``) calls CUDA, so this is ours.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class TensorParallelRNG:
    def __init__(self, seed: int) -> None:
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.state = torch.get_rng_state()
        self.cuda_state = None
        if torch.cuda.is_available():
            outer_cuda = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(seed)
            self.cuda_state = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(outer_cuda)
        torch.set_rng_state(outer)

    @staticmethod
    def seed_for(seed: int, tp_rank: int, dp_rank: int) -> int:
        # Distinct for every (dp, tp) rank and apart from the default streams (seed + 1 + dp).
        return (seed + 1 + dp_rank) * 1_000_003 + 2718 + tp_rank

    @contextmanager
    def fork(self) -> Iterator[None]:
        outer = torch.get_rng_state()
        torch.set_rng_state(self.state)
        if self.cuda_state is not None:
            outer_cuda = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(self.cuda_state)
        try:
            yield
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(outer)
            if self.cuda_state is not None:
                self.cuda_state = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(outer_cuda)

    def state_dict(self) -> dict[str, Any]:
        # Tensors only, so that a checkpoint loads it with torch.load(weights_only=True).
        return {"torch": self.state, "cuda": self.cuda_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state["torch"]
        if state.get("cuda") is not None and self.cuda_state is not None:
            self.cuda_state = state["cuda"]
