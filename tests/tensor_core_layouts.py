"""The PTX ISA's fragment layouts of mma.m16n8k16 and ldmatrix, written out in Python, and the
checks of csrc/probes.cu against them: run on the emulated extension (tests/
test_kernel_emulator.py) and on a GPU (tests/test_kernels.py, gpu tier), where the hardware
itself answers, so a GPU run also checks the emulator's model of these instructions."""

from __future__ import annotations

import torch


def check_mma(ext, device: str, bf16: bool) -> None:
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


def check_ldmatrix(ext, device: str) -> None:
    m = torch.arange(256.0).view(16, 16)  # exact in fp16
    out = ext.probe_ldmatrix(m.flatten().to(device))
    assert torch.equal(out.cpu().view(2, 32, 4, 2), ldmatrix_fragments(m))
