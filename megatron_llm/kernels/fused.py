"""Autograd Functions over the csrc/ extension, `megatron_llm_kernels`.

Only megatron_llm.kernels calls these, after checking that the extension is built and that the
tensors suit it (CUDA, dtype, sizes). The binding contract they rely on is in csrc/bindings.cpp:
norm weights and biases go in any float dtype and their gradients come back in fp32; attention
saves (out, lse) with lse the fp32 natural log-sum-exp of each query's scaled scores; its
``_mode`` variants take one block of a longer attention (offsets, causal or not, segment ids).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

ext: ModuleType | None
try:
    import megatron_llm_kernels as ext

    IMPORT_ERROR: str | None = None
except ImportError as err:  # not built (CPU machine, no nvcc) or built against another torch
    ext = None
    IMPORT_ERROR = f"{type(err).__name__}: {err}"


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, hidden)
        y, mean, rstd = ext.layernorm_forward(rows, weight, bias, eps)
        ctx.save_for_backward(rows, weight, mean, rstd)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, weight, mean, rstd = ctx.saved_tensors
        dy_rows = dy.reshape(rows.shape).contiguous()  # (rows, hidden)
        has_bias = ctx.bias_dtype is not None
        dx, dweight, dbias = ext.layernorm_backward(dy_rows, rows, weight, mean, rstd, has_bias)
        dbias = dbias.to(ctx.bias_dtype) if has_bias else None
        return dx.view(dy.shape), dweight.to(weight.dtype), dbias, None


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, hidden)
        y, rstd = ext.rmsnorm_forward(rows, weight, eps)
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, weight, rstd = ctx.saved_tensors
        dy_rows = dy.reshape(rows.shape).contiguous()  # (rows, hidden)
        dx, dweight = ext.rmsnorm_backward(dy_rows, rows, weight, rstd)
        return dx.view(dy.shape), dweight.to(weight.dtype), None


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous and 16-byte aligned, as the attention kernels read it (a copy only for a view
    that starts mid-row)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


class CausalAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, the output and the log-sum-exp; backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim)
        q, k, v = _aligned(q), _aligned(k), _aligned(v)
        out, lse = ext.attention_forward(q, k, v)  # lse: (batch, heads, seq) fp32
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        return tuple(ext.attention_backward(_aligned(dout), q, k, v, out, lse))


class SegmentAttentionFunction(torch.autograd.Function):
    """Causal attention inside packed documents: the kernels' AttentionMode with the same
    segment ids for queries and keys (csrc/kernels.h). Saves as CausalAttentionFunction."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: torch.Tensor
    ) -> torch.Tensor:
        # q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim);
        # segments: (batch, seq), int32 for the kernel
        q, k, v = _aligned(q), _aligned(k), _aligned(v)
        ids = segments.to(torch.int32).contiguous()
        out, lse = ext.attention_forward_mode(q, k, v, 0, 0, True, ids, ids)
        ctx.save_for_backward(q, k, v, out, lse, ids)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, ids = ctx.saved_tensors
        grads = ext.attention_backward_mode(_aligned(dout), q, k, v, out, lse, 0, 0, True, ids, ids)
        return (*grads, None)
