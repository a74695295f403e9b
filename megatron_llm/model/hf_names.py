"""Our parameter names <-> Hugging Face transformers' (GPT2LMHeadModel, LlamaForCausalLM).

The state-dict adapter lives with the model (as torchtitan keeps it): a new model style adds its
map here. Names map one to one, with two differences:
- GPT-2 fuses q, k, v into ``c_attn`` and stores every linear as ``Conv1D`` (in, out), the
  transpose of ``nn.Linear``;
- a tied model has no ``head.weight`` of its own (transformers' state dict still lists
  ``lm_head.weight``, the same tensor as the embedding: it is left out).
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
        for ours, theirs in _layer_map(cfg.style, i).items():
            conv1d = cfg.style == "gpt2" and not ours.endswith("norm")
            out[f"blocks.{i}.{ours}.weight"] = (f"{theirs}.weight", conv1d)
            out[f"blocks.{i}.{ours}.bias"] = (f"{theirs}.bias", False)
    return out


def _fused_qkv(cfg: ModelConfig, name: str) -> bool:
    return cfg.style == "gpt2" and ".attn." in name and name.split(".")[-2] in ("q", "k", "v")


def to_hf(cfg: ModelConfig, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our whole-model state (name -> tensor) as the HF model's state dict."""
    out: dict[str, Tensor] = {}
    table = names(cfg)
    for name, value in weights.items():
        if _fused_qkv(cfg, name):
            continue  # fused below
        theirs, transpose = table[name]
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
    for ours, (theirs, transpose) in names(cfg).items():
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
