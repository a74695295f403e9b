"""Our parameter names <-> Hugging Face transformers' (GPT2LMHeadModel, LlamaForCausalLM,
MixtralForCausalLM, Qwen2MoeForCausalLM).

The state-dict adapter lives with the model (as torchtitan keeps it): a new model style adds its
map here. Names map one to one, with two differences:
- GPT-2 fuses q, k, v into ``c_attn`` and stores every linear as ``Conv1D`` (in, out), the
  transpose of ``nn.Linear``;
- a tied model has no ``head.weight`` of its own (transformers' state dict still lists
  ``lm_head.weight``, the same tensor as the embedding: it is left out).
- an MoE layer's (model/moe.py) router is HF's ``mlp.gate``; its stacked experts are HF's fused
  ``mlp.experts.gate_up_proj`` (E, 2 ffn, hidden) = [gate; up] and ``mlp.experts.down_proj``
  (E, hidden, ffn), the transposes of our ``w_gate``/``w_in`` (E, hidden, ffn) and ``w_out``
  (E, ffn, hidden) per expert (transformers 5.x holds them so in memory and writes Mixtral's
  ``experts.N.w1/w2/w3`` files itself). Qwen2-MoE's ``shared_expert`` is our ``mlp.shared`` MLP
  and its ``shared_expert_gate`` our ``mlp.shared_gate``.
Vocabulary padding is not handled here (megatron_llm/checkpoint/hf.py pads and trims).
"""

from __future__ import annotations

import torch

from megatron_llm.model.config import ModelConfig

Tensor = torch.Tensor


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


def _moe_layer_map(i: int) -> dict[str, str]:
    """An MoE block's names but the stacked experts (fused separately: _experts_to_hf)."""
    h = f"model.layers.{i}."
    return _layer_map("llama", i) | {
        "mlp.router": h + "mlp.gate",
        "mlp.shared.fc_gate": h + "mlp.shared_expert.gate_proj",
        "mlp.shared.fc_in": h + "mlp.shared_expert.up_proj",
        "mlp.shared.fc_out": h + "mlp.shared_expert.down_proj",
        "mlp.shared_gate": h + "mlp.shared_expert_gate",
    }


def moe_layers(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.num_layers) if cfg.moe.is_moe_layer(i)]


def _top_map(cfg: ModelConfig) -> dict[str, str]:
    if cfg.style == "gpt2":
        return {
            "embed.weight": "transformer.wte.weight",
            "pos_embed.weight": "transformer.wpe.weight",
            "final_norm.weight": "transformer.ln_f.weight",
            "final_norm.bias": "transformer.ln_f.bias",
        }
    top = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        top["head.weight"] = "lm_head.weight"
    return top


def names(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """Our name -> (HF name, transposed) for every parameter but GPT-2's q, k, v."""
    out = {ours: (theirs, False) for ours, theirs in _top_map(cfg).items()}
    for i in range(cfg.num_layers):
        table = _moe_layer_map(i) if cfg.moe.is_moe_layer(i) else _layer_map(cfg.style, i)
        for ours, theirs in table.items():
            conv1d = cfg.style == "gpt2" and not ours.endswith("norm")
            out[f"blocks.{i}.{ours}.weight"] = (f"{theirs}.weight", conv1d)
            out[f"blocks.{i}.{ours}.bias"] = (f"{theirs}.bias", False)
    return out


def _experts_to_hf(weights: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    ours, theirs = f"blocks.{i}.mlp.experts.", f"model.layers.{i}.mlp.experts."
    gate, up = weights[ours + "w_gate"], weights[ours + "w_in"]  # each (E, hidden, ffn)
    return {
        # (E, 2 ffn, hidden): HF's experts run linear(x, gate_up_proj[e]).chunk(2) = gate, up
        theirs + "gate_up_proj": torch.cat([gate, up], dim=2).transpose(1, 2).contiguous(),
        theirs + "down_proj": weights[ours + "w_out"].transpose(1, 2).contiguous(),  # (E, h, ffn)
    }


def _experts_from_hf(state: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    ours, theirs = f"blocks.{i}.mlp.experts.", f"model.layers.{i}.mlp.experts."
    # (E, 2 ffn, hidden) -> (E, hidden, 2 ffn) -> gate, up (E, hidden, ffn)
    gate, up = state[theirs + "gate_up_proj"].transpose(1, 2).chunk(2, dim=2)
    return {
        ours + "w_gate": gate.contiguous(),
        ours + "w_in": up.contiguous(),
        ours + "w_out": state[theirs + "down_proj"].transpose(1, 2).contiguous(),  # (E, ffn, h)
    }


def _fused_qkv(cfg: ModelConfig, name: str) -> bool:
    return cfg.style == "gpt2" and ".attn." in name and name.split(".")[-2] in ("q", "k", "v")


def to_hf(cfg: ModelConfig, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our whole-model state (name -> tensor) as the HF model's state dict."""
    out: dict[str, Tensor] = {}
    table = names(cfg)
    for name, value in weights.items():
        if _fused_qkv(cfg, name) or ".mlp.experts." in name:
            continue  # fused below
        theirs, transpose = table[name]
        out[theirs] = (value.t() if transpose else value).contiguous()
    for i in moe_layers(cfg):
        out |= _experts_to_hf(weights, i)
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
    for ours, (theirs, transpose) in names(cfg).items():
        if theirs in state:
            out[ours] = (state[theirs].t() if transpose else state[theirs]).contiguous()
    for i in moe_layers(cfg):
        out |= _experts_from_hf(state, i)
    if cfg.style == "gpt2":
        for i in range(cfg.num_layers):
            h = f"transformer.h.{i}.attn.c_attn."
            q, k, v = state[h + "weight"].t().chunk(3, dim=0)
            qb, kb, vb = state[h + "bias"].chunk(3)
            for x, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
                out[f"blocks.{i}.attn.{x}.weight"] = w.contiguous()
                out[f"blocks.{i}.attn.{x}.bias"] = b.contiguous()
    return out
