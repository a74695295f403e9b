"""Checkpoints: bitwise resume, reshaping, atomic saves, pre-emption, drift, retention, CLI.

The runs are the real training loop on real shards over gloo ranks (tests/checkpoint_runs.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.checkpoint_runs import hf_round_trips, overrides, train_runs
from tests.data_fixtures import Shard
from tests.distributed import run_on_ranks


def _args(run_dir: Path, shard: Shard, bpe_model: Path, *extra: str) -> list[str]:
    return overrides(str(run_dir), shard.prefix, str(bpe_model), *extra)


def _straight_vs_resumed(
    tmp_path: Path, shard: Shard, bpe_model: Path, world: int, layouts: dict[str, list[str]]
) -> None:
    """Per layout: 6 steps straight == 3 steps, stop, resume, 3 steps: losses bitwise, the same
    batches. All layouts run on the same spawned ranks, one after the other."""
    common = ["train.steps=6", "train.grad_accum_steps=2", "model.dropout=0.1"]
    common.append("model.attention_dropout=0.1")
    runs = []
    for name, layout in layouts.items():
        args = [*layout, *common]
        runs += [
            _args(tmp_path / name / "straight", shard, bpe_model, *args),
            _args(tmp_path / name / "resumed", shard, bpe_model, *args, "train.exit_interval=3"),
            _args(tmp_path / name / "resumed", shard, bpe_model, *args),
        ]
    per_rank = run_on_ranks(world, train_runs, runs)
    for i, name in enumerate(layouts):
        straight, first, resumed = (
            [per_rank[r][3 * i + k] for r in range(world)] for k in range(3)
        )
        assert first[0]["stopped"] == "train.exit_interval=3 reached", name
        assert resumed[0]["first_step"] == 4, name
        assert straight[0]["losses"] == first[0]["losses"] + resumed[0]["losses"], name  # bitwise
        for rank in range(world):
            assert straight[rank]["batches"] == first[rank]["batches"] + resumed[rank]["batches"]
        # The metrics file of the resumed run holds every step once.
        metrics = tmp_path / name / "resumed/metrics.jsonl"
        assert [json.loads(line)["step"] for line in metrics.open()] == [1, 2, 3, 4, 5, 6], name


def test_resume_is_bitwise(tmp_path: Path, email_shard: Shard, bpe_model: Path) -> None:
    """dp=2 with ZeRO 0/1/3 in fp32 and ZeRO 0/1 in bf16; tp=2 with sequence parallelism; all
    with dropout and gradient accumulation."""
    layouts = {
        f"zero{zero}-{precision}": [
            "parallel.dp=2",
            f"parallel.zero_stage={zero}",
            f"train.precision={precision}",
            "train.micro_batch_size=2",
        ]
        for zero, precision in [(1, "fp32"), (0, "fp32"), (3, "fp32"), (1, "bf16"), (0, "bf16")]
    }
    layouts["tp2-sp"] = [
        "parallel.tp=2",
        "parallel.dp=1",
        "parallel.sequence_parallel=true",
        "train.micro_batch_size=4",
    ]
    _straight_vs_resumed(tmp_path, email_shard, bpe_model, 2, layouts)


def _reshape_runs(tmp: Path, shard: Shard, bpe_model: Path, save_at: str, load_at: str) -> list:
    """Save at one layout after 3 of 6 steps; continue at the same layout and at another."""
    common = ["train.steps=6"]
    saved = tmp / "saved/checkpoints/global_step3"
    return [
        _args(tmp / "saved", shard, bpe_model, *common, *LAYOUTS[save_at], "train.exit_interval=3"),
        *(
            _args(
                tmp / name,
                shard,
                bpe_model,
                *common,
                *LAYOUTS[name],
                f"checkpoint.resume={saved}",
                "checkpoint.save_at_end=false",
            )
            for name in (save_at, load_at)
        ),
    ]


LAYOUTS = {
    "tp2dp2": [
        "parallel.tp=2",
        "parallel.dp=2",
        "parallel.zero_stage=1",
        "train.micro_batch_size=2",
    ],
    "tp1dp4": [
        "parallel.tp=1",
        "parallel.dp=4",
        "parallel.zero_stage=1",
        "train.micro_batch_size=1",
    ],
    "tp4dp1": [
        "parallel.tp=4",
        "parallel.dp=1",
        "parallel.zero_stage=0",
        "train.micro_batch_size=4",
    ],
}


def test_reshape_continues_with_the_same_losses(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    """tp2 dp2 -> tp1 dp4, and tp1 dp4 -> tp4 dp1 (ZeRO 1 -> 0), optimizer state included."""
    runs = _reshape_runs(tmp_path / "a", email_shard, bpe_model, "tp2dp2", "tp1dp4")
    runs += _reshape_runs(tmp_path / "b", email_shard, bpe_model, "tp1dp4", "tp4dp1")
    results = run_on_ranks(4, train_runs, runs)[0]  # rank 0's summaries
    for same, other in ((results[1], results[2]), (results[4], results[5])):
        assert same["first_step"] == other["first_step"] == 4
        assert other["losses"] == pytest.approx(same["losses"], rel=1e-5)


def test_hugging_face_round_trip(tmp_path: Path, email_shard: Shard, bpe_model: Path) -> None:
    """Export each style to transformers: same logits; import back: the same weights."""
    styles = {
        "gpt2": ["model.style=gpt2"],
        "llama": ["model.style=llama", "model.num_kv_heads=2", "model.tie_embeddings=false"],
    }
    runs = [
        (_args(tmp_path / s, email_shard, bpe_model, *o, "train.steps=2"), str(tmp_path / s))
        for s, o in styles.items()
    ]
    gpt2, llama = run_on_ranks(1, hf_round_trips, runs)[0]
    assert (gpt2["class"], llama["class"]) == ("GPT2LMHeadModel", "LlamaForCausalLM")
    for result in (gpt2, llama):
        assert result["max_logit_diff"] < 1e-5
        assert result["weights_identical"]
        # Training from the import starts at step 1 from the trained weights, not a fresh init.
        assert result["first_step_from_import"] == 1
        assert result["first_loss_from_import"] < result["first_loss_trained"]
