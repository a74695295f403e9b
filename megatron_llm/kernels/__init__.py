"""Fused ops the model calls: layer norm, RMS norm and causal attention.

Each op runs the fused CUDA kernel of csrc/ (through megatron_llm.kernels.fused) when all of
these hold, and its PyTorch reference (megatron_llm.kernels.reference) otherwise:

- the extension `megatron_llm_kernels` is built (setup.py builds it when torch has CUDA and nvcc
  is found) and imports;
- neither MEGATRON_LLM_KERNELS=torch (environment) nor impl="torch" (the model's
  `model.kernels: torch`) forces the fallback;
- the tensors are on CUDA and fit the kernels: norms take fp32/fp16/bf16 with hidden size up to
  32768; attention takes fp16/bf16, head_dim 64 or 128, equal query and key lengths, no dropout,
  on a GPU of compute capability 8.0 or newer (its tensor-core instructions).

`backend()` says which path this process takes and `backend_reason()` why. The fallback is
always correct, so a run never fails for want of the extension; it is only slower.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

from megatron_llm.kernels import fused, reference

Impl = Literal["auto", "torch"]
ENV = "MEGATRON_LLM_KERNELS"
_NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
_NORM_MAX_HIDDEN = 32768  # kNormMaxHidden in csrc/kernels.h
_ATTENTION_HEAD_DIMS = (64, 128)


def _forced_by_env() -> bool:
    value = os.environ.get(ENV, "").strip().lower()
    if value not in ("", "auto", "torch"):
        raise ValueError(f"{ENV}={value!r}: expected 'torch' (force the fallback), 'auto' or unset")
    return value == "torch"


def backend_reason() -> str:
    """Why this process uses the PyTorch fallback; '' when the CUDA kernels are in use. A call can
    still fall back for its own reasons (CPU tensors, dtype, sizes, dropout, impl='torch')."""
    if _forced_by_env():
        return f"forced by {ENV}=torch"
    if fused.ext is None:
        return (
            f"extension megatron_llm_kernels not built ({fused.IMPORT_ERROR}); see csrc/README.md"
        )
    if not torch.cuda.is_available():
        return "no CUDA device"
    return ""


def backend() -> str:
    """'cuda' when the fused kernels run on CUDA tensors in this process, else 'torch'."""
    return "torch" if backend_reason() else "cuda"


def _is_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda  # a function, so that CPU tests can pretend and exercise the fused path


def _use_fused(impl: Impl, *tensors: torch.Tensor | None) -> bool:
    if impl not in ("auto", "torch"):
        raise ValueError(f"kernels impl={impl!r}: expected 'auto' or 'torch'")
    if impl == "torch" or fused.ext is None or _forced_by_env():
        return False
    return all(t is None or _is_cuda(t) for t in tensors)


def _norm_fits(x: torch.Tensor) -> bool:
    return x.dtype in _NORM_DTYPES and 0 < x.shape[-1] <= _NORM_MAX_HIDDEN and x.numel() > 0


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    impl: Impl = "auto",
) -> torch.Tensor:
    if _use_fused(impl, x, weight, bias) and _norm_fits(x):
        return fused.LayerNormFunction.apply(x, weight, bias, eps)
    return reference.layer_norm(x, weight, bias, eps)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, impl: Impl = "auto"
) -> torch.Tensor:
    if _use_fused(impl, x, weight) and _norm_fits(x):
        return fused.RMSNormFunction.apply(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


@functools.cache
def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _capability(t: torch.Tensor) -> tuple[int, int]:
    # CPU tensors get here only in tests that pretend they are on CUDA: any capability will do.
    return _cuda_capability(t.device) if t.is_cuda else (9, 0)


def _attention_fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> bool:
    return (
        dropout_p == 0.0
        and q.dtype in _ATTENTION_DTYPES
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and q.dim() == 4
        and q.shape[-1] in _ATTENTION_HEAD_DIMS
        and k.shape == v.shape
        and k.shape[0] == q.shape[0]
        and k.shape[2:] == q.shape[2:]  # equal lengths: the causal mask is the plain triangle
        and q.shape[1] % k.shape[1] == 0
        and q.numel() > 0
        and _capability(q) >= (8, 0)  # the kernels' mma.sync m16n8k16 (bf16 needs sm_80)
    )


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    impl: Impl = "auto",
) -> torch.Tensor:
    """q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim); returns
    (batch, heads, seq, head_dim). Query head h reads key/value head h // (heads // kv_heads)."""
    if _use_fused(impl, q, k, v) and _attention_fits(q, k, v, dropout_p):
        return fused.CausalAttentionFunction.apply(q, k, v)
    return reference.causal_attention(q, k, v, dropout_p)
