"""Shards as Megatron-LM's tools/preprocess_data.py writes them, per --tokenizer-type.

Without a Megatron-LM tree: byte identity against megatron-core's own IndexedDatasetBuilder fed
with sentencepiece's ids the way Megatron-LM's tool feeds it (one add_document per line, its
ids, bos/eod by type, nothing for a text without ids). With MEGATRON_LM=/path/to/Megatron-LM
(tag core_r0.11.0; MEGATRON_LM_PYTHON: an interpreter with its requirements), also its own test
of its tool with ours in its place, byte identity with its tool, and its merge tool on a folder
of our shards (tests/megatron_lm_check.py).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from data_tools import megatron_preprocess_data, preprocess
from data_tools.megatron_tokenizers import TYPES, DocumentTokenizer
from tests.data_fixtures import Corpus

REPO = Path(__file__).resolve().parents[1]
ODD = [
    "",
    "\n",
    "   ",
    "\t\n \n",
    "<s> literal </s> and <pad> <unk> <CLS><SEP><EOD><MASK><PAD> specials",
    "café naïve 東京 😀 \u2581 \u00a0",
    "def f(x):\n    return {'a': [1, 2]}\n\n\n",
]


def train(folder: Path, corpus: Corpus, name: str, **options: object) -> Path:
    lines = [line for doc in corpus.docs for line in doc.split("\n") if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(folder / name),
        vocab_size=500,
        model_type="bpe",
        byte_fallback=True,
        minloglevel=2,
        **options,
    )
    return folder / f"{name}.model"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, email_corpus: Corpus) -> list[Path]:
    """Llama-style (identity, dummy prefix, no pad piece) and sentencepiece's defaults (NFKC,
    whitespace squeezed: "   " has no ids)."""
    folder = tmp_path_factory.mktemp("megatron_models")
    llama = train(
        folder,
        email_corpus,
        "llama",
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
    )
    return [llama, train(folder, email_corpus, "default")]


def megatron_core_shard(prefix: Path, model: Path, kind: str, texts: list[str]) -> None:
    """What Megatron-LM's tool writes, from megatron-core's builder and sentencepiece's ids."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model))
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(sp.vocab_size()))
    for text in texts:
        ids = ([sp.bos_id()] if kind == "Llama2Tokenizer" else []) + sp.encode(text)
        ids += [sp.eos_id()] if ids else []
        builder.add_document(np.array(ids, np.int64), [len(ids)] if ids else [])
    builder.finalize(f"{prefix}.idx")


def jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.mark.parametrize("kind", ["GPTSentencePieceTokenizer", "Llama2Tokenizer"])
def test_shards_are_byte_identical_to_megatron_lm_for_its_tokenizer_types(
    tmp_path: Path, models: list[Path], email_corpus: Corpus, kind: str
) -> None:
    texts = [*ODD, *email_corpus.docs[:8]]
    corpus = jsonl(tmp_path / "c.jsonl", texts)
    for model in models:
        megatron_core_shard(tmp_path / "ref", model, kind, texts)
        flags = ["--tokenizer-type", kind, "--tokenizer-model", str(model), "--append-eod"]
        workers = "2" if kind == "Llama2Tokenizer" else "1"  # the type reaches worker processes
        out = ["--output-prefix", str(tmp_path / "o"), "--workers", workers]
        megatron_preprocess_data.main(["--input", str(corpus), *out, *flags])
        for ext in (".bin", ".idx"):
            ours = (tmp_path / f"o_text_document{ext}").read_bytes()
            assert ours == (tmp_path / f"ref{ext}").read_bytes(), f"{model.name} {ext}"
    # Megatron-LM's merge tool takes every file of a folder as half of a shard.
    files = [p.name for p in tmp_path.iterdir() if p.is_file() and p.suffix != ".jsonl"]
    assert sorted(files) == ["o_text_document.bin", "o_text_document.idx", "ref.bin", "ref.idx"]


def test_sentencepiece_tokenizer_type_adds_megatron_specials_after_the_vocabulary(
    models: list[Path],
) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(models[0]))
    size, bos, eos = sp.vocab_size(), sp.bos_id(), sp.eos_id()
    assert sp.pad_id() < 0  # so Megatron-LM adds <PAD> too
    tok = DocumentTokenizer.load(models[0], "SentencePieceTokenizer")
    cls, sep, eod, mask, pad = range(size, size + 5)
    assert (tok.eod, tok.vocab_size, tok.bos) == (eod, size + 5, None)
    texts = ["a<s>b", "<EOD></s>", "x <MASK><PAD>", "", "plain"]
    tokens, lengths = tok.encode_documents(texts)
    enc = sp.encode
    expected = [
        [*enc("a"), bos, *enc("b"), eod],
        [eod, eos, eod],
        [*enc("x "), mask, pad, eod],
        [],
        [*enc("plain"), eod],
    ]
    assert lengths.tolist() == [len(e) for e in expected]
    assert tokens.tolist() == [i for e in expected for i in e]
    assert {cls, sep} < set(tok.specials.values())
    again = pickle.loads(pickle.dumps(tok))  # as a spawned worker process receives it
    assert (again.tokenizer_type, again.eod, again.specials) == (
        "SentencePieceTokenizer",
        eod,
        tok.specials,
    )


def test_megatron_flags_that_would_write_something_else_are_refused(
    models: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--input", "x.jsonl", "--output-prefix", "o", "--workers", "1"]
    model = ["--tokenizer-model", str(models[0])]
    cases = {
        "GPT2BPETokenizer": (
            ["--tokenizer-type", "GPT2BPETokenizer", "--append-eod"],
            "tokenizer.json",
        ),
        "no eod": (["--tokenizer-type", TYPES[0], *model], "--append-eod is required"),
        "sentences": (
            ["--tokenizer-type", TYPES[0], *model, "--append-eod", "--split-sentences"],
            "sentence splitting",
        ),
    }
    for name, (argv, why) in cases.items():
        with pytest.raises(SystemExit) as e:
            megatron_preprocess_data.main([*base, *argv])
        assert e.value.code == 2, name
        assert why in capsys.readouterr().err, name
    assert (
        preprocess.main(
            ["--input", "x.jsonl", "--tokenizer", "t.json", "--output-prefix", "o"]
            + ["--tokenizer-type", "Llama2Tokenizer"]
        )
        == 2
    )


@pytest.mark.skipif(not os.environ.get("MEGATRON_LM"), reason="MEGATRON_LM (a tree) not set")
def test_megatron_lm_tools_accept_ours(tmp_path: Path, models: list[Path], bpe_model: Path) -> None:
    python = os.environ.get("MEGATRON_LM_PYTHON", sys.executable)
    check = [python, str(REPO / "tests/megatron_lm_check.py"), str(tmp_path)]
    proc = subprocess.run(
        [*check, str(bpe_model), *map(str, models)], capture_output=True, text=True, timeout=1800
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert proc.returncode == 0 and len(lines) == 27, "\n".join(lines) + proc.stderr[-3000:]
