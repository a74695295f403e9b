"""Mixture-of-experts models <-> transformers' MixtralForCausalLM and Qwen2MoeForCausalLM.

What converts (logits equal within 1e-5, tests/test_moe_hf.py against the real classes):
- Mixtral: a Llama-style model (no biases) whose every layer is MoE, softmax router, top-k
  weights renormalised (``model.moe.normalize_top_k=true``), no shared experts. Mixtral's
  ``intermediate_size`` is our expert width.
- Qwen2-MoE: a Llama-style model without biases (``qkv_bias=false``: our one ``model.bias`` cannot
  put biases on q, k, v alone), softmax router, top-k renormalised or not (``norm_topk_prob``),
  one shared expert MLP of ``shared_experts x`` the expert width with its sigmoid gate
  (``model.moe.shared_expert_gate=true``), dense layers anywhere ``first_dense``/``every`` put
  them (written as ``mlp_only_layers``; read back from ``mlp_only_layers`` and
  ``decoder_sparse_step`` when they are a first-dense-then-every-N pattern).
Refused with one line naming the field: sigmoid routers (DeepSeek-V3 also needs multi-head
latent attention, which our attention cannot express), shared experts without a gate, sliding
windows, router jitter, dense layers in Mixtral, GPT-2-style MoE. A capacity factor exports with a
warning: transformers routes dropless, so logits differ where our run dropped tokens. Needs
transformers 5 (stacked experts in memory; it writes Mixtral's per-expert files itself); 4.x is
refused in one line.
"""

from __future__ import annotations

import sys
from typing import Any

from megatron_llm.checkpoint.hf import ConversionError
from megatron_llm.model.config import ModelConfig


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConversionError(message)


def require_fused_experts() -> None:
    """transformers 5 holds an MoE layer's experts stacked (``experts.gate_up_proj``), which is
    the layout megatron_llm/model/hf_names.py maps; 4.x keeps one module per expert."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    _require(
        major >= 5,
        f"MoE conversion needs transformers>=5 (its stacked expert weights); installed "
        f"{transformers.__version__}: pip install 'transformers>=5,<6'",
    )


def class_name(cfg: ModelConfig) -> str:
    """The transformers class of an MoE model (ConversionError when none expresses it)."""
    moe = cfg.moe
    _require(cfg.style == "llama", "MoE models export as Mixtral or Qwen2-MoE: model.style=llama")
    _require(not cfg.bias, "MoE export: Mixtral and Qwen2-MoE have no biases (model.bias=true)")
    _require(
        moe.score == "softmax",
        f"model.moe.score={moe.score!r}: Mixtral and Qwen2-MoE route by softmax (DeepSeek-V3's "
        "sigmoid router also needs multi-head latent attention, which we cannot express)",
    )
    if not moe.shared_experts:
        _require(
            moe.first_dense == 0 and moe.every == 1,
            f"Mixtral has an MoE MLP in every layer; model.moe.first_dense={moe.first_dense}, "
            f"every={moe.every} need a shared expert with a gate (Qwen2-MoE) to export",
        )
        _require(
            moe.normalize_top_k,
            "Mixtral renormalises the top-k weights: model.moe.normalize_top_k=false has no "
            "Mixtral form (Qwen2-MoE needs a gated shared expert)",
        )
        return "MixtralForCausalLM"
    _require(
        moe.shared_expert_gate,
        f"model.moe.shared_experts={moe.shared_experts} without shared_expert_gate: no "
        "transformers class holds ungated shared experts with our attention (DeepSeek-V3 needs "
        "multi-head latent attention)",
    )
    return "Qwen2MoeForCausalLM"


def hf_config(cfg: ModelConfig, common: dict[str, Any]) -> Any:
    """The Mixtral or Qwen2-MoE config; ``common``: the Llama-style fields they share."""
    import transformers

    require_fused_experts()
    moe = cfg.moe
    if moe.capacity_factor is not None:
        print(
            f"warning: model.moe.capacity_factor={moe.capacity_factor}: transformers routes "
            "every token (dropless); its logits differ from ours wherever our layers dropped "
            "tokens over capacity",
            file=sys.stderr,
        )
    routed = {"num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_coeff}
    if class_name(cfg) == "MixtralForCausalLM":
        return transformers.MixtralConfig(
            **(common | routed | {"intermediate_size": moe.expert_ffn_hidden_size}),
            num_local_experts=moe.num_experts,
        )
    dense = [i for i in range(cfg.num_layers) if not moe.is_moe_layer(i)]
    return transformers.Qwen2MoeConfig(
        **(common | routed),  # intermediate_size: the dense layers' MLP, model.ffn_hidden_size
        moe_intermediate_size=moe.expert_ffn_hidden_size,
        shared_expert_intermediate_size=moe.shared_experts * moe.expert_ffn_hidden_size,
        num_experts=moe.num_experts,
        norm_topk_prob=moe.normalize_top_k,
        decoder_sparse_step=1,
        mlp_only_layers=dense,
        qkv_bias=False,
        use_sliding_window=False,
    )


# ---- HF -> ours ----------------------------------------------------------------------------


def mixtral_fields(hf: Any) -> dict[str, Any]:
    """Our ``model.moe`` section (and expert width) for a Mixtral config."""
    require_fused_experts()
    _require(
        getattr(hf, "sliding_window", None) is None,
        f"Mixtral sliding_window={hf.sliding_window}: sliding-window attention is not supported",
    )
    jitter = float(getattr(hf, "router_jitter_noise", 0.0) or 0.0)
    _require(jitter == 0.0, f"Mixtral router_jitter_noise={jitter}: not supported (only 0)")
    return {
        "moe": {
            "num_experts": hf.num_local_experts,
            "top_k": hf.num_experts_per_tok,
            "normalize_top_k": True,
            "score": "softmax",
            "aux_loss_coeff": float(hf.router_aux_loss_coef),
        }
    }


def qwen2_moe_fields(hf: Any) -> dict[str, Any]:
    """Our ``model.moe`` section (and dense width) for a Qwen2-MoE config."""
    require_fused_experts()
    _require(
        not hf.qkv_bias,
        "Qwen2-MoE qkv_bias=true: our model.bias puts biases on every linear or none, not on "
        "q, k, v alone",
    )
    _require(
        not getattr(hf, "use_sliding_window", False),
        "Qwen2-MoE use_sliding_window=true: sliding-window attention is not supported",
    )
    width, shared = hf.moe_intermediate_size, hf.shared_expert_intermediate_size
    _require(
        shared > 0 and shared % width == 0,
        f"Qwen2-MoE shared_expert_intermediate_size={shared}: must be a positive multiple of "
        f"moe_intermediate_size={width} (our shared experts are whole experts)",
    )
    first_dense, every = _moe_pattern(hf)
    return {
        "ffn_hidden_size": hf.intermediate_size,
        "moe": {
            "num_experts": hf.num_experts,
            "top_k": hf.num_experts_per_tok,
            "normalize_top_k": bool(hf.norm_topk_prob),
            "score": "softmax",
            "shared_experts": shared // width,
            "shared_expert_gate": True,
            "expert_ffn_hidden_size": width,
            "aux_loss_coeff": float(hf.router_aux_loss_coef),
            "first_dense": first_dense,
            "every": every,
        },
    }


def _moe_pattern(hf: Any) -> tuple[int, int]:
    """(first_dense, every) giving Qwen2-MoE's MoE layers, or ConversionError."""
    layers = hf.num_hidden_layers
    dense = set(hf.mlp_only_layers or [])
    moe = [
        i
        for i in range(layers)
        if i not in dense and hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0
    ]
    _require(bool(moe), "Qwen2-MoE with no MoE layer: import it as a dense model instead")
    first, every = moe[0], (moe[1] - moe[0] if len(moe) > 1 else layers)
    _require(
        moe == list(range(first, layers, every)),
        f"Qwen2-MoE MoE layers {moe} (mlp_only_layers={sorted(dense)}, decoder_sparse_step="
        f"{hf.decoder_sparse_step}): ours are the layers from model.moe.first_dense on, every "
        "model.moe.every-th; this pattern has no such form",
    )
    return first, every
