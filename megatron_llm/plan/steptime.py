"""Predicted step time of one layout, from FLOPs and bytes a reader can check by hand.

Per pipeline (every GPU of a stage does the same work), with M = accumulation steps (micro-batches
per step), F = hardware FLOPs per token (megatron_llm.model.shape.flops_per_token, 3 passes,
plus one more forward of the blocks under full recompute), T = tokens per step:

  compute      c  = F * T / world / M / (peak * efficiency)            per micro-batch
  tensor par.  r  = n * (L/p) * 2(t-1)/t * b*s*m*h / B_intra          per micro-batch
               n = 4 all-reduces per block (2 forward, 2 backward; as many all-gather +
               reduce-scatter pairs under sequence parallelism), 6 with full recompute
  pipeline p2p q  = 2 * b*s*m*h/t / B_inter                           per micro-batch (p > 1)
  ZeRO 3       z  = g * (d-1)/d * b*N / B_dp, g = 3 passes (gather forward, gather backward,
               reduce-scatter gradients), 4 with full recompute (its forward gathers again);
               DeepSpeed prefetches, so overlap x min(c, z) of it hides behind compute
  1F1B         (M + p - 1) micro-batch slots: the bubble (p-1)/M
  data par.    D  = 2(d-1)/d * b*N / B_dp once per step (all-reduce, or ZeRO 1/2's
               reduce-scatter + all-gather of the same volume); ZeRO 3 reduces in z instead

  step = (M + p - 1) * (c + r + q + z - overlap * min(c, z)) + D

B_intra: NVLink per GPU and direction; B_inter: the InfiniBand share of one GPU; B_dp = B_intra
when the whole job fits in one node, else B_inter. Defaults per device below (DGX A100: NVLink 3
300 GB/s, 8 x 200 Gb/s HDR; DGX H100: NVLink 4 450 GB/s, 8 x 400 Gb/s NDR); override with flags.

Calibration (published measurements only, tests/test_plan_published.py):
  efficiency = 0.6 and overlap = 0.6 reproduce Narayanan et al. 2021 (arXiv 2104.04473),
  Table 1's per-GPU TFLOP/s of 1.7B..1T on A100s, and their Table 2 (ZeRO-3 against tensor +
  pipeline parallelism at 175B and 530B); the README shows the comparison.
TFLOP/s counts the recomputed forward (as Narayanan et al. do); MFU does not (model FLOPs, the
3-pass count, over the device's dense bf16 peak).
"""

from __future__ import annotations

import dataclasses

from megatron_llm.model.config import ModelConfig
from megatron_llm.model.shape import flops_per_token
from megatron_llm.plan.memory import Layout, element_bytes
from megatron_llm.plan.params import stage_parameters

EFFICIENCY = 0.6  # achieved / peak FLOP/s of the matmuls; calibrated, see the docstring
ZERO3_OVERLAP = 0.6  # share of the shorter of compute and ZeRO-3 traffic that runs concurrently


@dataclasses.dataclass(frozen=True)
class Device:
    memory_gb: float
    peak_tflops: float  # dense bf16/fp16 tensor-core peak
    intra_gbs: float  # GB/s per GPU and direction inside a node (NVLink)
    inter_gbs: float  # GB/s per GPU between nodes (its InfiniBand share)


DEVICES = {
    "a100": Device(80.0, 312.0, 300.0, 25.0),
    "a100-40gb": Device(40.0, 312.0, 300.0, 25.0),
    "h100": Device(80.0, 989.0, 450.0, 50.0),
    "h200": Device(141.0, 989.0, 450.0, 50.0),
}


@dataclasses.dataclass
class StepTime:
    step_s: float
    compute_s: float  # c * (M + p - 1): compute including the bubble
    tensor_s: float  # r and q over the step
    zero3_s: float  # exposed ZeRO 3 traffic over the step
    data_s: float  # D
    tokens_s: float  # tokens per second, whole job
    tflops: float  # hardware TFLOP/s per GPU (recompute included)
    mfu: float  # model FLOPs per second per GPU / peak


def hardware_flops_per_token(cfg: ModelConfig, vocab: int, checkpointing: bool) -> float:
    model = flops_per_token(cfg, vocab)
    if not checkpointing:
        return model
    head = 3 * 2 * cfg.hidden_size * vocab  # the head is not recomputed
    return model + (model - head) / 3


def step_time(
    cfg: ModelConfig,
    vocab: int,
    lay: Layout,
    precision: str,
    device: Device,
    gpus_per_node: int,
    efficiency: float = EFFICIENCY,
    overlap: float = ZERO3_OVERLAP,
) -> StepTime:
    """The model in the module docstring; vocab is the padded vocabulary."""
    world = lay.tp * lay.pp * lay.dp
    b, t, d, M = element_bytes(precision), lay.tp, lay.dp, lay.accum
    tokens = cfg.seq_length * lay.micro * M * d
    hw = hardware_flops_per_token(cfg, vocab, lay.checkpointing)
    c = hw * tokens / world / M / (device.peak_tflops * 1e12 * efficiency)
    act = b * cfg.seq_length * lay.micro * cfg.hidden_size
    intra, inter = device.intra_gbs * 1e9, device.inter_gbs * 1e9
    n = 6 if lay.checkpointing else 4
    r = n * (cfg.num_layers // lay.pp) * 2 * (t - 1) / t * act / intra
    q = 2 * act / t / inter if lay.pp > 1 else 0.0
    params = b * stage_parameters(cfg, vocab, t, lay.pp)
    dp_bw = intra if world <= gpus_per_node else inter
    z = 0.0
    if lay.zero == 3:
        z = (4 if lay.checkpointing else 3) * (d - 1) / d * params / dp_bw
    slots = M + lay.pp - 1
    hidden = overlap * min(c, z)
    data = 0.0 if lay.zero == 3 else 2 * (d - 1) / d * params / dp_bw
    step = slots * (c + r + q + z - hidden) + data
    model_flops = flops_per_token(cfg, vocab) * tokens
    return StepTime(
        step_s=step,
        compute_s=slots * c,
        tensor_s=slots * (r + q),
        zero3_s=slots * (z - hidden),
        data_s=data,
        tokens_s=tokens / step,
        tflops=hw * tokens / world / step / 1e12,
        mfu=model_flops / world / step / (device.peak_tflops * 1e12),
    )
