"""The ``model`` section: decoder shape and style."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

# What each style means when a field below is left unset (null).
_STYLE_DEFAULTS = {
    "gpt2": dict(
        norm="layernorm", activation="gelu", position="learned", tie_embeddings=True, bias=True
    ),
    "llama": dict(
        norm="rmsnorm", activation="swiglu", position="rope", tie_embeddings=False, bias=False
    ),
}


# Llama 3.1's rope_scaling values, for the fields left null when model.rope_scaling=llama3.
_LLAMA3_ROPE = {
    "rope_scaling_factor": 8.0,
    "rope_low_freq_factor": 1.0,
    "rope_high_freq_factor": 4.0,
    "rope_original_seq_length": 8192,
}


@dataclasses.dataclass(kw_only=True)
class MoEConfig:
    """The ``model.moe`` section: mixture-of-experts MLPs (megatron_llm/model/moe.py)."""

    num_experts: int = 0  # routed experts per MoE layer; 0 = a dense model (no MoE layers)
    top_k: int = 2  # routed experts each token goes to
    shared_experts: int = 0  # DeepSeek-style experts every token goes through, unweighted
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output x sigmoid(x @ gate), gate (1, h)
    # Width of each expert's MLP (fine-grained experts are narrower); null = model.ffn_hidden_size
    expert_ffn_hidden_size: int | None = None
    score: Literal["softmax", "sigmoid"] = "softmax"  # router scores over the experts
    # Routing weights = the chosen k scores divided by their sum (Mixtral, DeepSeek-V3); false
    # keeps the raw scores (Switch at top-1, Qwen-MoE's norm_topk_prob=false)
    normalize_top_k: bool = True
    aux_loss_coeff: float = 0.01  # Switch/GShard load balancing: E * sum_e f_e * P_e
    z_loss_coeff: float = 0.0  # router z-loss: mean over tokens of logsumexp(logits)^2
    # Tokens per expert = ceil(factor * tokens * top_k / num_experts), the rest dropped (lowest
    # router score first, then latest token); null = dropless
    capacity_factor: float | None = None
    every: int = 1  # an MoE layer every this many layers (the others dense)
    first_dense: int = 0  # the first this many layers dense

    def __post_init__(self) -> None:
        if self.num_experts < 0:
            raise ValueError(f"model.moe.num_experts={self.num_experts}: must be >= 0 (0 = dense)")
        if self.num_experts and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"model.moe.top_k={self.top_k}: must be in [1, model.moe.num_experts="
                f"{self.num_experts}]"
            )
        for name in ("shared_experts", "first_dense"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.moe.{name}={getattr(self, name)}: must be >= 0")
        if self.shared_expert_gate and not self.shared_experts:
            raise ValueError(
                "model.moe.shared_expert_gate=true needs model.moe.shared_experts >= 1"
            )
        if self.every < 1:
            raise ValueError(f"model.moe.every={self.every}: must be >= 1")
        if self.expert_ffn_hidden_size is not None and self.expert_ffn_hidden_size < 1:
            raise ValueError(
                f"model.moe.expert_ffn_hidden_size={self.expert_ffn_hidden_size}: must be >= 1 "
                "or null (= model.ffn_hidden_size)"
            )
        if self.score not in ("softmax", "sigmoid"):
            raise ValueError(f"model.moe.score={self.score!r}: must be 'softmax' or 'sigmoid'")
        for name in ("aux_loss_coeff", "z_loss_coeff"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.moe.{name}={getattr(self, name)}: must be >= 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(
                f"model.moe.capacity_factor={self.capacity_factor}: must be > 0, or null for "
                "dropless routing"
            )

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block ``layer`` (0-based) has an MoE MLP: after the first_dense ones, every
        ``every``-th (Megatron's moe_layer_freq counted from the first MoE layer)."""
        return (
            self.num_experts > 0
            and layer >= self.first_dense
            and (layer - self.first_dense) % self.every == 0
        )


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    style: Literal["gpt2", "llama"] = "gpt2"  # preset for the fields left null below
    num_layers: int = 2  # transformer blocks
    hidden_size: int = 128  # model width
    num_heads: int = 4  # attention (query) heads
    num_kv_heads: int | None = None  # key/value heads for grouped-query attention; null = num_heads
    ffn_hidden_size: int | None = None  # MLP width; null = 4*hidden (gelu) or ~8/3*hidden (swiglu)
    seq_length: int = 256  # tokens per training sample; also the learned-position table size
    vocab_size: int | None = None  # null = the tokenizer's size, padded (see below)
    pad_vocab_multiple: int = 128  # pad the vocabulary to a multiple of this (and of parallel.tp)
    norm: Literal["layernorm", "rmsnorm"] | None = None  # null = style default
    activation: Literal["gelu", "swiglu"] | None = None  # null = style default
    position: Literal["learned", "rope"] | None = None  # null = style default
    tie_embeddings: bool | None = None  # share input embedding and output head; null = style
    bias: bool | None = None  # biases in linear layers; null = style default
    norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
    rope_theta: float = 10000.0  # RoPE base frequency
    # Head dimension (Megatron's --kv-channels); null = hidden_size / num_heads. Llama-3-style
    # checkpoints may set it explicitly, and then heads x kv_channels need not equal hidden_size.
    kv_channels: int | None = None
    # RoPE frequency scaling for long contexts: null (none) or "llama3" (Llama 3.1+'s rule, with
    # the four fields below; null ones take Llama 3.1's values 8, 1, 4, 8192).
    rope_scaling: Literal["llama3"] | None = None
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_seq_length: int | None = None  # the context length before scaling
    dropout: float = 0.0  # dropout on embeddings and residual branches
    attention_dropout: float = 0.0  # dropout on attention probabilities
    init_std: float = 0.02  # std of normal init; output projections are scaled by 1/sqrt(2L)
    # csrc/ kernels: auto (where measured faster, megatron_llm/kernels/measured.py), ours
    # (wherever they fit), torch (never)
    kernels: Literal["auto", "ours", "torch"] = "auto"
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)  # mixture of experts

    def __post_init__(self) -> None:
        for name, value in _STYLE_DEFAULTS[self.style].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("num_layers", "hidden_size", "num_heads", "seq_length", "pad_vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)}: must be >= 1")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.kv_channels is not None and self.kv_channels < 1:
            raise ValueError(f"model.kv_channels={self.kv_channels}: must be >= 1 or null")
        if self.kv_channels is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads="
                f"{self.num_heads}; the head dimension must be a whole number (or set "
                "model.kv_channels)"
            )
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_kv_heads={self.num_kv_heads}: must divide model.num_heads="
                f"{self.num_heads} (each key/value head serves a whole group of query heads)"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"model: RoPE needs an even head dimension, got {self.head_dim}")
        self._check_rope_scaling()
        if self.ffn_hidden_size is None:
            if self.activation == "swiglu":
                # Llama's choice: 2/3 of 4h, rounded up to a multiple of 64 for good matmul shapes.
                self.ffn_hidden_size = -(-int(8 * self.hidden_size / 3) // 64) * 64
            else:
                self.ffn_hidden_size = 4 * self.hidden_size
        if self.moe.expert_ffn_hidden_size is None:
            self.moe.expert_ffn_hidden_size = self.ffn_hidden_size
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"model.vocab_size={self.vocab_size}: must be >= 2 or null")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name}={getattr(self, name)}: must be in [0, 1)")
        if self.kernels not in ("auto", "ours", "torch"):
            raise ValueError(
                f"model.kernels={self.kernels!r}: must be 'auto' (our CUDA kernels where measured "
                "faster), 'ours' (wherever they fit) or 'torch' (always torch's path)"
            )
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
            raise ValueError("model.norm_eps, model.init_std and model.rope_theta must be > 0")

    def _check_rope_scaling(self) -> None:
        fields = {name: getattr(self, name) for name in _LLAMA3_ROPE}
        if self.rope_scaling is None:
            given = [f"model.{name}" for name, value in fields.items() if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only used with model.rope_scaling=llama3")
            return
        if self.position != "rope":
            raise ValueError(f"model.rope_scaling={self.rope_scaling!r} needs model.position=rope")
        for name, default in _LLAMA3_ROPE.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)}: must be > 0")
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(
                f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                f"model.rope_low_freq_factor={self.rope_low_freq_factor}"
            )

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_heads

    def check_divisible_by_tp(self, tp: int, *, sequence_parallel: bool = False) -> None:
        for name in ("num_heads", "num_kv_heads", "ffn_hidden_size"):
            if getattr(self, name) % tp:
                raise ValueError(
                    f"model.{name}={getattr(self, name)} is not divisible by parallel.tp={tp}; "
                    "tensor parallelism splits it evenly across ranks"
                )
        if sequence_parallel and self.seq_length % tp:
            raise ValueError(
                f"model.seq_length={self.seq_length} is not divisible by parallel.tp={tp}; "
                "sequence parallelism splits every sequence evenly across the tensor-parallel "
                "ranks"
            )

    def padded_vocab_size(self, tokenizer_size: int, tp: int = 1) -> int:
        """The embedding rows: the tokenizer's size rounded up so every tp shard is equal."""
        size = self.vocab_size if self.vocab_size is not None else tokenizer_size
        if size < tokenizer_size:
            raise ValueError(
                f"model.vocab_size={size} is smaller than the tokenizer's {tokenizer_size} tokens"
            )
        # A multiple of both, not their product: for tp dividing pad_vocab_multiple (the usual
        # powers of two) the padding, and so the model, is the same at every tp, which lets a
        # checkpoint resume at another tp with the same logits.
        multiple = math.lcm(self.pad_vocab_multiple, tp)
        return -(-size // multiple) * multiple
