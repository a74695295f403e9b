"""Generation: the KV cache changes nothing but speed; sampling is seeded; the CLI works."""

import json

import pytest
import torch

from megatron_llm import generate as generate_cli
from megatron_llm.checkpoint.__main__ import write_weights_only
from megatron_llm.config import load_config
from megatron_llm.eval.generation import Sampling, generate
from megatron_llm.model import GPT, ModelConfig
from megatron_llm.model.gpt import KVCache

VOCAB = 64
STYLES = {"gpt2": {}, "llama": {"num_kv_heads": 2}}  # learned positions + tied; RoPE + GQA
PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 12, 4], [11], [6, 6, 2, 40, 9]]


def tiny(style: str) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(
        style=style, num_layers=2, hidden_size=32, num_heads=4, seq_length=24, **STYLES[style]
    )
    return GPT(cfg, VOCAB).eval()


@pytest.mark.parametrize("style", STYLES)
def test_cached_logits_equal_full_forward(style):
    model = tiny(style)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    cache = KVCache(len(model.blocks))
    # A prefill, single tokens, then a chunk of three after the cache.
    parts = [model(tokens[:, :5], cache=cache)]
    parts += [model(tokens[:, i : i + 1], cache=cache) for i in range(5, 9)]
    parts.append(model(tokens[:, 9:12], cache=cache))
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_greedy_with_cache_equals_without(style):
    model = tiny(style)
    kw = dict(max_new_tokens=12, eod=-1, sampling=Sampling(greedy=True))
    cached = generate(model, PROMPTS, **kw)
    uncached = generate(model, PROMPTS, use_cache=False, **kw)
    assert cached == uncached
    assert [len(ids) for ids in cached] == [12] * 4
    # Each prompt alone gives what it gave in the mixed-length batch.
    assert [generate(model, [p], **kw)[0] for p in PROMPTS] == cached


def test_completions_stop_at_eod_and_seq_length():
    model = tiny("llama")
    first = generate(model, [[3, 4]], max_new_tokens=30, eod=-1, sampling=Sampling(greedy=True))
    assert len(first[0]) == 24 - 2  # cut by seq_length, not by max_new_tokens
    eod = first[0][3]  # pretend the 4th generated token ends the document
    out = generate(model, [[3, 4]], max_new_tokens=30, eod=eod, sampling=Sampling(greedy=True))
    assert out[0] == first[0][: first[0].index(eod)]


def test_seeded_sampling_is_reproducible_and_top_k1_is_greedy():
    model = tiny("gpt2")
    kw = dict(max_new_tokens=10, eod=-1)
    hot = Sampling(temperature=1.5)
    a = generate(model, PROMPTS, sampling=hot, seed=3, **kw)
    assert a == generate(model, PROMPTS, sampling=hot, seed=3, **kw)
    assert a != generate(model, PROMPTS, sampling=hot, seed=4, **kw)
    greedy = generate(model, PROMPTS, sampling=Sampling(greedy=True), **kw)
    assert generate(model, PROMPTS, sampling=Sampling(top_k=1), seed=5, **kw) == greedy
    assert generate(model, PROMPTS, sampling=Sampling(top_p=1e-6), seed=5, **kw) == greedy
    # Padding rows of the embedding (beyond the tokenizer's vocabulary) are never sampled.
    small = generate(model, PROMPTS, sampling=hot, seed=3, vocab_size=8, **kw)
    assert max(sum(small, [])) < 8


def test_cli_generates_from_a_checkpoint(tmp_path, bpe_model, capsys):
    overrides = ["model.style=llama", "model.num_layers=1", "model.hidden_size=32"]
    overrides += ["model.num_heads=2", "model.seq_length=32", f"data.tokenizer={bpe_model}"]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    weights = dict(GPT(cfg.model, 512).state_dict())
    write_weights_only(tmp_path / "ckpt", weights, cfg.to_dict())
    argv = [str(tmp_path / "ckpt"), "--prompt", "def f(", "--prompt", "import os\n"]
    argv += ["--max-new-tokens", "8", "--greedy", "--json"]
    assert generate_cli.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in rows] == ["def f(", "import os\n"]
    assert all(0 < len(r["tokens"]) <= 8 for r in rows)
    assert generate_cli.main([*argv, "--no-kv-cache"]) == 0
    assert json.loads(capsys.readouterr().out) == rows
    assert generate_cli.main([*argv[:-1], "--top-p", "0"]) == 2
    assert "top_p=0.0" in capsys.readouterr().err
