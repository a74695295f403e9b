"""Per-step metrics on the logging rank: the console, <logging.dir>/metrics.jsonl (one JSON
record per step) and TensorBoard event files in <logging.dir>/tensorboard.

Mixture-of-experts runs (model.moe) add, every step, over the whole global batch (every
micro-batch, dp/cp rank and pipeline stage; moe_metrics):
    moe_aux_loss            load-balancing loss (before its coefficient), mean over MoE layers,
                            micro-batches and ranks: 1 when balanced, num_experts when collapsed
    moe_z_loss              router z-loss (before its coefficient), mean likewise
    moe_tokens_per_expert_min / _max   fewest / most token assignments any expert of any MoE
                            layer got in the step (before capacity dropping)
    moe_imbalance           max over MoE layers of (most assignments of an expert / mean over
                            the layer's experts): 1 when balanced, the worst layer's
    moe_dropped_tokens      token-expert assignments dropped over capacity, summed over layers
                            (0 when dropless)
    moe_dropped_fraction    moe_dropped_tokens / all assignments of the step
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_llm.atomic import write_atomic
from megatron_llm.model.moe import moe_stats
from megatron_llm.parallel.groups import ParallelContext


def moe_metrics(module: nn.Module, ctx: ParallelContext) -> dict[str, float]:
    """The step's MoE fields (module docstring), from the MoE layers' statistics summed since
    the last call, which starts the next step's sums. Collective: every rank calls it each step.
    Tokens are counted before dispatch on the rank that holds them, so counts sum over the dp
    (with ep inside) and cp ranks, never over tp (its ranks route the same tokens); each stage
    reduces its own layers, and the pipeline group joins the stages."""
    found = list(moe_stats(module, reset=True).values())
    device = ctx.device
    data = ctx.dp_cp_group if ctx.dp * ctx.cp > 1 else None
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # aux, z, dropped, assignments
    extremes = torch.full((3,), -math.inf, dtype=torch.float64, device=device)  # max, -min, imb.
    if found:
        counts = torch.stack([s.tokens_per_expert for s in found]).double()  # (layers, experts)
        # aux and z are means over each forward's tokens: averaged over forwards and ranks
        batches = torch.tensor([s.micro_batches for s in found], dtype=torch.float64, device=device)
        losses = torch.stack([torch.stack([s.aux_loss, s.z_loss]) for s in found]).double()
        losses = losses / batches[:, None] / max(ctx.dp * ctx.cp, 1)
        dropped = torch.stack([s.dropped for s in found]).double().sum()
        local = torch.cat([losses.sum(dim=0), dropped[None], counts.sum()[None]])
        if data is not None:
            dist.all_reduce(counts, group=data)  # the layer's whole-batch counts
            dist.all_reduce(local, group=data)
        sums = local
        imbalance = counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-12)
        extremes = torch.stack([counts.max(), -counts.min(), imbalance.max()])
    layers = torch.tensor([float(len(found))], dtype=torch.float64, device=device)
    sums = torch.cat([sums, layers])
    if ctx.pp > 1:
        dist.all_reduce(sums, group=ctx.pp_group)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=ctx.pp_group)
    aux, z, dropped, assignments, n = sums.tolist()  # host sync: once per step, for the record
    most, fewest, imbalance = extremes.tolist()
    if not n:
        return {}
    return {
        "moe_aux_loss": aux / n,
        "moe_z_loss": z / n,
        "moe_tokens_per_expert_min": -fewest,
        "moe_tokens_per_expert_max": most,
        "moe_imbalance": imbalance,
        "moe_dropped_tokens": dropped,
        "moe_dropped_fraction": dropped / max(assignments, 1.0),
    }


class MetricsLog:
    def __init__(
        self, run_dir: str, enabled: bool, resume_step: int = 0, tensorboard: bool = False
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Atomic: a run killed here must not lose the history of the run it resumes.
            write_atomic(self.path, self._history(resume_step))
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events a crashed run wrote after the step resumed from.
                self.tb = SummaryWriter(
                    str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1
                )
        self._last_time = time.perf_counter()
        self._tokens_since = 0

    def _history(self, resume_step: int) -> str:
        # A fresh run starts a fresh file; a resumed one keeps the records up to the step it
        # resumes from and drops those a crashed run wrote after its last checkpoint.
        if not resume_step or not self.path.exists():
            return ""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= resume_step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by the crash
        return "".join(kept)

    def count_tokens(self, tokens: int) -> None:
        self._tokens_since += tokens

    def throughput(self) -> float:
        """Tokens/s since the previous call (over the whole job, not per rank)."""
        now = time.perf_counter()
        rate = self._tokens_since / max(now - self._last_time, 1e-9)
        self._last_time, self._tokens_since = now, 0
        return rate

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def print_step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [f"step {record['step']:>6}", f"loss {record['loss']:.4f}"]
        if "lr" in record:
            parts.append(f"lr {record['lr']:.3e}")
        if record.get("grad_norm") is not None:
            parts.append(f"grad_norm {record['grad_norm']:.3f}")
        if "tokens_per_s" in record:
            parts.append(f"tokens/s {record['tokens_per_s']:,.0f}")
        if "tflops_per_device" in record:
            parts.append(f"TFLOP/s/dev {record['tflops_per_device']:.3g}")
        if "mfu" in record:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        if "peak_memory_gb" in record:
            parts.append(f"mem {record['peak_memory_gb']:.2f} GB")
        if "moe_aux_loss" in record:
            parts.append(
                f"moe aux {record['moe_aux_loss']:.3f} imbalance {record['moe_imbalance']:.2f}"
                f" dropped {record['moe_dropped_fraction']:.1%}"
            )
        if "skipped_steps" in record:
            parts.append(f"skipped {record['skipped_steps']}")
        if "val_loss" in record:
            parts.append(
                f"val_loss {record['val_loss']:.4f} val_ppl {math.exp(record['val_loss']):.2f}"
            )
        print(" | ".join(parts), flush=True)
