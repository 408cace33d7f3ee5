"""Timing: median and p20/p80 of one call, on a GPU with triton.testing.do_bench.

CUDA: ``triton.testing.do_bench`` runs the function once, estimates its time,
warms up for ``warmup_ms``, then times repetitions for about ``rep_ms`` with CUDA
events; before each repetition, outside the timed region, it sets the listed
tensors' ``.grad`` to None and overwrites a 256 MB buffer so that L2 holds none
of the inputs.  The caller allocates the inputs beforehand (never inside ``fn``).

CPU (the baselines on a machine without a GPU): the same protocol timed with
``time.perf_counter`` around each call; no cache flush, so small shapes run
from the CPU caches.  Never used for Triton's interpreter: an interpreter time
says nothing about a kernel.
"""

import time
from dataclasses import dataclass

import numpy as np

QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def bench_cuda(fn, warmup_ms=25, rep_ms=100, grad_to_none=None):
    """Median, p20 and p80 of `fn` on the current CUDA device, L2 flushed before each call."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                quantiles=list(QUANTILES))
    return Timing(median, p20, p80)


def bench_cpu(fn, warmup_ms=25, rep_ms=100, grad_to_none=None, min_reps=5, max_reps=10_000):
    """Median, p20 and p80 of `fn` on the CPU: do_bench's protocol, timed by perf_counter."""

    def reset():
        for t in grad_to_none or ():
            t.grad = None

    reset()
    fn()
    start = time.perf_counter()
    for _ in range(3):
        reset()
        fn()
    estimate_ms = max((time.perf_counter() - start) / 3 * 1e3, 1e-6)
    for _ in range(max(1, int(warmup_ms / estimate_ms))):
        reset()
        fn()
    times = []
    for _ in range(min(max_reps, max(min_reps, int(rep_ms / estimate_ms)))):
        reset()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    median, p20, p80 = np.quantile(times, QUANTILES)
    return Timing(float(median), float(p20), float(p80))


def bench(fn, device, warmup_ms=25, rep_ms=100, grad_to_none=None):
    """bench_cuda or bench_cpu, by device ("cuda" or "cpu")."""
    if device == "cuda":
        return bench_cuda(fn, warmup_ms, rep_ms, grad_to_none)
    return bench_cpu(fn, warmup_ms, rep_ms, grad_to_none)


def copy_bandwidth(device, nbytes=None):
    """The device's copy bandwidth in GB/s: a large device-to-device copy, read + write bytes.

    CUDA: 1 GiB (less when memory is short) timed by do_bench; CPU: 64 MiB.
    """
    import torch

    if nbytes is None:
        if device == "cuda":
            nbytes = min(1 << 30, torch.cuda.mem_get_info()[0] // 4)
        else:
            nbytes = 64 << 20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = bench(lambda: dst.copy_(src), device)
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9
