"""Every BatchNorm kind in kernels._kinds folds after every layer it can follow, exactly.

A float64 model with torch's classes is the reference; the model under test is the same
model converted to the kind (the library's modules, SyncBatchNorm), folded; float64
relative error <= 1e-12, and every BN folded.
"""

import copy

import pytest
import torch
from torch import nn

import kernels
from kernels._kinds import FOLD_INTO, KINDS

# (label, layer factory, BN rank, input shape)
LAYERS = [
    ("linear", lambda: nn.Linear(5, 6), 1, (4, 5)),
    ("conv1d", lambda: nn.Conv1d(3, 6, 3), 1, (2, 3, 7)),
    ("convT1d", lambda: nn.ConvTranspose1d(3, 6, 3, stride=2), 1, (2, 3, 5)),
    ("conv2d", lambda: nn.Conv2d(3, 6, 3, groups=3, bias=False), 2, (2, 3, 5, 7)),
    ("convT2d", lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), 2, (2, 4, 3, 5)),
    ("conv3d", lambda: nn.Conv3d(3, 6, 2), 3, (1, 3, 3, 4, 3)),
    ("convT3d", lambda: nn.ConvTranspose3d(3, 6, 2), 3, (1, 3, 2, 3, 2)),
]
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
# how each kind is made from a torch-class model
CONVERT = {
    "torch": lambda m: m,
    "torch sync": nn.SyncBatchNorm.convert_sync_batchnorm,
    "kernels": kernels.convert_batchnorm,
    "kernels sync": kernels.SyncBatchNorm.convert_sync_batchnorm,
}


def randomized(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                C = m.num_features
                m.running_mean.copy_(torch.randn(C, dtype=m.running_mean.dtype))
                m.running_var.copy_(torch.rand(C, dtype=m.running_var.dtype) + 0.25)
                m.weight.copy_(torch.randn(C, dtype=m.weight.dtype))
                m.bias.copy_(torch.randn(C, dtype=m.bias.dtype))
    return model.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind", list(CONVERT))
@pytest.mark.parametrize("label,make,rank,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_every_kind_folds_exactly(kind, label, make, rank, shape):
    model = randomized(nn.Sequential(make(), TORCH_BN[rank](6), nn.ReLU()).double())
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    converted = CONVERT[kind](copy.deepcopy(model)).eval()
    folded = kernels.fold_batchnorm(converted)
    assert [r.action for r in folded.fold_report.records] == ["folded"], str(folded.fold_report)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with torch.no_grad():
        assert rel_err(folded(x), expected) <= 1e-12


def test_timm_conv2d_same_folds():
    from bnbench.zoo import import_zoo_libraries

    timm, _ = import_zoo_libraries()  # timm is in the test extra
    from timm.layers import Conv2dSame

    model = randomized(nn.Sequential(Conv2dSame(3, 6, 3, stride=2), nn.BatchNorm2d(6)).double())
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    folded = kernels.fold_batchnorm(model)
    assert len(folded.fold_report.folded) == 1, str(folded.fold_report)
    assert type(folded[0]) is Conv2dSame
    with torch.no_grad():
        assert rel_err(folded(x), expected) <= 1e-12


def test_table_names_real_classes():
    """Every torch / kernels entry of the table names a class that exists (no typo)."""
    import importlib

    for name in [*KINDS, *FOLD_INTO]:
        module, cls = name.rsplit(".", 1)
        if module.split(".")[0] in ("torch", "kernels"):
            assert hasattr(importlib.import_module(module), cls), name
