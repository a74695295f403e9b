"""The data path: corpus -> tokenizer -> .bin/.idx shards -> GPT datasets -> micro-batches."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from data_tools import make_corpus, preprocess, train_tokenizer
from megatron_llm.data.config import DataConfig
from megatron_llm.data.dataset import build_datasets
from megatron_llm.data.manifest import manifest_path
from megatron_llm.data.sampler import micro_batches
from megatron_llm.data.tokenizer import Tokenizer, TokenizerError
from tests.data_fixtures import STDLIB, VOCAB, Corpus, Shard, output_manifest
from tests.distributed import run_on_ranks

REPO = Path(__file__).resolve().parents[1]


def shard_tokens(prefix: str | Path) -> list[list[int]]:
    indexed = IndexedDataset(str(prefix))
    return [indexed[i].tolist() for i in range(len(indexed))]


def expected_tokens(tok: Tokenizer, docs: list[str]) -> list[list[int]]:
    return [tok.encode(d) + [tok.eod] for d in docs]


def run_preprocess(tmp: Path, inputs: list[Path], model: Path, *extra: str) -> int:
    argv = [a for p in inputs for a in ("--input", str(p))]
    return preprocess.main(
        [*argv, "--tokenizer", str(model), "--output-prefix", str(tmp / "out"), *extra]
    )


def _find_aligned(haystack: bytes, needle: bytes, itemsize: int = 4) -> bool:
    """Whether needle occurs in haystack at a whole-token offset."""
    start = haystack.find(needle)
    while start >= 0 and start % itemsize:
        start = haystack.find(needle, start + 1)
    return start >= 0


def data_config(*prefixes: str, **kw: object) -> DataConfig:
    return DataConfig(prefixes=list(prefixes), **kw)  # type: ignore[arg-type]


# --- corpus and tokenizer ------------------------------------------------------------------


def test_make_corpus_is_deterministic_capped_and_sorted(tmp_path: Path) -> None:
    args = ["--stdlib", str(STDLIB / "json"), "--max-bytes"]
    assert make_corpus.main(["--output", str(tmp_path / "a.jsonl"), *args, "1000000"]) == 0
    assert make_corpus.main(["--output", str(tmp_path / "b.jsonl"), *args, "1000000"]) == 0
    assert make_corpus.main(["--output", str(tmp_path / "c.jsonl"), *args, "20000"]) == 0
    full = (tmp_path / "a.jsonl").read_bytes()
    assert full == (tmp_path / "b.jsonl").read_bytes()
    rows = [json.loads(line) for line in full.decode().splitlines()]
    assert [r["source"] for r in rows] == sorted(p.name for p in (STDLIB / "json").glob("*.py"))
    assert rows[0]["text"] == (STDLIB / "json" / rows[0]["source"]).read_text(encoding="utf-8")
    capped = (tmp_path / "c.jsonl").read_bytes()
    assert full.startswith(capped) and 0 < len(capped) < len(full)
    assert sum(len(json.loads(line)["text"].encode()) for line in capped.splitlines()) <= 20000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "c.jsonl"]


def test_tokenizer_ids_and_lossless_whitespace(bpe_model: Path, email_corpus: Corpus) -> None:
    tok = Tokenizer(bpe_model)
    assert (tok.vocab_size, tok.eod, tok.pad) == (VOCAB, 2, 3)
    for doc in email_corpus.docs[:5]:
        assert tok.decode(tok.encode(doc)) == doc  # indentation, blank lines, tabs kept
    pieces = [tok.id_to_piece(i) for i in tok.encode("        return x\n")]
    assert pieces[0] == "▁" * 8  # a run of spaces is one piece: indentation stays cheap
    assert "<0x0A>" in pieces  # newlines are byte tokens, never merged with text


def test_tokenizer_rerun_reuses_and_changes_retrain(
    tmp_path: Path, email_corpus: Corpus, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = tmp_path / "t"
    argv = ["--input", str(email_corpus.jsonl), "--output-prefix", str(prefix)]
    assert train_tokenizer.main([*argv, "--vocab-size", "400"]) == 0
    model = tmp_path / "t.model"
    first = (model.stat().st_mtime_ns, model.read_bytes())
    capsys.readouterr()
    assert train_tokenizer.main([*argv, "--vocab-size", "400"]) == 0
    assert "reusing" in capsys.readouterr().out
    assert (model.stat().st_mtime_ns, model.read_bytes()) == first
    assert train_tokenizer.main([*argv, "--vocab-size", "400", "--force"]) == 0
    assert model.stat().st_mtime_ns != first[0]
    assert model.read_bytes() == first[1]  # training is deterministic
    assert train_tokenizer.main([*argv, "--vocab-size", "420"]) == 0  # new settings: retrain
    assert Tokenizer(model).vocab_size == 420
    assert json.loads((tmp_path / "t.model.json").read_text())["settings"]["vocab_size"] == 420
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.model", "t.model.json", "t.vocab"]


def test_tokenizer_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.model: tokenizer model not found"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(TokenizerError, match=r"junk\.model: not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")


def _spm_model(tmp: Path, corpus: Corpus, name: str, **options: object) -> Tokenizer:
    lines = [line for doc in corpus.docs for line in doc.split("\n") if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp / name),
        vocab_size=400,
        byte_fallback=True,
        minloglevel=2,
        **options,
    )
    return Tokenizer(tmp / f"{name}.model")


def test_line_split_encoding_is_used_only_where_exact(
    tmp_path: Path, bpe_model: Path, email_corpus: Corpus
) -> None:
    docs = email_corpus.docs
    ours = Tokenizer(bpe_model)
    assert ours.split == "symbols"
    assert ours.encode_batch(docs) == [ours.encode(d) for d in docs]
    # sentencepiece's defaults add a dummy prefix per input: line by line would differ.
    default_bpe = _spm_model(tmp_path, email_corpus, "default_bpe", model_type="bpe")
    unigram = _spm_model(
        tmp_path,
        email_corpus,
        "unigram",
        model_type="unigram",
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
    )
    for tok in (default_bpe, unigram):
        assert tok.split == "documents"
        assert tok.encode_batch(docs) == [tok.encode(d) for d in docs]


# --- preprocess ----------------------------------------------------------------------------


def test_shard_holds_each_document_then_eod(email_shard: Shard, bpe_model: Path) -> None:
    tok = Tokenizer(bpe_model)
    assert shard_tokens(email_shard.prefix) == expected_tokens(tok, email_shard.corpus.docs)
    assert IndexedDataset(email_shard.prefix).index.dtype == np.uint16
    manifest = output_manifest(email_shard.prefix)
    assert manifest["documents"] == len(email_shard.corpus.docs)
    assert manifest["tokens"] == sum(map(len, expected_tokens(tok, email_shard.corpus.docs)))
    assert manifest["tokenizer_sha256"] == hashlib.sha256(bpe_model.read_bytes()).hexdigest()
    assert manifest["sources"][0]["bytes"] == email_shard.corpus.jsonl.stat().st_size
    assert manifest["files"][".bin"] == Path(f"{email_shard.prefix}.bin").stat().st_size
    assert manifest["dtype"] == "uint16" and manifest["skipped"] == {}


def test_two_workers_write_the_same_bytes(
    tmp_path: Path, email_corpus: Corpus, bpe_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preprocess, "CHUNK_BYTES", 20_000)  # many chunks, so order matters
    outputs = []
    for workers in ("1", "2"):
        out = tmp_path / workers
        out.mkdir()
        assert run_preprocess(out, [email_corpus.jsonl], bpe_model, "--workers", workers) == 0
        outputs.append([(out / f"out_text_document{e}").read_bytes() for e in (".bin", ".idx")])
    assert outputs[0] == outputs[1]


BAD_LINES = [
    b'{"text": "def good():\\n    return 1\\n"}',
    b'{"text": "unterminated',  # 2: malformed JSON
    b'{"body": "no text field"}',  # 3: missing key
    b'{"text": 42}',  # 4: non-string value
    b'{"text": "caf\xe9"}',  # 5: invalid UTF-8 (latin-1 byte)
    b'{"text": "   \\n"}',  # 6: whitespace, kept (as Megatron-LM's tool does)
    b'{"text": "\\ud800 lone surrogate"}',  # 7: not encodable
    b'{"text": "x = 2\\n"}',
]


def test_bad_documents_are_counted_reported_and_skipped(
    tmp_path: Path, bpe_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    assert run_preprocess(tmp_path, [bad], bpe_model) == 0
    err = capsys.readouterr().err
    assert f"{bad}:2: malformed JSON" in err
    assert f"{bad}:3: field 'text' missing (fields present: 'body'); use --json-keys" in err
    assert f"{bad}:4: field 'text' is int, expected a string" in err
    assert f"{bad}:5: invalid UTF-8" in err
    manifest = output_manifest(tmp_path / "out_text_document")
    assert manifest["skipped"] == {
        "invalid UTF-8": 2,
        "malformed JSON": 1,
        "missing key": 1,
        "non-string value": 1,
    }
    tok = Tokenizer(bpe_model)
    good = ["def good():\n    return 1\n", "   \n", "x = 2\n"]
    assert shard_tokens(tmp_path / "out_text_document") == expected_tokens(tok, good)


def test_on_error_fail_exits_nonzero_and_leaves_nothing(tmp_path: Path, bpe_model: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    cmd = [sys.executable, str(REPO / "data_tools/preprocess.py"), "--input", str(bad)]
    cmd += ["--tokenizer", str(bpe_model), "--output-prefix", str(tmp_path / "out")]
    proc = subprocess.run([*cmd, "--on-error", "fail"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"error: {bad}:2: malformed JSON" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_rerun_reuses_and_changes_rebuild(
    tmp_path: Path, email_corpus: Corpus, bpe_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "c.jsonl"
    shutil.copy(email_corpus.jsonl, corpus)
    files = [tmp_path / f"out_text_document{e}" for e in (".bin", ".idx")]
    files.append(manifest_path(tmp_path / "out_text_document"))
    assert run_preprocess(tmp_path, [corpus], bpe_model) == 0
    stamps = [f.stat().st_mtime_ns for f in files]
    capsys.readouterr()
    assert run_preprocess(tmp_path, [corpus], bpe_model) == 0
    assert "reusing" in capsys.readouterr().out
    assert [f.stat().st_mtime_ns for f in files] == stamps
    with corpus.open("a") as f:
        f.write(json.dumps({"text": "added = True\n"}) + "\n")
    assert run_preprocess(tmp_path, [corpus], bpe_model) == 0
    assert len(shard_tokens(tmp_path / "out_text_document")) == len(email_corpus.docs) + 1
    stamps = [f.stat().st_mtime_ns for f in files]
    assert run_preprocess(tmp_path, [corpus], bpe_model, "--force") == 0
    assert all(f.stat().st_mtime_ns != s for f, s in zip(files, stamps))


def test_several_json_keys_give_several_shards(tmp_path: Path, bpe_model: Path) -> None:
    rows = [{"text": "a = 1\n", "title": "first"}, {"text": "b = 2\n"}, {"text": "c", "title": "t"}]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_preprocess(tmp_path, [src], bpe_model, "--json-keys", "text", "title") == 0
    tok = Tokenizer(bpe_model)
    assert shard_tokens(tmp_path / "out_text_document") == expected_tokens(
        tok, ["a = 1\n", "b = 2\n", "c"]
    )
    assert shard_tokens(tmp_path / "out_title_document") == expected_tokens(tok, ["first", "t"])
    title = output_manifest(tmp_path / "out_title_document")
    assert title["skipped"] == {"missing key": 1}
    gz = tmp_path / "gz"
    gz.mkdir()
    (gz / "rows.jsonl.gz").write_bytes(gzip.compress(src.read_bytes()))
    assert run_preprocess(gz, [gz / "rows.jsonl.gz"], bpe_model, "--json-keys", "text") == 0
    assert (gz / "out_text_document.bin").read_bytes() == (
        tmp_path / "out_text_document.bin"
    ).read_bytes()


def test_text_inputs_by_folder_glob_and_per_file(
    tmp_path: Path, bpe_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "txt" / "sub").mkdir(parents=True)
    (tmp_path / "txt" / "a.txt").write_text("one line\nsecond line\n")
    (tmp_path / "txt" / "sub" / "b.txt").write_text("third\n")
    tok = Tokenizer(bpe_model)
    out = tmp_path / "lines"
    out.mkdir()
    assert run_preprocess(out, [tmp_path / "txt"], bpe_model) == 0
    docs = ["one line", "second line", "third"]
    assert shard_tokens(out / "out_text_document") == expected_tokens(tok, docs)
    out = tmp_path / "files"
    out.mkdir()
    glob = Path(f"{tmp_path}/txt/**/*.txt")
    assert run_preprocess(out, [glob], bpe_model, "--txt-doc-per-file") == 0
    docs = ["one line\nsecond line\n", "third\n"]
    assert shard_tokens(out / "out_text_document") == expected_tokens(tok, docs)
    latin1 = tmp_path / "txt" / "c.txt"
    latin1.write_bytes(b"ok\ncaf\xe9\n")
    capsys.readouterr()
    assert (
        run_preprocess(out, [latin1, tmp_path / "txt" / "a.txt"], bpe_model, "--txt-doc-per-file")
        == 0
    )
    assert f"{latin1}:1: invalid UTF-8 at byte 6 (line 2)" in capsys.readouterr().err
    assert run_preprocess(out, [tmp_path / "missing*.jsonl"], bpe_model) == 2


def test_clis_explain_themselves() -> None:
    for tool in ("make_corpus", "train_tokenizer", "preprocess", "shards_cli"):
        cmd = [sys.executable, str(REPO / f"data_tools/{tool}.py"), "--help"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


# --- datasets and sampler ------------------------------------------------------------------


def test_items_are_consecutive_windows_of_the_document_stream(
    email_shard: Shard, bpe_model: Path
) -> None:
    tok = Tokenizer(bpe_model)
    seq = 32
    cfg = data_config(email_shard.prefix, split="100,0,0")
    train, valid = build_datasets(
        cfg, seq_length=seq, seed=5, train_samples=50, valid_samples=10, tokenizer=tok
    )
    assert valid is None  # the split gives validation no documents
    inner = train.inner
    documents = IndexedDataset(email_shard.prefix)
    # megatron-core packs documents in its shuffled document order, then shuffles the samples.
    stream = np.concatenate([documents[int(d)] for d in inner.document_index])
    physical_to_item = np.argsort(inner.shuffle_index)
    assert len(train) >= 50
    for k in range(len(train)):
        item = train[int(physical_to_item[k])]
        assert item.dtype == torch.long and item.shape == (seq + 1,)
        assert item.tolist() == stream[k * seq : k * seq + seq + 1].tolist()
    assert sorted(set(inner.document_index.tolist())) == list(range(len(documents)))


def test_validation_split_and_clear_errors(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    tok = Tokenizer(bpe_model)
    kw = {"seq_length": 16, "seed": 1, "train_samples": 20, "tokenizer": tok}
    train, valid = build_datasets(data_config(email_shard.prefix), valid_samples=8, **kw)
    # Split 98,2,0 of 25 to 74 documents (email has 29): the last one is the validation split.
    assert valid is not None and len(valid) >= 8 and valid[0].shape == (17,)
    assert set(valid.inner.indices.tolist()) == {len(email_shard.corpus.docs) - 1}
    assert build_datasets(data_config(email_shard.prefix), valid_samples=0, **kw)[1] is None
    missing = str(tmp_path / "nope_text_document")
    with pytest.raises(FileNotFoundError, match=r"nope_text_document\.bin and .*\.idx"):
        build_datasets(data_config(email_shard.prefix, missing), valid_samples=0, **kw)
    other = _spm_model(tmp_path, email_shard.corpus, "other", model_type="bpe")
    with pytest.raises(ValueError, match="made with a different tokenizer"):
        build_datasets(
            data_config(email_shard.prefix), valid_samples=0, **{**kw, "tokenizer": other}
        )


def test_micro_batches_resume_exactly_and_wrap(email_shard: Shard, bpe_model: Path) -> None:
    tok = Tokenizer(bpe_model)
    train, _ = build_datasets(
        data_config(email_shard.prefix),
        seq_length=16,
        seed=2,
        train_samples=64,
        valid_samples=0,
        tokenizer=tok,
    )

    def run(rank: int, consumed: int, steps: int) -> list[torch.Tensor]:
        it = micro_batches(
            train, consumed_samples=consumed, micro_batch_size=3, dp_rank=rank, dp_size=2
        )
        return list(islice(it, steps))

    for rank in (0, 1):
        straight = run(rank, 0, 8)
        assert straight[0].shape == (3, 17)
        resumed = run(rank, 5 * 3 * 2, 3)
        assert all(torch.equal(a, b) for a, b in zip(straight[5:], resumed))
        # step s, rank r: global samples s*6 + r*3 + (0, 1, 2)
        assert torch.equal(straight[4], torch.stack([train[24 + rank * 3 + i] for i in range(3)]))
    n = len(train)
    wrapped = next(
        micro_batches(train, consumed_samples=n - 1, micro_batch_size=2, dp_rank=0, dp_size=1)
    )
    assert torch.equal(wrapped, torch.stack([train[n - 1], train[0]]))


def test_blending_two_shards_by_weight_and_by_size(
    email_shard: Shard, small_shard: Shard, bpe_model: Path
) -> None:
    tok = Tokenizer(bpe_model)
    prefixes = (email_shard.prefix, small_shard.prefix)
    kw = {"seq_length": 32, "seed": 9, "train_samples": 400, "valid_samples": 16, "tokenizer": tok}
    train, valid = build_datasets(data_config(*prefixes, weights=[0.25, 0.75]), **kw)
    ids = np.array([int(train.inner[i]["dataset_id"]) for i in range(len(train))])
    assert len(train) >= 400 and abs((ids == 0).mean() - 0.25) < 0.01
    streams = [np.concatenate(shard_tokens(p)).astype(np.int32).tobytes() for p in prefixes]
    for i in range(0, 60, 3):  # each item is a window of its own shard's tokens
        window = train[i].numpy().astype(np.int32).tobytes()
        assert _find_aligned(streams[ids[i]], window) and not _find_aligned(
            streams[1 - ids[i]], window
        )
    # The small shard's validation split is empty: validation is email's alone.
    assert valid is not None and valid.inner.dataset_path == email_shard.prefix
    train, _ = build_datasets(data_config(*prefixes), **kw)  # weights null: by token count
    sizes = [len(np.concatenate(shard_tokens(p))) for p in prefixes]
    ids = np.array([int(train.inner[i]["dataset_id"]) for i in range(len(train))])
    assert abs((ids == 0).mean() - sizes[0] / sum(sizes)) < 0.01


# --- two gloo ranks ------------------------------------------------------------------------


def _first_items(prefixes: list[str], cache_dir: str | None, model: str) -> list[list[int]]:
    cfg = data_config(*prefixes, weights=[0.5, 0.5] if len(prefixes) > 1 else None)
    cfg.cache_dir = cache_dir
    train, _ = build_datasets(
        cfg, seq_length=16, seed=4, train_samples=40, valid_samples=0, tokenizer=Tokenizer(model)
    )
    return [train[i].tolist() for i in range(10)]


def _first_items_of_cases(cases: list[tuple]) -> list[list[list[int]]]:
    return [_first_items(*case) for case in cases]


def test_two_gloo_ranks_build_once_and_agree(
    tmp_path: Path, email_shard: Shard, small_shard: Shard, bpe_model: Path
) -> None:
    # A private copy of the email shard, so its default cache (PREFIX/cache/) starts empty.
    fresh = str(tmp_path / "email_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(f"{email_shard.prefix}{ext}", f"{fresh}{ext}")
    manifest_path(fresh).parent.mkdir()
    shutil.copy(manifest_path(email_shard.prefix), manifest_path(fresh))
    cases = [
        ([fresh, small_shard.prefix], str(tmp_path / "cache"), str(bpe_model)),  # blended
        ([fresh], None, str(bpe_model)),  # megatron-core's default cache beside the shard
    ]
    ranks = run_on_ranks(2, _first_items_of_cases, cases)
    for case, rank0, rank1 in zip(cases, *ranks):
        assert rank0 == rank1 == _first_items(*case)
    assert len(list((tmp_path / "cache").glob("*GPTDataset-train-shuffle_index.npy"))) == 2
    assert len(list((tmp_path / "cache").glob("*BlendedDataset-train-dataset_index.npy"))) == 1
    assert len(list(Path(fresh, "cache", "GPTDataset_indices").glob("*-train-*.npy"))) == 3


def test_preprocess_summary_json(tmp_path: Path, email_corpus: Corpus, bpe_model: Path) -> None:
    summary = tmp_path / "summary.json"
    assert (
        run_preprocess(tmp_path, [email_corpus.jsonl], bpe_model, "--summary-json", str(summary))
        == 0
    )
    data = json.loads(summary.read_text())
    assert data["outputs"][0]["documents"] == len(email_corpus.docs)
    assert data["bytes"] == os.path.getsize(email_corpus.jsonl) and data["reused"] is False
