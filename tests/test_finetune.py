"""Fine-tuning: prompt/response data with the prompt masked, starting from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_llm.config import load_config
from megatron_llm.data.batch import IGNORE, inputs_and_labels
from megatron_llm.data.sft import PromptResponseDataset
from megatron_llm.data.tokenizer import Tokenizer
from megatron_llm.model import GPT, ModelConfig
from tests.checkpoint_runs import finetune_from, overrides
from tests.data_fixtures import Shard
from tests.distributed import run_on_ranks

RECORDS = [
    {"prompt": "def add(a, b):", "response": "\n    return a + b"},
    {"prompt": "import", "response": " os"},
    {"prompt": "class Foo:", "response": "\n    pass"},
    {"prompt": "# a comment", "response": "\nx = 1"},
]


def _tiny() -> ModelConfig:
    argv = ["model.num_layers=1", "model.hidden_size=32", "model.num_heads=4"]
    return load_config(None, [*argv, "model.seq_length=32"]).model


def _jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_prompt_tokens_are_masked_and_response_tokens_are_targets(
    tmp_path: Path, bpe_model: Path
) -> None:
    tok = Tokenizer(str(bpe_model))
    path = _jsonl(tmp_path / "sft.jsonl")
    masked = PromptResponseDataset(str(path), tok, 32, mask_prompt=True)
    unmasked = PromptResponseDataset(str(path), tok, 32, mask_prompt=False)
    for i, record in enumerate(RECORDS):
        prompt = tok.encode(record["prompt"])
        response = tok.encode(record["response"]) + [tok.eod]
        inputs, labels = inputs_and_labels(masked[i].unsqueeze(0))
        n = len(prompt) + len(response)
        assert inputs[0, : n - 1].tolist() == (prompt + response)[:-1]
        # labels[j] is token j + 1: the prompt's tokens and the padding are never targets.
        assert labels[0, : len(prompt) - 1].tolist() == [IGNORE] * (len(prompt) - 1)
        assert labels[0, len(prompt) - 1 : n - 1].tolist() == response
        assert (labels[0, n - 1 :] == IGNORE).all()
        _, all_labels = inputs_and_labels(unmasked[i].unsqueeze(0))
        assert all_labels[0, : n - 1].tolist() == (prompt + response)[1:]
    # The model's loss skips masked labels: the mean over the response tokens only.
    torch.manual_seed(0)
    cfg_model = (
        __import__("megatron_llm.config", fromlist=["load_config"])
        .load_config(
            None,
            [
                "model.num_layers=1",
                "model.hidden_size=32",
                "model.num_heads=4",
                "model.seq_length=32",
            ],
        )
        .model
    )
    model = GPT(cfg_model, 512)
    batch = torch.stack([masked[i] for i in range(len(RECORDS))])
    inputs, labels = inputs_and_labels(batch)
    logits = model(inputs)
    keep = labels != IGNORE
    by_hand = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(model(inputs, labels), by_hand)


def test_bad_record_names_the_line(tmp_path: Path, bpe_model: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object"):
        PromptResponseDataset(str(path), Tokenizer(str(bpe_model)), 32, mask_prompt=True)


def test_finetuning_starts_from_the_checkpoint_weights(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    pretrain = overrides(str(tmp_path / "pre"), email_shard.prefix, str(bpe_model), "train.steps=3")
    finetune = overrides(
        str(tmp_path / "ft"),
        email_shard.prefix,
        str(bpe_model),
        "train.steps=2",
        f"data.prompt_response_jsonl={_jsonl(tmp_path / 'sft.jsonl')}",
        "data.split=100,0,0",
        f"checkpoint.init_from={tmp_path / 'pre/checkpoints'}",
        "optim.lr=1e-3",
    )
    result = run_on_ranks(1, finetune_from, pretrain, finetune)[0]
    tuned = result["tuned"]
    assert tuned["first_step"] == 1  # a new run: fresh optimizer, schedule and data position
    assert tuned["losses"][0] == pytest.approx(result["checkpoint_loss_on_first_batch"], rel=1e-5)


def _masked_loss_at_tp2() -> tuple[float, float]:
    from megatron_llm.parallel.groups import build_context
    from megatron_llm.parallel.shard import shard_model

    cfg = load_config(
        None,
        [
            "model.num_layers=1",
            "model.hidden_size=32",
            "model.num_heads=4",
            "model.seq_length=32",
            "parallel.tp=2",
        ],
    )
    tokens = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(0))
    tokens[:, :10] = -tokens[:, :10] - 1  # the first ten positions: masked labels
    torch.manual_seed(0)
    whole = GPT(cfg.model, 64)
    expected = whole(*inputs_and_labels(tokens)).item()
    torch.manual_seed(0)
    split = shard_model(
        GPT(cfg.model, 64), build_context(cfg.parallel), sequence_parallel=False, seed=0
    )
    return split(*inputs_and_labels(tokens)).item(), expected


def test_masked_loss_is_the_same_under_tensor_parallelism() -> None:
    for got, expected in run_on_ranks(2, _masked_loss_at_tp2):
        assert got == pytest.approx(expected, rel=1e-6)
