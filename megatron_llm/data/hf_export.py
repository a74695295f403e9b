"""Our tokenizer as a transformers tokenizer folder, encoding and decoding exactly as ours.

``write_tokenizer(tokenizer, folder)`` writes ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json`` so that ``transformers.AutoTokenizer.from_pretrained(folder)``
gives our ids for any text, with no BOS or EOS added (documents were trained that way), and
decodes them to our text. Tested against the real AutoTokenizer on many strings.

- A ``tokenizer.json`` tokenizer is written back without its post-processor (ours encodes with
  ``add_special_tokens=False``); special tokens in text are matched as ours matches them.
- A sentencepiece BPE model is rebuilt as a ``tokenizers`` BPE: the same vocabulary and ids,
  one merge per way of splitting each piece into two pieces, ranked by the piece's score
  (sentencepiece merges the adjacent pair whose union has the highest score, so these ranks
  pick the same pair), byte fallback, and sentencepiece's normalization spelled out:
  the precompiled rules (nmt_nfkc etc.), extra spaces removed, the dummy prefix "▁", spaces as
  "▁". Its control pieces (``<s>``, ``</s>``) are special tokens that text never produces, as in
  sentencepiece (``split_special_tokens``). Unigram models, user-defined pieces together with
  normalization, and ``treat_whitespace_as_suffix`` are refused (TokenizerError naming them).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from megatron_llm.data.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    _fields,
    _submessage,
    _varint,
)

# sentencepiece_model.proto field numbers and enums.
_MODEL_PIECES, _MODEL_TRAINER, _MODEL_NORMALIZER = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_TRAINER_MODEL_TYPE, _TRAINER_WS_SUFFIX, _TRAINER_BYTE_FALLBACK = 3, 24, 35
_NORM_CHARSMAP, _NORM_DUMMY_PREFIX, _NORM_EXTRA_WS, _NORM_ESCAPE_WS = 2, 3, 4, 5
_BPE = 2
SPACE = "\u2581"  # sentencepiece's visible space
UNK_SURFACE = " \u2047 "  # how sentencepiece decodes its unknown piece


def write_tokenizer(tokenizer: Tokenizer, folder: Path, max_length: int) -> dict[str, int | None]:
    """Write the tokenizer files into ``folder``; returns the bos/eos/pad ids for the model's
    generation config (eos is our end-of-document id)."""
    impl = tokenizer._impl
    if isinstance(impl, SentencePieceTokenizer):
        backend, config = _from_sentencepiece(tokenizer.path.read_bytes(), tokenizer.path)
    else:
        backend, config = _from_tokenizer_json(tokenizer)
    config |= {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,  # " ," stays " ,": ours never rewrites text
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_length,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    backend.save(str(folder / "tokenizer.json"))
    specials = {k: v for k, v in config.items() if k.endswith("_token") and v}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    ids = {k[: -len("_token")]: backend.token_to_id(v) for k, v in specials.items()}
    return {"bos": ids.get("bos"), "eos": tokenizer.eod, "pad": ids.get("pad")}


def _from_tokenizer_json(tokenizer: Tokenizer) -> tuple[Any, dict[str, Any]]:
    import tokenizers

    backend = tokenizers.Tokenizer.from_str(tokenizer._impl._tok.to_str())
    backend.post_processor = None  # ours adds no BOS/EOS around a text
    backend.no_padding()
    backend.no_truncation()
    config: dict[str, Any] = {"eos_token": backend.id_to_token(tokenizer.eod)}
    if tokenizer.pad >= 0:
        config["pad_token"] = backend.id_to_token(tokenizer.pad)
    # Ours matches special tokens written in the text (tokenizers' default): so does theirs.
    config["split_special_tokens"] = False
    return backend, config


def _pieces(model: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every piece, in id order."""
    out = []
    pos = 0
    while pos < len(model):
        key, pos = _varint(model, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(model, pos)
            continue
        if wire in (1, 5):
            pos += 8 if wire == 1 else 4
            continue
        length, pos = _varint(model, pos)
        body, pos = model[pos : pos + length], pos + length
        if number == _MODEL_PIECES:
            out.append(_piece(body))
    return out


def _piece(body: bytes) -> tuple[str, float, int]:
    text, score, kind = "", 0.0, NORMAL
    pos = 0
    while pos < len(body):
        key, pos = _varint(body, pos)
        number, wire = key >> 3, key & 7
        if wire == 5:
            if number == _PIECE_SCORE:
                (score,) = struct.unpack("<f", body[pos : pos + 4])
            pos += 4
        elif wire == 0:
            value, pos = _varint(body, pos)
            if number == _PIECE_TYPE:
                kind = value
        elif wire == 2:
            length, pos = _varint(body, pos)
            if number == _PIECE_TEXT:
                text = body[pos : pos + length].decode("utf-8")
            pos += length
        else:
            pos += 8
    return text, score, kind


def _from_sentencepiece(model: bytes, path: Path) -> tuple[Any, dict[str, Any]]:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    trainer = _fields(_submessage(model, _MODEL_TRAINER))
    norm = _fields(_submessage(model, _MODEL_NORMALIZER))
    charsmap = norm.get(_NORM_CHARSMAP, b"")
    dummy = bool(norm.get(_NORM_DUMMY_PREFIX, 1))
    squeeze = bool(norm.get(_NORM_EXTRA_WS, 1))
    pieces = _pieces(model)
    kinds = {kind for _, _, kind in pieces}

    def refuse(why: str) -> TokenizerError:
        return TokenizerError(
            f"{path}: cannot be written as a Hugging Face tokenizer.json: {why}; export the "
            "model without it, or train the tokenizer with data_tools/train_tokenizer.py"
        )

    if trainer.get(_TRAINER_MODEL_TYPE, 1) != _BPE:
        raise refuse("only sentencepiece BPE models convert exactly (model_type is not bpe)")
    if trainer.get(_TRAINER_WS_SUFFIX, 0):
        raise refuse("treat_whitespace_as_suffix=true")
    if not norm.get(_NORM_ESCAPE_WS, 1):
        raise refuse("escape_whitespaces=false")
    if UNUSED in kinds:
        raise refuse("the model has unused pieces")
    if USER_DEFINED in kinds and (charsmap or dummy or squeeze):
        raise refuse(
            "user-defined pieces together with normalization, a dummy prefix or whitespace "
            "removal (transformers normalizes around them differently)"
        )
    vocab = {text: i for i, (text, _, _) in enumerate(pieces)}
    mergeable = {text for text, _, kind in pieces if kind == NORMAL}
    ranked = []
    for i, (text, score, kind) in enumerate(pieces):
        if kind != NORMAL:
            continue
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, i, cut, left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = next((text for text, _, kind in pieces if kind == UNKNOWN), None)
    backend = Tokenizer(
        models.BPE(
            vocab,
            merges,
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=bool(trainer.get(_TRAINER_BYTE_FALLBACK, 0)),
        )
    )
    steps = []
    if charsmap:
        steps.append(normalizers.Precompiled(charsmap))
    if squeeze:  # sentencepiece's remove_extra_whitespaces: spaces only, not tabs or newlines
        steps += [
            normalizers.Replace(Regex("^ +| +$"), ""),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if dummy:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if unk is not None:  # a plain vocabulary entry (not special), decoded as sentencepiece does
        decode.insert(0, decoders.Replace(unk, UNK_SURFACE))
    if dummy:
        decode.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode)
    backend.add_special_tokens(
        [AddedToken(text, special=True, normalized=False) for text, _, k in pieces if k == CONTROL]
    )
    backend.add_tokens(
        [
            AddedToken(text, special=False, normalized=False)
            for text, _, k in pieces
            if k == USER_DEFINED
        ]
    )
    config: dict[str, Any] = {"split_special_tokens": True}  # "<s>" in text is text, as in sp
    sp = SentencePieceTokenizer(path)
    for name, token_id in (("bos", sp._sp.bos_id()), ("eos", sp.eod), ("pad", sp.pad)):
        if token_id >= 0:
            config[f"{name}_token"] = pieces[token_id][0]
    return backend, config
