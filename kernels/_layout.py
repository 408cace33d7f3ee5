"""How a tensor of shape (N, C, *spatial) is laid out for the kernels, and allocated.

Layouts
-------
The kernels read a tensor as an ``(N, C, HW)`` view, ``HW`` being the product of
the spatial sizes, through two strides per tensor (see :mod:`kernels._common`):

* **NCHW path** (``channels_last=False``): the spatial dims flatten to one
  contiguous axis (``stride_hw == 1``); ``stride_n`` and ``stride_c`` are free,
  so contiguous tensors and channel/batch slices of them are read in place.
* **NHWC path** (``channels_last=True``): channels are contiguous
  (``stride_c == 1``) and ``(n, hw)`` flatten to one row index
  (``stride_n == HW * stride_hw``): ``torch.channels_last`` /
  ``channels_last_3d`` tensors, and ``(N, C)`` matrices.

Any other strided input is first copied to the contiguous layout.  The output
is allocated with ``torch.empty_like`` when the input is dense, so it keeps the
input's memory format; other operands (residual, grad_output) that do not fit
the chosen path are copied into it.  How the work is split is kernels._plan.
"""

import math

import torch


def _spatial(t):
    """(HW, stride_hw): stride_hw is None when HW <= 1 or the spatial dims do not flatten."""
    hw = math.prod(t.shape[2:])
    dims = [(s, st) for s, st in zip(t.shape[2:], t.stride()[2:]) if s != 1]
    if hw <= 1 or not dims:
        return hw, None
    for (_, outer), (inner_size, inner) in zip(dims, dims[1:]):
        if outer != inner * inner_size:
            return hw, None
    return hw, dims[-1][1]


def fits(t, channels_last):
    """True when `t` can be read in place on the given path."""
    N, C = t.shape[0], t.shape[1]
    hw, s_hw = _spatial(t)
    s_n, s_c = t.stride(0), t.stride(1)
    if channels_last:
        if C > 1 and s_c != 1:
            return False
        if hw <= 1:
            return True
        return s_hw is not None and (N <= 1 or s_n == hw * s_hw)
    return hw <= 1 or s_hw == 1


def strides(t, channels_last):
    """(stride_row, stride_chan) of a tensor that fits the path."""
    hw, s_hw = _spatial(t)
    if channels_last:
        return (s_hw if hw > 1 else t.stride(0)), 0
    return t.stride(0), t.stride(1)


def layout_of(x):
    """(fits in place, channels_last): the path the kernels take for `x`.

    Pure in sizes and strides, so fake (meta) tensors get the same answer.
    """
    hw, _ = _spatial(x)
    if hw > 1 and fits(x, False):
        return True, False
    if fits(x, True):
        return True, True
    return False, hw <= 1


def choose_layout(x):
    """(x or a contiguous copy of it, channels_last)."""
    in_place, channels_last = layout_of(x)
    return (x if in_place else x.contiguous()), channels_last


def to_layout(t, channels_last):
    """`t` itself when it fits the path, else a copy laid out for it."""
    if fits(t, channels_last):
        return t
    out = empty_for(t.shape, channels_last, t.dtype, t.device)
    return out.copy_(t)


def empty_for(shape, channels_last, dtype, device):
    """A new tensor laid out natively for the path: contiguous, or channels-innermost."""
    if not channels_last:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty((shape[0], *shape[2:], shape[1]), dtype=dtype, device=device).movedim(-1, 1)


def _dense(t):
    """True when t's elements fill their span exactly once (a permutation of contiguous)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def empty_output(x):
    """The output for input `x`: x's own strides when x is dense and read in place
    (so the memory format is kept), else the path's native layout."""
    in_place, channels_last = layout_of(x)
    if in_place and _dense(x):
        return torch.empty_like(x)
    return empty_for(x.shape, channels_last, x.dtype, x.device)
