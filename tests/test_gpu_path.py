"""What makes the code correct on CUDA by construction, proven on CPU ranks: the device decision,
the groups' timeouts, fp32 gradient accumulation in bf16, the MFU peak table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from megatron_llm import launch
from megatron_llm.config import ConfigError, load_config
from megatron_llm.training.health import peak_tflops_for
from tests.distributed import run_on_ranks
from tests.parallel_runs import TINY_MODEL


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 NVL", 835.0),  # contains "H100": a substring rule gave it the SXM 989
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H800", 989.0),
        ("NVIDIA H200 NVL", 835.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA H100", None),  # no such CUDA name: no guess
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),  # a MIG slice is not the whole GPU
        ("Tesla V100-SXM2-32GB", None),
    ],
)
def test_peak_table_matches_exact_device_names(name: str, peak: float | None) -> None:
    assert peak_tflops_for(name) == peak


class Probe(nn.Module):
    """loss = sum(w * x): the gradient of w is x, so the accumulated gradient is known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4, 4))
        self.b = nn.Parameter(torch.zeros(4))  # a no-decay group, as the model has

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).sum() + self.b.sum()


# One large micro-batch gradient, then seven that bf16 cannot add to it (2**-9 is under half a
# bf16 step at 1.0): summed in bf16 they vanish, in fp32 they count.
MICRO = [1.0] + [2.0**-9] * 7


def accumulated_gradients(world: int) -> dict:
    from deepspeed.utils import safe_get_full_grad

    from megatron_llm.cluster.ranks import local_device
    from megatron_llm.config import load_config
    from megatron_llm.parallel.config import ParallelConfig
    from megatron_llm.parallel.engine import accumulation_dtype, build_engine
    from megatron_llm.parallel.groups import build_context

    ctx = build_context(ParallelConfig(tp=world, timeout_minutes=0.5))
    out: dict = {
        "device": str(ctx.device),
        "decided": str(local_device()),
        "timeouts": [
            g._get_backend(ctx.device).options._timeout.total_seconds()
            for g in (ctx.tp_group, ctx.dp_group, ctx.pp_group)
        ],
    }
    for zero in (0, 1, 2, 3):
        cfg = load_config(
            None,
            [
                "train.precision=bf16",
                f"parallel.zero_stage={zero}",
                "train.micro_batch_size=1",
                f"train.grad_accum_steps={len(MICRO)}",
                "optim.grad_clip=0",
            ],
        )
        out[f"dtype{zero}"] = str(accumulation_dtype(cfg))
        if zero == 0:
            continue  # DeepSpeed 0.19 has no fp32 accumulation for ZeRO 0 in bf16
        engine = build_engine(Probe(), cfg, build_context(cfg.parallel))
        for x in MICRO:
            engine.backward(engine(torch.full((4, 4), x, dtype=torch.bfloat16)))
            if engine.is_gradient_accumulation_boundary():
                out[f"zero{zero}"] = safe_get_full_grad(engine.module.w)[0, 0].item()
            engine.step()
    return out


def test_rank_device_groups_timeout_and_fp32_accumulation_in_bf16() -> None:
    results = run_on_ranks(2, accumulated_gradients, 2)
    exact = sum(MICRO) / len(MICRO)  # DeepSpeed averages over micro-batches (and dp ranks)
    bf16_sum = MICRO[0] / len(MICRO)
    for r in results:
        assert r["device"] == r["decided"] == "cpu"
        # Every group of the context times out after parallel.timeout_minutes, not torch's 30.
        assert r["timeouts"] == [30.0, 30.0, 30.0]
        assert r["dtype0"] == "torch.bfloat16"
        for zero in (1, 2, 3):
            assert r[f"dtype{zero}"] == "torch.float32"
            # ZeRO 1's bf16 optimizer hands the fp32 sum back rounded to bf16; 2 and 3 exactly.
            expected = exact if zero > 1 else torch.tensor(exact).bfloat16().item()
            assert r[f"zero{zero}"] == expected != bf16_sum, (zero, r)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["default", "gpt_125m", "llama_1b"])
def test_shipped_configs_use_every_gpu_present(name: str) -> None:
    config = str(CONFIGS / f"{name}.yaml")
    parallel = load_config(config).parallel
    for gpus in (1, 2, 8):
        assert launch.gpu_ranks([config], gpus) is None  # the launcher starts every GPU ...
        assert parallel.resolve_dp(gpus) == gpus  # ... and dp takes them all (tp = pp = 1)
    # Without a GPU, launch starts tp x pp x dp_on_cpu ranks: 2 for the embedded default run.
    assert launch.ranks_needed([config]) == (2 if name == "default" else 1)


def test_a_fixed_dp_starts_exactly_its_ranks_or_says_why() -> None:
    config = str(CONFIGS / "default.yaml")
    assert launch.gpu_ranks([config, "parallel.dp=2"], 8) == 2
    with pytest.raises(ConfigError, match=r"= 4 ranks, but this machine has 2 GPU\(s\)"):
        launch.gpu_ranks([config, "parallel.dp=2", "parallel.tp=2"], 2)
    assert load_config(config, ["parallel.dp=auto"]).parallel.dp is None


# Files whose tensors live on the rank's device during training, evaluation and saving.
HOT_PATHS = (
    "training/loop.py",
    "training/preemption.py",
    "training/health.py",
    "eval/perplexity.py",
    "parallel/",
    "checkpoint/state.py",
    "model/gpt.py",
    "model/moe.py",
    "kernels/attention.py",
    "data/batch.py",
    "training/metrics.py",
)
FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint")
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all_single",  # expert parallelism's dispatch
    "batch_isend_irecv",  # context parallelism's ring (its tensors inside P2POps)
)


def watched_step_eval_save(argv: list[str]) -> dict:
    """One training step, one evaluation, the stop check and a save, with every tensor factory
    called from a hot path and every collective watched: a factory without ``device=`` makes a
    CPU tensor on a GPU rank (NCCL refuses it, a CUDA op refuses to mix it), and every tensor a
    collective gets must be on the rank's device (ctx.device)."""
    import sys

    import torch.distributed as dist
    from torch.overrides import TorchFunctionMode

    from megatron_llm.config import load_config
    from megatron_llm.data.batch import document_masking
    from megatron_llm.parallel.groups import build_context, mean_over_dp
    from megatron_llm.training import loop
    from megatron_llm.training.metrics import moe_metrics
    from megatron_llm.training.preemption import StopRequest
    from megatron_llm.training.run import build_run

    cfg = load_config(None, argv)
    ctx = build_context(cfg.parallel)
    run = build_run(cfg, ctx)  # construction may use the CPU (the model is filled there)
    factories = {getattr(torch, name) for name in FACTORIES}
    undeviced: list[str] = []
    collectives: set[tuple[str, str]] = set()

    moved: list[torch.Tensor] = []  # what hot paths copied to the host (kept alive: ids stay)
    late: list[str] = []  # collectives fed one of those

    def hot_caller() -> str | None:
        caller = sys._getframe(2)
        where = caller.f_code.co_filename.split("megatron_llm/")[-1]
        if "megatron_llm/" in caller.f_code.co_filename and where.startswith(HOT_PATHS):
            return f"{where}:{caller.f_lineno}"
        return None

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in factories and "device" not in kwargs and (where := hot_caller()):
                undeviced.append(f"{where} torch.{func.__name__}")
            result = func(*args, **kwargs)
            # On a CPU rank .cpu() returns the tensor itself, so a host copy that a collective
            # later gets (NCCL would refuse it) is the same object here.
            if func is torch.Tensor.cpu and hot_caller():
                moved.append(result)
            return result

    def watched(name: str, real):
        def collective(*args, **kwargs):
            for t in [*args, *kwargs.values()]:
                for x in t if isinstance(t, list) else [t]:
                    x = getattr(x, "tensor", x)  # a P2POp's tensor
                    if isinstance(x, torch.Tensor):
                        collectives.add((name, str(x.device)))
                        if any(x is m for m in moved):
                            late.append(name)
            return real(*args, **kwargs)

        return collective

    real = {name: getattr(dist, name) for name in COLLECTIVES}
    for name in COLLECTIVES:
        setattr(dist, name, watched(name, real[name]))
    try:
        with Watch():
            loss, _ = loop.train_step(
                run.engine,
                run.batches(),
                cfg.train.grad_accum_steps,
                ctx.tp_group,
                document_masking(cfg.data, run.tokenizer.eod),
                run.model.context,
            )
            mean_over_dp(loss, ctx)
            if cfg.model.moe.num_experts:
                moe_metrics(run.engine.module, ctx)
            loop.evaluate(run)
            StopRequest().reason(1)
            run.save(1)
            run.saver.wait()  # an asynchronous save's writer thread ends before the ranks do
    finally:
        for name in COLLECTIVES:
            setattr(dist, name, real[name])
    return {
        "device": str(ctx.device),
        "undeviced": undeviced,
        "collectives": sorted(collectives),
        "fed_host_copies": late,
    }


HOT_LAYOUTS = {
    # tp=2 and ZeRO 0: the tensor-parallel collectives of the model, the loss and our own
    # gradient norm; a sharded save (no gathers).
    "tp2": (["parallel.tp=2", "parallel.zero_stage=0"], {"all_reduce"}),
    # context parallelism's ring with packed documents (segment ids travel with the keys)
    "cp2": (
        ["parallel.cp=2", "parallel.dp=1", "data.reset_attention_mask=true"],
        {"batch_isend_irecv", "all_reduce"},
    ),
    # expert parallelism's all-to-all, the MoE metrics' reductions, ZeRO 1 over the experts
    "ep2": (
        [
            "model.moe.num_experts=4",
            "model.moe.top_k=2",
            "parallel.dp=2",
            "parallel.ep=2",
            "parallel.zero_stage=1",
        ],
        {"all_to_all_single", "all_reduce"},
    ),
}


@pytest.mark.parametrize("layout", HOT_LAYOUTS)
def test_hot_paths_keep_tensors_on_the_rank_device(
    tmp_path, email_shard, bpe_model, layout
) -> None:
    # On CPU ranks the rank's device is the CPU, so what this can catch here is a tensor made
    # without naming its device (it would be a CPU tensor on a GPU rank) and a collective fed
    # anything but the rank's device.
    overrides, expected = HOT_LAYOUTS[layout]
    argv = [
        *TINY_MODEL,
        f"data.prefixes=[{email_shard.prefix}]",
        f"data.tokenizer={bpe_model}",
        *overrides,
        "train.micro_batch_size=2",
        "train.grad_accum_steps=2",
        "eval.iters=1",
        f"checkpoint.dir={tmp_path / 'checkpoints'}",
        f"logging.dir={tmp_path}",
    ]
    for r in run_on_ranks(2, watched_step_eval_save, argv):
        assert r["undeviced"] == [], r["undeviced"]
        assert r["fed_host_copies"] == []  # e.g. a tp gather of state already moved to the CPU
        ops = {op for op, _ in r["collectives"]}
        assert expected <= ops, r["collectives"]  # it watched the real ones
        assert {device for _, device in r["collectives"]} == {r["device"]}
