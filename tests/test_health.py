"""Throughput figures and run health: FLOPs and MFU, metrics files, spikes, bad steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_llm.config import load_config
from megatron_llm.training.health import SpikeDetector, flops_per_token, peak_tflops_for
from tests.checkpoint_runs import overrides, train_runs
from tests.data_fixtures import Shard
from tests.distributed import run_on_ranks
from tests.test_checkpoint_ops import _run


def test_flops_per_token_by_hand() -> None:
    # GPT-2 style, L=2, h=32, 4 heads of 8, f=128 (GELU: 2 matrices), s=16, V=64:
    #   per layer 2*32*(32+2*32) + 2*32*32 + 2*2*32*128 + 4*16*32 = 26,624
    #   forward 2*26,624 + 2*32*64 = 57,344; training 3x = 172,032
    gpt2 = load_config(
        None,
        ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.seq_length=16"],
    ).model
    assert flops_per_token(gpt2, 64) == 172_032
    # Llama style with GQA: 2 kv heads of 8, f=96 (SwiGLU: 3 matrices):
    #   per layer 2*32*(32+2*16) + 2*32*32 + 2*3*32*96 + 4*16*32 = 26,624
    llama = load_config(
        None,
        [
            "model.style=llama",
            "model.num_layers=2",
            "model.hidden_size=32",
            "model.num_heads=4",
            "model.num_kv_heads=2",
            "model.ffn_hidden_size=96",
            "model.seq_length=16",
        ],
    ).model
    assert flops_per_token(llama, 64) == 3 * (2 * 26_624 + 2 * 32 * 64)


def test_peak_table_is_dense_bf16_and_unknown_devices_get_none() -> None:
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756
    assert peak_tflops_for("NVIDIA H200") == 989
    assert peak_tflops_for("Tesla V100-SXM2-32GB") is None


def test_spike_detector_flags_a_jump_and_keeps_it_out_of_the_window() -> None:
    spikes = SpikeDetector(window=50, z=6.0, min_history=20)
    normal = [5.0 + 0.01 * math.sin(i) for i in range(30)]
    assert all(spikes.update(x) is None for x in normal)
    assert spikes.update(6.0) > 6.0
    assert spikes.update(5.005) is None
    assert spikes.update(6.0) > 6.0  # the first spike did not widen the window


def test_metrics_jsonl_and_tensorboard_are_written(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    argv = overrides(str(tmp_path), email_shard.prefix, str(bpe_model), "train.steps=3")
    summary = run_on_ranks(1, train_runs, [argv])[0][0]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["loss"] == pytest.approx(summary["losses"][r["step"] - 1])
        assert r["tflops_per_device"] > 0 and r["samples_per_s"] > 0 and r["peak_memory_gb"] > 0
        assert "mfu" not in r  # a CPU is not in the peak table: TFLOP/s, but no MFU
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_consecutive_non_finite_steps_stop_the_run(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    code, out = _run(
        tmp_path,
        email_shard,
        bpe_model,
        "train.steps=50",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "optim.grad_clip=0",
        "train.max_bad_steps=2",
    )
    assert code == 1, out
    assert "2 steps in a row" in out and "non-finite" in out
    assert not (tmp_path / "checkpoints" / "latest").exists()  # fp32: weights not trustworthy
