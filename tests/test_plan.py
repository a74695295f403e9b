"""python -m megatron_llm.plan: its parameter, gradient and optimizer bytes per device against
what real DeepSpeed engines hold on gloo ranks, and the layouts it considers."""

import json

import pytest
import torch

from megatron_llm import plan
from megatron_llm.config import load_config
from megatron_llm.model import GPT
from tests.distributed import run_on_ranks

# Weights (k and v included) of >= 1e5 elements, so that ZeRO 3 partitions them (DeepSpeed
# keeps smaller parameters whole on every rank: negligible at real sizes, not at toy ones).
BASE = ["model.num_layers=2", "model.hidden_size=448", "model.num_heads=4"]
BASE += ["model.seq_length=16", "train.micro_batch_size=2", "train.grad_accum_steps=2"]
VOCAB = 500  # padded to 512 rows
MOE = ["model.style=gpt2", "model.moe.num_experts=4", "model.moe.top_k=2"]
LAYOUTS = [
    ["model.style=gpt2", "parallel.dp=2", "parallel.zero_stage=1"],
    # bf16 accumulates gradients in fp32 (parallel/engine.py): ZeRO 1 takes DeepSpeed's bf16
    # optimizer, whose buffers differ from the fp32 path's.
    ["model.style=gpt2", "parallel.dp=2", "parallel.zero_stage=1", "train.precision=bf16"],
    ["model.style=gpt2", "parallel.dp=2", "parallel.zero_stage=2", "train.precision=bf16"],
    [
        "model.style=llama",
        "model.num_kv_heads=2",
        "parallel.dp=2",
        "parallel.zero_stage=3",
        "train.precision=bf16",
    ],
    ["model.style=llama", "model.num_kv_heads=2", "parallel.tp=2", "parallel.zero_stage=0"],
    # ep=2 over dp=2: each rank holds 2 of the 4 experts, whose optimizer state is not
    # sharded at all (their data-parallel group is dp / ep = 1 rank), the dense parts' over 2
    [*MOE, "parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=1"],
    [*MOE, "parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=2", "train.precision=bf16"],
]


def _bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if torch.is_tensor(t) and t.numel() > 0:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _flat(obj) -> list:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        return [t for x in obj for t in _flat(x)]
    return []


def _grad_bytes(engine) -> int:
    opt = engine.optimizer
    tensors = [p.grad for p in engine.module.parameters() if p.grad is not None]
    names = ("averaged_gradients", "grad_partitions_flat_buffer", "fp32_groups_gradients_flat")
    for name in names:  # DeepSpeed 0.19's: ZeRO 2, ZeRO 3, bf16 ZeRO 1 (fp32 accumulator)
        tensors += _flat(getattr(opt, name, None))
    return _bytes(tensors)


def measure(layouts: list[list[str]]) -> list[dict]:
    """Bytes this rank holds: parameters, gradients (the most over a 2-micro-batch step), and
    optimizer state (moments and DeepSpeed's fp32 master partitions)."""
    from megatron_llm.parallel.build import build_model
    from megatron_llm.parallel.engine import build_engine
    from megatron_llm.parallel.groups import build_context

    out = []
    for overrides in layouts:
        cfg = load_config(None, BASE + overrides)
        ctx = build_context(cfg.parallel)
        rows = cfg.model.padded_vocab_size(VOCAB, cfg.parallel.tp)
        engine = build_engine(build_model(cfg, ctx, rows).module, cfg, ctx)
        grads = 0
        for _ in range(cfg.train.grad_accum_steps):
            tokens = torch.randint(0, VOCAB, (cfg.train.micro_batch_size, 17))
            engine.backward(engine(tokens[:, :-1], tokens[:, 1:]))
            grads = max(grads, _grad_bytes(engine))
            engine.step()
        params = []
        for p in engine.module.parameters():
            params.append(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
            if getattr(p, "ds_persist", False):
                params.append(p.data)  # ZeRO 3 keeps small parameters whole
        opt = engine.optimizer
        inner = getattr(opt, "optimizer", opt)
        state = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t)]
        masters = _flat(getattr(opt, "single_partition_of_fp32_groups", None))
        masters += _flat(getattr(opt, "fp32_partitioned_groups_flat", None))
        masters += _flat(getattr(opt, "fp32_groups_flat_partition", None))  # bf16 ZeRO 1
        state = [t for t in state if t.dim() > 0] + masters
        out.append({"params": _bytes(params), "grads": grads, "optimizer": _bytes(state)})
    return out


def test_model_state_estimates_match_deepspeed_engines():
    measured = run_on_ranks(2, measure, LAYOUTS)[0]  # rank 0; ranks hold equal shares
    for overrides, got in zip(LAYOUTS, measured):
        cfg = load_config(None, BASE + overrides)
        p = cfg.parallel
        lay = plan.Layout(p.tp, 1, p.resolve_dp(2), p.zero_stage, 2, 2, False, p.cp, p.ep)
        est = plan.estimate(cfg.model, VOCAB, lay, cfg.train.precision)
        for key in ("params", "grads", "optimizer"):
            assert getattr(est, key) == pytest.approx(got[key], rel=0.1), (overrides, key, got)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_parameter_count_equals_the_model(style):
    cfg = load_config(None, [f"model.style={style}", "model.num_layers=3", "model.bias=true"])
    n = plan.stage_parameters(cfg.model, 256, tp=1, pp=1)
    assert n == GPT(cfg.model, 256).num_parameters()


def test_layouts_follow_the_rules(capsys):
    argv = ["configs/llama_1b.yaml", "--nodes", "2", "--gpus-per-node", "4"]
    argv += ["--vocab-size", "32000", "--global-batch", "32", "--json"]
    assert plan.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["tp"] * r["cp"] * r["pp"] * r["dp"] == 8 for r in rows)
    assert all(r["tp"] <= 4 and 32 % r["tp"] == 0 and 8 % r["tp"] == 0 for r in rows)
    assert all(r["zero"] == 1 for r in rows if r["pp"] > 1)
    assert all(r["micro"] * r["accum"] * r["dp"] == 32 for r in rows)
    assert {r["pp"] for r in rows} == {1, 2, 4, 8}
    fits = [r["fits"] for r in rows]
    assert fits == sorted(fits, reverse=True)  # layouts that fit come first
    assert plan.main([*argv[:-1], "--memory-gb", "1"]) == 0
    assert "0 fit" in capsys.readouterr().out
