"""Hugging Face transformers conversion: GPT2LMHeadModel and LlamaForCausalLM, both ways.

Our parameter names map one to one, with two differences:
- GPT-2 fuses q, k, v into ``c_attn`` and stores every linear as ``Conv1D`` (in, out), the
  transpose of ``nn.Linear``;
- the vocabulary keeps our padded size (the extra rows are never produced by the tokenizer), so
  a round trip gives back the same tensors.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_llm.model.config import ModelConfig

Tensor = torch.Tensor


class ConversionError(ValueError):
    """A model that the target format cannot express, with the field that stops it."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConversionError(message)


def hf_config(cfg: ModelConfig, vocab_size: int, eod: int | None = None) -> Any:
    import transformers

    if cfg.style == "gpt2":
        _require(cfg.norm == "layernorm", f"GPT-2 needs model.norm=layernorm, not {cfg.norm}")
        _require(cfg.activation == "gelu", f"GPT-2 needs gelu, not {cfg.activation}")
        _require(cfg.position == "learned", f"GPT-2 needs learned positions, not {cfg.position}")
        _require(bool(cfg.bias), "GPT-2 needs model.bias=true")
        _require(bool(cfg.tie_embeddings), "GPT-2 needs model.tie_embeddings=true")
        _require(cfg.num_kv_heads == cfg.num_heads, "GPT-2 has no grouped-query attention")
        return transformers.GPT2Config(
            vocab_size=vocab_size,
            n_positions=cfg.seq_length,
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.ffn_hidden_size,
            activation_function="gelu_new",  # the tanh approximation, as our MLP
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            bos_token_id=eod,
            eos_token_id=eod,
        )
    _require(cfg.norm == "rmsnorm", f"Llama needs model.norm=rmsnorm, not {cfg.norm}")
    _require(cfg.activation == "swiglu", f"Llama needs swiglu, not {cfg.activation}")
    _require(cfg.position == "rope", f"Llama needs rope, not {cfg.position}")
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        attention_bias=bool(cfg.bias),
        mlp_bias=bool(cfg.bias),
        tie_word_embeddings=bool(cfg.tie_embeddings),
        bos_token_id=eod,
        eos_token_id=eod,
    )


def _layer_map(style: str, i: int) -> dict[str, str]:
    """Our name suffix -> HF name, for block i (weights and biases; GPT-2's qkv apart)."""
    if style == "gpt2":
        h = f"transformer.h.{i}."
        return {
            "attn_norm": h + "ln_1",
            "attn.out": h + "attn.c_proj",
            "mlp_norm": h + "ln_2",
            "mlp.fc_in": h + "mlp.c_fc",
            "mlp.fc_out": h + "mlp.c_proj",
        }
    h = f"model.layers.{i}."
    return {
        "attn_norm": h + "input_layernorm",
        "attn.q": h + "self_attn.q_proj",
        "attn.k": h + "self_attn.k_proj",
        "attn.v": h + "self_attn.v_proj",
        "attn.out": h + "self_attn.o_proj",
        "mlp_norm": h + "post_attention_layernorm",
        "mlp.fc_gate": h + "mlp.gate_proj",
        "mlp.fc_in": h + "mlp.up_proj",
        "mlp.fc_out": h + "mlp.down_proj",
    }


def _top_map(style: str) -> dict[str, str]:
    if style == "gpt2":
        return {
            "embed.weight": "transformer.wte.weight",
            "pos_embed.weight": "transformer.wpe.weight",
            "final_norm.weight": "transformer.ln_f.weight",
            "final_norm.bias": "transformer.ln_f.bias",
        }
    return {
        "embed.weight": "model.embed_tokens.weight",
        "final_norm.weight": "model.norm.weight",
        "head.weight": "lm_head.weight",
    }


def _names(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """Our name -> (HF name, transposed) for every parameter but GPT-2's q, k, v."""
    out = {ours: (theirs, False) for ours, theirs in _top_map(cfg.style).items()}
    for i in range(cfg.num_layers):
        for ours, theirs in _layer_map(cfg.style, i).items():
            conv1d = cfg.style == "gpt2" and not ours.endswith("norm")
            out[f"blocks.{i}.{ours}.weight"] = (f"{theirs}.weight", conv1d)
            out[f"blocks.{i}.{ours}.bias"] = (f"{theirs}.bias", False)
    return out


def to_hf(cfg: ModelConfig, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our whole-model state (name -> tensor) as the HF model's state dict."""
    out: dict[str, Tensor] = {}
    names = _names(cfg)
    for name, value in weights.items():
        if cfg.style == "gpt2" and ".attn." in name and name.split(".")[-2] in ("q", "k", "v"):
            continue  # fused below
        theirs, transpose = names[name]
        out[theirs] = (value.t() if transpose else value).contiguous()
    if cfg.style == "gpt2":
        for i in range(cfg.num_layers):
            a = f"blocks.{i}.attn."
            h = f"transformer.h.{i}.attn.c_attn."
            qkv = [weights[f"{a}{x}.weight"] for x in "qkv"]  # each (hidden, hidden)
            out[h + "weight"] = torch.cat(qkv, dim=0).t().contiguous()  # Conv1D: (in, 3 * out)
            out[h + "bias"] = torch.cat([weights[f"{a}{x}.bias"] for x in "qkv"])
    return out


def from_hf(cfg: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`to_hf`: an HF state dict as our whole-model state."""
    out: dict[str, Tensor] = {}
    for ours, (theirs, transpose) in _names(cfg).items():
        if theirs in state:
            out[ours] = (state[theirs].t() if transpose else state[theirs]).contiguous()
    if cfg.style == "gpt2":
        for i in range(cfg.num_layers):
            h = f"transformer.h.{i}.attn.c_attn."
            q, k, v = state[h + "weight"].t().chunk(3, dim=0)
            qb, kb, vb = state[h + "bias"].chunk(3)
            for x, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
                out[f"blocks.{i}.attn.{x}.weight"] = w.contiguous()
                out[f"blocks.{i}.attn.{x}.bias"] = b.contiguous()
    return out


def model_fields(hf: Any) -> dict[str, Any]:
    """Our ``model`` section for an HF config (GPT-2 or Llama)."""
    if hf.model_type == "gpt2":
        _require(
            hf.activation_function in ("gelu_new", "gelu_pytorch_tanh"),
            f"GPT-2 activation {hf.activation_function!r}: only the tanh gelu is supported",
        )
        return {
            "style": "gpt2",
            "num_layers": hf.n_layer,
            "hidden_size": hf.n_embd,
            "num_heads": hf.n_head,
            "num_kv_heads": hf.n_head,
            "ffn_hidden_size": hf.n_inner or 4 * hf.n_embd,
            "seq_length": hf.n_positions,
            "vocab_size": hf.vocab_size,
            "norm_eps": hf.layer_norm_epsilon,
        }
    _require(hf.model_type == "llama", f"model_type {hf.model_type!r}: expected gpt2 or llama")
    _require(hf.hidden_act == "silu", f"Llama hidden_act {hf.hidden_act!r}: expected silu")
    rope = getattr(hf, "rope_parameters", None) or {}
    _require(
        rope.get("rope_type", "default") == "default",
        f"rope_type {rope.get('rope_type')!r}: only plain RoPE is supported",
    )
    _require(
        hf.attention_bias == getattr(hf, "mlp_bias", False),
        "attention_bias and mlp_bias differ; our model has one model.bias",
    )
    return {
        "style": "llama",
        "num_layers": hf.num_hidden_layers,
        "hidden_size": hf.hidden_size,
        "num_heads": hf.num_attention_heads,
        "num_kv_heads": hf.num_key_value_heads,
        "ffn_hidden_size": hf.intermediate_size,
        "seq_length": hf.max_position_embeddings,
        "vocab_size": hf.vocab_size,
        "norm_eps": hf.rms_norm_eps,
        "rope_theta": float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
        "bias": bool(hf.attention_bias),
        "tie_embeddings": bool(hf.tie_word_embeddings),
    }
