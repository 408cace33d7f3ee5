"""PyTorch's own test database, with the kernels substituted (issue 9).

The BatchNorm entries of torch's ``module_db`` (nn.BatchNorm1d/2d/3d) and ``op_db``
(nn.functional.batch_norm, both variants) are run through the checks torch applies to
them: forward against torch (train and eval, running stats and num_batches_tracked),
gradients (gradcheck), gradgrad (gradgradcheck), forward AD, non-contiguous samples and
error inputs.  Float64 on CPU, the kernels through Triton's interpreter; gradcheck in
fast mode (random projections) keeps the interpreted calls few.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import kernels
from helpers import assert_close

common_modules = pytest.importorskip(
    "torch.testing._internal.common_modules", reason="torch's test database needs expecttest "
    "(in the test extra)")
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_utils import noncontiguous_like  # noqa: E402

# importing torch's test utilities calls torch.backends.disable_global_flags(), after which
# setting torch.backends.cudnn flags raises; the harness tests in the same worker set them
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
assert not torch.backends.flags_frozen()

OURS = {torch.nn.BatchNorm1d: kernels.BatchNorm1d, torch.nn.BatchNorm2d: kernels.BatchNorm2d,
        torch.nn.BatchNorm3d: kernels.BatchNorm3d}
MODULES = [m for m in common_modules.module_db if m.module_cls in OURS]
OPS = [o for o in op_db if o.name == "nn.functional.batch_norm"]
DT = torch.float64


def _module_cases():
    for info in MODULES:
        for training in (True, False):
            inputs = info.module_inputs_func(info, device="cpu", dtype=DT, requires_grad=True,
                                             training=training)
            for i, case in enumerate(inputs):
                name = f"{info.name}-{case.desc or i}-{'train' if training else 'eval'}"
                yield pytest.param(info, case, training, id=name)


def _pair(info, case, training):
    """torch's module and ours, same constructor and the same (randomised) state."""
    ctor = case.constructor_input
    ref = info.module_cls(*ctor.args, **ctor.kwargs).to(DT).train(training)
    ours = OURS[info.module_cls](*ctor.args, **ctor.kwargs).to(DT).train(training)
    with torch.no_grad():
        for t in list(ref.parameters()) + [b for b in ref.buffers() if b.is_floating_point()]:
            t.uniform_(0.5, 1.5)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _forward_both(ref, ours, x):
    y_ref, y = ref(x), ours(x)
    assert_close(y, y_ref, DT, "y")
    for key, value in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value) if value.dtype == torch.long \
            else torch.allclose(ours.state_dict()[key], value, atol=1e-9, rtol=1e-9), key


@pytest.mark.parametrize("info, case, training", list(_module_cases()))
def test_module_db(info, case, training):
    ref, ours = _pair(info, case, training)
    (x,) = case.forward_input.args
    # forward, twice (state carried), and a non-contiguous copy of the input
    _forward_both(ref, ours, x)
    _forward_both(ref, ours, noncontiguous_like(x.detach()).requires_grad_())
    if x.numel() > 0:  # an empty batch has nothing to differentiate
        _check_module_grads(ours, x)


def _check_module_grads(ours, x):
    params = {k: v.detach().requires_grad_() for k, v in ours.named_parameters()}
    names = list(params)

    def f(x, *p):  # buffers copied per call: gradcheck calls many times
        buffers = {k: v.clone() for k, v in ours.named_buffers()}
        return functional_call(ours, ({**dict(zip(names, p)), **buffers}), (x,))

    inputs = (x.detach().requires_grad_(), *params.values())
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("info", MODULES, ids=[m.name for m in MODULES])
def test_module_db_error_inputs(info):
    for err in info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                             requires_grad=False, training=True):
        case = err.module_error_input
        ctor = case.constructor_input
        module = OURS[info.module_cls](*ctor.args, **ctor.kwargs)
        before = copy.deepcopy(module.state_dict())
        with pytest.raises(err.error_type, match=err.error_regex):
            module(*case.forward_input.args)
        for key, value in module.state_dict().items():
            assert torch.equal(value, before[key]), f"{key} changed by a refused call"


def _op_cases():
    for op in OPS:
        for i, sample in enumerate(op.sample_inputs("cpu", DT, requires_grad=True)):
            yield pytest.param(op, sample, id=f"{op.variant_test_name or 'default'}-{i}")


@pytest.mark.parametrize("op, sample", list(_op_cases()))
def test_op_db(op, sample):
    x = sample.input
    rm, rv, w, b = sample.args
    kw = sample.kwargs

    def call(fn, x, rm, rv, w=None, b=None):
        return fn(x, rm, rv, w, b, **kw)

    state = [t.detach().clone() if t is not None else None for t in (rm, rv)]
    ref_state = [t.detach().clone() if t is not None else None for t in (rm, rv)]
    y = call(kernels.batch_norm, x, *state, w, b)
    y_ref = call(F.batch_norm, x, *ref_state, w, b)
    assert_close(y, y_ref, DT, "y")  # reference comparison
    for ours, ref, what in zip(state, ref_state, ("running_mean", "running_var")):
        if ref is not None:
            assert_close(ours, ref, DT, what)
    nc = [noncontiguous_like(t.detach()) if t is not None else None for t in (x, w, b)]
    nc_state = [noncontiguous_like(t.detach()) if t is not None else None for t in (rm, rv)]
    assert_close(call(kernels.batch_norm, nc[0], *nc_state, nc[1], nc[2]), y_ref, DT,
                 "non-contiguous sample")
    if x.numel() > 0:  # an empty input has nothing to differentiate
        _check_op_grads(op, call, x, rm, rv, w, b)


def _check_op_grads(op, call, x, rm, rv, w, b):
    def f(x, w=None, b=None):
        return call(kernels.batch_norm, x, *[t.clone() if t is not None else None
                                             for t in (rm, rv)], w, b)

    inputs = tuple(t.detach().requires_grad_() if t is not None else None for t in (x, w, b))
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=op.supports_forward_ad,
                                    fast_mode=True)
    if op.supports_gradgrad:
        assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)
