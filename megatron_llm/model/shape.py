"""What the model's shape implies, computed from its config without building it: parameter
counts (the planner, megatron_llm/plan) and FLOPs per token (MFU, training/health.py).

A new model style states its counts here, beside the layers they count (model/gpt.py);
tests/test_plan.py checks the counts against a built model of both styles.

Model FLOPs per trained token (forward + backward = 3 x forward; recomputation from activation
checkpointing is not counted, so this is MFU and not hardware utilisation), for L layers,
hidden h, query width h_q = heads x head_dim, key/value width h_kv = kv_heads x head_dim, MLP
width f (with m = 3 matrices for SwiGLU, 2 for GELU), sequence s and padded vocabulary V:

    forward per token = L * [ 2h(h_q + 2 h_kv)      q, k, v projections
                            + 2 h_q h               attention output projection
                            + 2 m h f               MLP
                            + 4 s h_q ]             attention scores QK^T and weighted sum AV
                      + 2 h V                       output head
    training per token = 3 x forward

The attention term counts the full s x s product (as Megatron-LM and PaLM's appendix do), not
the causal half.

Mixture-of-experts layers (model.moe) count only what a token runs through, its ACTIVE
parameters: with E routed experts of width f_e (m_e matrices, no biases), top-k of them and
S shared experts (one dense MLP of width S f_e), the MLP term of such a layer is

    2 h E  (router)  +  2 k m_e h f_e  (routed)  +  2 m h S f_e  (shared)  [+ 2 h: shared gate]

so MFU is measured on active parameters, as Megatron-LM and DeepSeek report it.
"""

from __future__ import annotations

from megatron_llm.model.config import ModelConfig


def norm_parameters(cfg: ModelConfig) -> int:
    return cfg.hidden_size * (2 if cfg.norm == "layernorm" else 1)


def mlp_matrices(cfg: ModelConfig) -> int:
    return 3 if cfg.activation == "swiglu" else 2


def dense_mlp_parameters(cfg: ModelConfig, ffn: int, tp: int = 1) -> int:
    """A dense MLP of width ``ffn`` on one tensor-parallel rank (column-parallel biases split,
    the row-parallel output's replicated)."""
    h = cfg.hidden_size
    split = mlp_matrices(cfg) * h * ffn + (ffn * (mlp_matrices(cfg) - 1) if cfg.bias else 0)
    return split // tp + (h if cfg.bias else 0)


def moe_parameters(cfg: ModelConfig, ep: int = 1, active: bool = False) -> int:
    """One MoE layer's MLP (model/moe.py): router, routed experts (this ep rank's E/ep, or with
    ``active`` the top_k a token runs through), shared experts and their gate. Replicated over
    tp."""
    moe, h = cfg.moe, cfg.hidden_size
    routed = moe.top_k if active else moe.num_experts // ep
    count = h * moe.num_experts + routed * mlp_matrices(cfg) * h * moe.expert_ffn_hidden_size
    if moe.shared_experts:
        count += dense_mlp_parameters(cfg, moe.shared_experts * moe.expert_ffn_hidden_size)
        count += h if moe.shared_expert_gate else 0
    return count


def block_parameters(
    cfg: ModelConfig, tp: int = 1, *, layer: int = 0, ep: int = 1, active: bool = False
) -> int:
    """Block ``layer``'s parameters on one tensor-parallel rank (the whole block at tp=1); an
    MoE block's experts on one ep rank, or only the active ones (see moe_parameters)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    attn = (h * (q + 2 * kv) + q * h + (q + 2 * kv if cfg.bias else 0)) // tp
    attn += (h if cfg.bias else 0) + 2 * norm_parameters(cfg)
    if cfg.moe.is_moe_layer(layer):
        return attn + moe_parameters(cfg, ep, active)
    return attn + dense_mlp_parameters(cfg, cfg.ffn_hidden_size, tp)


def model_parameters(cfg: ModelConfig, vocab_size: int, *, active: bool = False) -> int:
    """The whole model's parameters (tp=ep=1), or those a token runs through with ``active``."""
    h = cfg.hidden_size
    count = vocab_size * h * (1 if cfg.tie_embeddings else 2) + norm_parameters(cfg)
    count += cfg.seq_length * h if cfg.position == "learned" else 0
    return count + sum(block_parameters(cfg, layer=i, active=active) for i in range(cfg.num_layers))


def mlp_flops(cfg: ModelConfig, layer: int) -> float:
    """Forward FLOPs per token of block ``layer``'s MLP: dense, or MoE's active part."""
    h, moe, m = cfg.hidden_size, cfg.moe, mlp_matrices(cfg)
    if not moe.is_moe_layer(layer):
        return 2 * m * h * cfg.ffn_hidden_size
    flops = 2 * h * moe.num_experts + 2 * moe.top_k * m * h * moe.expert_ffn_hidden_size
    flops += 2 * m * h * moe.shared_experts * moe.expert_ffn_hidden_size
    return flops + (2 * h if moe.shared_experts and moe.shared_expert_gate else 0)


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """Model FLOPs to train on one token (see the module docstring for the formula)."""
    h, s = cfg.hidden_size, cfg.seq_length
    h_q, h_kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attention = 2 * h * (h_q + 2 * h_kv) + 2 * h_q * h + 4 * s * h_q
    layers = sum(attention + mlp_flops(cfg, i) for i in range(cfg.num_layers))
    return 3.0 * (layers + 2 * h * vocab_size)
