"""This rank's part of the model, assembled in one place: meta -> shard -> fill -> pipeline.

1. The single-device GPT is built with its parameters on the meta device (shapes, no memory).
2. ``shard.shard_model`` swaps in the tensor-parallel layers, still on meta.
3. ``shard.materialize`` gives this rank's parameters storage and fills in its slices from whole
   values handed over one parameter at a time: the seeded init (``model.gpt.init_values``) or a
   checkpoint's tensors. Under pipeline parallelism only this stage's layers are filled; the
   others stay on meta. Every layout so starts from the same weights, and no rank ever holds
   more than its part plus the largest single parameter.
4. Under pipeline parallelism the model becomes this rank's stage of a DeepSpeed
   ``PipelineModule`` (parallel/pipeline.py).

The training run (training/run.py), the tests and the benches all build models here, then
hand ``RankModel.module`` to ``parallel.engine.build_engine``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from megatron_llm.checkpoint.state import checked_weights
from megatron_llm.model.gpt import GPT, init_values
from megatron_llm.parallel.context import install_context
from megatron_llm.parallel.groups import ParallelContext
from megatron_llm.parallel.pipeline import build_pipeline, global_names, stage_parameter_names
from megatron_llm.parallel.shard import materialize, shard_model

if TYPE_CHECKING:
    from megatron_llm.config import RunConfig


@dataclasses.dataclass(frozen=True)
class RankModel:
    """This rank's model, as built by :func:`build_model`."""

    # Named as the single-device model; holds this rank's tensor-parallel shards (and under
    # pipeline parallelism, meta parameters for the other stages' layers).
    model: GPT
    # What the engine trains: ``model`` itself, or this rank's pipeline stage of it.
    module: nn.Module
    # The stage's parameter names -> the single-device model's (None without pipelines).
    names: dict[str, str] | None
    parameters: int  # the whole model's parameter count, over every rank


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (shapes, no memory, no
    values) and their buffers as usual (RoPE tables are derived, not trained)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            module._parameters[name] = meta

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def build_model(
    cfg: RunConfig,
    ctx: ParallelContext,
    vocab_size: int,
    weights: Mapping[str, torch.Tensor] | None = None,
    source: str = "",
) -> RankModel:
    """This rank's model for ``cfg`` with ``vocab_size`` embedding rows (already padded), filled
    from ``weights`` (whole tensors by the single-device names; ``source`` names them in errors)
    or, without them, from the seeded init of ``cfg.train.seed``."""
    with parameters_on_meta():
        model = GPT(cfg.model, vocab_size)
    parameters = model.num_parameters()  # the whole model, before this rank keeps its shard
    if weights is None:
        source = f"init from seed {cfg.train.seed}"
        values = init_values(model, cfg.train.seed)  # roles read now, before sharding
    else:
        shapes = {name: p.shape for name, p in model.named_parameters()}
        values = checked_weights(shapes, weights, source)
    model = shard_model(
        model, ctx, sequence_parallel=cfg.parallel.sequence_parallel, seed=cfg.train.seed
    )
    model = install_context(model, cfg, ctx)  # cp: ring attention, positions, loss
    only = stage_parameter_names(model, ctx, cfg) if ctx.pp > 1 else None
    materialize(model, values, ctx, source, only)
    model.checkpoint_every = cfg.train.activation_checkpointing
    if ctx.pp == 1:
        return RankModel(model=model, module=model, names=None, parameters=parameters)
    module = build_pipeline(model, ctx, cfg)
    return RankModel(
        model=model, module=module, names=global_names(model, module), parameters=parameters
    )
