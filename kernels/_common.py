"""Triton helpers shared by the forward and backward BatchNorm kernels.

Every kernel sees its input as a *plane* of tiles, in one of two layouts
(chosen on the host by :mod:`kernels._layout`):

* ``CHANNELS_LAST=False`` (NCHW, spatial dims contiguous): a program owns one
  channel ``c``; its plane is the ``(N, HW)`` matrix of that channel, element
  ``(n, hw)`` at ``c * stride_chan + n * stride_row + hw``.  Tiles are
  ``[BLOCK_ROW, BLOCK_COL]`` blocks of ``(n, hw)``; per-channel values are
  scalars.
* ``CHANNELS_LAST=True`` (NHWC, channels contiguous): a program owns a block of
  ``BLOCK_COL`` channels; its plane is the ``(N*HW, BLOCK_COL)`` matrix of
  those channels, element ``(r, c)`` at ``r * stride_row + c`` (``stride_chan``
  is 0).  Tiles are ``[BLOCK_ROW, BLOCK_COL]`` blocks of rows; per-channel
  values are ``[BLOCK_COL]`` vectors.

The helpers below hide that difference, so each kernel body is written once.
Row offsets are computed in int64: ``N*C*H*W`` may pass 2**31.
"""

import enum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
import triton
import triton.language as tl

# Values of the ACTIVATION constexpr: the activation applied to z = x_hat * w + b [+ residual].
ACT_NONE = tl.constexpr(0)  # y = z
ACT_RELU = tl.constexpr(1)  # y = max(z, 0)
ACT_SILU = tl.constexpr(2)  # y = z * sigmoid(z)


def _silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


class Activation(NamedTuple):
    """One activation: its ACTIVATION constexpr (the kernels' own code is _activate and
    _activation_grad below), the same maths in torch ops (the reference, the CPU fallback,
    the baselines' epilogue, the formulas of higher-order autograd in kernels.ops) and the
    torch module a model applies it with (which folding and zoo conversion fuse)."""

    constexpr: object
    torch: object  # (z, inplace) -> act(z)
    derivative: object  # z -> d act(z) / dz
    module: type
    grad_from_output: bool = False  # act'(z) is known from y = act(z) (ReLU: y > 0)


# A new activation: an entry here, its Epilogue members, its branch in _activate and
# _activation_grad.
ACTIVATION_TABLE = {
    "none": Activation(ACT_NONE, lambda z, inplace: z, torch.ones_like, nn.Identity),
    "relu": Activation(ACT_RELU, lambda z, inplace: torch.relu_(z) if inplace else torch.relu(z),
                       lambda z: (z > 0).to(z.dtype), nn.ReLU, grad_from_output=True),
    "silu": Activation(ACT_SILU, lambda z, inplace: F.silu(z, inplace=inplace), _silu_grad,
                       nn.SiLU),
}


class Epilogue(enum.Enum):
    """What follows the affine step z = x_hat * w + b: an optional residual add, then an
    optional activation.  One value from the public API (which builds it with
    :meth:`of`) through the custom ops (which carry ``.value``, the name users and CSVs
    see) to the kernels' ``HAS_RESIDUAL`` (``.residual``) and ``ACTIVATION``
    (``.ACTIVATION``) constexprs."""

    NONE = "none"
    RELU = "relu"
    SILU = "silu"
    RESIDUAL = "residual"
    RESIDUAL_RELU = "residual+relu"
    RESIDUAL_SILU = "residual+silu"

    def __str__(self):
        return self.value

    @property
    def residual(self):
        """True when a residual is added before the activation."""
        return self.value.startswith("residual")

    @property
    def activation(self):
        """"none", "relu" or "silu"."""
        act = self.value.split("+")[-1]
        return "none" if act == "residual" else act

    @property
    def reads_output(self):
        """The backward reads the forward's output y: after a residual, z cannot be
        recomputed from x alone, and this activation's gradient is known from y."""
        return self.residual and ACTIVATION_TABLE[self.activation].grad_from_output

    @property
    def reads_residual(self):
        """The backward reads the residual again, to recompute z = x_hat * w + b + r."""
        return (self.residual and self.activation != "none"
                and not ACTIVATION_TABLE[self.activation].grad_from_output)

    @property
    def ACTIVATION(self):
        """The value of the kernels' ACTIVATION constexpr (ACT_NONE, ACT_RELU or ACT_SILU)."""
        return ACTIVATION_TABLE[self.activation].constexpr.value

    def apply(self, y, residual=None, inplace=False):
        """The epilogue in torch ops: act(y [+ residual]); `inplace`: ``y += residual`` and
        the activation in place (as torchvision's blocks write it)."""
        if self.residual:
            y = y.add_(residual) if inplace else y + residual
        return ACTIVATION_TABLE[self.activation].torch(y, inplace)

    def derivative(self, z):
        """d act(z) / dz in torch ops, z the activation's input."""
        return ACTIVATION_TABLE[self.activation].derivative(z)

    @classmethod
    def of(cls, residual, activation=None):
        """The epilogue adding a residual (when `residual` is true) then applying
        `activation`: None or "none", "relu", "silu"; a bool is read as the older relu
        flag (True "relu", False none).  An unknown activation raises ValueError."""
        if activation is True or activation is False:
            activation = "relu" if activation else "none"
        elif activation is None:
            activation = "none"
        key = (bool(residual), activation) if isinstance(activation, str) else None
        if key not in _EPILOGUES:
            *names, last = ["None"] + [repr(a) for a in ACTIVATION_TABLE if a != "none"]
            raise ValueError(f"activation must be {', '.join(names)} or {last}, "
                             f"got {activation!r}")
        return _EPILOGUES[key]


# (residual, activation) -> Epilogue, for Epilogue.of (a dict lookup: torch.compile traces it)
_EPILOGUES = {(e.residual, e.activation): e for e in Epilogue}


@triton.jit
def _tile(tile, pid_c, n_rows, n_cols, n_col_blocks,
          CHANNELS_LAST: tl.constexpr, BLOCK_ROW: tl.constexpr, BLOCK_COL: tl.constexpr):
    """Row indices [BLOCK_ROW], column indices [BLOCK_COL] and mask of tile `tile`."""
    if CHANNELS_LAST:
        row0 = tile * BLOCK_ROW
        col0 = pid_c * BLOCK_COL
    else:
        row0 = (tile // n_col_blocks) * BLOCK_ROW
        col0 = (tile % n_col_blocks) * BLOCK_COL
    rows = row0 + tl.arange(0, BLOCK_ROW)
    cols = col0 + tl.arange(0, BLOCK_COL)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows, cols, mask


@triton.jit
def _offsets(rows, cols, pid_c, stride_row, stride_chan):
    """Element offsets [BLOCK_ROW, BLOCK_COL] of a tile in a tensor with these strides."""
    row_offs = rows.to(tl.int64)[:, None] * stride_row
    return pid_c.to(tl.int64) * stride_chan + row_offs + cols[None, :]


@triton.jit
def _channels(pid_c, cols, CHANNELS_LAST: tl.constexpr):
    """The channel index of this program: a scalar (NCHW) or the column vector (NHWC)."""
    if CHANNELS_LAST:
        return cols
    else:
        return pid_c


@triton.jit
def _per_channel(v, CHANNELS_LAST: tl.constexpr):
    """Sum a [BLOCK_ROW, BLOCK_COL] tile into its per-channel values."""
    if CHANNELS_LAST:
        return tl.sum(v, axis=0)
    else:
        return tl.sum(tl.sum(v, axis=1), axis=0)


@triton.jit
def _bcast(v, CHANNELS_LAST: tl.constexpr):
    """Broadcast a per-channel value over a tile (or a [split block, channels] block of
    partials: the same shapes)."""
    if CHANNELS_LAST:
        return v[None, :]
    else:
        return v


@triton.jit
def _split_offsets(s, ch, C, CHANNELS_LAST: tl.constexpr):
    """Offsets into a [split, C] partials buffer for split indices `s` and channels `ch`."""
    if CHANNELS_LAST:
        return s[:, None] * C + ch[None, :]
    else:
        return s * C + ch


@triton.jit
def _chan_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s merge of two (mean, M2, count) summaries; empty summaries are safe."""
    n = n_a + n_b
    frac_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * frac_b
    m2 = m2_a + m2_b + delta * delta * n_a * frac_b
    return mean, m2, n


@triton.jit
def _merge_sums(part_ptr, ch, C, split, CHANNELS_LAST: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    """Sum the `split` partials of channels `ch` in a fixed order (deterministic)."""
    mask_c = ch < C
    total = _per_channel_zero(ch, part_ptr.dtype.element_ty, CHANNELS_LAST)
    for s0 in range(0, split, BLOCK_SPLIT):
        s = s0 + tl.arange(0, BLOCK_SPLIT)
        mask = _split_mask(s < split, mask_c, CHANNELS_LAST)
        part = tl.load(part_ptr + _split_offsets(s, ch, C, CHANNELS_LAST), mask=mask, other=0.0)
        total += tl.sum(part, axis=0)
    return total


@triton.jit
def _merge_welford(count_ptr, mean_ptr, m2_ptr, ch, C, split,
                   CHANNELS_LAST: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    """Merge the `split` (count, mean, M2) partials of channels `ch`; returns (mean, M2).

    A block of partials merges in closed form, the k-way form of Chan's formula:
    n = sum n_i, mean = sum n_i mean_i / n, M2 = sum M2_i + sum n_i (mean_i - mean)^2
    (the means are of x - pivot, so small); blocks then Chan-merge in order.
    """
    mask_c = ch < C
    acc_ty = mean_ptr.dtype.element_ty
    mean = _per_channel_zero(ch, acc_ty, CHANNELS_LAST)
    m2 = _per_channel_zero(ch, acc_ty, CHANNELS_LAST)
    count = _per_channel_zero(ch, acc_ty, CHANNELS_LAST)
    for s0 in range(0, split, BLOCK_SPLIT):
        s = s0 + tl.arange(0, BLOCK_SPLIT)
        mask = _split_mask(s < split, mask_c, CHANNELS_LAST)
        offs = _split_offsets(s, ch, C, CHANNELS_LAST)
        # masked partials are empty summaries (count 0), which add nothing
        b_n = tl.load(count_ptr + offs, mask=mask, other=0.0)
        b_mean = tl.load(mean_ptr + offs, mask=mask, other=0.0)
        b_m2 = tl.load(m2_ptr + offs, mask=mask, other=0.0)
        n = tl.sum(b_n, axis=0)
        block_mean = tl.sum(b_n * b_mean, axis=0) / tl.maximum(n, 1.0)
        d = b_mean - _bcast(block_mean, CHANNELS_LAST)
        block_m2 = tl.sum(b_m2 + b_n * d * d, axis=0)
        mean, m2, count = _chan_combine(mean, m2, count, block_mean, block_m2, n)
    return mean, m2



@triton.jit
def _split_mask(mask_s, mask_c, CHANNELS_LAST: tl.constexpr):
    """Mask of a [split block, channels] load; in NCHW the program's channel is always valid."""
    if CHANNELS_LAST:
        return mask_s[:, None] & mask_c[None, :]
    else:
        return mask_s


@triton.jit
def _per_channel_zero(ch, dtype: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """A zero per-channel value: [BLOCK_COL] vector (NHWC) or scalar (NCHW)."""
    if CHANNELS_LAST:
        return tl.zeros(ch.shape, dtype)
    else:
        return tl.zeros((), dtype)


@triton.jit
def _pivot(x_ptr, pid_c, ch, C, stride_chan, dtype: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Each channel's first element (n = 0, hw = 0): statistics are taken of x - pivot.

    x - pivot is exact for data near the pivot, so sums of it keep full precision
    even when the mean is large against the spread (mean 1e4, std 1), and the
    per-program means merged later are small numbers.  A non-finite first element gives
    the pivot 0 (x - inf would make the channel's mean NaN where torch's is inf).
    """
    if CHANNELS_LAST:
        p = tl.load(x_ptr + ch, mask=ch < C, other=0.0).to(dtype)
    else:
        p = tl.load(x_ptr + pid_c.to(tl.int64) * stride_chan).to(dtype)
    return tl.where(p - p == 0.0, p, 0.0)  # p - p is NaN exactly for inf and NaN


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    """The epilogue act(z) of a tile (z in the accumulation dtype)."""
    if ACTIVATION == ACT_RELU:
        z = tl.where(z < 0.0, 0.0, z)  # keeps NaN, as torch.relu does
    elif ACTIVATION == ACT_SILU:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _activation_grad(dy, z, ACTIVATION: tl.constexpr):
    """dy * act'(z): ReLU passes dy where z > 0; SiLU's derivative is
    s * (1 + z * (1 - s)) with s = sigmoid(z)."""
    if ACTIVATION == ACT_RELU:
        dy = tl.where(z > 0.0, dy, 0.0)
    elif ACTIVATION == ACT_SILU:
        s = tl.sigmoid(z)
        dy = dy * (s * (1.0 + z * (1.0 - s)))
    return dy


@triton.jit
def _inv_std(var, eps):
    """1 / sqrt(var + eps), correctly rounded (fp32) or in fp64."""
    if var.dtype == tl.float64:
        return 1.0 / tl.sqrt(var + eps)
    else:
        return tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _load_channel(ptr, ch, C, other, dtype: tl.constexpr, HAS: tl.constexpr):
    """Per-channel parameter `ptr[ch]` cast to `dtype`, or `other` when the pointer is absent."""
    if HAS:
        return tl.load(ptr + ch, mask=ch < C, other=other).to(dtype)
    else:
        return tl.zeros_like(ch).to(dtype) + other  # same shape as a loaded value
