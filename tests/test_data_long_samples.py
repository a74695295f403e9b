"""32k-token samples from the GPT dataset (megatron_llm/data/dataset.py sample_tokens): equal to
the concatenation of the documents in megatron-core's order and to megatron-core's own item,
read with one copy. Two real shards made by data_tools/preprocess.py: thousands of tiny
documents (a sample spans ~10^4 of them) and one huge document (every sample is a slice of it).

Measured per sample: the bytes read through the shard's real mmap reader (counted by a subclass
that calls it), numpy's allocations (tracemalloc sees numpy's buffers) and torch's (its memory
profiler)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, _MMapBinReader

from data_tools import preprocess
from megatron_llm.data.config import DataConfig
from megatron_llm.data.dataset import TokenSamples, build_datasets, sample_ranges
from megatron_llm.data.tokenizer import Tokenizer
from tests.data_fixtures import Corpus

SEQ = 32768


def _shard(root: Path, name: str, docs: list[str], model: Path) -> str:
    jsonl = root / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    argv = ["--input", str(jsonl), "--tokenizer", str(model), "--workers", "1"]
    assert preprocess.main([*argv, "--output-prefix", str(root / name)]) == 0
    return str(root / f"{name}_text_document")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, email_corpus: Corpus, bpe_model: Path):
    root = tmp_path_factory.mktemp("long")
    tiny = [f"x{i % 97}" for i in range(30000)]  # 2-4 tokens each with the EOS
    huge = ["\n".join(email_corpus.docs)]  # ~10^5 tokens in one document
    return {
        "tiny": _shard(root, "tiny", tiny, bpe_model),
        "huge": _shard(root, "huge", huge, bpe_model),
    }


class _CountingReader(_MMapBinReader):
    """The shard's own mmap reader, counting the bytes each read returns."""

    read_bytes = 0

    def read(self, dtype, count, offset):  # type: ignore[no-untyped-def]
        out = super().read(dtype, count, offset)
        type(self).read_bytes += out.nbytes
        return out


def _train(prefix: str, model: Path) -> TokenSamples:
    train, _ = build_datasets(
        DataConfig(prefixes=[prefix], split="100,0,0"),
        seq_length=SEQ,
        seed=3,
        train_samples=3,
        valid_samples=0,
        tokenizer=Tokenizer(model),
    )
    return train


def _torch_bytes(prof: torch.profiler.profile) -> int:
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


@pytest.mark.parametrize("kind", ["tiny", "huge"])
def test_long_samples_equal_the_document_stream_read_once(shards, bpe_model, kind):
    train = _train(shards[kind], bpe_model)
    inner = train.inner
    documents = IndexedDataset(shards[kind])
    stream = np.concatenate([documents[int(d)] for d in inner.document_index]).astype(np.int64)
    physical_to_item = np.argsort(inner.shuffle_index)
    itemsize = inner.dataset.index.dtype_size
    inner.dataset.bin_reader.__class__ = _CountingReader
    pieces = [sum(1 for _ in sample_ranges(inner, i)) for i in range(len(train))]
    assert (max(pieces) > 5000) if kind == "tiny" else (max(pieces) == 1)
    sample_bytes = (SEQ + 1) * 8
    for k in range(len(train)):
        idx = int(physical_to_item[k])
        _CountingReader.read_bytes = 0
        tracemalloc.start()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:  # fmt: skip
            item = train[idx]
        numpy_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        read = _CountingReader.read_bytes
        assert item.dtype == torch.long and item.shape == (SEQ + 1,)
        # The reference: the documents concatenated in megatron-core's order, window k.
        assert torch.equal(item, torch.from_numpy(stream[k * SEQ : k * SEQ + SEQ + 1]))
        # And megatron-core's own item for that index.
        theirs = inner[idx]
        assert torch.equal(item, torch.cat((theirs["tokens"][:1], theirs["labels"])))
        # One read of exactly the sample's token ranges, one int64 buffer, nothing from torch.
        assert read == (SEQ + 1) * itemsize
        assert numpy_peak < 1.5 * sample_bytes, numpy_peak
        assert _torch_bytes(prof) == 0
