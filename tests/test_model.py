import math

import pytest
import torch

from megatron_llm import kernels
from megatron_llm.model import GPT, ModelConfig


def tiny(style: str, **kw) -> ModelConfig:
    return ModelConfig(style=style, num_layers=2, hidden_size=64, num_heads=4, seq_length=32, **kw)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_logits_shape_and_initial_loss(style):
    torch.manual_seed(0)
    model = GPT(tiny(style), vocab_size=256)
    tokens = torch.randint(0, 256, (3, 32))
    assert model(tokens).shape == (3, 32, 256)
    # A freshly initialised model is close to uniform over the vocabulary.
    labels = torch.randint(0, 256, (3, 32))
    assert abs(model(tokens, labels).item() - math.log(256)) < 0.3


def test_styles_build_the_documented_architecture():
    gpt2 = GPT(tiny("gpt2"), 256)
    assert gpt2.pos_embed is not None and gpt2.head is None  # learned positions, tied head
    assert gpt2.blocks[0].attn_norm.bias is not None and gpt2.blocks[0].mlp.fc_gate is None
    assert gpt2.blocks[0].attn.rotary is None and gpt2.blocks[0].attn.q.bias is not None
    llama = GPT(tiny("llama", num_kv_heads=2), 256)
    assert llama.pos_embed is None and llama.head is not None  # RoPE, untied head
    assert llama.blocks[0].attn_norm.bias is None and llama.blocks[0].mlp.fc_gate is not None
    assert llama.blocks[0].attn.k.weight.shape == (2 * 16, 64)  # grouped-query: 2 kv heads
    assert llama.blocks[0].attn.q.bias is None
    assert llama.cfg.ffn_hidden_size == 192  # 8/3 * 64 rounded up to a multiple of 64


def test_style_defaults_can_be_overridden():
    cfg = tiny("llama", tie_embeddings=True, norm="layernorm")
    model = GPT(cfg, 256)
    assert model.head is None and model.blocks[0].attn_norm.bias is not None


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_causal(style):
    # Changing a later token must not change earlier logits.
    torch.manual_seed(0)
    model = GPT(tiny(style, num_kv_heads=2), 128).eval()
    a = torch.randint(0, 128, (1, 16))
    b = a.clone()
    b[0, 10] = (a[0, 10] + 1) % 128
    la, lb = model(a), model(b)
    torch.testing.assert_close(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_grouped_query_attention_equals_repeated_heads():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 8, 16)
    k, v = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    expected = kernels.causal_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(kernels.causal_attention(q, k, v), expected)


def test_rope_rotates_relative_positions():
    # RoPE's point: q.k depends on the distance between positions, not where they are.
    model = GPT(tiny("llama"), 64)
    rot = model.blocks[0].attn.rotary
    q, k = torch.randn(16), torch.randn(16)

    def score(i: int, j: int) -> float:
        x = torch.zeros(1, 1, 32, 16)
        x[0, 0, i], y = q, torch.zeros(1, 1, 32, 16)
        y[0, 0, j] = k
        return (rot(x)[0, 0, i] @ rot(y)[0, 0, j]).item()

    assert score(5, 2) == pytest.approx(score(20, 17), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def test_norms_match_reference():
    x = torch.randn(4, 64)
    w, b = torch.randn(64), torch.randn(64)
    ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
        x.var(-1, unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(kernels.layer_norm(x, w, b, 1e-5), ref * w + b)
    rms = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), rms)
    assert (
        kernels.layer_norm(x.bfloat16(), w.bfloat16(), b.bfloat16(), 1e-5).dtype == torch.bfloat16
    )


def test_tied_embedding_gets_both_gradients():
    model = GPT(tiny("gpt2"), 64)
    tokens = torch.randint(0, 64, (2, 8))
    model(tokens, tokens).backward()
    unused = torch.ones(64, dtype=torch.bool)
    unused[tokens.unique()] = False
    # Rows of tokens never fed in still get gradient through the output head.
    assert model.embed.weight.grad[unused].abs().sum() > 0


def test_too_long_input_is_refused():
    model = GPT(tiny("gpt2"), 64)
    with pytest.raises(ValueError, match="exceeds model.seq_length=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_activation_checkpointing_recomputes_and_keeps_gradients() -> None:
    """Segments of k blocks run again in backward; losses and gradients stay the same."""
    from megatron_llm.config import load_config

    cfg = load_config(None, ["model.num_layers=4", "model.hidden_size=32", "model.num_heads=4"])
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for every in (0, 1, 2):
        torch.manual_seed(0)
        model = GPT(cfg.model, 64)
        model.checkpoint_every = every
        calls = []
        model.blocks[0].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results.append((len(calls), grads))
    assert [calls for calls, _ in results] == [1, 2, 2]  # recomputed when checkpointed
    for _, grads in results[1:]:
        torch.testing.assert_close(grads, results[0][1], rtol=0, atol=0)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("bias", [True, False])
def test_init_by_role(style, bias):
    from megatron_llm.model.gpt import Init, init_roles, init_values

    cfg = tiny(style, bias=bias, num_kv_heads=2, init_std=0.1)
    model = GPT(cfg, vocab_size=256)
    # Independent reference: GPT-2's rule written by name, as the model once spelled it.
    for name, role in init_roles(model).items():
        if name.endswith("bias"):
            assert role is Init.ZEROS, name
        elif "norm" in name:
            assert role is Init.ONES, name
        elif name.endswith(("attn.out.weight", "mlp.fc_out.weight")):
            assert role is Init.RESIDUAL, name
        else:
            assert role is Init.NORMAL, name
    assert set(init_roles(model)) == {n for n, _ in model.named_parameters()}
    values = dict(init_values(model, 3))
    residual = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    assert values["blocks.1.attn.out.weight"].std().item() == pytest.approx(residual, rel=0.1)
    assert values["blocks.1.mlp.fc_in.weight"].std().item() == pytest.approx(0.1, rel=0.1)
    assert torch.equal(values["final_norm.weight"], torch.ones(cfg.hidden_size))


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("bias", [True, False])
def test_shape_counts_match_the_model(style, bias):
    from megatron_llm.model.shape import block_parameters

    model = GPT(tiny(style, bias=bias, num_kv_heads=2), vocab_size=256)
    assert block_parameters(model.cfg) == sum(p.numel() for p in model.blocks[0].parameters())
