"""RoPE's inverse frequencies, with Llama 3's long-context scaling when model.rope_scaling is set.

Llama 3.1+ (``rope_scaling: {rope_type: llama3}``) keeps the high frequencies (wavelengths shorter
than original_context / high_freq_factor), divides the low ones (longer than original_context /
low_freq_factor) by ``factor``, and blends linearly in between. The rule is Meta's reference
``apply_scaling`` (llama-models), which transformers' ``_compute_llama3_parameters`` also follows.
"""

from __future__ import annotations

import math

import torch

from megatron_llm.model.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """(head_dim / 2,) float64 angle per position of each rotated pair."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta**exponents
    if cfg.rope_scaling == "llama3":
        inv_freq = _llama3(cfg, inv_freq)
    return inv_freq


def _llama3(cfg: ModelConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    factor, context = cfg.rope_scaling_factor, cfg.rope_original_seq_length
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    # Between the two bands: 0 at the low-frequency edge, 1 at the high-frequency edge.
    smooth = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq
