"""The importable op: ``kernels.batch_norm``, registered with ``torch.library``.

Three custom ops wrap the host functions, so ``torch.compile`` sees them as ops
(no graph break) and never traces into Triton:

* ``bnbench::batch_norm_train``: batch statistics, updates the running stats
  in place (declared in ``mutates_args``); returns (y, mean, rstd).
* ``bnbench::batch_norm_eval``: fixed statistics; returns y.
* ``bnbench::batch_norm_backward``: (dx, dweight, dbias, dresidual); gradients
  that were not asked for come back as empty tensors.

A mutating op cannot carry an autograd formula in ``torch.library``, so the
autograd rule is a small ``torch.autograd.Function`` around them (Dynamo traces
it into the graph).

Where the Triton kernels run: CUDA tensors always; CPU tensors when Triton's
interpreter is active (``TRITON_INTERPRET=1`` set before ``triton`` was first
imported).  Otherwise CPU tensors fall back to PyTorch's own batch norm, so a
converted model still runs anywhere.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _interpreter
from . import forward as _fwd
from ._layout import empty_output
from .backward import bn_backward
from .forward import STATS_MODES, acc_dtype, bn_forward_eval, bn_forward_train

ACTIVATIONS = (None, "relu")
INTERPRETED = type(_fwd._bn_fwd_apply_kernel).__name__ == "InterpretedFunction"
if INTERPRETED:
    _interpreter.install()  # skips the interpreter's redundant re-patching (speed only)


def uses_triton(t):
    """True when batch norm on tensor `t` runs the Triton kernels (not the CPU fallback)."""
    return t.device.type == "cuda" or INTERPRETED


# ---------------------------------------------------------------------------------------------
# torch.library ops

@torch.library.custom_op("bnbench::batch_norm_train", mutates_args=("running_mean", "running_var"))
def _train_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
              residual: Optional[Tensor], running_mean: Optional[Tensor],
              running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
              momentum: float, eps: float, stats: str,
              relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    return bn_forward_train(x, weight, bias, running_mean, running_var, momentum, eps,
                            stats, residual, relu, num_batches_tracked)


@_train_op.register_fake
def _(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps,
      stats, relu):
    C = x.shape[1]
    stat = x.new_empty(C, dtype=acc_dtype(x.dtype))
    return empty_output(x), stat, torch.empty_like(stat)


@torch.library.custom_op("bnbench::batch_norm_eval", mutates_args=())
def _eval_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             residual: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
             eps: float, relu: bool) -> Tensor:
    return bn_forward_eval(x, weight, bias, running_mean, running_var, eps, residual, relu)


@_eval_op.register_fake
def _(x, weight, bias, residual, running_mean, running_var, eps, relu):
    return empty_output(x)


@torch.library.custom_op("bnbench::batch_norm_backward", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor, y: Optional[Tensor], weight: Optional[Tensor],
                 bias: Optional[Tensor], mean: Tensor, rstd: Tensor, training: bool, relu: bool,
                 has_residual: bool,
                 grad_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    outs = bn_backward(dy, x, y, weight, bias, mean, rstd, training=training, relu=relu,
                       has_residual=has_residual, need_dx=grad_mask[0],
                       need_dweight=grad_mask[1], need_dbias=grad_mask[2],
                       need_dresidual=grad_mask[3])
    return tuple(o if o is not None else x.new_empty(0) for o in outs)


@_backward_op.register_fake
def _(dy, x, y, weight, bias, mean, rstd, training, relu, has_residual, grad_mask):
    empty = x.new_empty(0)
    return (
        empty_output(x) if grad_mask[0] else empty,
        torch.empty_like(weight) if grad_mask[1] and weight is not None else empty,
        torch.empty_like(bias) if grad_mask[2] and bias is not None else empty,
        empty_output(x) if grad_mask[3] and has_residual else x.new_empty(0),
    )


class _BatchNormFunction(torch.autograd.Function):
    """Autograd rule over the custom ops; the input checks are done by batch_norm."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                training, momentum, eps, stats, relu):
        if training:
            y, mean, rstd = torch.ops.bnbench.batch_norm_train(
                x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                momentum, eps, stats, relu)
        else:
            y = torch.ops.bnbench.batch_norm_eval(
                x, weight, bias, residual, running_mean, running_var, eps, relu)
            # backward needs the statistics the forward used: the running ones
            mean = running_mean
            rstd = running_var.to(acc_dtype(x.dtype)).add(eps).sqrt().reciprocal()
        ctx.save_for_backward(x, y if (relu and residual is not None) else None,
                              weight, bias, mean, rstd)
        ctx.flags = (training, relu, residual is not None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, weight, bias, mean, rstd = ctx.saved_tensors
        training, relu, has_residual = ctx.flags
        need = ctx.needs_input_grad
        grad_mask = [need[0], need[1], need[2], has_residual and need[3]]
        dx, dw, db, dres = torch.ops.bnbench.batch_norm_backward(
            dy, x, y, weight, bias, mean, rstd, training, relu, has_residual, grad_mask)
        return (dx if grad_mask[0] else None, dw if grad_mask[1] else None,
                db if grad_mask[2] else None, dres if grad_mask[3] else None,
                None, None, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------
# the functional API

def _check_param(name, t, x, C):
    if t is None:
        return
    if t.numel() != C:
        raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
    if t.device != x.device:
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but {name} is on {t.device} "
            f"and input is on {x.device}")
    allowed = {x.dtype, torch.float32} if x.dtype in (torch.float16, torch.bfloat16) else {x.dtype}
    if t.dtype not in allowed:
        raise RuntimeError(
            f"{name} has dtype {t.dtype} but input has dtype {x.dtype}; parameters and running "
            f"stats must have the input's dtype (or float32 for float16/bfloat16 input)")


def check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum,
                          stats, residual, activation):
    """Raise the error torch.nn.functional.batch_norm would (same type), with a clear message."""
    if stats not in STATS_MODES:
        raise ValueError(f"stats must be one of {STATS_MODES}, got {stats!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm(): input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise RuntimeError(
            f"batch_norm: expected input of shape (N, C, *) with at least 2 dims, "
            f"got a {input.dim()}-D input of shape {tuple(input.shape)}")
    if input.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise NotImplementedError(
            f'"batch_norm" not implemented for {input.dtype}: expected float16, bfloat16, '
            f'float32 or float64 input')
    if momentum is None or not isinstance(momentum, (int, float)):
        raise TypeError(
            f"batch_norm(): momentum must be a float, got {momentum!r} (momentum=None, the "
            f"cumulative average, needs kernels.BatchNorm2d's num_batches_tracked)")
    C = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        _check_param(name, t, input, C)
    if (running_mean is None) != (running_var is None):
        raise RuntimeError("running_mean and running_var must be given together or both be None")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if training and input.shape[0] * math.prod(input.shape[2:]) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}")
    if residual is not None:
        if residual.shape != input.shape:
            raise RuntimeError(
                f"residual must have the input's shape {tuple(input.shape)}, "
                f"got {tuple(residual.shape)}")
        if residual.dtype != input.dtype or residual.device != input.device:
            raise RuntimeError(
                f"residual must have the input's dtype and device ({input.dtype}, "
                f"{input.device}), got ({residual.dtype}, {residual.device})")


def _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                      residual, activation):
    """PyTorch's own batch norm with the same fusions: the fallback for CPU tensors."""
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    if activation == "relu":
        y = torch.relu(y)
    return y


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, stats="single_pass", residual=None, activation=None,
               num_batches_tracked=None):
    """Batch normalization of an (N, C, *) tensor; the contract of torch.nn.functional.batch_norm.

    Args:
        input: (N, C, *) float16/bfloat16/float32/float64 tensor; NCHW and
            channels_last are read in place and the output keeps the format.
        running_mean, running_var: (C,) running statistics, updated in place in
            training (running_var with the unbiased variance); required in eval.
        weight, bias: optional (C,) affine parameters.
        training: normalise with the batch's statistics (else the running ones).
        momentum: running-stats update factor.
        eps: added to the variance.
        stats: "single_pass" (Welford/Chan merges, x read twice) or "two_pass"
            (mean, then centred sum of squares, x read three times).
        residual: optional tensor of input's shape added after the affine step.
        activation: None or "relu", applied last: relu(bn(x) + residual).
        num_batches_tracked: for a cumulative average (a module's momentum=None):
            the batch counter, already counting this batch; momentum is then
            1 / num_batches_tracked, read on the device (so torch.compile
            needs no graph break or data-dependent guard).

    Returns:
        The normalised tensor, differentiable in input, weight, bias and residual.
    """
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum,
                          stats, residual, activation)
    if not uses_triton(input):
        if num_batches_tracked is not None and training and running_mean is not None:
            momentum = 1.0 / float(num_batches_tracked)
        return _torch_batch_norm(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps, residual, activation)
    return _BatchNormFunction.apply(input, weight, bias, residual, running_mean, running_var,
                                    num_batches_tracked, bool(training), float(momentum),
                                    float(eps), stats, activation == "relu")
