"""Fused ops the model calls: layer norm, RMS norm and causal attention.

Each op runs our CUDA kernel of csrc/ (through megatron_llm.kernels.fused) when all of these
hold, and torch's path (megatron_llm.kernels.reference: F.layer_norm, F.rms_norm, and
F.scaled_dot_product_attention, which is flash / cuDNN attention on a GPU) otherwise:

- the extension `megatron_llm_kernels` is built (setup.py builds it when torch has CUDA and nvcc
  is found) and imports;
- the tensors are on CUDA and fit the kernels: norms take fp32/fp16/bf16 with hidden size up to
  32768; attention takes fp16/bf16, head_dim 64 or 128, equal query and key lengths, no dropout,
  on a GPU of compute capability 8.0 or newer (its tensor-core instructions), with or without
  segment ids (packed documents: the kernels' segment mode);
- the mode allows it. ``auto`` (the default): only where megatron_llm/kernels/measured.py holds
  a measurement showing ours faster than torch's path for that op, dtype, shape class and GPU
  architecture; nothing is measured yet, so torch's path runs everywhere. ``ours``: wherever it
  fits (opt in with MEGATRON_LLM_KERNELS=ours or `model.kernels: ours`). ``torch``: never
  (MEGATRON_LLM_KERNELS=torch or `model.kernels: torch`). torch from either side wins, then ours.

`backend()` says which path this process takes, `backend_reason()` why, and `status()` both in
one line. Torch's path is always correct, so a run never fails for want of the extension.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

from megatron_llm.kernels import fused, measured, reference

Impl = Literal["auto", "torch", "ours"]
_MODES = ("auto", "torch", "ours")
ENV = "MEGATRON_LLM_KERNELS"
_NORM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)
_NORM_MAX_HIDDEN = 32768  # kNormMaxHidden in csrc/kernels.h
_ATTENTION_HEAD_DIMS = (64, 128)


def _env_mode() -> str:
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(
            f"{ENV}={value!r}: expected 'auto' (ours where measured faster; the default), "
            "'ours' (ours wherever it fits) or 'torch' (never ours)"
        )
    return value


def _mode(impl: Impl) -> str:
    """The mode of one call: the model's impl and the environment; torch wins, then ours."""
    if impl not in _MODES:
        raise ValueError(f"kernels impl={impl!r}: expected 'auto', 'ours' or 'torch'")
    modes = (impl, _env_mode())
    return "torch" if "torch" in modes else "ours" if "ours" in modes else "auto"


def _cuda_capability_now() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def reason_for(mode: str, built: bool, capability: tuple[int, int] | None) -> str:
    """Why ``mode`` runs torch's path in a process with or without the extension and a GPU of
    ``capability`` (None: no CUDA); '' when our kernels run (where they fit)."""
    if mode == "torch":
        return f"torch's path forced ({ENV}=torch or model.kernels=torch)"
    if not built:
        return (
            f"extension megatron_llm_kernels not built ({fused.IMPORT_ERROR}); see csrc/README.md"
        )
    if capability is None:
        return "no CUDA device"
    if mode == "auto" and not measured.faster_classes(capability):
        return (
            f"torch's fused path by default: no measurement shows our kernels faster on "
            f"{measured.arch(capability)} (megatron_llm/kernels/measured.py is empty for it); "
            f"{ENV}=ours or model.kernels=ours opts in"
        )
    return ""


def backend_reason(impl: Impl = "auto") -> str:
    """Why this process runs torch's path for model.kernels=``impl``; '' when our kernels run.
    A call can still take torch's path for its own reasons (CPU tensors, dtype, sizes, dropout,
    and under auto a shape class no measurement covers)."""
    return reason_for(_mode(impl), fused.ext is not None, _cuda_capability_now())


def backend(impl: Impl = "auto") -> str:
    """'cuda' when our kernels run on CUDA tensors in this process (where they fit), else
    'torch'."""
    return "torch" if backend_reason(impl) else "cuda"


def status(impl: Impl = "auto") -> str:
    """One line for logs and scripts: the path, its reason, and under auto the measured
    classes where ours runs."""
    why = backend_reason(impl)
    if why:
        return f"torch: {why}"
    capability = _cuda_capability_now()
    if _mode(impl) == "ours" or capability is None:
        return f"cuda: our kernels wherever they fit ({ENV}=ours or model.kernels=ours)"
    return "cuda: our kernels, measured faster for " + "; ".join(
        measured.faster_classes(capability)
    )


def _is_cuda(t: torch.Tensor) -> bool:
    return t.is_cuda  # a function, so that CPU tests can pretend and exercise the fused path


def _use_fused(impl: Impl, *tensors: torch.Tensor | None) -> str | None:
    """The mode ('auto' or 'ours') when our kernel may run for these tensors, else None."""
    mode = _mode(impl)
    if mode == "torch" or fused.ext is None:
        return None
    return mode if all(t is None or _is_cuda(t) for t in tensors) else None


def _chosen(mode: str | None, op: str, x: torch.Tensor, shape: str) -> bool:
    # Under auto, ours only where measured faster (megatron_llm/kernels/measured.py).
    if mode is None:
        return False
    return mode == "ours" or measured.ours_is_faster(op, x.dtype, shape, _capability(x))


def _norm_fits(x: torch.Tensor) -> bool:
    return x.dtype in _NORM_DTYPES and 0 < x.shape[-1] <= _NORM_MAX_HIDDEN and x.numel() > 0


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    impl: Impl = "auto",
) -> torch.Tensor:
    mode = _use_fused(impl, x, weight, bias)
    if mode and _norm_fits(x) and _chosen(mode, "layer_norm", x, measured.norm_class(x.shape[-1])):
        return fused.LayerNormFunction.apply(x, weight, bias, eps)
    return reference.layer_norm(x, weight, bias, eps)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, impl: Impl = "auto"
) -> torch.Tensor:
    mode = _use_fused(impl, x, weight)
    if mode and _norm_fits(x) and _chosen(mode, "rms_norm", x, measured.norm_class(x.shape[-1])):
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


def _segments_fit(q: torch.Tensor, segments: torch.Tensor | None) -> bool:
    # An extension built before the segment mode has no attention_forward_mode: torch's path
    # then, never the kernel without the segments.
    if segments is None:
        return True
    return (
        hasattr(fused.ext, "attention_forward_mode")
        and segments.shape == (q.shape[0], q.shape[2])
        and not segments.dtype.is_floating_point
    )


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    impl: Impl = "auto",
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim); returns
    (batch, heads, seq, head_dim). Query head h reads key/value head h // (heads // kv_heads).
    ``segments`` (batch, seq): packed documents; a query sees only earlier keys of its own
    segment (document-causal)."""
    mode = _use_fused(impl, q, k, v, segments)
    if mode and _attention_fits(q, k, v, dropout_p) and _segments_fit(q, segments):
        shape = measured.attention_class(q.shape[-1], q.shape[1], k.shape[1], q.shape[2])
        if _chosen(mode, "attention", q, shape):
            if segments is not None:
                return fused.SegmentAttentionFunction.apply(q, k, v, segments)
            return fused.CausalAttentionFunction.apply(q, k, v)
    return reference.causal_attention(q, k, v, dropout_p, segments)
