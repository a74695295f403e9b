"""The PyTorch references of the csrc/ kernels: what runs on CPU, without the extension, or when
forced, and what the GPU parity tests compare the kernels with."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    # Statistics in fp32 whatever the input dtype, as the fused kernels do.
    return F.layer_norm(
        x.float(), x.shape[-1:], weight.float(), None if bias is None else bias.float(), eps
    ).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x.float(), x.shape[-1:], weight.float(), eps).to(x.dtype)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: (batch, heads, seq, head_dim); k, v: (batch, kv_heads, seq, head_dim); segments
    (batch, seq) or None: packed documents, each query sees earlier keys of its own only."""
    gqa = k.shape[1] != q.shape[1]
    if segments is None:
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa
        )
    mask = document_causal_mask(segments)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa
    )


def document_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """(batch, seq) segment ids -> (batch, 1, seq, seq) boolean mask, True where a query may
    see a key: same segment and not later. The diagonal is always True, so no row is empty."""
    seq = segments.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]  # (batch, seq, seq)
    return (same & causal)[:, None]
