"""Inputs of a case, the float64 reference, and the error of an implementation against it.

Every implementation of a case (baselines included) gets the same inputs:
x ~ per-channel N(shift_c, scale_c^2) with shift_c ~ N(0, 1) and
scale_c ~ U(0.5, 2), dy ~ N(0, 1), weight ~ U(0.5, 1.5), bias ~ N(0, 1),
running_mean ~ N(0, 0.1^2), running_var ~ U(0.5, 1.5); x and dy in the case's
dtype and layout, the (C,) tensors in float32 for float16/bfloat16 input (as
under mixed precision) and in the input's dtype otherwise.

The reference is torch's batch norm in float64 (cuDNN off: ATen's own kernels)
on the same device, from the same values upcast.  For each quantity q compared
(``quantities(mode)``), with a = the implementation's result and r = the reference:

    max_abs_err = max |a - r|
    rel_l2_err  = ||a - r||_2 / ||r||_2

CSV columns: ``max_abs_err``/``rel_l2_err`` for the output y, and
``<q>_max_abs_err``/``<q>_rel_l2_err`` for q in dx, dweight, dbias (train_fwd_bwd)
and running_mean, running_var (both training modes), after one call from the
same initial running statistics.  A column that does not apply stays empty.
"""

from dataclasses import dataclass

QUANTITIES = ("y", "dx", "dweight", "dbias", "running_mean", "running_var")
MODE_QUANTITIES = {
    "eval": ("y",),
    "train_fwd": ("y", "running_mean", "running_var"),
    "train_fwd_bwd": ("y", "dx", "dweight", "dbias", "running_mean", "running_var"),
}
MOMENTUM = 0.1
EPS = 1e-5


def error_columns(quantity):
    """The two CSV columns of a quantity: ("max_abs_err", "rel_l2_err") for y."""
    prefix = "" if quantity == "y" else f"{quantity}_"
    return f"{prefix}max_abs_err", f"{prefix}rel_l2_err"


ERROR_COLUMNS = tuple(col for q in QUANTITIES for col in error_columns(q))


@dataclass
class Inputs:
    """The tensors of one case; running stats here are the initial values (never mutated)."""

    x: object
    dy: object
    weight: object
    bias: object
    running_mean: object
    running_var: object


def torch_dtype(name):
    import torch

    return getattr(torch, name)


def make_inputs(case, device, seed=0):
    """Fresh random inputs for `case` on `device` (the module docstring gives the distributions)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = torch_dtype(case.dtype)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    fmt = torch.channels_last if case.layout == "nhwc" else torch.contiguous_format
    shape = (case.N, case.C, case.H, case.W)
    C = case.C

    def rand(*size):
        return torch.rand(size, generator=gen, device=device)

    def randn(*size):
        return torch.randn(size, generator=gen, device=device)

    shift = randn(C).view(1, C, 1, 1)
    scale = (0.5 + 1.5 * rand(C)).view(1, C, 1, 1)
    x = (randn(*shape) * scale + shift).to(dtype).contiguous(memory_format=fmt)
    dy = randn(*shape).to(dtype).contiguous(memory_format=fmt)
    return Inputs(
        x=x, dy=dy,
        weight=(0.5 + rand(C)).to(param_dtype),
        bias=randn(C).to(param_dtype),
        running_mean=(0.1 * randn(C)).to(param_dtype),
        running_var=(0.5 + rand(C)).to(param_dtype),
    )


def call(fn, case, inputs, running_mean, running_var):
    """One call of `fn` in `case`'s mode; returns the outputs to compare (running stats updated).

    Args:
        fn: ``fn(x, running_mean, running_var, weight, bias, training, momentum, eps) -> y``.
        running_mean, running_var: the buffers this call updates (give clones).

    Returns:
        dict quantity -> tensor, for the quantities of `case.mode`.
    """
    if case.mode == "train_fwd_bwd":
        x, w, b = (t.detach().requires_grad_() for t in (inputs.x, inputs.weight, inputs.bias))
        y = fn(x, running_mean, running_var, w, b, True, MOMENTUM, EPS)
        y.backward(inputs.dy)
        out = dict(y=y.detach(), dx=x.grad, dweight=w.grad, dbias=b.grad)
    else:
        out = dict(y=fn(inputs.x, running_mean, running_var, inputs.weight, inputs.bias,
                        case.training, MOMENTUM, EPS))
    if case.training:
        out.update(running_mean=running_mean, running_var=running_var)
    return out


def reference(case, inputs):
    """The float64 results of `case` (torch's batch norm with cuDNN off, same device)."""
    import torch.nn.functional as F

    from .impls import cudnn_enabled

    f64 = Inputs(**{k: v.detach().double() for k, v in vars(inputs).items()})
    with cudnn_enabled(False):
        return call(F.batch_norm, case, f64, f64.running_mean.clone(), f64.running_var.clone())


def errors(actual, expected):
    """(max_abs_err, rel_l2_err) of `actual` against the float64 `expected`, as floats."""
    import torch

    if actual is None:
        raise RuntimeError("the implementation returned no value for a compared quantity")
    if actual.shape != expected.shape:
        raise RuntimeError(f"shape {tuple(actual.shape)} differs from the reference's "
                           f"{tuple(expected.shape)}")
    diff = actual.detach().to(device=expected.device, dtype=torch.float64) - expected
    norm = torch.linalg.vector_norm(expected).item()
    rel = torch.linalg.vector_norm(diff).item() / norm if norm > 0 else float("inf")
    return diff.abs().max().item(), rel


def compare(outputs, ref, mode):
    """The error columns of one implementation's `outputs` against the reference `ref`."""
    row = {}
    for q in MODE_QUANTITIES[mode]:
        row.update(zip(error_columns(q), errors(outputs[q], ref[q])))
    return row
