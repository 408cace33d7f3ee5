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

import functools
import math
from typing import NamedTuple, Optional

import torch

LAYOUT_CACHE_SIZE = 4096  # (shape, strides) pairs whose layout facts are kept


class Layout(NamedTuple):
    """What the kernels need to know of a tensor's sizes and strides (see the module
    docstring): a pure function of (shape, strides), so it is computed once per pair."""

    hw: int  # product of the spatial sizes
    s_hw: Optional[int]  # the flattened spatial stride, None when HW <= 1 or they don't flatten
    fits_nchw: bool
    fits_nhwc: bool
    in_place: bool  # read in place on the chosen path
    channels_last: bool  # the chosen path
    dense: bool  # the elements fill their span exactly once
    strides_nchw: tuple  # (stride_row, stride_chan) on each path (meaningful where it fits)
    strides_nhwc: tuple


def _spatial_of(shape, stride):
    """(HW, stride_hw): stride_hw is None when HW <= 1 or the spatial dims do not flatten."""
    hw = math.prod(shape[2:])
    dims = [(s, st) for s, st in zip(shape[2:], stride[2:]) if s != 1]
    if hw <= 1 or not dims:
        return hw, None
    for (_, outer), (inner_size, inner) in zip(dims, dims[1:]):
        if outer != inner * inner_size:
            return hw, None
    return hw, dims[-1][1]


def _fits(shape, stride, hw, s_hw, channels_last):
    N, C = shape[0], shape[1]
    s_n, s_c = stride[0], stride[1]
    if channels_last:
        if C > 1 and s_c != 1:
            return False
        if hw <= 1:
            return True
        return s_hw is not None and (N <= 1 or s_n == hw * s_hw)
    return hw <= 1 or s_hw == 1


def _is_dense(shape, stride):
    expected = 1
    for st, size in sorted((st, s) for s, st in zip(shape, stride) if s != 1):
        if st != expected:
            return False
        expected *= size
    return True


def _make_layout(shape, stride):
    hw, s_hw = _spatial_of(shape, stride)
    nchw = _fits(shape, stride, hw, s_hw, False)
    nhwc = _fits(shape, stride, hw, s_hw, True)
    if hw > 1 and nchw:
        in_place, channels_last = True, False
    elif nhwc:
        in_place, channels_last = True, True
    else:
        in_place, channels_last = False, hw <= 1
    return Layout(hw, s_hw, nchw, nhwc, in_place, channels_last, _is_dense(shape, stride),
                  (stride[0], stride[1]), ((s_hw if hw > 1 else stride[0]), 0))


_cached_layout = functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)(_make_layout)


def layout(t):
    """The Layout of tensor `t`, cached per (shape, strides); sizes that are not plain ints
    (symbolic sizes while torch.compile traces dynamic shapes) are worked out uncached."""
    shape, stride = t.shape, t.stride()
    try:
        return _cached_layout(shape, stride)
    except TypeError:  # a SymInt is unhashable
        return _make_layout(shape, stride)


def fits(t, channels_last):
    """True when `t` can be read in place on the given path."""
    facts = layout(t)
    return facts.fits_nhwc if channels_last else facts.fits_nchw


def strides(t, channels_last):
    """(stride_row, stride_chan) of a tensor that fits the path."""
    if channels_last:
        return layout(t).strides_nhwc
    stride = t.stride()
    return stride[0], stride[1]


def layout_of(x):
    """(fits in place, channels_last): the path the kernels take for `x`.

    Pure in sizes and strides, so fake (meta) tensors get the same answer.
    """
    facts = layout(x)
    return facts.in_place, facts.channels_last


def choose_layout(x):
    """(x or a contiguous copy of it, channels_last)."""
    facts = layout(x)
    return (x if facts.in_place else x.contiguous()), facts.channels_last


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


def empty_output(x):
    """The output for input `x`: x's own strides when x is dense and read in place
    (so the memory format is kept), else the path's native layout."""
    return output_maker(x)(x)


def output_maker(x):
    """A function `new(t)` that returns what ``empty_output(t)`` returns for any tensor `t`
    with x's sizes, strides, dtype and device, without looking at the layout again (the lean
    eager route keeps one per call signature)."""
    facts = layout(x)
    if facts.in_place and facts.dense:
        return torch.empty_like
    shape, channels_last, dtype, device = x.shape, facts.channels_last, x.dtype, x.device
    return lambda _: empty_for(shape, channels_last, dtype, device)
