"""Context parallelism (parallel/context.py): the load-balanced split, ring attention against one
whole attention, and real training runs at cp=2, cp=4, cp=2 x tp=2 (+sp), cp=2 x dp=2 and
cp=2 x pp=2 (and an MoE at cp=2 x dp=2 x ep=2) against one process; bitwise resume at cp=2 and a
cp=2 checkpoint continued at cp=1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_llm.parallel.context import ContextParallel, blocks
from tests.checkpoint_runs import overrides
from tests.context_runs import cp_runs, ring_cases
from tests.data_fixtures import Shard
from tests.distributed import run_on_ranks


def _ring(rank: int, size: int) -> ContextParallel:
    return ContextParallel(
        group=None, rank=rank, size=size, next_rank=0, prev_rank=0, device=torch.device("cpu")
    )


@pytest.mark.parametrize("size", [2, 4])
def test_split_is_megatrons_load_balanced_split(size: int) -> None:
    """Rank r holds chunks r and 2cp-1-r of 2cp (Megatron-Core's order), positions included,
    and every rank computes as many blocks at every ring step (the point of the order)."""
    seq = 4 * size
    tokens = torch.arange(seq).view(1, seq)
    c = seq // (2 * size)
    seen = []
    for r in range(size):
        ring = _ring(r, size)
        expected = [*range(r * c, (r + 1) * c), *range((2 * size - 1 - r) * c, (2 * size - r) * c)]
        assert ring.split(tokens).view(-1).tolist() == expected
        assert ring.positions(2 * c).tolist() == expected
        seen += expected
        work = [len(blocks(ring, step)) for step in range(size)]
        assert work == [3] + [2] * (size - 1), work  # diagonal pair + the later chunk's full one
    assert sorted(seen) == list(range(seq))


def test_ring_attention_matches_one_attention() -> None:
    """Forward and the q, k, v gradients, grouped-query heads, rings of 2 and of 4, within 1e-5
    of SDPA in fp64 (the blocks compute in fp32); in bf16 the ring's fp32 merges add no error
    beyond one whole block_attention's own bf16 rounding."""
    per_rank = run_on_ranks(4, ring_cases)
    for rank, cases in enumerate(per_rank):
        for name in ("cp4", "cp2", "cp2-all_to_all"):
            case = cases[name]
            assert case["out"] < 1e-5 and max(case["grads"]) < 1e-5, (rank, name, case)
        loss = cases["loss"]  # ignored labels spread unevenly over the ranks
        mean = sum(c["loss"]["loss"] for c in per_rank) / len(per_rank)
        assert abs(mean - loss["ref"]) < 1e-6 and loss["grad"] < 1e-6, loss
        low = cases["cp2-bf16"]
        assert low["dtype"] == "torch.bfloat16"
        # bf16 output rounding is up to ~4e-3 at these magnitudes; merges kept in bf16 add more.
        assert low["out"] <= 1.5 * low["one_block"] + 1e-3, (rank, low)


# ---- training runs: the real loop on real shards -------------------------------------------

STEPS = 6
LLAMA = ["model.style=llama", "model.num_kv_heads=2"]  # RoPE, GQA, untied head
GPT2 = ["model.style=gpt2"]  # learned positions, tied head
DOCS = ["data.reset_attention_mask=true", "data.reset_position_ids=true"]
A2A = ["parallel.cp_attention=all_to_all"]
# Dropless routing decides per token and no aux loss (it would cover each rank's chunk), so an
# MoE at cp=2 x dp=2 x ep=2 must train as one process does.
MOE = [
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.aux_loss_coeff=0",
    "model.moe.z_loss_coeff=0",
]
COMMON = [
    f"train.steps={STEPS}",
    "eval.at_end=true",
    "eval.iters=2",
    "train.global_batch_size=4",
    "checkpoint.save_at_end=false",
]


def _layout(
    cp: int = 1, tp: int = 1, dp: int = 1, pp: int = 1, sp: bool = False, zero: int = 0
) -> list[str]:
    return [
        f"parallel.cp={cp}",
        f"parallel.tp={tp}",
        f"parallel.dp={dp}",
        f"parallel.pp={pp}",
        f"parallel.sequence_parallel={str(sp).lower()}",
        f"train.micro_batch_size={4 // dp}",
        f"parallel.zero_stage={max(zero, int(pp > 1))}",  # pipelines run with ZeRO 1
    ]


def _docs(style: list[str], **layout: Any) -> tuple[str, list[str]]:
    """A packed-documents run (tests/parallel_runs.py's data, EOD every ~5 tokens)."""
    return ("packed", [*style, *DOCS, "train.steps=4", *_layout(**layout)])


def test_context_parallel_trains_as_one_process(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    def loop(name: str, *extra: str) -> tuple[str, list[str]]:
        run_dir = str(tmp_path / name)
        return ("loop", overrides(run_dir, email_shard.prefix, str(bpe_model), *COMMON, *extra))

    saved = tmp_path / "cp2-llama/checkpoints/global_step3"
    save = ["checkpoint.save_interval=3"]  # checkpoints written at these layouts too
    resume = ["model.dropout=0.1", "train.steps=4"]
    world2 = {
        "cp2-llama": loop("cp2-llama", *LLAMA, *_layout(cp=2), *save),
        "cp2-gpt2": loop("cp2-gpt2", *GPT2, *_layout(cp=2)),
        # The ring runs again in backward's recompute, in the same order on every rank.
        "cp2-llama-ckpt": loop(
            "cp2-llama-ckpt", *LLAMA, *_layout(cp=2), "train.activation_checkpointing=1"
        ),
        "straight": loop("straight", *LLAMA, *_layout(cp=2), *resume),
        "stopped": loop("resumed", *LLAMA, *_layout(cp=2), *resume, "train.exit_interval=2"),
        "resumed": loop("resumed", *LLAMA, *_layout(cp=2), *resume),
        "docs-cp2-llama": _docs(LLAMA, cp=2),
        # DeepSpeed-Ulysses: heads all-to-all instead of the ring (document ids all-gathered).
        "cp2-a2a-llama": loop("cp2-a2a-llama", *LLAMA, *_layout(cp=2), *A2A),
        "docs-cp2-a2a-llama": ("packed", [*_docs(LLAMA, cp=2)[1], *A2A]),
    }
    world1 = {
        "llama": loop("llama", *LLAMA, *_layout()),
        "gpt2": loop("gpt2", *GPT2, *_layout()),
        # The cp=2 run's checkpoint after step 3, continued at cp=1 (layout-free checkpoints).
        "reshaped": loop("reshaped", *LLAMA, *_layout(), f"checkpoint.resume={saved}"),
        "docs-llama": _docs(LLAMA),
        "docs-gpt2": _docs(GPT2),
        "no-docs-llama": ("packed", [*LLAMA, "train.steps=4", *_layout()]),
        "moe-llama": loop("moe-llama", *LLAMA, *MOE, *_layout()),
    }
    world4 = {
        "cp4-llama": loop("cp4-llama", *LLAMA, *_layout(cp=4)),
        "cp2-tp2-sp-llama": loop("cp2-tp2-sp-llama", *LLAMA, *_layout(cp=2, tp=2, sp=True)),
        # ZeRO 1 partitions the optimizer over DeepSpeed's data-parallel group: dp x cp ranks.
        "cp2-dp2-gpt2": loop("cp2-dp2-gpt2", *GPT2, *_layout(cp=2, dp=2, zero=1), *save),
        "cp2-pp2-gpt2": loop("cp2-pp2-gpt2", *GPT2, *_layout(cp=2, pp=2), *save),
        "docs-cp4-llama": _docs(LLAMA, cp=4),
        "docs-cp2-pp2-gpt2": _docs(GPT2, cp=2, pp=2),
        "docs-cp2-tp2-sp-llama": _docs(LLAMA, cp=2, tp=2, sp=True),
        "docs-cp2-dp2-gpt2": _docs(GPT2, cp=2, dp=2, zero=1),
        # experts split over the dp ranks, their gradients reduced over the ranks holding them
        # (dp / ep x cp), tokens dispatched within each cp rank's ep group
        "cp2-ep2-moe-llama": loop(
            "cp2-ep2-moe-llama", *LLAMA, *MOE, *_layout(cp=2, dp=2, zero=1), "parallel.ep=2"
        ),
    }
    results = {}
    for world, runs in ((2, world2), (1, world1), (4, world4)):
        per_rank = run_on_ranks(world, cp_runs, list(runs.values()), timeout=600)
        results.update(zip(runs, per_rank[0], strict=True))
    print({name: round(r["wall"], 1) for name, r in results.items()})

    # Bitwise resume at cp=2 (with residual dropout): the same losses, the same batches.
    straight, stopped, resumed = (results[k] for k in ("straight", "stopped", "resumed"))
    assert stopped["stopped"] == "train.exit_interval=2 reached"
    assert resumed["first_step"] == 3
    assert straight["losses"] == stopped["losses"] + resumed["losses"]
    assert straight["batches"] == stopped["batches"] + resumed["batches"]

    # Every layout's per-step losses, grad norms and validation loss equal one process's.
    for name, ref in {
        "cp2-llama": "llama",
        "cp2-gpt2": "gpt2",
        "cp2-llama-ckpt": "llama",
        "cp2-a2a-llama": "llama",
        "cp4-llama": "llama",
        "cp2-tp2-sp-llama": "llama",
        "cp2-dp2-gpt2": "gpt2",
        "cp2-pp2-gpt2": "gpt2",
        "cp2-ep2-moe-llama": "moe-llama",
    }.items():
        got, want = results[name], results[ref]
        assert len(got["losses"]) == STEPS, name
        _close(got["losses"], want["losses"], name)
        _close(_norms(tmp_path / name), _norms(tmp_path / ref), name)
        _close([got["val_loss"]], [want["val_loss"]], name)

    # With packed documents (masking and positions per document) too; the masking matters.
    for name, ref in {
        "docs-cp2-llama": "docs-llama",
        "docs-cp2-a2a-llama": "docs-llama",
        "docs-cp4-llama": "docs-llama",
        "docs-cp2-pp2-gpt2": "docs-gpt2",
        "docs-cp2-tp2-sp-llama": "docs-llama",
        "docs-cp2-dp2-gpt2": "docs-gpt2",
    }.items():
        _close(results[name]["losses"], results[ref]["losses"], name)
        _close(results[name]["norms"], results[ref]["norms"], name)
    assert abs(results["docs-llama"]["losses"][0] - results["no-docs-llama"]["losses"][0]) > 1e-3

    # The cp=2 checkpoint continued at cp=1 follows the cp=1 run from step 4 on.
    reshaped = results["reshaped"]
    assert reshaped["first_step"] == 4
    _close(reshaped["losses"], results["llama"]["losses"][3:], "reshaped")


def _norms(run_dir: Path) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run_dir / "metrics.jsonl").open()]


def _close(got: list[float], want: list[float], name: str) -> None:
    assert len(got) == len(want), name
    gaps = [abs(a - b) for a, b in zip(got, want, strict=True)]
    assert max(gaps) < 1e-5, (name, got, want)


def test_refusals() -> None:
    """Attention dropout and sequences that do not cut into 2*cp (x tp under sp) chunks."""
    from megatron_llm.config import load_config
    from megatron_llm.parallel.context import check_context
    from megatron_llm.parallel.groups import ParallelContext

    def ctx(cp: int, tp: int = 1) -> ParallelContext:
        return ParallelContext(
            rank=0,
            world_size=cp * tp,
            tp=tp,
            pp=1,
            dp=1,
            tp_group=None,
            dp_group=None,
            pp_group=None,
            cp=cp,
        )

    cfg = load_config(None, ["model.attention_dropout=0.1", "parallel.cp=2"])
    with pytest.raises(ValueError, match="model.attention_dropout=0.1 with parallel.cp=2"):
        check_context(cfg, ctx(2))
    cfg = load_config(None, ["model.seq_length=12", "parallel.cp=2"])
    check_context(cfg, ctx(2))  # 4 chunks of 3
    with pytest.raises(ValueError, match="model.seq_length=12 does not split over parallel.cp=4"):
        check_context(load_config(None, ["model.seq_length=12", "parallel.cp=4"]), ctx(4))
    sp = [
        "model.seq_length=12",
        "parallel.cp=2",
        "parallel.tp=2",
        "parallel.sequence_parallel=true",
    ]
    with pytest.raises(ValueError, match="a multiple of 8"):
        check_context(load_config(None, sp), ctx(2, tp=2))
    heads = ["model.num_heads=4", "model.num_kv_heads=2", "parallel.cp=2", *A2A]
    check_context(load_config(None, heads), ctx(2))  # 2 and 1 heads per cp rank
    with pytest.raises(ValueError, match="2 query and 1 key/value heads must divide by cp"):
        check_context(load_config(None, [*heads, "parallel.tp=2"]), ctx(2, tp=2))
