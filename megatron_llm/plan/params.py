"""Parameter counts per tensor-parallel (and expert-parallel) rank and pipeline stage (no
tensors built). Block counts come from megatron_llm/model/shape.py, layer by layer: an MoE
block (model.moe) holds E/ep of its routed experts on a rank, a dense block its MLP's tp shard."""

from __future__ import annotations

from megatron_llm.model.config import ModelConfig
from megatron_llm.model.shape import block_parameters, mlp_matrices, norm_parameters

__all__ = [
    "block_parameters",
    "embedding_parameters",
    "dense_and_moe_blocks",
    "expert_parameters",
    "moe_layers",
    "norm_parameters",
    "stage_layers",
    "stage_parameters",
]


def embedding_parameters(cfg: ModelConfig, vocab: int, tp: int) -> int:
    """The vocab-parallel embedding (or untied head) shard of one tensor-parallel rank."""
    return vocab * cfg.hidden_size // tp


def stage_layers(cfg: ModelConfig, pp: int, stage: int) -> range:
    """The blocks of pipeline stage ``stage`` (blocks split uniformly)."""
    per = cfg.num_layers // pp
    return range(stage * per, (stage + 1) * per)


def moe_layers(cfg: ModelConfig, pp: int, stage: int) -> int:
    """How many of stage ``stage``'s blocks are MoE (ModelConfig.moe.is_moe_layer), counted
    without a loop: the search asks this for thousands of layouts of 100+ layer models."""
    moe, layers = cfg.moe, stage_layers(cfg, pp, stage)
    first = max(layers.start, moe.first_dense)
    if not moe.num_experts or first >= layers.stop:
        return 0
    # MoE blocks are first_dense + j * every: count the j in [first, stop)
    return (layers.stop - 1 - moe.first_dense) // moe.every - (
        first - 1 - moe.first_dense
    ) // moe.every


def dense_and_moe_blocks(cfg: ModelConfig, tp: int, ep: int) -> tuple[int, int]:
    """Parameters of a dense block and of an MoE block on one tp (and ep) rank."""
    moe_block = cfg.moe.first_dense if cfg.moe.num_experts else None
    dense = block_parameters(cfg, tp, layer=-1)  # layer -1 is never MoE
    return dense, (
        block_parameters(cfg, tp, layer=moe_block, ep=ep) if moe_block is not None else 0
    )


def expert_parameters(cfg: ModelConfig, pp: int, stage: int, ep: int = 1) -> int:
    """The routed experts' parameters one ep rank holds on stage ``stage``: E/ep experts of
    each MoE layer there. They are reduced and ZeRO-sharded over the expert data-parallel
    group (the ranks holding the same experts), not the whole data-parallel group."""
    moe = cfg.moe
    per_layer = moe.num_experts // ep * mlp_matrices(cfg) * cfg.hidden_size
    return per_layer * moe.expert_ffn_hidden_size * moe_layers(cfg, pp, stage)


def stage_parameters(
    cfg: ModelConfig, vocab: int, tp: int, pp: int, stage: int | None = None, ep: int = 1
) -> int:
    """Parameters per tensor-parallel (and ep) rank of pipeline stage ``stage`` (None: the
    largest stage)."""
    if stage is None:
        return max(stage_parameters(cfg, vocab, tp, pp, s, ep) for s in range(pp))
    embed = embedding_parameters(cfg, vocab, tp)
    first = embed + (cfg.seq_length * cfg.hidden_size if cfg.position == "learned" else 0)
    # With pipelines and tied embeddings the last stage holds its own copy of the embedding.
    last = norm_parameters(cfg) + (embed if pp > 1 or not cfg.tie_embeddings else 0)
    dense, moe = dense_and_moe_blocks(cfg, tp, ep)
    n_moe = moe_layers(cfg, pp, stage)
    blocks = (cfg.num_layers // pp - n_moe) * dense + n_moe * moe
    return blocks + (first if stage == 0 else 0) + (last if stage == pp - 1 else 0)
