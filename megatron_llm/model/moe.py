"""Mixture-of-experts MLP (model.moe): a router, stacked routed experts, optional shared experts.

Reads as a single-device layer, top to bottom:

    route     fp32 router logits -> scores (softmax or sigmoid) -> each token's top-k experts
              and weights; the assignments sorted by global expert (dropping those over
              capacity when model.moe.capacity_factor is set)
    dispatch  the Dispatcher moves the sorted tokens to whoever holds their experts (this rank
              at ep=1: LocalDispatcher; parallel/experts.py's all-to-all under parallel.ep)
    experts   each local expert's MLP on its contiguous range of tokens
    combine   the Dispatcher brings the outputs back; each token sums its experts' outputs times
              their weights, plus the shared experts' MLP

Expert weights are STACKED: one parameter per kind, dim 0 the global expert index (like
Megatron-Core's GroupedMLP), carrying ``expert_parallel = True``:

    experts.w_in    (E, hidden, ffn)   x @ w_in[e]
    experts.w_gate  (E, hidden, ffn)   SwiGLU only: silu(x @ w_gate[e]) * (x @ w_in[e])
    experts.w_out   (E, ffn, hidden)   writes into the residual stream (init_roles: RESIDUAL)

Under expert parallelism a rank holds rows [expert_offset, expert_offset + E/ep) of dim 0 and
the layer computes on whatever rows it holds: the dispatcher hands it the tokens of those
experts, sorted by local expert. Experts have no biases (as Mixtral, DeepSeek, Qwen-MoE).

Auxiliary losses (load balancing, z-loss) reach the gradients through AuxLossScaler on the
layer's output (Megatron's MoEAuxLossAutoScaler): the output is unchanged, and its backward also
backpropagates coeff x d(aux)/d(router logits), so the loss function and the pipeline need no
change. Each layer keeps its last forward's detached MoEStats for the metrics (moe_stats).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from megatron_llm.model.config import ModelConfig


class Dispatcher(Protocol):
    """Moves tokens sorted by global expert to the ranks holding the experts, and back."""

    def dispatch(
        self, tokens: torch.Tensor, per_expert: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (n, hidden) sorted by global expert, per_expert (num_experts,) their counts ->
        the tokens for this rank's local experts sorted by local expert, and their counts."""
        ...

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """The inverse of the last dispatch: the local experts' outputs back in the order
        dispatch was given."""
        ...


class LocalDispatcher:
    """ep=1: every expert is here, so the sorted tokens already are the local experts' tokens."""

    def dispatch(
        self, tokens: torch.Tensor, per_expert: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens, per_expert

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        return out


@dataclasses.dataclass
class MoEStats:
    """One MoE layer's routing statistics, detached, on the layer's device (no host sync): of
    one forward, or summed over the training forwards since the last pop_stats."""

    aux_loss: torch.Tensor  # () fp32, the load-balancing loss before its coefficient
    z_loss: torch.Tensor  # () fp32, the router z-loss before its coefficient
    tokens_per_expert: torch.Tensor  # (num_experts,) int64 over GLOBAL experts, before dropping
    dropped: torch.Tensor  # () int64, token-expert assignments dropped over capacity
    micro_batches: int = 1  # forwards summed here

    def __add__(self, other: MoEStats) -> MoEStats:
        return MoEStats(
            aux_loss=self.aux_loss + other.aux_loss,
            z_loss=self.z_loss + other.z_loss,
            tokens_per_expert=self.tokens_per_expert + other.tokens_per_expert,
            dropped=self.dropped + other.dropped,
            micro_batches=self.micro_batches + other.micro_batches,
        )


def recomputing() -> bool:
    """Whether this forward is activation checkpointing's recompute: it runs inside backward
    (an autograd graph task), and its statistics were already counted by the first forward."""
    return torch._C._current_graph_task_id() >= 0


class AuxLossScaler(torch.autograd.Function):
    """Identity on the layer output in forward; in backward it also starts the backward of the
    auxiliary loss with gradient ``scale`` (its coefficients are already inside ``aux``)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


def expert_activation(
    x: torch.Tensor, w_in: torch.Tensor, w_gate: torch.Tensor | None, w_out: torch.Tensor
) -> torch.Tensor:
    """One expert's MLP on its tokens x (count, hidden): SwiGLU with a gate, else GELU (tanh),
    the same functions as model/gpt.py's dense MLP."""
    if w_gate is not None:
        return (F.silu(x @ w_gate) * (x @ w_in)) @ w_out
    return F.gelu(x @ w_in, approximate="tanh") @ w_out


class GroupedExperts(nn.Module):
    """The routed experts' weights, stacked by expert (see the module docstring)."""

    residual_parameters = ("w_out",)  # init_roles: writes into the residual stream

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, h, f = cfg.moe.num_experts, cfg.hidden_size, cfg.moe.expert_ffn_hidden_size
        self.w_in = nn.Parameter(torch.empty(e, h, f))
        self.w_gate = nn.Parameter(torch.empty(e, h, f)) if cfg.activation == "swiglu" else None
        self.w_out = nn.Parameter(torch.empty(e, f, h))
        for p in self.parameters():
            p.expert_parallel = True  # dim 0 is the global expert index; ep slices it
        # The global index of row 0 of the stacked weights; parallel.ep sets it per rank.
        self.expert_offset = 0

    def forward(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """tokens (n, hidden) sorted by local expert, counts (local experts,) -> (n, hidden).
        A loop over the local experts on their contiguous ranges. An expert with no tokens
        still takes part (empty matmuls): when none of a rank's experts gets a token, their
        gradients are then zeros, not missing (DeepSpeed reduces every parameter's)."""
        # Host sync, deliberate: the split sizes must be known to slice (one per layer).
        sizes = counts.tolist()
        if len(sizes) != self.w_in.shape[0] or sum(sizes) != tokens.shape[0]:
            raise ValueError(
                f"MoE experts got counts for {len(sizes)} experts summing to {sum(sizes)} for "
                f"{self.w_in.shape[0]} local experts and {tokens.shape[0]} tokens; the "
                "dispatcher must return this rank's experts' tokens and their counts"
            )
        outs = []
        for e, chunk in enumerate(tokens.split(sizes)):
            gate = self.w_gate[e] if self.w_gate is not None else None
            outs.append(expert_activation(chunk, self.w_in[e], gate, self.w_out[e]))
        return torch.cat(outs)  # (n, hidden)


@dataclasses.dataclass
class Routing:
    """Where each kept token-expert assignment goes, in dispatch order (sorted by expert)."""

    token: torch.Tensor  # (kept,) the token's row in the flattened input
    slot: torch.Tensor  # (kept,) its position token * top_k + j among all assignments
    weight: torch.Tensor  # (kept,) fp32 routing weight
    per_expert: torch.Tensor  # (num_experts,) kept assignments per global expert
    stats: MoEStats
    aux: torch.Tensor | None  # coeff-weighted aux + z-loss with its graph, or None


def capacity(cfg_factor: float, tokens: int, top_k: int, num_experts: int) -> int:
    """Assignments an expert keeps: ceil(factor x tokens x top_k / num_experts) (GShard)."""
    return math.ceil(cfg_factor * tokens * top_k / num_experts)


class MoE(nn.Module):
    """The MLP of an MoE block: same input and output as model/gpt.py's MLP."""

    def __init__(self, cfg: ModelConfig, shared: nn.Module | None = None) -> None:
        super().__init__()
        self.moe = cfg.moe
        # Kept fp32 and applied in fp32 (forward casts): routing decisions in bf16 flip experts.
        self.router = nn.Linear(cfg.hidden_size, cfg.moe.num_experts, bias=False)
        self.experts = GroupedExperts(cfg)
        self.shared = shared  # the shared experts as one dense MLP (model/gpt.py builds it)
        # Qwen2-MoE's per-token sigmoid gate on the shared experts' output
        self.shared_gate = (
            nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.moe.shared_expert_gate else None
        )
        self.dispatcher: Dispatcher = LocalDispatcher()  # parallel.ep installs the all-to-all
        # Gradient the aux losses start their backward with: the training setup sets it to the
        # loss's own scale (1 / gradient-accumulation steps, times an fp16 loss scale).
        self.aux_grad_scale = 1.0
        self.last_stats: MoEStats | None = None  # the last forward's, training or not
        self.stats: MoEStats | None = None  # summed over training forwards since pop_stats

    def pop_stats(self) -> MoEStats | None:
        """The statistics summed since the last call (None if no training forward ran)."""
        stats, self.stats = self.stats, None
        return stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (n, hidden)
        routing = self.route(flat)
        self.last_stats = routing.stats
        if self.training and not recomputing():
            self.stats = routing.stats if self.stats is None else self.stats + routing.stats
        # (kept, hidden) sorted by global expert. Gathered from a (n, k, hidden) view at unique
        # (token, j): backward scatters without collisions and sums over k, deterministic on
        # CUDA (flat[token] would accumulate a token's k copies with atomics).
        tokens = flat.unsqueeze(1).expand(-1, self.moe.top_k, -1)[
            routing.token, routing.slot % self.moe.top_k
        ]
        local, counts = self.dispatcher.dispatch(tokens, routing.per_expert)
        out = self.dispatcher.combine(self.experts(local, counts))  # (kept, hidden)
        y = self.weighted_sum(out, routing, flat.shape[0])  # (n, hidden)
        if self.shared is not None:
            shared = self.shared(flat)  # (n, hidden)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            y = y + shared
        if routing.aux is not None and torch.is_grad_enabled():
            y = AuxLossScaler.apply(y, routing.aux, self.aux_grad_scale)
        return y.view_as(x)

    def weighted_sum(self, out: torch.Tensor, routing: Routing, n: int) -> torch.Tensor:
        """Each token's sum of its experts' outputs times their weights, in fp32. Written into
        one row per assignment (unique rows: deterministic on CUDA, unlike index_add) and summed
        over k; dropped assignments stay zero."""
        k = self.moe.top_k
        rows = out.new_zeros(n * k, out.shape[-1], dtype=torch.float32)
        rows = rows.index_copy(0, routing.slot, out.float() * routing.weight[:, None])
        return rows.view(n, k, out.shape[-1]).sum(dim=1).to(out.dtype)  # (n, hidden)

    def route(self, flat: torch.Tensor) -> Routing:
        cfg, n = self.moe, flat.shape[0]
        num_experts = self.router.weight.shape[0]
        logits = F.linear(flat.float(), self.router.weight.float())  # (n, E) fp32
        if cfg.score == "softmax":
            scores = logits.softmax(dim=-1)
            probs = scores
        else:
            scores = logits.sigmoid()
            probs = scores / scores.sum(dim=-1, keepdim=True)  # a distribution, for the aux loss
        top_scores, top_experts = scores.topk(cfg.top_k, dim=-1)  # (n, k)
        weights = top_scores
        if cfg.normalize_top_k:
            weights = top_scores / top_scores.sum(dim=-1, keepdim=True)
        expert = top_experts.flatten()  # (n * k,), token-major
        counts = torch.bincount(expert, minlength=num_experts)  # (E,)
        order, kept_counts = self.dispatch_order(expert, top_scores.flatten().detach(), n)
        aux_loss = load_balancing_loss(probs, counts, cfg.top_k)
        z_loss = router_z_loss(logits)
        stats = MoEStats(
            aux_loss=aux_loss.detach(),
            z_loss=z_loss.detach(),
            tokens_per_expert=counts.detach(),
            dropped=torch.tensor(n * cfg.top_k - order.shape[0], device=flat.device),
        )
        aux = None
        if cfg.aux_loss_coeff > 0 or cfg.z_loss_coeff > 0:
            aux = cfg.aux_loss_coeff * aux_loss + cfg.z_loss_coeff * z_loss
        return Routing(
            token=order // cfg.top_k,
            slot=order,
            weight=weights.flatten()[order],
            per_expert=kept_counts,
            stats=stats,
            aux=aux,
        )

    def dispatch_order(
        self, expert: torch.Tensor, score: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The assignments (indices into the token-major n*k list) sorted by expert, and the
        kept count per expert. Within an expert: highest router score first, ties by earlier
        token; with a capacity factor only the first ``capacity`` of each expert are kept."""
        num_experts = self.router.weight.shape[0]
        # Three stable sorts = one lexicographic sort by (expert, -score, position).
        by_score = torch.sort(score, descending=True, stable=True).indices
        order = by_score[torch.sort(expert[by_score], stable=True).indices]
        counts = torch.bincount(expert, minlength=num_experts)
        if self.moe.capacity_factor is None:
            return order, counts
        cap = capacity(self.moe.capacity_factor, n, self.moe.top_k, num_experts)
        starts = torch.cumsum(counts, 0) - counts  # (E,) first sorted index of each expert
        rank_in_expert = torch.arange(order.shape[0], device=order.device) - starts[expert[order]]
        keep = rank_in_expert < cap
        return order[keep], counts.clamp(max=cap)


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch/GShard: E x sum_e f_e x P_e, f_e = the share of the n x k assignments routed to
    e (before dropping; no gradient), P_e = the mean router probability of e. 1 when balanced."""
    n, num_experts = probs.shape
    f = counts.float() / (n * top_k)
    return num_experts * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2 (keeps router logits small)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def set_aux_grad_scale(model: nn.Module, scale: float) -> None:
    """Start every MoE layer's aux-loss backward with ``scale``: the factor the training loss
    itself is scaled by before backward (1 / gradient-accumulation steps under DeepSpeed, which
    divides the loss by them; times the fp16 loss scale), so the coefficients weigh the aux
    losses against the mean loss as configured."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.aux_grad_scale = scale


def moe_stats(model: nn.Module, reset: bool = False) -> dict[str, MoEStats]:
    """Every MoE layer's statistics summed over its training forwards (micro-batches) since the
    last reset, by module name (any module: a GPT or a pipeline stage); ``reset`` starts the
    next sums. Layers with no training forward since are left out."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            stats = module.pop_stats() if reset else module.stats
            if stats is not None:
                found[name] = stats
    return found
