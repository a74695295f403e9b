"""Context-parallel runs for tests/test_context_parallel.py, executed on spawned gloo ranks."""

from __future__ import annotations

from typing import Any

import torch


def ring_against_full(cp: int, dtype: str = "float64", mode: str = "ring") -> dict[str, Any]:
    """Ring attention over rings of ``cp`` ranks vs one whole causal attention (SDPA, fp64) of
    the same inputs: the largest error of this rank's chunks of the output and of the q, k, v
    gradients, and the same for the output of one block_attention over the whole sequence in
    ``dtype`` (what the ring's merges should add nothing to)."""
    import torch.nn.functional as F

    from megatron_llm.kernels.attention import block_attention
    from megatron_llm.parallel.config import ParallelConfig
    from megatron_llm.parallel.context import context_of
    from megatron_llm.parallel.groups import build_context

    ctx = build_context(ParallelConfig(cp=cp))
    ring = context_of(ctx, mode)
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, seq, d = 2, 4, 2, 32, 8  # grouped-query heads

    def draw(heads: int) -> torch.Tensor:
        return torch.randn(b, heads, seq, d, generator=gen, dtype=torch.float64)

    q, k, v, dout = draw(h), draw(hkv), draw(hkv), draw(h)
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*whole, is_causal=True, enable_gqa=True)
    ref.backward(dout)
    low = getattr(torch, dtype)
    mine = [ring.split(t, 2).to(low).requires_grad_() for t in (q, k, v)]
    out = ring.attention(*mine)
    out.backward(ring.split(dout, 2).to(low))
    one, _ = block_attention(q.to(low), k.to(low), v.to(low), q_start=0, k_start=0, causal=True)
    return {
        "out": (out.double() - ring.split(ref, 2)).abs().max().item(),
        "grads": [
            (m.grad.double() - ring.split(w.grad, 2)).abs().max().item()
            for m, w in zip(mine, whole, strict=True)
        ],
        "one_block": (ring.split(one, 2).double() - ring.split(ref, 2)).abs().max().item(),
        "dtype": str(out.dtype),
    }


def uneven_loss(cp: int) -> dict[str, Any]:
    """ContextLoss on a micro-batch whose ignored labels fall unevenly on the cp ranks (the
    first 3/4 of one sample, and every token of rank 0): this rank's loss and logits gradient,
    and the whole micro-batch's, by plain cross-entropy."""
    import torch.distributed as dist

    from megatron_llm.model.gpt import IGNORE, cross_entropy
    from megatron_llm.parallel.config import ParallelConfig
    from megatron_llm.parallel.context import ContextLoss, context_of
    from megatron_llm.parallel.groups import build_context

    ring = context_of(build_context(ParallelConfig(cp=cp)))
    gen = torch.Generator().manual_seed(1)
    seq, c = 8 * cp, 4
    logits = torch.randn(2, seq, 11, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, seq), generator=gen)
    labels[0, : 3 * seq // 4] = IGNORE
    labels[:, :c] = IGNORE  # rank 0's chunks, 0 and 2cp-1: it counts no token at all
    labels[:, seq - c :] = IGNORE
    whole = logits.clone().requires_grad_()
    ref = cross_entropy(whole, labels)
    ref.backward()
    mine = ring.split(logits).requires_grad_()
    loss = ContextLoss(cross_entropy, ring)(mine, ring.split(labels))
    # DeepSpeed averages gradients over the cp ranks: this rank's share of the whole's.
    (loss / cp).backward()
    return {
        "loss": loss.item(),
        "ref": ref.item(),
        "grad": (mine.grad - ring.split(whole.grad)).abs().max().item(),
        "world": dist.get_world_size(),
    }


def ring_cases() -> dict[str, Any]:
    """On 4 ranks: the ring of 4 (fp64 inputs), the rings of 2 (cp=2 x dp=2), and the ring of 2
    in bf16; each rank's errors against one whole attention."""
    import torch.distributed as dist

    out = {"cp4": ring_against_full(cp=4), "loss": uneven_loss(cp=4)}
    dist.barrier()
    out["cp2"] = ring_against_full(cp=2)
    dist.barrier()
    out["cp2-bf16"] = ring_against_full(cp=2, dtype="bfloat16")
    dist.barrier()
    out["cp2-all_to_all"] = ring_against_full(cp=2, mode="all_to_all")
    return out


def cp_runs(items: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
    """Runs one after the other on the same ranks: ("loop", argv) the real training loop on
    real shards (tests/checkpoint_runs.py train_run), ("packed", overrides) the packed-document
    steps (tests/parallel_runs.py train_documents)."""
    import time

    import torch.distributed as dist

    from tests.checkpoint_runs import train_run
    from tests.parallel_runs import train_documents

    results = []
    for kind, argv in items:
        start = time.perf_counter()
        results.append({"loop": train_run, "packed": train_documents}[kind](argv))
        results[-1]["wall"] = time.perf_counter() - start
        dist.barrier()
    return results
