"""Parameter counts per tensor-parallel rank and pipeline stage (no tensors built)."""

from __future__ import annotations

from megatron_llm.model.config import ModelConfig


def block_parameters(cfg: ModelConfig, tp: int) -> int:
    """One block's parameters on one tensor-parallel rank."""
    h, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_hidden_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    split = h * (q + 2 * kv) + q * h + h * f * (3 if cfg.activation == "swiglu" else 2)
    if cfg.bias:  # column-parallel biases split; the row-parallel outputs' are replicated
        split += q + 2 * kv + f * (2 if cfg.activation == "swiglu" else 1)
    replicated = (2 * h if cfg.bias else 0) + 2 * norm_parameters(cfg)
    return split // tp + replicated


def norm_parameters(cfg: ModelConfig) -> int:
    return cfg.hidden_size * (2 if cfg.norm == "layernorm" else 1)


def embedding_parameters(cfg: ModelConfig, vocab: int, tp: int) -> int:
    """The vocab-parallel embedding (or untied head) shard of one tensor-parallel rank."""
    return vocab * cfg.hidden_size // tp


def stage_parameters(
    cfg: ModelConfig, vocab: int, tp: int, pp: int, stage: int | None = None
) -> int:
    """Parameters per tensor-parallel rank of pipeline stage ``stage`` (blocks split uniformly;
    None: the largest stage, the first or the last)."""
    embed = embedding_parameters(cfg, vocab, tp)
    first = embed + (cfg.seq_length * cfg.hidden_size if cfg.position == "learned" else 0)
    # With pipelines and tied embeddings the last stage holds its own copy of the embedding.
    last = norm_parameters(cfg) + (embed if pp > 1 or not cfg.tie_embeddings else 0)
    per_stage = cfg.num_layers // pp * block_parameters(cfg, tp)
    if pp == 1:
        return first + per_stage + last
    if stage is None:
        return max(first, last) + per_stage
    return per_stage + (first if stage == 0 else 0) + (last if stage == pp - 1 else 0)
