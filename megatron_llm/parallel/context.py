"""Context parallelism: each sequence split over the cp ranks, attention around a ring.

The split is Megatron-Core's load-balanced one: the sequence is cut into 2*cp chunks and cp rank
r holds chunks r and 2cp-1-r (inputs and labels alike), so every rank has as much causal work as
the others (an early chunk sees few keys, its partner at the end sees many). ``split_batch`` cuts
each micro-batch once, on the device the engine trains on; RoPE and learned positions then read
each token's global position (``ContextParallel.positions``).

Attention (``RingAttention``) passes the key/value blocks around the cp ring: at step i a rank
holds the keys and values of cp rank r - i and computes, for each of its two query chunks
against each of the two key chunks, a full block (keys earlier), a causal diagonal (the same
chunk) or nothing (keys later), with kernels/attention.py ``block_attention``; the partial
outputs are merged by their log-sum-exp in fp32 (online softmax). The next block's transfer runs
while this one is computed. Backward recomputes each block from the saved final output and
log-sum-exp and sends the key/value gradients around the ring with their blocks, so each
reaches its owner after cp steps. Grouped-query heads and tensor parallelism (a rank holds some
heads) need nothing more; under sequence parallelism the tp ranks shard this rank's chunks, as
in Megatron-Core (the column-parallel layers gather them back before attention).

The loss of a rank covers its own tokens: ``ContextLoss`` scales it so that the average over the
cp ranks (DeepSpeed averages gradients over dp x cp; the logged loss is averaged the same way)
is the single-process mean over the micro-batch's counted tokens, even when the ranks count
different numbers of them (ignored labels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_llm.kernels.attention import block_attention, block_attention_backward
from megatron_llm.model.gpt import GPT, IGNORE
from megatron_llm.parallel.groups import ParallelContext

if TYPE_CHECKING:
    from megatron_llm.config import RunConfig


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """This rank's place on its cp ring."""

    group: dist.ProcessGroup
    rank: int  # cp rank
    size: int  # cp
    next_rank: int  # global rank of cp rank + 1: where key/value blocks go
    prev_rank: int  # global rank of cp rank - 1: where they come from
    device: torch.device
    mode: str = "ring"  # parallel.cp_attention: "ring" or "all_to_all" (Ulysses)

    def chunks(self, rank: int | None = None) -> tuple[int, int]:
        """The global chunk indices a cp rank holds (of 2 * cp): r and 2cp-1-r."""
        r = self.rank if rank is None else rank
        return r, 2 * self.size - 1 - r

    def split(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's two chunks of ``x`` along ``dim`` (the sequence), in chunk order."""
        n = x.shape[dim]
        if n % (2 * self.size):
            raise ValueError(
                f"a sequence of {n} tokens does not cut into 2*cp={2 * self.size} equal chunks; "
                f"make model.seq_length a multiple of {2 * self.size}"
            )
        c = n // (2 * self.size)
        # Two slices, no index tensor: nothing is copied from the host to the device.
        a, b = (x.narrow(dim, chunk * c, c) for chunk in self.chunks())
        return torch.cat([a, b], dim=dim)  # (.., 2 * chunk, ..)

    def positions(self, local: int) -> torch.Tensor:
        """The global positions (local,) of this rank's ``local`` tokens (two chunks)."""
        c = local // 2
        a, b = self.chunks()
        return torch.cat(
            [
                torch.arange(a * c, (a + 1) * c, device=self.device),
                torch.arange(b * c, (b + 1) * c, device=self.device),
            ]
        )

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal attention of this rank's queries (b, h, 2c, d) over the whole sequence's keys
        (b, hkv, 2c, d on each rank): (b, h, 2c, d). ``segments`` (b, 2c): this rank's tokens'
        document ids (data/batch.py), which travel the ring with the keys."""
        if self.mode == "all_to_all":
            return ulysses_attention(q, k, v, segments, self)
        return RingAttention.apply(q, k, v, segments, self)


def blocks(cp: ContextParallel, step: int) -> list[tuple[int, int, bool]]:
    """The (query half, key half, causal) blocks a rank computes at ring step ``step``, when it
    holds the keys of cp rank - step: earlier key chunks whole, its own chunk's causal diagonal,
    later key chunks not at all."""
    source = (cp.rank - step) % cp.size
    out = []
    for i, a in enumerate(cp.chunks()):
        for j, b in enumerate(cp.chunks(source)):
            if b <= a:
                out.append((i, j, b == a))
    return out


def _exchange(
    tensors: list[torch.Tensor], cp: ContextParallel, tag: int
) -> Callable[[], list[torch.Tensor]]:
    """Send ``tensors`` to the next cp rank and receive as many from the previous one, in the
    background; returns the wait that hands over the received tensors."""
    tensors = [t.contiguous() for t in tensors]  # empty_like keeps a view's strides
    received = [torch.empty_like(t) for t in tensors]
    ops = [
        dist.P2POp(dist.isend, t, cp.next_rank, cp.group, tag + n) for n, t in enumerate(tensors)
    ] + [dist.P2POp(dist.irecv, t, cp.prev_rank, cp.group, tag + n) for n, t in enumerate(received)]
    works = dist.batch_isend_irecv(ops)

    def wait() -> list[torch.Tensor]:
        for work in works:
            work.wait()
        return received

    return wait


def _half(x: torch.Tensor, i: int) -> torch.Tensor:
    c = x.shape[-2] // 2
    return x[..., i * c : (i + 1) * c, :]  # (.., chunk, d)


def _seg_half(segments: torch.Tensor | None, i: int) -> torch.Tensor | None:
    if segments is None:
        return None
    c = segments.shape[-1] // 2
    return segments[:, i * c : (i + 1) * c]  # (b, chunk)


def _ring(kv: torch.Tensor, segments: torch.Tensor | None) -> list[torch.Tensor]:
    return [kv] if segments is None else [kv, segments]


def _merge(
    out: torch.Tensor | None, lse: torch.Tensor | None, o: torch.Tensor, lse_o: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online softmax: two partial attentions of the same queries over disjoint keys -> the
    attention over both, in fp32 (the weights exp(lse - new) lose bits in bf16)."""
    o, lse_o = o.float(), lse_o.float()
    if out is None:
        return o, lse_o
    new = torch.logaddexp(lse, lse_o)  # finite: every query sees its own diagonal block
    out = out * torch.exp(lse - new)[..., None] + o * torch.exp(lse_o - new)[..., None]
    return out, new


class RingAttention(torch.autograd.Function):
    """Causal attention over a sequence split into load-balanced chunks on a cp ring."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        segments: torch.Tensor | None,
        cp: ContextParallel,
    ) -> torch.Tensor:
        c = q.shape[2] // 2
        outs: list[torch.Tensor | None] = [None, None]  # per query half, fp32
        lses: list[torch.Tensor | None] = [None, None]
        kv = torch.stack([k, v])  # (2, b, hkv, 2c, d): one message per step
        k_segments = segments
        for step in range(cp.size):
            wait = _exchange(_ring(kv, k_segments), cp, tag=0) if step < cp.size - 1 else None
            source = (cp.rank - step) % cp.size
            for i, j, causal in blocks(cp, step):
                o, lse = block_attention(
                    _half(q, i),
                    _half(kv[0], j),
                    _half(kv[1], j),
                    q_start=cp.chunks()[i] * c,
                    k_start=cp.chunks(source)[j] * c,
                    causal=causal,
                    q_segments=_seg_half(segments, i),
                    k_segments=_seg_half(k_segments, j),
                )
                outs[i], lses[i] = _merge(outs[i], lses[i], o, lse)
            if wait is not None:
                kv, *rest = wait()
                k_segments = rest[0] if rest else None
        out = torch.cat(outs, dim=2).to(q.dtype)  # (b, h, 2c, d)
        lse = torch.cat(lses, dim=2)  # (b, h, 2c) fp32
        ctx.save_for_backward(q, k, v, out, lse, segments)
        ctx.cp = cp
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse, segments = ctx.saved_tensors
        cp: ContextParallel = ctx.cp
        c = q.shape[2] // 2
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        k_segments = segments
        dkv = None  # the gradient of the keys/values held now, summed over the ranks so far
        pending = None  # the previous step's dkv, on its way here
        for step in range(cp.size):
            wait_kv = _exchange(_ring(kv, k_segments), cp, tag=0) if step < cp.size - 1 else None
            source = (cp.rank - step) % cp.size
            mine = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            for i, j, causal in blocks(cp, step):
                dq_i, dk_j, dv_j = block_attention_backward(
                    _half(dout, i),
                    _half(q, i),
                    _half(kv[0], j),
                    _half(kv[1], j),
                    _half(out, i),
                    lse[..., i * c : (i + 1) * c],
                    q_start=cp.chunks()[i] * c,
                    k_start=cp.chunks(source)[j] * c,
                    causal=causal,
                    q_segments=_seg_half(segments, i),
                    k_segments=_seg_half(k_segments, j),
                )
                _half(dq, i).add_(dq_i)
                _half(mine[0], j).add_(dk_j)
                _half(mine[1], j).add_(dv_j)
            dkv = mine if pending is None else pending()[0] + mine
            # On toward the owner of these keys: after cp passes each rank holds its own.
            pending = _exchange([dkv], cp, tag=2)
            if wait_kv is not None:
                kv, *rest = wait_kv()
                k_segments = rest[0] if rest else None
        (dkv,) = pending()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


class _AllToAll(torch.autograd.Function):
    """Equal all-to-all over the cp group along dim 0 (one slice per rank); its own inverse,
    so backward is the same exchange of the gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()  # first: empty_like keeps a view's strides, the exchange assumes rows
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def _gathered_order(cp: ContextParallel) -> list[int]:
    """The global chunk index at each chunk position of a sequence gathered rank by rank."""
    return [chunk for r in range(cp.size) for chunk in cp.chunks(r)]


def _heads_to_sequence(x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """(b, heads, 2c, d) this rank's tokens -> (b, heads / cp, 2cp * c, d): this rank's group of
    heads for the whole sequence, in natural order."""
    b, h, local, d = x.shape
    parts = x.reshape(b, cp.size, h // cp.size, local, d).transpose(0, 1)  # (cp, b, h/cp, 2c, d)
    got = _AllToAll.apply(parts, cp.group)  # [r]: rank r's tokens of my heads
    chunks = got.permute(1, 2, 0, 3, 4).reshape(b, h // cp.size, 2 * cp.size, local // 2, d)
    where = {chunk: i for i, chunk in enumerate(_gathered_order(cp))}
    natural = [chunks[:, :, where[k]] for k in range(2 * cp.size)]
    return torch.cat(natural, dim=2)  # (b, h/cp, seq, d)


def _sequence_to_heads(y: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """The inverse of _heads_to_sequence: (b, heads / cp, seq, d) -> (b, heads, 2c, d)."""
    b, hg, seq, d = y.shape
    chunks = y.reshape(b, hg, 2 * cp.size, seq // (2 * cp.size), d)
    order = [chunks[:, :, k] for k in _gathered_order(cp)]  # rank by rank, its two chunks
    parts = torch.stack(order, dim=2).reshape(b, hg, cp.size, -1, d).transpose(1, 2)
    got = _AllToAll.apply(parts.transpose(0, 1), cp.group)  # [g]: my tokens of head group g
    return got.transpose(0, 1).reshape(b, cp.size * hg, -1, d)  # (b, heads, 2c, d)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: torch.Tensor | None,
    cp: ContextParallel,
) -> torch.Tensor:
    """DeepSpeed-Ulysses: an all-to-all trades this rank's tokens of every head for every
    token of 1/cp of the heads, one whole causal attention runs on those, and the inverse
    all-to-all brings the output back. Query and key/value heads split alike, so grouped-query
    heads keep their pairing (check_context refuses heads that do not divide by cp)."""
    from megatron_llm import kernels

    whole = None
    if segments is not None:  # every rank's document ids, in natural order
        parts = [torch.empty_like(segments) for _ in range(cp.size)]
        dist.all_gather(parts, segments.contiguous(), group=cp.group)
        chunks = torch.stack(parts, dim=1).reshape(segments.shape[0], 2 * cp.size, -1)
        where = {chunk: i for i, chunk in enumerate(_gathered_order(cp))}
        whole = torch.cat([chunks[:, where[c]] for c in range(2 * cp.size)], dim=1)
    q, k, v = (_heads_to_sequence(t, cp) for t in (q, k, v))
    y = kernels.causal_attention(q, k, v, 0.0, segments=whole)  # (b, h/cp, seq, d)
    return _sequence_to_heads(y, cp)


class ContextLoss:
    """The model's loss on this rank's tokens, scaled so that its mean over the cp ranks is the
    mean over every counted token of the micro-batch: mean * count * cp / total count."""

    def __init__(
        self, inner: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], cp: ContextParallel
    ):
        self.inner = inner
        self.cp = cp

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        count = (labels != IGNORE).sum().float()
        total = count.clone()
        dist.all_reduce(total, group=self.cp.group)  # collective: every cp rank's loss
        local = self.inner(logits, labels)
        # A rank whose tokens are all ignored (inside a long prompt) has a NaN mean; it counts
        # for nothing, and its gradient through the where is zero.
        local = torch.where(count > 0, local, torch.zeros_like(local))
        return local * (count * self.cp.size / total.clamp(min=1))


def split_batch(batch: Any, cp: ContextParallel | None) -> Any:
    """This rank's chunks of every (batch, seq) tensor of a micro-batch: inputs, labels and the
    document ids, in the tuples and dicts that hold them (data/batch.py model_inputs and
    input_label_pairs). Identity at cp=1. The one place a micro-batch is split."""
    if cp is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return cp.split(batch)
    if isinstance(batch, dict):
        return {key: split_batch(value, cp) for key, value in batch.items()}
    return tuple(split_batch(value, cp) for value in batch)


def split_batches(batches: Iterator[Any], cp: ContextParallel | None) -> Iterator[Any]:
    """split_batch for each micro-batch of an iterator (the pipeline engine's input)."""
    for batch in batches:
        yield split_batch(batch, cp)


def context_of(ctx: ParallelContext, mode: str = "ring") -> ContextParallel | None:
    """This rank's ring, or None at cp=1."""
    if ctx.cp == 1:
        return None
    ring = [dist.get_global_rank(ctx.cp_group, r) for r in range(ctx.cp)]
    return ContextParallel(
        group=ctx.cp_group,
        rank=ctx.cp_rank,
        size=ctx.cp,
        next_rank=ring[(ctx.cp_rank + 1) % ctx.cp],
        prev_rank=ring[(ctx.cp_rank - 1) % ctx.cp],
        device=ctx.device,
        mode=mode,
    )


def check_context(cfg: RunConfig, ctx: ParallelContext) -> None:
    """What context parallelism cannot do, refused in one line each."""
    m, cp = cfg.model, ctx.cp
    if m.attention_dropout > 0:
        raise ValueError(
            f"model.attention_dropout={m.attention_dropout} with parallel.cp={cp}: ring "
            "attention has no attention dropout; set model.attention_dropout=0"
        )
    heads, kv_heads = m.num_heads // ctx.tp, m.num_kv_heads // ctx.tp
    if cfg.parallel.cp_attention == "all_to_all" and (heads % cp or kv_heads % cp):
        raise ValueError(
            f"parallel.cp_attention=all_to_all with parallel.cp={cp}: each tp rank's "
            f"{heads} query and {kv_heads} key/value heads must divide by cp; use "
            "parallel.cp_attention=ring"
        )
    tokens = 2 * cp * (ctx.tp if cfg.parallel.sequence_parallel else 1)
    if m.seq_length % tokens:
        raise ValueError(
            f"model.seq_length={m.seq_length} does not split over parallel.cp={cp}: it must be "
            f"a multiple of {tokens} (2*cp chunks"
            + (f", each rank's part split over tp={ctx.tp})" if tokens > 2 * cp else ")")
        )


def install_context(model: GPT, cfg: RunConfig, ctx: ParallelContext) -> GPT:
    """Give the model (sharded, before the pipeline is built from it) this rank's ring: every
    attention layer, the positions and the loss. No-op at cp=1."""
    cp = context_of(ctx, cfg.parallel.cp_attention)
    if cp is None:
        return model
    check_context(cfg, ctx)
    model.context = cp
    for block in model.blocks:
        block.attn.context = cp
    model.loss_fn = ContextLoss(model.loss_fn, cp)
    return model
