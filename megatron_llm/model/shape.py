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
"""

from __future__ import annotations

from megatron_llm.model.config import ModelConfig


def norm_parameters(cfg: ModelConfig) -> int:
    return cfg.hidden_size * (2 if cfg.norm == "layernorm" else 1)


def block_parameters(cfg: ModelConfig, tp: int = 1) -> int:
    """One block's parameters on one tensor-parallel rank (the whole block at tp=1)."""
    h, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    split = h * (q + 2 * kv) + q * h + h * f * (3 if cfg.activation == "swiglu" else 2)
    if cfg.bias:  # column-parallel biases split; the row-parallel outputs' are replicated
        split += q + 2 * kv + f * (2 if cfg.activation == "swiglu" else 1)
    replicated = (2 * h if cfg.bias else 0) + 2 * norm_parameters(cfg)
    return split // tp + replicated


def flops_per_token(cfg: ModelConfig, vocab_size: int) -> float:
    """Model FLOPs to train on one token (see the module docstring for the formula)."""
    h, s = cfg.hidden_size, cfg.seq_length
    h_q, h_kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    m = 3 if cfg.activation == "swiglu" else 2
    per_layer = 2 * h * (h_q + 2 * h_kv) + 2 * h_q * h + 2 * m * h * cfg.ffn_hidden_size
    per_layer += 4 * s * h_q
    return 3.0 * (cfg.num_layers * per_layer + 2 * h * vocab_size)
