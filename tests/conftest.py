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
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    return DEVICE
