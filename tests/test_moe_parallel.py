"""Expert parallelism on real gloo ranks matches one process (issue 17).

A tiny MoE (4 experts, top-2, one shared expert, load-balancing and z-loss on, every layer)
trains 3 steps at ep=2, ep=4, ep=2 x tp=2 (experts split over tp too; with activation
checkpointing; with sequence parallelism), ep=2 x dp=2 (ZeRO 1 and 2) and ep=2 x pp=2, dropless
and with a capacity factor that drops tokens. Routing, aux losses and dropping are decided per
micro-batch, so the reference is one process with gradient accumulation over the same
micro-batches (micro-batch i of the reference is data-parallel rank i's). Per-step losses and
grad norms, each micro-batch's aux loss, z-loss, tokens per expert and dropped count, and each
rank's step-0 gradients of its expert slices and routers must equal the reference's (fp32,
1e-5). Each world size is spawned once and trains all its layouts in turn.
"""

import numpy as np
import pytest
import torch

from megatron_llm.config import load_config
from megatron_llm.model.gpt import GPT
from megatron_llm.parallel.experts import check_expert_parallel
from megatron_llm.parallel.groups import ParallelContext
from megatron_llm.parallel.layers import local_part, part_index
from megatron_llm.parallel.shard import shard_model
from tests.distributed import run_on_ranks
from tests.parallel_runs import (
    MOE_MODEL,
    TINY_MODEL,
    VOCAB,
    dispatch_cases,
    layout,
    moe_layouts,
)

CAPACITY = "model.moe.capacity_factor=1.0"  # drops: top-2 of 4 experts is never even


def _moe(style: str = "llama", capacity: bool = False, **kw) -> list[str]:
    return layout(style, **kw) + ([CAPACITY] if capacity else [])


def _accum(n: int, style: str = "llama", capacity: bool = False) -> list[str]:
    return _moe(style, capacity, train__grad_accum_steps=n, train__micro_batch_size=4 // n)


REFERENCE = {
    "accum2": _accum(2),
    "accum2 cap": _accum(2, capacity=True),
    "accum4": _accum(4),
    "accum4 cap": _accum(4, capacity=True),
    "gpt2 accum4": _accum(4, "gpt2"),
}
TWO_RANKS = {  # layout name: (its overrides, the reference it must match)
    "ep2": (_moe(dp=2, zero=1, parallel__ep=2), "accum2"),
    "ep2 cap": (_moe(dp=2, zero=2, parallel__ep=2, capacity=True), "accum2 cap"),
}
FOUR_RANKS = {
    "ep4 gpt2": (_moe("gpt2", dp=4, zero=1, parallel__ep=4), "gpt2 accum4"),
    "ep4 cap": (_moe(dp=4, zero=2, parallel__ep=4, capacity=True), "accum4 cap"),
    # Recomputed blocks dispatch again in backward: the all-to-alls must stay matched.
    "ep2 tp2 recompute": (
        _moe(tp=2, dp=2, zero=1, parallel__ep=2, train__activation_checkpointing=1),
        "accum2",
    ),
    # Sequence parallelism: the MoE layer gathers the sequence and keeps its output chunk.
    "ep2 tp2 sp cap": (
        _moe(tp=2, dp=2, zero=2, sp=True, parallel__ep=2, capacity=True),
        "accum2 cap",
    ),
    "ep2 dp2 zero1": (_moe(dp=4, zero=1, parallel__ep=2), "accum4"),
    "ep2 dp2 zero2": (_moe(dp=4, zero=2, parallel__ep=2), "accum4"),
    "ep2 dp2 zero2 cap": (_moe(dp=4, zero=2, parallel__ep=2, capacity=True), "accum4 cap"),
    "ep2 pp2": (_moe(dp=2, zero=1, parallel__ep=2, parallel__pp=2), "accum2"),
    "ep2 pp2 cap": (
        _moe(dp=2, zero=1, parallel__ep=2, parallel__pp=2, capacity=True),
        "accum2 cap",
    ),
}


def _by_name(names, per_rank):
    # per_rank[rank][i] -> {name: [result of rank 0, rank 1, ...]}
    return {name: [runs[i] for runs in per_rank] for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def reference():
    return dict(zip(REFERENCE, run_on_ranks(1, moe_layouts, list(REFERENCE.values()))[0]))


@pytest.fixture(scope="module")
def two_ranks():
    layouts = [overrides for overrides, _ in TWO_RANKS.values()]
    return _by_name(TWO_RANKS, run_on_ranks(2, moe_layouts, layouts))


@pytest.fixture(scope="module")
def four_ranks():
    layouts = [overrides for overrides, _ in FOUR_RANKS.values()]
    return _by_name(FOUR_RANKS, run_on_ranks(4, moe_layouts, layouts))


def _check(ranks, ref):
    for run in ranks:
        torch.testing.assert_close(
            torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=0
        )
        torch.testing.assert_close(
            torch.tensor(run["norms"]), torch.tensor(ref["norms"]), rtol=1e-5, atol=0
        )
    # Every micro-batch's router statistics, on every rank that ran its layer.
    seen = set()
    for run in ranks:
        for key, got in run["stats"].items():
            want = ref["stats"][key]
            seen.add(key)
            assert got["aux"] == pytest.approx(want["aux"], rel=1e-5), key
            assert got["z"] == pytest.approx(want["z"], rel=1e-5), key
            assert got["dropped"] == want["dropped"], key
            np.testing.assert_array_equal(got["tokens"], want["tokens"], err_msg=str(key))
    assert seen == ref["stats"].keys()
    # Each rank's step-0 gradient of its experts (rows offset.., its tp slice) and router.
    for run in ranks:
        for name, (offset, dim, grad) in run["grads"].items():
            whole = torch.from_numpy(ref["grads"][name][2])
            expected = whole[offset : offset + grad.shape[0]]
            if dim is not None:
                expected = expected.chunk(run["tp"], dim)[run["tp_rank"]]
            torch.testing.assert_close(
                torch.from_numpy(grad), expected, rtol=1e-5, atol=1e-8, msg=name
            )


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_two_ranks_match_single_process(name, two_ranks, reference):
    _check(two_ranks[name], reference[TWO_RANKS[name][1]])


@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_four_ranks_match_single_process(name, four_ranks, reference):
    ranks = four_ranks[name]
    _check(ranks, reference[FOUR_RANKS[name][1]])
    if "pp2" not in name:  # a pipeline's step runs whole: its gradients are not read
        assert all(run["grads"] for run in ranks)


def test_experts_are_really_split(two_ranks, four_ranks):
    # ep=2: each rank holds 2 of the 4 experts, at offsets 0 and 2; ep=4: one each.
    key = "blocks.0.mlp.experts.w_in"
    offsets = {run["grads"][key][0] for run in two_ranks["ep2"]}
    assert offsets == {0, 2}
    assert {run["grads"][key][2].shape[0] for run in two_ranks["ep2"]} == {2}
    offsets = [run["grads"][key][0] for run in four_ranks["ep4 gpt2"]]
    assert offsets == [0, 1, 2, 3]
    # ep2 x tp2: each rank holds 2 experts x half of each expert's ffn columns (w_in) and
    # rows (w_out): a quarter of the experts' weights.
    ranks = four_ranks["ep2 tp2 recompute"]
    assert [run["grads"][key][:2] for run in ranks] == [(0, 2), (0, 2), (2, 2), (2, 2)]
    assert {run["grads"][key][2].shape for run in ranks} == {(2, 32, 64)}
    out = "blocks.0.mlp.experts.w_out"
    assert {(run["grads"][out][1], run["grads"][out][2].shape) for run in ranks} == {
        (1, (2, 64, 32))
    }


def test_capacity_drops_tokens_and_reference_learns(reference):
    dropped = sum(s["dropped"] for s in reference["accum4 cap"]["stats"].values())
    assert dropped > 0
    assert sum(s["dropped"] for s in reference["accum4"]["stats"].values()) == 0
    losses = reference["accum2"]["losses"]
    assert losses[-1] < losses[0]


DISPATCH_CASES = [  # per rank: tokens per global expert (4 experts over 2 ranks)
    [[2, 1, 0, 3], [1, 0, 4, 2]],
    [[5, 0, 0, 0], [3, 0, 0, 0]],  # every token to expert 0: rank 1's experts get none
    [[0, 0, 0, 0], [0, 2, 0, 1]],  # rank 0 sends nothing
]


def test_all_to_all_dispatch_imbalanced_and_empty():
    ranks = run_on_ranks(2, dispatch_cases, DISPATCH_CASES)
    for c, case in enumerate(DISPATCH_CASES):
        for r in range(2):
            got = ranks[r][c]
            # Expected: for each of my local experts e (global 2r + e), every source's rows
            # for e in source order; a source's rows for expert g start after its earlier ones.
            rows, per_local = [], []
            for g in (2 * r, 2 * r + 1):
                n = 0
                for s in range(2):
                    start = sum(case[s][:g])
                    rows += [s * 1000 + start + i for i in range(case[s][g])]
                    n += case[s][g]
                per_local.append(n)
            np.testing.assert_array_equal(got["mine"], rows, err_msg=f"case {c} rank {r}")
            np.testing.assert_array_equal(got["per_local"], per_local)
            # Back home in dispatch order, each row scaled by 1 + its global expert.
            experts = np.repeat(np.arange(4), case[r])
            tokens = r * 1000 + np.arange(len(experts), dtype=np.float32)
            scale = (1 + experts)[:, None].astype(np.float32)
            np.testing.assert_array_equal(got["out"], np.repeat(tokens[:, None], 3, 1) * scale)
            weights = np.arange(got["out"].size, dtype=np.float32).reshape(got["out"].shape)
            np.testing.assert_array_equal(got["grad"], weights * scale)


def _context(**sizes) -> ParallelContext:
    # Sizes only: the refusals below come before any group is used.
    sizes.setdefault("rank", 0)
    return ParallelContext(world_size=4, tp_group=None, dp_group=None, pp_group=None, **sizes)


def test_expert_parallelism_refuses_zero_0_and_3():
    for zero in (0, 3):
        cfg = load_config(None, [*MOE_MODEL, "parallel.ep=2", f"parallel.zero_stage={zero}"])
        with pytest.raises(ValueError, match="set parallel.zero_stage=1"):
            check_expert_parallel(cfg, _context(tp=1, pp=1, dp=2, ep=2))
    cfg = load_config(None, [*MOE_MODEL, "parallel.ep=2", "parallel.zero_stage=2"])
    check_expert_parallel(cfg, _context(tp=1, pp=1, dp=2, ep=2))


def test_moe_aux_losses_refuse_fp16():
    """fp16's dynamic loss scale never reaches the aux losses' backward: refused, not shrunk."""
    ctx = _context(tp=1, pp=1, dp=1)
    cfg = load_config(None, [*MOE_MODEL, "train.precision=fp16"])
    with pytest.raises(ValueError, match="use train.precision=bf16"):
        check_expert_parallel(cfg, ctx)
    check_expert_parallel(load_config(None, [*MOE_MODEL, "train.precision=bf16"]), ctx)


def test_expert_parallelism_refuses_a_dense_model():
    dense = GPT(load_config(None, TINY_MODEL).model, VOCAB)
    with pytest.raises(ValueError, match="needs MoE layers"):
        shard_model(dense, _context(tp=1, pp=1, dp=2, ep=2), sequence_parallel=False, seed=0)


def test_slice_rule_places_expert_rows_by_global_index():
    moe = GPT(load_config(None, [*TINY_MODEL, *MOE_MODEL]).model, VOCAB)
    w_in = moe.blocks[0].mlp.experts.w_in  # (4, hidden, ffn)
    whole = torch.arange(w_in.numel(), dtype=torch.float32).view(w_in.shape)
    for dp_rank in range(4):  # ep=2 inside dp=4: ep_rank = dp_rank % 2
        ctx = _context(tp=1, pp=1, dp=4, ep=2, rank=dp_rank)
        rows = slice(2 * (dp_rank % 2), 2 * (dp_rank % 2) + 2)
        assert part_index(w_in, whole.shape, ctx)[0] == rows
        torch.testing.assert_close(local_part(whole, w_in, ctx), whole[rows])
        router = moe.blocks[0].mlp.router.weight  # replicated
        assert local_part(router, router, ctx).shape == router.shape
