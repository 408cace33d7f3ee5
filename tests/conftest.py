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
