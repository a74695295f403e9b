"""Layout-free training state: fp32 tensors by the single-device model's parameter names.

A checkpoint stores, for every parameter of the single-device model, its fp32 value and AdamW's
``exp_avg`` / ``exp_avg_sq`` as boxes of the whole tensor with their global offsets
(shards.py). :func:`held_fragments` says which elements this rank holds: its box by the one
slicing rule (:func:`local_slice`, parallel/layers.py ``local_part``) and, inside it, its
part of DeepSpeed's flat fp32 buffers (the ZeRO partition); each rank writes those and nothing
is gathered. A run at any other layout reads the box it needs (:func:`restore_state`), so
resuming and reshaping are the same operation.

:func:`gather_state` (whole tensors, collective over the stage) is kept for tests and tools
that compare a live engine with a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from megatron_llm.checkpoint import shards
from megatron_llm.checkpoint.errors import CheckpointError
from megatron_llm.parallel.groups import ParallelContext
from megatron_llm.parallel.layers import local_part, whole_of

OPTIM_KEYS = ("exp_avg", "exp_avg_sq")


def _is_deepspeed_managed(p: nn.Parameter) -> bool:
    # ZeRO 3 marks parameters with ds_id; ZeRO 1/2 and the bf16 optimizer link each one to its
    # fp32 fragment through _hp_mapping. ZeRO 0 in fp32 hands the torch optimizer the params.
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _base_optimizer(engine: Any) -> torch.optim.Optimizer:
    # ZeRO and the bf16 optimizer wrap the torch AdamW; plain ZeRO 0 in fp32 hands it over as is.
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer


def _link_optimizer_views(engine: Any) -> None:
    # DeepSpeed 0.19 (ZeRO 1/2, bf16 optimizer) links each parameter to its slice of the flat
    # AdamW state once, right after the first param group's first step, before the other
    # groups have state: their parameters stay unlinked and safe_get_full_optimizer_state
    # fails with "exp_avg not found". Linking again once every group has state fixes it.
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def _masters(engine: Any) -> dict[int, torch.Tensor]:
    """id(model param) -> its fp32 master, for optimizers that keep one master per parameter.

    ZeRO 0 in bf16/fp16 (DeepSpeed's FP16_UnfusedOptimizer) keeps fp32 copies beside the
    16-bit parameters; ZeRO 0 in fp32 optimizes the parameters themselves.
    """
    opt = engine.optimizer
    pairs = zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
    return {id(lp): hp for lps, hps in pairs for lp, hp in zip(lps, hps)}


def _dp_full(
    engine: Any, p: nn.Parameter, key: str | None, masters: dict[int, torch.Tensor]
) -> torch.Tensor:
    """This rank's tp shard of a parameter (key None) or of its optimizer state, whole over dp,
    in fp32 and still on its device: the tp gather that follows is a collective (NCCL takes no
    CPU tensors)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _is_deepspeed_managed(p):
        if key is None:
            value = safe_get_full_fp32_param(p)
        else:
            value = safe_get_full_optimizer_state(p, key)
    else:
        master = masters.get(id(p), p)
        value = master.detach() if key is None else _base_optimizer(engine).state[master][key]
    return value.detach().float()


def _tp_full(value: torch.Tensor, p: nn.Parameter, ctx: ParallelContext) -> torch.Tensor:
    # An offloaded optimizer keeps its state on the CPU; the gather is a device collective.
    return whole_of(value.to(ctx.device), p, ctx)


def local_slice(full: torch.Tensor, p: nn.Parameter, ctx: ParallelContext) -> torch.Tensor:
    """This rank's piece of a whole tensor, as the parameter ``p`` of this layout holds it: the
    one slicing rule (parallel/layers.py), which every checkpoint read and write goes through
    (:func:`owned_box` applies it to a meta tensor to learn the global offsets)."""
    return local_part(full, p, ctx)


def global_shape(p: nn.Parameter, local_shape: tuple[int, ...], ctx: ParallelContext) -> tuple:
    """The single-device shape of ``p`` from its shard's; :func:`owned_box` checks it against
    the slicing rule, so a rule this does not know is refused rather than misread."""
    shape = list(local_shape)
    if ctx.tp > 1 and getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= ctx.tp
    if getattr(ctx, "ep", 1) > 1 and getattr(p, "expert_parallel", False):
        shape[0] *= ctx.ep  # stacked experts: dim 0 is the global expert index
    return tuple(shape)


def owned_box(p: nn.Parameter, local_shape: tuple[int, ...], ctx: ParallelContext) -> shards.Box:
    """The box (global offsets, sizes) of the single-device tensor that ``p`` holds here."""
    shape = global_shape(p, local_shape, ctx)
    box = shards.box_of_view(local_slice(torch.empty(shape, device="meta"), p, ctx), shape)
    if box[1] != tuple(local_shape):
        raise CheckpointError(
            f"checkpoint: a parameter of local shape {tuple(local_shape)} gets a box of sizes "
            f"{box[1]} from the slice rule for the global shape {shape}; teach "
            "checkpoint/state.py global_shape the rule's new case"
        )
    return box


Fetch = Callable[[str | None], torch.Tensor]  # None: the fp32 value; else an AdamW moment


def _fragment(
    engine: Any, p: nn.Parameter, masters: dict[int, torch.Tensor]
) -> tuple[tuple[int, ...], int, int, Fetch]:
    """(local shape, start, stop, fetch): the flat range of ``p``'s local tensor this rank's
    optimizer holds, and a function giving those elements (1-d fp32, on their device)."""
    if hasattr(p, "ds_id"):  # ZeRO 3: ds_tensor is partition r of the flat parameter, padded
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        part = p.ds_tensor.ds_numel
        start = min(engine.optimizer._get_param_partition_rank(p) * part, p.ds_numel)
        stop = min(start + part, p.ds_numel)

        def fetch3(key: str | None) -> torch.Tensor:
            value = (
                safe_get_local_fp32_param(p)
                if key is None
                else safe_get_local_optimizer_state(p, key)
            )
            return value.reshape(-1)[: stop - start]

        return tuple(p.ds_shape), start, stop, fetch3
    if hasattr(p, "_hp_mapping"):  # ZeRO 1/2, bf16: a fragment of the flat fp32 partition
        mapping = p._hp_mapping
        if mapping is None:  # none of p in this rank's partition
            return tuple(p.shape), 0, 0, lambda key: torch.empty(0)
        address = mapping.lp_fragment_address
        return tuple(p.shape), address.start, address.start + address.numel, mapping.get_hp_fragment
    master, base = masters.get(id(p), p), _base_optimizer(engine)

    def fetch0(key: str | None) -> torch.Tensor:
        return (master.detach() if key is None else base.state[master][key]).reshape(-1)

    return tuple(p.shape), 0, p.numel(), fetch0


def held_fragments(
    engine: Any, ctx: ParallelContext, names: Mapping[str, str] | None = None
) -> Iterator[tuple[shards.Held, Fetch]]:
    """What this rank holds of each of its parameters (by the single-device names), and how
    to fetch the elements. Not collective; the optimizer must have its state."""
    _link_optimizer_views(engine)
    masters = _masters(engine)
    for name, p in engine.module.named_parameters():
        local_shape, start, stop, fetch = _fragment(engine, p, masters)
        box = owned_box(p, local_shape, ctx)
        single = (names or {}).get(name, name)
        yield shards.Held(single, global_shape(p, local_shape, ctx), box, start, stop), fetch


def writer_of(index: int, ctx: ParallelContext) -> int:
    """The global rank that writes parameter ``index`` of this rank's pipeline stage."""
    per_stage = ctx.tp * ctx.cp * ctx.dp
    return ctx.pp_rank * per_stage + index % per_stage


def gather_state(
    engine: Any,
    ctx: ParallelContext,
    *,
    optimizer: bool = True,
    names: Mapping[str, str] | None = None,
    to_host: Callable[[torch.Tensor], torch.Tensor] = torch.Tensor.cpu,
) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(name, {"param", "exp_avg", "exp_avg_sq"}) of the parameters this rank writes.

    ``names`` maps the engine's parameter names to the single-device model's (pipeline layers
    are named by position); the checkpoint always uses the latter. ``to_host`` copies a
    gathered tensor to host memory (an asynchronous save passes its pinned, reused buffers).
    Collective over the stage: every rank must exhaust the iterator.
    """
    if optimizer:
        _link_optimizer_views(engine)
    masters = _masters(engine)
    for i, (name, p) in enumerate(engine.module.named_parameters()):
        keys = (None, *OPTIM_KEYS) if optimizer else (None,)
        whole = {k or "param": _tp_full(_dp_full(engine, p, k, masters), p, ctx) for k in keys}
        if writer_of(i, ctx) == ctx.rank:
            # One deliberate device-to-host copy per tensor, after the collectives; only the
            # writer's (the other ranks drop theirs).
            yield (names or {}).get(name, name), {k: to_host(v) for k, v in whole.items()}


def checked_weights(
    shapes: Mapping[str, torch.Size],
    tensors: Mapping[str, torch.Tensor | shards.Stored],
    source: str,
) -> Iterator[tuple[str, torch.Tensor | shards.Stored]]:
    """(name, whole tensor) in the order of ``shapes`` (the single-device model's parameters),
    after checking that the names match and, as each is handed out, its shape. A stored
    tensor (:class:`shards.Stored`) is handed out unread: indexing it reads that box."""
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: parameters do not match this model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); was it saved with another model config?"
        )
    for name, shape in shapes.items():
        value = tensors[name]
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(value.shape)}, this model expects "
                f"{tuple(shape)}"
            )
        # A stored tensor goes out unread: shard.materialize's local_part indexes it, which
        # reads only this rank's box (Stored.__getitem__), and another stage's not at all.
        yield name, value


def load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy whole fp32 tensors into a not-yet-sharded model, checking names and shapes."""
    params = dict(model.named_parameters())
    shapes = {name: p.shape for name, p in params.items()}
    with torch.no_grad():
        for name, value in checked_weights(shapes, tensors, source):
            params[name].copy_(value)


def optimizer_step(engine: Any) -> float:
    """AdamW's own step count (its bias correction), which is not always the training step:
    DeepSpeed's ZeRO-0 bf16/fp16 optimizer takes one zero-gradient step when it is built."""
    steps = [float(s["step"]) for s in _base_optimizer(engine).state.values() if "step" in s]
    return max(steps, default=0.0)


def _ensure_optimizer_state(engine: Any, step: float) -> None:
    # torch's AdamW creates its state on the first step(); a resumed run must hold the state
    # before that first step, so create it (zeros, overwritten below) and let DeepSpeed link its
    # per-parameter views onto the flat fp32 partitions.
    base = _base_optimizer(engine)
    flat = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO 3's masters
    hps = flat if flat is not None else [hp for g in base.param_groups for hp in g["params"]]
    for hp in hps:
        state = base.state[hp]
        for key in OPTIM_KEYS:
            if key not in state:
                state[key] = torch.zeros_like(hp, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(float(step), dtype=torch.float32)
    _link_optimizer_views(engine)


def restore_state(
    engine: Any,
    ctx: ParallelContext,
    tensors: Mapping[str, Any],
    step: float,
    names: Mapping[str, str] | None = None,
    *,
    with_optimizer: bool = True,
) -> None:
    """Set fp32 master weights and, ``with_optimizer``, AdamW state from a checkpoint's
    tensors (``Checkpoint.tensors``: each rank reads only its parameters' boxes); every rank
    calls this.

    The model weights were already loaded before the engine was built (:func:`checked_weights`);
    the fp32 masters are set again here because a bf16 run built them from bf16 weights.
    ``step`` is AdamW's step count to restore (:func:`optimizer_step` of the saving run).
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if with_optimizer:
        _ensure_optimizer_state(engine, step)
    base, masters = _base_optimizer(engine), _masters(engine)
    keys = OPTIM_KEYS if with_optimizer else ()
    for name, p in engine.module.named_parameters():
        entry = tensors[(names or {}).get(name, name)]
        local_shape = tuple(p.ds_shape) if hasattr(p, "ds_id") else tuple(p.shape)
        box = owned_box(p, local_shape, ctx)
        mine = {kind: entry.stored(kind).box(*box) for kind in ("param", *keys)}
        if _is_deepspeed_managed(p):
            safe_set_full_fp32_param(p, mine["param"])
            for key in keys:
                safe_set_full_optimizer_state(p, mine[key], key)
            continue
        master = masters.get(id(p), p)
        with torch.no_grad():
            master.copy_(mine["param"])
        for key in keys:
            base.state[master][key].copy_(mine[key])
