r"""BatchNorm backward kernels: dx, dweight, dbias (and the residual's gradient).

Maths, per channel over its M = N*H*W elements, with the saved mean and
rstd = 1/sqrt(var + eps) of the forward:

    x_hat = (x - mean) * rstd
    z     = x_hat * w + b [+ residual]          (the activation's input)
    g     = dy * act'(z): dy itself without activation, dy * [z > 0] for ReLU,
            dy * s * (1 + z * (1 - s)) with s = sigmoid(z) for SiLU
    dbias   = sum g
    dweight = sum g * x_hat
    dx = w * rstd * (g - dbias / M - x_hat * dweight / M)     (batch statistics)
    dx = w * rstd * g                                          (fixed statistics, eval)
    dresidual = g

Where the forward fused a ReLU, its pre-activation sign is recomputed from x
(z = x_hat * w + b) when there is no residual, and read from the saved output
y when there is (y > 0 exactly where z > 0, as torch's threshold_backward).
Where it fused a SiLU, z itself is recomputed from x, mean, rstd, w and b, plus
the residual read again when there was one (SiLU cannot be inverted from y).

Single-launch path: when a channel group's whole plane fits in one tile
(kernels._plan), one launch reads x and dy once, reduces in registers and
writes dx (and dweight, dbias).

General path, launches: (1) per-split partial sums of g and g * x_hat, one read of x and
dy; (2) every program merges its channels' partials in a fixed order
(deterministic, no atomics), split 0 writes dweight and dbias, and all
programs write dx in a second read of x and dy.  Accumulation in fp32 (fp64
for fp64 input); dx in x's dtype, dweight and dbias in the parameters' dtype.
"""

import functools

import torch
import triton
import triton.language as tl

from ._common import (
    ACT_NONE, ACT_RELU, Epilogue, _activation_grad, _bcast, _channels, _load_channel,
    _merge_sums, _offsets, _per_channel, _tile,
)
from ._layout import choose_layout, empty_output, fits, layout_of, output_maker, strides, to_layout
from ._plan import plan
from ._tuning import autotune_enabled, launcher
from .forward import STATIC_CACHE_SIZE, acc_dtype, tl_acc


@triton.jit
def _grad_through_act(dy, x_hat, y_ptr, offs_y, res_ptr, offs_r, mask, w, b,
                      ACTIVATION: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr):
    """g = dy * act'(z) for one tile (dy itself without activation).

    z = x_hat * w + b [+ residual] is recomputed; ReLU with a residual reads the sign
    from the saved y instead (y > 0 exactly where z > 0), SiLU re-reads the residual.
    Masked elements have dy = 0 and a finite z, so g is 0 there.
    """
    if ACTIVATION != ACT_NONE:
        if ACTIVATION == ACT_RELU and HAS_RESIDUAL:
            z = tl.load(y_ptr + offs_y, mask=mask, other=0.0).to(ACC)
        else:
            z = x_hat * w + b
            if HAS_RESIDUAL:
                z += tl.load(res_ptr + offs_r, mask=mask, other=0.0).to(ACC)
        dy = _activation_grad(dy, z, ACTIVATION)
    return dy


@triton.jit
def _bn_bwd_reduce_kernel(
    x_ptr, dy_ptr,  # input and grad_output (N, C, HW), each with its (row, chan) strides
    y_ptr,  # forward output, read for the ReLU mask (ACT_RELU and HAS_RESIDUAL)
    res_ptr,  # the forward's residual, read to recompute z (ACT_SILU and HAS_RESIDUAL)
    w_ptr, b_ptr,  # [C] weight and bias (recomputing z needs them)
    mean_ptr, rstd_ptr,  # [C] saved statistics, ACC dtype
    part_g_ptr, part_gx_ptr,  # [split, C] out: per-split sum g and sum g * x_hat
    C, n_rows, n_cols, n_col_blocks, tiles, tiles_per_prog,  # plane geometry and split
    stride_x_row, stride_x_chan, stride_dy_row, stride_dy_chan, stride_y_row, stride_y_chan,
    stride_r_row, stride_r_chan,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # ACT_NONE, ACT_RELU or ACT_SILU (kernels._common)
    HAS_RESIDUAL: tl.constexpr,
    ACC: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_ROW: tl.constexpr,
    BLOCK_COL: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    ch = _channels(pid_c, pid_c * BLOCK_COL + tl.arange(0, BLOCK_COL), CHANNELS_LAST)
    mean = _bcast(_load_channel(mean_ptr, ch, C, 0.0, ACC, True), CHANNELS_LAST)
    rstd = _bcast(_load_channel(rstd_ptr, ch, C, 0.0, ACC, True), CHANNELS_LAST)
    w = _bcast(_load_channel(w_ptr, ch, C, 1.0, ACC, HAS_WEIGHT), CHANNELS_LAST)
    b = _bcast(_load_channel(b_ptr, ch, C, 0.0, ACC, HAS_BIAS), CHANNELS_LAST)

    acc_g = tl.zeros([BLOCK_ROW, BLOCK_COL], ACC)
    acc_gx = tl.zeros([BLOCK_ROW, BLOCK_COL], ACC)
    t_start = pid_s * tiles_per_prog
    t_end = tl.minimum(t_start + tiles_per_prog, tiles)
    for t in range(t_start, t_end):
        rows, cols, mask = _tile(t, pid_c, n_rows, n_cols, n_col_blocks,
                                 CHANNELS_LAST, BLOCK_ROW, BLOCK_COL)
        x = tl.load(x_ptr + _offsets(rows, cols, pid_c, stride_x_row, stride_x_chan),
                    mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + _offsets(rows, cols, pid_c, stride_dy_row, stride_dy_chan),
                     mask=mask, other=0.0).to(ACC)
        x_hat = (x - mean) * rstd
        g = _grad_through_act(dy, x_hat, y_ptr,
                              _offsets(rows, cols, pid_c, stride_y_row, stride_y_chan), res_ptr,
                              _offsets(rows, cols, pid_c, stride_r_row, stride_r_chan),
                              mask, w, b, ACTIVATION, HAS_RESIDUAL, ACC)
        # masked elements have dy = 0, so they add nothing
        acc_g += g
        acc_gx += g * x_hat
    out = pid_s * C + ch
    tl.store(part_g_ptr + out, _per_channel(acc_g, CHANNELS_LAST), mask=ch < C)
    tl.store(part_gx_ptr + out, _per_channel(acc_gx, CHANNELS_LAST), mask=ch < C)


@triton.jit
def _bn_bwd_dx_kernel(
    x_ptr, dy_ptr, y_ptr, res_ptr,  # as in _bn_bwd_reduce_kernel
    dx_ptr,  # out (WRITE_DX): grad of x, strides (stride_dx_row, stride_dx_chan)
    dres_ptr,  # out (HAS_RESIDUAL and WRITE_DRES): grad of the residual
    w_ptr, b_ptr, mean_ptr, rstd_ptr,  # [C] parameters and saved statistics
    part_g_ptr, part_gx_ptr,  # [split, C] partials of _bn_bwd_reduce_kernel (NEED_SUMS)
    dw_ptr, db_ptr,  # [C] out (WRITE_DW / WRITE_DB): dweight, dbias
    C, n_rows, n_cols, n_col_blocks, tiles, tiles_per_prog, split, count,
    stride_x_row, stride_x_chan, stride_dy_row, stride_dy_chan, stride_y_row, stride_y_chan,
    stride_r_row, stride_r_chan, stride_dx_row, stride_dx_chan, stride_dr_row, stride_dr_chan,
    TRAINING: tl.constexpr,  # statistics were the batch's: dx gets the mean/var terms
    NEED_SUMS: tl.constexpr,  # merge the partials (TRAINING, or dweight/dbias wanted)
    WRITE_DX: tl.constexpr,
    WRITE_DRES: tl.constexpr,
    WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACC: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_ROW: tl.constexpr,
    BLOCK_COL: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    ch = _channels(pid_c, pid_c * BLOCK_COL + tl.arange(0, BLOCK_COL), CHANNELS_LAST)
    mean = _load_channel(mean_ptr, ch, C, 0.0, ACC, True)
    rstd = _load_channel(rstd_ptr, ch, C, 0.0, ACC, True)
    w = _load_channel(w_ptr, ch, C, 1.0, ACC, HAS_WEIGHT)
    b = _load_channel(b_ptr, ch, C, 0.0, ACC, HAS_BIAS)

    # dbias = sum g, dweight = sum g * x_hat: merged in a fixed order, written once
    if NEED_SUMS:
        sum_g = _merge_sums(part_g_ptr, ch, C, split, CHANNELS_LAST, BLOCK_SPLIT)
        sum_gx = _merge_sums(part_gx_ptr, ch, C, split, CHANNELS_LAST, BLOCK_SPLIT)
        if pid_s == 0:
            if WRITE_DW:
                tl.store(dw_ptr + ch, sum_gx, mask=ch < C)
            if WRITE_DB:
                tl.store(db_ptr + ch, sum_g, mask=ch < C)
    if TRAINING:
        mean_g = _bcast(sum_g / count, CHANNELS_LAST)
        mean_gx = _bcast(sum_gx / count, CHANNELS_LAST)
    else:
        mean_g = 0.0
        mean_gx = 0.0

    if WRITE_DX or WRITE_DRES:
        scale = _bcast(w * rstd, CHANNELS_LAST)
        mean = _bcast(mean, CHANNELS_LAST)
        rstd = _bcast(rstd, CHANNELS_LAST)
        w = _bcast(w, CHANNELS_LAST)
        b = _bcast(b, CHANNELS_LAST)
        t_start = pid_s * tiles_per_prog
        t_end = tl.minimum(t_start + tiles_per_prog, tiles)
        for t in range(t_start, t_end):
            rows, cols, mask = _tile(t, pid_c, n_rows, n_cols, n_col_blocks,
                                     CHANNELS_LAST, BLOCK_ROW, BLOCK_COL)
            x = tl.load(x_ptr + _offsets(rows, cols, pid_c, stride_x_row, stride_x_chan),
                        mask=mask, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + _offsets(rows, cols, pid_c, stride_dy_row, stride_dy_chan),
                         mask=mask, other=0.0).to(ACC)
            x_hat = (x - mean) * rstd
            g = _grad_through_act(dy, x_hat, y_ptr,
                                  _offsets(rows, cols, pid_c, stride_y_row, stride_y_chan),
                                  res_ptr, _offsets(rows, cols, pid_c, stride_r_row,
                                                    stride_r_chan),
                                  mask, w, b, ACTIVATION, HAS_RESIDUAL, ACC)
            if WRITE_DRES:
                tl.store(dres_ptr + _offsets(rows, cols, pid_c, stride_dr_row, stride_dr_chan),
                         g.to(dres_ptr.dtype.element_ty), mask=mask)
            if WRITE_DX:
                tl.store(dx_ptr + _offsets(rows, cols, pid_c, stride_dx_row, stride_dx_chan),
                         _dx(g, x_hat, scale, mean_g, mean_gx, TRAINING).to(
                             dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dx(g, x_hat, scale, mean_g, mean_gx, TRAINING: tl.constexpr):
    """dx = w * rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with batch statistics,
    w * rstd * g with fixed ones (mean_g and mean_gx are then unused)."""
    if TRAINING:
        return (g - mean_g - x_hat * mean_gx) * scale
    else:
        return g * scale


@triton.jit
def _bn_bwd_single_launch_kernel(
    x_ptr, dy_ptr, y_ptr, res_ptr, dx_ptr, dres_ptr,  # as in _bn_bwd_dx_kernel
    w_ptr, b_ptr, mean_ptr, rstd_ptr, dw_ptr, db_ptr,  # as in _bn_bwd_dx_kernel
    C, n_rows, n_cols, count,  # the whole plane of a channel group is one tile
    stride_x_row, stride_x_chan, stride_dy_row, stride_dy_chan, stride_y_row, stride_y_chan,
    stride_r_row, stride_r_chan, stride_dx_row, stride_dx_chan, stride_dr_row, stride_dr_chan,
    TRAINING: tl.constexpr,
    WRITE_DX: tl.constexpr,
    WRITE_DRES: tl.constexpr,
    WRITE_DW: tl.constexpr,
    WRITE_DB: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACC: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_ROW: tl.constexpr,
    BLOCK_COL: tl.constexpr,
):
    """Backward in one launch: x and dy of the program's channels fit one tile, read once."""
    pid_c = tl.program_id(0)
    ch = _channels(pid_c, pid_c * BLOCK_COL + tl.arange(0, BLOCK_COL), CHANNELS_LAST)
    mean = _load_channel(mean_ptr, ch, C, 0.0, ACC, True)
    rstd = _load_channel(rstd_ptr, ch, C, 0.0, ACC, True)
    w = _load_channel(w_ptr, ch, C, 1.0, ACC, HAS_WEIGHT)
    b = _load_channel(b_ptr, ch, C, 0.0, ACC, HAS_BIAS)
    rows, cols, mask = _tile(0, pid_c, n_rows, n_cols, 1, CHANNELS_LAST, BLOCK_ROW, BLOCK_COL)
    x = tl.load(x_ptr + _offsets(rows, cols, pid_c, stride_x_row, stride_x_chan),
                mask=mask, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + _offsets(rows, cols, pid_c, stride_dy_row, stride_dy_chan),
                 mask=mask, other=0.0).to(ACC)
    x_hat = (x - _bcast(mean, CHANNELS_LAST)) * _bcast(rstd, CHANNELS_LAST)
    g = _grad_through_act(dy, x_hat, y_ptr,
                          _offsets(rows, cols, pid_c, stride_y_row, stride_y_chan), res_ptr,
                          _offsets(rows, cols, pid_c, stride_r_row, stride_r_chan), mask,
                          _bcast(w, CHANNELS_LAST), _bcast(b, CHANNELS_LAST), ACTIVATION,
                          HAS_RESIDUAL, ACC)
    # masked elements have dy = 0, so they add nothing
    sum_g = _per_channel(g, CHANNELS_LAST)
    sum_gx = _per_channel(g * x_hat, CHANNELS_LAST)
    if WRITE_DW:
        tl.store(dw_ptr + ch, sum_gx, mask=ch < C)
    if WRITE_DB:
        tl.store(db_ptr + ch, sum_g, mask=ch < C)
    if WRITE_DRES:
        tl.store(dres_ptr + _offsets(rows, cols, pid_c, stride_dr_row, stride_dr_chan),
                 g.to(dres_ptr.dtype.element_ty), mask=mask)
    if WRITE_DX:
        dx = _dx(g, x_hat, _bcast(w * rstd, CHANNELS_LAST), _bcast(sum_g / count, CHANNELS_LAST),
                 _bcast(sum_gx / count, CHANNELS_LAST), TRAINING)
        tl.store(dx_ptr + _offsets(rows, cols, pid_c, stride_dx_row, stride_dx_chan),
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)


def bn_backward(dy, x, y, weight, bias, mean, rstd, *, training, epilogue=Epilogue.NONE,
                residual=None, need_dx=True, need_dweight=True, need_dbias=True,
                need_dresidual=True, sums_hook=None):
    """Gradients of :func:`kernels.forward.bn_forward_train` / ``bn_forward_eval``.

    Args:
        dy: grad of the output, shape of x (any strides: copied if they do not fit x's path).
        x: the forward's input.
        y: the forward's output; read only where ``epilogue.reads_output`` (the ReLU mask
            after a residual; may be None otherwise).
        weight, bias: (C,) tensors or None.
        mean, rstd: (C,) statistics the forward normalised with (batch or running).
        training: the statistics were the batch's (adds their gradient terms to dx).
        epilogue: the forward's Epilogue (its residual add and activation).
        residual: the forward's residual; needed (read once more) where
            ``epilogue.reads_residual`` (SiLU after a residual: z = x_hat * w + b + residual
            is recomputed).
            Else unused (may be None; must be None when the epilogue has no residual).
        need_*: which gradients to compute; the others are returned as None.
        sums_hook: for the synchronised op (kernels.sync): called as
            ``sums_hook(part_g, part_gx)`` with this process's [split, C] partials of
            sum g and sum g * x_hat; returns the partials and the count dx is to use
            (the global batch's).  dweight and dbias stay this process's sums (as in
            torch.nn.SyncBatchNorm) and the general (two-launch) path is taken.

    Returns:
        (dx, dweight, dbias, dresidual).
    """
    if not isinstance(epilogue, Epilogue):
        raise TypeError(f"bn_backward: epilogue must be a kernels.Epilogue, got {epilogue!r}")
    if residual is not None and not epilogue.residual:
        raise ValueError(f"bn_backward: the epilogue {epilogue.value!r} adds no residual, but "
                         f"a residual tensor was given")
    if epilogue.reads_output and y is None:
        raise ValueError(f"bn_backward: {epilogue.value} needs the forward's output y")
    if epilogue.reads_residual and residual is None:
        raise ValueError(f"bn_backward: {epilogue.value} needs the residual (to recompute z)")
    C = x.shape[1]
    dx = empty_output(x) if need_dx else None
    dres = empty_output(x) if (epilogue.residual and need_dresidual) else None
    need_dweight = need_dweight and weight is not None
    need_dbias = need_dbias and bias is not None
    dw = torch.empty_like(weight) if need_dweight else None
    db = torch.empty_like(bias) if need_dbias else None
    if x.numel() == 0:
        dw = dw.zero_() if dw is not None else None
        db = db.zero_() if db is not None else None
        return dx, dw, db, dres

    x, channels_last = choose_layout(x)
    dy = to_layout(dy, channels_last)
    y = to_layout(y, channels_last) if epilogue.reads_output else None
    r = to_layout(residual, channels_last) if epilogue.reads_residual else None
    p = plan(x, channels_last, single_launch=sums_hook is None)
    acc = acc_dtype(x.dtype)
    need_sums = training or need_dweight or need_dbias or sums_hook is not None
    part_g = part_gx = None
    write_dx, write_dres = dx is not None, dres is not None
    in_strides, out_strides, common = _backward_static(
        p, strides(x, channels_last), strides(dy, channels_last),
        strides(y, channels_last) if y is not None else (0, 0),
        strides(r, channels_last) if r is not None else (0, 0),
        strides(dx, channels_last) if write_dx else (0, 0),
        strides(dres, channels_last) if write_dres else (0, 0),
        weight is not None, bias is not None, epilogue, x.dtype, channels_last)
    if p.single_launch:  # the single-launch path: x and dy read once
        kernel, opts = launcher(_bn_bwd_single_launch_kernel, p.num_warps)
        kernel[p.grid](
            x, dy, y, r, dx, dres, weight, bias, mean, rstd, dw, db,
            C, p.n_rows, p.n_cols, float(p.count), *in_strides, *out_strides,
            TRAINING=training, WRITE_DX=write_dx, WRITE_DRES=write_dres,
            WRITE_DW=need_dweight, WRITE_DB=need_dbias, **common, **opts,
        )
        return dx, dw, db, dres
    if need_sums:
        part_g = torch.empty((p.split, C), dtype=acc, device=x.device)
        part_gx = torch.empty((p.split, C), dtype=acc, device=x.device)
        kernel, opts = launcher(_bn_bwd_reduce_kernel, p.num_warps)
        kernel[p.grid](
            x, dy, y, r, weight, bias, mean, rstd, part_g, part_gx,
            C, p.n_rows, p.n_cols, p.n_col_blocks, p.tiles, p.tiles_per_prog, *in_strides,
            **common, **opts,
        )
    count = float(p.count)
    if sums_hook is not None:  # this process's dweight/dbias; the global sums for dx
        if need_dweight:
            dw.copy_(part_gx.sum(0))
        if need_dbias:
            db.copy_(part_g.sum(0))
        need_dweight = need_dbias = False
        part_g, part_gx, count = sums_hook(part_g, part_gx)
    # without dx or the residual's grad, only split 0 (which writes dweight/dbias) is needed
    grid = p.grid if (write_dx or write_dres) else (p.groups, 1)
    if need_sums or write_dx or write_dres:
        kernel, opts = launcher(_bn_bwd_dx_kernel, p.num_warps)
        kernel[grid](
            x, dy, y, r, dx, dres, weight, bias, mean, rstd, part_g, part_gx, dw, db,
            C, p.n_rows, p.n_cols, p.n_col_blocks, p.tiles, p.tiles_per_prog, p.split, count,
            *in_strides, *out_strides,
            TRAINING=training, NEED_SUMS=need_sums, WRITE_DX=write_dx, WRITE_DRES=write_dres,
            WRITE_DW=need_dweight, WRITE_DB=need_dbias, BLOCK_SPLIT=p.BLOCK_SPLIT, **common,
            **opts,
        )
    return dx, dw, db, dres


@functools.lru_cache(maxsize=STATIC_CACHE_SIZE)
def _backward_static(p, x_strides, dy_strides, y_strides, r_strides, dx_strides, dres_strides,
                     has_weight, has_bias, epilogue, dtype, channels_last):
    """The backward launches' arguments that follow from the plan and the operands' strides:
    (input strides, output strides, the constexprs every backward kernel takes), computed
    once per key."""
    common = dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, ACTIVATION=epilogue.ACTIVATION,
                  HAS_RESIDUAL=epilogue.residual, ACC=tl_acc(dtype),
                  CHANNELS_LAST=channels_last, BLOCK_ROW=p.BLOCK_ROW, BLOCK_COL=p.BLOCK_COL)
    return ((*x_strides, *dy_strides, *y_strides, *r_strides), (*dx_strides, *dres_strides),
            common)


def backward_recipe(dy, x, y, weight, bias, *, training, epilogue, residual, need_dx,
                    need_dweight, need_dbias, need_dresidual):
    """What :func:`bn_backward` does (without `sums_hook`) for every call whose tensors have
    these tensors' sizes, strides, dtypes and devices and that needs these gradients, as a
    function ``run(dy, x, y, weight, bias, mean, rstd, residual) -> (dx, dweight, dbias,
    dresidual)``: plan and launch arguments worked out here, once (the lean eager route
    keeps one per forward signature and gradient signature).  None where such a call is
    empty, copies an operand to x's path, or is autotuned (bn_backward does the work)."""
    if x.numel() == 0 or autotune_enabled():
        return None
    in_place, channels_last = layout_of(x)
    y = y if epilogue.reads_output else None
    r = residual if epilogue.reads_residual else None
    if not in_place or any(t is not None and not fits(t, channels_last) for t in (dy, y, r)):
        return None
    C, device, acc = x.shape[1], x.device, acc_dtype(x.dtype)
    new_output = output_maker(x)
    write_dres = epilogue.residual and need_dresidual
    need_dweight = need_dweight and weight is not None
    need_dbias = need_dbias and bias is not None
    need_sums = training or need_dweight or need_dbias
    p = plan(x, channels_last)
    out = new_output(x)
    in_strides, out_strides, common = _backward_static(
        p, strides(x, channels_last), strides(dy, channels_last),
        strides(y, channels_last) if y is not None else (0, 0),
        strides(r, channels_last) if r is not None else (0, 0),
        strides(out, channels_last) if need_dx else (0, 0),
        strides(out, channels_last) if write_dres else (0, 0),
        weight is not None, bias is not None, epilogue, x.dtype, channels_last)
    writes = dict(TRAINING=training, WRITE_DX=need_dx, WRITE_DRES=write_dres,
                  WRITE_DW=need_dweight, WRITE_DB=need_dbias)
    sizes = (C, p.n_rows, p.n_cols)

    def outputs(x, weight, bias):
        return (new_output(x) if need_dx else None, new_output(x) if write_dres else None,
                torch.empty_like(weight) if need_dweight else None,
                torch.empty_like(bias) if need_dbias else None)

    if p.single_launch:
        kernel, opts = launcher(_bn_bwd_single_launch_kernel, p.num_warps)
        grid, tail, kwargs = p.grid, (float(p.count), *in_strides, *out_strides), \
            {**writes, **common, **opts}

        def run(dy, x, y, weight, bias, mean, rstd, residual):
            dx, dres, dw, db = outputs(x, weight, bias)
            kernel[grid](x, dy, y if epilogue.reads_output else None,
                         residual if epilogue.reads_residual else None, dx, dres, weight,
                         bias, mean, rstd, dw, db, *sizes, *tail, **kwargs)
            return dx, dw, db, dres
        return run
    reduce_kernel, reduce_opts = launcher(_bn_bwd_reduce_kernel, p.num_warps)
    reduce_tail = (p.n_col_blocks, p.tiles, p.tiles_per_prog, *in_strides)
    reduce_kwargs = {**common, **reduce_opts}
    dx_kernel, dx_opts = launcher(_bn_bwd_dx_kernel, p.num_warps)
    dx_grid = p.grid if (need_dx or write_dres) else (p.groups, 1)
    dx_tail = (p.n_col_blocks, p.tiles, p.tiles_per_prog, p.split, float(p.count),
               *in_strides, *out_strides)
    dx_kwargs = {**writes, "NEED_SUMS": need_sums, "BLOCK_SPLIT": p.BLOCK_SPLIT, **common,
                 **dx_opts}
    grid = p.grid

    def run(dy, x, y, weight, bias, mean, rstd, residual):
        dx, dres, dw, db = outputs(x, weight, bias)
        y = y if epilogue.reads_output else None
        r = residual if epilogue.reads_residual else None
        part_g = part_gx = None
        if need_sums:
            part_g, part_gx = torch.empty((2, p.split, C), dtype=acc, device=device).unbind()
            reduce_kernel[grid](x, dy, y, r, weight, bias, mean, rstd, part_g, part_gx,
                                *sizes, *reduce_tail, **reduce_kwargs)
        if need_sums or need_dx or write_dres:
            dx_kernel[dx_grid](x, dy, y, r, dx, dres, weight, bias, mean, rstd, part_g,
                               part_gx, dw, db, *sizes, *dx_tail, **dx_kwargs)
        return dx, dw, db, dres
    return run
