"""Training runs for the parallel tests, executed on spawned gloo ranks.

A spawn costs seconds of imports per rank, so one spawn trains several layouts in sequence
on the same ranks; each layout builds its own groups and its own DeepSpeed engine.
"""

from __future__ import annotations

from typing import Any

import torch

# The tiny model and schedule every multi-rank test trains (also tests/checkpoint_runs.py).
TINY_MODEL = [
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_heads=4",
    "model.seq_length=16",
    "optim.warmup_steps=2",
    "optim.lr=1e-2",
]
BASE = [*TINY_MODEL, "train.steps=20"]
STYLES = {
    "gpt2": ["model.style=gpt2"],  # learned positions, tied head, LayerNorm, biases
    "llama": ["model.style=llama", "model.num_kv_heads=2"],  # RoPE, GQA, untied, RMSNorm
}
VOCAB = 64
GLOBAL_BATCH = 4


def layout(style: str, tp: int = 1, dp: int = 1, zero: int = 0, sp: bool = False, **kw) -> list:
    micro = GLOBAL_BATCH // dp
    extra = [f"{k.replace('__', '.')}={v}" for k, v in kw.items()]
    return [
        *STYLES[style],
        f"parallel.tp={tp}",
        f"parallel.dp={dp}",
        f"parallel.zero_stage={zero}",
        f"parallel.sequence_parallel={sp}",
        f"train.micro_batch_size={micro}",
        *extra,
    ]


def held_bytes(engine: Any) -> int:
    """Bytes of parameters and optimizer state this rank holds (shared storage counted once)."""
    tensors = []
    for p in engine.module.parameters():
        tensors.append(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
    opt = engine.optimizer
    for flat in getattr(opt, "fp32_partitioned_groups_flat", []):
        tensors.append(flat)
    inner = getattr(opt, "optimizer", opt)
    for state in inner.state.values():
        tensors += [t for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def train_layouts(layouts: list[list[str]], measure_memory: bool = False) -> list[dict]:
    return [train_layout(overrides, measure_memory) for overrides in layouts]


def dropout_streams() -> dict:
    """Dropout masks on a tp=2 group: the default stream and the forked (split-tensor) one."""
    import torch.nn.functional as F

    from megatron_llm.config import load_config
    from megatron_llm.parallel.build import build_model
    from megatron_llm.parallel.groups import build_context
    from megatron_llm.parallel.random import TensorParallelRNG
    from megatron_llm.training.run import seed_everything

    cfg = load_config(
        None, BASE + layout("gpt2", tp=2, model__dropout=0.2, model__attention_dropout=0.2)
    )
    ctx = build_context(cfg.parallel)
    rng = TensorParallelRNG(TensorParallelRNG.seed_for(cfg.train.seed, ctx.tp_rank, ctx.dp_rank))
    ones = torch.ones(4096)
    seed_everything(7)
    with rng.fork():
        split = F.dropout(ones, 0.5)
    replicated = F.dropout(ones, 0.5)
    seed_everything(7)
    unforked = F.dropout(ones, 0.5)  # the fork must not have advanced the default stream
    # The whole model with dropout everywhere: the replicated residual stream entering the
    # final norm must stay identical across the tp group.
    model = build_model(cfg, ctx, VOCAB).model
    seed_everything(cfg.train.seed + 1)
    seen: dict[str, torch.Tensor] = {}
    model.final_norm.register_forward_hook(lambda m, i, o: seen.setdefault("x", i[0].detach()))
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model(tokens, tokens).backward()
    return {
        "split": split.numpy().copy(),
        "replicated": replicated.numpy().copy(),
        "unforked": unforked.numpy().copy(),
        "residual": seen["x"].numpy().copy(),
    }


def meta_shards(overrides: list[str]) -> dict:
    """This rank's shards built as training builds them (meta, sharded, then filled from whole
    values one at a time) and as a whole model sharded: both, and what materialize was handed."""
    from megatron_llm.config import load_config
    from megatron_llm.model import GPT, gpt
    from megatron_llm.parallel import build
    from megatron_llm.parallel.groups import build_context
    from megatron_llm.parallel.shard import shard_model
    from megatron_llm.training.run import seed_everything

    cfg = load_config(None, BASE + overrides)
    ctx = build_context(cfg.parallel)
    sp = cfg.parallel.sequence_parallel
    seed_everything(cfg.train.seed)
    seeded = torch.get_rng_state()
    whole = shard_model(GPT(cfg.model, VOCAB), ctx, sequence_parallel=sp, seed=cfg.train.seed)
    rng_untouched = torch.equal(seeded, torch.get_rng_state())
    seed_everything(cfg.train.seed)
    largest, draw = 0, gpt.init_values

    def values(model, seed):  # what the builder hands materialize, measured
        drawn = draw(model, seed)  # reads the unsharded model now, as the builder's call does

        def measured():
            nonlocal largest
            for name, value in drawn:
                largest = max(largest, value.numel())
                yield name, value

        return measured()

    build.init_values = values
    try:
        built = build.build_model(cfg, ctx, VOCAB)
    finally:
        build.init_values = draw
    meta = built.model
    return {
        "whole": {n: p.detach().numpy().copy() for n, p in whole.named_parameters()},
        "meta": {n: p.detach().numpy().copy() for n, p in meta.named_parameters()},
        "shard_numel": sum(p.numel() for p in meta.parameters()),
        "whole_numel": built.parameters,
        "largest_value": largest,
        "rng_untouched": rng_untouched and torch.equal(seeded, torch.get_rng_state()),
    }


def train_layout(overrides: list[str], measure_memory: bool = False) -> dict:
    """20 steps on a fixed token stream: losses, grad norms, step-1 gradients of my shards."""
    from deepspeed.utils import safe_get_full_grad

    from megatron_llm.config import load_config
    from megatron_llm.parallel.build import build_model
    from megatron_llm.parallel.engine import build_engine
    from megatron_llm.parallel.groups import build_context, mean_over_dp
    from megatron_llm.training.loop import local_grad_norm, train_step
    from megatron_llm.training.run import seed_everything

    cfg = load_config(None, BASE + overrides)
    ctx = build_context(cfg.parallel)
    engine = build_engine(build_model(cfg, ctx, VOCAB).module, cfg, ctx)
    seed_everything(cfg.train.seed + 1 + ctx.dp_rank)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (2, GLOBAL_BATCH, cfg.model.seq_length + 1), generator=gen)
    micro = cfg.train.micro_batch_size
    out: dict[str, Any] = {"tp_rank": ctx.tp_rank, "tp": ctx.tp, "losses": [], "norms": []}
    for step in range(cfg.train.steps):
        mine = data[step % 2].view(ctx.dp, micro, -1)[ctx.dp_rank]  # (micro, seq + 1)
        if step > 0:
            loss, norm = train_step(engine, iter([mine]), 1, ctx.tp_group)
        else:  # the same step, opened up to read the gradients before step() clears them
            loss = engine(mine[:, :-1], mine[:, 1:])
            engine.backward(loss)
            out["grads"], out["dims"] = {}, {}
            for name, p in engine.module.named_parameters():
                # numpy, not torch: tensors would cross the result queue as shared memory
                # that vanishes when the rank exits
                out["grads"][name] = safe_get_full_grad(p).detach().float().numpy().copy()
                out["dims"][name] = getattr(p, "partition_dim", None)
            norm = local_grad_norm(engine, ctx.tp_group)
            engine.step()
            if engine.get_global_grad_norm() is not None:
                norm = float(engine.get_global_grad_norm())
            loss = loss.detach()
        out["losses"].append(mean_over_dp(loss, ctx))
        out["norms"].append(norm)
    if measure_memory:
        out["held_bytes"] = held_bytes(engine)
    return out


# Mixture of experts (tests/test_moe_parallel.py): a tiny MoE every layer, aux and z-loss on,
# one shared expert.
MOE_MODEL = [
    "model.moe.num_experts=4",
    "model.moe.top_k=2",
    "model.moe.aux_loss_coeff=0.01",
    "model.moe.z_loss_coeff=0.001",
    "model.moe.shared_experts=1",  # a dense MLP beside the routed experts: split over tp
    "train.steps=3",
]


def moe_layouts(layouts: list[list[str]]) -> list[dict]:
    return [moe_layout(overrides) for overrides in layouts]


def moe_layout(overrides: list[str]) -> dict:
    """train.steps steps of a tiny MoE on the fixed token stream of train_layout, micro-batch by
    micro-batch: per-step mean loss and grad norm, each micro-batch's router statistics by
    global micro-batch index (dp_rank x accum + k), and step 0's gradients of the expert rows
    and routers this rank holds (read before step() clears them; not under pipelines)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.utils import safe_get_full_grad

    from megatron_llm.config import load_config
    from megatron_llm.model.moe import moe_stats
    from megatron_llm.parallel.build import build_model
    from megatron_llm.parallel.engine import build_engine
    from megatron_llm.parallel.groups import build_context, mean_over_dp
    from megatron_llm.training.loop import local_grad_norm, train_step
    from megatron_llm.training.run import seed_everything

    cfg = load_config(None, [*BASE, *MOE_MODEL, *overrides])
    ctx = build_context(cfg.parallel)
    built = build_model(cfg, ctx, VOCAB)
    engine = build_engine(built.module, cfg, ctx)
    seed_everything(cfg.train.seed + 1 + ctx.dp_rank)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (2, GLOBAL_BATCH, cfg.model.seq_length + 1), generator=gen)
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    out: dict[str, Any] = {"tp_rank": ctx.tp_rank, "tp": ctx.tp, "losses": [], "norms": []}
    out["stats"] = {}
    out["grads"] = {}
    pipelined = isinstance(engine, PipelineEngine)

    def record(step: int, index: int) -> None:
        for name, s in moe_stats(built.model, reset=True).items():
            out["stats"][(step, index, name)] = {
                "aux": float(s.aux_loss),
                "z": float(s.z_loss),
                "dropped": int(s.dropped),
                "tokens": s.tokens_per_expert.numpy().copy(),
            }

    for step in range(cfg.train.steps):
        mine = data[step % 2].view(ctx.dp, accum, micro, -1)[ctx.dp_rank]  # (accum, micro, s+1)
        if pipelined:
            loss, norm = train_step(engine, iter(mine), accum, ctx.tp_group)
            record(step, ctx.dp_rank * accum + accum - 1)
            out["losses"].append(mean_over_dp(loss, ctx))
            out["norms"].append(norm)
            continue
        total, norm = 0.0, None
        for k in range(accum):
            loss = engine(mine[k, :, :-1], mine[k, :, 1:])
            record(step, ctx.dp_rank * accum + k)
            engine.backward(loss)
            if k == accum - 1:
                if step == 0:
                    out["grads"] = _expert_grads(built.model, safe_get_full_grad)
                if engine.zero_optimization_stage() == 0:
                    norm = local_grad_norm(engine, ctx.tp_group)
            engine.step()
            total += float(loss.detach()) / accum
        if engine.get_global_grad_norm() is not None:
            norm = float(engine.get_global_grad_norm())
        out["losses"].append(mean_over_dp(torch.tensor(total), ctx))
        out["norms"].append(norm)
    return out


def _expert_grads(model: torch.nn.Module, full_grad: Any) -> dict[str, tuple[int, Any, Any]]:
    """(global index of row 0, tp partition_dim or None, gradient) of each expert weight and
    router on this rank."""
    grads = {}
    for module_name, module in model.named_modules():
        if hasattr(module, "router") and hasattr(module, "experts"):
            grads[f"{module_name}.router.weight"] = (0, module.router.weight)
            for key, p in module.experts.named_parameters():
                grads[f"{module_name}.experts.{key}"] = (module.experts.expert_offset, p)
    return {
        name: (
            offset,
            getattr(p, "partition_dim", None),
            full_grad(p).detach().float().numpy().copy(),
        )
        for name, (offset, p) in grads.items()
    }


EOD = 0  # the document runs' end-of-document id (tests/test_document_mask.py)


def packed_documents(steps: int, seq_length: int, seed: int = 0) -> torch.Tensor:
    """(steps, GLOBAL_BATCH, seq + 1) token ids in 1..VOCAB-1 with an EOD about every 5 tokens:
    every sample packs several documents."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(1, VOCAB, (steps, GLOBAL_BATCH, seq_length + 1), generator=gen)
    ends = torch.rand(data.shape, generator=gen) < 0.2
    return data.masked_fill(ends, EOD)


def train_documents(overrides: list[str]) -> dict:
    """Steps of the real train_step with the run's document masking (EOD = 0) on packed
    samples, at any layout (pp and cp included): per-step losses and grad norms."""
    from megatron_llm.config import load_config
    from megatron_llm.data.batch import document_masking
    from megatron_llm.parallel.build import build_model
    from megatron_llm.parallel.engine import build_engine
    from megatron_llm.parallel.groups import build_context, mean_over_dp
    from megatron_llm.training.loop import train_step
    from megatron_llm.training.run import seed_everything

    cfg = load_config(None, BASE + overrides)
    ctx = build_context(cfg.parallel)
    built = build_model(cfg, ctx, VOCAB)
    engine = build_engine(built.module, cfg, ctx)
    seed_everything(cfg.train.seed + 1 + ctx.dp_rank)
    accum, micro = cfg.train.grad_accum_steps, cfg.train.micro_batch_size
    data = packed_documents(cfg.train.steps, cfg.model.seq_length)
    masking = document_masking(cfg.data, EOD)
    out: dict[str, Any] = {"losses": [], "norms": []}
    for step in range(cfg.train.steps):
        mine = data[step].view(ctx.dp, accum, micro, -1)[ctx.dp_rank]  # (accum, micro, seq+1)
        # the cp ring (None at cp=1) cuts each micro-batch into this rank's chunks
        loss, norm = train_step(
            engine, iter(mine), accum, ctx.tp_group, masking, built.model.context
        )
        out["losses"].append(mean_over_dp(loss, ctx))
        out["norms"].append(norm)
    return out


def train_documents_layouts(layouts: list[list[str]]) -> list[dict]:
    return [train_documents(overrides) for overrides in layouts]


def dispatch_cases(cases: list[list[list[int]]]) -> list[dict]:
    """The all-to-all dispatcher on the world group, one case at a time: case[r] is rank r's
    tokens per global expert. Rank r's token i is the row r * 1000 + i (hidden 3). Each
    dispatched row is scaled by 1 + its global expert before combine, so a row sent to the
    wrong expert or brought back to the wrong place shows; the gradient of sum(out * w) w.r.t.
    the tokens must come back through the reverse all-to-all."""
    import torch.distributed as dist

    from megatron_llm.parallel.experts import AllToAllDispatcher

    rank, ep = dist.get_rank(), dist.get_world_size()
    results = []
    for case in cases:
        counts = torch.tensor(case[rank])
        n = int(counts.sum())
        local = counts.numel() // ep
        tokens = (rank * 1000 + torch.arange(n, dtype=torch.float32)).unsqueeze(1).repeat(1, 3)
        tokens.requires_grad_(True)
        dispatcher = AllToAllDispatcher(dist.group.WORLD, ep)
        mine, per_local = dispatcher.dispatch(tokens, counts)
        # (received, 3) sorted by local expert: scale by 1 + global expert
        expert = torch.repeat_interleave(torch.arange(local), per_local) + rank * local
        out = dispatcher.combine(mine * (1 + expert).unsqueeze(1).float())
        weights = torch.arange(out.numel(), dtype=torch.float32).view_as(out)
        (out * weights).sum().backward()
        results.append(
            {
                "mine": mine.detach().numpy()[:, 0].copy(),
                "per_local": per_local.numpy().copy(),
                "out": out.detach().numpy().copy(),
                "grad": tokens.grad.numpy().copy(),
            }
        )
    return results
