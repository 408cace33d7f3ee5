"""Test setup: the same suite runs compiled kernels on a GPU and the interpreter on CPU.

Without CUDA, TRITON_INTERPRET=1 is set here, before anything imports triton,
so every test runs the real kernels through Triton's interpreter.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed_and_poison():
    """Seed every test, and poison every allocation: with deterministic algorithms on, torch
    fills each new tensor (outputs, partial-statistics buffers) with NaN, so an element a
    kernel forgets to write fails the comparison."""
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: cuBLAS on GPU
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def device():
    return DEVICE


class _CountingKernel:
    """Wraps a Triton kernel to count its launches (kernel[grid](...))."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture(params=["general", "single_launch"])
def path(request, monkeypatch):
    """Run a training test on the general (multi-launch) path and on the single-launch path,
    and check that the requested path is the one that ran."""
    import kernels
    import kernels._eager
    import kernels.backward
    import kernels.forward

    single = [_CountingKernel(kernels.forward._bn_fwd_single_launch_kernel),
             _CountingKernel(kernels.backward._bn_bwd_single_launch_kernel)]
    monkeypatch.setattr(kernels.forward, "_bn_fwd_single_launch_kernel", single[0])
    monkeypatch.setattr(kernels.backward, "_bn_bwd_single_launch_kernel", single[1])
    general = {"single_launch_max_elems": 0} if request.param == "general" else {}
    # the lean route's recipes hold the kernels they launch: forget those made before the
    # counting kernels were put in place (and those made with them, after)
    kernels._eager._prepared.clear()
    with kernels.planning(**general):
        yield request.param
    kernels._eager._prepared.clear()
    launches = single[0].launches + single[1].launches
    if request.param == "general":
        assert launches == 0, "the single-launch kernels ran on the general path"
    else:
        assert single[0].launches > 0, "the single-launch forward did not run"
