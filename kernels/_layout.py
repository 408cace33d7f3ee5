"""How a tensor of shape (N, C, *spatial) is laid out for the kernels, and how the work is split.

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
the chosen path are copied into it.

Work split (the heuristic)
--------------------------
Each channel's ``M = N*HW`` elements form a plane of tiles ``[BLOCK_ROW,
BLOCK_COL]``; ``split`` programs share the tiles of one channel group, giving a
grid of ``groups x split`` programs, and the partial statistics of those
programs are merged deterministically (fixed order, no atomics) by every
program of the next launch.

* Aim for ``TARGET_WAVES x SMs`` programs (4 x 132 = 528 on an H100), so that a
  shape with few channels (C=64) still fills the GPU.
* Every next-launch program re-reads the ``split`` partials of its channels, so
  that reading costs ``~3 * C * split**2`` values against ``C * M`` for x.
  ``split`` is capped at ``sqrt(M / 32)`` to keep it a few percent of x.
* In NCHW a tile is ``[rows of n, BLOCK_COL of hw]``: the widest block of 64..1024
  that pads a spatial row by at most 1/8 (3136 = 56*56 -> 512), rows filling
  the tile to TILE_ELEMS.
* In NHWC a channel group is ``BLOCK_COL`` channels; the widest of 64, 32, 16, 8
  that still reaches the target under that cap is used (8 fp32 values = one
  32-byte sector per row).
* Tiles hold TILE_ELEMS elements (half for fp64), halved down to
  MIN_TILE_ELEMS while that is needed to reach the target.
* Without CUDA (the interpreter), plans are made for an H100 (132 SMs) so the
  programs the interpreter counts are those a real launch would have.
* Fast interpreter plans (``kernels.set_interpreter_plans(fast=True)``, off by
  default): the interpreter's time goes on Python work per program and per
  tile, not on bytes, so for CPU tensors the plan then targets one SM and takes
  tiles of up to FAST_TILE_ELEMS elements (whole spatial rows up to 4096):
  (32, 16, 32, 32) runs in 16 programs of one tile instead of 512 programs, and
  a training forward + backward in about 0.5 s instead of 12 s.  The kernels'
  code is the same; only block sizes and the split change.  CUDA tensors always
  get the GPU plan.  ``bnbench train`` uses it; the tests and ``bnbench
  traffic`` keep the GPU plans, whose programs they count.

Single-launch path (training)
-----------------------------
When a channel group's whole plane fits in one tile of at most SINGLE_LAUNCH_MAX_ELEMS
(4096; 2048 for fp64) elements, forward and backward each take one launch that
reads x (and dy) once and keeps it in registers: 8 B/elem forward and 12 B/elem
backward in fp32, against 12 and 20 on the general path.  NCHW fits when
next_pow2(N) * next_pow2(H*W) <= 4096 (e.g. (2048, 7, 7) up to N = 64); NHWC
when next_pow2(N*H*W) * BLOCK_COL <= 4096 with BLOCK_COL >= 16 bytes of channels.  A
thread holds at most 8 elements of the tile (16 warps for 4096): the backward
keeps x, dy, x_hat and the gradient live, which spills at 16 per thread.  It is
taken unless it would leave the GPU partly idle (fewer than FILL_WAVES x SMs
programs) where the general path would not.
"""

import math
from dataclasses import dataclass

import torch
import triton

H100_SMS = 132
TARGET_WAVES = 4
TILE_ELEMS = 4096  # elements per tile: 16 fp32 values per thread at 8 warps
MIN_TILE_ELEMS = 1024  # tiles shrink down to this for small shapes, to make more programs
MERGE_RATIO = 32  # split <= sqrt(M / MERGE_RATIO)
MAX_BLOCK_SPLIT = 64
SINGLE_LAUNCH_MAX_ELEMS = 4096  # single-launch path: a channel group's whole plane in one tile
ELEMS_PER_THREAD = 8  # per thread and tile, at least: 16-byte vectors even for 16-bit types
FILL_WAVES = 2  # programs per SM below which a launch leaves an H100 partly idle
FAST_TILE_ELEMS = 1 << 17  # fast interpreter plans: tiles of up to 131072 elements
FAST_BLOCK_COL = 4096  # ... and NCHW column blocks of whole spatial rows up to this
_fast_interpreter_plans = False


def set_interpreter_plans(fast):
    """Plan CPU (interpreted) launches for the interpreter's speed (`fast=True`: few
    programs, large tiles) or as an H100 launch would be (`fast=False`, the default).
    Returns the previous setting.  CUDA launches are not affected."""
    global _fast_interpreter_plans
    previous, _fast_interpreter_plans = _fast_interpreter_plans, bool(fast)
    return previous


def _fast(device):
    return _fast_interpreter_plans and device.type != "cuda"


@dataclass(frozen=True)
class Plan:
    """Where a launch's programs are and what each one reads."""

    channels_last: bool
    N: int
    C: int
    HW: int
    n_rows: int  # rows of a channel group's plane: N (NCHW) or N*HW (NHWC)
    n_cols: int  # columns: HW (NCHW) or C (NHWC)
    n_col_blocks: int  # column blocks per plane (1 in NHWC)
    groups: int  # channel groups: C (NCHW) or cdiv(C, BLOCK_COL) (NHWC)
    tiles: int  # tiles per channel group
    split: int  # programs per channel group
    tiles_per_prog: int
    BLOCK_ROW: int
    BLOCK_COL: int
    BLOCK_SPLIT: int
    num_warps: int
    single_launch: bool = False  # single-launch path: one program holds its channels' whole plane

    @property
    def programs(self):
        return self.groups * self.split

    @property
    def grid(self):
        return (self.groups, self.split)

    @property
    def count(self):
        """Elements per channel (M = N*HW)."""
        return self.N * self.HW


def num_sms(device):
    """SMs the plan fills: the GPU's; an H100's for the interpreter (1 with fast plans)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1 if _fast(device) else H100_SMS


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


def _nchw_block_col(hw, fast=False):
    """Widest power-of-two block of a spatial row (64..1024) that pads it by at most 1/8;
    for small rows, the whole row (with fast interpreter plans, rows up to FAST_BLOCK_COL)."""
    if fast:
        return min(triton.next_power_of_2(max(hw, 1)), FAST_BLOCK_COL)
    for cand in (1024, 512, 256, 128, 64):
        if cand < hw and triton.cdiv(hw, cand) * cand - hw <= hw // 8:
            return cand
    return min(triton.next_power_of_2(max(hw, 1)), 1024)


def plan(x, channels_last, *, merge=True, single_launch=True):
    """Block sizes and work split for `x` on the given path (see the module docstring).

    `merge=False` is for launches that merge no partials (eval): split is then
    limited only by the number of tiles, and the single-launch path does not apply.
    `single_launch=False` never takes the single-launch path (the synchronised op,
    whose statistics cross processes between launches).
    """
    general = _general_plan(x, channels_last, merge)
    if not merge or not single_launch:
        return general
    single = _single_launch_plan(x, channels_last)
    fill = FILL_WAVES * num_sms(x.device)
    if single is not None and (single.programs >= fill or general.programs < fill):
        return single
    return general


def _num_warps(tile_elems, most):
    """Warps for a tile: ELEMS_PER_THREAD elements per thread, up to `most` warps (the
    general path's 8 warps give a 4096 tile 16 per thread; the single-launch kernels, whose
    backward keeps more arrays live, get 16)."""
    return max(1, min(most, tile_elems // (32 * ELEMS_PER_THREAD)))


def _single_launch_plan(x, channels_last):
    """The single-launch plan, or None when a channel group's plane does not fit one tile."""
    N, C = x.shape[0], x.shape[1]
    HW = math.prod(x.shape[2:])
    max_elems = SINGLE_LAUNCH_MAX_ELEMS
    if x.dtype == torch.float64:
        max_elems //= 2
    fill = FILL_WAVES * num_sms(x.device)
    if channels_last:
        rows = triton.next_power_of_2(max(N * HW, 1))
        narrowest = max(4, 16 // x.element_size())  # a row of the tile is a 16-byte vector
        fitting = [c for c in (64, 32, 16, 8, 4)
                   if rows * c <= max_elems
                   and narrowest <= c <= max(narrowest, triton.next_power_of_2(C))]
        if not fitting:
            return None
        # the widest channel block that still fills the GPU, else the narrowest
        block_col = next((c for c in fitting if triton.cdiv(C, c) >= fill), fitting[-1])
        n_rows, n_cols, block_row, groups = N * HW, C, rows, triton.cdiv(C, block_col)
    else:
        block_row = triton.next_power_of_2(max(N, 1))
        block_col = triton.next_power_of_2(max(HW, 1))
        if block_row * block_col > max_elems:
            return None
        n_rows, n_cols, groups = N, HW, C
    return Plan(
        channels_last=channels_last, N=N, C=C, HW=HW, n_rows=n_rows, n_cols=n_cols,
        n_col_blocks=1, groups=groups, tiles=1, split=1, tiles_per_prog=1,
        BLOCK_ROW=block_row, BLOCK_COL=block_col, BLOCK_SPLIT=1,
        num_warps=_num_warps(block_row * block_col, 16), single_launch=True,
    )


def _general_plan(x, channels_last, merge):
    """The general plan: `split` programs per channel group, partials merged by the next launch."""
    N, C = x.shape[0], x.shape[1]
    HW = math.prod(x.shape[2:])
    M = N * HW
    target = TARGET_WAVES * num_sms(x.device)
    max_split = max(1, math.isqrt(M // MERGE_RATIO)) if merge else M
    if channels_last:
        n_rows, n_cols, n_col_blocks = M, C, 1
        block_col = 8
        for cand in (64, 32, 16):
            if cand <= triton.next_power_of_2(C) and triton.cdiv(C, cand) * max_split >= target:
                block_col = cand
                break
        groups = triton.cdiv(C, block_col)
    else:
        n_rows, n_cols = N, HW
        block_col = _nchw_block_col(HW, _fast(x.device))
        n_col_blocks = triton.cdiv(HW, block_col)
        groups = C
    # the largest tile that still gives enough programs (small shapes get smaller tiles)
    tile_elems = FAST_TILE_ELEMS if _fast(x.device) else TILE_ELEMS
    tile_elems = tile_elems // 2 if x.dtype == torch.float64 else tile_elems
    while True:
        block_row = max(1, min(triton.next_power_of_2(max(n_rows, 1)), tile_elems // block_col))
        tiles = triton.cdiv(n_rows, block_row) * n_col_blocks
        if groups * min(tiles, max_split) >= target or tile_elems <= MIN_TILE_ELEMS:
            break
        tile_elems //= 2
    split = max(1, min(triton.cdiv(target, max(groups, 1)), max_split, tiles))
    tiles_per_prog = triton.cdiv(tiles, split)
    split = max(1, triton.cdiv(tiles, max(tiles_per_prog, 1)))  # no idle programs
    return Plan(
        channels_last=channels_last, N=N, C=C, HW=HW,
        n_rows=n_rows, n_cols=n_cols, n_col_blocks=n_col_blocks, groups=groups,
        tiles=tiles, split=split, tiles_per_prog=tiles_per_prog,
        BLOCK_ROW=block_row, BLOCK_COL=block_col,
        BLOCK_SPLIT=min(triton.next_power_of_2(split), MAX_BLOCK_SPLIT),
        num_warps=_num_warps(block_row * block_col, 8),
    )
