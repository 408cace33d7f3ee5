"""What each rank of tests/test_sync.py runs (imported in the spawned processes).

Every rank draws the same global batch from the same seed, takes its slice, and checks its
results against torch's batch norm in float64 on the whole batch.
"""

import contextlib
import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from helpers import assert_close, f64

C, H, W = 5, 4, 3


def _slices(sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


def _global(seed, sizes, dtype, scale=2.0, shift=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(sum(sizes), C, H, W, generator=g) * scale + shift).to(dtype)


def _local(t, part, layout):
    t = t[part].clone()
    return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else t


def _twins(stats, activation, momentum=0.1, group=None):
    torch.manual_seed(0)  # the same parameters on every rank
    ours = kernels.SyncBatchNorm(C, momentum=momentum, process_group=group, stats=stats,
                                 activation=activation)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
        ours.running_mean.normal_()
    ref = nn.BatchNorm2d(C, momentum=momentum, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _step(ours, ref, rank, sizes, seed, dtype=torch.float32, layout="nchw", residual=False,
          group=None, shift=1.0, check_grads=True):
    """One training step of `ours` on this rank's slice and of `ref` on the whole batch;
    checks y, dx, dresidual and the group's summed dweight/dbias (`check_grads=False`: y only,
    for data whose fp32 mean is too coarse for the gradient's tolerance, as in one process)."""
    part = _slices(sizes)[rank]
    x_all = _global(seed, sizes, dtype, shift=shift)
    r_all = _global(seed + 1, sizes, dtype) if residual else None
    dy_all = _global(seed + 2, sizes, dtype, 1.0, 0.0)
    x = _local(x_all, part, layout).requires_grad_()
    r = _local(r_all, part, layout).requires_grad_() if residual else None
    y = ours(x, residual=r)
    y.backward(_local(dy_all, part, layout))
    xr = f64(x_all, True)
    rr = f64(r_all, True) if residual else None
    # the reference: torch's BatchNorm2d (whole batch, float64), then the epilogue's torch ops
    y_ref = kernels.Epilogue.of(residual, ours.activation).apply(ref(xr), rr)
    y_ref.backward(f64(dy_all))
    what = f"rank {rank}, {ours.stats}, {layout}, {dtype}, act={ours.activation}, res={residual}"
    assert_close(y, y_ref[part], dtype, f"y ({what})")
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "nhwc") or \
        x.numel() == 0, "the output keeps the input's memory format"
    if check_grads:
        assert_close(x.grad, xr.grad[part], dtype, f"dx ({what})")
    if residual and check_grads:
        assert_close(r.grad, rr.grad[part], dtype, f"dresidual ({what})")
    for name in ("weight", "bias"):  # each rank's own sums, as torch.nn.SyncBatchNorm
        total = getattr(ours, name).grad.clone()
        dist.all_reduce(total, group=group)
        if check_grads:
            assert_close(total, getattr(ref, name).grad, torch.float32 if dtype == torch.float32
                         else dtype, f"group sum of d{name} ({what})")
        getattr(ours, name).grad = None
        getattr(ref, name).grad = None
    return y


def _check_state(ours, ref, what):
    for key, value in ref.state_dict().items():
        if value.dtype == torch.long:
            assert int(ours.state_dict()[key]) == int(value), f"{key} ({what})"
        else:
            assert_close(ours.state_dict()[key], value, torch.float32, f"{key} ({what})")


# ---------------------------------------------------------------------------------------------

def parity(rank, world):
    sizes = [3, 2]
    for stats in ("single_pass", "two_pass"):
        for layout in ("nchw", "nhwc"):
            for activation, residual in ((None, False), ("relu", True), ("silu", False)):
                ours, ref = _twins(stats, activation, momentum=None if residual else 0.1)
                for step in range(2):
                    _step(ours, ref, rank, sizes, 10 * step, layout=layout, residual=residual)
                _check_state(ours, ref, f"{stats} {layout} {activation}")
        ours, ref = _twins(stats, "silu")  # bfloat16 input, float32 parameters
        _step(ours, ref, rank, sizes, 3, dtype=torch.bfloat16, residual=True)
        _check_state(ours, ref, f"{stats} bfloat16")
    # eval, and a group of one rank: no communication, the result of kernels.BatchNorm2d
    singles = [dist.new_group([r]) for r in range(world)]
    with _no_collectives():
        ours, ref = _twins("single_pass", None)
        ours.eval()
        ref.eval()
        x = _global(5, sizes, torch.float32)[_slices(sizes)[rank]]
        assert_close(ours(x), ref(f64(x)), torch.float32, "eval")
        own, ref1 = _twins("two_pass", None, group=singles[rank])
        x = x.clone().requires_grad_()
        xr = f64(x, True)
        y, y_ref = own(x), ref1(xr)
        y.backward(torch.ones_like(y))
        y_ref.backward(torch.ones_like(y_ref))
    assert_close(y, y_ref, torch.float32, "a group of one rank")
    assert_close(x.grad, xr.grad, torch.float32, "a group of one rank, dx")
    _check_state(own, ref1, "a group of one rank")


@contextlib.contextmanager
def _no_collectives():
    saved = {name: getattr(dist, name) for name in ("all_gather", "all_reduce")}

    def refuse(*args, **kwargs):
        raise AssertionError("a collective was issued where none should be")

    for name in saved:
        setattr(dist, name, refuse)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def uneven_and_empty(rank, world):
    for stats in ("single_pass", "two_pass"):
        for sizes in ([3, 1], [4, 0], [0, 3]):
            ours, ref = _twins(stats, "relu", momentum=None)
            for step in range(2):
                _step(ours, ref, rank, sizes, step, layout="nhwc" if step else "nchw",
                      residual=True)
            _check_state(ours, ref, f"{stats} sizes {sizes}")
        # data with a large mean: as accurate across ranks as in one process
        ours, ref = _twins(stats, None)
        _step(ours, ref, rank, [3, 2], 11, shift=1e4, check_grads=False)
        _check_state(ours, ref, f"{stats}, mean 1e4")
        # strided weight and bias (every other element of a buffer), the functional op
        sizes = [3, 2]
        w, b = (torch.rand(2 * C) + 0.5)[::2], torch.randn(2 * C)[1::2]
        x_all = _global(12, sizes, torch.float32)
        y = kernels.sync_batch_norm(x_all[_slices(sizes)[rank]], None, None, w, b, 0.1, 1e-5,
                                    stats=stats)
        y_ref = F.batch_norm(f64(x_all), None, None, f64(w), f64(b), True)
        assert_close(y, y_ref[_slices(sizes)[rank]], torch.float32, "strided weight and bias")
        # every rank empty: nothing hangs, nothing changes
        ours, _ = _twins(stats, None)
        before = copy.deepcopy(ours.state_dict())
        x = torch.empty(0, C, H, W, requires_grad=True)
        ours(x).sum().backward()
        for key, value in before.items():
            if key != "num_batches_tracked":
                assert torch.equal(ours.state_dict()[key], value), key


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a device value on the host (.item(), bool(t), ...)."""

    FORBIDDEN = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation: {func._schema.name}")
        self.seen.add(func._schema.name)
        return func(*args, **(kwargs or {}))

    def __init__(self):
        super().__init__()
        self.seen = set()


def determinism_and_no_host_sync(rank, world):
    sizes = [3, 2]
    for stats in ("single_pass", "two_pass"):
        runs = []
        for _ in range(2):
            ours, ref = _twins(stats, "silu", momentum=None)
            y = _step(ours, ref, rank, sizes, 1, residual=False)
            x = _global(1, sizes, torch.float32)[_slices(sizes)[rank]].requires_grad_()
            y2 = ours(x)
            y2.backward(torch.ones_like(y2))
            runs.append([y, y2, x.grad, ours.weight.grad, *ours.state_dict().values()])
        for a, b in zip(*runs):
            assert torch.equal(a, b), "not bitwise reproducible"
        # a whole step, then the op's own implementation (a dispatch mode does not see
        # inside a custom op), with host reads forbidden
        ours, _ = _twins(stats, "relu", momentum=None)
        x = _global(2, sizes, torch.float32)[_slices(sizes)[rank]].requires_grad_()
        r = torch.randn_like(x)
        ours(x, residual=r).sum().backward()  # warm-up: the first call checks the group
        mode = _NoHostSync()  # once (host side), as before a CUDA graph is captured
        with mode:
            ours(x, residual=r).sum().backward()
        assert "bnbench::sync_batch_norm_train" in mode.seen, sorted(mode.seen)
        group = dist.group.WORLD.group_name
        with _NoHostSync() as inner:
            y, mean, rstd, count = kernels.sync._sync_train_op._init_fn(
                x.detach(), ours.weight.detach(), ours.bias.detach(), r, ours.running_mean,
                ours.running_var, ours.num_batches_tracked, 0.0, 1e-5, stats, "residual+relu",
                group)
            kernels.sync._sync_backward_op._init_fn(
                torch.ones_like(y), x.detach(), y, ours.weight.detach(), ours.bias.detach(),
                None, mean, rstd, count, "residual+relu", group, [True, True, True, True])
        assert any(name.startswith("c10d::") for name in inner.seen), sorted(inner.seen)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def module_ddp_compile(rank, world):
    sizes = [3, 2]
    part = _slices(sizes)[rank]
    ref = _cnn().double()
    model = kernels.SyncBatchNorm.convert_sync_batchnorm(_cnn(), stats="two_pass")
    report = model.conversion_report
    assert len(report.converted) == 2 and not report.kept, str(report)
    assert all(type(m) is kernels.SyncBatchNorm and m.stats == "two_pass"
               for m in (model[1], model[4]))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        x_all = torch.randn(sum(sizes), 3, 6, 6, generator=g)
        # each rank's loss is its share of the whole batch's; DDP averages over the ranks
        loss = ddp(x_all[part]).square().sum() / sum(sizes) * world
        ref_loss = ref(f64(x_all)).square().sum() / sum(sizes)
        opt.zero_grad()
        ref_opt.zero_grad()
        loss.backward()
        ref_loss.backward()
        opt.step()
        ref_opt.step()
        total = loss.detach() / world
        dist.all_reduce(total)
        assert abs(float(total) - float(ref_loss)) <= 1e-4 * abs(float(ref_loss)), \
            (float(total), float(ref_loss))
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p, q, torch.float32, f"{name} after two DDP steps")
    for name, b in model.named_buffers():
        q = dict(ref.named_buffers())[name]
        assert_close(b.double(), q.double(), torch.float32, name)
    # torch.compile(fullgraph=True): no graph break, the same numbers as eager
    bn, _ = _twins("single_pass", "relu")
    eager = copy.deepcopy(bn)
    compiled = torch.compile(bn, fullgraph=True, backend="aot_eager")
    x = _global(4, sizes, torch.float32)[part].requires_grad_()
    xe = x.detach().clone().requires_grad_()
    y, ye = compiled(x), eager(xe)
    y.square().sum().backward()
    ye.square().sum().backward()
    assert_close(y, ye.double(), torch.float32, "compiled y")
    assert_close(x.grad, xe.grad.double(), torch.float32, "compiled dx")
    assert_close(bn.running_var, eager.running_var.double(), torch.float32, "compiled running_var")


def errors(rank, world):
    bn, _ = _twins("single_pass", None)
    before = copy.deepcopy(bn.state_dict())
    x = torch.randn(2, C, H, W)
    cases = [
        (lambda: bn(torch.randn(2, C + 1, H, W)), RuntimeError, "should contain"),
        (lambda: bn(x.long()), NotImplementedError, "not implemented"),
        (lambda: bn(x[0, 0, 0]), ValueError, "expected at least 2D input"),
        (lambda: bn(x, residual=x[:1]), RuntimeError, "residual"),
        (lambda: kernels.SyncBatchNorm(C, eps=0.0)(x), ValueError, "eps must be positive"),
    ]
    for call, error, match in cases:
        try:
            call()
        except error as e:
            assert match in str(e), (match, str(e))
        else:
            raise AssertionError(f"no {error.__name__} for {match!r}")
    # a rank with another C, or another dtype: every rank raises (none waits forever)
    for odd in (torch.randn(2, C + 1, H, W), torch.randn(2, C, H, W, dtype=torch.float64)):
        mine = odd if rank == 1 else x
        try:
            kernels.SyncBatchNorm(C)(mine)
        except RuntimeError as e:
            assert "every rank of the process group" in str(e) and f"rank {rank}" in str(e), e
        else:
            raise AssertionError("a rank with another C or dtype was not refused")
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a refused call"
    # one value per channel over the whole group (rank 0: (1, C, 1, 1), the others empty):
    # torch's ValueError on every rank, the running statistics untouched (torch counts the
    # batch first, and so does the module)
    stats = [t.clone() for t in (bn.running_mean, bn.running_var)]
    one = torch.randn(1 if rank == 0 else 0, C, 1, 1, requires_grad=True)
    try:
        bn(one)
    except ValueError as e:
        assert "Expected more than 1 value per channel when training" in str(e), e
    else:
        raise AssertionError("one value per channel over the group was not refused")
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    two = torch.randn(1, C, 1, 1)  # one value on each rank: two over the group, accepted
    assert torch.isfinite(bn(two)).all()


def subgroups(rank, world):
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    local_rank = rank % 2
    for stats in ("single_pass", "two_pass"):
        ours, ref = _twins(stats, None, group=mine)
        sizes = [2, 3] if rank // 2 == 0 else [1, 0]
        for step in range(2):  # each group its own batch
            _step(ours, ref, local_rank, sizes, 100 * (rank // 2) + step, group=mine)
        _check_state(ours, ref, f"{stats}, group {rank // 2}")
