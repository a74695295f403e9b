"""python -m megatron_llm.eval: perplexity of a checkpoint over token shards."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_llm.checkpoint.__main__ import write_weights_only
from megatron_llm.config import load_config
from megatron_llm.data.indexed import IndexedShard
from megatron_llm.eval import __main__ as eval_cli
from megatron_llm.model import GPT

SEQ = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, bpe_model):
    overrides = ["model.style=gpt2", "model.num_layers=1", "model.hidden_size=32"]
    overrides += ["model.num_heads=2", f"model.seq_length={SEQ}", f"data.tokenizer={bpe_model}"]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    model = GPT(cfg.model, 512)
    root = tmp_path_factory.mktemp("eval") / "ckpt"
    write_weights_only(root, dict(model.state_dict()), cfg.to_dict())
    return root, model.eval()


def hand_rolled_loss(model, prefixes, seq, limit):
    """Every document of every shard back to back; window i is tokens [i*seq, i*seq + seq]."""
    stream = np.concatenate(
        [IndexedShard(p)[d] for p in prefixes for d in range(len(IndexedShard(p)))]
    )
    losses = []
    for i in range(min(limit, (len(stream) - 1) // seq)):
        window = torch.from_numpy(stream[i * seq : i * seq + seq + 1].astype(np.int64))
        with torch.no_grad():
            logits = model(window[None, :-1])[0]
        losses.append(F.cross_entropy(logits, window[1:]).item())
    return sum(losses) / len(losses), len(losses)


def test_perplexity_is_exp_of_the_mean_loss(checkpoint, small_shard, email_shard, capsys):
    root, model = checkpoint
    prefixes = [small_shard.prefix, email_shard.prefix]
    assert 835 * SEQ < len(IndexedShard(small_shard.prefix).tokens) < 836 * SEQ + 1
    # The json shard holds 26,726 tokens: window 835 runs from its last documents into email's.
    argv = [str(root), "--data-prefix", *prefixes, "--batch-size", "64", "--max-samples", "840"]
    assert eval_cli.main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    expected, windows = hand_rolled_loss(model, prefixes, SEQ, 840)
    assert windows == result["samples"] == 840 and result["tokens"] == 840 * SEQ
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert result["step"] == 0
    # Shorter windows and the text summary.
    assert eval_cli.main([*argv[:-1], "10", "--seq-length", "8"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_eval_refuses_bad_input(checkpoint, small_shard, tmp_path, capsys):
    root, _ = checkpoint
    assert eval_cli.main([str(root), "--data-prefix", str(tmp_path / "nothing")]) == 2
    assert "no such file" in capsys.readouterr().err
    argv = [str(root), "--data-prefix", small_shard.prefix, "--seq-length", str(SEQ + 1)]
    assert eval_cli.main(argv) == 2
    assert "exceeds" in capsys.readouterr().err
