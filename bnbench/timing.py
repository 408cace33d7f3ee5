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

What a user pays per call (CUDA only, :func:`host_times`): do_bench's time is the
device's, the launches queued behind the flush, so it hides host cost.  ``wall_us`` is
the wall time per call of calls made back to back (no flush, one synchronisation at the
end of each round: the host's cost where it exceeds the device's); ``graph_us`` the same
for replays of the call captured once with ``torch.cuda.graph`` (host cost gone: what a
captured step pays).  Medians over rounds.
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


@dataclass(frozen=True)
class HostTimes:
    """Per call, in microseconds: back-to-back wall time, and CUDA-graph replay time (None
    where the call could not be captured; `graph_error` then says why)."""

    wall_us: float
    graph_us: float = None
    graph_error: str = None


def _resetter(grad_to_none):
    def reset():
        for t in grad_to_none or ():
            t.grad = None
    return reset


def _rounds(fn, calls, rounds, sync):
    """Median over `rounds` of the wall time per call (µs) of `calls` back-to-back `fn()`,
    `sync()` once at the end of each round."""
    times = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return float(np.median(times))


def wall_per_call_us(fn, device, grad_to_none=None, calls=100, rounds=5):
    """Wall time per call of `fn` called back to back (µs): no cache flush, the device
    synchronised once per round; the grads reset before each call as do_bench does."""
    import torch

    reset = _resetter(grad_to_none)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def call():
        reset()
        fn()
    call()
    return _rounds(call, calls, rounds, sync)


def graph_replay_us(fn, grad_to_none=None, calls=100, rounds=5, warmup=3):
    """Replay time per call (µs) of `fn` captured once with ``torch.cuda.graph``, after
    `warmup` calls on a side stream (PyTorch's capture recipe); raises what the capture
    raises.  The grads are reset before the warm-up and the capture (the captured call
    then writes fresh ones, in the graph's memory, on every replay) and after."""
    import torch

    reset = _resetter(grad_to_none)
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            reset()
            fn()
    current.wait_stream(side)
    reset()
    graph, raised = torch.cuda.CUDAGraph(), []

    def captured():
        try:
            fn()
        except Exception as exc:  # the call's own error, not the capture's end that follows
            raised.append(exc)
            raise

    try:
        try:
            with torch.cuda.graph(graph):
                captured()
        except Exception as exc:
            raise (raised[0] if raised else exc) from None
        graph.replay()
        return _rounds(graph.replay, calls, rounds, torch.cuda.synchronize)
    finally:
        # torch.cuda.graph leaves its capture stream current when the capture's end raises
        torch.cuda.set_stream(current)
        reset()
        del graph
        torch.cuda.synchronize()


def host_times(fn, grad_to_none=None, median_ms=None, rep_ms=100, rounds=5):
    """:class:`HostTimes` of `fn` on the current CUDA device; the calls per round from
    do_bench's `median_ms` (about `rep_ms` in all, 10 to 1000 a round)."""
    import torch

    calls = 100 if not median_ms else max(10, min(1000, int(rep_ms / rounds / median_ms)))
    wall = wall_per_call_us(fn, "cuda", grad_to_none, calls, rounds)
    try:
        graph = graph_replay_us(fn, grad_to_none, calls, rounds)
    except Exception as exc:  # a call that cannot be captured: the row says why
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        lines = str(exc).strip().splitlines()
        return HostTimes(wall, None, f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200])
    return HostTimes(wall, graph)


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
