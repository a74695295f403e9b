"""Parameter counts per tensor-parallel rank and pipeline stage (no tensors built)."""

from __future__ import annotations

from megatron_llm.model.config import ModelConfig
from megatron_llm.model.shape import block_parameters, norm_parameters

__all__ = ["block_parameters", "embedding_parameters", "norm_parameters", "stage_parameters"]


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
