"""MoE models <-> transformers' MixtralForCausalLM and Qwen2MoeForCausalLM (issue 17).

The reference is transformers itself: a real model of each class with random weights (router
and norms away from their inits, so a swapped gate or norm shows), written by save_pretrained
(Mixtral's experts.N.w1/w2/w3 files), imported by our CLI and compared logit by logit with the
transformers forward; the export of the import loads back into the same class with the same
tensors, and our own MoE checkpoint exports with equal logits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_llm.checkpoint.__main__ import main as ckpt_cli
from megatron_llm.eval.loading import load_model

transformers = pytest.importorskip("transformers")

SEQ = 32
# mistralai/Mixtral-8x7B-v0.1's config.json shrunk: 8 experts, top-2, GQA 4:1 (here 4:2).
MIXTRAL = dict(
    vocab_size=1000,
    hidden_size=64,  # 4096
    intermediate_size=48,  # 14336
    num_hidden_layers=2,  # 32
    num_attention_heads=4,  # 32
    num_key_value_heads=2,  # 8
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=SEQ,
    rope_theta=1e6,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# Qwen/Qwen1.5-MoE-A2.7B's config.json shrunk: 60 experts top-4 (here 6, top-3), a shared
# expert of 4 expert widths with its sigmoid gate, top-k not renormalised; qkv_bias off (our
# model.bias cannot put biases on q, k, v alone) and layer 1 dense (mlp_only_layers).
QWEN2_MOE = dict(
    vocab_size=1000,
    hidden_size=64,  # 2048
    intermediate_size=80,  # 5632
    moe_intermediate_size=24,  # 1408
    shared_expert_intermediate_size=96,  # 5632 = 4 x 1408
    num_hidden_layers=3,  # 24
    num_attention_heads=4,  # 16
    num_key_value_heads=4,
    num_experts=6,  # 60
    num_experts_per_tok=3,  # 4
    norm_topk_prob=False,
    qkv_bias=False,
    mlp_only_layers=[0],
    max_position_embeddings=SEQ,
    rms_norm_eps=1e-6,
)


def _hf_model(kind: str, **changes: Any) -> Any:
    torch.manual_seed(0)
    if kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**(MIXTRAL | changes)))
    else:
        model = transformers.Qwen2MoeForCausalLM(
            transformers.Qwen2MoeConfig(**(QWEN2_MOE | changes))
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                p.normal_(0.0, 1.0)  # a spread router: each expert gets tokens, the top-k matters
    return model.eval()


def _logits_diff(ours: torch.nn.Module, theirs: Any, vocab: int) -> float:
    tokens = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ours(tokens)[..., :vocab] - theirs(tokens).logits).abs().max().item()


def _import(hf_dir: Path, out: Path, *overrides: str) -> Path:
    args = ["import-hf", str(hf_dir), str(out), f"model.seq_length={SEQ}", *overrides]
    assert ckpt_cli(args) == 0
    return out / "global_step0"


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_import_then_export_is_exact(tmp_path: Path, kind: str) -> None:
    theirs = _hf_model(kind)
    theirs.save_pretrained(tmp_path / "hf")
    ckpt = _import(tmp_path / "hf", tmp_path / "ours")
    loaded = load_model(str(ckpt)).model.eval()
    assert _logits_diff(loaded, theirs, theirs.config.vocab_size) < 1e-5
    assert loaded.cfg.moe.num_experts == (
        theirs.config.num_local_experts if kind == "mixtral" else theirs.config.num_experts
    )
    assert ckpt_cli(["export-hf", str(ckpt), str(tmp_path / "back"), "--no-tokenizer"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    assert type(back) is type(theirs)
    expected, got = theirs.state_dict(), back.state_dict()
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    for field in ("mlp_only_layers", "norm_topk_prob", "num_experts_per_tok", "intermediate_size"):
        assert getattr(back.config, field, None) == getattr(theirs.config, field, None), field


def _own_checkpoint(root: Path, *overrides: str) -> Path:
    """A weights-only checkpoint of our own Llama-style MoE model (vocabulary 100, padded)."""
    from megatron_llm.checkpoint.__main__ import write_weights_only
    from megatron_llm.config import load_config
    from megatron_llm.model.gpt import GPT

    base = ["model.style=llama", "model.num_layers=3", "model.hidden_size=64", "model.num_heads=4"]
    base += ["model.num_kv_heads=2", f"model.seq_length={SEQ}", "model.vocab_size=100"]
    base += ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_ffn_hidden_size=32"]
    cfg = load_config(None, [*base, *overrides])
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.model.padded_vocab_size(100))
    with torch.no_grad():  # routers and norms away from their inits (see _hf_model)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "router" in name or "shared_gate" in name:
                p.normal_(0.0, 1.0)
    weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return write_weights_only(root, weights, cfg.to_dict())


@pytest.mark.parametrize(
    "overrides,cls",
    [
        ([], "MixtralForCausalLM"),
        (
            [
                "model.moe.shared_experts=2",
                "model.moe.shared_expert_gate=true",
                "model.moe.normalize_top_k=false",
                "model.moe.first_dense=1",
            ],
            "Qwen2MoeForCausalLM",
        ),
    ],
    ids=["mixtral", "qwen2_moe"],
)
def test_own_moe_exports_with_equal_logits(tmp_path: Path, overrides: list[str], cls: str) -> None:
    ckpt = _own_checkpoint(tmp_path / "ours", *overrides)
    ours = load_model(str(ckpt)).model.eval()
    assert ckpt_cli(["export-hf", str(ckpt), str(tmp_path / "hf"), "--no-tokenizer"]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(theirs).__name__ == cls
    assert _logits_diff(ours, theirs.eval(), 100) < 1e-5


EXPORT_REFUSED = [
    (["model.style=gpt2", "model.num_kv_heads=4"], "model.style=llama"),
    (["model.moe.score=sigmoid"], "model.moe.score='sigmoid'"),
    (["model.moe.shared_experts=1"], "shared_expert_gate"),
    (["model.moe.first_dense=1"], "first_dense=1"),
    (["model.moe.normalize_top_k=false"], "normalize_top_k=false"),
    (["model.bias=true"], "model.bias=true"),
]


@pytest.mark.parametrize("overrides,field", EXPORT_REFUSED, ids=[r[1] for r in EXPORT_REFUSED])
def test_inexpressible_moe_exports_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, overrides: list[str], field: str
) -> None:
    ckpt = _own_checkpoint(tmp_path / "ours", *overrides)
    assert ckpt_cli(["export-hf", str(ckpt), str(tmp_path / "hf"), "--no-tokenizer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field in err and err.count("\n") == 1, err
    assert not (tmp_path / "hf").exists()


IMPORT_REFUSED = [
    ("mixtral", {"sliding_window": 16}, "sliding_window"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("qwen2_moe", {"qkv_bias": True}, "qkv_bias"),
    ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 30}, "shared_expert_intermediate_size"),
    ("qwen2_moe", {"num_hidden_layers": 4, "mlp_only_layers": [2]}, "mlp_only_layers"),
]


@pytest.mark.parametrize("kind,changes,field", IMPORT_REFUSED, ids=[r[2] for r in IMPORT_REFUSED])
def test_inexpressible_moe_imports_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, kind: str, changes: dict, field: str
) -> None:
    if kind == "mixtral":
        config = transformers.MixtralConfig(**(MIXTRAL | changes))
    else:
        config = transformers.Qwen2MoeConfig(**(QWEN2_MOE | changes))
    config.save_pretrained(tmp_path / "hf")
    assert ckpt_cli(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field in err and err.count("\n") == 1, err
    assert not (tmp_path / "ours").exists()


def test_capacity_factor_export_warns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """transformers routes dropless: an export of a capacity-factor model says so."""
    ckpt = _own_checkpoint(tmp_path / "ours", "model.moe.capacity_factor=1.0")
    assert ckpt_cli(["export-hf", str(ckpt), str(tmp_path / "hf"), "--no-tokenizer"]) == 0
    assert "capacity_factor=1.0" in capsys.readouterr().err


def test_transformers_4_is_refused_for_moe(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4.x keeps one module per expert, not the stacked layout we map: one line, both ways."""
    ckpt = _own_checkpoint(tmp_path / "ours")
    _hf_model("mixtral").save_pretrained(tmp_path / "hf")
    # the module now in sys.modules: transformers swaps its lazy module while building models
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.56.0")
    capsys.readouterr()  # save_pretrained's progress bars
    assert ckpt_cli(["export-hf", str(ckpt), str(tmp_path / "out"), "--no-tokenizer"]) == 2
    assert ckpt_cli(["import-hf", str(tmp_path / "hf"), str(tmp_path / "in")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all("transformers>=5" in line for line in lines), lines
