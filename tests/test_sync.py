"""kernels.SyncBatchNorm over torch.distributed: gloo on 127.0.0.1, processes started here.

Each test starts its ranks with torch.multiprocessing (spawn), bounded in time and cleaned
up; every rank runs the kernels through Triton's interpreter and checks its part against a
float64 reference computed on the concatenated batch (every rank draws the same global
batch from the same seed and takes its slice).  A failing check raises in the rank; its
traceback comes back to the test.
"""

import os
import traceback

import pytest
import torch

from bnbench import train_dist

WORLD_TIMEOUT_S = 1500  # a loaded 2-core machine starts 4 interpreters slowly


def _worker(rank, world, port, scenario, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    torch.set_num_threads(1)
    try:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        try:
            import sync_scenarios

            getattr(sync_scenarios, scenario)(rank, world)
            message = "ok"
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the traceback goes back to the test
        message = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(message)


def run_ranks(world, scenario):
    """Run sync_scenarios.<scenario>(rank, world) on `world` processes; fail with the failed
    ranks' tracebacks; never leave a process behind."""
    train_dist.run_ranks(_worker, world, scenario, WORLD_TIMEOUT_S)


@pytest.mark.parametrize("scenario", [
    "parity",  # both stats modes, NCHW/NHWC, fusions, fp32/bf16, two steps: y, dx, dw, db,
               # dresidual, running stats, num_batches_tracked, momentum=None
    "uneven_and_empty",  # 3/1 and 4/0 splits, a mean-1e4 batch, all ranks empty
    "determinism_and_no_host_sync",
    "module_ddp_compile",  # convert_sync_batchnorm on a small CNN under DDP; compile
    "errors",
])
def test_two_ranks(scenario):
    run_ranks(2, scenario)


def test_four_ranks_subgroups():
    """Two groups of two ranks in a world of four, each normalising over its own ranks."""
    run_ranks(4, "subgroups")


def test_module_interface_and_conversion_in_one_process(device):
    """torch's parameters, buffers and state_dict keys; convert_sync_batchnorm carries state
    over (num_batches_tracked too) and keeps subclasses with behaviour; with no process group
    the module is kernels.BatchNorm2d."""
    import kernels
    from torch import nn

    ours, ref = kernels.SyncBatchNorm(4, stats="two_pass"), nn.SyncBatchNorm(4)
    assert isinstance(ours, nn.SyncBatchNorm)
    assert list(ours.state_dict()) == list(ref.state_dict())

    class OwnForward(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + 1

    model = nn.Sequential(nn.BatchNorm2d(4), nn.SyncBatchNorm(4), kernels.BatchNorm1d(4),
                          OwnForward(4))
    with torch.no_grad():
        model[0].running_mean.normal_()
        model[0].num_batches_tracked.fill_(5)
    weight = model[0].weight
    out = kernels.SyncBatchNorm.convert_sync_batchnorm(model, activation="relu")
    assert [type(m) for m in out] == [kernels.SyncBatchNorm] * 3 + [OwnForward]
    assert out[0].weight is weight and int(out[0].num_batches_tracked) == 5
    assert all(m.activation == "relu" for m in out[:3])
    assert [r.name for r in out.conversion_report.kept] == ["3"]
    x = torch.randn(3, 4, 5, 6, device=device)
    bn, plain = kernels.SyncBatchNorm(4).to(device), kernels.BatchNorm2d(4).to(device)
    assert torch.equal(bn(x), plain(x)), "no process group: kernels.BatchNorm2d"
    assert torch.equal(bn.running_var, plain.running_var)
