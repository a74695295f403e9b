"""Learning-rate schedule and run determinism."""

import math

import pytest
import torch

from megatron_llm.training.config import OptimConfig
from megatron_llm.training.schedule import build_scheduler, lr_at
from tests.distributed import run_on_ranks


def test_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4, schedule="cosine")
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 14) == pytest.approx(1.0)  # decay starts at the peak
    assert lr_at(9, cfg, 14) == pytest.approx(0.55)  # half-way: mean of lr and min_lr
    assert lr_at(14, cfg, 14) == pytest.approx(0.1)
    assert lr_at(100, cfg, 14) == pytest.approx(0.1)  # stays at min_lr past the end
    lrs = [lr_at(s, cfg, 14) for s in range(4, 15)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_linear_constant_and_explicit_decay_steps():
    linear = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear", decay_steps=10)
    assert [lr_at(s, linear, 1000) for s in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    constant = OptimConfig(lr=0.5, min_lr=0.0, warmup_steps=2, schedule="constant")
    assert [lr_at(s, constant, 10) for s in range(4)] == [0.25, 0.5, 0.5, 0.5]


def test_scheduler_drives_the_optimizer():
    cfg = OptimConfig(lr=2.0, min_lr=0.2, warmup_steps=2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, 10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, cfg, 10) for s in range(10)])
    assert seen[0] == pytest.approx(1.0) and seen[-1] < seen[2]
    assert math.isclose(seen[2], 2.0)


def test_same_seed_same_losses_other_seed_other_losses():
    from tests.test_engine import synthetic_losses

    a = run_on_ranks(1, synthetic_losses, ["train.micro_batch_size=4"])[0]
    b = run_on_ranks(1, synthetic_losses, ["train.micro_batch_size=4"])[0]
    c = run_on_ranks(1, synthetic_losses, ["train.micro_batch_size=4", "train.seed=7"])[0]
    assert a == b  # bitwise
    assert a != c
