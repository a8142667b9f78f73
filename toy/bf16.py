"""Whether this CPU runs bf16 natively: the toy recipe trains under bf16 autocast, which
is faster than fp32 with AVX512-BF16 or AMX and tens of times slower where the CPU only
emulates it (an AVX2-only CPU; docs/toy.md)."""

from __future__ import annotations

import time

import torch

#: A bf16 product slower than this many fp32 ones means the CPU emulates bf16.
SLOW_BF16 = 4.0


def matmul_s(dtype: torch.dtype, size: int, calls: int) -> float:
    """Seconds one ``size`` x ``size`` matrix product in ``dtype`` takes on the current
    torch threads: the mean of ``calls``, after one call that picks and warms the kernel."""
    a = torch.randn(size, size).to(dtype)
    a @ a
    t0 = time.perf_counter()
    for _ in range(calls):
        a @ a
    return (time.perf_counter() - t0) / calls


def bf16_slowdown(size: int = 128, calls: int = 5) -> float:
    """How many times longer a ``size`` x ``size`` matrix product takes in bf16 than in
    fp32 on this CPU, on the current torch threads: about 1 or less with native bf16,
    tens without it.

    Each dtype's fastest of ``calls`` products: the question is what the CPU can do, and
    an fp32 product of 0.1 ms that another process interrupts once measured a few times
    longer (a 1.4x "slowdown" on an AVX2-only CPU, once in a full test run)."""

    def fastest(dtype: torch.dtype) -> float:
        return min(matmul_s(dtype, size, 1) for _ in range(calls))

    return fastest(torch.bfloat16) / max(fastest(torch.float32), 1e-9)
