"""export-hf's tokenizer files against the real transformers AutoTokenizer and pipeline (issue 15).

For every tokenizer kind users bring (sentencepiece BPE as train_tokenizer.py writes it, a
Llama-style one with a dummy prefix, a stock one with nmt_nfkc normalization and whitespace
squeezing; byte-level BPE tokenizer.json files, GPT-2 and Llama-3 style), AutoTokenizer on the
exported folder must give our ids and our text on many strings.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import sentencepiece
import torch

from megatron_llm.checkpoint.__main__ import main as ckpt_cli
from megatron_llm.data.hf_export import write_tokenizer
from megatron_llm.data.tokenizer import Tokenizer, TokenizerError
from tests.data_fixtures import Corpus
from tests.test_data_inputs import train_hf

transformers = pytest.importorskip("transformers")

EDGE = [
    "def main(",
    "<s> and </s> as text, <unk>, <pad>, <|endoftext|> <|begin_of_text|>",
    "\ttabs\tand\nnewlines\n\n\r\n",
    "  two leading spaces",
    " one leading space",
    "trailing spaces   ",
    "a  b   c    d",
    "non-ASCII: café naïve 日本語 emoji 🎉 ﬁ ① Ａ \u00a0 \u3000 end",
    "",
    " ",
    "\n",
    "x" * 300,
    "spaces before punctuation: a , b . c ! d ? it 's , do n't , I 'm",
]


def _random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = "ab xy_( )<>/s\n\t  éü日🎉ﬁ①Ａ\u00a0\u30000123.,:"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _sentencepiece(folder: Path, corpus: Corpus, name: str, **options: Any) -> Path:
    text = folder / f"{name}.txt"
    folder.mkdir(parents=True, exist_ok=True)
    text.write_text("\n".join(corpus.docs) + "\ncafé naïve 日本語\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(folder / name), vocab_size=600, minloglevel=2, **options
    )
    return folder / f"{name}.model"


def _tokenizer_json(folder: Path, corpus: Corpus, llama3: bool) -> Path:
    """GPT-2 style (byte-level BPE, <|endoftext|>) or Llama-3 style (a BOS template added by
    the post-processor, eos named in tokenizer_config.json)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import processors

    specials = ["<|begin_of_text|>", "<|end_of_text|>"] if llama3 else ["<|endoftext|>"]
    path = train_hf(folder, corpus, specials)
    if llama3:
        tok = HF.from_file(str(path))
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
        tok.save(str(path))
        config = {"eos_token": "<|end_of_text|>", "bos_token": bos}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory, email_corpus: Corpus, bpe_model: Path):
    root = tmp_path_factory.mktemp("tokenizers")
    identity = dict(model_type="bpe", byte_fallback=True, normalization_rule_name="identity")
    return {
        "sp-ours": bpe_model,
        "sp-llama": _sentencepiece(
            root, email_corpus, "llama", **identity, remove_extra_whitespaces=False
        ),
        "sp-stock": _sentencepiece(root, email_corpus, "stock", model_type="bpe"),
        "json-gpt2": _tokenizer_json(root / "gpt2", email_corpus, llama3=False),
        "json-llama3": _tokenizer_json(root / "llama3", email_corpus, llama3=True),
    }


@pytest.mark.parametrize("kind", ["sp-ours", "sp-llama", "sp-stock", "json-gpt2", "json-llama3"])
def test_autotokenizer_encodes_and_decodes_as_ours(
    tmp_path: Path, tokenizers: dict[str, Path], email_corpus: Corpus, kind: str
) -> None:
    ours = Tokenizer(tokenizers[kind])
    ids = write_tokenizer(ours, tmp_path, max_length=1 << 20)
    assert ids["eos"] == ours.eod
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.eos_token_id == ours.eod
    specials = {i for i, t in theirs.added_tokens_decoder.items() if t.special}
    texts = EDGE + email_corpus.docs + _random_texts(0, 200)
    for text in texts:
        want = ours.encode(text)
        assert theirs(text)["input_ids"] == want, text[:80]
        assert theirs.encode(text) == want, text[:80]
        assert theirs.decode(want, skip_special_tokens=True) == ours.decode(want), text[:80]
        if not set(want) & specials:  # ours always drops special tokens
            assert theirs.decode(want) == ours.decode(want), text[:80]
        # A generated document ends with the eos token: dropped from the text by both.
        assert theirs.decode(want + [ours.eod], skip_special_tokens=True) == ours.decode(want)
    # Our own reader of the exported tokenizer.json (import-hf's default) gives the same ids.
    again = Tokenizer(tmp_path / "tokenizer.json")
    assert again.eod == ours.eod
    assert [again.encode(t) for t in EDGE] == [ours.encode(t) for t in EDGE]


def test_unigram_model_is_refused(
    tmp_path: Path, email_corpus: Corpus, capsys: pytest.CaptureFixture
) -> None:
    model = _sentencepiece(tmp_path, email_corpus, "unigram", model_type="unigram")
    with pytest.raises(TokenizerError, match="model_type is not bpe"):
        write_tokenizer(Tokenizer(model), tmp_path, max_length=64)


def _generate_json(ckpt: Path, prompts: list[str], n: int) -> list[dict[str, Any]]:
    import contextlib
    import io

    from megatron_llm.generate import main as generate

    argv = [str(ckpt), "--greedy", "--json", "--max-new-tokens", str(n)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert generate([*argv, *(a for p in prompts for a in ("--prompt", p))]) == 0
    return json.loads(out.getvalue())


@pytest.mark.parametrize("kind", ["sp-llama"])  # a dummy prefix: the harder case for text
def test_pipeline_continues_as_generate(
    tmp_path: Path, tokenizers: dict[str, Path], kind: str
) -> None:
    """A model imported from transformers (vocabulary = the tokenizer's, not a multiple of 128),
    exported again with our tokenizer: pipeline("text-generation") greedy = generate --greedy."""
    ours = Tokenizer(tokenizers[kind])
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=ours.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.5,  # confident logits: no near-ties for greedy decoding to split
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # tokens that are part of a character (bytes) score 0, never the max
        partial = [i for i in range(ours.vocab_size) if "\ufffd" in ours.decode([i])]
        model.lm_head.weight[partial] = 0.0
    model.save_pretrained(tmp_path / "hf")
    overrides = [f"data.tokenizer={tokenizers[kind]}", "model.seq_length=64"]
    assert ckpt_cli(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"), *overrides]) == 0
    ckpt = tmp_path / "ckpt" / "global_step0"
    assert ckpt_cli(["export-hf", str(ckpt), str(tmp_path / "out")]) == 0
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.eod  # transformers' generate stops where ours does
    prompts = ["def main(", " import os\n"]
    rows = _generate_json(ckpt, prompts, 16)
    assert sum(len(r["tokens"]) for r in rows) > 16, rows  # more than a token or two to compare
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "out"), device="cpu")
    for prompt, row in zip(prompts, rows):
        (result,) = pipe(prompt, max_new_tokens=16, do_sample=False, return_tensors=True)
        prompt_ids = ours.encode(prompt)
        assert result["generated_token_ids"] == prompt_ids + row["tokens"], prompt
        (text,) = pipe(prompt, max_new_tokens=16, do_sample=False, return_full_text=False)
        assert text["generated_text"] == row["completion"], prompt
    # Back again: import-hf takes the exported tokenizer.json when the config names none.
    assert ckpt_cli(["import-hf", str(tmp_path / "out"), str(tmp_path / "again")]) == 0
    config = (tmp_path / "again" / "global_step0" / "config.yaml").read_text()
    assert str((tmp_path / "out" / "tokenizer.json").resolve()) in config
    again = Tokenizer(tmp_path / "out" / "tokenizer.json")
    assert [again.encode(p) for p in prompts] == [ours.encode(p) for p in prompts]


def test_generate_completion_keeps_the_space_after_the_prompt(tokenizers: dict[str, Path]) -> None:
    """A dummy-prefix sentencepiece model strips the leading space of a decoded text: generate's
    completion of "def" must still read " main" (as the pipeline's), not "main"."""
    from megatron_llm.generate import completion_text

    ours = Tokenizer(tokenizers["sp-llama"])
    prompt, whole = ours.encode("def"), ours.encode("def main")
    assert whole[: len(prompt)] == prompt
    assert completion_text(ours, prompt, whole[len(prompt) :]) == " main"
