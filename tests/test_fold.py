"""BatchNorm folding: fold_conv_bn pair by pair, fold_batchnorm model-wide, BatchNormInference.

Every output is compared with the original model's eval output computed in
float64 (a float64 copy of the model), with the tolerance of the model's dtype.
The kept BNs run the inference kernel (through the interpreter on CPU).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import kernels
from helpers import TOL, assert_close, f64


def randomize_bn_(bn, var_scale=1.0):
    """Random running statistics and affine parameters (in place): nothing is the identity."""
    with torch.no_grad():
        C = bn.num_features
        bn.running_mean.copy_(torch.randn(C))
        bn.running_var.copy_((torch.rand(C) * 1.5 + 0.25) * var_scale)
        if bn.affine:
            bn.weight.copy_(torch.randn(C))
            bn.bias.copy_(torch.randn(C))
    return bn


def model_bns_(model):
    """Randomize every BN with running statistics in `model`; return it."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.running_mean is not None:
            randomize_bn_(m)
    return model


def reference(model, *inputs):
    """The original model's eval output, computed in float64 on a copy."""
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return ref(*(f64(x) for x in inputs))


def snapshot(model):
    """Everything fold_* must not change: state, requires_grad, training flags, module types."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()},
            [(n, type(m), m.training) for n, m in model.named_modules()])


def assert_same_snapshot(before, after):
    state_b, grad_b, mods_b = before
    state_a, grad_a, mods_a = after
    assert state_b.keys() == state_a.keys()
    for k in state_b:
        assert torch.equal(state_b[k], state_a[k]), f"{k} was modified"
    assert grad_b == grad_a and mods_b == mods_a


# ---------------------------------------------------------------------------------------------
# fold_conv_bn

# (label, conv factory, BN class, input shape)
FOLD_CASES = [
    ("conv1d", lambda: nn.Conv1d(4, 6, 3), nn.BatchNorm1d, (2, 4, 9)),
    ("conv2d groups=2 stride dilation reflect",
     lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect"),
     nn.BatchNorm2d, (2, 4, 9, 7)),
    ("conv2d depthwise, no bias",
     lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d, (2, 4, 5, 7)),
    ("conv3d no bias", lambda: nn.Conv3d(2, 3, 2, bias=False), nn.BatchNorm3d, (1, 2, 4, 5, 3)),
    ("convT1d in==out", lambda: nn.ConvTranspose1d(4, 4, 3, stride=2), nn.BatchNorm1d, (2, 4, 5)),
    ("convT2d in==out groups=1", lambda: nn.ConvTranspose2d(4, 4, 3), nn.BatchNorm2d, (2, 4, 5, 3)),
    ("convT2d in!=out groups=2 stride output_padding",
     lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1, groups=2),
     nn.BatchNorm2d, (2, 4, 3, 5)),
    ("convT2d depthwise, no bias", lambda: nn.ConvTranspose2d(4, 4, 3, groups=4, bias=False),
     nn.BatchNorm2d, (2, 4, 3, 5)),
    ("convT3d in!=out groups=2", lambda: nn.ConvTranspose3d(2, 4, 2, groups=2), nn.BatchNorm3d,
     (1, 2, 3, 2, 3)),
    ("linear", lambda: nn.Linear(5, 6), nn.BatchNorm1d, (4, 5)),
]
CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
              "groups", "padding_mode", "output_padding", "in_features", "out_features")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("label,make_conv,bn_cls,shape", FOLD_CASES,
                         ids=[c[0] for c in FOLD_CASES])
def test_fold_conv_bn_matches_bn_of_conv(label, make_conv, bn_cls, shape, affine):
    conv = make_conv()
    C = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    bn = randomize_bn_(bn_cls(C, affine=affine)).eval()
    before = snapshot(nn.ModuleList([conv, bn]))
    had_bias = conv.bias is not None
    x = torch.randn(shape)
    folded = kernels.fold_conv_bn(conv, bn)

    assert type(folded) is type(conv)
    for attr in CONV_ATTRS:
        if hasattr(conv, attr):
            assert getattr(folded, attr) == getattr(conv, attr), attr
    assert folded.weight.dtype == conv.weight.dtype and folded.weight.device == conv.weight.device
    assert folded.bias is not None and folded.bias.dtype == conv.weight.dtype
    ref = reference(nn.Sequential(conv, bn), x)
    assert_close(folded(x), ref, torch.float32, label)
    # the inputs are untouched
    assert_same_snapshot(before, snapshot(nn.ModuleList([conv, bn])))
    assert (conv.bias is not None) == had_bias


def test_fold_double_model_stays_double():
    conv = nn.Conv2d(3, 4, 3, padding=1, groups=1).double()
    bn = randomize_bn_(nn.BatchNorm2d(4)).double().eval()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    folded = kernels.fold_conv_bn(conv, bn)
    assert folded.weight.dtype == folded.bias.dtype == torch.float64
    assert_close(folded(x), reference(nn.Sequential(conv, bn), x), torch.float64, "double")


@pytest.mark.parametrize("weight_grad,bias", [(True, True), (False, True), (False, False)])
def test_fold_keeps_requires_grad(weight_grad, bias):
    conv = nn.Conv2d(3, 4, 3, bias=bias)
    conv.weight.requires_grad_(weight_grad)
    bn = randomize_bn_(nn.BatchNorm2d(4)).eval()
    folded = kernels.fold_conv_bn(conv, bn)
    assert folded.weight.requires_grad == weight_grad
    assert folded.bias.requires_grad == (conv.bias.requires_grad if bias else weight_grad)
    assert folded.weight is not conv.weight


def test_fold_extreme_statistics_fp16_weights_stay_finite():
    """running_var near 0 and above 65504 (fp16's max): the fold happens in float64."""
    conv = nn.Conv2d(3, 4, 3, padding=1).half()
    bn = nn.BatchNorm2d(4, eps=1e-5).eval()  # fp32 statistics, as mixed-precision models keep
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([1e-12, 7e4, 1e6, 1.0]))
        bn.running_mean.copy_(torch.randn(4) * bn.running_var.sqrt())
        bn.weight.copy_(torch.rand(4) + 0.5)
        bn.bias.copy_(torch.randn(4))
    x = torch.randn(2, 3, 5, 6).half()
    folded = kernels.fold_conv_bn(conv, bn)
    assert folded.weight.dtype == torch.float16
    # the folded parameters are the exact ones rounded once to fp16
    s = f64(bn.weight) / (f64(bn.running_var) + bn.eps).sqrt()
    w_exact = f64(conv.weight) * s.view(-1, 1, 1, 1)
    b_exact = (f64(conv.bias) - f64(bn.running_mean)) * s + f64(bn.bias)
    assert_close(folded.weight, w_exact, torch.float16, "folded weight")
    assert_close(folded.bias, b_exact, torch.float16, "folded bias")
    y = folded(x)
    assert torch.isfinite(y).all()
    # output: a sum of K products, so the fp16 tolerance applies to the sum of their magnitudes
    ref = reference(nn.Sequential(conv, bn), x)
    magnitude = F.conv2d(f64(x).abs(), w_exact.abs(), b_exact.abs(), padding=1)
    err = (y.double() - ref).abs()
    tol = TOL[torch.float16]
    assert (err <= tol["atol"] + tol["rtol"] * magnitude).all(), f"max error {err.max()}"


def test_fold_refuses_training_bn_and_missing_stats():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="training mode"):
        kernels.fold_conv_bn(conv, nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="no running statistics"):
        kernels.fold_conv_bn(conv, nn.BatchNorm2d(4, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="3 channels but the Conv2d has 4"):
        kernels.fold_conv_bn(conv, nn.BatchNorm2d(3).eval())
    with pytest.raises(TypeError, match="Conv1d/2d/3d"):
        kernels.fold_conv_bn(nn.ReLU(), nn.BatchNorm2d(4).eval())


# ---------------------------------------------------------------------------------------------
# BatchNormInference

@pytest.mark.parametrize("shape,channels_last", [
    ((4, 5), False),  # BatchNorm1d (N, C)
    ((2, 5, 7), False),  # BatchNorm1d (N, C, L)
    ((3, 5, 9, 7), False),  # odd sizes, masks everywhere
    ((3, 5, 9, 7), True),
    ((1, 5, 3, 2, 3), False),  # BatchNorm3d
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_batchnorm_inference_matches_torch(shape, channels_last, dtype, activation):
    bn = randomize_bn_(nn.BatchNorm1d(shape[1])).eval()  # fp32 parameters and statistics
    inf = kernels.BatchNormInference.from_batchnorm(bn, activation=activation)
    x = torch.randn(shape).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert kernels.uses_triton(x)  # the Triton kernel (interpreted on CPU), not torch's
    y = inf(x)
    expected = F.batch_norm(f64(x), f64(bn.running_mean), f64(bn.running_var), f64(bn.weight),
                            f64(bn.bias), False, 0.0, bn.eps)
    if activation == "relu":
        expected = expected.relu()
    assert y.dtype == dtype
    assert_close(y, expected, dtype, f"BatchNormInference {shape}")


def test_batchnorm_inference_no_affine_and_frozen_in_train_mode():
    bn = randomize_bn_(nn.BatchNorm2d(5, affine=False)).eval()
    inf = kernels.BatchNormInference.from_batchnorm(bn).train()
    stats = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(3, 5, 4, 3)
    expected = F.batch_norm(f64(x), f64(bn.running_mean), f64(bn.running_var), eps=bn.eps)
    assert_close(inf(x), expected, torch.float32, "no affine, train mode")
    assert torch.equal(stats[0], inf.running_mean) and torch.equal(stats[1], inf.running_var)


def test_batchnorm_inference_no_affine_2d_input():
    """(N, C) input takes the channels-last path: weight and bias absent there too."""
    bn = randomize_bn_(nn.BatchNorm1d(5, affine=False)).eval()
    x = torch.randn(4, 5)
    expected = F.batch_norm(f64(x), f64(bn.running_mean), f64(bn.running_var), eps=bn.eps)
    assert_close(kernels.BatchNormInference.from_batchnorm(bn)(x), expected, torch.float32,
                 "no affine, (N, C)")


def test_batchnorm_inference_rejects_bn_without_stats():
    with pytest.raises(ValueError, match="no running statistics"):
        kernels.BatchNormInference.from_batchnorm(nn.BatchNorm2d(3, track_running_stats=False))


# ---------------------------------------------------------------------------------------------
# fold_batchnorm: models

class BasicBlock(nn.Module):
    """ResNet basic block.  Registration order (conv1, bn2, conv2, down_bn, down, bn1) pairs
    every conv with the wrong BN of the same size: only the dataflow pairs them right."""

    def __init__(self, c=4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(c)
        self.down = nn.Conv2d(c, c, 1, stride=2, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.down_bn(self.down(x)))


class Lambda(nn.Module):
    """A model whose forward is `fn(self, x)`: the tests' small graphs."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            self.add_module(name, m)

    def forward(self, x):
        return self.fn(self, x)


def record(report, bn):
    return next(r for r in report.records if r.bn == bn)


def fold_and_check(model, x, label):
    """fold_batchnorm(model) must equal the original's eval output; returns (folded, report)."""
    model_bns_(model)
    folded = kernels.fold_batchnorm(model)
    assert not folded.training
    with torch.no_grad():
        y = folded(x)
    assert_close(y, reference(model, x), torch.float32, label)
    return folded, folded.fold_report


@pytest.mark.quick
def test_resnet_block_pairs_by_dataflow():
    folded, report = fold_and_check(BasicBlock(), torch.randn(2, 4, 7, 5), "basic block")
    assert report.method == "fx"
    assert {(r.bn, r.conv) for r in report.folded} == {
        ("bn1", "conv1"), ("bn2", "conv2"), ("down_bn", "down")}
    assert report.kept == []
    assert not any(isinstance(m, (_BatchNorm, kernels.BatchNormInference))
                   for m in folded.modules())
    assert not any(k.startswith(("bn1.", "bn2.", "down_bn.")) for k in folded.state_dict())
    assert isinstance(folded.relu, nn.ReLU)  # called twice, once after an add: not fused


@pytest.mark.quick
def test_conv_called_twice_is_not_folded():
    model = Lambda(lambda m, x: m.bn(m.conv(x)) + m.conv(x.flip(-1)),
                   conv=nn.Conv2d(3, 4, 3, padding=1), bn=nn.BatchNorm2d(4))
    folded, report = fold_and_check(model, torch.randn(2, 3, 5, 4), "conv called twice")
    assert record(report, "bn").action == "inference"
    assert "called 2 times" in record(report, "bn").reason
    assert torch.equal(folded.conv.weight, model.conv.weight)
    assert isinstance(folded.bn, kernels.BatchNormInference)


def test_conv_output_fanning_out_is_not_folded():
    def fn(m, x):
        c = m.conv(x)
        return m.bn(c) * c
    model = Lambda(fn, conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4))
    _, report = fold_and_check(model, torch.randn(2, 3, 5, 6), "fan-out")
    assert record(report, "bn").action == "inference"
    assert "also feeds other nodes" in record(report, "bn").reason


def test_bn_before_padded_conv_is_kept():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1))
    folded, report = fold_and_check(model, torch.randn(2, 3, 5, 4), "BN before padded conv")
    assert record(report, "0").action == "inference"
    assert "not a conv's output" in record(report, "0").reason
    assert isinstance(folded[0], kernels.BatchNormInference)


def test_bn_shared_by_two_convs_is_not_folded():
    model = Lambda(lambda m, x: m.bn(m.a(x)) + m.bn(m.b(x)),
                   a=nn.Conv2d(3, 4, 3), b=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4))
    _, report = fold_and_check(model, torch.randn(1, 3, 4, 5), "shared BN")
    assert record(report, "bn").action == "inference"


def test_bn_without_running_stats_keeps_batch_statistics():
    model = Lambda(lambda m, x: (m.relu(m.bn2d(m.conv(x))), m.bn1d(m.lin(x.flatten(1)))),
                   conv=nn.Conv2d(3, 4, 3),
                   bn2d=nn.BatchNorm2d(4, track_running_stats=False),
                   relu=nn.ReLU(), lin=nn.Linear(3 * 5 * 4, 6),
                   bn1d=nn.BatchNorm1d(6, track_running_stats=False))
    model_bns_(model)
    x = torch.randn(3, 3, 5, 4)
    folded = kernels.fold_batchnorm(model)
    ref = reference(model, x)
    with torch.no_grad():
        y = folded(x)
    for i, what in enumerate(("conv -> BN2d -> ReLU", "linear -> BN1d")):
        assert_close(y[i], ref[i], torch.float32, f"batch statistics, {what}")
    report = folded.fold_report
    assert record(report, "bn2d").action == "batch_stats"
    assert record(report, "bn2d").relu == "relu"
    assert type(folded.bn2d) is kernels.BatchNorm2d and folded.bn2d.activation == "relu"
    assert folded.bn2d.running_mean is None
    assert record(report, "bn1d").action == "unchanged"
    assert type(folded.bn1d) is nn.BatchNorm1d


def test_conv_bn_relu_and_kept_bn_relu_fusion():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1),
                          nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    folded, report = fold_and_check(model, torch.randn(2, 3, 5, 4), "conv-bn-relu")
    assert record(report, "3").action == "folded" and record(report, "3").conv == "2"
    assert isinstance(folded[4], nn.ReLU)  # the folded BN's ReLU stays
    assert record(report, "0").action == "inference" and record(report, "0").relu == "1"
    assert folded[0].activation == "relu" and isinstance(folded[1], nn.Identity)


def test_sequential_called_twice_folds():
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model = Lambda(lambda m, x: m.trunk(x) + m.trunk(x.flip(-1)), trunk=trunk)
    folded, report = fold_and_check(model, torch.randn(2, 3, 5, 4), "siamese")
    assert [(r.bn, r.conv) for r in report.folded] == [("trunk.1", "trunk.0")]


def test_kernels_modules_are_traced_as_leaves():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), kernels.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                          kernels.BatchNorm2d(4, activation="relu"))
    folded, report = fold_and_check(model, torch.randn(2, 3, 5, 4), "kernels.BatchNorm2d")
    assert report.method == "fx"
    assert record(report, "1").action == "folded"
    assert record(report, "3").action == "inference" and folded[3].activation == "relu"


def test_bn_with_hook_is_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    seen = []
    model[1].register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    folded, report = fold_and_check(model, torch.randn(1, 3, 4, 4), "hooked BN")
    assert record(report, "1").action == "unchanged" and seen


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """A subclass with its own forward: not a BatchNorm the fold knows."""

    def forward(self, x):
        return super().forward(x) * 2


class MyFrozenBatchNorm(nn.Module):
    """Named like a BatchNorm, with running statistics: an unknown variant."""

    def __init__(self, C):
        super().__init__()
        self.register_buffer("running_mean", torch.randn(C))
        self.register_buffer("running_var", torch.rand(C) + 0.5)

    def forward(self, x):
        return (x - self.running_mean[:, None, None]) / self.running_var[:, None, None].sqrt()


@pytest.mark.parametrize("traced", [True, False], ids=["fx", "sequential"])
def test_unknown_batchnorm_variants_are_listed_with_reasons(traced):
    """BatchNorm subclasses and unknown BatchNorm-like classes after a conv are left as they
    are, and fold_report lists each with why (they used to be left out silently)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ScaledBatchNorm2d(4), nn.Conv2d(4, 4, 1),
                          MyFrozenBatchNorm(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    if not traced:
        model = nn.Sequential(model, Lambda(lambda m, x: x if x.sum() > 0 else -x))
    folded, report = fold_and_check(model, torch.randn(2, 3, 6, 5), "unknown variants")
    assert report.method == ("fx" if traced else "sequential")
    prefix = "" if traced else "0."
    for bn, cls in (("1", "ScaledBatchNorm2d"), ("3", "MyFrozenBatchNorm")):
        r = record(report, prefix + bn)
        assert r.action == "unchanged" and "unknown BatchNorm variant" in r.reason, r
        assert cls in r.reason
    assert record(report, prefix + "5").action == "folded"
    inner = folded if traced else folded[0]
    assert type(inner[1]) is ScaledBatchNorm2d and type(inner[3]) is MyFrozenBatchNorm
    with pytest.raises(TypeError, match="ScaledBatchNorm2d"):
        kernels.fold_conv_bn(nn.Conv2d(3, 4, 1), ScaledBatchNorm2d(4).eval())


class Untraceable(nn.Module):
    """Control flow on a tensor's value: fx cannot trace it, the Sequential walk folds."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                                      nn.BatchNorm2d(4))
        self.head_bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.features(x)
        if y.sum() > 0:
            y = -y
        return self.head_bn(y)


def test_untraceable_model_walks_sequentials():
    folded, report = fold_and_check(Untraceable(), torch.randn(2, 3, 6, 5), "untraceable")
    assert report.method == "sequential" and report.trace_error
    assert {(r.bn, r.conv) for r in report.folded} == {
        ("features.1", "features.0"), ("features.4", "features.3")}
    assert record(report, "head_bn").action == "inference"


@pytest.mark.parametrize("make_model,shape", [
    (lambda: nn.Sequential(BasicBlock(), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1),
                           nn.BatchNorm2d(5, track_running_stats=False)), (2, 4, 7, 6)),
    (Untraceable, (2, 3, 6, 5)),
], ids=["fx", "sequential"])
def test_fold_twice_changes_nothing_more(make_model, shape):
    model = make_model()
    x = torch.randn(shape)
    once, _ = fold_and_check(model, x, "fold once")
    twice = kernels.fold_batchnorm(once)
    assert twice.fold_report.folded == []
    assert [type(m) for m in once.modules()] == [type(m) for m in twice.modules()]
    s1, s2 = once.state_dict(), twice.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    with torch.no_grad():
        assert torch.equal(once(x), twice(x))


def test_original_untouched_unless_inplace():
    model = model_bns_(BasicBlock())  # in training mode
    before = snapshot(model)
    folded = kernels.fold_batchnorm(model)
    assert folded is not model
    assert_same_snapshot(before, snapshot(model))
    assert model.training and isinstance(model.bn1, nn.BatchNorm2d)
    x = torch.randn(1, 4, 5, 5)
    ref = reference(model, x)
    same = kernels.fold_batchnorm(model, inplace=True)
    assert same is model and isinstance(model.bn1, nn.Identity) and not model.training
    with torch.no_grad():
        assert_close(model(x), ref, torch.float32, "inplace")
