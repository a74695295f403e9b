"""Bytes per device of one layout: model states, activations, pipeline buffers, ZeRO-3 extras.

Notation: s sequence, m micro-batch, h hidden, a heads, t = tp, p = pp, L layers, d = dp,
b bytes per element (4 fp32, 2 bf16/fp16), N the parameters of a device's stage before ZeRO
(its tensor-parallel shard; the padded vocabulary; replicated norms and row-parallel biases whole).

Model states (checked against real DeepSpeed engines in tests/test_plan.py; the ZeRO paper's
7.5B / 64 GPU figures in tests/test_plan_published.py):
  parameters  b*N; ZeRO 3: b*N/d
  gradients   b*N for ZeRO 0 and 1 (stage 1 holds whole gradients until they are reduced at the
              end of a step's backward); ZeRO 2/3: b*N/d. In bf16 with ZeRO 1-3 the gradients
              accumulate in fp32 (parallel/engine.py): ZeRO 1's bf16 optimizer keeps a whole
              fp32 accumulator besides the bf16 .grad, 6*N; ZeRO 2/3 keep fp32 partitions, 4*N/d
  optimizer   AdamW's two fp32 moments plus an fp32 master copy where DeepSpeed keeps one:
              ZeRO 0: 8*N (fp32: the parameters are the master) or 12*N (16-bit);
              ZeRO 1-3: 12*N/d (DeepSpeed's ZeRO optimizers always keep an fp32 partition)

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", arXiv 2205.05198, section 4), in units of u = s*m*h*b bytes per block and micro-batch:
  paper, 16-bit, per layer: sbh(10 + 24/t + 5as/(ht)); sequence parallel: sbh/t (34 + 5as/h);
  selective recompute drops the 5as/h score terms. Our blocks keep (block_units):
    2 [norm inputs] + 2 [norm outputs, the q/k/v and MLP inputs] + (h_q + 2 h_kv)/(h t)
    [q, k, v] + h_q/(h t) [attention output = out-projection input] + 2f/(h t) (GELU: fc_in
    output, fc_out input) or 4f/(h t) (SwiGLU: gate, silu(gate), up, product) + 2 x 1/b
    [1-byte residual dropout masks, when model.dropout > 0]
  which for GPT (f = 4h, h_q = h_kv = h) and dropout is the paper's 10 + 24/t exactly.
  Attention: "flash" (our fused kernel, torch's flash/efficient SDPA, also on CPU) keeps q, k,
  v, the output and a log-sum-exp, no s x s scores: the paper's selective figure. "math" keeps
  the softmax (a s/(h t) u), plus with attention dropout its 1-byte mask and its output: the
  paper's 5as/(ht) at b=2.
  Sequence parallelism (t > 1): the norm inputs, the norm outputs and the dropout masks are
  sequence shards (/t). The column-parallel layers keep only the shard of their all-gathered
  input and gather it again in backward (collectives.LinearRegatheringInput, as Megatron-LM
  does), so a GPT block with dropout keeps the paper's 17/t u (34sbh/t bytes at b=2).
  Full recompute (a checkpoint around every block): each block keeps only its input, u (u/t
  under sequence parallelism: the input is a sequence shard), and only the micro-batch being
  back-propagated recomputes one block's full set: (L/p) u x in-flight + one block.
  Stage k of a 1F1B pipeline holds min(p - k, accumulation steps) micro-batches in flight.
  The last stage also keeps the final norm's input and the head's input (2u; 2u/t under
  sequence parallelism, where both are sequence shards) and the logits:
  2 * 4*s*m*V/t (fp32 softmax kept by the cross entropy, and its gradient).
Pipeline buffers (DeepSpeed PipelineEngine, t > 1 or not): the tensor a stage sends is
  c = b*s*m*h/t (a sequence shard under sequence parallelism; without it DeepSpeed partitions
  it over tp). A stage holds, per micro-batch in flight and once more for its persistent
  receive/gradient buffer, the received input (not on the first stage) and its output (not on
  the last): c * (in-flight + 1) * ([not first] + [not last]).
Reduce bucket: ZeRO 3 reduces gradients through one contiguous bucket of reduce_bucket_size
  elements (DeepSpeed's default 5e8, contiguous_gradients on), allocated whole when the engine
  starts (runtime/zero/stage3.py; seen on DeepSpeed 0.19 CPU ranks, where ZeRO 1/2 allocated
  none): 5e8 * b bytes whatever the model's size.
ZeRO 3 gathers: DeepSpeed gathers a module's whole parameters (this tp rank's shard) before its
  forward and backward and prefetches up to stage3_prefetch_bucket_size (5e7) elements of the
  next, and a module's whole gradients exist until they are reduce-scattered; with P the
  largest module (a block or the embedding shard): b * (2P + min(P, 5e7)).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from megatron_llm.model.config import ModelConfig
from megatron_llm.plan.params import block_parameters, embedding_parameters

Attention = Literal["flash", "math"]
PREFETCH_BUCKET = 5e7  # DeepSpeed's stage3_prefetch_bucket_size default, in elements
REDUCE_BUCKET = 5e8  # DeepSpeed's zero_optimization.reduce_bucket_size default, in elements


@dataclasses.dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int
    micro: int
    accum: int
    checkpointing: bool  # a checkpoint around every block ("full" recompute)


@dataclasses.dataclass
class StageMemory:
    """Bytes per device on one pipeline stage."""

    stage: int
    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float = 0.0  # pipeline send/receive buffers
    gathered: float = 0.0  # ZeRO 3's gathered parameters and unreduced gradients
    bucket: float = 0.0  # ZeRO 3's gradient reduce bucket

    @property
    def total(self) -> float:
        states = self.params + self.grads + self.optimizer
        return states + self.activations + self.buffers + self.gathered + self.bucket


def element_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def model_state_bytes(n: int, zero: int, dp: int, precision: str) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer) bytes per device for n parameters (see the docstring)."""
    b = element_bytes(precision)
    params = b * n / (dp if zero == 3 else 1)
    grads = b * n / (dp if zero >= 2 else 1)
    if precision == "bf16" and zero >= 1:  # fp32 accumulation (see the docstring)
        grads = 4 * n / dp if zero >= 2 else 6 * n
    if zero == 0:
        optimizer = (8 if precision == "fp32" else 12) * n
    else:
        optimizer = 12 * n / dp
    return params, grads, optimizer


def korthikanti_layer_bytes(
    s: int, m: int, h: int, a: int, t: int, sequence_parallel: bool, selective: bool
) -> float:
    """The paper's per-layer activation bytes (16-bit, GPT blocks with dropout; eq. 2 and
    table 2 of Korthikanti et al. 2022). Kept verbatim as the reference the planner is tested
    against."""
    scores = 0.0 if selective else 5 * a * s / h
    if sequence_parallel:
        return s * m * h / t * (34 + scores)
    return s * m * h * (10 + 24 / t + scores / t)


def block_units(
    cfg: ModelConfig, t: int, sp: bool, b: int, attention: Attention = "flash"
) -> float:
    """What one block keeps for backward, in units of s*m*h*b bytes (see the docstring)."""
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    h_q, h_kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shard = t if sp else 1  # what sequence parallelism splits
    mlp = (4 if cfg.activation == "swiglu" else 2) * f / h
    units = 4 / shard + ((h_q + 2 * h_kv) / h + h_q / h + mlp) / t
    if cfg.dropout > 0:
        units += 2 / b / shard
    if attention == "math":
        scores = cfg.num_heads * cfg.seq_length / (h * t)
        units += scores * (1 + (1 / b + 1 if cfg.attention_dropout > 0 else 0))
    return units


def in_flight(lay: Layout, stage: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once under 1F1B."""
    return min(lay.pp - stage, lay.accum)


def activation_bytes(
    cfg: ModelConfig,
    vocab: int,
    lay: Layout,
    precision: str,
    sp: bool,
    stage: int = 0,
    attention: Attention = "flash",
) -> float:
    """Activations kept on pipeline stage ``stage`` (see the docstring)."""
    b = element_bytes(precision)
    unit = cfg.seq_length * lay.micro * cfg.hidden_size * b
    block = block_units(cfg, lay.tp, sp, b, attention) * unit
    layers = cfg.num_layers // lay.pp
    if lay.checkpointing:
        kept = layers * unit / (lay.tp if sp else 1) * in_flight(lay, stage) + block
    else:
        kept = layers * block * in_flight(lay, stage)
    if stage == lay.pp - 1:
        kept += head_activation_bytes(cfg, vocab, lay, precision, sp)
    return kept


def head_activation_bytes(
    cfg: ModelConfig, vocab: int, lay: Layout, precision: str, sp: bool
) -> float:
    """The last stage's final norm and head inputs and its fp32 logits (see the docstring)."""
    unit = cfg.seq_length * lay.micro * cfg.hidden_size * element_bytes(precision)
    return 2 * unit / (lay.tp if sp else 1) + 2 * 4 * cfg.seq_length * lay.micro * vocab / lay.tp


def pipeline_buffer_bytes(cfg: ModelConfig, lay: Layout, precision: str, stage: int) -> float:
    if lay.pp == 1:
        return 0.0
    sent = element_bytes(precision) * cfg.seq_length * lay.micro * cfg.hidden_size / lay.tp
    ends = (stage > 0) + (stage < lay.pp - 1)
    return sent * (in_flight(lay, stage) + 1) * ends


def zero3_gathered_bytes(cfg: ModelConfig, vocab: int, lay: Layout, precision: str) -> float:
    if lay.zero != 3:
        return 0.0
    largest = max(block_parameters(cfg, lay.tp), embedding_parameters(cfg, vocab, lay.tp))
    return element_bytes(precision) * (2 * largest + min(largest, PREFETCH_BUCKET))


def reduce_bucket_bytes(lay: Layout, precision: str) -> float:
    return REDUCE_BUCKET * element_bytes(precision) if lay.zero == 3 else 0.0
