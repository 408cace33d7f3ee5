r"""``kernels.SyncBatchNorm``: batch normalisation over every rank of a ``torch.distributed`` group.

In training the statistics are those of the union of the group's batches, as one process
would compute them on the concatenated batch.  Per channel, rank r holds n_r elements
(n_r = 0 for an empty batch) and p_r, its first element (the pivot of the single-process
kernels: statistics are taken of x - p_r, see kernels.forward):

* ``single_pass``: the statistics kernel gives each rank's exact (n_r, m_r, M2_r) of
  x - p_r in one read; ONE collective (an all_gather of (n, p, m, M2): 4C values per
  rank) and every rank merges them with Chan's formula in its k-way form, in rank
  order, around a common pivot P (the first non-empty rank's):
      mu = sum_r n_r (p_r - P + m_r) / N,   M2 = sum_r M2_r + n_r (p_r - P + m_r - mu)^2.
* ``two_pass``: the kernel's first pass gives each rank's sum of x - p_r; an all_gather of
  (n, p, sum) (3C values) gives the global mean; the kernel's centred pass gives each
  rank's sum (x - mean)^2, and an all_reduce (C values) the global M2: two collectives.

The normalising launch is the inference kernel with the local pivot as its "mean" and the
shifted mean folded into the bias,
      y = act((x - p_r) * rstd * w + (b - (P - p_r + mu) * rstd * w) [+ residual]),
so data with a large mean (1e4, std 1) loses no precision across ranks either.  The
running statistics get the global mean and the unbiased variance M2 / (N - 1).

Backward: the reduction kernel gives each rank's sum g and sum g * x_hat; ONE all_reduce
of these 2C values, divided by N, feeds the dx kernel.  dweight and dbias are each rank's
own sums, as in ``torch.nn.SyncBatchNorm`` (DistributedDataParallel then averages them).

No device-to-host synchronisation: counts stay on the device (an empty rank contributes
n = 0 through the same collectives, so nothing hangs), the momentum of ``momentum=None``
is read from ``num_batches_tracked`` on the device, and the launches depend on shapes only.
Deterministic: fixed merge orders, no atomics.  Eval mode, no initialised process group
or a group of one rank: no communication, the result of ``kernels.BatchNorm*d``.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._layout import choose_layout, empty_output
from ._plan import plan
from ._common import Epilogue
from .backward import bn_backward
from .forward import STATS_CENTRED, STATS_SUM, STATS_WELFORD, acc_dtype, bn_forward_eval, \
    launch_stats
from .modules import _PLAIN, KERNELS_FOR, _BatchNormKernels, convert_tree
from .ops import _dense, batch_norm, check_batch_norm_args, uses_triton


def _group(name):
    return dist.distributed_c10d._resolve_process_group(name)


def _all_gather(t, group):
    """[world, *t.shape]: every rank's `t`, in rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


def _local_partials(x, channels_last, pass_, acc, centre=None):
    """The statistics kernel's [split, C] partials of x - pivot for this rank (`pass_`:
    STATS_SUM, STATS_CENTRED or STATS_WELFORD)."""
    p = plan(x, channels_last, single_launch=False)
    shape = (p.split, x.shape[1])
    count_buf = torch.empty(shape, dtype=acc, device=x.device) if pass_ is STATS_WELFORD else None
    part_a = torch.zeros(shape, dtype=acc, device=x.device)
    part_b = torch.empty(shape, dtype=acc, device=x.device)
    if centre is not None:  # the centred pass merges part_a / count: the mean, in row 0
        part_a[0] = centre
    launch_stats(x, channels_last, p, pass_.value, count_buf, part_a, part_b, count=1.0)
    return count_buf, part_a, part_b


def _global_stats(x, stats, group):
    """(N, P, mu, M2, pivot): global count, common pivot, mean of x - P, centred sum of
    squares, and this rank's pivot; all (C,) tensors in the accumulation dtype."""
    C, acc = x.shape[1], acc_dtype(x.dtype)
    zeros = x.new_zeros(C, dtype=acc)
    empty = x.numel() == 0
    xl, channels_last = choose_layout(x)
    pivot = zeros if empty else xl[0].reshape(C, -1)[:, 0].to(acc).contiguous()
    pivot = pivot.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)  # as _pivot: finite
    n = torch.full_like(zeros, 0 if empty else x.numel() // C)
    if stats == "single_pass":
        mean = m2 = zeros
        if not empty:  # this rank's exact (n, mean, M2): a k-way Chan merge of the programs'
            cnt, part_mean, part_m2 = _local_partials(xl, channels_last, STATS_WELFORD, acc)
            mean = (cnt * part_mean).sum(0) / n
            m2 = part_m2.sum(0) + (cnt * (part_mean - mean) ** 2).sum(0)
        n_r, p_r, m_r, m2_r = _all_gather(torch.stack([n, pivot, mean, m2]), group).unbind(1)
    else:
        total = zeros if empty else _local_partials(xl, channels_last, STATS_SUM, acc)[1].sum(0)
        n_r, p_r, s_r = _all_gather(torch.stack([n, pivot, total]), group).unbind(1)
        m_r = s_r / n_r.clamp_min(1)
    N = n_r.sum(0)
    first = (n_r > 0).to(acc).argmax(0, keepdim=True)  # the first non-empty rank
    P = p_r.gather(0, first)[0]
    shifted = p_r - P + m_r  # each rank's mean, relative to P
    mu = (n_r * shifted).sum(0) / N.clamp_min(1)
    if stats == "single_pass":
        M2 = m2_r.sum(0) + (n_r * (shifted - mu) ** 2).sum(0)
    else:  # second read: each rank's sum (x - mean)^2, then the second collective
        ss = zeros if empty else _local_partials(xl, channels_last, STATS_CENTRED, acc,
                                                 centre=P - pivot + mu)[2].sum(0)
        M2 = ss.clone()
        dist.all_reduce(M2, group=group)
    return N, P, mu, M2, pivot


def _check_global_count(x, N):
    """torch's ValueError when the whole group holds one value per channel.  A global count
    of 1 means every rank holds at most one value, so only a rank whose own count (known from
    its shape) is at most 1 reads the global count back to the host: then every rank of such
    a group reads it and raises alike, and a step of larger batches reads nothing (as torch,
    nothing is read while a CUDA graph is being captured)."""
    C = x.shape[1]
    if C == 0 or x.numel() // C > 1:
        return
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    count = int(N[0])
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"size {count} over the process group")


@torch.library.custom_op("bnbench::sync_batch_norm_train",
                         mutates_args=("running_mean", "running_var"))
def _sync_train_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   residual: Optional[Tensor], running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                   momentum: float, eps: float, stats: str, epilogue: str,
                   group: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    N, P, mu, M2, pivot = _global_stats(x, stats, _group(group))
    _check_global_count(x, N)
    var = M2 / N.clamp_min(1)
    rstd = (var + eps).rsqrt()
    scale = rstd if weight is None else rstd * weight.to(acc)
    shift = -(P - pivot + mu) * scale  # the shifted mean, folded into the bias
    shift = shift if bias is None else shift + bias.to(acc)
    y = bn_forward_eval(x, _dense(weight), shift, pivot, var, eps, residual,
                        Epilogue(epilogue))
    mean = P + mu
    if running_mean is not None:  # global mean and unbiased variance; nothing if N == 0
        m = (momentum if num_batches_tracked is None
             else 1.0 / num_batches_tracked.to(acc).clamp_min(1))
        unbiased = M2 / (N - 1).clamp_min(1)
        for stat, new in ((running_mean, mean), (running_var, unbiased)):
            old = stat.to(acc)
            stat.copy_(torch.where(N > 0, old + m * (new - old), old))
    return y, mean, rstd, N


@_sync_train_op.register_fake
def _(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps,
      stats, epilogue, group):
    stat = x.new_empty(x.shape[1], dtype=acc_dtype(x.dtype))
    return empty_output(x), stat, torch.empty_like(stat), torch.empty_like(stat)


@torch.library.custom_op("bnbench::sync_batch_norm_backward", mutates_args=())
def _sync_backward_op(dy: Tensor, x: Tensor, y: Optional[Tensor], weight: Optional[Tensor],
                      bias: Optional[Tensor], residual: Optional[Tensor], mean: Tensor,
                      rstd: Tensor, count: Tensor, epilogue: str, group: str,
                      grad_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    pg = _group(group)

    def global_sums(part_g, part_gx):  # one all_reduce of (sum g, sum g * x_hat), / N
        sums = torch.stack([part_g.sum(0), part_gx.sum(0)])
        dist.all_reduce(sums, group=pg)
        sums = sums / count.clamp_min(1)
        out_g, out_gx = torch.zeros_like(part_g), torch.zeros_like(part_gx)
        out_g[0], out_gx[0] = sums[0], sums[1]
        return out_g, out_gx, 1.0

    if x.numel() == 0:  # an empty rank still takes part in the collective
        zero = x.new_zeros((1, x.shape[1]), dtype=mean.dtype)
        global_sums(zero, zero)
        outs = (torch.empty_like(x) if grad_mask[0] else None,
                torch.zeros_like(weight) if grad_mask[1] and weight is not None else None,
                torch.zeros_like(bias) if grad_mask[2] and bias is not None else None,
                torch.empty_like(x) if grad_mask[3] and residual is not None else None)
    else:
        outs = bn_backward(dy, x, y, _dense(weight), _dense(bias), mean, rstd, training=True,
                           epilogue=Epilogue(epilogue), residual=residual,
                           need_dx=grad_mask[0], need_dweight=grad_mask[1],
                           need_dbias=grad_mask[2], need_dresidual=grad_mask[3],
                           sums_hook=global_sums)
    return tuple(o if o is not None else x.new_empty(0) for o in outs)


@_sync_backward_op.register_fake
def _(dy, x, y, weight, bias, residual, mean, rstd, count, epilogue, group, grad_mask):
    empty = x.new_empty(0)
    return (empty_output(x) if grad_mask[0] else empty,
            torch.empty_like(weight) if grad_mask[1] and weight is not None else empty,
            torch.empty_like(bias) if grad_mask[2] and bias is not None else empty,
            empty_output(x) if grad_mask[3] and residual is not None else empty)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Autograd rule over the synchronised ops (first order; see the module docstring)."""

    @staticmethod
    def forward(x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                momentum, eps, stats, epilogue, group):
        return torch.ops.bnbench.sync_batch_norm_train(
            x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
            momentum, eps, stats, epilogue.value, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, residual, *_, epilogue, group = inputs
        y, mean, rstd, count = output
        ctx.mark_non_differentiable(mean, rstd, count)
        y_saved = y if epilogue.reads_output else None
        ctx.save_for_backward(x, y_saved, weight, bias, residual, mean, rstd, count)
        ctx.flags = (epilogue, group)

    @staticmethod
    def backward(ctx, dy, *_):
        x, y, weight, bias, residual, mean, rstd, count = ctx.saved_tensors
        epilogue, group = ctx.flags
        need = ctx.needs_input_grad
        # every rank must join the all_reduce, so dx's sums are computed even when x needs
        # no gradient here
        mask = [True, need[1] and weight is not None, need[2] and bias is not None,
                epilogue.residual and need[3]]
        grads = torch.ops.bnbench.sync_batch_norm_backward(
            dy, x, y, weight, bias, residual, mean, rstd,
            count, epilogue.value, group, mask)
        grads = [g if m and n else None for g, m, n in zip(grads, mask, need)]
        return (*grads, None, None, None, None, None, None, None, None)


def _synchronises(group):
    """True when `group` has more than one rank (else there is nothing to synchronise)."""
    return dist.get_world_size(group) > 1


def sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps,
                    process_group=None, *, stats="single_pass", residual=None, activation=None,
                    num_batches_tracked=None):
    """Training batch norm with the statistics of every rank of `process_group` (default:
    the world).  Arguments as :func:`kernels.batch_norm` (training=True); a collective, so
    every rank of the group must call it.  In a group of one rank it is
    :func:`kernels.batch_norm` (no communication, as the module)."""
    group = process_group if process_group is not None else dist.group.WORLD
    if not _synchronises(group):  # one rank: the single-process op
        return batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps,
                          stats=stats, residual=residual, activation=activation,
                          num_batches_tracked=num_batches_tracked)
    return _SyncBatchNormFunction.apply(
        input, weight, bias, residual, running_mean, running_var, num_batches_tracked,
        float(momentum), float(eps), stats, Epilogue.of(residual is not None, activation),
        group.group_name)[0]


def _torch_sync_batch_norm(x, running_mean, running_var, weight, bias, momentum, eps, group,
                           residual, epilogue, num_batches_tracked):
    """The CPU fallback (CPU tensors, Triton's interpreter off), as the single-process
    modules fall back to torch: the global batch's statistics from all_reduces of each
    rank's (count, sum) then of its centred sum of squares, in float64 accumulation of
    torch ops; autograd through ``torch.distributed.nn``'s all_reduce (its backward sums
    the gradients over the group), so dx is the whole batch's and dweight/dbias each
    rank's own, as with the kernels.  The running statistics get the global mean and the
    unbiased variance."""
    from torch.distributed.nn.functional import all_reduce

    dims = [0] + list(range(2, x.dim()))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa = x.to(acc)
    n_local = torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=acc)
    count_sum = all_reduce(torch.cat([n_local.expand(1), xa.sum(dims)]), group=group)
    count = count_sum[0]
    if not count.item() > 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {list(x.shape)} on this rank and {int(count.item())} value(s) "
                         "per channel in the group")
    mean = count_sum[1:] / count
    shape = [1, -1] + [1] * (x.dim() - 2)
    centred = xa - mean.view(shape)
    m2 = all_reduce((centred * centred).sum(dims), group=group)
    var = m2 / count
    y = centred * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        y = y * weight.to(acc).view(shape)
    if bias is not None:
        y = y + bias.to(acc).view(shape)
    y = epilogue.apply(y.to(x.dtype), residual)
    if running_mean is not None:
        with torch.no_grad():
            m = momentum if num_batches_tracked is None else 1.0 / float(num_batches_tracked)
            running_mean.mul_(1 - m).add_(mean.detach().to(running_mean.dtype), alpha=m)
            unbiased = (m2.detach() / (count.detach() - 1)).to(running_var.dtype)
            running_var.mul_(1 - m).add_(unbiased, alpha=m)
    return y


class SyncBatchNorm(_BatchNormKernels, nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` on the Triton kernels, for CUDA (NCCL) and CPU (gloo).

    Same parameters, buffers and ``state_dict`` keys as torch's; input ``(N, C, *)``;
    ``stats=`` and ``activation=`` as in ``kernels.BatchNorm2d``; ``forward(x,
    residual=None)``.  Synchronises in training when a process group of more than one
    rank is initialised; otherwise it is ``kernels.BatchNorm*d``.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *,
                 stats="single_pass", activation=None, **torch_kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, stats=stats, activation=activation,
                         process_group=process_group, **torch_kwargs)

    def _group(self):
        """The process group to synchronise over, or None for no communication."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        # group.size(): dist.get_world_size's answer for a group this rank is in, without its
        # Python checks (on every call); anything else (not a member: -1) asks it
        size = group.size() if isinstance(group, dist.ProcessGroup) else dist.get_world_size(group)
        return group if size > 1 else None

    def forward(self, input, residual=None):
        group = self._group()
        if group is None:
            return super().forward(input, residual)
        self._check_input_dim(input)
        if not torch.compiler.is_compiling():
            self._check_group_agrees(input, group)
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        momentum = 0.0 if self.momentum is None else self.momentum
        # checked before counting the batch (a refused call changes nothing); "more than 1
        # value per channel" is the global batch's business, not this rank's
        check_batch_norm_args(input, running_mean, running_var, self.weight, self.bias,
                              True, momentum, self.stats, residual, self.activation, self.eps,
                              local_batch=False)
        cumulative = None
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                cumulative = self.num_batches_tracked
        if not uses_triton(input):  # CPU tensors without the interpreter: torch's maths
            return _torch_sync_batch_norm(input, running_mean, running_var, self.weight,
                                          self.bias, momentum, self.eps, group, residual,
                                          Epilogue.of(residual is not None, self.activation),
                                          cumulative)
        return sync_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                               momentum, self.eps, group, stats=self.stats, residual=residual,
                               activation=self.activation, num_batches_tracked=cumulative)

    def _check_group_agrees(self, input, group):
        """Once per (channels, dtype, group): every rank must bring the same C and dtype, or
        the collectives would mismatch (a hang, or garbage).  A host-side exchange
        (all_gather_object), so it runs on the first call only, before any step is captured
        (CUDA graphs) and outside torch.compile; every rank raises, so none waits forever."""
        key = (input.shape[1], str(input.dtype), group.group_name)
        if getattr(self, "_agreed", None) == key:
            return
        mine = (dist.get_rank(group), input.shape[1], str(input.dtype))
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, mine, group=group)
        if any((c, d) != mine[1:] for _, c, d in everyone):
            raise RuntimeError(
                f"SyncBatchNorm: every rank of the process group must give the same number of "
                f"channels ({self.num_features}) and dtype; got (rank, C, dtype) = {everyone}; "
                f"this is rank {mine[0]} with C={mine[1]}, {mine[2]}")
        self._agreed = key

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None, **kwargs):
        """`module` with every BatchNorm1d/2d/3d, ``torch.nn.SyncBatchNorm`` and kernels
        BatchNorm replaced by :class:`SyncBatchNorm` (parameters, buffers and
        ``num_batches_tracked`` carried over), with the rules of
        :func:`kernels.convert_batchnorm`: a subclass with its own behaviour is left as it
        is and listed in the returned module's ``conversion_report``."""
        return convert_tree(module, kwargs, target=cls,
                            extra=dict(process_group=process_group))


KERNELS_FOR.setdefault(nn.SyncBatchNorm, SyncBatchNorm)
_PLAIN.add(SyncBatchNorm)


def _let_ddp_wrap_cpu_modules():
    """DistributedDataParallel refuses any torch.nn.SyncBatchNorm in a CPU module, because
    torch's own runs on GPUs only.  Ours runs on CPU (gloo) too: exempt it, and only it, from
    that check.  Checked against torch 2.7 to 2.13 (DDP._passing_sync_batchnorm_handle);
    where the method does not exist, nothing is changed."""
    ddp = nn.parallel.DistributedDataParallel
    original = getattr(ddp, "_passing_sync_batchnorm_handle", None)
    if original is None or getattr(original, "_bnbench", False):
        return

    def check(self, module):
        torch_own = [m for m in module.modules()
                     if isinstance(m, nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm)]
        if torch_own or self.device_type != "cpu":
            return original(self, module)

    check._bnbench = True
    ddp._passing_sync_batchnorm_handle = check


_let_ddp_wrap_cpu_modules()
