"""Document masking (data.reset_attention_mask, data.reset_position_ids): packed documents do not
attend to each other and their positions restart at 0.

The independent references: Megatron-LM's own get_ltor_masks_and_position_ids (megatron-core's
gpt_dataset) for the ids, and each document run ALONE through the model for the logits and the
loss. Then the layouts: tp=2 (+sp) and pp=2 (with activation checkpointing) give the one-process
losses with the ids carried through every stage.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_llm.config import load_config
from megatron_llm.data.batch import DocumentMasking, document_ids, model_inputs
from megatron_llm.kernels.attention import block_attention
from megatron_llm.kernels.reference import document_causal_mask
from megatron_llm.model import GPT, ModelConfig
from tests.distributed import run_on_ranks
from tests.parallel_runs import EOD, packed_documents, train_documents_layouts

BOTH = DocumentMasking(eod=EOD, reset_attention_mask=True, reset_position_ids=True)


def tiny(style: str) -> ModelConfig:
    kw = {"num_kv_heads": 2} if style == "llama" else {}
    return ModelConfig(style=style, num_layers=2, hidden_size=32, num_heads=4, seq_length=24, **kw)


def _inputs(seed: int = 0) -> torch.Tensor:
    return packed_documents(1, 23, seed)[0]  # (4, 24) packed ids


def test_ids_match_megatron_get_ltor_masks_and_position_ids() -> None:
    gpt_dataset = pytest.importorskip("megatron.core.datasets.gpt_dataset")
    tokens = torch.cat([_inputs(1), torch.tensor([[EOD] * 24])])  # and a row of EODs only
    ids = document_ids(tokens, BOTH)
    for row, segments, positions in zip(tokens, ids["segments"], ids["positions"], strict=True):
        mask, _, want_positions = gpt_dataset._get_ltor_masks_and_position_ids(
            row, EOD, True, True, False, True
        )  # mask: (1, seq, seq), True = masked out
        assert torch.equal(positions, want_positions)
        assert torch.equal(document_causal_mask(segments[None])[0], ~mask)


def test_one_rule_alone() -> None:
    tokens = _inputs(2)
    only_mask = DocumentMasking(eod=EOD, reset_attention_mask=True)
    only_positions = DocumentMasking(eod=EOD, reset_position_ids=True)
    assert set(document_ids(tokens, only_mask)) == {"segments"}
    assert set(document_ids(tokens, only_positions)) == {"positions"}
    inputs, labels, ids = model_inputs(torch.cat([tokens, tokens[:, :1]], 1), BOTH)
    assert torch.equal(inputs, tokens) and torch.equal(
        ids["positions"], document_ids(tokens, BOTH)["positions"]
    )


def _documents(row: torch.Tensor) -> list[torch.Tensor]:
    """The documents of one packed row, each with the EOD that ends it."""
    docs, start = [], 0
    for i, token in enumerate(row.tolist()):
        if token == EOD or i == len(row) - 1:
            docs.append(row[start : i + 1])
            start = i + 1
    return docs


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_packed_documents_equal_each_document_alone(style: str, checkpointed: bool) -> None:
    torch.manual_seed(0)
    model = GPT(tiny(style), 64)
    model.checkpoint_every = 1 if checkpointed else 0  # recompute in backward: ids must follow
    samples = packed_documents(1, 24, seed=3)[0]  # (4, 25)
    inputs, labels, ids = model_inputs(samples, BOTH)
    logits = model(inputs, **ids)  # (4, 24, vocab)
    losses = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (4, 24)
    grads = torch.autograd.grad(losses.sum(), list(model.parameters()))
    alone_grads = [torch.zeros_like(g) for g in grads]
    count = 0
    for b, row in enumerate(inputs):
        at = 0
        for doc in _documents(row):
            n = len(doc)
            alone = model(doc[None])  # positions 0..n-1, no other document
            torch.testing.assert_close(logits[b, at : at + n], alone[0], rtol=1e-5, atol=1e-5)
            loss = F.cross_entropy(alone[0], labels[b, at : at + n], reduction="none")
            torch.testing.assert_close(losses[b, at : at + n], loss, rtol=1e-5, atol=1e-5)
            for acc, g in zip(
                alone_grads, torch.autograd.grad(loss.sum(), list(model.parameters())), strict=True
            ):
                acc += g
            at, count = at + n, count + 1
    assert count > 3 * len(inputs)  # several documents per sample
    for got, want in zip(grads, alone_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _rope_at(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE (rotate-half) of x (batch, heads, seq, d) at positions (batch, seq), in float64."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[..., None] * inv  # (batch, seq, d / 2)
    cos, sin = (f(torch.cat([angles, angles], -1))[:, None] for f in (torch.cos, torch.sin))
    x1, x2 = x.double().chunk(2, -1)
    return (x.double() * cos + torch.cat([-x2, x1], -1) * sin).to(x.dtype)


def test_rope_positions_reach_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under the document mask RoPE's reset is invisible (scores depend on position
    # differences within a document), so check it alone: every layer rotates q and k at the
    # per-document positions, against RoPE computed here from those positions.
    torch.manual_seed(0)
    cfg = tiny("llama")
    model = GPT(cfg, 64)
    samples = packed_documents(1, 24, seed=5)[0]
    only = DocumentMasking(eod=EOD, reset_position_ids=True)
    inputs, _, ids = model_inputs(samples, only)
    assert set(ids) == {"positions"} and ids["positions"].max() < 20
    logits = model(inputs, **ids)
    from megatron_llm.model import gpt

    def rope(self, x, start=0, positions=None):  # the reference, whatever the model passes
        return _rope_at(x, ids["positions"], cfg.rope_theta)

    monkeypatch.setattr(gpt.Rotary, "forward", rope)
    torch.testing.assert_close(logits, model(inputs), rtol=1e-5, atol=1e-5)


def test_sdpa_mask_path_equals_block_attention() -> None:
    # The model's PyTorch path (SDPA with the document-causal mask) against block_attention.
    from megatron_llm import kernels

    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 4, 24, 8, generator=g)
    k, v = torch.randn(4, 2, 24, 8, generator=g), torch.randn(4, 2, 24, 8, generator=g)
    segments = document_ids(_inputs(4), BOTH)["segments"]
    got = kernels.causal_attention(q, k, v, impl="torch", segments=segments)
    want, _ = block_attention(
        q, k, v, q_start=0, k_start=0, causal=True, q_segments=segments, k_segments=segments
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


LAYOUT_RUNS = [
    "train.steps=4",
    "parallel.zero_stage=1",
    "data.reset_attention_mask=true",
    "data.reset_position_ids=true",
]


def _layout(style: str, tp: int = 1, pp: int = 1, ckpt: int = 0, sp: bool = False) -> list[str]:
    style_args = (
        ["model.style=gpt2"]
        if style == "gpt2"
        else ["model.style=llama", "model.num_kv_heads=2", "model.tie_embeddings=false"]
    )
    return [
        *LAYOUT_RUNS,
        *style_args,
        "model.num_layers=4",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"parallel.sequence_parallel={sp}",
        "train.grad_accum_steps=2",
        "train.micro_batch_size=2",
        f"train.activation_checkpointing={ckpt}",
    ]


def test_layouts_with_document_masking_match_one_process() -> None:
    """tp=2 (+sp) and pp=2 (checkpointed, tied and untied) give the one-process losses and
    grad norms with the ids carried; and the ids change the losses (the data packs documents)."""
    off = [a for a in _layout("gpt2") if not a.startswith("data.reset")]
    ref_gpt2, ref_llama, unmasked = run_on_ranks(
        1, train_documents_layouts, [_layout("gpt2"), _layout("llama"), off]
    )[0]
    assert unmasked["losses"][0] != pytest.approx(ref_gpt2["losses"][0], rel=1e-3)
    runs = {
        "tp2-sp llama": (_layout("llama", tp=2, sp=True), ref_llama),
        "pp2-ckpt gpt2": (_layout("gpt2", pp=2, ckpt=1), ref_gpt2),
        "pp2-ckpt llama": (_layout("llama", pp=2, ckpt=1), ref_llama),
    }
    results = run_on_ranks(2, train_documents_layouts, [layout for layout, _ in runs.values()])
    for (name, (_, ref)), got in zip(runs.items(), results[0], strict=True):
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5), name
        assert got["norms"] == pytest.approx(ref["norms"], rel=1e-5), name


def test_eval_cli_applies_the_checkpoints_document_rules(tmp_path, small_shard, bpe_model, capsys):
    # A checkpoint trained on packed documents is evaluated with its rules: the loss of each
    # window is that of its documents alone.
    import json

    import numpy as np

    from megatron_llm.checkpoint.__main__ import write_weights_only
    from megatron_llm.data.indexed import IndexedShard
    from megatron_llm.data.tokenizer import Tokenizer
    from megatron_llm.eval import __main__ as eval_cli

    rules = ["data.reset_attention_mask=true", "data.reset_position_ids=true"]
    model_args = ["model.style=gpt2", "model.num_layers=1", "model.hidden_size=32"]
    model_args += ["model.num_heads=2", "model.seq_length=32", f"data.tokenizer={bpe_model}"]
    cfg = load_config(None, [*model_args, *rules])
    torch.manual_seed(0)
    model = GPT(cfg.model, 512).eval()
    write_weights_only(tmp_path / "ckpt", dict(model.state_dict()), cfg.to_dict())
    argv = [str(tmp_path / "ckpt"), "--data-prefix", small_shard.prefix]  # every window
    assert eval_cli.main([*argv, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["loss"]
    eod = Tokenizer(str(bpe_model)).eod
    shard = IndexedShard(small_shard.prefix)
    stream = np.concatenate([shard[d] for d in range(len(shard))]).astype(np.int64)
    count = (len(stream) - 1) // 32
    windows = torch.stack([torch.from_numpy(stream[i * 32 : i * 32 + 33]) for i in range(count)])
    inputs, labels = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        plain = F.cross_entropy(model(inputs).transpose(1, 2), labels, reduction="none")
        losses, documents = plain.clone(), count  # (windows, 32); a window of one document
        for i in (inputs[:, :-1] == eod).any(1).nonzero().flatten().tolist():
            at, documents = 0, documents - 1
            for end in [*(inputs[i] == eod).nonzero().flatten().tolist(), 31]:
                if end >= at:  # each document alone
                    logits = model(inputs[i : i + 1, at : end + 1])[0]
                    doc = F.cross_entropy(logits, labels[i, at : end + 1], reduction="none")
                    losses[i, at : end + 1] = doc
                    at, documents = end + 1, documents + 1
    assert documents > (len(stream) - 1) // 32  # some windows hold several documents
    want, unmasked = losses.double().mean().item(), plain.double().mean().item()
    # The small shard has few documents, so the rules move the mean by about 3e-6: compared
    # 5x tighter than that (measured: the CLI's batches agree with this loop to 5e-9).
    assert got == pytest.approx(want, rel=2e-7)
    assert abs(unmasked - want) > 5 * 2e-7 * want  # the rules matter here
    # Without its tokenizer the EOD id is unknown: one line, exit 2.
    cfg.data.tokenizer = str(tmp_path / "gone.model")
    write_weights_only(tmp_path / "ckpt2", dict(model.state_dict()), cfg.to_dict())
    assert eval_cli.main([str(tmp_path / "ckpt2"), "--data-prefix", small_shard.prefix]) == 2
    assert "pass --tokenizer" in capsys.readouterr().err


def test_config_fields_parse() -> None:
    cfg = load_config(None, ["data.reset_attention_mask=true", "data.reset_position_ids=true"])
    assert cfg.data.reset_attention_mask and cfg.data.reset_position_ids
