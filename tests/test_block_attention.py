"""megatron_llm.kernels.attention: block attention with global positions and segment ids, its
flash-style backward and the log-sum-exp merge, against a naive float64 reference that builds
the mask query by query from the rule (same segment, key position <= query position)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_llm.kernels.attention import block_attention, block_attention_backward, merge


def naive(q, k, v, qpos, kpos, causal, qseg=None, kseg=None):
    """float64 loops: out (b, h, sq, d), lse (b, h, sq); a query that sees nothing: 0, -inf."""
    b, h, sq, d = q.shape
    group = h // k.shape[1]
    out = torch.zeros(b, h, sq, d, dtype=torch.float64)
    lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = k[bi, hi // group].double()
            vh = v[bi, hi // group].double()
            for i in range(sq):
                keep = [
                    j
                    for j in range(k.shape[2])
                    if (not causal or kpos[j] <= qpos[i])
                    and (qseg is None or qseg[bi, i] == kseg[bi, j])
                ]
                if not keep:
                    continue
                s = (kh[keep] @ q[bi, hi, i].double()) / d**0.5
                lse[bi, hi, i] = torch.logsumexp(s, 0)
                out[bi, hi, i] = torch.softmax(s, 0) @ vh[keep]
    return out, lse


def qkv(b=2, h=4, hkv=2, sq=5, sk=7, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(shape, generator=g, dtype=dtype)
        for shape in ((b, h, sq, d), (b, hkv, sk, d), (b, hkv, sk, d))
    )


@pytest.mark.parametrize(
    "q_start,k_start,causal",
    [(0, 0, False), (3, 0, True), (10, 4, True), (2, 6, True), (0, 0, True)],
)
@pytest.mark.parametrize("segments", [False, True])
def test_block_matches_naive(q_start, k_start, causal, segments):
    q, k, v = qkv()
    qseg = kseg = None
    if segments:
        qseg = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
        kseg = torch.tensor([[0, 0, 0, 1, 1, 1, 2], [0, 0, 1, 1, 1, 2, 2]])
    out, lse = block_attention(
        q, k, v, q_start=q_start, k_start=k_start, causal=causal, q_segments=qseg, k_segments=kseg
    )
    ref_out, ref_lse = naive(
        q, k, v, range(q_start, q_start + 5), range(k_start, k_start + 7), causal, qseg, kseg
    )
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)


def test_position_tensors_as_a_load_balanced_chunk_pair():
    # A cp rank holding chunks 0 and 3 of 4 gives its queries' positions explicitly.
    q, k, v = qkv(sq=4, sk=8)
    qpos = torch.tensor([0, 1, 6, 7])
    out, lse = block_attention(q, k, v, q_start=qpos, k_start=0, causal=True)
    ref_out, ref_lse = naive(q, k, v, qpos.tolist(), range(8), True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-6)


def test_future_block_is_zero_with_minus_inf_lse_and_no_nan_grads():
    q, k, v = (t.requires_grad_() for t in qkv())
    out, lse = block_attention(q, k, v, q_start=0, k_start=5, causal=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    (out.sum() + lse.clamp_min(-1e4).sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and not t.grad.any()


def test_matches_sdpa_causal_in_bf16():
    q, k, v = qkv(sq=16, sk=16, d=16, dtype=torch.bfloat16)
    out, lse = block_attention(q, k, v, q_start=0, k_start=0, causal=True)
    ref = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True
    )
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def _segments(b, s, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (b, s), generator=g).sort(-1).values


@pytest.mark.parametrize("segments", [False, True])
def test_blocks_merged_by_lse_equal_one_attention_forward_and_grads(segments):
    # Ring attention's arithmetic: keys in three blocks at their global offsets, merged.
    q, k, v = (t.requires_grad_() for t in qkv(sq=6, sk=12))
    qseg = _segments(2, 12, 1)[:, 6:] if segments else None
    kseg = _segments(2, 12, 1) if segments else None
    full, full_lse = block_attention(
        q, k, v, q_start=6, k_start=0, causal=True, q_segments=qseg, k_segments=kseg
    )
    out = lse = None
    for lo, hi in ((0, 3), (3, 8), (8, 12)):
        o, l_ = block_attention(
            q,
            k[:, :, lo:hi],
            v[:, :, lo:hi],
            q_start=6,
            k_start=lo,
            causal=True,
            q_segments=qseg,
            k_segments=None if kseg is None else kseg[:, lo:hi],
        )
        out, lse = (o, l_) if out is None else merge(out, lse, o, l_)
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(lse, full_lse)
    grads_full = torch.autograd.grad((full * full).sum() + full_lse.sum(), (q, k, v))
    grads_merged = torch.autograd.grad((out * out).sum() + lse.sum(), (q, k, v))
    for a, b in zip(grads_merged, grads_full, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_merge_of_two_empty_sides_has_no_nan():
    lse = torch.full((1, 1, 2), float("-inf"), requires_grad=True)
    out = torch.zeros(1, 1, 2, 3, requires_grad=True)
    o, l_ = merge(out, lse, out, lse)
    assert torch.isneginf(l_).all() and not o.any()
    (o.sum() + l_.clamp_min(0).sum()).backward()
    assert torch.isfinite(lse.grad).all() and torch.isfinite(out.grad).all()


@pytest.mark.parametrize("segments", [False, True])
def test_flash_backward_summed_over_blocks_equals_autograd(segments):
    q, k, v = (t.requires_grad_() for t in qkv(sq=6, sk=12))
    qseg = _segments(2, 12, 2)[:, 6:] if segments else None
    kseg = _segments(2, 12, 2) if segments else None
    out, lse = block_attention(
        q, k, v, q_start=6, k_start=0, causal=True, q_segments=qseg, k_segments=kseg
    )
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), dout)
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for lo, hi in ((0, 5), (5, 9), (9, 12)):
        gq, gk, gv = block_attention_backward(
            dout,
            q.detach(),
            k[:, :, lo:hi].detach(),
            v[:, :, lo:hi].detach(),
            out.detach(),
            lse.detach(),
            q_start=6,
            k_start=lo,
            causal=True,
            q_segments=qseg,
            k_segments=None if kseg is None else kseg[:, lo:hi],
        )
        dq += gq
        dk[:, :, lo:hi] += gk
        dv[:, :, lo:hi] += gv
    for got, ref in zip((dq, dk, dv), want, strict=True):
        torch.testing.assert_close(got.to(ref.dtype), ref)


def test_dropout_scales_kept_probabilities():
    q, k, v = qkv(b=1, h=2, hkv=2, sq=32, sk=32)
    v = torch.eye(32, dtype=torch.float64)[None, None].expand(1, 2, 32, 32)  # out = p itself
    torch.manual_seed(0)
    p_drop, _ = block_attention(q, k, v, q_start=0, k_start=0, causal=False, dropout=0.5)
    p, _ = block_attention(q, k, v, q_start=0, k_start=0, causal=False)
    kept = p_drop != 0
    assert 0.3 < kept.double().mean() < 0.7
    torch.testing.assert_close(p_drop[kept], 2 * p[kept])


def test_refuses_mismatched_segments_and_heads():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="both q_segments and k_segments"):
        block_attention(q, k, v, q_start=0, k_start=0, causal=True, q_segments=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="do not divide"):
        block_attention(q[:, :3], k, v, q_start=0, k_start=0, causal=True)
