"""A Hugging Face ``tokenizer.json`` as the data pipeline's tokenizer (the ``tokenizers`` package).

Texts are encoded without the special tokens a post-processor would add (no BOS): as with
sentencepiece, a document is its ids followed by the end-of-document id.

The end-of-document id is the tokenizer's eos token: the ``eos_token`` of a
``tokenizer_config.json`` beside ``tokenizer.json`` when there is one (as transformers saves it),
else the special token among EOS_NAMES, first match in that order. The pad id likewise comes from
``pad_token`` or PAD_NAMES, and is -1 when there is none.

``split_special_tokens: true`` in tokenizer_config.json (as transformers reads it) makes special
tokens written in a text encode as text.

sha256: of tokenizer.json; when tokenizer_config.json picks the eos or pad token or splits special
tokens, of tokenizer.json followed by those settings, so that a change of any gives a new identity.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from megatron_llm.data.split_encode import Splitting
from megatron_llm.data.tokenizer_errors import TokenizerError

EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")
PAD_NAMES = ("<pad>", "<|padding|>", "[PAD]", "<|pad|>")
CONFIG_FILE = "tokenizer_config.json"


class HuggingFaceTokenizer:
    kind = "huggingface"

    def __init__(self, path: Path) -> None:
        try:
            import tokenizers
        except ImportError:
            raise TokenizerError(
                f"{path}: a Hugging Face tokenizer.json needs the tokenizers package: "
                "pip install tokenizers"
            ) from None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: tokenizer file not found") from None
        except IsADirectoryError:
            raise TokenizerError(f"{path}: is a folder, expected a tokenizer.json file") from None
        try:
            self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception on a malformed file
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({e})") from e
        special = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        config = _config(path.parent / CONFIG_FILE)
        eos = _token_name(config.get("eos_token"))
        pad = _token_name(config.get("pad_token"))
        self.eod = self._id(eos) if eos else _first(special, EOS_NAMES)
        if self.eod < 0:
            why = (
                f"{CONFIG_FILE} names eos_token {eos!r}, which is not in the vocabulary"
                if eos
                else f"no {CONFIG_FILE} beside it names an eos_token, and none of its special "
                f"tokens is one of {', '.join(EOS_NAMES)}"
            )
            raise TokenizerError(
                f"{path}: no end-of-document token: {why}; pass a folder holding tokenizer.json "
                f'and a {CONFIG_FILE} with "eos_token", or a tokenizer.json trained with an '
                "end-of-text special token (e.g. <|endoftext|>)"
            )
        self.pad = self._id(pad) if pad else _first(special, PAD_NAMES)
        # transformers' split_special_tokens: special tokens written in the text are text (as
        # sentencepiece treats "<s>"); our export of a sentencepiece model sets it.
        split = bool(config.get("split_special_tokens", False))
        self._tok.encode_special_tokens = split
        digest = hashlib.sha256(data)
        if eos or pad or split:
            chosen = {"eos_token": eos, "pad_token": pad}
            digest.update(
                json.dumps(chosen | ({"split_special_tokens": True} if split else {})).encode()
            )
        self.sha256 = digest.hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # Added tokens are matched in the raw text before pre-tokenizing: such texts go whole.
        added = tuple(t.content for t in self._tok.get_added_tokens_decoder().values())
        self.splitting = Splitting(exact_split(json.loads(data)), self.encode_batch, whole_if=added)
        # Worker processes tokenize in parallel already; one thread each, as for sentencepiece.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def _id(self, token: str) -> int:
        found = self._tok.token_to_id(token)
        return -1 if found is None else found

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or ""


def _first(special: dict[str, int], names: tuple[str, ...]) -> int:
    return next((special[n] for n in names if n in special), -1)


def _config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: unreadable ({e}); fix or remove it") from e
    return config if isinstance(config, dict) else {}


def _token_name(value: Any) -> str | None:
    # transformers writes a special token as a string or as {"content": ..., ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


# Pre-tokenizer regexes whose pre-tokens never span a whitespace character that follows a
# non-whitespace one (the "gpt2-regex" cut; see split_encode.py), except that CL100K keeps
# symbols together with the newlines after them ("cl100k-regex"). Checked against the
# tokenizers library on varied text by tests/test_fast_encode.py.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
CL100K_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_REGEX_SPLITS = {GPT2_REGEX: "gpt2-regex", CL100K_REGEX: "cl100k-regex"}


def exact_split(spec: dict[str, Any]) -> str:
    """Where texts may be cut without changing their ids (split_encode.SPLITS), from the
    tokenizer.json: for a BPE model without dropout or normalizer, behind GPT-2's byte-level
    pre-tokenizer (its regex, no prefix space) or a Split on a known regex then a byte-level
    mapping (Llama 3); "documents" (no cut) for anything else."""
    model = spec.get("model") or {}
    if spec.get("normalizer") or model.get("type") != "BPE" or model.get("dropout"):
        return "documents"
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not steps or not _byte_level(steps[-1]):
        return "documents"
    if len(steps) == 1:
        return "gpt2-regex" if steps[0].get("use_regex", True) else "documents"
    split = steps[0]
    if len(steps) != 2 or steps[-1].get("use_regex", True) or split.get("type") != "Split":
        return "documents"
    if split.get("behavior") != "Isolated" or split.get("invert"):
        return "documents"
    return _REGEX_SPLITS.get((split.get("pattern") or {}).get("Regex"), "documents")


def _byte_level(step: dict[str, Any]) -> bool:
    return step.get("type") == "ByteLevel" and not step.get("add_prefix_space", True)
