"""Bytes per device of one layout: model states, activations, pipeline buffers, ZeRO-3 extras.

Notation: s sequence, m micro-batch, h hidden, a heads, t = tp, p = pp, L layers, d = dp (x cp),
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
Mixture of experts (model.moe; tests/test_plan_moe_cp.py): a rank holds E/ep routed experts of
  each MoE layer (params.expert_parameters) besides the dense parts (attention, router, shared
  experts); the dense states are reduced and ZeRO-sharded over DeepSpeed's data-parallel group,
  d = dp x cp, the experts' over the expert data-parallel group, d_e = dp x cp / ep (the ranks
  holding the same experts). An MoE block keeps, instead of the dense MLP's 2f/h or 4f/h, per
  token it routes (units of h*b bytes; model/moe.py, measured against a real forward):
    router   (4h [its fp32 input, below fp32] + 8E [logits, scores] + 28k + 8) / (h b)
    routed   k' (1 [the dispatched token] + 2f_e/h or 4f_e/h [the expert's MLP] + 8/b [its
             output and weighted output, fp32])
    shared   2 S f_e/h or 4 S f_e/h, + 1 with the shared expert's sigmoid gate
  with k' = top_k x min(1, capacity_factor) assignments per token, routing taken as balanced
  (dropless routing can hand one rank more). The MoE MLP is replicated over tp: it routes the
  tokens its tp rank holds (a sequence shard under sequence parallelism). Under ep, one layer's
  all-to-all holds the tokens it sends and receives: 2 x tokens x k' x h x b (dispatch buffers).
Context parallelism: each rank holds s/cp tokens of every sequence (the load-balanced split:
  chunks r and 2cp-1-r of 2cp), so every activation above, the logits and the pipeline buffers
  use s/cp; ring attention keeps no score matrix (flash-like, whatever the attention setting),
  and its output twice (heads-first for its backward, token-major for the out-projection):
  h_q/(h t) more per block.
  One layer's ring holds K and V blocks being computed on and received (4 blocks of
  (s/cp) m h_kv/t at b bytes) and in backward the travelling dK and dV (4 more, fp32).
ZeRO 3 gathers: DeepSpeed gathers a module's whole parameters (this tp rank's shard) before its
  forward and backward and prefetches up to stage3_prefetch_bucket_size (5e7) elements of the
  next, and a module's whole gradients exist until they are reduce-scattered; with P the
  largest module (a block or the embedding shard): b * (2P + min(P, 5e7)).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from megatron_llm.model.config import ModelConfig
from megatron_llm.plan.params import dense_and_moe_blocks, embedding_parameters, moe_layers

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
    cp: int = 1  # context parallel: ranks splitting each sequence (world = tp*cp*dp*pp)
    ep: int = 1  # expert parallel: ranks of the data-parallel group splitting the experts

    @property
    def world(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def data_group(self) -> int:
        """Ranks holding the same dense parameters: DeepSpeed's data-parallel group, dp x cp."""
        return self.dp * self.cp

    @property
    def expert_data_group(self) -> int:
        """Ranks holding the same experts: dp x cp / ep (parallel/groups.py expert_dp)."""
        return self.dp * self.cp // self.ep


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
    dispatch: float = 0.0  # expert parallelism's all-to-all send and receive buffers
    ring: float = 0.0  # context parallelism's travelling K/V (and dK/dV) blocks

    @property
    def total(self) -> float:
        states = self.params + self.grads + self.optimizer
        extra = self.buffers + self.gathered + self.bucket + self.dispatch + self.ring
        return states + self.activations + extra


def element_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def model_state_bytes(n: int, zero: int, dp: int, precision: str) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer) bytes per device for n parameters replicated over a
    data-parallel group of dp ranks (see the docstring)."""
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


def stage_state_bytes(n: int, experts: int, lay: Layout, precision: str) -> tuple[float, ...]:
    """Model states of a stage holding n parameters, ``experts`` of them routed experts: the
    dense ones over the data-parallel group (dp x cp), the experts over theirs (dp x cp / ep)."""
    dense = model_state_bytes(n - experts, lay.zero, lay.data_group, precision)
    routed = model_state_bytes(experts, lay.zero, lay.expert_data_group, precision)
    return tuple(a + b for a, b in zip(dense, routed))


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


def mlp_units(cfg: ModelConfig, width: int) -> float:
    """An MLP of ``width`` keeps, per token, 2 x width (GELU: fc_in output, fc_out input) or 4 x
    width (SwiGLU: gate, silu(gate), up, product) elements: in units of h."""
    return (4 if cfg.activation == "swiglu" else 2) * width / cfg.hidden_size


def block_units(
    cfg: ModelConfig, t: int, sp: bool, b: int, attention: Attention = "flash"
) -> float:
    """What one dense block keeps for backward, in units of s*m*h*b bytes (see the docstring)."""
    h = cfg.hidden_size
    h_q, h_kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shard = t if sp else 1  # what sequence parallelism splits
    units = 4 / shard + ((h_q + 2 * h_kv) / h + h_q / h + mlp_units(cfg, cfg.ffn_hidden_size)) / t
    if cfg.dropout > 0:
        units += 2 / b / shard
    if attention == "math":
        scores = cfg.num_heads * cfg.seq_length / (h * t)
        units += scores * (1 + (1 / b + 1 if cfg.attention_dropout > 0 else 0))
    return units


def routed_per_token(cfg: ModelConfig) -> float:
    """Token-expert assignments a rank's experts hold per token it routes: top_k, or
    capacity_factor x top_k when that is less (tokens over capacity are dropped). Routing is
    taken as balanced; dropless routing can hand one rank more."""
    moe = cfg.moe
    factor = min(1.0, moe.capacity_factor) if moe.capacity_factor is not None else 1.0
    return moe.top_k * factor


def moe_units(cfg: ModelConfig, b: int) -> float:
    """What an MoE layer's MLP (model/moe.py) keeps per token it routes, in units of h*b bytes
    (see the docstring)."""
    moe, h = cfg.moe, cfg.hidden_size
    # fp32 router: its input cast (a new tensor below fp32), logits and scores (E each), top-k
    # values, indices and the assignments' sort (about 28 bytes per k), the logsumexp
    router = (4 * h if b < 4 else 0) + 8 * moe.num_experts + 28 * moe.top_k + 8
    # per assignment: the dispatched token, the expert's MLP, its output and weighted output in
    # fp32 (the routing weights multiply in fp32)
    routed = routed_per_token(cfg) * (1 + mlp_units(cfg, moe.expert_ffn_hidden_size) + 8 / b)
    shared = 0.0
    if moe.shared_experts:
        shared = mlp_units(cfg, moe.shared_experts * moe.expert_ffn_hidden_size)
        shared += 1 if moe.shared_expert_gate else 0  # the output the sigmoid gate multiplies
    return router / (h * b) + routed + shared


def moe_block_units(
    cfg: ModelConfig, t: int, sp: bool, b: int, attention: Attention = "flash"
) -> float:
    """A block whose MLP is MoE. The MoE MLP is replicated over tp: it routes every token a tp
    rank holds (a sequence shard under sequence parallelism)."""
    units = block_units(cfg, t, sp, b, attention) - mlp_units(cfg, cfg.ffn_hidden_size) / t
    return units + moe_units(cfg, b) / (t if sp else 1)


def in_flight(lay: Layout, stage: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once under 1F1B."""
    return min(lay.pp - stage, lay.accum)


def ring_output_units(cfg: ModelConfig, lay: Layout) -> float:
    """Ring attention (cp > 1) keeps its output heads-first for its own backward, and the
    output projection a token-major copy of it: h_q/(h t) units more than one fused kernel's
    output that the projection reads in place (measured: 17.06 units per GPT block at cp=2)."""
    return cfg.num_heads * cfg.head_dim / (cfg.hidden_size * lay.tp) if lay.cp > 1 else 0.0


def rank_tokens(cfg: ModelConfig, lay: Layout) -> float:
    """Tokens of one micro-batch on a rank: context parallelism splits the sequence."""
    return cfg.seq_length / lay.cp * lay.micro


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
    unit = rank_tokens(cfg, lay) * cfg.hidden_size * b
    attention = attention if lay.cp == 1 else "flash"  # ring attention keeps no scores
    layers, n_moe = cfg.num_layers // lay.pp, moe_layers(cfg, lay.pp, stage)
    ring = ring_output_units(cfg, lay)
    dense = block_units(cfg, lay.tp, sp, b, attention) + ring
    moe = moe_block_units(cfg, lay.tp, sp, b, attention) + ring if n_moe else 0.0
    if lay.checkpointing:
        kept = layers * unit / (lay.tp if sp else 1) * in_flight(lay, stage)
        kept += max(dense if n_moe < layers else 0.0, moe) * unit
    else:
        kept = ((layers - n_moe) * dense + n_moe * moe) * unit * in_flight(lay, stage)
    if stage == lay.pp - 1:
        kept += head_activation_bytes(cfg, vocab, lay, precision, sp)
    return kept


def head_activation_bytes(
    cfg: ModelConfig, vocab: int, lay: Layout, precision: str, sp: bool
) -> float:
    """The last stage's final norm and head inputs and its fp32 logits (see the docstring)."""
    tokens = rank_tokens(cfg, lay)
    unit = tokens * cfg.hidden_size * element_bytes(precision)
    return 2 * unit / (lay.tp if sp else 1) + 2 * 4 * tokens * vocab / lay.tp


def pipeline_buffer_bytes(cfg: ModelConfig, lay: Layout, precision: str, stage: int) -> float:
    if lay.pp == 1:
        return 0.0
    sent = element_bytes(precision) * rank_tokens(cfg, lay) * cfg.hidden_size / lay.tp
    ends = (stage > 0) + (stage < lay.pp - 1)
    return sent * (in_flight(lay, stage) + 1) * ends


def ring_buffer_bytes(cfg: ModelConfig, lay: Layout, precision: str) -> float:
    """Context parallelism's ring (see the docstring): one layer at a time, K and V blocks
    being computed on and being received (4 blocks), and in backward dK and dV travelling too
    (4 more, fp32)."""
    if lay.cp == 1:
        return 0.0
    block = rank_tokens(cfg, lay) * cfg.num_kv_heads * cfg.head_dim / lay.tp
    return block * (4 * element_bytes(precision) + 4 * 4)


def dispatch_bytes(cfg: ModelConfig, lay: Layout, precision: str, sp: bool, stage: int) -> float:
    """Expert parallelism's all-to-all (see the docstring): one MoE layer at a time, the
    tokens sent and the tokens received, routed_per_token x tokens x h each."""
    if lay.ep == 1 or not moe_layers(cfg, lay.pp, stage):
        return 0.0
    tokens = rank_tokens(cfg, lay) / (lay.tp if sp else 1)
    return 2 * tokens * routed_per_token(cfg) * cfg.hidden_size * element_bytes(precision)


def zero3_gathered_bytes(cfg: ModelConfig, vocab: int, lay: Layout, precision: str) -> float:
    if lay.zero != 3:
        return 0.0
    blocks = dense_and_moe_blocks(cfg, lay.tp, lay.ep)
    largest = max(*blocks, embedding_parameters(cfg, vocab, lay.tp))
    return element_bytes(precision) * (2 * largest + min(largest, PREFETCH_BUCKET))


def reduce_bucket_bytes(lay: Layout, precision: str) -> float:
    return REDUCE_BUCKET * element_bytes(precision) if lay.zero == 3 else 0.0
