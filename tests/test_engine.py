"""The DeepSpeed engine on real gloo ranks: data parallelism gives the single-process losses."""

import pytest
import torch

from megatron_llm.config import load_config
from tests.distributed import run_on_ranks

TINY = [
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_heads=2",
    "model.seq_length=16",
    "optim.warmup_steps=2",
    "optim.lr=1e-2",
    "train.steps=6",
]
GLOBAL_BATCH = 4


def synthetic_losses(overrides: list[str], with_norms: bool = False) -> list:
    """Train on a fixed token stream; each rank reads its own slice of every global batch."""
    from megatron_llm.config import load_config
    from megatron_llm.parallel.build import build_model
    from megatron_llm.parallel.engine import build_engine
    from megatron_llm.parallel.groups import build_context, mean_over_dp
    from megatron_llm.training.loop import train_step
    from megatron_llm.training.run import seed_everything

    cfg = load_config(None, TINY + overrides)
    ctx = build_context(cfg.parallel)
    seed_everything(cfg.train.seed)
    engine = build_engine(build_model(cfg, ctx, 64).module, cfg, ctx)
    # Two global batches, alternating: learnable (memorised) in a few steps, yet each step
    # still differs from the last.
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 64, (2, GLOBAL_BATCH, 17), generator=gen)
    micro = cfg.train.micro_batch_size
    losses, norms = [], []
    for step in range(cfg.train.steps):
        mine = data[step % 2].view(cfg.train.grad_accum_steps, ctx.dp, micro, 17)[:, ctx.dp_rank]
        loss, norm = train_step(engine, iter(mine), cfg.train.grad_accum_steps)
        losses.append(mean_over_dp(loss, ctx))
        norms.append(norm)
    return (losses, norms) if with_norms else losses


@pytest.fixture(scope="module")
def reference() -> list[float]:
    return run_on_ranks(1, synthetic_losses, ["train.micro_batch_size=4"])[0]


def test_loss_falls_on_one_rank(reference):
    assert reference[-1] < reference[0] - 0.2


def test_gradient_accumulation_matches_one_big_batch(reference):
    losses = run_on_ranks(
        1, synthetic_losses, ["train.micro_batch_size=2", "train.grad_accum_steps=2"]
    )[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=0)


def test_data_parallel_matches_single_process(reference):
    # ZeRO 0 here; ZeRO 1, 2 and 3 (dp=2, dp=4, composed with tp) over 20 steps, gradients
    # included, are in tests/test_parallel.py.
    per_rank = run_on_ranks(
        2, synthetic_losses, ["train.micro_batch_size=2", "parallel.dp=2", "parallel.zero_stage=0"]
    )
    assert per_rank[0] == per_rank[1]  # every rank logs the dp-averaged loss
    torch.testing.assert_close(
        torch.tensor(per_rank[0]), torch.tensor(reference), rtol=1e-5, atol=0
    )


def test_grad_norm_is_reported_the_same_with_and_without_zero():
    # ZeRO 0 norms are measured by us; ZeRO 1 norms come from DeepSpeed.
    _, ours = run_on_ranks(1, synthetic_losses, ["train.micro_batch_size=4"], True)[0]
    _, deepspeeds = run_on_ranks(
        1, synthetic_losses, ["train.micro_batch_size=4", "parallel.zero_stage=1"], True
    )[0]
    assert all(n is not None and n > 0 for n in ours + deepspeeds)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(deepspeeds), rtol=1e-4, atol=0)


def test_bf16_trains():
    losses = run_on_ranks(
        1, synthetic_losses, ["train.micro_batch_size=4", "train.precision=bf16"]
    )[0]
    assert losses[-1] < losses[0]


def test_config_is_strict_before_any_rank_starts():
    with pytest.raises(ValueError):
        load_config(None, TINY + ["parallel.zero_stage=5"])
