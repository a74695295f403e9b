"""Input formats (.zst, .gz, block boundaries, resume positions), Hugging Face tokenizer.json,
and the exact split-and-deduplicate encoding of documents."""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import zstandard

from data_tools import preprocess
from data_tools.inputs import Parsed, Position, parse_piece, read_pieces
from megatron_llm.data import split_encode
from megatron_llm.data.config import DataConfig
from megatron_llm.data.dataset import build_datasets
from megatron_llm.data.indexed import IndexedShard
from megatron_llm.data.manifest import manifest_path
from megatron_llm.data.tokenizer import Tokenizer, TokenizerError
from tests.data_fixtures import Corpus, Shard, output_manifest


def docs_of(prefixes: list[str | Path]) -> list[list[int]]:
    out = []
    for prefix in prefixes:
        shard = IndexedShard(prefix)
        out.extend(shard[i].tolist() for i in range(len(shard)))
    return out


def zst(data: bytes, frames: int = 1) -> bytes:
    # Several frames back to back, as pzstd writes them: all must be read.
    step = -(-len(data) // frames)
    return b"".join(
        zstandard.ZstdCompressor().compress(data[i : i + step]) for i in range(0, len(data), step)
    )


def run(out: Path, source: Path, tokenizer: Path | str, *extra: str) -> dict:
    argv = ["--input", str(source), "--tokenizer", str(tokenizer), "--output-prefix", str(out)]
    assert preprocess.main([*argv, "--workers", "1", *extra]) == 0
    return output_manifest(f"{out}_text_document")


# --- reading ---------------------------------------------------------------------------------

LINES = [
    b'{"text": "a = 1\\n"}',
    b'{"text": "' + b"x" * 40 + b'"}',  # 2: giant under a 30-byte cap
    b"not json",  # 3
    b'{"text": "caf\xe9"}',  # 4
    b'{"text": "b = 2\\n"}',
    b"",  # 6: blank
    b'{"text": "last"}',  # 7, no newline after it
]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
@pytest.mark.parametrize("block", [1, 7, 64, 1 << 20])
def test_pieces_give_every_line_its_number_and_resume_anywhere(
    tmp_path: Path, suffix: str, block: int
) -> None:
    raw = b"\n".join(LINES)
    data = {".jsonl": raw, ".jsonl.gz": gzip.compress(raw), ".jsonl.zst": zst(raw, 3)}[suffix]
    path = tmp_path / f"in{suffix}"
    path.write_bytes(data)

    def read(start: Position) -> tuple[list[str], list[str], list[Position]]:
        parsed = Parsed.empty(["text"])
        ends = []
        for piece in read_pieces(path, start, max_doc_bytes=30, piece_bytes=block):
            parse_piece(piece, ["text"], 30, parsed)
            ends.append(piece.end)
        bad = [f"{w.rsplit(':', 1)[1]} {p['text'].reason}" for w, p in parsed.bad]
        return parsed.texts["text"], bad, ends

    texts, bad, ends = read(Position())
    assert texts == ["a = 1\n", "b = 2\n", "last"]
    assert bad == ["2 giant document", "3 malformed JSON", "4 invalid UTF-8", "6 blank line"]
    assert ends[-1] == Position(len(raw), len(LINES) + 1)
    starts = [sum(len(line) + 1 for line in LINES[:i]) for i in range(len(LINES))]
    for end in ends[:-1]:  # every piece ends where a line starts
        assert end.offset == starts[end.line - 1]
        rest_texts, rest_bad, _ = read(end)
        skipped = end.line - 1
        assert rest_bad == [b for b in bad if int(b.split()[0]) > skipped]
        assert rest_texts == texts[len(texts) - len(rest_texts) :]


def test_zst_and_gz_inputs_give_the_same_shards_and_resume_positions(
    tmp_path: Path, email_corpus: Corpus, email_shard: Shard, bpe_model: Path
) -> None:
    raw = email_corpus.jsonl.read_bytes()
    (tmp_path / "c.jsonl.zst").write_bytes(zst(raw, 4))
    text = "".join(d.replace("\n", " ") + "\n" for d in email_corpus.docs[:5]).encode()
    (tmp_path / "t.txt").write_bytes(text)
    (tmp_path / "t.txt.zst").write_bytes(zst(text))
    out = tmp_path / "zst"
    run(out, tmp_path / "c.jsonl.zst", bpe_model)
    assert (
        Path(f"{out}_text_document.bin").read_bytes()
        == Path(f"{email_shard.prefix}.bin").read_bytes()
    )
    run(tmp_path / "t", tmp_path / "t.txt", bpe_model)
    run(tmp_path / "tz", tmp_path / "t.txt.zst", bpe_model)
    assert docs_of([tmp_path / "tz_text_document"]) == docs_of([tmp_path / "t_text_document"])
    # Shards of a .zst end at the same decompressed positions as those of the plain file, and
    # a run resumed after 2 of them (a crash) continues to the same shards.
    plain = run(tmp_path / "plain", email_corpus.jsonl, bpe_model, "--shard-size", "60K")
    crashed = tmp_path / "crashed"
    manifest = run(crashed, tmp_path / "c.jsonl.zst", bpe_model, "--shard-size", "60K")
    assert [s["end"] for s in manifest["shards"]] == [s["end"] for s in plain["shards"]]
    expected = docs_of([s["prefix"] for s in manifest["shards"]])
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False
    manifest_path(f"{crashed}_text_document").write_text(json.dumps(manifest))
    for path in tmp_path.glob("crashed_text_document_0000[2-9].*"):
        path.unlink()
    resumed = run(crashed, tmp_path / "c.jsonl.zst", bpe_model, "--shard-size", "60K")
    assert resumed["complete"] and docs_of([s["prefix"] for s in resumed["shards"]]) == expected


def test_the_last_shard_is_written_when_a_chunk_ends_at_the_end_of_input(
    tmp_path: Path, email_corpus: Corpus, bpe_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(preprocess, "CHUNK_BYTES", 1)  # every piece fills a chunk
    run(tmp_path / "o", email_corpus.jsonl, bpe_model)
    tok = Tokenizer(bpe_model)
    assert docs_of([tmp_path / "o_text_document"]) == [
        tok.encode(d) + [tok.eod] for d in email_corpus.docs
    ]


# --- Hugging Face tokenizer.json -------------------------------------------------------------


def train_hf(folder: Path, corpus: Corpus, specials: list[str]) -> Path:
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.docs, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_huggingface_tokenizer_json_through_preprocess_and_datasets(
    tmp_path: Path, email_corpus: Corpus
) -> None:
    from tokenizers import Tokenizer as HF

    path = train_hf(tmp_path / "hf", email_corpus, ["<pad>", "<|endoftext|>"])
    reference = HF.from_file(str(path))
    eos = reference.token_to_id("<|endoftext|>")
    for name in (path, path.parent):  # the file, or the folder holding it
        tok = Tokenizer(name)
        assert (tok.eod, tok.pad, tok.vocab_size) == (eos, 0, reference.get_vocab_size())
        assert tok.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert tok.split == "gpt2-regex"  # byte-level BPE: the fast path
    expected = [
        reference.encode(d, add_special_tokens=False).ids + [eos] for d in email_corpus.docs
    ]
    assert tok.encode_batch(email_corpus.docs) == [e[:-1] for e in expected]
    assert tok.decode(expected[0]) == email_corpus.docs[0]
    manifest = run(tmp_path / "o", email_corpus.jsonl, path.parent, "--workers", "2")
    assert manifest["tokenizer_sha256"] == tok.sha256 and manifest["tokenizer"]["eod"] == eos
    prefix = str(tmp_path / "o_text_document")
    assert docs_of([prefix]) == expected
    # The train side reads the shards with the same tokenizer path (data.tokenizer).
    cfg = DataConfig(prefixes=[prefix], tokenizer=str(path), split="100,0,0")
    train, _ = build_datasets(
        cfg,
        seq_length=16,
        seed=1,
        train_samples=8,
        valid_samples=0,
        tokenizer=Tokenizer(cfg.tokenizer),
    )
    stream = np.concatenate(expected)
    window = train[0].numpy()
    assert any(np.array_equal(stream[i : i + 17], window) for i in range(len(stream) - 16))


def test_huggingface_eos_comes_from_the_tokenizer_or_a_clear_error(
    tmp_path: Path, email_corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = train_hf(tmp_path / "no_eos", email_corpus, ["<pad>", "<unk>"])
    with pytest.raises(
        TokenizerError, match=r"no_eos/tokenizer\.json: no end-of-document token.*eos_token"
    ):
        Tokenizer(path)
    # tokenizer_config.json beside it names the eos token (as transformers saves it).
    config = {"eos_token": {"content": "<unk>"}, "pad_token": "<pad>"}
    (path.parent / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer(path.parent)
    assert tok.eod == 1 and tok.pad == 0
    assert tok.sha256 != hashlib.sha256(path.read_bytes()).hexdigest()  # the choice is part of it
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</nope>"}))
    with pytest.raises(
        TokenizerError, match=r"eos_token '</nope>', which is not in the vocabulary"
    ):
        Tokenizer(path)
    with pytest.raises(TokenizerError, match=r"is a folder without tokenizer\.json"):
        Tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing\.json: tokenizer file not found"):
        Tokenizer(tmp_path / "missing.json")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.raises(TokenizerError, match="pip install tokenizers"):
        Tokenizer(path)


# --- exact split-and-deduplicate encoding ------------------------------------------------------


def _spm(tmp: Path, corpus: Corpus, name: str, **options: object) -> Tokenizer:
    lines = [line for doc in corpus.docs for line in doc.split("\n") if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp / name),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
        **options,
    )
    return Tokenizer(tmp / f"{name}.model")


def test_every_split_level_gives_the_ids_of_whole_documents(
    tmp_path: Path, email_corpus: Corpus, bpe_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = [*email_corpus.docs, "x", "  trailing  \n\n", "a(b)c  d\n", "é€ 𝄞 x"]
    tokenizers = {
        "symbols": Tokenizer(bpe_model),
        "words": _spm(tmp_path, email_corpus, "mixed", split_by_unicode_script=False),
        "lines": _spm(tmp_path, email_corpus, "spaces", user_defined_symbols=["in range"]),
    }
    for level, tok in tokenizers.items():
        assert tok.split == level
        expected = [tok.encode(d) for d in docs]
        assert tok.encode_batch(docs) == expected, level
        tokens, lengths = tok.encode_documents(docs, np.uint16)
        assert tokens.dtype == np.uint16 and lengths.tolist() == [len(e) + 1 for e in expected]
    tok = tokenizers["symbols"]
    expected = [tok.encode(d) for d in docs]
    monkeypatch.setattr(split_encode, "BATCH_CHARS", 500)  # long documents cut into windows
    assert tok.encode_batch(docs) == expected
    # Every part hashing alike (a forced collision) takes the exact path, with the same ids.
    monkeypatch.setattr(split_encode, "_power", lambda base, n: np.zeros(n, np.uint64))
    assert tok.encode_batch(docs) == expected
    assert tok.encode_documents([])[0].size == 0 and tok.encode_batch(["", "x"])[0] == []
