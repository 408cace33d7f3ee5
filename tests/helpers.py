"""Shared comparison helpers: one tolerance table, float64 copies, poisoned outputs.

The float64 reference itself is ``kernels.torch_batch_norm`` (torch's batch norm with the
same epilogue), run on :func:`f64` copies."""

import torch

# Tolerances against a float64 reference computed from the same (upcast) inputs:
# |actual - expected| <= atol + rtol * |expected|, elementwise.
TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def assert_close(actual, expected, dtype, what):
    """Compare to a float64 reference with the tolerance of `dtype`; the message says where."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(), **TOL[dtype],
        msg=lambda m: f"{what} ({dtype}): {m}",
    )


def f64(t, requires_grad=False):
    """A float64 CPU copy (a new leaf), or None."""
    if t is None:
        return None
    return t.detach().to("cpu", torch.float64, copy=True).requires_grad_(requires_grad)


def poison_(t):
    """Fill with NaN so that an element the kernel forgets to write fails the comparison."""
    return t.fill_(float("nan"))
