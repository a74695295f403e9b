"""Attention over one block of queries against one block of keys, in plain PyTorch.

The primitive of ring attention (parallel/context.py) and of document masking, and the
reference the csrc/ attention modes are held to. A block is described by where it sits in the
whole sequence, so one call covers every case a ring step meets:

- ``q_start``/``k_start``: the global position of the first query / key (an int: the block is
  contiguous), or a LongTensor of every query's / key's global position (a load-balanced chunk
  pair, or positions of any shape the caller has);
- ``causal``: a key is visible only at a global position <= the query's. A key block entirely
  in the future of the query block masks every score;
- ``q_segments``/``k_segments`` (batch, sq)/(batch, sk): packed documents; a query sees only keys
  of its own segment id (data/batch.py computes them from the EOD tokens).

A query that sees no key at all (a future block, another document) gets out = 0 and
lse = -inf, never NaN, and no gradient: merged with other blocks by the log-sum-exp
(``merge``), it contributes nothing, exactly as if the block had not been computed.

The scores are materialized per block (sq x sk per head) in fp32: this is the fallback and the
reference, not the fast path; ring attention keeps blocks small by construction.
"""

from __future__ import annotations

import math

import torch

Positions = int | torch.Tensor


def _positions(start: Positions, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(start, torch.Tensor):
        if start.shape != (n,):
            raise ValueError(
                f"block_attention: positions of shape {tuple(start.shape)} for a block of {n}; "
                f"give one global position per row, or an int start"
            )
        return start.to(device)
    return torch.arange(start, start + n, device=device)


def visible(
    sq: int,
    sk: int,
    *,
    q_start: Positions,
    k_start: Positions,
    causal: bool,
    q_segments: torch.Tensor | None = None,
    k_segments: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """The boolean mask of which key each query may see: (batch or 1, sq, sk), True = visible;
    None when every key is visible (no causal cut, no segments)."""
    mask = None
    if causal:
        qpos = _positions(q_start, sq, device)
        kpos = _positions(k_start, sk, device)
        mask = (kpos[None, :] <= qpos[:, None])[None]  # (1, sq, sk)
    if (q_segments is None) != (k_segments is None):
        raise ValueError("block_attention: give both q_segments and k_segments, or neither")
    if q_segments is not None:
        if q_segments.shape[1] != sq or k_segments.shape[1] != sk:
            raise ValueError(
                f"block_attention: segments {tuple(q_segments.shape)}/{tuple(k_segments.shape)} "
                f"for blocks of {sq}/{sk} rows; segment ids are (batch, rows)"
            )
        same = q_segments[:, :, None] == k_segments[:, None, :]  # (batch, sq, sk)
        mask = same if mask is None else mask & same
    return mask


def _acc(t: torch.Tensor) -> torch.Tensor:
    # fp32 accumulation whatever the input (as the kernels); float64 stays (reference checks).
    return t if t.dtype == torch.float64 else t.float()


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    # (b, h, sq, d) -> (b, hkv, group, sq, d): query head h reads key/value head h // group
    b, h, sq, d = q.shape
    if h % hkv:
        raise ValueError(f"block_attention: {h} query heads do not divide into {hkv} kv heads")
    return q.view(b, hkv, h // hkv, sq, d)


def scores_and_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 masked scores (b, hkv, group, sq, sk) and their log-sum-exp (b, hkv, group, sq),
    -inf (with zero gradient) where a query sees nothing."""
    qg = _acc(_grouped(q, k.shape[1]))
    s = (qg @ _acc(k)[:, :, None].transpose(-1, -2)) * scale  # (b, hkv, group, sq, sk)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None], float("-inf"))
    # The row max is a constant shift (its gradient cancels), so it is detached; a fully
    # masked row keeps shift 0 and a zero sum, and its lse is set to -inf outside the log so
    # that neither the value nor the gradient sees log(0).
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    total = torch.exp(s - m).sum(-1)  # (b, hkv, group, sq)
    seen = total > 0
    lse = m.squeeze(-1) + torch.log(torch.where(seen, total, torch.ones_like(total)))
    lse = torch.where(seen, lse, torch.full_like(lse, float("-inf")))
    return s, lse


def probabilities(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(s - lse) with 0 where lse is -inf (a query that sees nothing)."""
    finite = torch.isfinite(lse)
    shift = torch.where(finite, lse, torch.zeros_like(lse))
    return torch.exp(s - shift[..., None])  # masked scores are -inf: exp gives 0


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_start: Positions,
    k_start: Positions,
    causal: bool,
    q_segments: torch.Tensor | None = None,
    k_segments: torch.Tensor | None = None,
    dropout: float = 0.0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (b, h, sq, d); k, v (b, hkv, sk, d) with h a multiple of hkv (grouped-query heads).
    Returns out (b, h, sq, d) in q's dtype and lse (b, h, sq) in fp32 (float64 for float64
    inputs): the natural
    log-sum-exp of each query's scaled visible scores. Differentiable (autograd); the dropout,
    if any, falls on the normalized probabilities (as SDPA's), so blocks merged by their lse
    equal one attention over all keys with that dropout."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mask = visible(
        sq,
        sk,
        q_start=q_start,
        k_start=k_start,
        causal=causal,
        q_segments=q_segments,
        k_segments=k_segments,
        device=q.device,
    )
    s, lse = scores_and_lse(q, k, mask, scale)
    p = probabilities(s, lse)
    if dropout > 0.0:
        p = torch.nn.functional.dropout(p, dropout)
    out = p @ _acc(v)[:, :, None]  # (b, hkv, group, sq, d)
    return out.reshape(b, h, sq, v.shape[-1]).to(q.dtype), lse.reshape(b, h, sq)


def block_attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    q_start: Positions,
    k_start: Positions,
    causal: bool,
    q_segments: torch.Tensor | None = None,
    k_segments: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients (dq, dk, dv) of one block's share of an attention whose FINAL output is
    ``out`` with FINAL log-sum-exp ``lse`` (b, h, sq), both merged over every key block: the
    flash-attention backward, so ring attention sums dq over the blocks it sees and sends dk,
    dv around the ring (no autograd graph kept per step). Without dropout. dk, dv are summed
    over each kv head's query group; all three come back in fp32 (float64 for float64)."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mask = visible(
        sq,
        sk,
        q_start=q_start,
        k_start=k_start,
        causal=causal,
        q_segments=q_segments,
        k_segments=k_segments,
        device=q.device,
    )
    qg = _acc(_grouped(q, hkv))  # (b, hkv, group, sq, d)
    kf, vf = _acc(k)[:, :, None], _acc(v)[:, :, None]  # (b, hkv, 1, sk, d)
    s = (qg @ kf.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None], float("-inf"))
    p = probabilities(s, _acc(_grouped(lse[..., None], hkv).squeeze(-1)))
    do = _acc(_grouped(dout, hkv))
    delta = (do * _acc(_grouped(out, hkv))).sum(-1, keepdim=True)  # (b, hkv, group, sq, 1)
    dv = (p.transpose(-1, -2) @ do).sum(2)  # (b, hkv, sk, d)
    ds = p * (do @ vf.transpose(-1, -2) - delta) * scale  # (b, hkv, group, sq, sk)
    dq = (ds @ kf).reshape(b, h, sq, d)  # (b, h, sq, d)
    dk = (ds.transpose(-1, -2) @ qg).sum(2)
    return dq, dk, dv


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial attentions of the same queries over disjoint key sets -> the attention over
    both (the online-softmax merge): out (b, h, sq, d), lse (b, h, sq) fp32. A side with
    lse = -inf counts for nothing; both -inf gives out 0, lse -inf. Differentiable."""
    # torch.logaddexp(-inf, -inf) has a NaN gradient: shift by the detached max instead.
    m = torch.maximum(lse_a, lse_b).detach()
    finite = torch.isfinite(m)
    m = torch.where(finite, m, torch.zeros_like(m))
    total = torch.exp(lse_a - m) + torch.exp(lse_b - m)
    lse = m + torch.log(torch.where(finite, total, torch.ones_like(total)))
    lse = torch.where(finite, lse, torch.full_like(lse, float("-inf")))
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    wa = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse))[..., None]
    wb = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse))[..., None]
    out = wa * _acc(out_a) + wb * _acc(out_b)
    return out.to(out_a.dtype), lse
