"""Hugging Face import/export against the real transformers classes (issue 15).

Each check builds a real transformers model from its config (random weights), writes it with
save_pretrained, runs our CLI, and compares logits with the transformers model's own forward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_llm.checkpoint.__main__ import main as ckpt_cli
from megatron_llm.eval.loading import load_model
from tests.data_fixtures import Shard

transformers = pytest.importorskip("transformers")

# meta-llama/Llama-3.2-1B's config.json, shrunk in width and depth (and the rope_scaling
# context in proportion, so that the llama3 scaling acts at test lengths); the features kept:
# tied embeddings, grouped-query attention, llama3 rope_scaling, an explicit head_dim (here
# 32 != hidden 64 / 4 heads), rope_theta 500000, its 128256-token vocabulary.
LLAMA_3_2_1B = dict(
    vocab_size=128256,
    hidden_size=64,  # 2048
    intermediate_size=96,  # 8192
    num_hidden_layers=2,  # 16
    num_attention_heads=4,  # 32
    num_key_value_heads=2,  # 8
    head_dim=32,  # 64
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,  # 8192
    },
    tie_word_embeddings=True,
    hidden_act="silu",
    bos_token_id=128000,
    eos_token_id=128001,
)
# GPT-2 (openai-community/gpt2) shrunk; its 50257-token vocabulary is not a multiple of 128.
GPT2 = dict(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=4)
SEQ = 32  # positions compared (and model.seq_length of the imports)


def _hf_model(kind: str, **changes: Any) -> Any:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(**(GPT2 | changes))
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(**(LLAMA_3_2_1B | changes))
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from one, so that a swapped norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _import(hf_dir: Path, out: Path, *overrides: str) -> Path:
    assert (
        ckpt_cli(["import-hf", str(hf_dir), str(out), f"model.seq_length={SEQ}", *overrides]) == 0
    )
    return out / "global_step0"


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _max_diff(ours: torch.nn.Module, theirs: Any, vocab: int) -> float:
    tokens = _tokens(vocab)
    with torch.no_grad():
        return (ours(tokens)[..., :vocab] - theirs(tokens).logits).abs().max().item()


@pytest.mark.parametrize(
    "kind,changes",
    [
        ("llama", {}),  # Llama-3.2-1B-shaped: tied, llama3 rope, explicit head_dim
        ("llama", {"tie_word_embeddings": False, "rope_scaling": None, "head_dim": 16}),
        ("llama", {"attention_bias": True, "mlp_bias": True, "vocab_size": 1000}),
        ("gpt2", {}),
    ],
    ids=["llama3.2-shaped", "llama-untied-plain-rope", "llama-bias-vocab1000", "gpt2-50257"],
)
def test_import_then_export_is_exact(tmp_path: Path, kind: str, changes: dict) -> None:
    """HF -> ours: logits within 1e-5 (vocabulary padded); ours -> HF: the same tensors."""
    theirs = _hf_model(kind, **changes)
    theirs.save_pretrained(tmp_path / "hf")
    ckpt = _import(tmp_path / "hf", tmp_path / "ours")
    loaded = load_model(str(ckpt))
    vocab = theirs.config.vocab_size
    rows = loaded.model.embed.weight.shape[0]
    assert rows % 128 == 0 and rows - 128 < vocab <= rows  # padded as training builds it
    assert _max_diff(loaded.model, theirs, vocab) < 1e-5
    assert ckpt_cli(["export-hf", str(ckpt), str(tmp_path / "back"), "--no-tokenizer"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    assert type(back) is type(theirs)
    assert back.config.vocab_size == vocab  # the padding trimmed again
    for field in ("tie_word_embeddings", "head_dim", "rope_scaling", "rope_parameters"):
        assert getattr(back.config, field, None) == getattr(theirs.config, field, None), field
    expected = theirs.state_dict()
    got = back.state_dict()
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        if not name.endswith("attn.bias"):  # GPT-2's causal-mask buffer
            assert torch.equal(got[name], value), name


REFUSED = [
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ("gpt2", {"scale_attn_weights": False}, "scale_attn_weights"),
    ("gpt2", {"activation_function": "relu"}, "activation_function"),
    ("gpt2", {"tie_word_embeddings": False}, "tie_word_embeddings"),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "'linear'"),
    ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
]


@pytest.mark.parametrize("kind,changes,field", REFUSED, ids=[r[2] for r in REFUSED])
def test_unsupported_fields_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, kind: str, changes: dict, field: str
) -> None:
    config = _hf_model(kind, vocab_size=256).config
    for key, value in changes.items():
        setattr(config, key, value)
    if kind == "llama" and "rope_scaling" in changes:
        config.rope_parameters = changes["rope_scaling"] | {"rope_theta": 10000.0}
    config.save_pretrained(tmp_path / "hf")
    assert ckpt_cli(["import-hf", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and field in err and err.count("\n") == 1, err
    assert not (tmp_path / "ours").exists()


def test_own_tied_llama_exports_and_imports(tmp_path: Path) -> None:
    """Our tied Llama -> HF -> ours: the tied head is not an extra tensor either way."""
    theirs = _hf_model("llama", rope_scaling=None, head_dim=16)
    theirs.save_pretrained(tmp_path / "hf")
    first = _import(tmp_path / "hf", tmp_path / "a")
    assert "head.weight" not in load_model(str(first)).model.state_dict()
    assert ckpt_cli(["export-hf", str(first), str(tmp_path / "hf2"), "--no-tokenizer"]) == 0
    second = _import(tmp_path / "hf2", tmp_path / "b")
    a, b = load_model(str(first)).model.state_dict(), load_model(str(second)).model.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)


def train_imported(runs: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
    """The real training loop from each imported checkpoint (its config.yaml is the run's)."""
    import torch.distributed as dist

    from megatron_llm.config import load_config
    from megatron_llm.parallel.groups import build_context
    from megatron_llm.training.loop import train

    out = []
    for ckpt, overrides in runs:
        cfg = load_config(f"{ckpt}/config.yaml", [f"checkpoint.resume={ckpt}", *overrides])
        out.append(train(cfg, build_context(cfg.parallel)))
        dist.barrier()
    return out


def _run_args(work: Path, shard: Shard, tokenizer: Path) -> list[str]:
    return [
        f"data.prefixes=[{shard.prefix}]",
        f"data.tokenizer={tokenizer}",
        f"data.cache_dir={work}/cache",
        f"checkpoint.dir={work}/checkpoints",
        f"logging.dir={work}",
        "train.steps=2",
        "train.micro_batch_size=2",
        "eval.at_end=false",
        "checkpoint.keep_last=0",
        "optim.warmup_steps=1",
        "optim.lr=1e-3",
    ]


def test_train_from_imports_and_export(tmp_path: Path, email_shard: Shard, bpe_model: Path) -> None:
    """HF -> ours -> train 2 steps -> HF, for the Llama-3.2-1B-shaped model and GPT-2's 50257
    vocabulary: training starts from the imported weights and the export's logits equal ours."""
    from tests.distributed import run_on_ranks

    runs, models = [], {}
    for kind in ("llama", "gpt2"):
        models[kind] = _hf_model(kind)
        models[kind].save_pretrained(tmp_path / kind / "hf")
        args = _run_args(tmp_path / kind, email_shard, bpe_model)
        ckpt = _import(tmp_path / kind / "hf", tmp_path / kind / "import", *args)
        runs.append((str(ckpt), [f"checkpoint.dir={tmp_path / kind}/checkpoints"]))
    summaries = run_on_ranks(1, train_imported, runs)[0]
    for (kind, theirs), summary in zip(models.items(), summaries):
        assert summary["first_step"] == 1 and len(summary["losses"]) == 2, summary
        trained = load_model(summary["checkpoint"])
        out = tmp_path / kind / "exported"
        assert ckpt_cli(["export-hf", summary["checkpoint"], str(out)]) == 0
        back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        vocab = theirs.config.vocab_size
        assert back.config.vocab_size == vocab
        assert _max_diff(trained.model, back.eval(), vocab) < 1e-5
        # Trained from the imported weights, not a fresh init: two AdamW steps of lr 1e-3 move
        # each weight by about 2e-3 at most (a fresh init differs by 0.5 in the norms alone).
        start, end = theirs.state_dict(), back.state_dict()
        moved = max((end[n] - start[n]).abs().max().item() for n in end if n in start)
        assert 0 < moved < 5e-3, moved
