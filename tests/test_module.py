"""kernels.BatchNorm2d as a drop-in torch.nn.BatchNorm2d, and kernels.convert_batchnorm."""

import copy

import pytest
import torch
from torch import nn

import kernels
from helpers import assert_close

STATS = ["single_pass", "two_pass"]


def twins(stats, device, **kwargs):
    """A torch BatchNorm2d (float64 reference) and a kernels.BatchNorm2d with the same state."""
    ours = kernels.BatchNorm2d(5, stats=stats, device=device, **kwargs)
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.normal_()
    ref = nn.BatchNorm2d(5, dtype=torch.float64, **kwargs)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def run_steps(ours, ref, device, steps=2, train=True):
    ours.train(train)
    ref.train(train)
    for _ in range(steps):
        x = torch.randn(3, 5, 9, 7, device=device).mul(2).add(1).requires_grad_()
        xr = x.detach().cpu().double().requires_grad_()
        y, y_ref = ours(x), ref(xr)
        assert_close(y, y_ref, torch.float32, "y")
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(dy.cpu().double())
        assert_close(x.grad, xr.grad, torch.float32, "dx")
    if ours.affine:
        assert_close(ours.weight.grad, ref.weight.grad, torch.float32, "dweight")
        assert_close(ours.bias.grad, ref.bias.grad, torch.float32, "dbias")
    for key, value in ref.state_dict().items():
        if value.dtype == torch.long:
            assert torch.equal(ours.state_dict()[key].cpu(), value), key
        else:
            assert_close(ours.state_dict()[key], value, torch.float32, key)


@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize("kwargs", [
    pytest.param({}, id="default"),
    pytest.param(dict(momentum=None), id="momentum-None"),
    pytest.param(dict(momentum=0.3), id="momentum-0.3"),
    pytest.param(dict(affine=False), id="affine-False"),
    pytest.param(dict(track_running_stats=False), id="no-running-stats"),
])
def test_module_matches_torch(stats, kwargs, device, path):
    """Two training steps, then eval: outputs, grads, running stats, num_batches_tracked."""
    ours, ref = twins(stats, device, **kwargs)
    run_steps(ours, ref, device, steps=3 if kwargs.get("momentum", 0.1) is None else 2)
    if ours.track_running_stats:
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) > 0
    run_steps(ours, ref, device, steps=1, train=False)


@pytest.mark.quick
def test_module_interface_matches_torch():
    ours, ref = kernels.BatchNorm2d(6), nn.BatchNorm2d(6)
    assert isinstance(ours, nn.BatchNorm2d)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    ours.load_state_dict(ref.state_dict())  # loads both ways
    ref.load_state_dict(ours.state_dict())
    assert "stats='single_pass'" in repr(ours)
    half = kernels.BatchNorm2d(6, dtype=torch.float16)
    assert half.weight.dtype == half.running_mean.dtype == torch.float16


@pytest.mark.quick
def test_module_residual_relu(device):
    ours = kernels.BatchNorm2d(5, activation="relu", device=device)
    ref = nn.BatchNorm2d(5, dtype=torch.float64)
    x = torch.randn(3, 5, 9, 7, device=device)
    r = torch.randn(3, 5, 9, 7, device=device)
    y = ours(x, residual=r)
    y_ref = torch.relu(ref(x.cpu().double()) + r.cpu().double())
    assert_close(y, y_ref, torch.float32, "relu(bn(x) + residual)")
    assert_close(ours.running_var, ref.running_var, torch.float32, "running_var")


@pytest.mark.parametrize("make, error, match", [
    pytest.param(lambda: kernels.BatchNorm2d(4, stats="three_pass"), ValueError, "stats must be",
                 id="bad-stats"),
    pytest.param(lambda: kernels.BatchNorm2d(4, activation="gelu"), ValueError, "activation",
                 id="bad-activation"),
])
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def _bn_and_batch(device):
    bn = kernels.BatchNorm2d(5, device=device)
    return bn, torch.randn(3, 5, 4, 4, device=device)


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda bn, x: bn(x[0]), ValueError, r"expected 4D input \(got 3D input\)",
                 id="wrong-ndim"),
    pytest.param(lambda bn, x: bn(x[:1, :, :1, :1]), ValueError,
                 "Expected more than 1 value per channel when training", id="one-value"),
    pytest.param(lambda bn, x: bn(x[:, :4]), RuntimeError, "running_mean should contain 4 elements",
                 id="channel-mismatch"),
    pytest.param(lambda bn, x: bn(x.long()), NotImplementedError, "not implemented for",
                 id="integer-input"),
    pytest.param(lambda bn, x: bn(x, residual=x[:, :, :2]), RuntimeError,
                 "residual must have the input's shape", id="residual-shape"),
    pytest.param(lambda bn, x: bn(x, residual=x.double()), RuntimeError,
                 "residual must have the input's dtype", id="residual-dtype"),
])
def test_bad_input_errors_and_state_untouched(call, error, match, device):
    """Same exception type as torch, a message that says what is wrong, nothing changed."""
    bn, x = _bn_and_batch(device)
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(error, match=match):
        call(bn, x)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a failed call"


def test_torch_raises_the_same_types(device):
    """The error types above are torch's own for the same mistakes."""
    bn, x = nn.BatchNorm2d(5).to(device), torch.randn(3, 5, 4, 4, device=device)
    with pytest.raises(ValueError):
        bn(x[0])
    with pytest.raises(ValueError):
        bn(x[:1, :, :1, :1])
    with pytest.raises(RuntimeError):
        bn(x[:, :4])


@pytest.mark.parametrize("call, error, match", [
    pytest.param(lambda x, rm, rv: kernels.batch_norm(x, rm, rv, training=True, stats="fast"),
                 ValueError, "stats must be one of", id="bad-stats"),
    pytest.param(lambda x, rm, rv: kernels.batch_norm(x, rm, rv, activation="tanh"),
                 ValueError, "activation must be one of", id="bad-activation"),
    pytest.param(lambda x, rm, rv: kernels.batch_norm(x[0, 0, 0], rm, rv), IndexError,
                 "at least 2 dims", id="1d-input"),  # torch: IndexError
    pytest.param(lambda x, rm, rv: kernels.batch_norm(x, None, None, training=False),
                 RuntimeError, "running_mean must be defined in evaluation mode",
                 id="eval-no-stats"),
    pytest.param(lambda x, rm, rv: kernels.batch_norm(x, rm, rv, weight=torch.ones(4)),
                 RuntimeError, "weight should contain 5 elements not 4", id="weight-size"),
    pytest.param(lambda x, rm, rv: kernels.batch_norm(x, rm, rv, bias=torch.ones(6)),
                 RuntimeError, "bias should contain 5 elements not 6", id="bias-size"),
    pytest.param(lambda x, rm, rv: kernels.batch_norm(x, rm, rv.double()), RuntimeError,
                 "running_var has dtype torch.float64", id="param-dtype"),
    pytest.param(lambda x, rm, rv: kernels.batch_norm(x, rm, rv, momentum=None, training=True),
                 TypeError, "momentum must be a float", id="momentum-None"),
    pytest.param(lambda x, rm, rv: kernels.batch_norm(x, rm, None, training=True),
                 ValueError, "both be None or neither", id="one-running-stat"),  # as torch
])
def test_functional_bad_inputs(call, error, match, device):
    x = torch.randn(3, 5, 4, 4, device=device)
    rm, rv = torch.zeros(5, device=device), torch.ones(5, device=device)
    with pytest.raises(error, match=match):
        call(x, rm, rv)
    assert torch.equal(rm, torch.zeros_like(rm)) and torch.equal(rv, torch.ones_like(rv))


def _small_net(device):
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Sequential(nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4, momentum=None, affine=False)),
    ).to(device)


@pytest.mark.parametrize("stats", STATS)
def test_convert_batchnorm(stats, device):
    torch.manual_seed(1)
    model = _small_net(device)
    with torch.no_grad():  # non-default state to carry over
        model[1].running_mean.normal_()
        model[1].num_batches_tracked.fill_(7)
    model.eval()
    ref = copy.deepcopy(model)
    weight = model[1].weight
    converted = kernels.convert_batchnorm(model, stats=stats)
    bns = [m for m in converted.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 2 and all(isinstance(m, kernels.BatchNorm2d) for m in bns)
    assert all(m.stats == stats and not m.training for m in bns)
    assert converted[1].weight is weight, "parameters are carried over, not copied"
    assert int(converted[1].num_batches_tracked) == 7
    assert list(converted.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 9, 7, device=device)
    assert_close(converted(x), ref(x).double(), torch.float32, "converted model, eval")
    converted.train()
    ref.train()
    y, y_ref = converted(x), ref(x)
    assert_close(y, y_ref.double(), torch.float32, "converted model, train")
    assert_close(converted[3][1].running_var, ref[3][1].running_var.double(), torch.float32,
                 "cumulative running_var")


def test_convert_batchnorm_top_level_module():
    bn = nn.BatchNorm2d(3)
    converted = kernels.convert_batchnorm(bn, activation="relu")
    assert isinstance(converted, kernels.BatchNorm2d) and converted.activation == "relu"
    assert converted.running_mean is bn.running_mean
