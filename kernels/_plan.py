"""How a launch's work is split: the plan (block sizes, programs) and the policy it follows.

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
* Fast interpreter plans (``FAST_INTERPRETER_PLANS``; ``kernels.set_interpreter_plans(True)``
  makes them the default, off by default): the interpreter's time goes on Python work per
  program and per tile, not on bytes, so for CPU tensors the plan then targets one SM and
  takes tiles of up to FAST_TILE_ELEMS elements (whole spatial rows up to 4096):
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

Policy and cache
----------------
The heuristic's knobs are a frozen :class:`PlanPolicy`, passed to :func:`plan` or taken
from the current context: ``with kernels.planning(...)`` (a context variable, so it is
scoped to the thread or task that enters it and to the backward passes run from it, and
restored on exit), else the process default (``GPU_PLANS``; ``set_interpreter_plans``
switches it).  Tests switch paths this way, not by patching constants.  A plan is a pure
function of (shape, strides, dtype, device, path, merge, single_launch, policy), so it is
computed once per such key; a CUDA device's SM count is queried once per device.
"""

import contextlib
import contextvars
import dataclasses
import functools
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
PLAN_CACHE_SIZE = 4096  # plans kept (one per shape, layout, dtype, device, op kind, policy)


@dataclass(frozen=True)
class PlanPolicy:
    """How launches are planned: the heuristic's knobs (GPU_PLANS, FAST_INTERPRETER_PLANS).

    The first three apply on every device.  The others apply only to tensors off CUDA (the
    interpreter, meta tensors): `sms`, the SMs planned for (a CUDA tensor: its device's);
    `fast_interpreter`, the fast interpreter plans, whose general-path tiles hold up to
    `fast_tile_elems` and whose NCHW column blocks are whole spatial rows up to
    FAST_BLOCK_COL.  So a CUDA tensor gets the GPU plan under either preset.
    """

    tile_elems: int = TILE_ELEMS  # largest tile of the general path (half for fp64)
    min_tile_elems: int = MIN_TILE_ELEMS  # tiles halve down to this to make more programs
    single_launch_max_elems: int = SINGLE_LAUNCH_MAX_ELEMS  # 0: never the single-launch path
    sms: int = H100_SMS
    fast_interpreter: bool = False
    fast_tile_elems: int = FAST_TILE_ELEMS

    def __hash__(self):  # hashed once: a policy is part of every plan's cache key
        try:
            return self.__dict__["_hash"]
        except KeyError:
            h = hash(dataclasses.astuple(self))
            object.__setattr__(self, "_hash", h)
            return h

    def fast_for(self, device):
        """True when launches on `device` take the fast interpreter plan (never on CUDA)."""
        return self.fast_interpreter and device.type != "cuda"


GPU_PLANS = PlanPolicy()
FAST_INTERPRETER_PLANS = PlanPolicy(sms=1, fast_interpreter=True)

_default_policy = GPU_PLANS  # the process default: set_interpreter_plans
_context_policy = contextvars.ContextVar("kernels_plan_policy", default=None)  # planning


def set_interpreter_plans(fast):
    """Plan CPU (interpreted) launches for the interpreter's speed (`fast=True`: few
    programs, large tiles) or as an H100 launch would be (`fast=False`, the default):
    the process default policy, FAST_INTERPRETER_PLANS or GPU_PLANS.  Returns the previous
    setting.  CUDA launches are not affected; a `planning` context takes precedence."""
    global _default_policy
    previous = _default_policy.fast_interpreter
    _default_policy = FAST_INTERPRETER_PLANS if fast else GPU_PLANS
    return previous


def current_policy():
    """The policy `plan` uses when given none: the innermost `planning` context's, else the
    process default.  (Autograd runs a CUDA backward on a thread of its own, where the
    caller's context is not set: kernels.ops carries the forward's policy to it.)"""
    policy = _context_policy.get()
    return _default_policy if policy is None else policy


@contextlib.contextmanager
def planning(policy=None, /, **overrides):
    """Plan the launches made in this block (and in the backward passes run from it) with
    `policy` (default: the current one) with `overrides` applied, e.g.
    ``planning(single_launch_max_elems=0)`` (the general path only) or
    ``planning(FAST_INTERPRETER_PLANS)``; the previous policy is back on exit.  Yields the
    policy in force."""
    policy = dataclasses.replace(current_policy() if policy is None else policy, **overrides)
    token = _context_policy.set(policy)
    try:
        yield policy
    finally:
        _context_policy.reset(token)


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

    __hash__ = PlanPolicy.__hash__  # hashed once: a plan is part of the launches' cache keys

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


def num_sms(device, policy=None):
    """SMs the plan fills: a CUDA device's own; off CUDA, the policy's (an H100's, or 1 with
    the fast interpreter plans)."""
    if device.type == "cuda":
        return _cuda_sms(device)
    return (current_policy() if policy is None else policy).sms


@functools.cache
def _cuda_sms(device):
    """The device's SM count, queried once per device."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(x, channels_last, *, merge=True, single_launch=True, policy=None):
    """Block sizes and work split for `x` on the given path (see the module docstring).

    `merge=False` is for launches that merge no partials (eval): split is then
    limited only by the number of tiles, and the single-launch path does not apply.
    `single_launch=False` never takes the single-launch path (the synchronised op,
    whose statistics cross processes between launches).  `policy`: a PlanPolicy, by
    default the current one (`planning`).  Cached per key; sizes that are not plain ints
    (symbolic sizes while torch.compile traces dynamic shapes) are planned uncached.
    """
    key = (x.shape, x.stride(), x.dtype, x.device, channels_last, merge, single_launch,
           current_policy() if policy is None else policy)
    try:
        return _cached_plan(*key)
    except TypeError:  # a SymInt is unhashable
        return _make_plan(*key)


def _make_plan(shape, stride, dtype, device, channels_last, merge, single_launch, policy):
    """The plan for one key of `plan`.  `stride` is part of the key (the plan is for x as
    the kernels read it), though no rule of the heuristic depends on it today."""
    general = _general_plan(shape, dtype, device, channels_last, merge, policy)
    if not merge or not single_launch:
        return general
    single = _single_launch_plan(shape, dtype, device, channels_last, policy)
    fill = FILL_WAVES * num_sms(device, policy)
    if single is not None and (single.programs >= fill or general.programs < fill):
        return single
    return general


_cached_plan = functools.lru_cache(maxsize=PLAN_CACHE_SIZE)(_make_plan)


def _nchw_block_col(hw, fast=False):
    """Widest power-of-two block of a spatial row (64..1024) that pads it by at most 1/8;
    for small rows, the whole row (with fast interpreter plans, rows up to FAST_BLOCK_COL)."""
    if fast:
        return min(triton.next_power_of_2(max(hw, 1)), FAST_BLOCK_COL)
    for cand in (1024, 512, 256, 128, 64):
        if cand < hw and triton.cdiv(hw, cand) * cand - hw <= hw // 8:
            return cand
    return min(triton.next_power_of_2(max(hw, 1)), 1024)


def _num_warps(tile_elems, most):
    """Warps for a tile: ELEMS_PER_THREAD elements per thread, up to `most` warps (the
    general path's 8 warps give a 4096 tile 16 per thread; the single-launch kernels, whose
    backward keeps more arrays live, get 16)."""
    return max(1, min(most, tile_elems // (32 * ELEMS_PER_THREAD)))


def _single_launch_plan(shape, dtype, device, channels_last, policy):
    """The single-launch plan, or None when a channel group's plane does not fit one tile."""
    N, C = shape[0], shape[1]
    HW = math.prod(shape[2:])
    max_elems = policy.single_launch_max_elems
    if dtype == torch.float64:
        max_elems //= 2
    fill = FILL_WAVES * num_sms(device, policy)
    if channels_last:
        rows = triton.next_power_of_2(max(N * HW, 1))
        narrowest = max(4, 16 // dtype.itemsize)  # a row of the tile is a 16-byte vector
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


def _general_plan(shape, dtype, device, channels_last, merge, policy):
    """The general plan: `split` programs per channel group, partials merged by the next launch."""
    N, C = shape[0], shape[1]
    HW = math.prod(shape[2:])
    M = N * HW
    fast = policy.fast_for(device)
    target = TARGET_WAVES * num_sms(device, policy)
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
        block_col = _nchw_block_col(HW, fast)
        n_col_blocks = triton.cdiv(HW, block_col)
        groups = C
    # the largest tile that still gives enough programs (small shapes get smaller tiles)
    tile_elems = policy.fast_tile_elems if fast else policy.tile_elems
    tile_elems = tile_elems // 2 if dtype == torch.float64 else tile_elems
    while True:
        block_row = max(1, min(triton.next_power_of_2(max(n_rows, 1)), tile_elems // block_col))
        tiles = triton.cdiv(n_rows, block_row) * n_col_blocks
        if groups * min(tiles, max_split) >= target or tile_elems <= policy.min_tile_elems:
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
