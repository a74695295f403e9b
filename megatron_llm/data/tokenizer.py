"""The tokenizer used by the data tools, the datasets and generation.

A tokenizer path names one of:
  a sentencepiece model (``*.model``), as data_tools/train_tokenizer.py writes;
  a Hugging Face ``tokenizer.json`` (a path ending in ``.json``, or a folder holding
      ``tokenizer.json``), read with the ``tokenizers`` package (megatron_llm/data/hf_tokenizer.py).

``Tokenizer`` also carries the few attributes megatron-core's ``GPTDataset`` reads from
``GPTDatasetConfig.tokenizer`` (``vocab_size``, ``eod``, ``pad`` and ``unique_identifiers``, the
last one hashed into the names of its cached index files), so it is passed to megatron-core as
is; no adapter object is needed.

This module imports only sentencepiece and numpy so that tokenizing worker processes start fast.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sentencepiece

from megatron_llm.data.split_encode import ASCII_PUNCTUATION, Splitting, encode_documents
from megatron_llm.data.tokenizer_errors import TokenizerError

__all__ = ["Tokenizer", "TokenizerError", "huggingface_file"]

_FIX = "train one with data_tools/train_tokenizer.py --output-prefix PREFIX (writes PREFIX.model)"
HF_FILE = "tokenizer.json"

# Field numbers of sentencepiece's ModelProto (sentencepiece_model.proto), read directly because
# the generated protobuf module needs the protobuf package, which is not a dependency.
_MODEL_TRAINER_SPEC = 2
_MODEL_NORMALIZER_SPEC = 3
_TRAINER_MODEL_TYPE = 3  # enum: 1 UNIGRAM (the default), 2 BPE, 3 WORD, 4 CHAR
_NORMALIZER_CHARSMAP = 2  # precompiled normalization rules; empty for "identity"
_NORMALIZER_ADD_DUMMY_PREFIX = 3  # default true
_NORMALIZER_REMOVE_EXTRA_WHITESPACES = 4  # default true
_BPE = 2
# A second normalizer_spec holding add_dummy_prefix=false: protobuf merges it into the first.
_NO_DUMMY_PREFIX = bytes([_MODEL_NORMALIZER_SPEC << 3 | 2, 2, _NORMALIZER_ADD_DUMMY_PREFIX << 3, 0])


class _Backend(Protocol):
    kind: str  # recorded in unique_identifiers
    sha256: str
    splitting: Splitting  # how encode_documents cuts texts (split_encode.py)
    vocab_size: int
    eod: int
    pad: int

    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def decode(self, ids: list[int]) -> str: ...
    def id_to_piece(self, token_id: int) -> str: ...


class Tokenizer:
    """A tokenizer file plus the ids the data pipeline relies on.

    eod: the end-of-document id (the eos token), appended after every document by
        data_tools/preprocess.py.
    pad: the pad id, or -1 when there is none (megatron-core's own "no pad" value).
    sha256: the identity of the tokenizer file(s), stored in shard manifests and checkpoints.
    split: where encode_documents may cut texts without changing their ids (one of
        split_encode.SPLITS; "documents": not at all).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        hf_file = huggingface_file(self.path)
        if hf_file is not None:
            from megatron_llm.data.hf_tokenizer import HuggingFaceTokenizer

            self._impl: _Backend = HuggingFaceTokenizer(hf_file)
        else:
            self._impl = SentencePieceTokenizer(self.path)
        self.sha256 = self._impl.sha256
        self.split = self._impl.splitting.split

    # Pickle by path: datasets holding a Tokenizer may be sent to DataLoader worker processes.
    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (Tokenizer, (str(self.path),))

    @property
    def vocab_size(self) -> int:
        return self._impl.vocab_size

    @property
    def eod(self) -> int:
        return self._impl.eod

    @property
    def pad(self) -> int:
        return self._impl.pad

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        # megatron-core hashes this into its index cache names: same model file, same cache.
        return {"class": self._impl.kind, "sha256": self.sha256, "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        return self._impl.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text; equal to ``[encode(t) for t in texts]``, only faster."""
        tokens, lengths = self.encode_documents(texts)
        ends = np.cumsum(lengths)
        return [tokens[end - n : end - 1].tolist() for end, n in zip(ends, lengths)]

    def encode_documents(
        self, texts: list[str], dtype: type = np.int32
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each text's ids followed by the eod id, back to back, and each one's length.

        Equal to concatenating ``encode(t) + [eod]``. Faster: texts are cut where the
        tokenizer can never merge across (``split``) and each distinct part is encoded once
        (megatron_llm/data/split_encode.py), on one thread: callers parallelize across
        processes.
        """
        return encode_documents(texts, self._impl.splitting, self.eod, dtype)

    def decode(self, ids: list[int]) -> str:
        return self._impl.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self._impl.id_to_piece(token_id)


def huggingface_file(path: Path) -> Path | None:
    """The tokenizer.json a tokenizer path names, or None for a sentencepiece model."""
    if path.name.endswith(".json"):
        return path
    if path.is_dir():
        if (path / HF_FILE).is_file():
            return path / HF_FILE
        raise TokenizerError(
            f"{path}: is a folder without {HF_FILE}; expected a sentencepiece .model file, a "
            f"Hugging Face {HF_FILE}, or a folder holding one"
        )
    return None


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: tokenizer model not found; {_FIX}") from None
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except RuntimeError as e:
            raise TokenizerError(f"{path}: not a sentencepiece model ({e}); {_FIX}") from e
        if self._sp.eos_id() < 0:
            raise TokenizerError(
                f"{path}: the model has no EOS piece, which marks the end of every document; {_FIX}"
            )
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.splitting = _splitting(data, self._sp)
        self.vocab_size = self._sp.vocab_size()
        self.eod = self._sp.eos_id()
        self.pad = self._sp.pad_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


def _splitting(model: bytes, sp: sentencepiece.SentencePieceProcessor) -> Splitting:
    split = _exact_split(model, sp)
    normalizer = _fields(_submessage(model, _MODEL_NORMALIZER_SPEC))
    parts, prefix = sp, ""
    if split != "documents" and normalizer.get(_NORMALIZER_ADD_DUMMY_PREFIX, 1):
        # The dummy prefix comes once before a whole text: parts are encoded without it, and
        # split_encode puts a space before each text instead (with the identity normalizer,
        # the same "\u2581").
        parts = sentencepiece.SentencePieceProcessor(model_proto=model + _NO_DUMMY_PREFIX)
        prefix = " "
    return Splitting(split, functools.partial(parts.encode, num_threads=1), prefix)


def _exact_split(model: bytes, sp: sentencepiece.SentencePieceProcessor) -> str:
    """The finest cut of texts (one of split_encode.SPLITS) after which encoding the parts one
    by one always gives the ids of encoding the whole text.

    sentencepiece's BPE merges two adjacent symbols only into a piece of the vocabulary, highest
    score first (leftmost on ties), and matches user-defined pieces before merging, so parts
    encode independently when no piece can span a cut:
      "lines": no piece contains "\n" (a newline is then always a byte token of its own);
      "words": besides, a space ("\u2581") is in a piece only in a leading run, so no piece
          spans "x| " (a cut before spaces that follow another character);
      "symbols": besides, no piece holds an ASCII letter next to ASCII punctuation (sentencepiece
          trains so by default: split_by_unicode_script).
    Control, unknown and byte pieces never come from merges and are not looked at. Only for BPE
    models that never rewrite text inside it (no normalization rules, no whitespace squeezing;
    a dummy prefix, as in Llama's models, is handled by _splitting), with byte fallback
    (without it, adjacent unknown characters become one <unk>, across any cut). Unigram models
    never split: their Viterbi search breaks ties between equal-score segmentations differently
    when the input is cut (measured: 96 of 689 stdlib files differ).
    """
    trainer = _fields(_submessage(model, _MODEL_TRAINER_SPEC))
    normalizer = _fields(_submessage(model, _MODEL_NORMALIZER_SPEC))
    if trainer.get(_TRAINER_MODEL_TYPE, 1) != _BPE:
        return "documents"
    if normalizer.get(_NORMALIZER_CHARSMAP, b""):
        return "documents"
    if normalizer.get(_NORMALIZER_REMOVE_EXTRA_WHITESPACES, 1):
        return "documents"
    if not sp.is_byte(sp.piece_to_id("<0x0A>")):
        return "documents"
    pieces = [
        sp.id_to_piece(i)
        for i in range(sp.vocab_size())
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
    ]
    if any("\n" in p for p in pieces):
        return "documents"
    spaces = " \u2581"
    inner = [p.lstrip(spaces) for p in pieces]
    if any(" " in rest or "\u2581" in rest for rest in inner):
        return "lines"
    if any(_letter_meets_punctuation(p) for p in pieces):
        return "words"
    return "symbols"


def _letter_meets_punctuation(piece: str) -> bool:
    kinds = [
        "L" if c.isascii() and c.isalpha() else "P" if c in ASCII_PUNCTUATION else "-"
        for c in piece
    ]
    pairs = set(zip(kinds, kinds[1:]))
    return ("L", "P") in pairs or ("P", "L") in pairs


def _submessage(message: bytes, number: int) -> bytes:
    value = _fields(message).get(number, b"")
    return value if isinstance(value, bytes) else b""


def _fields(message: bytes) -> dict[int, int | bytes]:
    """The last value of each varint or length-delimited field of a protobuf message."""
    out: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            out[number], pos = _varint(message, pos)
        elif wire_type == 2:
            length, pos = _varint(message, pos)
            out[number], pos = message[pos : pos + length], pos + length
        elif wire_type in (1, 5):  # fixed64 / fixed32 (e.g. float fields): skipped
            pos += 8 if wire_type == 1 else 4
        else:
            raise TokenizerError(f"unexpected protobuf wire type {wire_type} in the model file")
    return out


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise TokenizerError("truncated protobuf varint in the model file")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos
