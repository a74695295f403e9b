"""Expert parallelism: all-to-all token dispatch and combine over the ep group.

Under ``parallel.ep`` each rank of an ep group (consecutive dp ranks, parallel/groups.py) holds
``E / ep`` consecutive experts of every MoE layer. The MoE layer (model/moe.py) sorts its kept
token-expert assignments by global expert and hands them to its Dispatcher; the
``AllToAllDispatcher`` here sends each rank the tokens of its experts and brings the outputs
back:

    dispatch  exchange the per-expert counts (one all-to-all of E integers, one host sync), then
              all-to-all the tokens with those uneven split sizes (dropless: nothing is padded);
              the received tokens, grouped by source rank, are regrouped by local expert
    combine   the inverse: regroup by source rank, all-to-all back with the splits swapped

The token all-to-all is a tiny autograd Function (``AllToAll``: all-to-all forward, the reverse
all-to-all backward), so gradients follow the tokens home. Every rank computes the same
collectives in the same order, so recomputation under activation checkpointing and 1F1B
pipelines stay matched.

gloo (torch 2.13) supports ``all_to_all_single`` with uneven split sizes, and NCCL does; gloo's
list form ``all_to_all`` refuses uneven tensors, so only the single-tensor form is used. The
counts stay on the device for the exchange (NCCL reduces device tensors only) and come to the
host once per dispatch, as the split sizes must.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _all_to_all(
    x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(recv), *x.shape[1:]))  # (received rows, ...)
    dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """All-to-all forward (``send[r]`` rows to rank r, ``recv[r]`` rows from it), the reverse
    all-to-all backward: each gradient row goes back to the rank its token came from."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup
    ) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all(
    x: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    return AllToAll.apply(x, send, recv, group)


def exchange_counts(per_rank: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """per_rank (ep, local experts): what I send to each rank's experts -> (ep, local experts):
    what each rank sends to mine. Equal splits of one small integer tensor, on its device."""
    out = torch.empty_like(per_rank)
    dist.all_to_all_single(out, per_rank.contiguous(), group=group)
    return out


def _regroup(x: torch.Tensor, sizes: list[int], rows: int, cols: int) -> torch.Tensor:
    """x is ``rows x cols`` chunks of ``sizes`` in row-major order -> the same chunks in
    column-major order (source-major <-> local-expert-major)."""
    chunks = x.split(sizes)
    return torch.cat([chunks[r * cols + c] for c in range(cols) for r in range(rows)])


class AllToAllDispatcher:
    """model/moe.py's Dispatcher over an ep group (installed by parallel/shard.py)."""

    def __init__(self, group: dist.ProcessGroup, ep: int) -> None:
        self.group, self.ep = group, ep
        # The last dispatch's split sizes, for its combine (set in dispatch, read once).
        self._send: list[int] = []
        self._recv: list[int] = []
        self._by_source: list[int] = []  # (ep x local) counts, source-major
        self._by_expert: list[int] = []  # the same, local-expert-major

    def dispatch(
        self, tokens: torch.Tensor, per_expert: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ep = self.ep
        local = per_expert.numel() // ep
        if local * ep != per_expert.numel():
            raise ValueError(
                f"{per_expert.numel()} experts do not split over parallel.ep={ep}; choose "
                "model.moe.num_experts divisible by parallel.ep"
            )
        received = exchange_counts(per_expert.view(ep, local), self.group)  # (ep, local)
        # One deliberate host sync per dispatch: the all-to-all needs its split sizes.
        host = torch.cat([per_expert, received.flatten()]).tolist()
        sent, got = host[: ep * local], host[ep * local :]
        self._send = [sum(sent[r * local : (r + 1) * local]) for r in range(ep)]
        self._recv = [sum(got[r * local : (r + 1) * local]) for r in range(ep)]
        self._by_source = got
        self._by_expert = [got[s * local + e] for e in range(local) for s in range(ep)]
        x = all_to_all(tokens, self._send, self._recv, self.group)  # grouped by source rank
        x = _regroup(x, self._by_source, ep, local)  # grouped by local expert
        return x, received.sum(dim=0)  # (received, hidden), (local,)

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        local = len(self._by_source) // self.ep
        out = _regroup(out, self._by_expert, local, self.ep)  # grouped by source rank
        return all_to_all(out, self._recv, self._send, self.group)  # in dispatch's input order
