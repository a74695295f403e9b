"""Pipeline parallelism (DeepSpeed PipelineModule, 1F1B) composed with tp and dp, on gloo ranks.

Every layout trains the real loop on real shards and must give the single-process per-step
losses (fp32, relative 1e-5) and validation loss; a pipeline run saved and resumed gives the
straight run's losses bitwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoint_runs import overrides, train_runs
from tests.data_fixtures import Shard
from tests.distributed import run_on_ranks

COMMON = [
    "model.num_layers=4",
    "train.steps=10",
    "train.grad_accum_steps=2",
    "eval.at_end=true",
    "eval.iters=2",
    "parallel.zero_stage=1",
]
STYLES = {
    "gpt2": ["model.style=gpt2"],  # tied embeddings: the head lives on the last stage too
    "llama": ["model.style=llama", "model.num_kv_heads=2", "model.tie_embeddings=false"],
}


def _layout(pp: int = 1, tp: int = 1, dp: int = 1, ckpt: int = 0, **kw: str) -> list[str]:
    extra = [f"{k.replace('__', '.')}={v}" for k, v in kw.items()]
    return [
        f"parallel.pp={pp}",
        f"parallel.tp={tp}",
        f"parallel.dp={dp}",
        f"train.micro_batch_size={2 // dp}",
        f"train.activation_checkpointing={ckpt}",
        *extra,
    ]


CASES = {  # name: (world size, style, layout)
    "pp2": (2, "gpt2", _layout(pp=2)),
    "pp2-untied-uneven-ckpt": (
        2,
        "llama",
        _layout(pp=2, ckpt=1, parallel__pipeline_split="[1,3]"),
    ),
    "pp4-ckpt2": (4, "gpt2", _layout(pp=4, ckpt=2, parallel__pipeline_partition="uniform")),
    "pp2-tp2": (4, "llama", _layout(pp=2, tp=2, parallel__sequence_parallel="true")),
    "pp2-dp2": (4, "gpt2", _layout(pp=2, dp=2)),
    "pp2-tp2-dp2-ckpt": (8, "llama", _layout(pp=2, tp=2, dp=2, ckpt=1)),
    "no-pp-ckpt": (1, "llama", _layout(ckpt=1)),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, email_shard: Shard, bpe_model: Path):
    tmp = tmp_path_factory.mktemp("reference")
    runs = [
        overrides(str(tmp / s), email_shard.prefix, str(bpe_model), *COMMON, *o, *_layout())
        for s, o in STYLES.items()
    ]
    return dict(zip(STYLES, run_on_ranks(1, train_runs, runs)[0]))


def _argv(tmp: Path, shard: Shard, bpe_model: Path, style: str, layout: list[str]) -> list[str]:
    return overrides(str(tmp), shard.prefix, str(bpe_model), *COMMON, *STYLES[style], *layout)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_pipeline_layouts_match_one_process(
    tmp_path: Path, email_shard: Shard, bpe_model: Path, reference: dict, world: int
) -> None:
    cases = {n: c for n, c in CASES.items() if c[0] == world or (world == 2 and c[0] == 1)}
    by_world: dict[int, list[str]] = {}
    for name, (w, _, _) in cases.items():
        by_world.setdefault(w, []).append(name)
    for w, names in by_world.items():
        runs = [
            _argv(tmp_path / n, email_shard, bpe_model, CASES[n][1], CASES[n][2]) for n in names
        ]
        for name, result in zip(names, run_on_ranks(w, train_runs, runs)[0]):
            ref = reference[CASES[name][1]]
            assert result["losses"] == pytest.approx(ref["losses"], rel=1e-5), name
            assert result["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5), name


def test_pipeline_resume_is_bitwise(tmp_path: Path, email_shard: Shard, bpe_model: Path) -> None:
    """Save at pp=2 after 5 of 10 steps, load at pp=2: the straight run's losses, fp32 and bf16."""
    runs = []
    for precision in ("fp32", "bf16"):
        layout = [*_layout(pp=2), f"train.precision={precision}"]
        tmp = tmp_path / precision
        runs += [
            _argv(tmp / "straight", email_shard, bpe_model, "gpt2", layout),
            _argv(
                tmp / "resumed", email_shard, bpe_model, "gpt2", [*layout, "train.exit_interval=5"]
            ),
            _argv(tmp / "resumed", email_shard, bpe_model, "gpt2", layout),
        ]
    results = run_on_ranks(2, train_runs, runs)[0]
    for i in (0, 3):
        straight, first, resumed = results[i : i + 3]
        assert resumed["first_step"] == 6
        assert straight["losses"] == first["losses"] + resumed["losses"]


def test_blocks_split_by_count_parameters_or_as_listed() -> None:
    from megatron_llm.config import load_config
    from megatron_llm.model import GPT
    from megatron_llm.parallel.pipeline import split_blocks

    cfg = load_config(None, ["model.num_layers=8", "model.hidden_size=64", "model.num_heads=4"])
    small, large = GPT(cfg.model, 64), GPT(cfg.model, 20000)
    assert split_blocks(small, 4, "uniform", None) == [2, 2, 2, 2]
    assert split_blocks(small, 4, "parameters", None) == [2, 2, 2, 2]
    # A large vocabulary weighs on the first (embedding) and last (head) stages.
    assert split_blocks(large, 4, "parameters", None) == [1, 3, 3, 1]
    assert split_blocks(large, 4, "uniform", [1, 2, 2, 3]) == [1, 2, 2, 3]  # the user's split
    with pytest.raises(ValueError, match="summing to model.num_layers=8"):
        split_blocks(small, 2, "uniform", [3, 3])


@pytest.mark.parametrize("tied", [True, False])
def test_each_stage_fills_only_its_own_layers(tied: bool) -> None:
    import types

    from megatron_llm.config import load_config
    from megatron_llm.model.gpt import GPT
    from megatron_llm.parallel.build import parameters_on_meta
    from megatron_llm.parallel.pipeline import stage_parameter_names

    cfg = load_config(
        None,
        [
            "model.num_layers=6",
            "model.hidden_size=64",
            "model.num_heads=4",
            f"model.tie_embeddings={str(tied).lower()}",
            "parallel.pp=3",
            "parallel.zero_stage=1",
            "parallel.pipeline_split=[1,3,2]",
        ],
    )
    with parameters_on_meta():
        model = GPT(cfg.model, 64)
    stages = [
        stage_parameter_names(model, types.SimpleNamespace(pp=3, pp_rank=s), cfg) for s in range(3)
    ]
    everything = {name for name, _ in model.named_parameters()}
    assert set().union(*stages) == everything
    assert {n.split(".")[1] for n in stages[1] if n.startswith("blocks.")} == {"1", "2", "3"}
    assert not any(n.startswith(("embed.", "final_norm.")) for n in stages[1])
    assert "embed.weight" in stages[0] and "final_norm.weight" in stages[2]
    # A tied head is the embedding again on the last stage; an untied one is the head's own.
    assert ("embed.weight" in stages[2]) == tied and ("head.weight" in stages[2]) != tied
