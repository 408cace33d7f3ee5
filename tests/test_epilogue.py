"""kernels.Epilogue: the one value that names the residual add and activation after the
affine step, from the public API through the custom ops to the kernels' constexprs; and
kernels.torch_batch_norm, the float64 reference with the same epilogue."""

import pytest
import torch
import torch.nn.functional as F

import kernels
import kernels.sync  # noqa: F401 (registers the synchronised ops)
from kernels import Epilogue
from kernels._common import ACT_NONE, ACT_RELU, ACT_SILU
from kernels.backward import bn_backward
from kernels.forward import bn_forward_eval, bn_forward_train

E = Epilogue


@pytest.mark.parametrize("residual, activation, expected", [
    (False, None, E.NONE), (False, "none", E.NONE), (False, False, E.NONE),
    (False, True, E.RELU), (False, "relu", E.RELU), (False, "silu", E.SILU),
    (True, None, E.RESIDUAL), (True, "none", E.RESIDUAL), (True, False, E.RESIDUAL),
    (True, True, E.RESIDUAL_RELU), (True, "relu", E.RESIDUAL_RELU),
    (True, "silu", E.RESIDUAL_SILU),
])
def test_of_every_spelling(residual, activation, expected):
    assert Epilogue.of(residual, activation) is expected


@pytest.mark.parametrize("activation", ["gelu", "RELU", "residual+relu", "residual", 1, 0,
                                        ["relu"], E.RELU])
def test_of_refuses_an_unknown_activation(activation):
    with pytest.raises(ValueError, match=r"activation must be None, 'relu' or 'silu', got"):
        Epilogue.of(False, activation)


def test_members_values_and_properties():
    expected = {  # member: (value, residual, activation, ACTIVATION)
        E.NONE: ("none", False, "none", ACT_NONE.value),
        E.RELU: ("relu", False, "relu", ACT_RELU.value),
        E.SILU: ("silu", False, "silu", ACT_SILU.value),
        E.RESIDUAL: ("residual", True, "none", ACT_NONE.value),
        E.RESIDUAL_RELU: ("residual+relu", True, "relu", ACT_RELU.value),
        E.RESIDUAL_SILU: ("residual+silu", True, "silu", ACT_SILU.value),
    }
    assert set(expected) == set(Epilogue)
    for e, (value, residual, activation, code) in expected.items():
        assert (e.value, e.residual, e.activation, e.ACTIVATION) == (value, residual, activation,
                                                                      code)
        assert Epilogue(value) is e and str(e) == value
        assert Epilogue.of(residual, activation) is e
    with pytest.raises(ValueError):
        Epilogue("relu+residual")


def _tensors(C=3):
    x = torch.randn(2, C, 4, 4)
    return x, torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C)


@pytest.mark.parametrize("epilogue", [e for e in Epilogue if e.residual])
def test_forward_refuses_a_residual_epilogue_without_the_residual(epilogue):
    x, w, b, rm, rv = _tensors()
    with pytest.raises(ValueError, match="adds a residual, but no residual tensor"):
        bn_forward_train(x, w, b, rm, rv, 0.1, 1e-5, epilogue=epilogue)
    with pytest.raises(ValueError, match="adds a residual, but no residual tensor"):
        bn_forward_eval(x, w, b, rm, rv, 1e-5, epilogue=epilogue)
    assert torch.equal(rm, torch.zeros(3)), "refused before any launch"


@pytest.mark.parametrize("epilogue", [e for e in Epilogue if not e.residual])
def test_forward_refuses_a_residual_the_epilogue_does_not_add(epilogue):
    x, w, b, rm, rv = _tensors()
    with pytest.raises(ValueError, match="adds no residual, but a residual tensor"):
        bn_forward_train(x, w, b, rm, rv, 0.1, 1e-5, residual=x.clone(), epilogue=epilogue)
    with pytest.raises(ValueError, match="adds no residual, but a residual tensor"):
        bn_forward_eval(x, w, b, rm, rv, 1e-5, x.clone(), epilogue)
    with pytest.raises(ValueError, match="adds no residual"):
        bn_backward(x, x, x, w, b, rm, rv, training=True, epilogue=epilogue, residual=x)


def test_host_functions_take_an_epilogue_not_a_string():
    x, w, b, rm, rv = _tensors()
    with pytest.raises(TypeError, match="epilogue must be a kernels.Epilogue"):
        bn_forward_train(x, w, b, rm, rv, 0.1, 1e-5, "single_pass", None, "relu")
    with pytest.raises(TypeError, match="epilogue must be a kernels.Epilogue"):
        bn_forward_eval(x, w, b, rm, rv, 1e-5, None, True)
    with pytest.raises(TypeError, match="epilogue must be a kernels.Epilogue"):
        bn_backward(x, x, None, w, b, rm, rv, training=True, epilogue="relu")


def test_backward_needs_what_the_epilogue_reads():
    x, w, b, rm, rv = _tensors()
    with pytest.raises(ValueError, match="needs the forward's output y"):
        bn_backward(x, x, None, w, b, rm, rv, training=True, epilogue=E.RESIDUAL_RELU)
    with pytest.raises(ValueError, match="needs the residual"):
        bn_backward(x, x, None, w, b, rm, rv, training=True, epilogue=E.RESIDUAL_SILU)


@pytest.mark.parametrize("op", ["batch_norm_train", "batch_norm_eval", "batch_norm_backward",
                                "sync_batch_norm_train", "sync_batch_norm_backward"])
def test_op_schemas_carry_the_epilogue_name(op):
    schema = str(getattr(torch.ops.bnbench, op).default._schema)
    assert "str epilogue" in schema, schema
    assert "activation" not in schema and "has_residual" not in schema, schema


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_the_op_is_called_with_the_epilogue_value(monkeypatch, training):
    calls = []
    name = "batch_norm_train" if training else "batch_norm_eval"
    op = getattr(torch.ops.bnbench, name)
    monkeypatch.setattr(kernels.ops.torch.ops.bnbench, name,
                        lambda *a: calls.append(a[-1]) or op(*a), raising=False)
    x, w, b, rm, rv = _tensors()
    with kernels._eager.full_route():  # the ops' route (torch.compile's, torch.func's)
        y = kernels.batch_norm(x, rm, rv, w, b, training, residual=x.clone(), activation="silu")
    if kernels.uses_triton(x):
        assert calls == ["residual+silu"]
    ref = kernels.torch_batch_norm(x.double(), rm.double(), rv.double(), w.double(),
                                   b.double(), training, 0.1, 1e-5, x.double(), "silu")
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", [None, "relu", "silu"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_torch_batch_norm_is_torch_then_the_epilogue(activation, with_residual):
    x, w, b, _, _ = _tensors()
    x = x.double()
    r = torch.randn_like(x) if with_residual else None
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    x_before = x.clone()
    y = kernels.torch_batch_norm(x, rm, rv, w.double(), b.double(), True, 0.1, 1e-5, r,
                                 activation)
    z = F.batch_norm(x, rm2, rv2, w.double(), b.double(), True, 0.1, 1e-5)
    z = z + r if r is not None else z
    z = {"relu": torch.relu, "silu": F.silu}.get(activation, lambda t: t)(z)
    torch.testing.assert_close(y, z, rtol=0, atol=0)
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2), "running stats updated as torch's"
    assert torch.equal(x, x_before), "not in place"
    with pytest.raises(ValueError, match="activation must be"):
        kernels.torch_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, None, "gelu")
