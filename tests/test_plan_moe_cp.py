"""The planner with mixture-of-experts (ep) and context parallelism (cp): experts per rank and
their states over the expert data-parallel group against a built model's own parameters, MoE
activations against what a real forward keeps for backward, the all-to-all and ring terms by
hand, the longest sequence per layout, and the scaling rules and sizes published for both."""

import dataclasses
import json

import pytest
import torch

from megatron_llm import plan
from megatron_llm.config import load_config
from megatron_llm.model import GPT, ModelConfig
from megatron_llm.model.config import MoEConfig
from megatron_llm.plan import memory, search, steptime
from tests.distributed import run_on_ranks

SEQ, MICRO, VOCAB = 64, 2, 256
BASE = ["model.style=gpt2", "model.hidden_size=128", "model.num_heads=4", "model.kernels=torch"]
BASE += [f"model.seq_length={SEQ}"]
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2"]
H100 = plan.DEVICES["h100"]


def _model(layers: int, extra: list[str]) -> ModelConfig:
    return load_config(None, [*BASE, f"model.num_layers={layers}", *extra]).model


def _expert_and_other(cfg: ModelConfig) -> tuple[int, int]:
    """The built model's routed-expert parameters (marked expert_parallel) and the rest."""
    model = GPT(cfg, VOCAB)
    experts = sum(p.numel() for p in model.parameters() if getattr(p, "expert_parallel", False))
    return experts, model.num_parameters() - experts


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_expert_states_are_split_by_ep_and_sharded_over_the_expert_group(zero):
    cfg = _model(2, MOE)
    experts, other = _expert_and_other(cfg)
    assert experts > 0
    lay = plan.Layout(1, 1, 4, zero, 1, 1, False, cp=1, ep=2)
    est = plan.estimate(cfg, VOCAB, lay, "fp32")
    mine = experts // 2  # this rank's E/ep experts of every MoE layer
    assert est.params == 4 * (other + mine)
    grads = 4 * (other + mine) if zero < 2 else 4 * (other / 4 + mine / 2)
    assert est.grads == pytest.approx(grads)
    # fp32 AdamW: moments (ZeRO 0: 8 bytes), else 12 with the master partition, sharded over
    # dp = 4 for the dense parameters and over dp / ep = 2 for the experts
    optimizer = 8 * (other + mine) if zero == 0 else 12 * (other / 4 + mine / 2)
    assert est.optimizer == pytest.approx(optimizer)


def test_context_parallel_shards_states_over_dp_times_cp_and_not_the_parameters():
    cfg = _model(2, [])
    n = GPT(cfg, VOCAB).num_parameters()
    one = plan.estimate(cfg, VOCAB, plan.Layout(1, 1, 2, 1, 1, 1, False), "fp32")
    two = plan.estimate(cfg, VOCAB, plan.Layout(1, 1, 2, 1, 1, 1, False, cp=2), "fp32")
    assert two.params == one.params == 4 * n  # each cp rank holds the whole model
    assert two.optimizer == pytest.approx(12 * n / 4)  # DeepSpeed's data group is dp x cp


def _kept_per_block(extra: list[str]) -> float:
    """Bytes one more block makes a real fp32 training forward keep for backward (3 layers
    minus 2: the embedding and the head cancel)."""
    out = []
    for layers in (2, 3):
        torch.manual_seed(0)
        model = GPT(_model(layers, extra), VOCAB).train()
        skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor, saved=saved, skip=skip) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in skip:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=gen)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens[:, :-1], tokens[:, 1:])
        out.append(sum(saved.values()))  # (tests/test_plan_activations.py runs the backward)
    return out[1] - out[0]


@pytest.mark.parametrize(
    "extra",
    [
        MOE,  # GELU experts of the dense width
        # SwiGLU fine-grained experts, a shared expert and its sigmoid gate
        ["model.activation=swiglu", "model.moe.num_experts=8", "model.moe.top_k=2",
         "model.moe.shared_experts=1", "model.moe.shared_expert_gate=true",
         "model.moe.expert_ffn_hidden_size=64"],
        [*MOE, "model.moe.capacity_factor=0.5"],  # half the assignments dropped
    ],
    ids=["gelu", "swiglu-shared", "capacity"],
)  # fmt: skip
def test_moe_block_activations_match_what_the_forward_keeps(extra):
    lay = plan.Layout(1, 1, 1, 0, MICRO, 1, False)
    planned = memory.activation_bytes(_model(3, extra), VOCAB, lay, "fp32", False)
    planned -= memory.activation_bytes(_model(2, extra), VOCAB, lay, "fp32", False)
    measured = _kept_per_block(extra)
    # A dense block keeps 16 units; an MoE block with top-2 keeps about twice that: within 2%
    # tells a missing term (the dispatched tokens are 2 units, the fp32 weighted output 4).
    assert planned == pytest.approx(measured, rel=0.02)


def test_only_moe_layers_count_as_moe():
    every = [*MOE, "model.moe.first_dense=1", "model.moe.every=2"]  # layers 1, 3 of 4 MoE
    lay = plan.Layout(1, 2, 1, 1, MICRO, 1, False)
    cfg, dense = _model(4, every), _model(4, [])
    b = 4
    unit = SEQ * MICRO * 128 * b
    moe_block = memory.moe_block_units(cfg, 1, False, b) * unit
    dense_block = memory.block_units(cfg, 1, False, b) * unit
    # each stage of 2 holds one dense block and one MoE block
    assert memory.activation_bytes(cfg, VOCAB, lay, "fp32", False, 0) == pytest.approx(
        memory.activation_bytes(dense, VOCAB, lay, "fp32", False, 0) - dense_block + moe_block
    )
    experts, _ = _expert_and_other(cfg)
    assert plan.params.expert_parameters(cfg, 2, 0) == experts // 2


def test_context_parallel_divides_activations_and_adds_the_ring():
    cfg = _model(3, [])
    unit = SEQ / 4 * 2 * 128 * 4  # a rank's s/cp tokens x micro-batch 2 x h x fp32
    for ckpt in (False, True):
        lay = plan.Layout(1, 1, 1, 0, 2, 1, ckpt)
        one = memory.activation_bytes(cfg, VOCAB, lay, "fp32", False)
        lay.cp = 4
        # a quarter, plus the ring's second copy of its output (1 unit) in each block held
        # whole: all 3, or under checkpointing the one recomputed
        ring_out = (1 if ckpt else 3) * unit
        got = memory.activation_bytes(cfg, VOCAB, lay, "fp32", False)
        assert got == pytest.approx(one / 4 + ring_out)
    # K and V of the rank's s/cp tokens: 4 blocks at b bytes and 4 of their gradients in fp32
    lay = plan.Layout(2, 1, 1, 0, 2, 1, False, cp=4)
    kv = SEQ / 4 * 2 * 128 / 2  # tokens x heads x head_dim / tp
    assert memory.ring_buffer_bytes(cfg, lay, "bf16") == kv * (4 * 2 + 4 * 4)
    assert memory.ring_buffer_bytes(cfg, plan.Layout(2, 1, 1, 0, 2, 1, False), "bf16") == 0


def kept_at_cp(layers: tuple[int, ...]) -> dict[int, int]:
    """On a cp rank: bytes a real training forward keeps for backward (ring attention, this
    rank's load-balanced chunks), per number of layers."""
    from megatron_llm.parallel.build import build_model
    from megatron_llm.parallel.context import split_batch
    from megatron_llm.parallel.groups import build_context

    out = {}
    for n in layers:
        cfg = load_config(None, [*BASE, f"model.num_layers={n}", "parallel.cp=2", "parallel.dp=1"])
        torch.manual_seed(0)
        built = build_model(cfg, build_context(cfg.parallel), VOCAB)
        model = built.module.train()
        skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor, saved=saved, skip=skip) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in skip:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=gen)
        inputs, labels = split_batch((tokens[:, :-1], tokens[:, 1:]), built.model.context)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(inputs, labels)
        loss.backward()  # the ring's backward is collective: every rank runs it
        out[n] = sum(saved.values())
    return out


def test_context_parallel_block_activations_match_a_ring_forward():
    got = run_on_ranks(2, kept_at_cp, (2, 3))[0]  # the cp ranks hold equal shares
    lay = plan.Layout(1, 1, 1, 0, MICRO, 1, False, cp=2)
    planned = memory.activation_bytes(_model(3, []), VOCAB, lay, "fp32", False)
    planned -= memory.activation_bytes(_model(2, []), VOCAB, lay, "fp32", False)
    # 17 units of (s/2) m h fp32: half of cp=1's block, plus the ring output's second copy
    assert planned == pytest.approx(got[3] - got[2], rel=0.02)


def test_all_to_all_and_ring_times_by_hand():
    cfg = _model(4, [*MOE, "model.moe.every=2"])  # 2 MoE layers
    lay = plan.Layout(1, 1, 4, 1, 2, 3, False, cp=1, ep=4)
    t = steptime.step_time(cfg, VOCAB, lay, "bf16", H100, 8)
    # 4 all-to-alls (dispatch, combine; forward, backward) x 2 MoE layers x 3 micro-batches,
    # each rank sending 3/4 of its s*m*top_k*h bf16 values over NVLink
    sent = 2 * SEQ * 2 * 2 * 128
    assert t.expert_s == pytest.approx(4 * 2 * 3 * 0.75 * sent / 450e9)
    slow = steptime.step_time(cfg, VOCAB, lay, "bf16", H100, 8, all_to_all_gbs=45)
    assert slow.expert_s == pytest.approx(10 * t.expert_s)
    # the ring at cp=2: 3 passes x 4 layers x 1 step x K and V of s/2 tokens, less the
    # attention core's 12 s h FLOPs per token; on a slow link nothing is hidden but that
    dense = _model(4, [])
    lay = plan.Layout(1, 1, 1, 1, 2, 1, False, cp=2)
    slow_link = plan.Device(80, 989, 0.01, 0.01)
    t = steptime.step_time(dense, VOCAB, lay, "bf16", slow_link, 8)
    ring = 3 * 4 * 1 * 2 * 2 * (SEQ / 2 * 2) * 128 / 0.01e9
    core = 4 * 12 * SEQ * 128 * (SEQ / 2 * 2) / (989e12 * steptime.EFFICIENCY)
    assert t.context_s == pytest.approx(ring - core)


def test_search_puts_ep_inside_dp_and_cp_on_the_sequence(capsys):
    argv = ["configs/llama_1b.yaml", "model.moe.num_experts=6", "--nodes", "1"]
    argv += ["--gpus-per-node", "8", "--vocab-size", "32000", "--global-batch", "16", "--json"]
    assert plan.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["tp"] * r["cp"] * r["pp"] * r["dp"] == 8 for r in rows)
    assert all(r["dp"] % r["ep"] == 0 and 6 % r["ep"] == 0 for r in rows)
    assert {r["ep"] for r in rows} == {1, 2} and {r["cp"] for r in rows} == {1, 2, 4, 8}


@pytest.mark.parametrize(
    "bad, names",
    [("dp=4,ep=3", "does not divide dp=4"), ("dp=4,ep=4", "model.moe.num_experts=6"),
     ("cp=3", "2 x cp = 6"), ("cp=x", "integers")],
)  # fmt: skip
def test_bad_cp_and_ep_layouts_exit_2_with_one_line(bad, names, capsys):
    argv = ["configs/gpt_125m.yaml", "model.moe.num_experts=6", "--layout", bad]
    assert plan.main([*argv, "--global-batch", "8", "--vocab-size", "500"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and names in err, err


def test_longest_sequence_is_the_last_that_fits():
    cfg = ModelConfig(style="llama", num_layers=8, hidden_size=1024, num_heads=8)
    budget = 20e9
    for cp in (1, 2, 4):
        lay = plan.Layout(1, 1, 1, 1, 1, 1, True, cp=cp)
        seq = search.max_seq_length(cfg, 32000, lay, "bf16", False, budget)
        step = 2 * cp if cp > 1 else 1
        assert seq % step == 0

        def total(s, lay=lay):
            longer = dataclasses.replace(cfg, seq_length=s)
            return plan.estimate(longer, 32000, lay, "bf16").total

        assert total(seq) <= budget < total(seq + step)
        # RoPE: memory is states + a x seq, so the limit is (budget - states) / a
        states, a = total(step), (total(2 * step) - total(step)) / step
        assert seq == pytest.approx((budget - states) / a + step, abs=step)
        if cp == 1:
            one = seq
    assert seq > 3.5 * one  # cp=4 holds about 4x the tokens (the states are not split)


def test_max_seq_flag_lists_layouts_longest_first(capsys):
    argv = ["configs/llama_1b.yaml", "--nodes", "1", "--gpus-per-node", "4"]
    argv += ["--vocab-size", "32000", "--global-batch", "4", "--max-seq", "--json"]
    assert plan.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    seqs = [r["max_seq"] for r in rows]
    assert seqs == sorted(seqs, reverse=True) and seqs[0] > 0
    assert rows[0]["cp"] > 1 and all(r["micro"] == 1 for r in rows)


# Mistral AI, "Mixtral of experts" (mistral.ai/news/mixtral-of-experts, 2023-12-11): 46.7B
# total parameters, 12.9B used per token. Its shape from the released config.json.
MIXTRAL = ModelConfig(
    style="llama", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
    ffn_hidden_size=14336, seq_length=4096, moe=MoEConfig(num_experts=8, top_k=2),
)  # fmt: skip


def test_mixtral_sizes_and_experts_per_rank():
    total = plan.stage_parameters(MIXTRAL, 32000, tp=1, pp=1)
    assert total == pytest.approx(46.7e9, rel=0.005)
    # ep=8: each rank holds one expert of each of the 32 layers (3 x 4096 x 14336 each)
    experts = plan.params.expert_parameters(MIXTRAL, 1, 0, ep=8)
    assert experts == 32 * 3 * 4096 * 14336
    assert plan.stage_parameters(MIXTRAL, 32000, 1, 1, ep=8) == total - 7 * experts


def test_megatron_scaling_rules_for_ep_and_cp():
    """NVIDIA Megatron-Bridge, "MoE Training Optimization", Phase 1 table
    (docs.nvidia.com/nemo/megatron-bridge/0.7.0/training/moe-optimization.html): EP divides
    the MoE weights and their optimizer state, activations ~1; CP divides activations and
    (with the distributed optimizer, our ZeRO 1) the optimizer state, not the weights."""
    base = plan.Layout(1, 1, 8, 1, 1, 8, True)
    ref = plan.estimate(MIXTRAL, 32000, base, "bf16")
    ep = plan.estimate(MIXTRAL, 32000, dataclasses.replace(base, ep=8), "bf16")
    experts = plan.params.expert_parameters(MIXTRAL, 1, 0)
    assert ref.params - ep.params == pytest.approx(2 * experts * 7 / 8)
    assert ep.activations == ref.activations
    cp = plan.estimate(MIXTRAL, 32000, dataclasses.replace(base, dp=4, cp=2), "bf16")
    assert cp.params == ref.params and cp.optimizer == ref.optimizer  # dp x cp = 8 as before
    # half, but for the ring output's second copy in the one block recomputed (1 unit)
    unit = MIXTRAL.seq_length / 2 * MIXTRAL.hidden_size * 2
    assert cp.activations == pytest.approx(ref.activations / 2 + unit)
