r"""BatchNorm forward kernels: batch statistics (two ways) and the per-channel affine map.

Maths, per channel c over its M = N*H*W elements x_i:

    mean  = (1/M) sum_i x_i
    var   = (1/M) sum_i (x_i - mean)^2                    (biased, used to normalise)
    rstd  = 1 / sqrt(var + eps)
    y_i   = act((x_i - mean) * rstd * w + b [+ residual_i])     act = identity, ReLU or SiLU
                                         (SiLU: z * sigmoid(z), computed in fp32/fp64)
    running_mean <- (1 - momentum) * running_mean + momentum * mean
    running_var  <- (1 - momentum) * running_var  + momentum * var * M / (M - 1)

Statistics, two ways (both accumulate in fp32, fp64 for fp64 input, and both work
on x - pivot, the pivot being each channel's first element, so that a large mean
costs no precision; every program of a channel uses the same pivot, so partials
merge as they are):

* ``two_pass``: read x for the per-split sums, merge them to the mean, read x
  again for the per-split centred sums of squares sum (x - mean)^2, merge, then
  normalise: 3 launches, x read 3 times, y written once.
* ``single_pass``: one read of x gives each program's (count, mean, M2), each
  tile's summary computed exactly in registers and Chan-merged into the
  program's; the normalising launch merges those partials and writes y:
  2 launches, x read twice, y written once.  Never sum(x^2) - sum(x)^2 / M,
  which cancels catastrophically (mean 1e4, std 1 gives negative variances).

Single-launch path: when a channel group's whole plane fits in one tile
(kernels._plan), one launch reads x once into registers, computes the
statistics there (single_pass: exact summaries of row blocks merged with Chan's formula
in its k-way form;
two_pass: mean, then centred sum of squares) and writes y.

Eval (or frozen statistics): one launch, x read once, y written once, with
mean and var taken from the running statistics.

Partial statistics live in ``[split, C]`` buffers; every program of the next
launch merges the ``split`` partials of its channels in a fixed order, so the
result is deterministic and no atomics are used.  Programs of split 0 write the
saved statistics and update the running ones (once per call).

Dtypes: x float16/bfloat16/float32/float64; weight, bias and running stats of
x's dtype or float32.  y has x's dtype.  Saved mean and rstd are float32
(float64 for float64 x).
"""

import functools
import struct

import torch
import triton
import triton.language as tl

from ._common import (
    Epilogue, _activate, _bcast, _chan_combine, _channels, _inv_std, _load_channel, _merge_sums,
    _merge_welford, _offsets, _per_channel, _per_channel_zero, _pivot, _tile,
)
from ._layout import choose_layout, empty_output, fits, layout_of, output_maker, strides, to_layout
from ._plan import plan
from ._tuning import autotune_enabled, launcher

# Values of the stats kernel's STATS constexpr: the partials one read of x makes.  Kernel
# bodies compare with these names; host code passes their .value.
STATS_SUM = tl.constexpr(0)  # per-split sum of x (two-pass, first read)
STATS_CENTRED = tl.constexpr(1)  # per-split sum of (x - mean)^2 (two-pass, second read)
STATS_WELFORD = tl.constexpr(2)  # per-split (count, mean, M2) (single-pass)
# Values of the apply kernel's SOURCE constexpr: where its mean and var come from.
FROM_RUNNING = tl.constexpr(0)  # the running statistics (eval)
FROM_TWO_PASS = tl.constexpr(1)  # merged two-pass partials
FROM_WELFORD = tl.constexpr(2)  # merged single-pass partials

_F32 = struct.Struct("f")


def _float32(value):
    return _F32.unpack(_F32.pack(value))[0]


def momentum_hi(momentum, dtype):
    """The momentum argument: for float64, its float32 value (what a compiled kernel gets,
    and the interpreter then too), beside :func:`momentum_lo`; else the momentum."""
    return _float32(float(momentum)) if dtype == torch.float64 else float(momentum)


def momentum_lo(momentum, dtype, cumulative=False):
    """The MOMENTUM_LO constexpr: for float64, the momentum's part below its float32 value (a
    float argument reaches a compiled kernel as float32, 1.5e-8 off at 0.1: beyond float64
    running stats' tolerance), which the kernel adds back in float64; 0.0 for every other
    dtype and for cumulative averaging (momentum unused; one compiled variant, the running
    update unchanged)."""
    if dtype != torch.float64 or cumulative:
        return 0.0
    return float(momentum) - _float32(float(momentum))


STATS_MODES = ("two_pass", "single_pass")
# updated in place, so restored between autotune trials
RUNNING_STATS = ("run_mean_ptr", "run_var_ptr")
STATIC_CACHE_SIZE = 4096  # launches whose size and constexpr arguments are kept


def acc_dtype(dtype):
    """Accumulation and saved-statistics dtype for an input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _bn_fwd_stats_kernel(
    x_ptr,  # input, (N, C, HW) read through (stride_x_row, stride_x_chan), see _common
    count_ptr,  # [split, C] out (WELFORD): elements each program saw per channel
    part_a_ptr,  # [split, C] out: shifted sums (SUM) or shifted means (WELFORD); in: (CENTRED)
    part_b_ptr,  # [split, C] out: centred sums of squares (CENTRED) or M2 (WELFORD)
    C, n_rows, n_cols, n_col_blocks,  # plane geometry (see kernels._plan.Plan)
    tiles, tiles_per_prog, split,  # tiles per channel group, per program; programs per group
    count,  # M = N*HW, elements per channel (CENTRED: divides the merged sums)
    stride_x_row, stride_x_chan,  # x: stride between rows; between channels (0 in NHWC)
    STATS: tl.constexpr,  # STATS_SUM, STATS_CENTRED or STATS_WELFORD
    ACC: tl.constexpr,  # accumulation dtype
    CHANNELS_LAST: tl.constexpr,
    BLOCK_ROW: tl.constexpr,
    BLOCK_COL: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    ch = _channels(pid_c, pid_c * BLOCK_COL + tl.arange(0, BLOCK_COL), CHANNELS_LAST)
    out = pid_s * C + ch
    t_start = pid_s * tiles_per_prog
    t_end = tl.minimum(t_start + tiles_per_prog, tiles)
    # statistics of x - pivot: exact for data with a large mean (see _pivot)
    pivot = _bcast(_pivot(x_ptr, pid_c, ch, C, stride_x_chan, ACC, CHANNELS_LAST), CHANNELS_LAST)

    if STATS == STATS_WELFORD:
        # single pass: exact (count, mean, M2) of each tile, Chan-merged into the program's
        mean = _per_channel_zero(ch, ACC, CHANNELS_LAST)
        m2 = _per_channel_zero(ch, ACC, CHANNELS_LAST)
        n = _per_channel_zero(ch, ACC, CHANNELS_LAST)
        for t in range(t_start, t_end):
            rows, cols, mask = _tile(t, pid_c, n_rows, n_cols, n_col_blocks,
                                     CHANNELS_LAST, BLOCK_ROW, BLOCK_COL)
            x = tl.load(x_ptr + _offsets(rows, cols, pid_c, stride_x_row, stride_x_chan),
                        mask=mask, other=0.0).to(ACC)
            xs = tl.where(mask, x - pivot, 0.0)
            tile_n = _per_channel(mask.to(ACC), CHANNELS_LAST)
            tile_mean = _per_channel(xs, CHANNELS_LAST) / tl.maximum(tile_n, 1.0)
            d = tl.where(mask, xs - _bcast(tile_mean, CHANNELS_LAST), 0.0)
            tile_m2 = _per_channel(d * d, CHANNELS_LAST)
            mean, m2, n = _chan_combine(mean, m2, n, tile_mean, tile_m2, tile_n)
        tl.store(count_ptr + out, n, mask=ch < C)
        tl.store(part_a_ptr + out, mean, mask=ch < C)
        tl.store(part_b_ptr + out, m2, mask=ch < C)
    else:
        if STATS == STATS_CENTRED:
            # two pass, second read: centre on the mean merged from the first read's sums
            mean = _bcast(_merge_sums(part_a_ptr, ch, C, split, CHANNELS_LAST, BLOCK_SPLIT)
                          / count, CHANNELS_LAST)
        acc = tl.zeros([BLOCK_ROW, BLOCK_COL], ACC)
        for t in range(t_start, t_end):
            rows, cols, mask = _tile(t, pid_c, n_rows, n_cols, n_col_blocks,
                                     CHANNELS_LAST, BLOCK_ROW, BLOCK_COL)
            x = tl.load(x_ptr + _offsets(rows, cols, pid_c, stride_x_row, stride_x_chan),
                        mask=mask, other=0.0).to(ACC)
            if STATS == STATS_SUM:
                acc += tl.where(mask, x - pivot, 0.0)
            else:
                d = tl.where(mask, x - pivot - mean, 0.0)
                acc += d * d
        if STATS == STATS_SUM:
            tl.store(part_a_ptr + out, _per_channel(acc, CHANNELS_LAST), mask=ch < C)
        else:
            tl.store(part_b_ptr + out, _per_channel(acc, CHANNELS_LAST), mask=ch < C)


@triton.jit
def _bn_fwd_apply_kernel(
    x_ptr,  # input (N, C, HW), strides (stride_x_row, stride_x_chan)
    y_ptr,  # output, same shape, strides (stride_y_row, stride_y_chan)
    res_ptr,  # residual added before the activation (HAS_RESIDUAL), same shape
    w_ptr, b_ptr,  # [C] weight and bias (HAS_WEIGHT / HAS_BIAS), any float dtype
    count_ptr, part_a_ptr, part_b_ptr,  # [split, C] partials of the stats kernel
    run_mean_ptr, run_var_ptr,  # [C] running stats: read (FROM_RUNNING) or updated (UPDATE_RUNNING)
    nbt_ptr,  # [] num_batches_tracked, already counting this batch (CUMULATIVE)
    save_mean_ptr, save_rstd_ptr,  # [C] out (training): batch mean and 1/sqrt(var + eps), ACC dtype
    C, n_rows, n_cols, n_col_blocks,  # plane geometry
    tiles, tiles_per_prog, split,  # tiles per channel group, per program; programs per group
    count, momentum, eps,  # M = N*HW; running-stats momentum (float32: its hi half); eps
    stride_x_row, stride_x_chan, stride_y_row, stride_y_chan, stride_r_row, stride_r_chan,
    SOURCE: tl.constexpr,  # FROM_RUNNING, FROM_TWO_PASS or FROM_WELFORD
    UPDATE_RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr,  # momentum = 1 / num_batches_tracked (momentum=None)
    MOMENTUM_LO: tl.constexpr,  # the momentum's low float32 half (float64 ACC), else 0.0
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,  # ACT_NONE, ACT_RELU or ACT_SILU (kernels._common)
    ACC: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_ROW: tl.constexpr,
    BLOCK_COL: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    ch = _channels(pid_c, pid_c * BLOCK_COL + tl.arange(0, BLOCK_COL), CHANNELS_LAST)

    # per-channel mean (as pivot + shifted mean) and variance: running stats, or the
    # merged batch partials (which the stats kernel took around the same pivot)
    if SOURCE == FROM_RUNNING:
        pivot = _load_channel(run_mean_ptr, ch, C, 0.0, ACC, True)
        mean_s = tl.zeros_like(pivot)
        var = _load_channel(run_var_ptr, ch, C, 1.0, ACC, True)
    else:
        pivot = _pivot(x_ptr, pid_c, ch, C, stride_x_chan, ACC, CHANNELS_LAST)
        if SOURCE == FROM_TWO_PASS:
            mean_s = _merge_sums(part_a_ptr, ch, C, split, CHANNELS_LAST, BLOCK_SPLIT) / count
            var = _merge_sums(part_b_ptr, ch, C, split, CHANNELS_LAST, BLOCK_SPLIT) / count
        else:
            mean_s, m2 = _merge_welford(count_ptr, part_a_ptr, part_b_ptr, ch, C, split,
                                        CHANNELS_LAST, BLOCK_SPLIT)
            var = m2 / count
    rstd = _inv_std(var, eps)

    # one program per channel group records the batch statistics
    if SOURCE != FROM_RUNNING:
        if pid_s == 0:
            _record_stats(save_mean_ptr, save_rstd_ptr, run_mean_ptr, run_var_ptr, nbt_ptr, ch, C,
                          pivot + mean_s, var, rstd, count, momentum, MOMENTUM_LO,
                          UPDATE_RUNNING, CUMULATIVE, ACC)

    # y = ((x - pivot) - shifted mean) * (w * rstd) + b [+ residual], then the activation
    w = _load_channel(w_ptr, ch, C, 1.0, ACC, HAS_WEIGHT)
    b = _bcast(_load_channel(b_ptr, ch, C, 0.0, ACC, HAS_BIAS), CHANNELS_LAST)
    scale = _bcast(w * rstd, CHANNELS_LAST)
    pivot = _bcast(pivot, CHANNELS_LAST)
    mean_s = _bcast(mean_s, CHANNELS_LAST)
    t_start = pid_s * tiles_per_prog
    t_end = tl.minimum(t_start + tiles_per_prog, tiles)
    for t in range(t_start, t_end):
        rows, cols, mask = _tile(t, pid_c, n_rows, n_cols, n_col_blocks,
                                 CHANNELS_LAST, BLOCK_ROW, BLOCK_COL)
        x = tl.load(x_ptr + _offsets(rows, cols, pid_c, stride_x_row, stride_x_chan),
                    mask=mask, other=0.0).to(ACC)
        y = _normalize(x - pivot - mean_s, scale, b, res_ptr,
                       _offsets(rows, cols, pid_c, stride_r_row, stride_r_chan), mask,
                       HAS_RESIDUAL, ACTIVATION, ACC)
        tl.store(y_ptr + _offsets(rows, cols, pid_c, stride_y_row, stride_y_chan),
                 y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_fwd_single_launch_kernel(
    x_ptr, y_ptr, res_ptr, w_ptr, b_ptr,  # as in _bn_fwd_apply_kernel
    run_mean_ptr, run_var_ptr, nbt_ptr, save_mean_ptr, save_rstd_ptr,  # as in _bn_fwd_apply_kernel
    C, n_rows, n_cols,  # plane geometry: the whole plane is one [BLOCK_ROW, BLOCK_COL] tile
    count, momentum, eps,
    stride_x_row, stride_x_chan, stride_y_row, stride_y_chan, stride_r_row, stride_r_chan,
    WELFORD: tl.constexpr,  # single_pass: Welford/Chan merges; else two passes over registers
    UPDATE_RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr,
    MOMENTUM_LO: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ACC: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_ROW: tl.constexpr,
    BLOCK_COL: tl.constexpr,
):
    """Training forward in one launch: the program's channels fit one tile, read once."""
    pid_c = tl.program_id(0)
    ch = _channels(pid_c, pid_c * BLOCK_COL + tl.arange(0, BLOCK_COL), CHANNELS_LAST)
    rows, cols, mask = _tile(0, pid_c, n_rows, n_cols, 1, CHANNELS_LAST, BLOCK_ROW, BLOCK_COL)
    x = tl.load(x_ptr + _offsets(rows, cols, pid_c, stride_x_row, stride_x_chan),
                mask=mask, other=0.0).to(ACC)
    pivot = _pivot(x_ptr, pid_c, ch, C, stride_x_chan, ACC, CHANNELS_LAST)
    xs = tl.where(mask, x - _bcast(pivot, CHANNELS_LAST), 0.0)

    # statistics from registers: exact block summaries Chan-merged (single_pass), or the
    # mean then the centred sum of squares (two_pass)
    if WELFORD:
        mean_s, m2 = _blocks_chan_merged(xs, mask, ACC, CHANNELS_LAST, BLOCK_ROW, BLOCK_COL)
    else:
        mean_s = _per_channel(xs, CHANNELS_LAST) / count
        d = tl.where(mask, xs - _bcast(mean_s, CHANNELS_LAST), 0.0)
        m2 = _per_channel(d * d, CHANNELS_LAST)
    var = m2 / count
    rstd = _inv_std(var, eps)
    _record_stats(save_mean_ptr, save_rstd_ptr, run_mean_ptr, run_var_ptr, nbt_ptr, ch, C,
                  pivot + mean_s, var, rstd, count, momentum, MOMENTUM_LO, UPDATE_RUNNING,
                  CUMULATIVE, ACC)

    w = _load_channel(w_ptr, ch, C, 1.0, ACC, HAS_WEIGHT)
    b = _bcast(_load_channel(b_ptr, ch, C, 0.0, ACC, HAS_BIAS), CHANNELS_LAST)
    y = _normalize(xs - _bcast(mean_s, CHANNELS_LAST), _bcast(w * rstd, CHANNELS_LAST), b,
                   res_ptr, _offsets(rows, cols, pid_c, stride_r_row, stride_r_chan), mask,
                   HAS_RESIDUAL, ACTIVATION, ACC)
    tl.store(y_ptr + _offsets(rows, cols, pid_c, stride_y_row, stride_y_chan),
             y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _blocks_chan_merged(xs, mask, ACC: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                        BLOCK_ROW: tl.constexpr, BLOCK_COL: tl.constexpr):
    """Per-channel (mean, M2) of a tile: exact (count, mean, M2) of row blocks, merged with
    the k-way form of Chan's formula (see _merge_welford).

    NCHW: each row (one n) is a block; NHWC: the rows fall into NB blocks per channel.
    """
    if CHANNELS_LAST:
        NB: tl.constexpr = 16 if BLOCK_ROW > 16 else BLOCK_ROW
        xb = tl.reshape(xs, (NB, BLOCK_ROW // NB, BLOCK_COL))
        mb = tl.reshape(mask.to(ACC), (NB, BLOCK_ROW // NB, BLOCK_COL))
        n = tl.sum(mb, 1)
        mean = tl.sum(xb, 1) / tl.maximum(n, 1.0)
        d = tl.where(mb > 0, xb - mean[:, None, :], 0.0)
        m2 = tl.sum(d * d, 1)
        total = tl.sum(n, 0)
        merged_mean = tl.sum(n * mean, 0) / tl.maximum(total, 1.0)
        dm = mean - merged_mean[None, :]
    else:
        mb = mask.to(ACC)
        n = tl.sum(mb, 1)
        mean = tl.sum(xs, 1) / tl.maximum(n, 1.0)
        d = tl.where(mask, xs - mean[:, None], 0.0)
        m2 = tl.sum(d * d, 1)
        total = tl.sum(n, 0)
        merged_mean = tl.sum(n * mean, 0) / tl.maximum(total, 1.0)
        dm = mean - merged_mean
    return merged_mean, tl.sum(m2 + n * dm * dm, 0)


@triton.jit
def _record_stats(save_mean_ptr, save_rstd_ptr, run_mean_ptr, run_var_ptr, nbt_ptr, ch, C,
                  mean, var, rstd, count, momentum, MOMENTUM_LO: tl.constexpr,
                  UPDATE_RUNNING: tl.constexpr,
                  CUMULATIVE: tl.constexpr, ACC: tl.constexpr):
    """Save mean and rstd for backward; update the running stats (unbiased variance).
    A float argument reaches a compiled kernel as float32, so the count's ratio is taken and
    the momentum's low part (:func:`momentum_lo`) added back in ACC: float64 running
    stats as torch's (other dtypes unchanged: MOMENTUM_LO is 0.0)."""
    mask_c = ch < C
    tl.store(save_mean_ptr + ch, mean, mask=mask_c)
    tl.store(save_rstd_ptr + ch, rstd, mask=mask_c)
    if UPDATE_RUNNING:
        run_mean = tl.load(run_mean_ptr + ch, mask=mask_c, other=0.0).to(ACC)
        run_var = tl.load(run_var_ptr + ch, mask=mask_c, other=0.0).to(ACC)
        n = count + tl.zeros_like(var)
        unbiased = var * (n / (n - 1.0))
        if CUMULATIVE:
            m = 1.0 / tl.load(nbt_ptr).to(ACC)
        else:
            m = momentum + tl.zeros_like(run_mean)
            if MOMENTUM_LO != 0.0:
                m = m + MOMENTUM_LO
        tl.store(run_mean_ptr + ch, run_mean + m * (mean - run_mean), mask=mask_c)
        tl.store(run_var_ptr + ch, run_var + m * (unbiased - run_var), mask=mask_c)


@triton.jit
def _normalize(x_centred, scale, b, res_ptr, offs_r, mask, HAS_RESIDUAL: tl.constexpr,
               ACTIVATION: tl.constexpr, ACC: tl.constexpr):
    """act(x_centred * scale + b [+ residual]) for one tile."""
    y = x_centred * scale + b
    if HAS_RESIDUAL:
        y += tl.load(res_ptr + offs_r, mask=mask, other=0.0).to(ACC)
    return _activate(y, ACTIVATION)


def _launch_apply(x, y, residual, weight, bias, parts, running_mean, running_var, saved,
                  p, momentum, eps, source, update_running, epilogue, channels_last,
                  num_batches_tracked=None):
    """Launch the normalising kernel over plan `p` (x, y, residual already fit the layout);
    `source` is the SOURCE constexpr's value (FROM_RUNNING, FROM_TWO_PASS or FROM_WELFORD),
    `epilogue` an Epilogue checked against `residual` by the caller."""
    count_buf, part_a, part_b = parts
    save_mean, save_rstd = saved
    res_strides = strides(residual, channels_last) if residual is not None else (0, 0)
    sizes, layout, flags = _apply_static(
        p, strides(x, channels_last), strides(y, channels_last), res_strides, source,
        update_running, num_batches_tracked is not None, weight is not None, bias is not None,
        epilogue, x.dtype, channels_last)
    kernel, opts = launcher(_bn_fwd_apply_kernel, p.num_warps,
                            RUNNING_STATS if update_running else ())
    kernel[p.grid](
        x, y, residual, weight, bias, count_buf, part_a, part_b,
        running_mean, running_var, num_batches_tracked, save_mean, save_rstd,
        *sizes, momentum_hi(momentum, x.dtype), float(eps), *layout, **flags, **opts,
        MOMENTUM_LO=momentum_lo(momentum, x.dtype, num_batches_tracked is not None),
    )


@functools.lru_cache(maxsize=STATIC_CACHE_SIZE)
def _apply_static(p, x_strides, y_strides, res_strides, source, update_running, cumulative,
                  has_weight, has_bias, epilogue, dtype, channels_last):
    """The normalising launch's arguments that follow from its plan and flags: (sizes
    before momentum and eps, strides after them, constexprs), computed once per key."""
    sizes = (p.C, p.n_rows, p.n_cols, p.n_col_blocks, p.tiles, p.tiles_per_prog, p.split,
             float(p.count))
    flags = dict(
        SOURCE=source, UPDATE_RUNNING=update_running, CUMULATIVE=cumulative,
        HAS_WEIGHT=has_weight, HAS_BIAS=has_bias,
        HAS_RESIDUAL=epilogue.residual, ACTIVATION=epilogue.ACTIVATION,
        ACC=tl_acc(dtype), CHANNELS_LAST=channels_last, BLOCK_ROW=p.BLOCK_ROW,
        BLOCK_COL=p.BLOCK_COL, BLOCK_SPLIT=p.BLOCK_SPLIT,
    )
    return sizes, (*x_strides, *y_strides, *res_strides), flags


def check_epilogue(epilogue, residual, where):
    """Raise unless `epilogue` is an Epilogue whose residual agrees with `residual` (the
    residual tensor or None): early, before any launch."""
    if not isinstance(epilogue, Epilogue):
        raise TypeError(f"{where}: epilogue must be a kernels.Epilogue, got {epilogue!r}")
    if epilogue.residual != (residual is not None):
        raise ValueError(
            f"{where}: the epilogue {epilogue.value!r} "
            + ("adds a residual, but no residual tensor was given" if epilogue.residual
               else "adds no residual, but a residual tensor was given"))


def launch_stats(x, channels_last, p, pass_, count_buf, part_a, part_b, count=None):
    """One launch of the statistics kernel on plan `p` (a general plan): per-program partials
    of x - pivot into the [split, C] buffers (see _bn_fwd_stats_kernel).  `count` divides the
    merged sums of part_a in the STATS_CENTRED pass (default: the plan's M); `pass_` is the
    STATS constexpr's value."""
    kernel, opts = launcher(_bn_fwd_stats_kernel, p.num_warps)
    kernel[p.grid](
        x, count_buf, part_a, part_b,
        x.shape[1], p.n_rows, p.n_cols, p.n_col_blocks, p.tiles, p.tiles_per_prog, p.split,
        float(p.count if count is None else count), *strides(x, channels_last),
        STATS=pass_, ACC=tl_acc(x.dtype), CHANNELS_LAST=channels_last,
        BLOCK_ROW=p.BLOCK_ROW, BLOCK_COL=p.BLOCK_COL, BLOCK_SPLIT=p.BLOCK_SPLIT, **opts,
    )


def bn_forward_train(x, weight, bias, running_mean, running_var, momentum, eps,
                     stats="single_pass", residual=None, epilogue=Epilogue.NONE,
                     num_batches_tracked=None):
    """BatchNorm forward with batch statistics.

    Args:
        x: (N, C, *) float tensor, N*HW > 1 (checked by the caller); NCHW and
            channels-last layouts are read in place.
        weight, bias: (C,) tensors or None.
        running_mean, running_var: (C,) tensors updated in place, or None.
        momentum: running-stats factor.
        eps: added to the variance.
        stats: "single_pass" (Welford/Chan, x read twice) or "two_pass" (x read 3 times);
            on the single-launch path (kernels._plan), both read x once.
        residual: tensor of x's shape added before the activation; given exactly when
            the epilogue has a residual.
        epilogue: the Epilogue applied after the affine step: the residual add (when
            ``epilogue.residual``), then ``epilogue.activation`` ("none", "relu" or
            "silu", z * sigmoid(z)).
        num_batches_tracked: for momentum=None, the batch counter (already
            incremented): the running stats become cumulative averages,
            momentum = 1 / num_batches_tracked, read on the device.

    Returns:
        (y, save_mean, save_rstd): y like x; mean and 1/sqrt(var+eps) as (C,)
        float32 (float64 for float64 x).
    """
    check_epilogue(epilogue, residual, "bn_forward_train")
    y = empty_output(x)
    C = x.shape[1]
    acc = acc_dtype(x.dtype)
    save_mean = torch.empty(C, dtype=acc, device=x.device)
    save_rstd = torch.empty(C, dtype=acc, device=x.device)
    if x.numel() == 0:
        return y, save_mean.fill_(float("nan")), save_rstd.fill_(float("nan"))
    x, channels_last = choose_layout(x)
    residual = to_layout(residual, channels_last) if residual is not None else None
    p = plan(x, channels_last)
    res_strides = strides(residual, channels_last) if residual is not None else (0, 0)
    if p.single_launch:  # the single-launch path: x read once
        sizes, layout, flags = _single_launch_static(
            p, strides(x, channels_last), strides(y, channels_last), res_strides, stats,
            running_mean is not None, num_batches_tracked is not None, weight is not None,
            bias is not None, epilogue, x.dtype, channels_last)
        kernel, opts = launcher(_bn_fwd_single_launch_kernel, p.num_warps,
                                RUNNING_STATS if running_mean is not None else ())
        kernel[p.grid](
            x, y, residual, weight, bias, running_mean, running_var, num_batches_tracked,
            save_mean, save_rstd, *sizes, momentum_hi(momentum, x.dtype), float(eps), *layout,
            MOMENTUM_LO=momentum_lo(momentum, x.dtype, num_batches_tracked is not None),
            **flags, **opts,
        )
        return y, save_mean, save_rstd
    part_shape = (p.split, C)
    part_a = torch.empty(part_shape, dtype=acc, device=x.device)
    part_b = torch.empty(part_shape, dtype=acc, device=x.device)
    welford = stats == "single_pass"
    count_buf = torch.empty(part_shape, dtype=acc, device=x.device) if welford else None
    stats_passes = (STATS_WELFORD.value,) if welford else (STATS_SUM.value, STATS_CENTRED.value)
    for pass_ in stats_passes:
        launch_stats(x, channels_last, p, pass_, count_buf, part_a, part_b)
    _launch_apply(
        x, y, residual, weight, bias, (count_buf, part_a, part_b),
        running_mean, running_var, (save_mean, save_rstd), p, momentum, eps,
        (FROM_WELFORD if stats == "single_pass" else FROM_TWO_PASS).value,
        running_mean is not None, epilogue, channels_last, num_batches_tracked,
    )
    return y, save_mean, save_rstd


@functools.lru_cache(maxsize=STATIC_CACHE_SIZE)
def _single_launch_static(p, x_strides, y_strides, res_strides, stats, update_running,
                          cumulative, has_weight, has_bias, epilogue, dtype, channels_last):
    """The single-launch forward's arguments that follow from its plan and flags (as
    :func:`_apply_static`)."""
    sizes = (p.C, p.n_rows, p.n_cols, float(p.count))
    flags = dict(
        WELFORD=stats == "single_pass", UPDATE_RUNNING=update_running, CUMULATIVE=cumulative,
        HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, HAS_RESIDUAL=epilogue.residual,
        ACTIVATION=epilogue.ACTIVATION, ACC=tl_acc(dtype), CHANNELS_LAST=channels_last,
        BLOCK_ROW=p.BLOCK_ROW, BLOCK_COL=p.BLOCK_COL,
    )
    return sizes, (*x_strides, *y_strides, *res_strides), flags


def bn_forward_eval(x, weight, bias, running_mean, running_var, eps, residual=None,
                    epilogue=Epilogue.NONE):
    """BatchNorm forward with fixed statistics: y = act((x - mean) * w / sqrt(var + eps) + b [+ r]).

    One launch: x read once, y written once.  Args as :func:`bn_forward_train`;
    running_mean and running_var are read, not updated.
    """
    check_epilogue(epilogue, residual, "bn_forward_eval")
    y = empty_output(x)
    if x.numel() == 0:
        return y
    x, channels_last = choose_layout(x)
    residual = to_layout(residual, channels_last) if residual is not None else None
    p = plan(x, channels_last, merge=False)
    _launch_apply(
        x, y, residual, weight, bias, (None, None, None),
        running_mean, running_var, (None, None), p, 0.0, eps, FROM_RUNNING.value, False,
        epilogue, channels_last,
    )
    return y


# ---------------------------------------------------------------------------------------------
# recipes: the host work of bn_forward_eval / bn_forward_train done once per call signature

def _recipe_layout(x, residual):
    """channels_last when x and the residual are read in place and x is not empty (the calls
    a recipe serves), else None.  Autotuning (which chooses per launch) takes no recipe."""
    if x.numel() == 0 or autotune_enabled():
        return None
    in_place, channels_last = layout_of(x)
    if not in_place or (residual is not None and not fits(residual, channels_last)):
        return None
    return channels_last


def eval_recipe(x, weight, bias, eps, residual=None, epilogue=Epilogue.NONE):
    """What :func:`bn_forward_eval` does for every call whose tensors have these tensors'
    sizes, strides, dtypes and devices (and this eps and epilogue), as a function
    ``run(x, weight, bias, running_mean, running_var, residual) -> y``: the plan, strides and
    launch arguments worked out here, once.  None where such a call is empty or copies an
    operand to the path's layout (bn_forward_eval then does the work per call)."""
    check_epilogue(epilogue, residual, "bn_forward_eval")
    channels_last = _recipe_layout(x, residual)
    if channels_last is None:
        return None
    new_output = output_maker(x)
    p = plan(x, channels_last, merge=False)
    sizes, strides_, flags = _apply_static(
        p, strides(x, channels_last), strides(new_output(x), channels_last),
        strides(residual, channels_last) if residual is not None else (0, 0),
        FROM_RUNNING.value, False, False, weight is not None, bias is not None, epilogue,
        x.dtype, channels_last)
    kernel, opts = launcher(_bn_fwd_apply_kernel, p.num_warps)
    grid, tail, kwargs = (p.grid, (*sizes, 0.0, float(eps), *strides_),
                         {**flags, **opts, "MOMENTUM_LO": 0.0})

    def run(x, weight, bias, running_mean, running_var, residual):
        y = new_output(x)
        kernel[grid](x, y, residual, weight, bias, None, None, None, running_mean, running_var,
                     None, None, None, *tail, **kwargs)
        return y
    return run


def train_recipe(x, weight, bias, running_mean, eps, stats, residual=None,
                 epilogue=Epilogue.NONE, cumulative=False):
    """What :func:`bn_forward_train` does for every call whose tensors have these tensors'
    sizes, strides, dtypes and devices (and this eps, statistics mode, epilogue, and running
    statistics or none, cumulative or not), as a function ``run(x, weight, bias,
    running_mean, running_var, residual, num_batches_tracked, momentum) -> (y, save_mean,
    save_rstd)``, or None (as :func:`eval_recipe`)."""
    check_epilogue(epilogue, residual, "bn_forward_train")
    channels_last = _recipe_layout(x, residual)
    if channels_last is None:
        return None
    new_output = output_maker(x)
    C, device, acc = x.shape[1], x.device, acc_dtype(x.dtype)
    update = running_mean is not None
    p = plan(x, channels_last)
    operand_strides = (strides(x, channels_last), strides(new_output(x), channels_last),
                       strides(residual, channels_last) if residual is not None else (0, 0))
    restore = RUNNING_STATS if update else ()
    if p.single_launch:
        sizes, strides_, flags = _single_launch_static(
            p, *operand_strides, stats, update, cumulative, weight is not None,
            bias is not None, epilogue, x.dtype, channels_last)
        kernel, opts = launcher(_bn_fwd_single_launch_kernel, p.num_warps, restore)
        grid, eps, kwargs = p.grid, float(eps), {**flags, **opts}

        def run(x, weight, bias, running_mean, running_var, residual, nbt, momentum):
            y = new_output(x)
            save_mean = torch.empty(C, dtype=acc, device=device)
            save_rstd = torch.empty(C, dtype=acc, device=device)
            kernel[grid](x, y, residual, weight, bias, running_mean, running_var, nbt,
                         save_mean, save_rstd, *sizes, momentum_hi(momentum, x.dtype), eps,
                         *strides_, MOMENTUM_LO=momentum_lo(momentum, x.dtype, nbt is not None),
                         **kwargs)
            return y, save_mean, save_rstd
        return run
    welford = stats == "single_pass"
    sizes, strides_, flags = _apply_static(
        p, *operand_strides, (FROM_WELFORD if welford else FROM_TWO_PASS).value, update,
        cumulative, weight is not None, bias is not None, epilogue, x.dtype, channels_last)
    kernel, opts = launcher(_bn_fwd_apply_kernel, p.num_warps, restore)
    grid, eps, kwargs = p.grid, float(eps), {**flags, **opts}
    passes = (STATS_WELFORD.value,) if welford else (STATS_SUM.value, STATS_CENTRED.value)
    parts = 3 if welford else 2

    def run(x, weight, bias, running_mean, running_var, residual, nbt, momentum):
        y = new_output(x)
        save_mean = torch.empty(C, dtype=acc, device=device)
        save_rstd = torch.empty(C, dtype=acc, device=device)
        part = torch.empty((parts, p.split, C), dtype=acc, device=device).unbind()
        count_buf, part_a, part_b = part if welford else (None, *part)
        for pass_ in passes:
            launch_stats(x, channels_last, p, pass_, count_buf, part_a, part_b)
        kernel[grid](x, y, residual, weight, bias, count_buf, part_a, part_b, running_mean,
                     running_var, nbt, save_mean, save_rstd, *sizes,
                     momentum_hi(momentum, x.dtype), eps, *strides_,
                     MOMENTUM_LO=momentum_lo(momentum, x.dtype, nbt is not None), **kwargs)
        return y, save_mean, save_rstd
    return run
