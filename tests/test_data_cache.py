"""The GPT dataset's index cache (broken entries, unshared cache dirs) and exact resume at dp=2."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import torch

from megatron_llm.data.config import DataConfig
from megatron_llm.data.dataset import build_datasets
from megatron_llm.data.sampler import micro_batches
from megatron_llm.data.tokenizer import Tokenizer
from tests.data_fixtures import Shard
from tests.distributed import run_on_ranks

MICRO, DP, STEPS, K = 2, 2, 6, 4


def train_set(prefixes: list[str], model: str, cache: str | None):  # noqa: ANN201
    cfg = DataConfig(
        prefixes=prefixes, weights=[0.6, 0.4][: len(prefixes)] if len(prefixes) > 1 else None
    )
    cfg.cache_dir = cache
    train, _ = build_datasets(
        cfg,
        seq_length=16,
        seed=3,
        train_samples=MICRO * DP * STEPS,
        valid_samples=0,
        tokenizer=Tokenizer(model),
    )
    return train


def batches(train, rank: int, consumed: int, steps: int) -> list[list[list[int]]]:  # noqa: ANN001
    it = micro_batches(
        train, consumed_samples=consumed, micro_batch_size=MICRO, dp_rank=rank, dp_size=DP
    )
    return [b.tolist() for b in islice(it, steps)]


def test_broken_cache_entries_are_rebuilt_not_loaded(
    tmp_path: Path, email_shard: Shard, small_shard: Shard, bpe_model: Path
) -> None:
    prefixes = [email_shard.prefix, small_shard.prefix]
    cache = tmp_path / "cache"
    first = train_set(prefixes, str(bpe_model), str(cache))
    expected = [first[i].tolist() for i in range(len(first))]
    shuffle = next(cache.glob("*GPTDataset-train-shuffle_index.npy"))
    blend = next(cache.glob("*BlendedDataset-train-dataset_index.npy"))
    # What a rank killed while writing leaves: arrays cut short under their final names.
    for path in (shuffle, blend):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    again = train_set(prefixes, str(bpe_model), str(cache))
    assert [again[i].tolist() for i in range(len(again))] == expected
    for path in cache.glob("*.npy"):
        np.load(path)  # every entry repaired: a truncated array would raise here
    # An entry without its description (written last) is incomplete, whatever else is there.
    for description in cache.glob("*GPTDataset-train-description.txt"):
        description.unlink()
    stamp = shuffle.stat().st_mtime_ns
    third = train_set(prefixes, str(bpe_model), str(cache))
    assert [third[i].tolist() for i in range(len(third))] == expected
    assert shuffle.stat().st_mtime_ns != stamp and not list(cache.glob("*.tmp-*"))


def _straight_and_resumed(prefixes: list[str], model: str, root: str) -> dict:
    rank = torch.distributed.get_rank()
    cache = f"{root}/rank{rank}"  # a cache dir no other rank sees, as on separate nodes
    straight = batches(train_set(prefixes, model, cache), rank, 0, STEPS)
    # A new run: fresh datasets (loaded from the cache), resumed after K steps.
    resumed = batches(train_set(prefixes, model, cache), rank, K * MICRO * DP, STEPS - K)
    cached = len(list(Path(cache).glob("*")))
    return {"straight": straight, "resumed": resumed, "cached": cached}


def test_two_ranks_resume_at_the_next_sample_with_unshared_caches(
    tmp_path: Path, email_shard: Shard, small_shard: Shard, bpe_model: Path
) -> None:
    prefixes = [email_shard.prefix, small_shard.prefix]
    results = run_on_ranks(DP, _straight_and_resumed, prefixes, str(bpe_model), str(tmp_path))
    reference = train_set(prefixes, str(bpe_model), None)  # one process, no cache
    for rank, result in enumerate(results):
        assert result["resumed"] == result["straight"][K:]
        assert result["cached"] >= 2 * 4 + 3  # this rank built and saved every index itself
        for step, batch in enumerate(result["straight"]):
            first = step * MICRO * DP + rank * MICRO
            assert batch == [reference[first + i].tolist() for i in range(MICRO)]
    assert results[0]["straight"] != results[1]["straight"]
