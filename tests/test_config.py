from pathlib import Path

import pytest

from megatron_llm.config import ConfigError, load_config
from megatron_llm.parallel.config import ParallelConfig
from megatron_llm.pretrain import split_args

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["default", "gpt_125m", "llama_1b"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.to_dict()["model"]["num_layers"] >= 1


def test_overrides_are_coerced_to_the_field_types():
    cfg = load_config(
        None,
        [
            "optim.lr=3e-4",
            "parallel.tp=2",
            "model.num_heads=4",
            "train.precision=bf16",
            "checkpoint.save_at_end=false",
            "data.prefixes=a,b",
            "data.weights=[0.3, 0.7]",
            "model.vocab_size=null",
        ],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.parallel.tp == 2 and cfg.train.precision == "bf16"
    assert cfg.checkpoint.save_at_end is False
    assert cfg.data.prefixes == ["a", "b"] and cfg.data.weights == [0.3, 0.7]
    assert cfg.model.vocab_size is None


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads "3e-4" as a string; the loader must still give a float.
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 3e-4\n  min_lr: 0\n")
    assert load_config(p).optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown key 'train.stepz'; did you mean 'train.steps'?"),
        ("modle.style=gpt2", "unknown key 'modle'; did you mean 'model'?"),
        ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
        ("train.steps=1.5", "train.steps: expected an integer, got '1.5'"),
        ("model.style=bert", "model.style: expected one of 'gpt2', 'llama', got 'bert'"),
        ("model.num_kv_heads=3", "model.num_kv_heads=3: must divide model.num_heads=4"),
        ("model.hidden_size=130", "model.hidden_size=130 is not divisible by model.num_heads=4"),
        ("train.precision=fp8", "expected one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
        ("parallel.zero_stage=4", "parallel.zero_stage=4: must be 0, 1, 2 or 3"),
        ("data.split=90,10", "data.split='90,10': expected three non-negative numbers"),
        ("trainsteps=3", "expected section.field=value"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_cross_section_checks():
    for zero in (0, 2, 3):
        with pytest.raises(ConfigError, match="pipeline parallelism runs with ZeRO stage 1 only"):
            load_config(None, ["parallel.pp=2", f"parallel.zero_stage={zero}"])
    load_config(None, ["parallel.pp=2", "parallel.zero_stage=1"])
    with pytest.raises(ConfigError, match="model.num_heads=4 is not divisible by parallel.tp=8"):
        load_config(None, ["parallel.tp=8"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.num_heads=6", "model.hidden_size=96"], "model.num_heads=6 is not divisible"),
        (
            ["model.style=llama", "model.num_kv_heads=1"],
            "model.num_kv_heads=1 is not divisible by parallel.tp=4",
        ),
        (["model.ffn_hidden_size=130"], "model.ffn_hidden_size=130 is not divisible"),
        (
            ["model.seq_length=30", "parallel.sequence_parallel=true"],
            "model.seq_length=30 is not divisible by parallel.tp=4; sequence parallelism",
        ),
        (["parallel.tp=1", "parallel.sequence_parallel=true"], "needs parallel.tp > 1"),
    ],
)
def test_tensor_parallel_shape_checks(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["parallel.tp=4", *overrides])
    assert message in str(e.value)
    # The same shapes are fine without tensor parallelism (sequence parallelism aside).
    if "sequence_parallel" not in " ".join(overrides):
        load_config(None, ["parallel.tp=1", *overrides])


def test_bad_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{p}: not valid YAML"):
        load_config(p)
    p.write_text("model:\n  num_layer: 2\n")
    with pytest.raises(ConfigError, match=f"{p}: unknown key 'model.num_layer'"):
        load_config(p)


def test_world_size_mismatch_prints_every_factor():
    par = ParallelConfig(tp=2, pp=2, dp=2)
    assert par.resolve_dp(8) == 2
    with pytest.raises(ValueError) as e:
        par.resolve_dp(6)
    assert "world size 6 != tp (2) x pp (2) x dp (2)" in str(e.value)
    assert ParallelConfig(tp=2).resolve_dp(8) == 4
    with pytest.raises(
        ValueError, match=r"world size 3 != tp \(2\) x pp \(1\) x dp \(derived = 1\)"
    ):
        ParallelConfig(tp=2).resolve_dp(3)
    with pytest.raises(ValueError, match=r"tp \(2\) x cp \(2\) x pp \(1\)"):
        ParallelConfig(tp=2, cp=2).resolve_dp(6)
    with pytest.raises(ValueError, match="parallel.ep=4 does not divide the data-parallel size 2"):
        ParallelConfig(tp=2, ep=4).resolve_dp(4)


def test_group_layouts_follow_the_tp_cp_dp_pp_rank_order():
    """Each kind's groups cover every rank once, and rank = t + tp*(c + cp*(d + dp*p))."""
    from megatron_llm.parallel.groups import group_layouts

    g = group_layouts(ParallelConfig(tp=2, cp=2, pp=2, ep=2), 16)  # dp = 2
    for kind, groups in g.items():
        assert sorted(r for ranks in groups for r in ranks) == list(range(16)), kind
    assert g["tp"][0] == [0, 1] and g["cp"][0] == [0, 2] and g["dp"][0] == [0, 4]
    assert g["pp"][0] == [0, 8] and g["dp_cp"][0] == [0, 2, 4, 6]
    assert g["ep"][0] == [0, 4]  # the two dp ranks split the experts
    assert [0, 2] in g["expert_dp"]  # dp/ep = 1 holder per cp rank: the cp ring reduces
    plain = group_layouts(ParallelConfig(tp=2, pp=2), 8)
    assert set(plain) == {"tp", "dp", "pp"} and plain["dp"][0] == [0, 2]


def test_global_batch_check():
    cfg = load_config(
        None, ["train.micro_batch_size=2", "train.grad_accum_steps=3", "train.global_batch_size=12"]
    )
    assert cfg.train.check_global_batch(2) == 12
    with pytest.raises(ValueError, match=r"train.global_batch_size=12 != micro_batch_size \(2\)"):
        cfg.train.check_global_batch(4)


def test_vocab_padding():
    cfg = load_config(None, ["model.pad_vocab_multiple=64"])
    assert cfg.model.padded_vocab_size(1000) == 1024
    assert cfg.model.padded_vocab_size(1000, tp=4) == 1024
    assert cfg.model.padded_vocab_size(1030, tp=4) == 1088  # lcm(64, 4): the same at any tp
    assert cfg.model.padded_vocab_size(1000, tp=3) == 1152  # lcm(64, 3) = 192


def test_command_line_split():
    assert split_args(["--local_rank=1", "c.yaml", "train.steps=3"]) == (
        "c.yaml",
        ["train.steps=3"],
    )
    assert split_args(["train.steps=3"]) == (None, ["train.steps=3"])
    with pytest.raises(ConfigError, match="expected one config file first"):
        split_args(["train.steps=3", "c.yaml"])
