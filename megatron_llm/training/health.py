"""Honest throughput figures and run health: FLOPs, MFU, peak memory, bad steps, loss spikes.

Model FLOPs per trained token come from the model's shape (megatron_llm/model/shape.py, where
the formula is): 3 x forward, with attention, no recomputation counted, so this is MFU and not
hardware utilisation; a mixture-of-experts model (model.moe) counts only its active parameters,
the router's top-k experts of each MoE layer, as Megatron-LM and DeepSeek report MFU
(tests/test_moe_runs.py checks it against a built model). MFU = achieved FLOP/s per device / the
device's dense bf16 peak. Peaks are dense figures, never the 2:4 sparsity ones; a device not in
the table reports TFLOP/s and no MFU rather than a wrong one.
"""

from __future__ import annotations

import math
import resource
from collections import deque
from typing import Any

import torch

from megatron_llm.model.shape import flops_per_token

# Dense bf16 tensor-core peak, TFLOP/s, by the exact name CUDA reports (vendor data sheets:
# half the "with sparsity" figure). Exact names, not substrings: "NVIDIA H100 NVL" contains
# "H100" but peaks at 835, not the SXM part's 989; a name not listed gets no MFU.
PEAK_BF16_TFLOPS = {
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A800-SXM4-80GB": 312.0,
    "NVIDIA A800 80GB PCIe": 312.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H800": 989.0,  # SXM; the export part keeps the H100's tensor cores
    "NVIDIA H800 PCIe": 756.0,
    "NVIDIA H200": 989.0,  # SXM
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA GH200 480GB": 989.0,
    "NVIDIA H20": 148.0,
    "NVIDIA B200": 2250.0,
    "NVIDIA L40S": 362.0,
}


def peak_tflops_for(device_name: str) -> float | None:
    """Dense bf16 peak of a device by its exact CUDA name; None when not in the table."""
    return PEAK_BF16_TFLOPS.get(device_name.strip())


def device_peak_tflops() -> tuple[str, float | None]:
    """(this process's device name, its dense bf16 peak TFLOP/s or None when unknown)."""
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()  # the current device: this rank's (cluster/ranks.py)
    return name, peak_tflops_for(name)


def peak_memory_gb() -> float:
    """Peak memory of this rank: CUDA allocations on a GPU, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


class BadSteps:
    """Counts consecutive steps whose loss or gradient norm is not finite (or that the fp16
    loss scaler skipped); ``limit`` in a row means the run should stop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0

    def update(self, loss: float, grad_norm: float | None, skipped: bool) -> bool:
        bad = (
            skipped
            or not math.isfinite(loss)
            or (grad_norm is not None and not math.isfinite(grad_norm))
        )
        self.in_a_row = self.in_a_row + 1 if bad else 0
        return bool(self.limit) and self.in_a_row >= self.limit


class SpikeDetector:
    """A loss more than ``z`` standard deviations above the mean of the last ``window`` steps."""

    def __init__(self, window: int = 100, z: float = 6.0, min_history: int = 20) -> None:
        self.window: deque[float] = deque(maxlen=window)
        self.z = z
        self.min_history = min_history

    def update(self, loss: float) -> float | None:
        """The z-score of ``loss`` if it is a spike, else None; spikes stay out of the window."""
        if not math.isfinite(loss):
            return None
        if len(self.window) >= self.min_history:
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / len(self.window))
            score = (loss - mean) / max(std, 1e-8)
            if score > self.z:
                return score
        self.window.append(loss)
        return None


class StepMonitor:
    """Per-step figures for the metrics record, and the health checks, on every rank alike."""

    def __init__(self, cfg: Any, world_size: int, vocab_size: int, global_batch: int) -> None:
        self.flops_per_token = flops_per_token(cfg.model, vocab_size)
        self.device, self.peak = device_peak_tflops()
        self.world_size = world_size
        self.global_batch = global_batch
        self.tokens_per_step = global_batch * cfg.model.seq_length
        self.bad = BadSteps(cfg.train.max_bad_steps)
        self.spikes = SpikeDetector(cfg.logging.spike_window, cfg.logging.spike_z)
        self.spike_z = cfg.logging.spike_z
        self.skipped = 0

    def throughput(self, tokens_per_s: float) -> dict[str, Any]:
        """samples/s, TFLOP/s per device, MFU (known devices only), peak memory."""
        tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
        out: dict[str, Any] = {
            "samples_per_s": tokens_per_s / self.tokens_per_step * self.global_batch,
            "tflops_per_device": tflops,
            "peak_memory_gb": peak_memory_gb(),
        }
        if self.peak is not None:
            out["mfu"] = tflops / self.peak
        return out

    def spike_message(self, step: int, loss: float, z: float, consumed: int) -> str:
        return (
            f"[health] loss spike at step {step}: {loss:.4f} is {z:.1f} std above the last "
            f"steps' mean; its data: consumed_samples {consumed - self.global_batch}..{consumed}"
        )

    def check(
        self, loss: float, grad_norm: float | None, skipped_steps: int
    ) -> tuple[dict[str, Any], bool]:
        """(fields to add to the record, whether too many bad steps came in a row)."""
        skipped_now = skipped_steps > self.skipped
        self.skipped = skipped_steps
        fields: dict[str, Any] = {}
        if skipped_now:
            fields["skipped_steps"] = skipped_steps
        z = self.spikes.update(loss) if self.spike_z else None
        if z is not None:
            fields["loss_spike_z"] = z
        return fields, self.bad.update(loss, grad_norm, skipped_now)
