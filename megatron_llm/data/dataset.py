"""GPT training and validation datasets over Megatron token shards.

megatron-core builds them: ``GPTDataset`` (document, sample and shuffle indices: deterministic
from the seed, several epochs when more samples are asked for than one epoch holds) and
``BlendedDataset`` (several prefixes mixed by weight), through ``BlendedMegatronDatasetBuilder``.
This module decides what to ask for, checks the shards first so that mistakes get a message
naming the file and the fix, and turns megatron-core's item dicts into one token tensor.

Distributed runs: call ``build_datasets`` on every rank (megatron-core synchronizes with
barriers on the default process group). Rank 0 builds the indices and writes them to the cache;
after a barrier the other ranks load them, so they never race on the files.

Cache (``data.cache_dir``): the GPTDataset indices go to cache_dir, or, when it is null, to
megatron-core's default ``PREFIX/cache/GPTDataset_indices/`` (a folder named like the prefix,
beside the shard); blending indices go to cache_dir only. File names hash the seed, sequence
length, split, sample count and the tokenizer's sha256, so a change rebuilds rather than reuses
a stale index. The cache reads and writes are ours, not megatron-core's (which writes the final
names in place, so a rank killed mid-write leaves a cache that every later run loads and fails
on): each file is written to a temporary name and renamed, the description file last, and a
cache entry counts only if its description exists and every array loads. A rank that finds no
usable entry (the cache dir is not shared between nodes, or an entry is broken) builds the
indices itself, deterministically the same, and saves them: nothing waits on a file that
another node wrote, so an unshared cache costs time but never hangs.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_llm.atomic import open_atomic, write_atomic
from megatron_llm.data.config import DataConfig
from megatron_llm.data.indexed import ShardError
from megatron_llm.data.manifest import ManifestError
from megatron_llm.data.shard_checks import check_shard
from megatron_llm.data.tokenizer import Tokenizer


class TokenSamples(torch.utils.data.Dataset):
    """Items are ``torch.LongTensor`` of shape (seq_length + 1,): input = item[:-1], labels =
    item[1:]. Consecutive documents are packed, each followed by its EOS id.

    An item is megatron-core's text for that index (tests/test_data*.py compare them), read
    with one copy: ``sample_tokens``."""

    def __init__(self, inner: GPTDataset | BlendedDataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, idx: int) -> torch.Tensor:
        dataset, idx = _gpt_dataset_of(self.inner, idx)
        return torch.from_numpy(sample_tokens(dataset, idx))  # (seq_length + 1,)


def _gpt_dataset_of(inner: GPTDataset | BlendedDataset, idx: int) -> tuple[GPTDataset, int]:
    """The GPTDataset and its index that item ``idx`` comes from (BlendedDataset.__getitem__'s
    lookup; its indices are arrays already: _CachedBlendedDataset builds or loads them)."""
    if isinstance(inner, BlendedDataset):
        return inner.datasets[int(inner.dataset_index[idx])], int(inner.dataset_sample_index[idx])
    return inner, idx


def sample_ranges(dataset: GPTDataset, idx: int) -> Iterator[tuple[int, int, int]]:
    """(document, first token, token count) of each piece of sample ``idx``, in order: the
    sample index's (document index position, offset) pairs of idx and idx + 1, as megatron-core's
    _query_document_sample_shuffle_indices reads them (seq_length + 1 tokens, the extra one
    shared with the next sample). A generator: a 32k sample of tiny documents has ~10^4 pieces,
    and a list of them would outweigh the sample."""
    if dataset.shuffle_index is None or not dataset.config.add_extra_token_to_sequence:
        raise ValueError(
            "sample_ranges: needs a GPTDataset with its indices built (_CachedGPTDataset) and "
            "add_extra_token_to_sequence=True (build it with build_datasets)"
        )
    i = int(dataset.shuffle_index[idx])
    first, first_offset = (int(x) for x in dataset.sample_index[i])
    last, last_offset = (int(x) for x in dataset.sample_index[i + 1])
    lengths = dataset.dataset.sequence_lengths
    for k in range(first, last + 1):
        doc = int(dataset.document_index[k])
        start = first_offset if k == first else 0
        stop = last_offset + 1 if k == last else int(lengths[doc])
        yield doc, start, stop - start


def sample_tokens(dataset: GPTDataset, idx: int) -> np.ndarray:
    """Sample ``idx`` as int64, equal to megatron-core's text for it, with ONE copy of the
    tokens: each piece is a view of the memory-mapped .bin (IndexedDataset's mmap reader),
    cast straight into the output. megatron-core's item instead concatenates, then slices
    tokens and labels and builds a loss mask and position ids per sample (about five times the
    sample's bytes), which matters at 32k+ tokens per sample."""
    length = dataset.config.sequence_length + 1
    out = np.empty(length, dtype=np.int64)
    indexed, at = dataset.dataset, 0
    for doc, start, count in sample_ranges(dataset, idx):
        pointer = int(indexed.index[doc][0]) + start * indexed.index.dtype_size
        out[at : at + count] = indexed.bin_reader.read(indexed.index.dtype, count, pointer)
        at += count
    # A short last sample (validation without drop_last) is padded; megatron-core maps the pad
    # id, and any real token equal to it, to 0 in the item it returns.
    out[at:] = 0
    pad = dataset._pad_token_id
    if pad >= 0:
        out[out == pad] = 0
    return out


@dataclass(frozen=True)
class Shard:
    prefix: str
    weight: float
    documents: int  # megatron-core splits train/valid/test by document (one sequence each)
    tokens: int


def build_datasets(
    cfg: DataConfig,
    *,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    tokenizer: Tokenizer,
) -> tuple[TokenSamples, TokenSamples | None]:
    """The train dataset with at least train_samples items, and the validation dataset with
    at least valid_samples items, or None when valid_samples is 0 or cfg.split leaves the
    validation split no documents."""
    if train_samples <= 0:
        raise ValueError(f"train_samples={train_samples}: must be positive")
    shards = [_open_shard(i, p, cfg, tokenizer) for i, p in enumerate(cfg.prefixes)]
    if not shards:
        raise ValueError("data.prefixes is empty; list the token shards to train on")
    shards = [s for s in shards if s.weight > 0]
    base = _base_config(cfg, seq_length, seed, tokenizer)
    train_part = _split_part(base, Split.train)
    if train_part is None:
        raise ValueError(f"data.split={cfg.split!r} gives the train split no share of documents")
    for shard in shards:
        if _documents_in(shard, train_part) == 0:
            raise ValueError(
                f"{shard.prefix}: its {shard.documents} documents give the train split none "
                f"with data.split={cfg.split!r}; use a larger train share or more documents"
            )
    train = _build_split(base, Split.train, shards, train_samples)
    valid_part = _split_part(base, Split.valid)
    with_valid = [s for s in shards if valid_part and _documents_in(s, valid_part) > 0]
    if valid_samples <= 0 or not with_valid:
        return train, None
    # A shard too small to lend the validation split a document is left out of that blend only.
    return train, _build_split(base, Split.valid, with_valid, valid_samples)


def _open_shard(index: int, prefix: str, cfg: DataConfig, tokenizer: Tokenizer) -> Shard:
    missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not Path(f"{prefix}{ext}").is_file()]
    if missing:
        raise FileNotFoundError(
            f"data.prefixes[{index}]={prefix!r}: missing {' and '.join(missing)} (a shard is "
            f"PREFIX.bin + PREFIX.idx); make it with data_tools/preprocess.py, whose "
            "--output-prefix OUT writes OUT_text_document.bin/.idx"
        )
    if cfg.verify:
        try:
            checked = check_shard(
                prefix,
                vocab_size=tokenizer.vocab_size,
                tokenizer_sha256=tokenizer.sha256,
                cache_dir=cfg.cache_dir,
                tokenizer_name=str(tokenizer.path),
            )
        except (ShardError, ManifestError) as e:  # one line: pretrain prints it as it is
            raise ShardError(f"data.prefixes[{index}]: {e}") from e
        documents, tokens = checked.documents, checked.tokens
    else:
        indexed = IndexedDataset(prefix)
        # sequence_lengths views the .idx mmap, which closes with `indexed`: use it before then.
        documents, tokens = len(indexed.sequence_lengths), int(indexed.sequence_lengths.sum())
        del indexed
    # "By size" means by tokens, which is proportional to the samples an epoch holds. Passing
    # these weights (not None) makes megatron-core build enough epochs of every shard.
    weight = float(tokens) if cfg.weights is None else cfg.weights[index]
    return Shard(prefix, weight, documents, tokens)


def _base_config(cfg: DataConfig, seq_length: int, seed: int, tok: Tokenizer) -> dict[str, Any]:
    return {
        "random_seed": seed,
        "sequence_length": seq_length,
        "split": cfg.split,
        "path_to_cache": cfg.cache_dir or None,
        "tokenizer": tok,
        "reset_position_ids": False,
        "reset_attention_mask": False,
        "eod_mask_loss": False,
        # The model builds its own causal mask; a (seq, seq) mask per item is wasted work.
        "create_attention_mask": False,
    }


def _split_part(base: dict[str, Any], which: Split) -> tuple[float, float] | None:
    """The [begin, end) fraction of every shard's documents that split ``which`` gets."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(base["split"]))
    return matrix[which.value]


def _documents_in(shard: Shard, part: tuple[float, float]) -> int:
    # The same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
    return int(round(part[1] * shard.documents)) - int(round(part[0] * shard.documents))


def _build_split(
    base: dict[str, Any], which: Split, shards: list[Shard], samples: int
) -> TokenSamples:
    """One split, alone: the builder builds every split its matrix names, and an empty split
    would make GPTDataset loop forever looking for tokens to fill the samples asked of it."""
    weights = [s.weight for s in shards] if len(shards) > 1 else None
    config = GPTDatasetConfig(blend=([s.prefix for s in shards], weights), **base)
    config.split_matrix = [
        m if i == which.value else None for i, m in enumerate(config.split_matrix)
    ]
    sizes = [samples if i == which.value else 0 for i in range(len(Split))]
    datasets = _Builder(_CachedGPTDataset, sizes, lambda: True, config).build()
    return TokenSamples(datasets[which.value])


def _load_cached(folder: str, base: str, names: tuple[str, ...]) -> tuple[np.ndarray, ...] | None:
    """The arrays of a cache entry, or None if it is absent or broken (then it is rebuilt)."""
    if not Path(folder, f"{base}-description.txt").is_file():
        return None
    try:
        # Index arrays are plain integers: a cache dir may be shared, and a planted file holding
        # pickled objects is refused (ValueError) and rebuilt, never unpickled.
        return tuple(
            np.load(os.path.join(folder, f"{base}-{name}.npy"), allow_pickle=False, mmap_mode="r")
            for name in names
        )
    except (OSError, ValueError, EOFError) as e:
        logging.getLogger(__name__).warning(
            f"{folder}/{base}-*: broken cache entry ({e}); rebuilding"
        )
        return None


def _save_cached(folder: str, base: str, arrays: dict[str, np.ndarray], description: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, array in arrays.items():
        with open_atomic(os.path.join(folder, f"{base}-{name}.npy")) as f:
            np.save(f, array, allow_pickle=False)
    # Last: it marks the entry complete.
    write_atomic(os.path.join(folder, f"{base}-description.txt"), description)


_MEGATRON_LOGGERS = ("megatron.core.datasets.gpt_dataset", "megatron.core.datasets.blended_dataset")


def _build_in_memory(dataset: Any, build: Any, **no_cache: Any) -> Any:
    """Run megatron-core's index builder with its own caching turned off."""
    saved = dataset.config
    dataset.config = copy.copy(saved)
    for name, value in no_cache.items():
        setattr(dataset.config, name, value)
    # Its "Unable to save ... because path_to_cache is None" would blame a setting we chose.
    quiet = _DropMessage("because path_to_cache is None")
    for name in _MEGATRON_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        return build()
    finally:
        dataset.config = saved
        for name in _MEGATRON_LOGGERS:
            logging.getLogger(name).removeFilter(quiet)


class _CachedGPTDataset(GPTDataset):
    _NAMES = ("document_index", "sample_index", "shuffle_index")

    def _build_document_sample_shuffle_indices(self) -> tuple[np.ndarray, ...]:
        folder = self.config.path_to_cache or os.path.join(
            self.dataset.path_prefix, "cache", "GPTDataset_indices"
        )
        base = f"{self.unique_description_hash}-GPTDataset-{self.index_split.name}"
        cached = _load_cached(folder, base, self._NAMES)
        if cached is not None:
            return cached
        parent = super()._build_document_sample_shuffle_indices
        arrays = _build_in_memory(self, parent, path_to_cache=None, mock=True)
        _save_cached(folder, base, dict(zip(self._NAMES, arrays)), self.unique_description)
        return arrays


class _CachedBlendedDataset(BlendedDataset):
    _NAMES = ("dataset_index", "dataset_sample_index")

    def _build_indices(self) -> tuple[np.ndarray, ...]:
        folder = self.config.path_to_cache
        parent = super()._build_indices
        if not folder:
            return _build_in_memory(self, parent)
        base = f"{self.unique_description_hash}-BlendedDataset-{self.split.name}"
        cached = _load_cached(folder, base, self._NAMES)
        if cached is not None:
            return cached
        arrays = _build_in_memory(self, parent, path_to_cache=None)
        _save_cached(folder, base, dict(zip(self._NAMES, arrays)), self.unique_description)
        return arrays


class _Builder(BlendedMegatronDatasetBuilder):
    """megatron-core's builder, building our cache-safe BlendedDataset."""

    @staticmethod
    def build_generic_dataset(cls: Any, is_built_on_rank: Any, synchronize_ranks: bool, *args: Any):
        if cls is BlendedDataset:
            cls = _CachedBlendedDataset
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            cls, is_built_on_rank, synchronize_ranks, *args
        )


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()
