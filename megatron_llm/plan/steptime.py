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
  context par. k  = max(0, ring - a): ring = n_r * (L/p) * (cp-1) * 2 * b*(s/cp)*m*h_kv/t / B_cp,
               the K and V blocks passed around the ring, n_r = 3 (once forward; K/V and
               dK/dV in backward), 4 with full recompute; a = the attention core's own time
               (12 s h_q FLOPs per token over the layers), which each ring step overlaps
  expert par.  e  = n_e * L_moe * (ep-1)/ep * b*(s/cp)*m*k'*h / B_ep, the all-to-all of the
               routed tokens (k' = top_k, or capacity x top_k when less): n_e = 4 (dispatch
               and combine, forward and backward), 6 with full recompute; L_moe the stage's
               MoE layers; not overlapped (the experts wait for their tokens)
  1F1B         (M + p - 1) micro-batch slots: the bubble (p-1)/M
  data par.    D  = 2(d-1)/d * b*N / B_dp once per step (all-reduce, or ZeRO 1/2's
               reduce-scatter + all-gather of the same volume), d = dp x cp; the routed
               experts' N_e over their own group d_e = dp x cp / ep instead; ZeRO 3 reduces
               in z instead

  step = (M + p - 1) * (c + r + q + k + e + z - overlap * min(c, z)) + D

Under cp the sequence terms above use s/cp (a rank's share), and F counts active parameters
for MoE models (model/shape.py: the top_k routed and the shared experts, the router).

B_intra: NVLink per GPU and direction; B_inter: the InfiniBand share of one GPU; B_dp = B_intra
when the whole job fits in one node, else B_inter; B_cp and B_ep likewise by whether their
group's ranks (tp*cp, tp*cp*ep consecutive ranks in the tp-cp-dp-pp order) fit in a node;
B_ep may be given (--all-to-all-gbs: all-to-all reaches less than a link's peak). Defaults
per device below (DGX A100: NVLink 3 300 GB/s, 8 x 200 Gb/s HDR; DGX H100: NVLink 4
450 GB/s, 8 x 400 Gb/s NDR); override with flags.

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
from megatron_llm.plan.memory import Layout, element_bytes, rank_tokens, routed_per_token
from megatron_llm.plan.params import expert_parameters, moe_layers, stage_parameters

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
    context_s: float = 0.0  # exposed ring traffic over the step
    expert_s: float = 0.0  # all-to-all over the step


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
    all_to_all_gbs: float | None = None,
) -> StepTime:
    """The model in the module docstring; vocab is the padded vocabulary."""
    world = lay.world
    b, t, M = element_bytes(precision), lay.tp, lay.accum
    tokens = cfg.seq_length * lay.micro * M * lay.dp
    hw = hardware_flops_per_token(cfg, vocab, lay.checkpointing)
    flops = device.peak_tflops * 1e12 * efficiency
    c = hw * tokens / world / M / flops
    act = b * rank_tokens(cfg, lay) * cfg.hidden_size
    intra, inter = device.intra_gbs * 1e9, device.inter_gbs * 1e9
    n = 6 if lay.checkpointing else 4
    layers = cfg.num_layers // lay.pp
    r = n * layers * 2 * (t - 1) / t * act / intra
    q = 2 * act / t / inter if lay.pp > 1 else 0.0
    k = context_time(cfg, lay, b, flops, intra if t * lay.cp <= gpus_per_node else inter)
    ep_bw = intra if t * lay.cp * lay.ep <= gpus_per_node else inter
    e = all_to_all_time(cfg, lay, b, all_to_all_gbs * 1e9 if all_to_all_gbs else ep_bw)
    d, d_e = lay.data_group, lay.expert_data_group
    params = stage_parameters(cfg, vocab, t, lay.pp, None, lay.ep)
    experts = max(expert_parameters(cfg, lay.pp, s, lay.ep) for s in range(lay.pp))
    dp_bw = intra if world <= gpus_per_node else inter
    # bytes each rank moves in one reduction of its gradients (or one gather of its parameters)
    reduced = b * ((d - 1) / d * (params - experts) + (d_e - 1) / d_e * experts)
    z = 0.0
    if lay.zero == 3:
        z = (4 if lay.checkpointing else 3) * reduced / dp_bw
    slots = M + lay.pp - 1
    hidden = overlap * min(c, z)
    data = 0.0 if lay.zero == 3 else 2 * reduced / dp_bw
    step = slots * (c + r + q + k + e + z - hidden) + data
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
        context_s=slots * k,
        expert_s=slots * e,
    )


def context_time(cfg: ModelConfig, lay: Layout, b: int, flops: float, bandwidth: float) -> float:
    """Exposed ring traffic of one micro-batch on a stage (module docstring: k)."""
    if lay.cp == 1:
        return 0.0
    layers = cfg.num_layers // lay.pp
    passes = 4 if lay.checkpointing else 3
    kv_block = 2 * b * rank_tokens(cfg, lay) * cfg.num_kv_heads * cfg.head_dim / lay.tp
    ring = passes * layers * (lay.cp - 1) * kv_block / bandwidth
    core = 12 * cfg.seq_length * cfg.num_heads * cfg.head_dim * rank_tokens(cfg, lay) / lay.tp
    return max(0.0, ring - layers * core / flops)


def all_to_all_time(cfg: ModelConfig, lay: Layout, b: int, bandwidth: float) -> float:
    """All-to-all of one micro-batch on the stage with the most MoE layers (docstring: e)."""
    if lay.ep == 1:
        return 0.0
    layers = max(moe_layers(cfg, lay.pp, s) for s in range(lay.pp))
    passes = 6 if lay.checkpointing else 4
    sent = b * rank_tokens(cfg, lay) * routed_per_token(cfg) * cfg.hidden_size
    return passes * layers * (lay.ep - 1) / lay.ep * sent / bandwidth
