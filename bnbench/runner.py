"""Runs one case for every implementation: numerics, backend, peak memory, time; one row each.

For each case: inputs and the float64 reference once; then per implementation,
inside its context (cuDNN on or off):

1. build the function (in conv_bn_eval: and prepare it for the case's conv and
   BN, e.g. fold them, untimed), and call it once on fresh running statistics:
   that call compiles/autotunes whatever needs it, and its outputs are compared
   with the reference (``numerics``);
2. one more call under torch.profiler: the ``backend`` that ran ("unknown" if the
   profiler fails, with the reason in ``error``), and on CUDA the peak memory that
   call allocated beyond what was resident before it;
3. the time (``timing``), unless the implementation is Triton run by the
   interpreter: then the time columns stay empty; on CUDA also the wall time per call
   back to back and the CUDA-graph replay time (``timing.host_times``: ``wall_us``,
   ``graph_us``; a call that cannot be captured has no ``graph_us`` and its ``error``
   says why, the row staying "ok").

Any exception in a case or an implementation becomes that row's ``error``
(status "error") and the sweep goes on; an implementation that cannot run
there gives status "skipped" and the reason.  If only the float64 reference
fails, the implementations still run: their rows have status "ok", no error
figures, and ``error`` says why there is no reference.
"""

from dataclasses import dataclass

from . import backends, numerics, registry, timing
from .cases import gbps

# Triton rows are checked through the interpreter only up to this many elements.
INTERPRETER_MAX_NUMEL = 1 << 18
# Estimated bytes per element for a case on the GPU: x, dy, y, dx and grads in the
# input dtype (element size E, up to 6 tensors), plus the float64 reference (x, dy,
# y, dx and what autograd saves, up to 6 tensors of 8 bytes); a residual adds r and
# dr to both (FIT_RESIDUAL_TENSORS).  conv_bn_eval's conv weight counts apart.
FIT_BYTES_PER_ELEMENT = (6, 6 * 8)
FIT_RESIDUAL_TENSORS = 2
FLUSH_BYTES = 256 << 20  # do_bench's L2-flush buffer


@dataclass(frozen=True)
class Options:
    """How a sweep measures: device, timing budget, seed."""

    device: str
    interpreted: bool
    warmup_ms: float = 25
    rep_ms: float = 100
    seed: int = 0
    copy_gbps: float = None
    host_times: bool = True  # on CUDA: wall_us and graph_us too (timing.host_times)


def one_line(exc):
    """`exc` as "Type: first line of the message", at most 300 characters."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text[:300]


def case_fields(case):
    return dict(mode=case.mode, N=case.N, C=case.C, H=case.H, W=case.W, dtype=case.dtype,
                layout=case.layout, fusion=case.fusion)


def fits_on_gpu(case):
    """None if the case should fit in the GPU's free memory, else why not."""
    import torch

    from .cases import CONV_KERNEL, ELEMENT_SIZE

    E = ELEMENT_SIZE[case.dtype]
    per_element = FIT_BYTES_PER_ELEMENT[0] * E + FIT_BYTES_PER_ELEMENT[1]
    if case.residual:
        per_element += FIT_RESIDUAL_TENSORS * (E + 8)
    weights = 2 * CONV_KERNEL ** 2 * case.C ** 2 * (E + 8) if case.conv else 0  # folded too
    need = case.numel * per_element + weights + FLUSH_BYTES
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    free = torch.cuda.mem_get_info()[0] + cached
    if need > 0.9 * free:
        return (f"does not fit in GPU memory: needs about {need / 2**30:.1f} GiB, "
                f"{free / 2**30:.1f} GiB free")
    return None


def make_step(fn, case, inputs):
    """The timed call and the tensors whose grads are reset before each repetition
    (``registry.make_step``, on its own copies of the running statistics)."""
    step, grads, _ = registry.make_step(fn, case.spec, case.epilogue, inputs,
                                        inputs.running_mean.clone(), inputs.running_var.clone())
    return step, grads


def run_impl(impl, case, inputs, ref, opts):
    """One row: `impl` on `case` (the module docstring gives the steps).

    `ref` is the float64 reference, or a string saying why there is none: the row
    is then timed but has no error figures, and the string goes into ``error``.
    """
    import torch

    cuda = opts.device == "cuda"
    row = dict(impl=impl.name, status="ok")
    reason = impl.unavailable(opts.device)
    if reason is None and impl.family == "triton" and opts.interpreted \
            and case.numel > INTERPRETER_MAX_NUMEL:
        reason = (f"too large for Triton's interpreter ({case.numel} > {INTERPRETER_MAX_NUMEL} "
                  f"elements); run on a GPU")
    if reason is not None:
        row.update(status="skipped", error=reason)
        return row
    try:
        with impl.context():
            fn = impl.build()
            if case.conv:
                fn = fn(inputs.conv, inputs.bn)  # e.g. fold: once per case, untimed
            out = numerics.call(fn, case, inputs, inputs.running_mean.clone(),
                                inputs.running_var.clone())
            if isinstance(ref, str):
                row["error"] = ref  # the error columns stay empty
            else:
                row.update(numerics.compare(out, ref, case))
            del out
            step, grads = make_step(fn, case, inputs)
            if cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            try:
                ops, kernels = backends.observe(step, opts.device)
                row["backend"] = backends.classify(ops, kernels, opts.device, opts.interpreted,
                                                    conv=case.conv)
            except Exception as exc:  # e.g. no CUPTI: the row stays, its backend unknown
                row.update(backend="unknown", error=f"backend not identified: {one_line(exc)}")
            if cuda:
                row["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
            if impl.family == "triton" and opts.interpreted:
                return row  # an interpreter time says nothing about a kernel
            t = timing.bench(step, opts.device, opts.warmup_ms, opts.rep_ms, grads)
            row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                       gbps=gbps(case, t.median_ms))
            if opts.copy_gbps:
                row["frac_copy_bw"] = row["gbps"] / opts.copy_gbps
            if cuda and opts.host_times:  # what a user pays: back to back, and as a CUDA graph
                try:
                    host = timing.host_times(step, grads, t.median_ms, opts.rep_ms)
                    row.update(wall_us=host.wall_us, graph_us=host.graph_us)
                    problem = host.graph_error and f"CUDA graph: {host.graph_error}"
                except Exception as exc:  # the row keeps its device time
                    problem = f"host times: {one_line(exc)}"
                if problem:
                    row["error"] = "; ".join(filter(None, (row.get("error"), problem)))
    except Exception as exc:  # any failure is recorded and the sweep goes on
        row.update(status="error", error=one_line(exc))
        if cuda:
            torch.cuda.empty_cache()
    return row


def run_case(case, impls, opts):
    """Yield one row (a dict of CSV columns) per implementation of `impls` that runs `case.mode`."""
    import torch

    impls = [impl for impl in impls if case.mode in impl.modes]
    fields = case_fields(case)
    if opts.device == "cuda":
        reason = fits_on_gpu(case)
        if reason is not None:
            for impl in impls:
                yield dict(fields, impl=impl.name, status="skipped", error=reason)
            return
    try:
        inputs = numerics.make_inputs(case, opts.device, opts.seed)
    except Exception as exc:  # no inputs: every implementation's row says why
        for impl in impls:
            yield dict(fields, impl=impl.name, status="error", error=f"inputs: {one_line(exc)}")
        if opts.device == "cuda":
            torch.cuda.empty_cache()
        return
    try:
        ref = numerics.reference(case, inputs)
    except Exception as exc:  # the implementations still run (and may fail on their own)
        ref = f"no float64 reference ({one_line(exc)})"
    for impl in impls:
        yield dict(fields, **run_impl(impl, case, inputs, ref, opts))
