"""The decoder: GPT-2 style or Llama style, chosen by ModelConfig.

Reads as a single-device model, top to bottom: norm, rotary embedding, attention, MLP, block,
model. Parallelism is applied from outside (megatron_llm.parallel.shard swaps the linear
layers, the embedding, the norms and the loss for tensor-parallel ones); nothing here reads
globals.

Generation passes a ``KVCache`` through ``GPT.forward``: each attention layer appends the keys
and values of the new tokens to its cache and attends to all of them, and positions (learned or
RoPE) start at the cache's length. Without a cache the model is exactly the training model.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_llm import kernels
from megatron_llm.model.config import ModelConfig
from megatron_llm.model.moe import MoE, MoEStats, moe_stats
from megatron_llm.model.rope import inverse_frequencies


class Norm(nn.Module):
    kernels = "auto"  # model.kernels; a class default for subclasses that skip __init__

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.norm
        self.eps = cfg.norm_eps
        self.kernels = cfg.kernels
        self.weight = nn.Parameter(torch.ones(cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.hidden_size)) if cfg.norm == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, self.weight, self.bias)

    def normalize(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return kernels.rms_norm(x, weight, self.eps, self.kernels)
        return kernels.layer_norm(x, weight, bias, self.eps, self.kernels)


class Embedding(nn.Embedding):
    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The tied output head: logits against every embedding row."""
        return F.linear(x, self.weight)  # (batch, seq, vocab)


IGNORE = -100  # the label of a position the loss skips (fine-tuning prompts, padding)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    flat = logits.float().view(-1, logits.shape[-1])  # (batch * seq, vocab)
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE)


class LayerCache:
    """One attention layer's keys and values for the positions decoded so far."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # (batch, kv_heads, length, head_dim)
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' keys and values; returns every position's."""
        if self.keys is not None:
            k = torch.cat([self.keys, k], dim=2)  # (batch, kv_heads, length + seq, head_dim)
            v = torch.cat([self.values, v], dim=2)
        self.keys, self.values = k, v
        return k, v


class KVCache:
    """Every layer's keys and values, for decoding one token at a time (inference only).

    ``length`` is the number of positions seen, so the next token's position."""

    def __init__(self, num_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(num_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length


def attend_after_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention where the queries are the last q.shape[2] of k's positions: each sees
    every cached position and the new ones up to itself (SDPA's is_causal aligns top-left)."""
    q_len, k_len = q.shape[2], k.shape[2]
    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]
    )  # (batch, heads, q_len, head_dim)


def token_positions(context, start: int, seq: int, device: torch.device) -> torch.Tensor:
    """The global positions of the ``seq`` tokens a rank holds: start..start+seq-1, or under
    context parallelism (``context``: parallel/context.py) its two chunks' positions."""
    if context is None:
        return torch.arange(start, start + seq, device=device)
    return context.positions(seq)


class Rotary(nn.Module):
    """RoPE tables for positions 0..seq_length-1 (rotate-half layout, as in Llama)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(cfg)  # (head_dim / 2,), llama3-scaled when configured
        angles = torch.outer(torch.arange(cfg.seq_length, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # (seq, head_dim)
        # Not saved in checkpoints: derived from the config.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(
        self, x: torch.Tensor, start: int = 0, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (batch, heads, seq, head_dim) at positions start..start+seq-1, or at
        ``positions`` (seq,) when given (a context-parallel rank's chunks)."""
        seq = x.shape[-2]
        where = slice(start, start + seq) if positions is None else positions
        cos = self.cos[where].to(x.dtype)
        sin = self.sin[where].to(x.dtype)
        if cos.dim() == 3:  # per-sample positions (batch, seq): documents restart at 0
            cos, sin = cos[:, None], sin[:, None]  # (batch, 1, seq, head_dim)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        # Separate q/k/v projections: each splits cleanly by heads under tensor parallelism,
        # grouped-query attention included.
        self.q = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.bias)
        self.k = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.bias)
        self.out = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.bias)
        self.residual_outputs = ("out",)  # init_roles: writes into the residual stream
        self.rotary = Rotary(cfg) if cfg.position == "rope" else None
        self.dropout = cfg.attention_dropout
        self.kernels = cfg.kernels
        # Tensor parallelism splits the heads, so their dropout needs a per-rank RNG stream.
        self.dropout_rng = contextlib.nullcontext
        # Context parallelism (parallel/context.py installs it): this rank holds two chunks of
        # the sequence and attends to the others' keys and values around a ring.
        self.context = None

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerCache | None = None,
        segments: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """segments (batch, seq): packed documents, attention stays within one; positions
        (batch, seq): each token's position within its document (data/batch.py)."""
        # Head counts come from the shapes: under tensor parallelism a rank holds some heads.
        # (batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)
        q, k, v = (
            proj(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        start = cache.length if cache is not None else 0
        if self.rotary is not None:
            if positions is None and self.context is not None:
                positions = self.context.positions(q.shape[2])
            q, k = self.rotary(q, start, positions), self.rotary(k, start, positions)
        if cache is not None:
            k, v = cache.extend(k, v)  # (batch, kv_heads, start + seq, head_dim)
            if start > 0:
                y = attend_after_cache(q, k, v)
                return self.out(y.transpose(1, 2).flatten(2))
        with self.dropout_rng():
            dropout = self.dropout if self.training else 0.0
            if self.context is not None and segments is not None:
                y = self.context.attention(q, k, v, segments=segments)
            elif self.context is not None:  # dropout: refused with cp (parallel/context.py)
                y = self.context.attention(q, k, v)
            else:
                y = kernels.causal_attention(q, k, v, dropout, self.kernels, segments=segments)
        # (batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim)
        return self.out(y.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn_hidden_size: int | None = None) -> None:
        super().__init__()
        self.activation = cfg.activation
        ffn = ffn_hidden_size or cfg.ffn_hidden_size  # MoE's shared experts have their own
        self.fc_in = nn.Linear(cfg.hidden_size, ffn, bias=cfg.bias)
        # SwiGLU's gate is its own projection (not fused with fc_in) so both split by columns.
        self.fc_gate = (
            nn.Linear(cfg.hidden_size, ffn, bias=cfg.bias) if cfg.activation == "swiglu" else None
        )
        self.fc_out = nn.Linear(ffn, cfg.hidden_size, bias=cfg.bias)
        self.residual_outputs = ("fc_out",)  # init_roles: writes into the residual stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc_gate is not None:
            return self.fc_out(F.silu(self.fc_gate(x)) * self.fc_in(x))
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


def mlp_for_layer(cfg: ModelConfig, layer: int) -> nn.Module:
    """Block ``layer``'s MLP: dense, or mixture-of-experts where model.moe puts one (its
    shared experts, if any, one dense MLP of shared_experts x expert width, as DeepSeek's)."""
    moe = cfg.moe
    if not moe.is_moe_layer(layer):
        return MLP(cfg)
    shared = (
        MLP(cfg, moe.shared_experts * moe.expert_ffn_hidden_size) if moe.shared_experts else None
    )
    return MoE(cfg, shared)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = Norm(cfg)
        self.mlp = mlp_for_layer(cfg, layer)  # MLP or MoE
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerCache | None = None,
        segments: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cache, segments, positions))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Init(enum.Enum):
    """How a parameter starts, by its role in the model (GPT-2's init)."""

    NORMAL = "normal"  # N(0, init_std): embeddings, projections out of the residual stream
    RESIDUAL = "residual"  # N(0, init_std / sqrt(2L)): projections back into the stream
    ONES = "ones"  # norm gains
    ZEROS = "zeros"  # biases


def init_roles(model: nn.Module) -> dict[str, Init]:
    """Each parameter's Init by name. Modules say their own roles: a Norm's gain starts at one,
    and the linears a module lists in ``residual_outputs`` write into the residual stream, so
    they start smaller: the stream's variance must not grow with depth."""
    roles: dict[str, Init] = {}
    for prefix, module in model.named_modules():
        residual = set(getattr(module, "residual_outputs", ()))
        for child_name, child in module.named_children():
            for key, _ in child.named_parameters(recurse=False):
                name = f"{prefix}.{child_name}.{key}" if prefix else f"{child_name}.{key}"
                if key == "bias":
                    roles[name] = Init.ZEROS
                elif isinstance(child, Norm):
                    roles[name] = Init.ONES
                elif child_name in residual or key in getattr(child, "residual_parameters", ()):
                    roles[name] = Init.RESIDUAL
                else:
                    roles[name] = Init.NORMAL
    return roles


def init_values(model: nn.Module, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The initial value of each parameter of the (unsharded, possibly meta) ``model``, whole,
    one at a time, in its parameter order: GPT-2's init by role (init_roles). Drawn from a
    generator of its own seeded with ``seed``, so the values depend only on the seed, the config
    and the order, not on what else drew random numbers: a model built whole and a model built
    on the meta device and filled shard by shard (megatron_llm.parallel.build) start from the
    same weights. The names, shapes and roles are read now, so the model may be sharded while
    the values are handed out."""
    roles = init_roles(model)
    params = [(name, p.shape, roles[name]) for name, p in model.named_parameters()]
    return _draw(model.cfg, params, seed)


def _draw(
    cfg: ModelConfig, params: list[tuple[str, torch.Size, Init]], seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    std = {Init.NORMAL: cfg.init_std, Init.RESIDUAL: cfg.init_std / math.sqrt(2 * cfg.num_layers)}
    for name, shape, role in params:
        if role is Init.ZEROS:
            yield name, torch.zeros(shape)
        elif role is Init.ONES:
            yield name, torch.ones(shape)
        else:
            yield name, torch.empty(shape).normal_(0.0, std[role], generator=gen)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        # The layers' own inits draw from the global generator; reset_parameters overwrites them,
        # so keep the global stream as it was (a model built on meta draws nothing either).
        with torch.random.fork_rng(devices=[]):
            self.embed = Embedding(vocab_size, cfg.hidden_size)
            self.pos_embed = (
                nn.Embedding(cfg.seq_length, cfg.hidden_size) if cfg.position == "learned" else None
            )
            # Sequence parallelism swaps in a scatter: the blocks then see a shard of the
            # sequence.
            self.scatter_sequence: nn.Module = nn.Identity()
            self.dropout = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
            self.final_norm = Norm(cfg)
            self.head = (
                None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, vocab_size, bias=False)
            )
        self.loss_fn = cross_entropy  # vocab-parallel under tensor parallelism
        # Context parallelism (parallel/context.py): the tokens are this rank's sequence chunks.
        self.context = None
        # Activation checkpointing (train.activation_checkpointing): recompute each segment of
        # this many blocks in backward; 0 keeps every activation.
        self.checkpoint_every = 0
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """init_values from ``seed``; by default torch.initial_seed(), the last torch.manual_seed
        (training/loop.py seeds it with train.seed)."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in init_values(self, torch.initial_seed() if seed is None else seed):
                params[name].copy_(value)

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        segments: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens: (batch, seq). Returns the mean loss if labels, else logits (batch, seq, vocab);
        under tensor parallelism each rank's logits are its slice of the vocabulary. With a
        cache, tokens continue the cached positions and their keys/values join the cache.
        Packed documents (data/batch.py document_ids): ``segments`` (batch, seq) keeps
        attention inside each document, ``positions`` (batch, seq) restarts positions in each."""
        seq = tokens.shape[1]
        if cache is not None and (segments is not None or positions is not None):
            raise ValueError("segments/positions are for training batches, not KV-cache decoding")
        pos = cache.length if cache is not None else 0
        if pos + seq > self.cfg.seq_length:
            raise ValueError(
                f"sequence of {pos + seq} tokens exceeds model.seq_length={self.cfg.seq_length}"
            )
        x = self.embed(tokens)  # (batch, seq, hidden)
        if self.pos_embed is not None:
            where = token_positions(self.context, pos, seq, tokens.device)
            x = x + self.pos_embed(where if positions is None else positions)
        x = self.dropout(self.scatter_sequence(x))
        docs = (segments, positions)  # every block's attention reads them
        if cache is not None:  # decoding: each block reads and extends its own cache
            for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
                x = block(x, layer_cache)
        else:
            k = self.checkpoint_every
            for start in range(0, len(self.blocks), k or len(self.blocks)):
                if k and self.training:  # keep segment inputs only; recompute the rest in backward
                    x = checkpoint(self._blocks, x, start, start + k, *docs, use_reentrant=False)
                else:
                    x = self._blocks(x, start, start + (k or len(self.blocks)), *docs)
        x = self.final_norm(x)
        # (batch, seq, vocab); under tensor parallelism each rank holds a slice of the vocab
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        if labels is None:
            return logits
        return self.loss_fn(logits, labels)

    def _blocks(
        self,
        x: torch.Tensor,
        start: int,
        stop: int,
        segments: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for block in self.blocks[start:stop]:
            x = block(x, None, segments, positions)
        return x

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def moe_stats(self, reset: bool = False) -> dict[str, MoEStats]:
        """Each MoE layer's statistics summed over the training forwards since the last reset,
        by module name (model/moe.py's moe_stats)."""
        return moe_stats(self, reset)

    def layer_prefixes(self) -> list[str]:
        """The model as a sequence of layers, each by the name prefix of its parameters: the
        units a pipeline splits into stages (parallel/pipeline.py builds one pipeline layer per
        entry, in this order). The input layer holds the learned positions, if any, and a tied
        head is the embedding again."""
        return [
            "embed.",
            "pos_embed.",
            *(f"blocks.{i}." for i in range(len(self.blocks))),
            "final_norm.",
            "embed." if self.head is None else "head.",
        ]
