"""MoE runs of the real training loop on gloo ranks (issue 17): the step metrics against a
routing computed by hand, bitwise resume at ep=2, and reshapes ep=2 -> 1 and ep=1 -> 4.

The runs start from one weights-only checkpoint of a model made here (routers spread, so that
every expert and the top-k matter), so the first step's routing is known without the loop:
the hand reference runs that model's blocks on the step's batches and routes each MoE layer's
input through its router weight, with none of model/moe.py's code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.checkpoint_runs import overrides
from tests.data_fixtures import Shard
from tests.distributed import run_on_ranks

EXPERTS, TOP_K = 4, 2
MOE = [
    "model.style=llama",
    "model.num_kv_heads=2",
    f"model.moe.num_experts={EXPERTS}",
    f"model.moe.top_k={TOP_K}",
    "model.moe.z_loss_coeff=0.001",
    "parallel.zero_stage=1",
]


def _init_checkpoint(root: Path, bpe_model: Path, *extra: str) -> tuple[str, Any]:
    """A weights-only checkpoint (routers drawn with std 1) and the model it holds."""
    from megatron_llm.checkpoint.__main__ import write_weights_only
    from megatron_llm.config import load_config
    from megatron_llm.data.tokenizer import Tokenizer
    from megatron_llm.model.gpt import GPT
    from tests.checkpoint_runs import TINY

    cfg = load_config(None, [*TINY, *MOE, *extra, f"data.tokenizer={bpe_model}"])
    torch.manual_seed(3)
    model = GPT(cfg.model, cfg.model.padded_vocab_size(Tokenizer(str(bpe_model)).vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0.0, 1.0)
    weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return str(write_weights_only(root, weights, cfg.to_dict())), model


def moe_run(argv: list[str]) -> dict[str, Any]:
    """The real loop; its summary, metrics records (logging rank) and this rank's micro-batches
    of step 1 (the loop and data untouched, the batches observed)."""
    import megatron_llm.training.loop as loop
    import megatron_llm.training.run as assembly
    from megatron_llm.config import load_config
    from megatron_llm.parallel.groups import build_context

    cfg = load_config(None, argv)
    ctx = build_context(cfg.parallel)
    first: list[Any] = []  # numpy: tensors do not survive the trip back from a rank
    real = assembly.micro_batches

    def recording(*args: Any, **kwargs: Any) -> Any:
        for batch in real(*args, **kwargs):
            if len(first) < cfg.train.grad_accum_steps:
                first.append(batch.numpy().copy())
            yield batch

    assembly.micro_batches = recording
    try:
        summary = loop.train(cfg, ctx)
    finally:
        assembly.micro_batches = real
    summary["first_step_batches"] = first
    metrics = Path(cfg.logging.dir) / "metrics.jsonl"
    if ctx.is_logging_rank:
        summary["records"] = [json.loads(line) for line in metrics.open()]
    return summary


def moe_runs(runs: list[list[str]]) -> list[dict[str, Any]]:
    import torch.distributed as dist

    results = []
    for argv in runs:
        results.append(moe_run(argv))
        dist.barrier()
    return results


def reference_step(model: Any, batches: list[torch.Tensor], capacity: float | None) -> dict:
    """The step's MoE metrics by hand: each batch through the model, each MoE layer's input
    routed by its router weight (softmax, top-k), counted, dropped over capacity."""
    inputs: dict[int, list[torch.Tensor]] = {}
    hooks = [
        block.mlp.register_forward_pre_hook(
            lambda _m, args, i=i: inputs.setdefault(i, []).append(args[0].detach())
        )
        for i, block in enumerate(model.blocks)
    ]
    with torch.no_grad():
        for tokens in batches:
            model.eval()(tokens[:, :-1])
    for h in hooks:
        h.remove()
    aux, z, dropped, counts = [], [], 0, []
    for i, xs in sorted(inputs.items()):
        router = model.blocks[i].mlp.router.weight.double()
        total = torch.zeros(EXPERTS, dtype=torch.float64)
        for x in xs:
            flat = x.reshape(-1, x.shape[-1]).double()
            logits = flat @ router.t()  # (n, E)
            probs = logits.softmax(dim=-1)
            chosen = probs.topk(TOP_K, dim=-1).indices.flatten()
            count = torch.bincount(chosen, minlength=EXPERTS).double()
            total += count
            share = count / (flat.shape[0] * TOP_K)
            aux.append(EXPERTS * (share * probs.mean(dim=0)).sum().item())
            z.append(torch.logsumexp(logits, dim=-1).square().mean().item())
            if capacity is not None:
                cap = math.ceil(capacity * flat.shape[0] * TOP_K / EXPERTS)
                dropped += (count - cap).clamp(min=0).sum().item()
        counts.append(total)
    stacked = torch.stack(counts)  # (layers, E)
    return {
        "moe_aux_loss": sum(aux) / len(aux),
        "moe_z_loss": sum(z) / len(z),
        "moe_tokens_per_expert_min": stacked.min().item(),
        "moe_tokens_per_expert_max": stacked.max().item(),
        "moe_imbalance": (stacked.max(dim=1).values / stacked.mean(dim=1)).max().item(),
        "moe_dropped_tokens": dropped,
        "moe_dropped_fraction": dropped / stacked.sum().item(),
    }


def _args(run_dir: Path, shard: Shard, bpe_model: Path, *extra: str) -> list[str]:
    return overrides(str(run_dir), shard.prefix, str(bpe_model), *MOE, *extra)


def test_step_metrics_equal_a_routing_by_hand(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    """dp=2 x ep=2 and dp=2 x ep=1, dropless and with capacity factor 1 (dropping), two
    micro-batches per rank: the first step's aux loss, z-loss, tokens per expert, imbalance and
    dropped tokens (metrics.jsonl and TensorBoard) equal the hand reference over every rank's
    batches."""
    cases = {  # name: (layout, capacity factor)
        "ep2": (["parallel.dp=2", "parallel.ep=2"], None),
        "ep1": (["parallel.dp=2", "parallel.ep=1"], None),
        "ep2-capacity": (["parallel.dp=2", "parallel.ep=2"], 1.0),
        "pp2": (["parallel.dp=1", "parallel.pp=2"], None),  # a layer on each stage
    }
    runs, models = [], {}
    for name, (layout, capacity) in cases.items():
        extra = [] if capacity is None else [f"model.moe.capacity_factor={capacity}"]
        init, models[name] = _init_checkpoint(tmp_path / name / "init", bpe_model, *extra)
        common = ["train.steps=2", "train.grad_accum_steps=2", "train.micro_batch_size=2"]
        common += [*layout, f"checkpoint.init_from={init}", "checkpoint.save_at_end=false"]
        runs.append(_args(tmp_path / name, email_shard, bpe_model, *common, *extra))
    per_rank = run_on_ranks(2, moe_runs, runs)
    for i, (name, (layout, capacity)) in enumerate(cases.items()):
        data_ranks = per_rank if "parallel.dp=2" in layout else per_rank[:1]  # pp: one batch
        batches = [torch.from_numpy(b) for r in data_ranks for b in r[i]["first_step_batches"]]
        expected = reference_step(models[name], batches, capacity)
        assert (expected["moe_dropped_tokens"] > 0) == (capacity is not None)  # drops, or not
        logging = next(r[i] for r in per_rank if "records" in r[i])  # the last stage
        record = logging["records"][0]
        assert record["step"] == 1
        for key, value in expected.items():
            assert record[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
        tb = _tensorboard(tmp_path / name / "tensorboard")
        for key in expected:
            assert tb[f"train/{key}"][1] == pytest.approx(record[key], rel=1e-6), (name, key)


def _tensorboard(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    scalars: dict[str, dict[int, float]] = {}
    for path in folder.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.tensor.float_val[0]
    return scalars


def test_resume_at_ep2_is_bitwise(tmp_path: Path, email_shard: Shard, bpe_model: Path) -> None:
    """dp=2 x ep=2, ZeRO 1, dropout, two micro-batches: 4 steps straight == 2 steps, stop,
    resume, 2 steps: losses and MoE metrics bitwise."""
    common = ["parallel.dp=2", "parallel.ep=2", "train.steps=4", "train.grad_accum_steps=2"]
    common += ["train.micro_batch_size=2", "model.dropout=0.1", "model.moe.capacity_factor=1.5"]
    runs = [
        _args(tmp_path / "straight", email_shard, bpe_model, *common),
        _args(tmp_path / "resumed", email_shard, bpe_model, *common, "train.exit_interval=2"),
        _args(tmp_path / "resumed", email_shard, bpe_model, *common),
    ]
    straight, first, resumed = run_on_ranks(2, moe_runs, runs)[0]
    assert first["stopped"] == "train.exit_interval=2 reached"
    assert resumed["first_step"] == 3
    assert straight["losses"] == first["losses"] + resumed["losses"]  # bitwise
    moe = [k for k in straight["records"][0] if k.startswith("moe_")]
    assert len(moe) == 7
    for a, b in zip(straight["records"][2:], resumed["records"][2:], strict=True):
        assert {k: a[k] for k in moe} == {k: b[k] for k in moe}, a["step"]


RESHAPE_STEPS = 4
# fp32 without dropout: another ep only changes the order of the gradient sums
RESHAPE_ATOL = 1e-5


def _reshape_runs(tmp: Path, shard: Shard, bpe_model: Path, save_ep: int, load_ep: int) -> list:
    """dp=4 straight at ep=save_ep (saving halfway), and its checkpoint continued at load_ep."""
    half = RESHAPE_STEPS // 2
    common = ["parallel.dp=4", "train.micro_batch_size=1", f"train.steps={RESHAPE_STEPS}"]
    common += [f"checkpoint.save_interval={half}", "checkpoint.save_at_end=false"]
    saved = tmp / f"straight/checkpoints/global_step{half}"
    return [
        _args(tmp / "straight", shard, bpe_model, *common, f"parallel.ep={save_ep}"),
        _args(
            tmp / "reshaped",
            shard,
            bpe_model,
            *common,
            f"parallel.ep={load_ep}",
            f"checkpoint.resume={saved}",
        ),
    ]


def test_reshape_between_expert_layouts_continues_the_run(
    tmp_path: Path, email_shard: Shard, bpe_model: Path
) -> None:
    """ep=2 -> ep=1 and ep=1 -> ep=4 (dp=4, ZeRO 1): the continued losses and MoE metrics
    equal the straight run's within 1e-5."""
    runs = _reshape_runs(tmp_path / "a", email_shard, bpe_model, 2, 1)
    runs += _reshape_runs(tmp_path / "b", email_shard, bpe_model, 1, 4)
    results = run_on_ranks(4, moe_runs, runs)[0]
    half = RESHAPE_STEPS // 2
    for case in (0, 1):
        straight, reshaped = results[2 * case : 2 * case + 2]
        assert reshaped["first_step"] == half + 1
        gaps = [abs(a - b) for a, b in zip(reshaped["losses"], straight["losses"][half:])]
        print(f"reshape case {case}: loss gaps to the straight run {gaps}")
        assert max(gaps) < RESHAPE_ATOL, gaps
        # the reshaped run logs to a fresh folder: its records are steps half+1.. only
        for a, b in zip(straight["records"][half:], reshaped["records"], strict=True):
            assert a["step"] == b["step"]
            assert a["moe_tokens_per_expert_max"] == b["moe_tokens_per_expert_max"]
            assert a["moe_aux_loss"] == pytest.approx(b["moe_aux_loss"], abs=1e-5)


REPO = Path(__file__).resolve().parents[1]


def _makefile_moe_line() -> list[str]:
    """The overrides `make pretrain-moe` passes to the default run (Makefile MOE_TINY)."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("MOE_TINY :="))
    return line.split(":=", 1)[1].split()


def test_shipped_moe_configs_load() -> None:
    from megatron_llm.config import load_config
    from megatron_llm.model.shape import flops_per_token, model_parameters

    big = load_config(REPO / "configs" / "moe_8x.yaml")
    assert (big.model.moe.num_experts, big.model.moe.top_k, big.parallel.ep) == (8, 2, 8)
    assert big.parallel.zero_stage in (1, 2)  # what ep needs
    # the numbers its comment states
    assert round(model_parameters(big.model, 32000) / 1e9, 2) == 4.73
    assert round(model_parameters(big.model, 32000, active=True) / 1e9, 2) == 1.41
    dense = load_config(REPO / "configs" / "default.yaml")
    tiny = load_config(REPO / "configs" / "default.yaml", _makefile_moe_line())
    assert tiny.model.moe.num_experts == 4 and tiny.parallel.ep == 2
    # "the dense run's active FLOPs": half-width experts, top-2 (plus the small router)
    ratio = flops_per_token(tiny.model, 4096) / flops_per_token(dense.model, 4096)
    assert 1.0 < ratio < 1.01, ratio


def test_mfu_counts_active_parameters_only() -> None:
    """TFLOP/s (and so MFU) from the active parameters, against a count of a built model's
    matmul weights: each routed expert's share top_k / num_experts, the rest whole."""
    from megatron_llm.config import load_config
    from megatron_llm.model.gpt import GPT
    from megatron_llm.training.health import StepMonitor

    cfg = load_config(None, [*MOE, "model.moe.shared_experts=1", "model.moe.first_dense=1"])
    cfg.model.num_layers = 3
    vocab = 256
    model = GPT(cfg.model, vocab)
    matmul = 0.0
    for name, p in model.named_parameters():
        if ".experts." in name:
            matmul += p.numel() * TOP_K / EXPERTS
        elif p.dim() == 2 and not name.startswith("pos_embed"):
            matmul += p.numel()
    if model.head is not None:  # an untied embedding is a lookup, no matmul (tied: the head)
        matmul -= model.embed.weight.numel()
    m = cfg.model
    attention = m.num_layers * 4 * m.seq_length * m.num_heads * m.head_dim
    expected = 3 * (2 * matmul + attention)
    world = 4
    monitor = StepMonitor(cfg, world, vocab, global_batch=8)
    tflops = monitor.throughput(tokens_per_s=1e12)["tflops_per_device"]
    assert tflops * world == pytest.approx(expected, rel=1e-9)
