"""The exact split-and-cache encoder on stock tokenizers: a Llama-style sentencepiece model (real
sentencepiece trainer) and byte-level BPE tokenizer.json files in GPT-2's and Llama 3's styles
(real tokenizers library) give exactly the ids of encoding each document whole, on varied text."""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from megatron_llm.data import split_encode
from megatron_llm.data.hf_tokenizer import CL100K_REGEX
from megatron_llm.data.tokenizer import Tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
ODD = [
    "",
    " ",
    "\n",
    "x",
    "  leading and trailing  ",
    "tabs\tand\t\ttabs \t mixed\t\n\t",
    "crlf line\r\nnext):\r\n\r\n  end\r",
    "symbols then newline):\n    x = {'a': [1, 2]}\n\n\n",
    "numbers 1234567 12,345.678 0x1F 3.14e-10",
    "contractions: it's we've they'LL I'd don't x'sy 'S O'Neil''s '1 s'",
    "symbols: foo.bar(1)+2e10-x a1b2c3 123456789abc .name (x)\n[y]{z}<w>@v#u$t%s^r&q*p",
    "non-ASCII: café naïve Straße 東京 Ελληνικά русский עברית",
    "emoji 😀😀 🎉 👩‍👩‍👧 \U0001f9ea x😀y 😀 \n",
    "odd spaces:\u00a0nbsp \u2003em \u3000ideo \u2028line\u2029para",
    "controls \x1cfs\x1d \x0bvt\x0cff \x85nel\x00nul",
    "\u2581 literal lower-eighths \u2581\u2581x \u2581",
    "<s> literal </s> specials <unk> <|endoftext|> <|begin_of_text|> in text",
    "added tokens: x end of text y, <mask>  z",
    "word" * 300 + " " * 50 + "\n" * 20 + "tail",
]


def varied_documents() -> list[str]:
    """Python sources, the docstrings in them, and the odd cases above."""
    sources = []
    for package in ("email", "json", "asyncio"):
        for path in sorted((STDLIB / package).glob("*.py")):
            sources.append(path.read_text(encoding="utf-8"))
    docstrings = []
    for source in sources[:40]:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.Module):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    docstrings.append(doc)
    license_text = (STDLIB / "LICENSE.txt").read_text(encoding="utf-8")
    return [*sources, "\n\n".join(docstrings), license_text, *ODD, "\n".join(ODD)]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return varied_documents()


@pytest.fixture(scope="module")
def llama_sp(tmp_path_factory: pytest.TempPathFactory, docs: list[str]) -> Path:
    """A sentencepiece BPE model with Llama's options: identity normalizer, a dummy prefix,
    spaces kept, byte fallback, digits split."""
    folder = tmp_path_factory.mktemp("llama_sp")
    lines = [line for doc in docs[:30] for line in doc.split("\n") if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(folder / "llama"),
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        minloglevel=2,
    )
    return folder / "llama.model"


def byte_level_bpe(folder: Path, docs: list[str], regex: str | None) -> Path:
    """A byte-level BPE tokenizer.json: GPT-2's (regex None: ByteLevel's own regex) or a Split on
    ``regex`` then a byte-level mapping (Llama 3's layout)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HF

    tok = HF(models.BPE())
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200,
        special_tokens=["<|endoftext|>", "<|begin_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs[:30], trainer)
    # Added tokens are matched before pre-tokenizing; these two would change ids across a cut.
    tok.add_tokens([AddedToken("end of text", special=False), AddedToken("<mask>", rstrip=True)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def gpt2_json(tmp_path_factory: pytest.TempPathFactory, docs: list[str]) -> Path:
    return byte_level_bpe(tmp_path_factory.mktemp("gpt2"), docs, None)


@pytest.fixture(scope="module")
def llama3_json(tmp_path_factory: pytest.TempPathFactory, docs: list[str]) -> Path:
    return byte_level_bpe(tmp_path_factory.mktemp("llama3"), docs, CL100K_REGEX)


def whole_ids(path: Path, docs: list[str]) -> list[list[int]]:
    """The reference: every document encoded whole by the library itself."""
    if path.suffix == ".model":
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        return [sp.encode(d) for d in docs]
    from tokenizers import Tokenizer as HF

    tok = HF.from_file(str(path))
    return [tok.encode(d, add_special_tokens=False).ids for d in docs]


def assert_exact(tok: Tokenizer, docs: list[str], expected: list[list[int]]) -> None:
    tokens, lengths = tok.encode_documents(docs, np.int32)
    assert lengths.tolist() == [len(e) + 1 for e in expected]
    ends = np.cumsum(lengths)
    got = [tokens[end - n : end - 1].tolist() for end, n in zip(ends, lengths)]
    bad = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not bad, f"{len(bad)} documents differ, the first: {docs[bad[0]][:80]!r}"
    assert (tokens[ends - 1] == tok.eod).all()


@pytest.mark.parametrize(
    "name,split",
    [("llama_sp", ("words", "symbols")), ("gpt2_json", ("gpt2-regex",))]
    + [("llama3_json", ("cl100k-regex",))],
)
def test_stock_tokenizers_take_the_fast_path_with_the_ids_of_whole_documents(
    name: str,
    split: tuple[str, ...],
    docs: list[str],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = request.getfixturevalue(name)
    tok = Tokenizer(path)
    assert tok.split in split
    expected = whole_ids(path, docs)
    assert_exact(tok, docs, expected)
    assert_exact(tok, docs, expected)  # again, from the cache of parts
    # The cache stays within its bound (it is emptied when full).
    monkeypatch.setattr(split_encode, "CACHE_PARTS", 100)
    bounded = Tokenizer(path)
    assert_exact(bounded, docs, expected)
    assert_exact(bounded, docs[::-1], expected[::-1])
    assert 0 < len(bounded._impl.splitting.cache) <= 100
    # Long documents cut into windows at a cut of the split, and no cache.
    monkeypatch.setattr(split_encode, "BATCH_CHARS", 300)
    monkeypatch.setattr(split_encode, "CACHED_PART_CHARS", 0)
    assert_exact(Tokenizer(path), docs, expected)
    # Every part hashing alike (a forced collision) takes the exact path, with the same ids.
    monkeypatch.setattr(split_encode, "_power", lambda base, n: np.zeros(n, np.uint64))
    assert_exact(Tokenizer(path), docs[-10:], expected[-10:])


def test_tokenizers_that_could_change_ids_when_cut_encode_whole_documents(
    tmp_path: Path, gpt2_json: Path, docs: list[str]
) -> None:
    spec = json.loads(gpt2_json.read_text())
    variants = {
        "prefix space": lambda s: s["pre_tokenizer"].update(add_prefix_space=True),
        "normalizer": lambda s: s.update(normalizer={"type": "NFC"}),
        "dropout": lambda s: s["model"].update(dropout=0.1),
        "unknown regex": lambda s: s.update(
            pre_tokenizer={
                "type": "Sequence",
                "pretokenizers": [
                    {
                        "type": "Split",
                        "pattern": {"Regex": r"\s*\S+"},
                        "behavior": "Isolated",
                        "invert": False,
                    },
                    {**s["pre_tokenizer"], "use_regex": False},
                ],
            }
        ),
    }
    for name, change in variants.items():
        variant = json.loads(json.dumps(spec))
        change(variant)
        path = tmp_path / name / "tokenizer.json"
        path.parent.mkdir()
        path.write_text(json.dumps(variant))
        tok = Tokenizer(path)
        assert tok.split == "documents", name
        if name != "dropout":
            assert_exact(tok, docs[-20:], whole_ids(path, docs[-20:]))
