"""Session fixtures for the data pipeline: real corpora (stdlib packages), a real sentencepiece
model trained on one of them, and real token shards, all built once by the real CLIs."""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from data_tools import make_corpus, preprocess, train_tokenizer
from megatron_llm.data.manifest import manifest_path, resolve_shard

STDLIB = Path(sysconfig.get_paths()["stdlib"])
VOCAB = 512


@dataclass(frozen=True)
class Corpus:
    jsonl: Path
    docs: list[str]


@dataclass(frozen=True)
class Shard:
    prefix: str  # PATH_text_document, without .bin/.idx
    corpus: Corpus


def output_manifest(prefix: str | Path) -> dict:
    """The manifest of a preprocess.py output, its shard prefixes resolved to paths."""
    path = manifest_path(prefix)
    manifest = json.loads(path.read_text())
    for shard in manifest.get("shards", []):
        shard["prefix"] = str(resolve_shard(path, shard["prefix"]))
    return manifest


def _corpus(root: Path, package: str) -> Corpus:
    out = root / f"{package}.jsonl"
    assert make_corpus.main(["--output", str(out), "--stdlib", str(STDLIB / package)]) == 0
    docs = [json.loads(line)["text"] for line in out.open()]
    return Corpus(out, docs)


def _shard(root: Path, corpus: Corpus, tokenizer: Path) -> Shard:
    prefix = root / corpus.jsonl.stem
    argv = ["--input", str(corpus.jsonl), "--tokenizer", str(tokenizer)]
    assert preprocess.main([*argv, "--output-prefix", str(prefix), "--workers", "1"]) == 0
    return Shard(f"{prefix}_text_document", corpus)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def email_corpus(data_root: Path) -> Corpus:
    """The stdlib email package: 29 documents, about 380 kB of Python."""
    return _corpus(data_root, "email")


@pytest.fixture(scope="session")
def small_corpus(data_root: Path) -> Corpus:
    """The stdlib json package: 5 documents, too few to give a 2% validation split one."""
    return _corpus(data_root, "json")


@pytest.fixture(scope="session")
def bpe_model(data_root: Path, email_corpus: Corpus) -> Path:
    prefix = data_root / "bpe"
    argv = ["--input", str(email_corpus.jsonl), "--output-prefix", str(prefix)]
    assert train_tokenizer.main([*argv, "--vocab-size", str(VOCAB)]) == 0
    return data_root / "bpe.model"


@pytest.fixture(scope="session")
def email_shard(data_root: Path, email_corpus: Corpus, bpe_model: Path) -> Shard:
    return _shard(data_root, email_corpus, bpe_model)


@pytest.fixture(scope="session")
def small_shard(data_root: Path, small_corpus: Corpus, bpe_model: Path) -> Shard:
    return _shard(data_root, small_corpus, bpe_model)
