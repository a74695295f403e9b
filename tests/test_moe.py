"""Mixture-of-experts layer (megatron_llm/model/moe.py) against a naive per-token reference.

The reference routes one token at a time in plain Python: its scores, its top-k experts by a
sort of its own, each expert's MLP written out with F.linear, capacity dropping by the stated
priority (per expert: highest router score first, then earlier token). Nothing of moe.py is
reused by it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_llm.config import ConfigError, load_config
from megatron_llm.model import GPT, ModelConfig
from megatron_llm.model.config import MoEConfig
from megatron_llm.model.gpt import MLP, Init, init_roles, init_values, mlp_for_layer
from megatron_llm.model.moe import GroupedExperts, MoE, set_aux_grad_scale
from megatron_llm.model.shape import block_parameters, flops_per_token, model_parameters

HIDDEN, FFN = 16, 24


def moe_cfg(style: str = "llama", **moe) -> ModelConfig:
    return ModelConfig(
        style=style,
        num_layers=2,
        hidden_size=HIDDEN,
        num_heads=2,
        seq_length=8,
        ffn_hidden_size=32,
        moe=MoEConfig(**{"num_experts": 4, "expert_ffn_hidden_size": FFN, **moe}),
    )


def moe_layer(cfg: ModelConfig, seed: int = 0) -> MoE:
    """An MoE layer with its router drawn N(0, 0.5) (scores far apart) and the rest N(0, 0.2)
    (outputs of order one)."""
    layer = mlp_for_layer(cfg, 0)
    assert isinstance(layer, MoE)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "router" in name else 0.2))
    return layer


def tokens(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(3, n // 3, HIDDEN, generator=torch.Generator().manual_seed(seed))


def reference_expert(layer: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    h = F.linear(x, ex.w_in[e].T)
    if ex.w_gate is not None:
        h = F.silu(F.linear(x, ex.w_gate[e].T)) * h
    else:
        h = F.gelu(h, approximate="tanh")
    return F.linear(h, ex.w_out[e].T)


def reference_routes(layer: MoE, flat: torch.Tensor) -> list[list[tuple[int, float, float]]]:
    """Per token: [(expert, score, weight)] for its top-k, best first."""
    cfg = layer.moe
    routes = []
    for x in flat:
        logits = [float((x * w).sum()) for w in layer.router.weight.detach()]
        if cfg.score == "softmax":
            m = max(logits)
            exps = [math.exp(v - m) for v in logits]
            scores = [v / sum(exps) for v in exps]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        chosen = sorted(range(len(scores)), key=lambda e: -scores[e])[: cfg.top_k]
        total = sum(scores[e] for e in chosen) if cfg.normalize_top_k else 1.0
        routes.append([(e, scores[e], scores[e] / total) for e in chosen])
    return routes


def reference_kept(layer: MoE, routes: list) -> set[tuple[int, int]]:
    """The (token, expert) assignments kept: all, or per expert the first ``capacity`` by
    (highest score, earlier token)."""
    assignments = [(t, e, s) for t, r in enumerate(routes) for e, s, _ in r]
    if layer.moe.capacity_factor is None:
        return {(t, e) for t, e, _ in assignments}
    cap = math.ceil(layer.moe.capacity_factor * len(routes) * layer.moe.top_k / 4)
    kept = set()
    for expert in range(layer.router.weight.shape[0]):
        mine = sorted((a for a in assignments if a[1] == expert), key=lambda a: (-a[2], a[0]))
        kept |= {(t, e) for t, e, _ in mine[:cap]}
    return kept


def reference(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, set[tuple[int, int]]]:
    """The layer's output computed token by token in float64, and the kept assignments."""
    layer = copy.deepcopy(layer).double()
    flat = x.reshape(-1, x.shape[-1]).double()
    routes = reference_routes(layer, flat)
    kept = reference_kept(layer, routes)
    out = []
    for t, token in enumerate(flat):
        y = torch.zeros(HIDDEN, dtype=torch.float64)
        for e, _, w in routes[t]:
            if (t, e) in kept:
                y = y + w * reference_expert(layer, e, token)
        if layer.shared is not None:
            shared = layer.shared(token)
            if layer.shared_gate is not None:
                shared = shared * torch.sigmoid((token * layer.shared_gate.weight[0]).sum())
            y = y + shared
        out.append(y)
    return torch.stack(out).view_as(x).float(), kept


CASES = [
    dict(score="softmax", top_k=1),
    dict(score="softmax", top_k=2),
    dict(score="sigmoid", top_k=1),
    dict(score="sigmoid", top_k=2),
    dict(score="softmax", top_k=2, normalize_top_k=False),
    dict(score="sigmoid", top_k=2, shared_experts=2),
    dict(score="softmax", top_k=2, shared_experts=1, shared_expert_gate=True),
    dict(score="softmax", top_k=3, capacity_factor=0.5),
    dict(score="sigmoid", top_k=2, capacity_factor=0.75),
    dict(score="softmax", top_k=1, capacity_factor=1.0),
]


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_layer_equals_per_token_reference(style, case):
    layer = moe_layer(moe_cfg(style, **case))
    x = tokens()
    with torch.no_grad():
        want, kept = reference(layer, x)
        got = layer(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    stats = layer.last_stats
    assert int(stats.dropped) == 12 * case["top_k"] - len(kept)
    if case.get("capacity_factor"):
        assert int(stats.dropped) > 0, "the case is meant to drop tokens"


def test_capacity_keeps_the_highest_scores_then_the_earliest_tokens():
    # Every token picks expert 1 first (a large router weight on feature 0, which is 1 for all)
    # with scores that rise with the token index except for a tie between tokens 2 and 5.
    cfg = moe_cfg(top_k=1, capacity_factor=1.0, aux_loss_coeff=0.0)  # capacity 6*1*1/4 -> 2
    layer = moe_layer(cfg)
    x = torch.zeros(1, 6, HIDDEN)
    x[0, :, 0] = 1.0
    x[0, :, 1] = torch.tensor([0.1, 0.2, 0.9, 0.3, 0.4, 0.9])
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[1, 0] = 5.0
        layer.router.weight[1, 1] = 1.0
        y = layer(x)
    kept = [t for t in range(6) if y[0, t].abs().sum() > 0]
    assert kept == [2, 5]  # the two highest scores (tied: both kept); the rest dropped
    assert int(layer.last_stats.dropped) == 4
    assert layer.last_stats.tokens_per_expert.tolist() == [0, 6, 0, 0]  # counted before dropping
    x[0, :, 1] = torch.tensor([0.1, 0.2, 0.9, 0.3, 0.1, 0.3])  # 2, then 3 before tied 5
    with torch.no_grad():
        y = layer(x)
    assert [t for t in range(6) if y[0, t].abs().sum() > 0] == [2, 3]


def hand_aux(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch/GShard E * sum_e f_e P_e (f_e: share of the n*k choices, P_e: mean probability;
    sigmoid scores normalized over all experts) and mean logsumexp(logits)^2, from loops."""
    flat = x.reshape(-1, HIDDEN)
    n, e_count, k = flat.shape[0], layer.router.weight.shape[0], layer.moe.top_k
    logits = flat @ layer.router.weight.T  # (n, E), keeps the graph to the router
    probs = logits.softmax(-1) if layer.moe.score == "softmax" else logits.sigmoid()
    probs = probs / probs.sum(-1, keepdim=True)
    chosen = [[e for e, _, _ in r] for r in reference_routes(layer, flat)]
    f = [sum(c.count(e) for c in chosen) / (n * k) for e in range(e_count)]
    aux = e_count * sum(f[e] * probs[:, e].mean() for e in range(e_count))
    z = sum(torch.log(torch.exp(row).sum()) ** 2 for row in logits) / n
    return aux, z


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_aux_and_z_loss_by_hand(score, top_k):
    layer = moe_layer(moe_cfg(score=score, top_k=top_k, capacity_factor=0.5))
    x = tokens()
    with torch.no_grad():
        layer(x)
        aux, z = hand_aux(layer, x)
    assert layer.last_stats.aux_loss.item() == pytest.approx(aux.item(), rel=1e-6)
    assert layer.last_stats.z_loss.item() == pytest.approx(z.item(), rel=1e-6)
    assert layer.last_stats.aux_loss.dtype == torch.float32


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_loss_gradient_reaches_the_router(score):
    """d(loss)/d(router) = that of the output alone + coefficients x d(aux, z)/d(router), times
    aux_grad_scale; and the output itself is not changed by the aux losses."""
    coeffs = dict(aux_loss_coeff=0.3, z_loss_coeff=0.05)
    x, g = tokens(), torch.randn(3, 4, HIDDEN, generator=torch.Generator().manual_seed(7))

    def router_grad(scale: float = 1.0, **c) -> tuple[torch.Tensor, torch.Tensor]:
        layer = moe_layer(moe_cfg(score=score, top_k=2, **c))
        layer.aux_grad_scale = scale
        y = layer(x)
        (y * g).sum().backward()
        return y.detach(), layer.router.weight.grad

    y0, plain = router_grad(aux_loss_coeff=0.0, z_loss_coeff=0.0)
    y1, with_aux = router_grad(**coeffs)
    _, scaled = router_grad(0.25, **coeffs)
    layer = moe_layer(moe_cfg(score=score, top_k=2, **coeffs))
    aux, z = hand_aux(layer, x)
    (0.3 * aux + 0.05 * z).backward()
    want = layer.router.weight.grad
    assert want.abs().max() > 1e-3 * plain.abs().max()  # not negligible: the test can see it
    assert torch.equal(y0, y1)
    torch.testing.assert_close(with_aux - plain, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scaled - plain, 0.25 * want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_all_tokens_to_one_expert_and_empty_experts(top_k):
    cfg = moe_cfg(top_k=top_k, num_experts=6)
    layer = moe_layer(cfg)
    x = tokens().abs() + 0.1  # positive features: the forced logits below win for every token
    with torch.no_grad():
        layer.router.weight.mul_(0.01)
        layer.router.weight[4] += 1.0
        layer.router.weight[1] += 0.5  # every token's second choice
        want, _ = reference(layer, x)
    layer.train()
    y = layer(x)
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)
    counts = [0] * 6
    counts[4] = 12
    if top_k == 2:
        counts[1] = 12
    assert layer.stats.tokens_per_expert.tolist() == counts
    y.square().sum().backward()
    for name in ("w_in", "w_gate", "w_out"):
        grad = getattr(layer.experts, name).grad
        assert grad is not None, f"{name}: an empty expert must still get a (zero) gradient"
        for e in range(6):
            assert (grad[e].abs().sum() > 0) == (counts[e] > 0), (name, e)


def test_every_token_dropped_but_for_capacity_and_empty_layer_input():
    layer = moe_layer(moe_cfg(top_k=1, capacity_factor=0.25))  # capacity 1 per expert
    x = tokens().abs() + 0.1
    with torch.no_grad():
        layer.router.weight.mul_(0.01)
        layer.router.weight[0] += 0.2  # not saturated: fp32 scores still differ per token
        want, kept = reference(layer, x)
        y = layer(x)
    torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-6)
    assert len(kept) == 1 and int(layer.last_stats.dropped) == 11
    with torch.no_grad():
        assert layer(torch.zeros(2, 0, HIDDEN)).shape == (2, 0, HIDDEN)


class HalfHere:
    """A two-rank dispatcher inside one process: this 'rank' holds experts [0, E/2); the other
    half runs on ``remote`` (holding rows [E/2, E)) during dispatch and comes back in combine."""

    def __init__(self, remote: GroupedExperts, half: int) -> None:
        self.remote, self.half = remote, half

    def dispatch(self, tokens, per_expert):
        here = int(per_expert[: self.half].sum())
        self.remote_out = self.remote(tokens[here:], per_expert[self.half :])
        return tokens[:here], per_expert[: self.half]

    def combine(self, out):
        return torch.cat([out, self.remote_out])


def test_layer_computes_on_the_expert_rows_it_holds():
    cfg = moe_cfg("gpt2", top_k=2, num_experts=4, shared_experts=1)
    layer = moe_layer(cfg)
    x = tokens()
    with torch.no_grad():
        want = layer(x)
    remote = GroupedExperts(cfg)
    with torch.no_grad():
        for name in ("w_in", "w_out"):
            whole = getattr(layer.experts, name)
            getattr(remote, name).data = whole[2:].clone()
            whole.data = whole[:2].clone()
    remote.expert_offset = 2
    layer.dispatcher = HalfHere(remote, 2)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert layer.last_stats.tokens_per_expert.shape == (4,)  # over global experts
    # Every token to the other half: the experts here get none, and still a (zero) gradient,
    # as DeepSpeed's reducers expect one for every parameter.
    with torch.no_grad():
        layer.router.weight[2:] += 1.0
    layer(x.abs() + 0.1).square().sum().backward()  # positive features: experts 2, 3 win
    assert layer.last_stats.tokens_per_expert.tolist() == [0, 0, 12, 12]
    for name in ("w_in", "w_out"):
        here = getattr(layer.experts, name)
        assert here.grad is not None and torch.equal(here.grad, torch.zeros_like(here))
        assert getattr(remote, name).grad.abs().sum() > 0


def test_stats_sum_over_training_forwards_not_recompute_not_eval():
    cfg = moe_cfg(top_k=2, first_dense=1, every=1)
    cfg.num_layers = 3
    model = GPT(cfg, 64)
    assert [type(b.mlp) for b in model.blocks] == [MLP, MoE, MoE]
    model.checkpoint_every = 1  # recomputes every block in backward
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    model.train()
    for _ in range(2):
        model(ids, ids).backward()
    model.eval()
    with torch.no_grad():
        model(ids)
    stats = model.moe_stats(reset=True)
    assert set(stats) == {"blocks.1.mlp", "blocks.2.mlp"}
    one = model.blocks[1].mlp.last_stats
    s = stats["blocks.1.mlp"]
    assert s.micro_batches == 2
    assert s.tokens_per_expert.tolist() == (2 * one.tokens_per_expert).tolist()
    assert int(s.tokens_per_expert.sum()) == 2 * 16 * 2
    assert s.aux_loss.item() == pytest.approx(2 * one.aux_loss.item(), rel=1e-6)
    assert model.moe_stats() == {}  # reset


def test_router_runs_in_fp32_under_bf16():
    layer = moe_layer(moe_cfg(top_k=2)).to(torch.bfloat16)
    x = tokens().to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    logits = x.reshape(-1, HIDDEN).float() @ layer.router.weight.float().T
    z = torch.logsumexp(logits, -1).square().mean()
    assert layer.last_stats.z_loss.item() == pytest.approx(z.item(), rel=1e-6)


def test_dense_default_and_moe_layer_placement():
    assert ModelConfig().moe.num_experts == 0
    dense = GPT(ModelConfig(num_layers=2, hidden_size=32, num_heads=2, seq_length=8), 64)
    assert not any(isinstance(m, MoE) for m in dense.modules())
    cfg = MoEConfig(num_experts=4, every=2, first_dense=1)
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]


def test_expert_init_by_role_and_stacked_layout():
    cfg = moe_cfg("llama", top_k=2, shared_experts=1)
    model = GPT(cfg, 64)
    roles = init_roles(model)
    assert roles["blocks.0.mlp.experts.w_out"] is Init.RESIDUAL
    assert roles["blocks.0.mlp.shared.fc_out.weight"] is Init.RESIDUAL
    assert roles["blocks.0.mlp.experts.w_in"] is Init.NORMAL
    assert roles["blocks.0.mlp.router.weight"] is Init.NORMAL
    experts = model.blocks[0].mlp.experts
    assert experts.w_in.shape == (4, HIDDEN, FFN) and experts.w_out.shape == (4, FFN, HIDDEN)
    assert all(p.expert_parallel for p in experts.parameters())
    assert not hasattr(model.blocks[0].mlp.router.weight, "expert_parallel")
    values = dict(init_values(model, 0))
    residual = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    assert values["blocks.1.mlp.experts.w_out"].std().item() == pytest.approx(residual, rel=0.1)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_shape_counts_total_and_active(style):
    cfg = moe_cfg(style, top_k=2, shared_experts=1, shared_expert_gate=True, first_dense=1)
    model = GPT(cfg, 64)
    for i, block in enumerate(model.blocks):
        assert block_parameters(cfg, layer=i) == sum(p.numel() for p in block.parameters())
    assert model_parameters(cfg, 64) == model.num_parameters()
    m = 3 if style == "llama" else 2
    unused = 2 * m * HIDDEN * FFN  # two of the four experts of the MoE layer
    assert model_parameters(cfg, 64, active=True) == model.num_parameters() - unused
    assert block_parameters(cfg, layer=1, ep=2) == block_parameters(cfg, layer=1) - unused
    # FLOPs: the dense config's, with layer 1's MLP swapped for router + 2 experts + shared.
    dense = moe_cfg(style, num_experts=0)
    swap = 2 * HIDDEN * 4 + 2 * 2 * m * HIDDEN * FFN + 2 * m * HIDDEN * FFN + 2 * HIDDEN
    swap -= 2 * m * HIDDEN * 32
    assert flops_per_token(cfg, 64) == flops_per_token(dense, 64) + 3 * swap


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.moe.num_experts=-1", "model.moe.num_experts"),
        ("model.moe.top_k=5", "model.moe.top_k"),
        ("model.moe.top_k=0", "model.moe.top_k"),
        ("model.moe.every=0", "model.moe.every"),
        ("model.moe.capacity_factor=0", "model.moe.capacity_factor"),
        ("model.moe.aux_loss_coeff=-1", "model.moe.aux_loss_coeff"),
        ("model.moe.expert_ffn_hidden_size=0", "model.moe.expert_ffn_hidden_size"),
        ("model.moe.score=relu", "model.moe.score"),
        ("model.moe.shared_expert_gate=true", "model.moe.shared_expert_gate"),
    ],
)
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.moe.num_experts=4", override])
    assert field in str(err.value) and "\n" not in str(err.value)


def test_config_loads_moe_section():
    cfg = load_config(None, ["model.moe.num_experts=8", "model.moe.capacity_factor=1.25"]).model
    assert cfg.moe.num_experts == 8 and cfg.moe.capacity_factor == 1.25
    assert cfg.moe.expert_ffn_hidden_size == cfg.ffn_hidden_size


def test_activation_checkpointing_gives_the_same_gradients_aux_included():
    cfg = moe_cfg("gpt2", top_k=2, aux_loss_coeff=0.1, z_loss_coeff=0.01, capacity_factor=1.0)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    grads = []
    for every in (0, 1):
        torch.manual_seed(0)
        model = GPT(cfg, 64)
        set_aux_grad_scale(model, 0.5)
        model.checkpoint_every = every
        model(ids, ids).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=0, rtol=0, msg=name)
    assert model.blocks[0].mlp.aux_grad_scale == 0.5


def deepspeed_moe_run(overrides: list[str]) -> dict:
    from tests.parallel_runs import layout, train_layout

    return train_layout(layout("llama", **{"train__steps": 4}) + overrides)


def test_tiny_moe_gpt_trains_in_a_real_deepspeed_engine():
    from tests.distributed import run_on_ranks

    moe = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.capacity_factor=1.0"]
    out = run_on_ranks(1, deepspeed_moe_run, moe)[0]
    losses = [float(x) for x in out["losses"]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.1, losses
    for name in ("router.weight", "experts.w_in", "experts.w_gate", "experts.w_out"):
        assert abs(out["grads"][f"blocks.1.mlp.{name}"]).sum() > 0, name
