"""The implementations a sweep compares, by name.

Batch norm (modes train_fwd, train_fwd_bwd, eval):

Triton (this project's kernels, ``kernels.batch_norm``; a fusion is passed to the
kernel as ``residual=`` and ``activation="relu"``/``"silu"``, so it runs in the same launch):
    triton_two_pass     training; statistics by mean, then centred sum of squares
    triton_single_pass  training; statistics by Welford/Chan merges
    triton_eval         eval; the one-launch inference kernel (no statistics to compute,
                        so one implementation stands for both)
Baselines (``torch.nn.functional.batch_norm``, then a fusion as the torch ops a user
would otherwise write: ``y += r`` and ``relu_`` (or ``F.silu(inplace=True)``), in place as
torchvision's ResNet blocks):
    cudnn               cuDNN enabled; PyTorch still routes some cases to its own kernels
                        (bfloat16, very large batches, eps below cuDNN's minimum), so the
                        row's ``backend`` column says what ran
    torch_native        cuDNN disabled: ATen's own kernels
    torch_compile       ``torch.compile`` of the same function (batch norm and fusion:
                        Inductor may fuse them) with static shapes, compiled afresh for each
                        case after ``torch._dynamo.reset()``, so no recompile limit is
                        reached and nothing silently runs eagerly

Every one of these is a function
``fn(x, running_mean, running_var, weight, bias, training, momentum, eps, residual=None,
activation=None) -> y`` (activation None, "relu" or "silu"; True is read as "relu") built
by ``Impl.build()`` (inside ``Impl.context()``) once per case.

Conv then batch norm in eval mode (mode conv_bn_eval), cuDNN enabled for the conv:
    conv+cudnn          the conv, then the ``cudnn`` baseline's batch norm and fusion (on a
                        CPU: torch's CPU conv and batch norm; the backend column says)
    conv+triton_eval    the conv, then ``kernels.batch_norm(training=False)``, fusion inside
    folded              ``kernels.fold_conv_bn(conv, bn)``: the conv alone, then the fusion
                        as torch ops; folding is done once per case, outside the timed region

For these ``Impl.build()`` gives ``prepare(conv, bn) -> fn``, with ``conv`` an
``nn.Conv2d`` and ``bn`` an ``nn.BatchNorm2d`` in eval mode, and
``fn(x, residual=None, activation=None) -> y``; ``prepare`` runs once per case, untimed.
"""

import contextlib
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Optional

from .registry import MODES

TRAIN_MODES = tuple(m.name for m in MODES.values() if m.training)
BN_MODES = tuple(m.name for m in MODES.values() if not m.conv)
CONV_MODES = tuple(m.name for m in MODES.values() if m.conv)


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
        build: () -> fn (batch-norm modes) or prepare (conv_bn_eval); see the module
            docstring.
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


def make_epilogue():
    """``epilogue(y, residual=None, activation=None)``: ``y += residual``, then the activation
    in place (``relu_``, ``F.silu(y, inplace=True)``), as torchvision's ResNet blocks do
    (``kernels.Epilogue.apply``)."""
    from kernels import Epilogue

    def epilogue(y, residual=None, activation=None):
        return Epilogue.of(residual is not None, activation).apply(y, residual, inplace=True)
    return epilogue


def make_torch_batch_norm():
    """``F.batch_norm``, then the fusion as torch ops: the baselines' function, and the
    reference's (imports done here, so that the timed call does none)."""
    import torch.nn.functional as F

    epilogue = make_epilogue()

    def torch_batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                         residual=None, activation=None):
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return epilogue(y, residual, activation)
    return torch_batch_norm


def _triton_build(stats):
    def build():
        import kernels

        def fn(x, running_mean, running_var, weight, bias, training, momentum, eps,
               residual=None, activation=None):
            if activation is True or activation is False:
                activation = "relu" if activation else None
            return kernels.batch_norm(x, running_mean, running_var, weight, bias, training,
                                      momentum, eps, stats=stats, residual=residual,
                                      activation=activation)
        return fn
    return build


def _triton_check(device):
    import kernels

    if device == "cpu" and not kernels.INTERPRETED:
        return ("Triton's interpreter is not active (TRITON_INTERPRET=1 must be set before "
                "triton is imported); on CPU kernels.batch_norm would run torch's batch norm")
    return None


def _torch_build():
    return make_torch_batch_norm()


def _compile_build():
    import torch

    torch._dynamo.reset()
    return torch.compile(make_torch_batch_norm(), dynamic=False)


def _conv_then(build_batch_norm):
    """A build of prepare(conv, bn) -> fn(x, residual, activation): `conv`, then the batch-norm
    function that `build_batch_norm()` gives, in eval mode with bn's state."""
    def build():
        batch_norm = build_batch_norm()

        def prepare(conv, bn):
            def fn(x, residual=None, activation=None):
                return batch_norm(conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                  False, 0.0, bn.eps, residual, activation)
            return fn
        return prepare
    return build


def _folded_build():
    import kernels

    epilogue = make_epilogue()

    def prepare(conv, bn):
        folded = kernels.fold_conv_bn(conv, bn)

        def fn(x, residual=None, activation=None):
            return epilogue(folded(x), residual, activation)
        return fn
    return prepare


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
    Impl("cudnn", "baseline", BN_MODES, _torch_build, _cudnn_check, cudnn=True),
    Impl("torch_native", "baseline", BN_MODES, _torch_build, _always, cudnn=False),
    Impl("torch_compile", "baseline", BN_MODES, _compile_build, _compile_check),
    Impl("conv+cudnn", "baseline", CONV_MODES, _conv_then(_torch_build), _always),
    Impl("conv+triton_eval", "triton", CONV_MODES, _conv_then(_triton_build("single_pass")),
         _triton_check),
    Impl("folded", "baseline", CONV_MODES, _folded_build, _always),
)}
# conv_bn_eval's speed-ups are taken over this one (the unfolded torch pair).
CONV_BASELINE = "conv+cudnn"


def default_impls(device):
    """Every implementation, less cuDNN without a GPU (it would only give skipped rows)."""
    return [name for name in IMPLS if not (name == "cudnn" and device != "cuda")]
