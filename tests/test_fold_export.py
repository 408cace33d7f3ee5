"""fold_batchnorm(ExportedProgram): BatchNorm nodes folded into the conv / linear weights.

Eval-mode models exported in the default (training) IR and in the inference IR
(run_decompositions); float64, relative error <= 1e-12 against the original program;
save/load; what cannot fold is kept with its reason.
"""

import io

import pytest
import torch
from torch import nn

import kernels
from kernels.fold_export import batchnorm_nodes, fold_exported_program_report


def randomized(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                C = m.num_features
                m.running_mean.copy_(torch.randn(C, dtype=m.running_mean.dtype))
                m.running_var.copy_(torch.rand(C, dtype=m.running_var.dtype) + 0.25)
                if m.affine:
                    m.weight.copy_(torch.randn(C, dtype=m.weight.dtype))
                    m.bias.copy_(torch.randn(C, dtype=m.bias.dtype))
    return model.eval()


class Net(nn.Module):
    """Every layer kind, with and without bias, an affine-less BN, and one BN that cannot fold."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.t1 = nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2)
        self.b2 = nn.BatchNorm2d(6, affine=False)
        self.c3 = nn.Conv1d(6, 5, 1)
        self.b3 = nn.BatchNorm1d(5)
        self.l4 = nn.Linear(5, 7, bias=False)
        self.b4 = nn.BatchNorm1d(7)
        self.b5 = nn.BatchNorm1d(7)  # after a ReLU: kept

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.t1(y))
        y = self.b3(self.c3(y.flatten(2))).mean(-1)
        return self.b5(torch.relu(self.b4(self.l4(y))))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("ir", ["training", "inference"])
def test_exported_program_folds_exactly(ir):
    model = randomized(Net().double())
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    ep = torch.export.export(model, (x,))
    if ir == "inference":
        ep = ep.run_decompositions()
    folded, records = fold_exported_program_report(ep)
    assert [r.action for r in records] == ["folded"] * 4 + ["kept"], records
    assert len(batchnorm_nodes(folded)) == 1 and len(batchnorm_nodes(ep)) == 5
    assert isinstance(kernels.fold_batchnorm(ep), torch.export.ExportedProgram)
    with torch.no_grad():
        expected = model(x)
        assert rel_err(ep.module()(x), expected) <= 1e-12
        assert rel_err(folded.module()(x), expected) <= 1e-12
    # the user signature is unchanged; the folded BNs' own state is gone
    user = lambda p: [s for s in p.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert [s.arg.name for s in user(folded)] == [s.arg.name for s in user(ep)]
    assert folded.graph_signature.output_specs == ep.graph_signature.output_specs
    assert "b1.running_var" not in folded.state_dict and "b5.running_var" in folded.state_dict
    buf = io.BytesIO()
    torch.export.save(folded, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    with torch.no_grad():
        assert rel_err(loaded.module()(x), expected) <= 1e-12


def test_training_mode_program_is_kept():
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    ep = torch.export.export(model, (torch.randn(2, 3, 5, 5),))
    folded, records = fold_exported_program_report(ep)
    assert [r.action for r in records] == ["kept"] and "training" in records[0].reason
    assert len(batchnorm_nodes(folded)) == 1


def test_shared_conv_output_is_kept():
    class Fan(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.c(x)
            return self.b(y) + y

    ep = torch.export.export(randomized(Fan()), (torch.randn(1, 3, 4, 4),))
    _, records = fold_exported_program_report(ep)
    assert records[0].action == "kept" and "other nodes" in records[0].reason
