"""Hugging Face transformers conversion: GPT2LMHeadModel and LlamaForCausalLM, both ways
(MixtralForCausalLM and Qwen2MoeForCausalLM for model.moe: megatron_llm/checkpoint/hf_moe.py).

What converts (logits equal within 1e-5, tested against the real transformers classes):
- GPT-2: tanh gelu, tied head, any vocabulary; Llama: tied or untied head, grouped-query
  attention, an explicit ``head_dim`` (our ``model.kv_channels``), RoPE plain or with Llama 3's
  ``rope_scaling`` (type ``llama3``), biases when ``attention_bias == mlp_bias``.
- The vocabulary: ours is padded to ``lcm(model.pad_vocab_multiple, parallel.tp)`` rows. Import
  pads the HF matrices with the mean of their rows (as transformers' own
  ``resize_token_embeddings``: each padding token then gets at most the average probability, so
  the loss barely moves) and records the HF size as ``model.vocab_size``; export trims back to
  ``model.vocab_size`` (else the tokenizer's size). HF -> ours -> HF gives back the same tensors.
Anything else is refused at import with a ConversionError naming the field (:func:`model_fields`).
The parameter name maps live with the model: megatron_llm/model/hf_names.py.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_llm.model.config import ModelConfig

Tensor = torch.Tensor
VOCAB_ROWS = ("embed.weight", "head.weight")  # the tensors whose rows are the vocabulary
LLAMA3_ROPE_KEYS = {
    "factor": "rope_scaling_factor",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "original_max_position_embeddings": "rope_original_seq_length",
}


class ConversionError(ValueError):
    """A model that the target format cannot express, with the field that stops it."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConversionError(message)


# ---- ours -> HF ----------------------------------------------------------------------------


def class_name(cfg: ModelConfig) -> str:
    """The transformers class our model exports as (ConversionError when none can hold it)."""
    if cfg.moe.num_experts:
        from megatron_llm.checkpoint import hf_moe

        return hf_moe.class_name(cfg)
    return "GPT2LMHeadModel" if cfg.style == "gpt2" else "LlamaForCausalLM"


def hf_config(cfg: ModelConfig, vocab_size: int, ids: dict[str, int | None]) -> Any:
    """The transformers config of our model; ``ids``: bos/eos/pad token ids (None = unset)."""
    import transformers

    tokens = {f"{k}_token_id": ids.get(k) for k in ("bos", "eos", "pad")}
    if cfg.style == "gpt2":
        _require(cfg.norm == "layernorm", f"GPT-2 needs model.norm=layernorm, not {cfg.norm}")
        _require(cfg.activation == "gelu", f"GPT-2 needs gelu, not {cfg.activation}")
        _require(cfg.position == "learned", f"GPT-2 needs learned positions, not {cfg.position}")
        _require(bool(cfg.bias), "GPT-2 needs model.bias=true")
        _require(bool(cfg.tie_embeddings), "GPT-2 needs model.tie_embeddings=true")
        _require(cfg.num_kv_heads == cfg.num_heads, "GPT-2 has no grouped-query attention")
        _require(cfg.kv_channels is None, "GPT-2 needs model.kv_channels=null")
        return transformers.GPT2Config(
            vocab_size=vocab_size,
            n_positions=cfg.seq_length,
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.ffn_hidden_size,
            activation_function="gelu_new",  # the tanh approximation, as our MLP
            layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **tokens,
        )
    _require(cfg.norm == "rmsnorm", f"Llama needs model.norm=rmsnorm, not {cfg.norm}")
    _require(cfg.activation == "swiglu", f"Llama needs swiglu, not {cfg.activation}")
    _require(cfg.position == "rope", f"Llama needs rope, not {cfg.position}")
    scaling = None
    if cfg.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3"}
        scaling |= {theirs: getattr(cfg, ours) for theirs, ours in LLAMA3_ROPE_KEYS.items()}
    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.seq_length,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.tie_embeddings),
        **tokens,
    )
    if cfg.moe.num_experts:
        from megatron_llm.checkpoint import hf_moe

        return hf_moe.hf_config(cfg, common)
    return transformers.LlamaConfig(
        **common, attention_bias=bool(cfg.bias), mlp_bias=bool(cfg.bias)
    )


def export_vocab_size(cfg: ModelConfig, rows: int, tokenizer_size: int | None) -> int:
    """The HF vocabulary: model.vocab_size, else the tokenizer's size (our padding trimmed)."""
    size = cfg.vocab_size or tokenizer_size or rows
    _require(size <= rows, f"vocabulary of {size} exceeds the checkpoint's {rows} embedding rows")
    return size


def trim_vocab(weights: dict[str, Tensor], size: int) -> dict[str, Tensor]:
    return {n: t[:size].clone() if n in VOCAB_ROWS else t for n, t in weights.items()}


# ---- HF -> ours ----------------------------------------------------------------------------


def pad_vocab(weights: dict[str, Tensor], rows: int) -> dict[str, Tensor]:
    """Vocabulary matrices padded to ``rows`` with the mean of their rows (see the docstring)."""
    out = dict(weights)
    for name in VOCAB_ROWS:
        if name in out and out[name].shape[0] < rows:
            table = out[name]
            fill = table.mean(dim=0, keepdim=True).expand(rows - table.shape[0], -1)
            out[name] = torch.cat([table, fill]).contiguous()
    return out


def padded_rows(cfg: ModelConfig, tp: int) -> int:
    """Embedding rows of a run at tensor parallelism ``tp`` (as training builds the model)."""
    return cfg.padded_vocab_size(cfg.vocab_size or 0, tp)


def model_fields(hf: Any) -> dict[str, Any]:
    """Our ``model`` section for an HF config; ConversionError naming any unsupported field."""
    from megatron_llm.checkpoint import hf_moe

    if hf.model_type == "gpt2":
        return _gpt2_fields(hf)
    if hf.model_type == "mixtral":
        return _llama_fields(hf) | hf_moe.mixtral_fields(hf)
    if hf.model_type == "qwen2_moe":
        return _llama_fields(hf) | hf_moe.qwen2_moe_fields(hf)
    _require(
        hf.model_type == "llama",
        f"model_type {hf.model_type!r}: only gpt2, llama, mixtral and qwen2_moe (GPT2LMHeadModel, "
        "LlamaForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM) convert",
    )
    return _llama_fields(hf)


def _gpt2_fields(hf: Any) -> dict[str, Any]:
    _require(
        hf.activation_function in ("gelu_new", "gelu_pytorch_tanh"),
        f"GPT-2 activation_function={hf.activation_function!r}: only the tanh gelu "
        "(gelu_new) is supported",
    )
    for field, supported in (
        ("scale_attn_by_inverse_layer_idx", False),
        ("reorder_and_upcast_attn", False),
        ("scale_attn_weights", True),
        ("add_cross_attention", False),
        ("tie_word_embeddings", True),
    ):
        value = bool(getattr(hf, field, supported))
        _require(
            value == supported,
            f"GPT-2 {field}={value}: not supported (our GPT-2 attention needs {supported})",
        )
    return {
        "style": "gpt2",
        "num_layers": hf.n_layer,
        "hidden_size": hf.n_embd,
        "num_heads": hf.n_head,
        "num_kv_heads": hf.n_head,
        "ffn_hidden_size": hf.n_inner or 4 * hf.n_embd,
        "seq_length": hf.n_positions,
        "vocab_size": hf.vocab_size,
        "norm_eps": hf.layer_norm_epsilon,
    }


def _llama_fields(hf: Any) -> dict[str, Any]:
    _require(hf.hidden_act == "silu", f"Llama hidden_act={hf.hidden_act!r}: only silu")
    # Mixtral has neither field (no biases); Qwen2-MoE's qkv_bias is checked in hf_moe.py.
    attention_bias = bool(getattr(hf, "attention_bias", False))
    mlp_bias = bool(getattr(hf, "mlp_bias", False))
    _require(
        attention_bias == mlp_bias,
        f"Llama attention_bias={attention_bias} with mlp_bias={mlp_bias}: our model has one "
        "model.bias for both",
    )
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    fields = {
        "style": "llama",
        "num_layers": hf.num_hidden_layers,
        "hidden_size": hf.hidden_size,
        "num_heads": hf.num_attention_heads,
        "num_kv_heads": hf.num_key_value_heads,
        "ffn_hidden_size": hf.intermediate_size,
        "seq_length": hf.max_position_embeddings,
        "vocab_size": hf.vocab_size,
        "norm_eps": hf.rms_norm_eps,
        "bias": attention_bias,
        "tie_embeddings": bool(hf.tie_word_embeddings),
        "attention_dropout": float(getattr(hf, "attention_dropout", 0.0) or 0.0),
    }
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        fields["kv_channels"] = head_dim
    return fields | _rope_fields(hf)


def rope_parameters(hf: Any) -> dict[str, Any]:
    """The RoPE settings wherever this transformers version keeps them: ``rope_parameters``
    (5.x, rope_theta inside) or ``rope_scaling`` + ``rope_theta`` (4.x, type or rope_type)."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    params.update(getattr(hf, "rope_scaling", None) or {})
    if "type" in params:  # 4.x's older spelling
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    return params


def _rope_fields(hf: Any) -> dict[str, Any]:
    params = rope_parameters(hf)
    kind = params.pop("rope_type")
    fields: dict[str, Any] = {"rope_theta": float(params.pop("rope_theta"))}
    _require(
        kind in ("default", "llama3"),
        f"Llama rope_scaling type {kind!r}: only plain RoPE and 'llama3' are supported",
    )
    if kind == "llama3":
        fields["rope_scaling"] = "llama3"
        for theirs, ours in LLAMA3_ROPE_KEYS.items():
            _require(theirs in params, f"Llama rope_scaling (llama3) has no {theirs!r}")
            value = params.pop(theirs)
            fields[ours] = int(value) if ours == "rope_original_seq_length" else float(value)
    # transformers may fill these with their neutral values; anything else changes the angles.
    neutral = {"partial_rotary_factor": 1.0, "attention_factor": 1.0}
    for key, value in params.items():
        _require(
            value is None or neutral.get(key) == value,
            f"Llama rope_scaling {key}={value!r}: not supported",
        )
    return fields


def check_state(model: Any, state: dict[str, Tensor], tied: bool) -> None:
    """Every HF parameter filled and nothing extra (a tied head is the embedding itself)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    _require(
        not missing and not unexpected,
        f"HF model mismatch: missing {missing}, unexpected {unexpected}",
    )


def check_all_converted(hf_state: dict[str, Tensor], ours: dict[str, Tensor], tied: bool) -> None:
    """Import refuses HF parameters it would drop (e.g. a head that is not the embedding)."""
    if tied and "lm_head.weight" in hf_state:
        head, embed = hf_state["lm_head.weight"], hf_state.get("model.embed_tokens.weight")
        if embed is None:
            embed = hf_state.get("transformer.wte.weight")
        _require(
            embed is not None and torch.equal(head, embed),
            "tie_word_embeddings=true but lm_head.weight differs from the embedding",
        )
    used = sum(t.numel() for t in ours.values())
    # Every HF tensor but the tied head and the attention-mask buffers lands somewhere in ours.
    total = sum(
        t.numel()
        for n, t in hf_state.items()
        if not (tied and n == "lm_head.weight") and not n.endswith((".attn.bias", ".masked_bias"))
    )
    _require(used == total, f"import would drop {total - used} of the HF model's parameters")
