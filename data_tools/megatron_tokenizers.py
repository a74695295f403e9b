"""Documents as Megatron-LM's tools/preprocess_data.py writes them, per its --tokenizer-type.

preprocess.py --tokenizer-type TYPE (with a sentencepiece .model; TYPE as Megatron-LM names it,
its flag --append-eod always on) writes shards byte-identical to Megatron-LM's tool (tag
core_r0.11.0) with the same model, checked by tests/test_megatron_interop.py:

  GPTSentencePieceTokenizer (the default)  ids, then the eos id (</s>).
  Llama2Tokenizer                          the bos id (<s>), ids, then the eos id.
  SentencePieceTokenizer                   ids, then <EOD>, whose id comes after the
      vocabulary: Megatron-LM adds <CLS> <SEP> <EOD> <MASK> (ids V, V+1, V+2, V+3 for a
      vocabulary of V pieces; <EOD> = V+2), then the pad, bos and eos pieces where the model has
      none (e.g. <PAD> = V+4); and any of these special tokens written in a text (also the
      model's own "<s>", "</s>", "<pad>") becomes its id, the text between encoded piece by
      piece. Training on such shards needs a model vocabulary that holds those ids
      (model.vocab_size of at least V+4 or V+5); the manifest records the vocabulary size.

As in Megatron-LM, a text that encodes to no ids at all (the empty string, except under
Llama2Tokenizer's bos) gets no end-of-document id either: it is a document without tokens.

A Hugging Face tokenizer.json takes the default only: its documents are its ids then its eos id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece

from megatron_llm.data.tokenizer import Tokenizer, TokenizerError

DEFAULT_TYPE = "GPTSentencePieceTokenizer"
TYPES = (DEFAULT_TYPE, "Llama2Tokenizer", "SentencePieceTokenizer")


@dataclass
class DocumentTokenizer:
    """A Tokenizer plus the Megatron-LM tokenizer type whose documents it writes."""

    tokenizer: Tokenizer
    tokenizer_type: str = DEFAULT_TYPE
    bos: int | None = None  # put before every document
    eod: int = -1  # after every document that has ids
    vocab_size: int = 0  # ids the documents may hold (sets the shards' dtype)
    specials: dict[str, int] = field(default_factory=dict)  # text -> id, matched in the text

    @classmethod
    def load(cls, path: str | Path, tokenizer_type: str = DEFAULT_TYPE) -> DocumentTokenizer:
        tokenizer = Tokenizer(path)
        out = cls(tokenizer, tokenizer_type, None, tokenizer.eod, tokenizer.vocab_size)
        if tokenizer_type == DEFAULT_TYPE:
            return out
        if tokenizer_type not in TYPES:
            raise TokenizerError(
                f"--tokenizer-type {tokenizer_type}: unknown; expected one of {', '.join(TYPES)}"
            )
        if tokenizer.unique_identifiers["class"] != "sentencepiece":
            raise TokenizerError(
                f"{path}: --tokenizer-type {tokenizer_type} is a sentencepiece type and needs a "
                f"sentencepiece .model; a tokenizer.json takes the default ({DEFAULT_TYPE})"
            )
        sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer.path))
        if tokenizer_type == "Llama2Tokenizer":
            if sp.bos_id() < 0:
                raise TokenizerError(f"{path}: Llama2Tokenizer needs a model with a bos piece")
            out.bos = sp.bos_id()
        else:
            out.specials, out.vocab_size = _megatron_specials(sp)
            out.eod = out.specials["<EOD>"]
        return out

    # Pickle by path and type: worker processes load the model themselves.
    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (DocumentTokenizer.load, (str(self.tokenizer.path), self.tokenizer_type))

    @property
    def path(self) -> Path:
        return self.tokenizer.path

    @property
    def sha256(self) -> str:
        return self.tokenizer.sha256

    @property
    def split(self) -> str:
        return self.tokenizer.split

    def encode_documents(
        self, texts: list[str], dtype: type = np.int32
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each text's document (see the module doc), back to back, and each one's length."""
        special = {i: self._encode_with_specials(t) for i, t in enumerate(texts) if self._has(t)}
        plain = ["" if i in special else t for i, t in enumerate(texts)]
        tokens, lengths = self.tokenizer.encode_documents(plain, dtype)
        ends = np.cumsum(lengths)
        body = np.delete(tokens, ends - 1)  # the ids alone: drop the tokenizer's eos
        counts = lengths.astype(np.int64) - 1
        if special:
            starts = ends - lengths
            docs = [body[s - i : e - i - 1] for i, (s, e) in enumerate(zip(starts, ends))]
            for i, ids in special.items():
                docs[i], counts[i] = np.asarray(ids, dtype), len(ids)
            body = np.concatenate(docs)
        if self.bos is not None:
            body = np.insert(body, np.cumsum(counts) - counts, self.bos)
            counts += 1
        has_ids = counts > 0
        out = np.insert(body, np.cumsum(counts)[has_ids], self.eod).astype(dtype, copy=False)
        return out, (counts + has_ids).astype(np.int32)

    def _has(self, text: str) -> bool:
        return any(s in text for s in self.specials)

    def _encode_with_specials(self, text: str) -> list[int]:
        # Megatron-LM's _SentencePieceTokenizer.tokenize: the leftmost special token next (the
        # first in its order on a tie), the text before it encoded on its own.
        ids: list[int] = []
        start = 0
        while True:
            found = {s: text.find(s, start) for s in self.specials}
            found = {s: at for s, at in found.items() if at >= 0}
            if not found:
                break
            token = min(found, key=found.__getitem__)
            ids += self.tokenizer.encode(text[start : found[token]])
            ids.append(self.specials[token])
            start = found[token] + len(token)
        return ids + self.tokenizer.encode(text[start:])


def _megatron_specials(sp: sentencepiece.SentencePieceProcessor) -> tuple[dict[str, int], int]:
    """Megatron-LM's _SentencePieceTokenizer._initalize: its special tokens (in its order) and
    its vocabulary size."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    size = len(vocab)
    specials: dict[str, int] = {}
    names = ["<CLS>", "<SEP>", "<EOD>", "<MASK>"]
    ids = {"<PAD>": sp.pad_id(), "<BOS>": sp.bos_id(), "<EOS>": sp.eos_id()}
    for fallback, piece_id in ids.items():
        names.append(sp.id_to_piece(piece_id) if 0 <= piece_id < sp.get_piece_size() else fallback)
    for name in names:
        if name not in vocab:
            vocab[name] = size
            size += 1
        specials.setdefault(name, vocab[name])
    return specials, size
