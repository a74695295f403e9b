"""Timing helpers shared by the GPU benchmarks (bench/kernels.py, bench/gpu_bench.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(
    fn: Callable[[], object], device: torch.device | None = None, reps: int = 20, warmup: int = 2
) -> float:
    """Median milliseconds of ``fn`` after warm-up: CUDA events on a GPU (the host returns before
    the kernels end), the wall clock elsewhere (the --dry-run rehearsals on CPU)."""
    device = device or torch.device("cuda")
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def forward_backward(op: Callable, *inputs: torch.Tensor) -> Callable[[], object]:
    """A closure running ``op`` forward and backward (a ones gradient) over fresh leaves."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]

    def run() -> object:
        out = op(*leaves)
        return torch.autograd.grad(out, leaves, torch.ones_like(out))

    return run
