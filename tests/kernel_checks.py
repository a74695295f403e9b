"""Checks of the csrc/ kernels shared by the two tiers that run them: the CPU emulator
(tests/test_kernel_emulator.py) and a GPU (tests/test_kernels.py, gpu tier).

- parity of the norms and of attention with their references, forward and every gradient;
- the PTX ISA's fragment layouts of mma.m16n8k16 and ldmatrix, written out in Python, against
  csrc/probes.cu: on a GPU the hardware itself answers, so a GPU run also checks the emulator's
  model of these instructions.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_llm import kernels
from megatron_llm.kernels import reference


def grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fn's output and the gradients of every input for a fixed random output gradient."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))
    return out.detach(), [t.grad for t in inputs]


def check_norm(
    norm: str,
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    tol: dict[str, float],
    sum_tol: float,
) -> None:
    """megatron_llm.kernels' layer_norm ("layernorm": x, w, b) or rms_norm ("rmsnorm": x, w)
    against the reference: y and dx within ``tol``; dweight and dbias, sums over the rows,
    within atol sum_tol * sqrt(rows) and rtol sum_tol."""
    if norm == "layernorm":
        ours = grads(lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5, "ours"), x, w, b)
        ref = grads(lambda x, w, b: reference.layer_norm(x, w, b, 1e-5), x, w, b)
    else:
        ours = grads(lambda x, w: kernels.rms_norm(x, w, 1e-5, "ours"), x, w)
        ref = grads(lambda x, w: reference.rms_norm(x, w, 1e-5), x, w)
    torch.testing.assert_close(ours[0], ref[0], **tol)
    torch.testing.assert_close(ours[1][0], ref[1][0], **tol)  # dx
    for got, want in zip(ours[1][1:], ref[1][1:]):  # dweight, dbias
        torch.testing.assert_close(got, want, atol=sum_tol * x.shape[0] ** 0.5, rtol=sum_tol)


def attention_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want).abs().max().item()


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """As flash-attention's tests: the error of megatron_llm.kernels.causal_attention against
    an fp32 reference, output and every gradient, within a small multiple of the error of
    PyTorch's own computation in the same low precision."""
    ours = grads(lambda q, k, v: kernels.causal_attention(q, k, v, 0.0, "ours"), q, k, v)
    fp32 = grads(reference.causal_attention, q.float(), k.float(), v.float())
    low = grads(reference.causal_attention, q, k, v)
    for name, got, want, theirs in zip(
        ["out", "dq", "dk", "dv"], [ours[0], *ours[1]], [fp32[0], *fp32[1]], [low[0], *low[1]]
    ):
        assert got.dtype == q.dtype and got.shape == want.shape, name
        ours_err, theirs_err = attention_error(got, want), attention_error(theirs, want)
        assert ours_err <= 3 * theirs_err + 1e-3, f"{name}: {ours_err} vs torch {theirs_err}"


MODE_TOL = {torch.float16: 5e-3, torch.bfloat16: 4e-2}  # max abs error, out and gradients


def check_attention_mode(
    ext: Any,
    device: str,
    dtype: torch.dtype,
    sizes: tuple[int, ...],
    q_offset: int,
    k_offset: int,
    causal: bool,
    segments: bool,
) -> None:
    """ext.attention_forward_mode / attention_backward_mode against block_attention (fp32, on
    the same rounded inputs): out, lse (-inf exactly where a query sees nothing) and dq, dk, dv
    from the block's own out and lse. sizes: batch, heads, kv_heads, seq, seq_k, head_dim."""
    from megatron_llm.kernels.attention import block_attention, block_attention_backward

    batch, heads, kv_heads, seq, seq_k, d = sizes
    q = torch.randn(batch, heads, seq, d).to(dtype)
    k, v = (torch.randn(batch, kv_heads, seq_k, d).to(dtype) for _ in range(2))
    q_ids = k_ids = None
    if segments:  # documents over the global positions both blocks cover
        ids = torch.randint(0, 4, (batch, max(q_offset + seq, k_offset + seq_k))).sort(-1).values
        q_ids, k_ids = ids[:, q_offset : q_offset + seq], ids[:, k_offset : k_offset + seq_k]
    kw = dict(q_start=q_offset, k_start=k_offset, causal=causal, q_segments=q_ids, k_segments=k_ids)
    ref_out, ref_lse = block_attention(q.float(), k.float(), v.float(), **kw)
    on = [t.to(device) for t in (q, k, v)]
    ids_on = [None if t is None else t.int().to(device) for t in (q_ids, k_ids)]
    out, lse = ext.attention_forward_mode(*on, q_offset, k_offset, causal, *ids_on)
    out, lse = out.cpu(), lse.cpu()
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "queries that see nothing"
    seen = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[seen], ref_lse[seen], atol=1e-3, rtol=1e-4)
    tol = MODE_TOL[dtype]
    assert attention_error(out, ref_out) <= tol, f"out: {attention_error(out, ref_out)}"
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = ext.attention_backward_mode(
        dout.to(device), *on, out.to(device), lse.to(device), q_offset, k_offset, causal, *ids_on
    )
    want = block_attention_backward(
        dout.float(), q.float(), k.float(), v.float(), out.float(), lse, **kw
    )
    for name, g, w in zip(["dq", "dk", "dv"], got, want):
        assert g.dtype == dtype, name
        assert attention_error(g.cpu(), w) <= tol * max(1.0, w.abs().max().item()), (
            f"{name}: {attention_error(g.cpu(), w)}"
        )


def check_mma(ext: Any, device: str, bf16: bool) -> None:
    """probe_mma(A then B) must be A @ B for operands exact in fp16 and bf16."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-8, 8, (16, 16), generator=gen).float() / 4
    b = torch.randint(-8, 8, (16, 8), generator=gen).float() / 4
    out = ext.probe_mma(torch.cat([a.flatten(), b.flatten()]).to(device), bf16)
    assert torch.equal(out.cpu().view(16, 8), a @ b)


def ldmatrix_fragments(m: torch.Tensor) -> torch.Tensor:
    """(2, 32, 4, 2): for plain and transposed, lane, matrix i (rows 8 * (i % 2), columns
    8 * (i / 2) of m on) and half: lane l holds (l / 4, 2 * (l % 4) + half) of its matrix, or
    transposed (2 * (l % 4) + half, l / 4)."""
    out = torch.empty(2, 32, 4, 2)
    for lane in range(32):
        for i in range(4):
            r0, c0 = 8 * (i % 2), 8 * (i // 2)
            for half in range(2):
                out[0, lane, i, half] = m[r0 + lane // 4, c0 + 2 * (lane % 4) + half]
                out[1, lane, i, half] = m[r0 + 2 * (lane % 4) + half, c0 + lane // 4]
    return out


def check_ldmatrix(ext: Any, device: str) -> None:
    m = torch.arange(256.0).view(16, 16)  # exact in fp16
    out = ext.probe_ldmatrix(m.flatten().to(device))
    assert torch.equal(out.cpu().view(2, 32, 4, 2), ldmatrix_fragments(m))
