"""Which (tp, cp, pp, dp, ep, ZeRO stage, micro-batch, activation checkpointing) fits a model
on a cluster, and how fast each would run; and the longest sequence each layout fits.

    python -m megatron_llm.plan configs/llama_1b.yaml --device h100 --nodes 2 --gpus-per-node 8
    python -m megatron_llm.plan configs/gpt_125m.yaml --memory-gb 40 --nodes 1 \\
        --gpus-per-node 4 --global-batch 256 train.precision=bf16
    python -m megatron_llm.plan CONFIG --layout tp=8,pp=64,dp=6,zero=0,micro=1,ckpt=full --json
    python -m megatron_llm.plan CONFIG model.moe.num_experts=8 --layout dp=8,ep=8,zero=1 --nodes 1
    python -m megatron_llm.plan configs/llama_1b.yaml --max-seq --nodes 1   # cp for long context
    python -m megatron_llm.plan --published --device a100       # against Narayanan et al.

Every layout the config rules allow (search.py) gets its bytes per device on its fullest
pipeline stage (memory.py: parameters, gradients, optimizer state, activations, pipeline
buffers, ZeRO-3 gathers, expert all-to-all and context-parallel ring buffers, each with its
formula) and a predicted step time, tokens/s, TFLOP/s and MFU (steptime.py: compute on active
parameters, tensor-parallel all-reduces, the ring's exposed traffic, the experts' all-to-all,
the 1F1B bubble, data-parallel and ZeRO-3 traffic over the given bandwidths). A layout fits
when its total is <= (1 - headroom) x memory (headroom 10% by default: CUDA context, allocator
fragmentation, communication buckets). --max-seq gives each layout's longest sequence instead.
Layouts that fit come first, fastest first. Model states are checked against real DeepSpeed
engines, activations against the tensors a real forward keeps for backward and against
Korthikanti et al. 2022 (MoE blocks too), step times against Narayanan et al. 2021's published
measurements, Mixtral's published size (published.py; tests/test_plan*.py). Exit status: 0 ok
(even if nothing fits: the table says so), 2 bad arguments.
"""

from megatron_llm.plan.cli import main
from megatron_llm.plan.memory import Layout, StageMemory, model_state_bytes
from megatron_llm.plan.params import block_parameters, stage_parameters
from megatron_llm.plan.search import Estimate, estimate, layouts, parse_layout, plan
from megatron_llm.plan.steptime import DEVICES, Device, step_time

__all__ = [
    "DEVICES",
    "Device",
    "Estimate",
    "Layout",
    "StageMemory",
    "block_parameters",
    "estimate",
    "layouts",
    "main",
    "model_state_bytes",
    "parse_layout",
    "plan",
    "stage_parameters",
    "step_time",
]
