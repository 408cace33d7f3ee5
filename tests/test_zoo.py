"""Real model zoos (timm, torchvision): folding and conversion of their BatchNorm variants.

Random init with every BatchNorm's statistics and affine parameters randomised
(bnbench.zoo.randomise_batchnorms), tiny inputs.  Folding: float64, exact to 1e-12
relative with every conv-following BN folded.  Conversion: float32 on the Triton
kernels (the interpreter on CPU) against the float64 original, eval and train, within
float32's tolerance (tests/helpers.py) relative to the output's scale; the running
statistics of a training step too.  `bnbench zoo` runs the larger sweep.

timm and torchvision are test dependencies; torchvision's Python model code is used
beside a CPU-only torch through bnbench.zoo.import_zoo_libraries (its C extension does
not load there: see that module).
"""

import copy
import os
from collections import Counter

import pytest
import torch
from torch import nn

import kernels
from bnbench import zoo as zoo_cli
from helpers import TOL, assert_close


@pytest.fixture(scope="module")
def libs():
    """(timm, torchvision); in CI (CI set) a missing one fails instead of skipping."""
    try:
        return zoo_cli.import_zoo_libraries()
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"timm/torchvision missing from the test extra: {e}")
        pytest.skip(f"timm/torchvision not installed (pip install -e '.[test]'): {e}")


def build(libs, name):
    timm, torchvision = libs
    builders = {
        "timm test_efficientnet": lambda: timm.create_model("test_efficientnet"),
        "timm test_byobnet": lambda: timm.create_model("test_byobnet"),
        "timm mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050"),
        "timm regnety_002": lambda: timm.create_model("regnety_002"),
        "timm frozen test_efficientnet": lambda: timm.layers.freeze_batch_norm_2d(
            timm.create_model("test_efficientnet")),
        "torchvision resnet18": lambda: torchvision.models.resnet18(),
        "torchvision mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(),
        "torchvision frozen resnet18": lambda: torchvision.models.resnet18(
            norm_layer=torchvision.ops.misc.FrozenBatchNorm2d),
    }
    torch.manual_seed(0)
    return zoo_cli.randomise_batchnorms(builders[name]())


def zoo_classes(model):
    """Counter of the zoo BatchNorm classes in `model`."""
    from kernels.zoo import zoo_batchnorm

    return Counter(zb.cls.rsplit(".", 1)[1] for m in model.modules()
                   if (zb := zoo_batchnorm(m)) is not None)


FOLD_MODELS = ["timm test_efficientnet", "timm mobilenetv3_small_050", "timm regnety_002",
               "timm frozen test_efficientnet", "torchvision resnet18",
               "torchvision mobilenet_v3_small", "torchvision frozen resnet18"]


@pytest.mark.parametrize("name", FOLD_MODELS)
def test_fold_zoo_model_exactly(libs, name):
    model = build(libs, name)
    before = zoo_classes(model)
    acts = Counter(type(m).__name__ for m in model.modules()
                   if isinstance(m, (nn.ReLU, nn.SiLU, nn.Hardswish)))
    res = zoo_cli.fold_check(model)
    assert res["fold_rel_err"] <= 1e-12, f"{name}: relative error {res['fold_rel_err']:.2e}"
    # these networks have a conv before every BatchNorm: all fold, none is kept
    report = res["folded_model"].fold_report
    assert res["bns"] > 10 and res["folded"] == res["bns"], str(report)
    assert res["bns"] == sum(before.values()) or not before
    folded = res["folded_model"]
    assert not zoo_classes(folded), "a zoo BatchNorm is left in the folded model"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    # the activations stay, as modules after the folded convs
    assert Counter(type(m).__name__ for m in folded.modules()
                   if isinstance(m, (nn.ReLU, nn.SiLU, nn.Hardswish))) == acts


def _scaled(y, scale):
    return zoo_cli.flat_output(y).double() / scale


# the interpreter takes seconds per model: the smallest ones, a case per zoo class (ReLU,
# Hardswish, drop and train mode of the frozen classes: test_convert_zoo_module below)
CONVERT_CASES = [
    ("timm test_efficientnet", "eval"), ("timm test_efficientnet", "train"),  # SiLU, fused
    ("timm frozen test_efficientnet", "eval"),  # FrozenBatchNormAct2d (SiLU)
    ("torchvision frozen resnet18", "eval"),  # FrozenBatchNorm2d
]


@pytest.mark.parametrize("name, mode", CONVERT_CASES)
def test_convert_zoo_model_on_the_kernels(libs, name, mode, device):
    """convert_batchnorm replaces every zoo BatchNorm; outputs to float32 tolerance (relative
    to the output's scale) against the float64 original, on the kernels (compiled on a GPU,
    through the interpreter on CPU)."""
    assert kernels.uses_triton(torch.empty(0, device=device)), "the kernels would not run"
    model = build(libs, name)
    n_zoo = sum(zoo_classes(model).values())
    kernels.set_interpreter_plans(True)
    try:
        res = zoo_cli.convert_check(model, mode, device=device)
    finally:
        kernels.set_interpreter_plans(False)
    converted = res["model"]
    assert not zoo_classes(converted), "a zoo BatchNorm was left unconverted"
    assert res["converted"] == n_zoo
    kinds = Counter(type(m).__name__ for m in converted.modules()
                    if isinstance(m, (kernels.BatchNorm2d, kernels.BatchNormInference)))
    assert sum(kinds.values()) == n_zoo, kinds
    if "frozen" in name:
        assert set(kinds) == {"BatchNormInference"}
    assert res[f"convert_{mode}_rel_err"] <= TOL[torch.float32]["rtol"], res
    assert res[f"convert_{mode}_rel_err"] <= 3 * res[f"torch_{mode}_rel_err"] + 1e-6, res
    if "test_efficientnet" in name and "frozen" not in name:
        silu = [m for m in converted.modules() if getattr(m, "activation", None) == "silu"]
        assert silu, "no BatchNormAct2d(SiLU) became a kernels.BatchNorm2d(activation='silu')"
    if mode == "train":  # the step updated the running statistics as timm's modules do
        bn_ref = [m for m in res["reference"].modules() if isinstance(m, nn.BatchNorm2d)]
        bn_conv = [m for m in converted.modules() if isinstance(m, kernels.BatchNorm2d)]
        assert len(bn_ref) == len(bn_conv) == n_zoo
        for i, (a, b) in enumerate(zip(bn_conv, bn_ref)):
            assert_close(a.running_mean, b.running_mean, torch.float32, f"BN {i} running_mean")
            assert_close(a.running_var, b.running_var, torch.float32, f"BN {i} running_var")
            assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1


# ---------------------------------------------------------------------------------------------
# the contracts, one module at a time

def _bn_act(libs, act_layer=nn.SiLU, **kw):
    timm, _ = libs
    m = timm.layers.BatchNormAct2d(5, act_layer=act_layer, **kw)
    return zoo_cli.randomise_batchnorms(m).double()


def test_recognised_by_contract(libs):
    timm, torchvision = libs
    from kernels.zoo import unknown_batchnorm_reason, zoo_batchnorm

    cases = {
        "BatchNormAct2d": (timm.layers.BatchNormAct2d(4), "bn_act"),
        "SyncBatchNormAct": (timm.layers.norm_act.SyncBatchNormAct(4), "bn_act"),
        "FrozenBatchNormAct2d": (timm.layers.norm_act.FrozenBatchNormAct2d(4), "frozen_act"),
        "FrozenBatchNorm2d": (torchvision.ops.misc.FrozenBatchNorm2d(4), "frozen"),
    }
    for name, (m, kind) in cases.items():
        zb = zoo_batchnorm(m)
        assert zb is not None and zb.kind == kind and zb.num_features == 4, name
        assert unknown_batchnorm_reason(m) is None

    class KeepsForward(timm.layers.BatchNormAct2d):  # a subclass that keeps the contract
        pass

    class OwnForward(timm.layers.BatchNormAct2d):
        def forward(self, x):
            return super().forward(x) * 2

    assert zoo_batchnorm(KeepsForward(4)).kind == "bn_act"
    assert zoo_batchnorm(OwnForward(4)) is None
    assert "unknown BatchNorm variant" in unknown_batchnorm_reason(OwnForward(4))
    assert zoo_batchnorm(nn.BatchNorm2d(4)) is None and zoo_batchnorm(nn.ReLU()) is None


@pytest.mark.parametrize("act", ["silu", "relu", "hardswish", "identity"])
def test_fold_conv_bn_act(libs, act):
    """fold_conv_bn(conv, BatchNormAct2d): the folded conv then the module's act, exact."""
    layer = {"silu": nn.SiLU, "relu": nn.ReLU, "hardswish": nn.Hardswish,
             "identity": nn.Identity}[act]
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    bn = _bn_act(libs, layer).eval()
    folded = kernels.fold_conv_bn(conv, bn)
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(folded(x), bn(conv(x)), atol=1e-12, rtol=1e-12)
    if act == "identity":
        assert isinstance(folded, nn.Conv2d)
    else:
        assert isinstance(folded, nn.Sequential) and isinstance(folded.act, layer)
        assert folded.act is not bn.act, "fold_conv_bn must not share the BN's modules"
    with pytest.raises(ValueError, match="training mode"):
        kernels.fold_conv_bn(conv, bn.train())


@pytest.mark.parametrize("kind", ["FrozenBatchNorm2d", "FrozenBatchNormAct2d"])
def test_fold_conv_frozen(libs, kind):
    """The frozen modules fold in train mode too (they never use batch statistics)."""
    timm, torchvision = libs
    bn = (torchvision.ops.misc.FrozenBatchNorm2d(5) if kind == "FrozenBatchNorm2d"
          else timm.layers.norm_act.FrozenBatchNormAct2d(5, act_layer=nn.SiLU))
    bn = zoo_cli.randomise_batchnorms(bn).double().train()
    conv = nn.Conv2d(3, 5, 3, stride=2, groups=1).double()
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(kernels.fold_conv_bn(conv, bn)(x), bn(conv(x)),
                               atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="channels"):
        kernels.fold_conv_bn(nn.Conv2d(3, 4, 1).double(), bn)


def test_fold_batchnorm_kept_zoo_bn_and_unknown_variants(libs):
    """A BatchNormAct2d before any conv runs the inference kernel with its SiLU fused; a
    FrozenBatchNorm2d after a pooling too; an unknown subclass is left and listed."""
    timm, torchvision = libs

    class OwnForward(timm.layers.BatchNormAct2d):
        def forward(self, x):
            return super().forward(x) + 1

    model = nn.Sequential(
        timm.layers.BatchNormAct2d(3, act_layer=nn.SiLU),  # input BN: kept
        nn.Conv2d(3, 6, 3, padding=1),
        timm.layers.BatchNormAct2d(6, act_layer=nn.Hardswish),  # folded, Hardswish stays
        nn.MaxPool2d(2),
        torchvision.ops.misc.FrozenBatchNorm2d(6),  # after a pool: kept
        nn.ReLU(),  # fused into the kept frozen BN
        nn.Conv2d(6, 4, 1),
        OwnForward(4),  # unknown: unchanged
    )
    model = zoo_cli.randomise_batchnorms(model).double().eval()
    folded = kernels.fold_batchnorm(model)
    report = folded.fold_report
    actions = {r.bn: r.action for r in report.records}
    assert actions == {"0": "inference", "2": "folded", "4": "inference", "7": "unchanged"}
    reasons = {r.bn: r.reason for r in report.records}
    assert "unknown BatchNorm variant" in reasons["7"] and "OwnForward" in reasons["7"]
    assert "not a conv's output" in reasons["0"]
    assert isinstance(folded[0], kernels.BatchNormInference) and folded[0].activation == "silu"
    assert isinstance(folded[2], nn.Sequential) and isinstance(folded[2].act, nn.Hardswish)
    assert isinstance(folded[4], kernels.BatchNormInference) and folded[4].activation == "relu"
    assert isinstance(folded[5], nn.Identity) and type(folded[7]) is OwnForward
    assert "weight" in dict(folded[4].named_buffers()), "a frozen BN's weight stays a buffer"
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64)
    assert_close(folded(x), model(x), torch.float64, "folded model")


def test_convert_zoo_module_leaves_sync_batchnorm_act(libs):
    """SyncBatchNormAct computes its statistics across processes: left as it is."""
    from kernels.zoo import convert_zoo_module

    mod = libs[0].layers.norm_act.SyncBatchNormAct(5)
    assert convert_zoo_module(mod, stats="two_pass") is None


@pytest.mark.parametrize("case", ["silu", "relu", "hardswish", "drop", "frozen-act",
                                  "frozen-hardswish", "frozen"])
def test_convert_zoo_module(libs, case, device):
    """convert_zoo_module: the exact replacement (fused where the kernels have the
    epilogue), the same tensors and state_dict keys."""
    timm, torchvision = libs
    from kernels.zoo import BatchNormAct2d, BatchNormInferenceAct, convert_zoo_module

    norm_act = timm.layers.norm_act
    mod = {
        "silu": lambda: norm_act.BatchNormAct2d(5, act_layer=nn.SiLU),
        "relu": lambda: norm_act.BatchNormAct2d(5, act_layer=nn.ReLU),
        "hardswish": lambda: norm_act.BatchNormAct2d(5, act_layer=nn.Hardswish),
        "drop": lambda: norm_act.BatchNormAct2d(5, act_layer=nn.SiLU,
                                                drop_layer=lambda: nn.Dropout(0.0)),
        "frozen-act": lambda: norm_act.FrozenBatchNormAct2d(5, act_layer=nn.SiLU),
        "frozen-hardswish": lambda: norm_act.FrozenBatchNormAct2d(5, act_layer=nn.Hardswish),
        "frozen": lambda: torchvision.ops.misc.FrozenBatchNorm2d(5),
    }[case]()
    mod = zoo_cli.randomise_batchnorms(mod).to(device)
    new = convert_zoo_module(mod, stats="two_pass", activation="relu")  # activation ignored
    expected_type = {"silu": kernels.BatchNorm2d, "relu": kernels.BatchNorm2d,
                     "hardswish": BatchNormAct2d, "drop": BatchNormAct2d,
                     "frozen-act": kernels.BatchNormInference,
                     "frozen-hardswish": BatchNormInferenceAct,
                     "frozen": kernels.BatchNormInference}[case]
    assert type(new) is expected_type
    assert sorted(new.state_dict()) == sorted(mod.state_dict())
    assert all(new.state_dict()[k] is v or new.state_dict()[k].data_ptr() == v.data_ptr()
               for k, v in mod.state_dict().items()), "the tensors must be shared, not copied"
    if case in ("silu", "relu"):
        assert new.activation == case and new.stats == "two_pass"
    x = torch.randn(3, 5, 7, 6, device=device)
    for training in (False, True):
        a, b = copy.deepcopy(mod).train(training), copy.deepcopy(new).train(training)
        ref = copy.deepcopy(a).double()
        with torch.no_grad():
            y, y_ref = b(x), ref(x.double())
        assert_close(y, y_ref, torch.float32, f"{case} training={training}")
        if hasattr(ref, "num_batches_tracked") and training:
            assert_close(b.running_mean, ref.running_mean, torch.float32, "running_mean")
            assert_close(b.running_var, ref.running_var, torch.float32, "running_var")
