"""The implementations a sweep compares, by name.

Triton (this project's kernels, ``kernels.batch_norm``):
    triton_two_pass     training; statistics by mean, then centred sum of squares
    triton_single_pass  training; statistics by Welford/Chan merges
    triton_eval         eval; the one-launch inference kernel (no statistics to compute,
                        so one implementation stands for both)
Baselines (``torch.nn.functional.batch_norm``):
    cudnn               cuDNN enabled; PyTorch still routes some cases to its own kernels
                        (bfloat16, very large batches, eps below cuDNN's minimum), so the
                        row's ``backend`` column says what ran
    torch_native        cuDNN disabled: ATen's own kernels
    torch_compile       ``torch.compile`` with static shapes (Inductor's generated kernels),
                        compiled afresh for each case after ``torch._dynamo.reset()``, so no
                        recompile limit is reached and nothing silently runs eagerly

Every implementation is a function
``fn(x, running_mean, running_var, weight, bias, training, momentum, eps) -> y``
built by ``Impl.build()`` (inside ``Impl.context()``) once per case.
"""

import contextlib
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

TRAIN_MODES = ("train_fwd", "train_fwd_bwd")
ALL_MODES = ("train_fwd", "train_fwd_bwd", "eval")


@contextlib.contextmanager
def cudnn_enabled(flag):
    """Set torch.backends.cudnn.enabled (and nothing else) for the duration."""
    import torch

    old = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = flag
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = old


@dataclass(frozen=True)
class Impl:
    """One implementation.

    Attributes:
        name: the CSV's ``impl`` value.
        family: "triton" (timed only when compiled for a GPU) or "baseline".
        modes: the modes it runs.
        build: () -> fn; see the module docstring.
        check: (device) -> None, or the reason it cannot run there.
        cudnn: torch.backends.cudnn.enabled while it runs.
    """

    name: str
    family: str
    modes: tuple
    build: Callable[[], Callable]
    check: Callable[[str], Optional[str]]
    cudnn: bool = True

    def context(self):
        return cudnn_enabled(self.cudnn)

    def unavailable(self, device):
        """None if it can run on `device`, else the reason."""
        return self.check(device)


def _triton_build(stats):
    def build():
        import kernels

        def fn(x, running_mean, running_var, weight, bias, training, momentum, eps):
            return kernels.batch_norm(x, running_mean, running_var, weight, bias, training,
                                      momentum, eps, stats=stats)
        return fn
    return build


def _triton_check(device):
    import kernels

    if device == "cpu" and not kernels.INTERPRETED:
        return ("Triton's interpreter is not active (TRITON_INTERPRET=1 must be set before "
                "triton is imported); on CPU kernels.batch_norm would run torch's batch norm")
    return None


def _torch_build():
    import torch.nn.functional as F

    return F.batch_norm


def _compile_build():
    import torch
    import torch.nn.functional as F

    torch._dynamo.reset()
    return torch.compile(F.batch_norm, dynamic=False)


def _cudnn_check(device):
    import torch

    if device != "cuda":
        return "cuDNN needs a CUDA device"
    if not torch.backends.cudnn.is_available():
        return "this torch build has no cuDNN"
    return None


def _compile_check(device):
    if device == "cpu":
        compilers = (os.environ.get("CXX"), "g++", "c++", "clang++")
        if not any(c and shutil.which(c) for c in compilers):
            return "torch.compile's CPU backend needs a C++ compiler and none was found"
    return None


def _always(device):
    return None


IMPLS = {impl.name: impl for impl in (
    Impl("triton_two_pass", "triton", TRAIN_MODES, _triton_build("two_pass"), _triton_check),
    Impl("triton_single_pass", "triton", TRAIN_MODES, _triton_build("single_pass"), _triton_check),
    Impl("triton_eval", "triton", ("eval",), _triton_build("single_pass"), _triton_check),
    Impl("cudnn", "baseline", ALL_MODES, _torch_build, _cudnn_check, cudnn=True),
    Impl("torch_native", "baseline", ALL_MODES, _torch_build, _always, cudnn=False),
    Impl("torch_compile", "baseline", ALL_MODES, _compile_build, _compile_check),
)}


def default_impls(device):
    """Every implementation, less cuDNN without a GPU (it would only give skipped rows)."""
    return [name for name in IMPLS if not (name == "cudnn" and device != "cuda")]
