"""The importable op: ``kernels.batch_norm``, registered with ``torch.library``.

Three custom ops wrap the host functions, so ``torch.compile`` and ``torch.export`` see
them as ops (no graph break) and never trace into Triton:

* ``bnbench::batch_norm_train``: batch statistics, updates the running stats
  in place (declared in ``mutates_args``); returns (y, mean, rstd).
* ``bnbench::batch_norm_eval``: fixed statistics; returns y.
* ``bnbench::batch_norm_backward``: (dx, dweight, dbias, dresidual); gradients
  that were not asked for come back as empty tensors.

Each carries the epilogue (residual add, activation) as ``str epilogue``, a
:class:`kernels.Epilogue` value ("none", "relu", "residual+silu", ...): the public API
builds the Epilogue once (``Epilogue.of(residual is not None, activation)``) and the ops
hand it to the host functions.

A mutating op cannot carry an autograd formula in ``torch.library``, so the
autograd rule is a ``torch.autograd.Function`` around them (Dynamo traces it into
the graph), written in the ``setup_context`` style so that ``torch.func`` transforms
accept it:

* first-order backward (``loss.backward()``): the Triton backward kernels;
* double backward (a backward run with ``create_graph=True``, as ``torch.func.grad``
  always does) and forward-mode AD (``jvp``): the same formulas composed of torch
  ops (:func:`_composite_grads`, :func:`_composite_jvp`), which autograd
  differentiates further;
* ``vmap``: a batching rule that folds the vmapped dimension into the channels, so
  one kernel launch normalises every (sample, channel) pair.

Where the Triton kernels run: CUDA tensors always; CPU tensors when Triton's
interpreter is active (``TRITON_INTERPRET=1`` set before ``triton`` was first
imported).  Otherwise CPU tensors fall back to PyTorch's own batch norm, so a
converted model still runs anywhere.  While a model is exported to ONNX (either
exporter) or traced by ``torch.jit.trace``, the same fallback is recorded, so the ONNX
graph holds a standard ``BatchNormalization`` and the TorchScript graph ``aten::batch_norm``.
"""

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _eager, _triton_internals
from ._common import ACTIVATION_TABLE, Epilogue
from ._eager import INTERPRETED, _dense, uses_triton
from ._layout import empty_output
from ._plan import current_policy, planning
from .backward import bn_backward
from .forward import STATS_MODES, acc_dtype, bn_forward_eval, bn_forward_train

ACTIVATIONS = (None, *(a for a in ACTIVATION_TABLE if a != "none"))  # what activation= takes
if INTERPRETED:
    _triton_internals.install()  # skips the interpreter's redundant re-patching (speed only)


# ---------------------------------------------------------------------------------------------
# per-channel state of any strides: the kernels address (C,) tensors as ptr + c


def _write_back(dst, src):
    """Copy the updated `src` into the caller's running-stat tensor `dst` (a strided view);
    only dst's own elements are written.  An expanded (stride-0) dst is one memory location
    for every channel: it gets the last channel's value."""
    if src is dst:
        return
    if dst.dim() == 1 and dst.numel() > 1 and dst.stride(0) == 0:
        dst[-1:].copy_(src[-1:])
        return
    dst.copy_(src.view_as(dst))


# ---------------------------------------------------------------------------------------------
# torch.library ops

@torch.library.custom_op("bnbench::batch_norm_train", mutates_args=("running_mean", "running_var"))
def _train_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
              residual: Optional[Tensor], running_mean: Optional[Tensor],
              running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
              momentum: float, eps: float, stats: str,
              epilogue: str) -> tuple[Tensor, Tensor, Tensor]:
    rm, rv = _dense(running_mean), _dense(running_var)
    out = bn_forward_train(x, _dense(weight), _dense(bias), rm, rv, momentum, eps, stats,
                           residual, Epilogue(epilogue), num_batches_tracked)
    if running_mean is not None:
        _write_back(running_mean, rm)
        _write_back(running_var, rv)
    return out


@_train_op.register_fake
def _(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps,
      stats, epilogue):
    C = x.shape[1]
    stat = x.new_empty(C, dtype=acc_dtype(x.dtype))
    return empty_output(x), stat, torch.empty_like(stat)


@torch.library.custom_op("bnbench::batch_norm_eval", mutates_args=())
def _eval_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             residual: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
             eps: float, epilogue: str) -> Tensor:
    return bn_forward_eval(x, _dense(weight), _dense(bias), _dense(running_mean),
                           _dense(running_var), eps, residual, Epilogue(epilogue))


@_eval_op.register_fake
def _(x, weight, bias, residual, running_mean, running_var, eps, epilogue):
    return empty_output(x)


@torch.library.custom_op("bnbench::batch_norm_backward", mutates_args=())
def _backward_op(dy: Tensor, x: Tensor, y: Optional[Tensor], weight: Optional[Tensor],
                 bias: Optional[Tensor], mean: Tensor, rstd: Tensor, training: bool,
                 epilogue: str, grad_mask: list[bool],
                 residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # residual+silu recomputes z = x_hat * w + b + residual: it reads the residual
    outs = bn_backward(dy, x, y, _dense(weight), _dense(bias), mean, rstd, training=training,
                       epilogue=Epilogue(epilogue), residual=residual,
                       need_dx=grad_mask[0], need_dweight=grad_mask[1],
                       need_dbias=grad_mask[2], need_dresidual=grad_mask[3])
    return tuple(o if o is not None else x.new_empty(0) for o in outs)


@_backward_op.register_fake
def _(dy, x, y, weight, bias, mean, rstd, training, epilogue, grad_mask, residual=None):
    empty = x.new_empty(0)
    return (
        empty_output(x) if grad_mask[0] else empty,
        torch.empty_like(weight) if grad_mask[1] and weight is not None else empty,
        torch.empty_like(bias) if grad_mask[2] and bias is not None else empty,
        empty_output(x) if grad_mask[3] and Epilogue(epilogue).residual else x.new_empty(0),
    )


# ---------------------------------------------------------------------------------------------
# the same maths in torch ops: higher-order and forward-mode autograd, and the fallback

def _pre_activation(xhat, weight, bias, residual, shape):
    """z = xhat * w + b [+ r], the value the activation is applied to."""
    z = xhat if weight is None else xhat * weight.to(xhat.dtype).view(shape)
    if bias is not None:
        z = z + bias.to(xhat.dtype).view(shape)
    if residual is not None:
        z = z + residual.to(xhat.dtype)
    return z


def _axes(x):
    """(reduction dims, per-channel view shape) of an (N, C, *) tensor."""
    return [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)


def _composite_grads(dy, x, weight, bias, residual, mean, rstd, training, eps, epilogue):
    """(dx, dweight, dbias, dresidual) of batch norm, composed of torch ops.

    In training the statistics are recomputed from x here, so that autograd
    differentiates through them (double backward); in eval `mean` and `rstd` are
    the fixed running statistics."""
    red, shape = _axes(x)
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    if training:
        xc = xf - xf.mean(red, keepdim=True)
        rstd = (xc * xc).mean(red, keepdim=True).add(eps).rsqrt()
    else:
        xc, rstd = xf - mean.to(acc).view(shape), rstd.to(acc).view(shape)
    xhat = xc * rstd
    g = dy.to(acc)
    if epilogue.activation != "none":
        g = g * epilogue.derivative(_pre_activation(xhat, weight, bias, residual, shape))
    gw = g if weight is None else g * weight.to(acc).view(shape)
    if training:
        dx = rstd * (gw - gw.mean(red, keepdim=True) - xhat * (gw * xhat).mean(red, keepdim=True))
    else:
        dx = gw * rstd
    dweight = None if weight is None else (g * xhat).sum(red).to(weight.dtype)
    dbias = None if bias is None else g.sum(red).to(bias.dtype)
    dres = None if residual is None else g.to(residual.dtype)
    return dx.to(x.dtype), dweight, dbias, dres


def _composite_jvp(x, weight, bias, residual, mean, rstd, tx, tw, tb, tr, training, epilogue):
    """The tangent of y for tangents (tx, tw, tb, tr) of (x, weight, bias, residual)."""
    red, shape = _axes(x)
    acc = acc_dtype(x.dtype)
    rstd = rstd.to(acc).view(shape)
    xhat = (x.to(acc) - mean.to(acc).view(shape)) * rstd
    dz = torch.zeros_like(xhat)
    if tx is not None:
        t = tx.to(acc)
        if training:  # the statistics move with x
            t = t - t.mean(red, keepdim=True) - xhat * (xhat * t).mean(red, keepdim=True)
        dz = t * rstd
    if weight is not None:
        dz = dz * weight.to(acc).view(shape)
    if tw is not None:
        dz = dz + xhat * tw.to(acc).view(shape)
    if tb is not None:
        dz = dz + tb.to(acc).view(shape)
    if tr is not None:
        dz = dz + tr.to(acc)
    if epilogue.activation != "none":
        dz = dz * epilogue.derivative(_pre_activation(xhat, weight, bias, residual, shape))
    return dz.to(x.dtype)


def torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                     residual=None, activation=None):
    """PyTorch's own batch norm followed by the same epilogue in torch ops (not in place):
    act(F.batch_norm(...) [+ residual]), updating the running stats as F.batch_norm does.

    The CPU fallback, the path ONNX export and torch.jit.trace record, and the reference
    the tests compare with (on float64 inputs).  `activation`: None, "relu" or "silu"."""
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return Epilogue.of(residual is not None, activation).apply(y, residual)


def _has_tangent(tensors):
    """True when a forward-mode AD tangent rides on any of `tensors`."""
    return any(t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None
               for t in tensors)


# ---------------------------------------------------------------------------------------------
# the autograd rule

class _BatchNormFunction(torch.autograd.Function):
    """Autograd rule over the custom ops; the input checks are done by batch_norm.

    forward returns (y, mean, rstd); mean and rstd (float32, or float64 for
    float64 input) are the statistics y was normalised with, not differentiable."""

    @staticmethod
    def forward(x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                training, momentum, eps, stats, epilogue):
        if training:
            return torch.ops.bnbench.batch_norm_train(
                x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                momentum, eps, stats, epilogue.value)
        y = torch.ops.bnbench.batch_norm_eval(
            x, weight, bias, residual, running_mean, running_var, eps, epilogue.value)
        # backward needs the statistics the forward used: the running ones
        acc = acc_dtype(x.dtype)
        mean = running_mean.to(acc, copy=True)
        rstd = running_var.to(acc).add(eps).rsqrt()
        return y, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, _, _, _, training, _, eps, _, epilogue = inputs
        y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)  # no zero gradients made for mean and rstd
        # the Triton backward reads y for relu(bn(x) + r); it recomputes the rest
        y_saved = y if epilogue.reads_output else None
        ctx.save_for_backward(x, y_saved, weight, bias, residual, mean, rstd)
        ctx.save_for_forward(x, weight, bias, residual, mean, rstd)
        ctx.flags = (training, eps, epilogue)

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        x, y, weight, bias, residual, mean, rstd = ctx.saved_tensors
        training, eps, epilogue = ctx.flags
        need = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled() or _has_tangent((dy, x, weight, bias, residual)):
            # create_graph=True (double backward, torch.func) or forward-over-reverse:
            # torch ops that autograd can differentiate again
            grads = _composite_grads(dy, x, weight, bias, residual, mean, rstd, training, eps,
                                     epilogue)
        else:
            grad_mask = [need[0], need[1] and weight is not None,
                         need[2] and bias is not None, epilogue.residual and need[3]]
            grads = torch.ops.bnbench.batch_norm_backward(
                dy, x, y, weight, bias, mean, rstd, training, epilogue.value, grad_mask,
                residual if epilogue.reads_residual else None)
            grads = [g if m else None for g, m in zip(grads, grad_mask)]
        grads = [g if n else None for g, n in zip(grads, need)]
        return (*grads, None, None, None, None, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, residual, running_mean, running_var,
             num_batches_tracked, training, momentum, eps, stats, epilogue):
        """vmap over dim B: (B, N, C, *) becomes (N, B*C, *), one launch for every sample."""
        B = info.batch_size
        x_d, w_d, b_d, r_d, rm_d, rv_d, nbt_d = in_dims[:7]
        if nbt_d is not None:
            raise ValueError("vmap over kernels.batch_norm: num_batches_tracked cannot be batched")

        def fold_x(t, d):  # (B, N, C, *) (or unbatched (N, C, *)) -> (N, B*C, *)
            t = t.unsqueeze(0).expand(B, *t.shape) if d is None else t.movedim(d, 0)
            return t.movedim(0, 1).flatten(1, 2)

        def fold_c(t, d):  # (B, C) (or unbatched (C,)) -> (B*C,)
            if t is None:
                return None
            return t.repeat(B) if d is None else t.movedim(d, 0).reshape(-1)

        if training and running_mean is not None and (rm_d is None or rv_d is None):
            raise RuntimeError(
                "vmap over kernels.batch_norm in training: the running statistics would be "
                "updated in place for every vmapped sample, but running_mean/running_var are "
                "not batched. Pass batched running stats, or none (track_running_stats=False), "
                "as with torch.nn.functional.batch_norm")
        xs = fold_x(x, x_d)
        rm, rv = fold_c(running_mean, rm_d), fold_c(running_var, rv_d)
        y, mean, rstd = _BatchNormFunctionEager.apply(
            xs, fold_c(weight, w_d), fold_c(bias, b_d),
            None if residual is None else fold_x(residual, r_d), rm, rv, num_batches_tracked,
            training, momentum, eps, stats, epilogue)
        if training and running_mean is not None:  # the folded stats may be copies
            _write_back(running_mean.movedim(rm_d, 0), rm.view(B, -1))
            _write_back(running_var.movedim(rv_d, 0), rv.view(B, -1))
        y = y.unflatten(1, (B, -1)).movedim(1, 0)
        return (y, mean.view(B, -1), rstd.view(B, -1)), (0, 0, 0)


class _BatchNormFunctionEager(_BatchNormFunction):
    """The rule with forward-mode AD, used outside torch.compile (Dynamo refuses to trace an
    autograd.Function that defines jvp; a compiled graph needs no forward AD).  It also
    carries the forward's launch-planning policy (``kernels.planning``) to the backward,
    which autograd runs on a thread of its own for CUDA tensors, where the caller's context
    is not set."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _BatchNormFunction.setup_context(ctx, inputs, output)
        ctx.plan_policy = current_policy()

    @staticmethod
    def backward(ctx, *grads):
        with planning(ctx.plan_policy):
            return _BatchNormFunction.backward(ctx, *grads)

    @staticmethod
    def jvp(ctx, tx, tw, tb, tr, *_):
        x, weight, bias, residual, mean, rstd = ctx.saved_tensors
        training, _, epilogue = ctx.flags
        ty = _composite_jvp(x, weight, bias, residual, mean, rstd, tx, tw, tb, tr, training,
                            epilogue)
        return ty, None, None


# ---------------------------------------------------------------------------------------------
# the functional API

def check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum,
                          stats, residual, activation, eps=1e-5, local_batch=True):
    """Raise the error torch.nn.functional.batch_norm would (same type), with a clear message.

    `local_batch=False` (the synchronised op): the batch is the group's, so one value per
    channel on this rank is allowed."""
    if stats not in STATS_MODES:
        raise ValueError(f"stats must be one of {STATS_MODES}, got {stats!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm(): input must be a Tensor, got {type(input).__name__}")
    if input.dim() < 2:  # torch: IndexError (input.size(1) out of range)
        raise IndexError(
            f"batch_norm: expected input of shape (N, C, *) with at least 2 dims, "
            f"got a {input.dim()}-D input of shape {tuple(input.shape)}")
    if input.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise NotImplementedError(
            f'"batch_norm" not implemented for {input.dtype}: expected float16, bfloat16, '
            f'float32 or float64 input')
    if not isinstance(training, bool):  # torch's argument parser: a Python bool only
        raise TypeError(f"batch_norm(): argument 'training' must be bool, not "
                        f"{type(training).__name__}")
    if not _is_float_argument(momentum):
        raise TypeError(
            f"batch_norm(): momentum must be a float (or a 0-d tensor), got {momentum!r} "
            f"(momentum=None, the cumulative average, needs a module's num_batches_tracked)")
    if training and not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if training and local_batch and input.shape[0] * math.prod(input.shape[2:]) == 1:
        raise ValueError(
            f"Expected more than 1value per channel when training, got input size {input.size()}"
            .replace("1value", "1 value"))
    if training and (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    if not training:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
    _check_params(input, running_mean, running_var, weight, bias)
    if residual is not None:
        if residual.shape != input.shape:
            raise RuntimeError(
                f"residual must have the input's shape {tuple(input.shape)}, "
                f"got {tuple(residual.shape)}")
        if residual.dtype != input.dtype or residual.device != input.device:
            raise RuntimeError(
                f"residual must have the input's dtype and device ({input.dtype}, "
                f"{input.device}), got ({residual.dtype}, {residual.device})")


def _is_float_argument(v):
    """What torch's argument parser takes for a float: a real number or a 0-d real tensor
    that needs no gradient."""
    if isinstance(v, Tensor):
        return (v.dim() == 0 and not v.requires_grad and not v.is_complex())
    return isinstance(v, numbers.Real)


def _check_params(x, running_mean, running_var, weight, bias):
    """Per-channel tensors: C elements, x's device, and one dtype among them (torch's rule):
    x's dtype, or float32 for float16/bfloat16 input."""
    C = x.shape[1]
    given = [(n, t) for n, t in (("running_mean", running_mean), ("running_var", running_var),
                                 ("weight", weight), ("bias", bias)) if t is not None]
    allowed = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    for name, t in given:
        if t.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
        if t.device != x.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but {name} is on {t.device} "
                f"and input is on {x.device}")
        if t.dtype not in allowed and x.numel() != 0:  # empty: nothing to mix (as torch)
            raise RuntimeError(
                f"{name} has dtype {t.dtype} but input has dtype {x.dtype}; parameters and "
                f"running stats must have the input's dtype (or float32 for float16/bfloat16 "
                f"input)")
    first_name, first = given[0] if given else (None, None)
    for name, t in given[1:]:
        if t.dtype != first.dtype:
            raise RuntimeError(
                f"{name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; "
                f"weight, bias and the running stats must share one dtype")


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, stats="single_pass", residual=None, activation=None,
               num_batches_tracked=None):
    """Batch normalization of an (N, C, *) tensor; the contract of torch.nn.functional.batch_norm.

    Args:
        input: (N, C, *) float16/bfloat16/float32/float64 tensor; NCHW and
            channels_last are read in place and the output keeps the format.
        running_mean, running_var: (C,) running statistics of any strides, updated
            in place in training (running_var with the unbiased variance); required
            in eval.
        weight, bias: optional (C,) affine parameters, of any strides.
        training: normalise with the batch's statistics (else the running ones).
        momentum: running-stats update factor.
        eps: added to the variance (> 0 in training).
        stats: "single_pass" (Welford/Chan merges, x read twice) or "two_pass"
            (mean, then centred sum of squares, x read three times).
        residual: optional tensor of input's shape added after the affine step.
        activation: None, "relu" or "silu", applied last: act(bn(x) + residual).
        num_batches_tracked: for a cumulative average (a module's momentum=None):
            the batch counter, already counting this batch; momentum is then
            1 / num_batches_tracked, read on the device (so torch.compile
            needs no graph break or data-dependent guard).

    Returns:
        The normalised tensor, differentiable in input, weight, bias and residual
        (any order, forward and reverse mode, and under torch.func transforms).
    """
    if _eager.lean(input) and input.dim() >= 2:  # a plain eager call: see kernels._eager
        prepared = _eager.prepare(
            check_batch_norm_args, input, running_mean, running_var, weight, bias, training,
            momentum, eps, stats, residual, activation, num_batches_tracked)
        y = _eager.call(prepared, input, running_mean, running_var, weight, bias, momentum,
                        eps, residual, num_batches_tracked, torch_batch_norm)
        if y is not None:
            return y
    elif isinstance(input, Tensor) and input.dim() < 2 and input.numel() == 0:
        # an empty 0-D/1-D input: torch accepts it and has nothing to compute
        return torch_batch_norm(input, running_mean, running_var, weight, bias, training,
                                momentum, eps, residual, activation)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum,
                          stats, residual, activation, eps)
    if not uses_triton(input) or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        # ONNX export and torch.jit.trace record torch's own batch norm: a standard ONNX
        # BatchNormalization, and a TorchScript graph that can be saved and runs anywhere
        # (a traced Python autograd Function can be neither saved nor exported)
        if num_batches_tracked is not None and training and running_mean is not None:
            momentum = 1.0 / float(num_batches_tracked)
        return torch_batch_norm(input, running_mean, running_var, weight, bias, training,
                                momentum, eps, residual, activation)
    function = _BatchNormFunction if torch.compiler.is_compiling() else _BatchNormFunctionEager
    return function.apply(
        input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
        bool(training), float(momentum), float(eps), stats,
        Epilogue.of(residual is not None, activation))[0]
