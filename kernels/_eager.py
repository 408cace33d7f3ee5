"""The lean eager route of ``kernels.batch_norm``: what a call costs on the host.

A plain eager call (real tensors, no torch.compile, no torch.func transform, no forward-mode
AD, no tracing) does not need what the full route gives the other callers (the custom ops
torch.compile and torch.export see, the autograd.Function in the ``setup_context`` style
that torch.func accepts, the higher-order formulas).  It takes this route instead:

* the argument checks are done once per call signature (:func:`prepare`): the shapes,
  strides, dtypes, devices and types of every tensor argument, and the other arguments,
  form a key; the first call with a key runs ``check_batch_norm_args`` (raising exactly
  what the full route raises) and keeps what it decided (:class:`Prepared`); later calls
  with that key look it up;
* the host work of the forward (layout, plan, strides, the launches' arguments and
  constexprs, how the output is allocated) is also done once per signature: the Prepared
  keeps a recipe (``kernels.forward.eval_recipe`` / ``train_recipe``), a function that
  allocates the outputs and makes the launches, nothing else; the backward keeps one per
  gradient signature (dy's sizes, strides and dtype, the gradients needed:
  ``kernels.backward.backward_recipe``).  Where there is no recipe (an operand copied to
  the path's layout, an empty batch, autotuning on) the host functions
  (``bn_forward_train``, ``bn_forward_eval``, ``bn_backward``) are called directly, not
  through the dispatcher;
* when a gradient is needed, one autograd node per call: :class:`_EagerFunction`, an
  ``autograd.Function`` in the old style (``forward(ctx, ...)``), applied through the C
  ``apply`` (no signature binding, dead functorch wrappers unwrapped for the four tensor
  arguments only); its backward is the Triton backward, or the torch-op formulas of the
  full route when a graph of the backward is being built (double backward); without a
  gradient, no node at all.

The route gives the same results as the full one (the same kernels and launch arguments;
``tests/test_eager.py`` compares them bit for bit) and the same errors.  It allocates only
outputs, saved statistics and the kernels' partial buffers, and reads nothing back to the
host, so a step made of such calls can be captured in a CUDA graph after a warm-up call.
``full_route()`` turns it off in a block (the tests use it to compare the routes).
"""

import contextlib

import torch
from torch import Tensor

from . import _plan, _tuning
from . import forward as _fwd
from ._common import Epilogue
from .backward import backward_recipe, bn_backward
from .forward import acc_dtype, bn_forward_eval, bn_forward_train, eval_recipe, train_recipe

INTERPRETED = type(_fwd._bn_fwd_apply_kernel).__name__ == "InterpretedFunction"

PREPARED_CACHE_SIZE = 4096  # call signatures kept; the cache is emptied when it is full
BACKWARD_CACHE_SIZE = 64  # gradient signatures kept per call signature (the same rule)
_prepared = {}
_MISSING = object()
_no_context = contextlib.nullcontext()  # reusable: it holds no state
_enabled = [True]  # full_route() clears it within its block
_forward_ad = torch.autograd.forward_ad
_profiling = torch._C._autograd._profiler_enabled


@contextlib.contextmanager
def full_route():
    """Within the block, every call takes the full route (custom ops, the setup_context
    autograd rule), as it does under torch.compile or a torch.func transform."""
    previous = _enabled[0]
    _enabled[0] = False
    try:
        yield
    finally:
        _enabled[0] = previous


def lean(x):
    """True when a call with input `x` may take the lean route: a plain tensor, and none of
    torch.compile, a torch.func transform, forward-mode AD or tracing (jit.trace, and with it
    the TorchScript ONNX exporter) is active.  (torch.export and the dynamo ONNX exporter
    trace fake or functional tensors: `type(x) is Tensor` is False there.)"""
    return (type(x) is Tensor and _enabled[0] and not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is None
            and _forward_ad._current_level < 0 and not torch._C._is_tracing())


class Prepared:
    """What the checks decided for one call signature.  `route`: "triton", or "torch" (the
    CPU fallback without the interpreter); `run`: the forward's recipe
    (kernels.forward.eval_recipe / train_recipe: its plan and launch arguments), or None
    where the host functions do the work per call."""

    __slots__ = ("route", "training", "stats", "epilogue", "activation", "copies", "run",
                 "policy", "backward")

    def __init__(self, route, training, stats, epilogue, activation, copies, run, policy):
        self.route, self.training, self.stats = route, training, stats
        self.epilogue, self.activation, self.copies, self.run = epilogue, activation, copies, run
        self.policy = policy  # the plans' (kernels._plan.current_policy() at the first call)
        self.backward = {}  # (dy's sizes, strides, dtype, needed grads) -> backward_recipe


def prepare(check, input, running_mean, running_var, weight, bias, training, momentum, eps,
            stats, residual, activation, num_batches_tracked):
    """The Prepared of this call's signature, checking the arguments the first time (with
    `check`, kernels.ops.check_batch_norm_args, which raises what torch would)."""
    policy = _plan._context_policy.get() or _plan._default_policy  # current_policy()
    # one flat tuple, written out: the key is built on every call
    key = (input.shape, input.stride(), input.dtype, input.get_device(), training,
           type(momentum), eps, stats, activation, num_batches_tracked is None, id(policy),
           _tuning._enabled,
           None if running_mean is None else (
               running_mean.shape, running_mean.stride(), running_mean.dtype,
               running_mean.get_device(), type(running_mean)),
           None if running_var is None else (
               running_var.shape, running_var.stride(), running_var.dtype,
               running_var.get_device(), type(running_var)),
           None if weight is None else (
               weight.shape, weight.stride(), weight.dtype, weight.get_device(), type(weight)),
           None if bias is None else (
               bias.shape, bias.stride(), bias.dtype, bias.get_device(), type(bias)),
           None if residual is None else (
               residual.shape, residual.stride(), residual.dtype, residual.get_device(),
               type(residual)))
    found = _prepared.get(key)
    if found is not None and found.policy is policy:  # (an id can be reused: the object)
        return found
    check(input, running_mean, running_var, weight, bias, training, momentum, stats, residual,
          activation, eps)
    per_channel = (running_mean, running_var, weight, bias)
    copies = any(t is not None and not t.is_contiguous() for t in per_channel)
    route = "triton" if uses_triton(input) else "torch"
    epilogue = Epilogue.of(residual is not None, activation)
    run = None
    if route == "triton" and not copies:
        run = (train_recipe(input, weight, bias, running_mean, eps, stats, residual, epilogue,
                            num_batches_tracked is not None) if training
               else eval_recipe(input, weight, bias, eps, residual, epilogue))
    found = Prepared(route, bool(training), stats, epilogue, activation, copies, run, policy)
    if len(_prepared) >= PREPARED_CACHE_SIZE:
        _prepared.clear()
    _prepared[key] = found
    return found


def uses_triton(t):
    """True when batch norm on tensor `t` runs the Triton kernels (not the CPU fallback)."""
    return t.device.type == "cuda" or INTERPRETED


def _dense(t):
    """`t` itself when the kernels can address it as ptr + c, else a contiguous copy."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def call(prepared, input, running_mean, running_var, weight, bias, momentum, eps, residual,
         num_batches_tracked, fallback):
    """Run a prepared call on the lean route; returns the output, or None where the full
    route is to run it (strided per-channel tensors: its copies and write-back).
    `fallback` is kernels.torch_batch_norm (the route "torch")."""
    run = prepared.run
    if run is not None and not _profiling():  # the common case: _call's, one frame less
        if torch.is_grad_enabled() and (
                input.requires_grad or (weight is not None and weight.requires_grad)
                or (bias is not None and bias.requires_grad)
                or (residual is not None and residual.requires_grad)):
            return _node(prepared, input, running_mean, running_var, weight, bias, momentum,
                         eps, residual, num_batches_tracked)
        if prepared.training:
            return run(input, weight, bias, running_mean, running_var, residual,
                       num_batches_tracked, momentum)[0]
        return run(input, weight, bias, running_mean, running_var, residual)
    if prepared.route == "torch":
        if num_batches_tracked is not None and prepared.training and running_mean is not None:
            momentum = 1.0 / float(num_batches_tracked)
        return fallback(input, running_mean, running_var, weight, bias, prepared.training,
                        momentum, eps, residual, prepared.activation)
    if prepared.copies:
        return None
    if _profiling():  # a profile names the call as it names the full route's custom op
        name = "bnbench::batch_norm_train" if prepared.training else "bnbench::batch_norm_eval"
        with torch.profiler.record_function(name):
            return _call(prepared, input, running_mean, running_var, weight, bias, momentum,
                         eps, residual, num_batches_tracked)
    return _call(prepared, input, running_mean, running_var, weight, bias, momentum, eps,
                 residual, num_batches_tracked)


def _call(prepared, input, running_mean, running_var, weight, bias, momentum, eps, residual,
          num_batches_tracked):
    if torch.is_grad_enabled() and (
            input.requires_grad or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
            or (residual is not None and residual.requires_grad)):
        return _node(prepared, input, running_mean, running_var, weight, bias, momentum, eps,
                     residual, num_batches_tracked)
    run = prepared.run
    if run is not None:
        if prepared.training:
            return run(input, weight, bias, running_mean, running_var, residual,
                       num_batches_tracked, momentum)[0]
        return run(input, weight, bias, running_mean, running_var, residual)
    if prepared.training:
        return bn_forward_train(input, weight, bias, running_mean, running_var, momentum, eps,
                                prepared.stats, residual, prepared.epilogue,
                                num_batches_tracked)[0]
    return bn_forward_eval(input, weight, bias, running_mean, running_var, eps, residual,
                           prepared.epilogue)


def _node(prepared, input, running_mean, running_var, weight, bias, momentum, eps, residual,
          num_batches_tracked):
    """The call as one autograd node (_EagerFunction)."""
    return _apply(_unwrap(input), weight if weight is None else _unwrap(weight),
                  bias if bias is None else _unwrap(bias),
                  residual if residual is None else _unwrap(residual),
                  (prepared, running_mean, running_var, num_batches_tracked, momentum, eps))


class _EagerFunction(torch.autograd.Function):
    """One autograd node per call, in the old style (no signature binding in ``apply``).

    Saved: x, y where the backward reads it, the parameters, the residual, and the
    statistics: the batch's (training) or the running ones (eval, as torch's batch norm
    saves them: modifying them before the backward is an error)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, state):
        # the rest in one argument: apply's per-argument work is for the differentiable ones
        prepared, running_mean, running_var, num_batches_tracked, momentum, eps = state
        epilogue, run = prepared.epilogue, prepared.run
        if run is not None and prepared.training:
            y, mean, rstd = run(x, weight, bias, running_mean, running_var, residual,
                                num_batches_tracked, momentum)
        elif run is not None:
            y = run(x, weight, bias, running_mean, running_var, residual)
            mean, rstd = running_mean, running_var
        elif prepared.training:
            y, mean, rstd = bn_forward_train(x, weight, bias, running_mean, running_var,
                                             momentum, eps, prepared.stats, residual, epilogue,
                                             num_batches_tracked)
        else:
            y = bn_forward_eval(x, weight, bias, running_mean, running_var, eps, residual,
                                epilogue)
            mean, rstd = running_mean, running_var
        ctx.save_for_backward(x, y if epilogue.reads_output else None, weight, bias, residual,
                              mean, rstd)
        ctx.prepared, ctx.eps = prepared, eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, weight, bias, residual, mean, rstd = ctx.saved_tensors
        prepared = ctx.prepared
        training, epilogue = prepared.training, prepared.epilogue
        if not training:  # the running statistics, as the forward used them
            acc = acc_dtype(x.dtype)
            mean, rstd = mean.to(acc), rstd.to(acc).add(ctx.eps).rsqrt()
        need = ctx.needs_input_grad
        if torch.is_grad_enabled() or _forward_ad._current_level >= 0:
            # a graph of the backward is built (double backward): torch ops
            from .ops import _composite_grads
            dx, dw, db, dres = _composite_grads(dy, x, weight, bias, residual, mean, rstd,
                                                training, ctx.eps, epilogue)
        else:
            key = (dy.shape, dy.stride(), dy.dtype, need)
            run = prepared.backward.get(key, _MISSING)
            if run is _MISSING:
                with _plan.planning(prepared.policy):
                    run = backward_recipe(
                        dy, x, y, weight, bias, training=training, epilogue=epilogue,
                        residual=residual, need_dx=need[0], need_dweight=need[1],
                        need_dbias=need[2], need_dresidual=need[3])
                if len(prepared.backward) >= BACKWARD_CACHE_SIZE:
                    prepared.backward.clear()
                prepared.backward[key] = run
            with (torch.profiler.record_function("bnbench::batch_norm_backward")
                  if _profiling() else _no_context):
                if run is not None:
                    dx, dw, db, dres = run(dy, x, y, weight, bias, mean, rstd, residual)
                else:
                    with _plan.planning(prepared.policy):
                        dx, dw, db, dres = bn_backward(
                            dy, x, y, weight, bias, mean, rstd, training=training,
                            epilogue=epilogue,
                            residual=residual if epilogue.reads_residual else None,
                            need_dx=need[0], need_dweight=need[1], need_dbias=need[2],
                            need_dresidual=need[3])
        return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None,
                dres if need[3] else None, None)


# Function.apply without what the lean route does not need: no functorch transform is active
# (lean() checked), so its unwrap of dead functorch wrappers (a tensor that escaped a
# transform) is done for the four tensor arguments only, and straight to the C apply
_apply = super(torch.autograd.Function, _EagerFunction).apply
_unwrap = torch._C._functorch.unwrap_if_dead
