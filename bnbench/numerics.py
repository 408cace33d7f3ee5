"""Inputs of a case, the float64 reference, and the error of an implementation against it.

Every implementation of a case (baselines included) gets the same inputs:
x ~ per-channel N(shift_c, scale_c^2) with shift_c ~ N(0, 1) and
scale_c ~ U(0.5, 2), dy ~ N(0, 1), weight ~ U(0.5, 1.5), bias ~ N(0, 1),
running_mean ~ N(0, 0.1^2), running_var ~ U(0.5, 1.5); x and dy in the case's
dtype and layout, the (C,) tensors in float32 for float16/bfloat16 input (as
under mixed precision) and in the input's dtype otherwise.  With a residual
fusion, r ~ N(0, 1) like x (and dy is also r's gradient's upstream).

conv_bn_eval adds the conv (3x3, C -> C, padding 1, bias), in the case's dtype and
layout (channels_last weight for nhwc), weight and bias ~ U(-k, k) with
k = 1/sqrt(9C) (torch's default init); and the BatchNorm2d after it, in eval mode,
holds weight and bias as above but running statistics like a trained network's:
the conv output's per-channel mean and variance on these inputs (over N, H, W, in
float32), the mean shifted by 0.1 standard deviation ~ N(0, 1), the variance
scaled by U(0.8, 1.25) and at least 0.01.

The reference is the same computation in float64 on the same device, from the
same values upcast: torch's batch norm with cuDNN off (ATen's own kernels), then
the fusion (+ r, relu or silu), after the conv in conv_bn_eval.  For each quantity q
compared (``quantities(case)``), with a = the implementation's result and r = the
reference:

    max_abs_err = max |a - r|
    rel_l2_err  = ||a - r||_2 / ||r||_2

CSV columns: ``max_abs_err``/``rel_l2_err`` for the output y, and
``<q>_max_abs_err``/``<q>_rel_l2_err`` for q in dx, dweight, dbias (train_fwd_bwd),
dresidual (train_fwd_bwd with a residual) and running_mean, running_var (both
training modes), after one call from the same initial running statistics.  A
column that does not apply stays empty.
"""

from dataclasses import dataclass

from . import registry

QUANTITIES = registry.QUANTITIES
MOMENTUM, EPS = registry.MOMENTUM, registry.EPS


def quantities(case):
    """The quantities compared in `case` (``registry.Mode.compared``)."""
    return case.spec.compared(case.epilogue)


def error_columns(quantity):
    """The two CSV columns of a quantity: ("max_abs_err", "rel_l2_err") for y."""
    prefix = "" if quantity == "y" else f"{quantity}_"
    return f"{prefix}max_abs_err", f"{prefix}rel_l2_err"


ERROR_COLUMNS = tuple(col for q in QUANTITIES for col in error_columns(q))


@dataclass
class Inputs:
    """The tensors of one case; running stats here are the initial values (never mutated).

    ``residual`` is None without a residual fusion; ``conv`` (an ``nn.Conv2d``) and ``bn``
    (an ``nn.BatchNorm2d`` in eval mode holding weight, bias, running_mean and
    running_var) are None outside conv_bn_eval.
    """

    x: object
    dy: object
    weight: object
    bias: object
    running_mean: object
    running_var: object
    residual: object = None
    conv: object = None
    bn: object = None


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
    inputs = Inputs(
        x=x, dy=dy,
        weight=(0.5 + rand(C)).to(param_dtype),
        bias=randn(C).to(param_dtype),
        running_mean=(0.1 * randn(C)).to(param_dtype),
        running_var=(0.5 + rand(C)).to(param_dtype),
    )
    if case.residual:
        inputs.residual = randn(*shape).to(dtype).contiguous(memory_format=fmt)
    if case.conv:
        _add_conv(inputs, case, rand, randn, dtype, param_dtype, fmt)
    return inputs


def _add_conv(inputs, case, rand, randn, dtype, param_dtype, fmt):
    """Give `inputs` conv_bn_eval's conv and eval-mode BatchNorm2d (the module docstring
    says how they are drawn)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from .cases import CONV_KERNEL

    C, k = case.C, CONV_KERNEL
    device = inputs.x.device
    bound = 1.0 / (C * k * k) ** 0.5
    conv = nn.Conv2d(C, C, k, padding=k // 2, bias=True, device="meta")
    conv.weight = nn.Parameter((bound * (2 * rand(C, C, k, k) - 1)).to(dtype)
                               .contiguous(memory_format=fmt), requires_grad=False)
    conv.bias = nn.Parameter((bound * (2 * rand(C) - 1)).to(dtype), requires_grad=False)
    with torch.no_grad():
        z = F.conv2d(inputs.x.float(), conv.weight.float(), conv.bias.float(), padding=k // 2)
        var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
    inputs.running_mean = (mean + 0.1 * var.sqrt() * randn(C)).to(param_dtype)
    inputs.running_var = (var * (0.8 + 0.45 * rand(C))).clamp_min(0.01).to(param_dtype)
    bn = nn.BatchNorm2d(C, eps=EPS, device=device, dtype=param_dtype).eval()
    bn.requires_grad_(False)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(getattr(inputs, name))
    inputs.conv, inputs.bn = conv, bn


def call(fn, case, inputs, running_mean, running_var):
    """One call of `fn` in `case`'s mode; returns the outputs to compare (running stats updated).

    Args:
        fn: what ``registry.make_step`` calls: a batch-norm function of ``bnbench.impls``,
            or in conv_bn_eval a prepared ``fn(x, residual, activation) -> y``.
        running_mean, running_var: the buffers this call updates (give clones).

    Returns:
        dict quantity -> tensor, for the quantities of `case` (``quantities``).
    """
    step, _, outputs = registry.make_step(fn, case.spec, case.epilogue, inputs, running_mean,
                                          running_var)
    step()
    return outputs()


def reference(case, inputs):
    """The float64 results of `case` (the module docstring says how; same device)."""
    import torch.nn.functional as F

    from kernels import torch_batch_norm

    from .impls import cudnn_enabled

    def f64(t):
        return None if t is None else t.detach().double()

    f = Inputs(**{k: f64(getattr(inputs, k)) for k in ("x", "dy", "weight", "bias",
                                                        "running_mean", "running_var",
                                                        "residual")})
    with cudnn_enabled(False):
        if case.conv:
            conv = inputs.conv
            z = F.conv2d(f.x, f64(conv.weight), f64(conv.bias), conv.stride, conv.padding)
            return dict(y=torch_batch_norm(z, f.running_mean, f.running_var, f.weight, f.bias,
                                           False, 0.0, EPS, f.residual,
                                           case.epilogue.activation))
        return call(torch_batch_norm, case, f, f.running_mean.clone(), f.running_var.clone())


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


def compare(outputs, ref, case):
    """The error columns of one implementation's `outputs` against the reference `ref`."""
    row = {}
    for q in quantities(case):
        row.update(zip(error_columns(q), errors(outputs[q], ref[q])))
    return row
