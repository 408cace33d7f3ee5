"""Parity of kernels.batch_norm with torch's batch norm, against a float64 reference.

Forward output, input/weight/bias (and residual) gradients, running stats over
two steps; both statistics modes; NCHW, channels_last and strided inputs; all
supported dtypes; training tests on both the general and the single-launch path
(the `path` fixture).  Every allocation is poisoned with NaN (conftest).
"""

import os

import pytest
import torch

import kernels
from bnbench import registry
from helpers import assert_close, f64
from kernels import Epilogue, torch_batch_norm

SHAPES = [
    pytest.param((3, 5, 17, 13), id="3x5x17x13"),  # odd sizes, masks everywhere
    pytest.param((1, 4, 9, 7), id="N1"),  # N=1 with H*W > 1
    pytest.param((7, 6, 1, 1), id="HW1"),  # H=W=1 with N > 1
    pytest.param((4, 3, 33, 5), id="C3"),  # C not a power of two, long odd rows
]
LAYOUTS = ["nchw", "channels_last", "channel_slice", "spatial_stride"]
STATS = list(registry.STATS)
SHORT = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16"}
# (input dtype, parameter dtype): the registry's pairs, matching dtypes and the autocast pattern
DTYPES = [pytest.param((getattr(torch, d), getattr(torch, p)),
                       id=SHORT[d] + ("" if d == p else f"-{SHORT[p]}params"))
          for d, p in registry.DTYPE_PAIRS]
FUSIONS = [e.value for e in Epilogue if e is not Epilogue.NONE]  # every epilogue but none


def make_input(shape, layout, dtype, device, scale=2.0, shift=0.5):
    """Fresh random input in the requested memory layout (values: N(shift, scale^2))."""
    def rand(s):
        return torch.randn(s, device=device, dtype=torch.float64).mul(scale).add(shift).to(dtype)

    if layout == "nchw":
        return rand(shape)
    if layout == "channels_last":  # channels innermost, for any rank
        return rand((shape[0], *shape[2:], shape[1])).movedim(-1, 1)
    if layout == "channel_slice":  # every other channel of a bigger tensor: read in place
        return rand((shape[0], 2 * shape[1], *shape[2:]))[:, ::2]
    if layout == "spatial_stride":  # every other column: copied before the kernels
        return rand((*shape[:-1], 2 * shape[-1]))[..., ::2]
    raise ValueError(layout)


def make_params(C, dtype, device):
    w = torch.rand(C, device=device, dtype=torch.float64).add(0.5).to(dtype)
    b = torch.randn(C, device=device, dtype=torch.float64).to(dtype)
    rm = torch.randn(C, device=device, dtype=torch.float64).to(dtype)
    rv = torch.rand(C, device=device, dtype=torch.float64).add(0.5).to(dtype)
    return w, b, rm, rv


def check_train_step(x, w, b, rm, rv, stats, momentum=0.1, residual=None, activation=None,
                     param_dtype=None):
    """One training step against the float64 reference: y, dx, dw, db, dres, running stats."""
    dtype = x.dtype
    pdtype = param_dtype or dtype
    ref_rm, ref_rv = f64(rm), f64(rv)
    xr, wr, br = f64(x, True), f64(w, True), f64(b, True)
    rr = f64(residual, True)
    y_ref = torch_batch_norm(xr, ref_rm, ref_rv, wr, br, True, momentum, 1e-5, rr, activation)
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_() if w is not None else None
    b = b.detach().requires_grad_() if b is not None else None
    residual = residual.detach().requires_grad_() if residual is not None else None
    y = kernels.batch_norm(x, rm, rv, w, b, True, momentum, 1e-5, stats=stats,
                           residual=residual, activation=activation)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(f64(dy))
    assert_close(x.grad, xr.grad, dtype, "dx")
    if w is not None:
        assert w.grad.dtype == w.dtype
        assert_close(w.grad, wr.grad, pdtype, "dweight")
        assert_close(b.grad, br.grad, pdtype, "dbias")
    if residual is not None:
        assert_close(residual.grad, rr.grad, dtype, "dresidual")
    if rm is not None:
        assert_close(rm, ref_rm, pdtype, "running_mean")
        assert_close(rv, ref_rv, pdtype, "running_var")
    return y


@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_train_fp32_shapes_and_layouts(shape, layout, stats, device, path):
    x = make_input(shape, layout, torch.float32, device)
    w, b, rm, rv = make_params(shape[1], torch.float32, device)
    for _ in range(2):  # two steps: the running stats compound
        y = check_train_step(x, w, b, rm, rv, stats)
        x = make_input(shape, layout, torch.float32, device)
    if layout in ("nchw", "channels_last"):
        assert y.stride() == x.stride(), "output must keep the input's memory format"


@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_train_dtypes(dtypes, layout, stats, device, path):
    dtype, pdtype = dtypes
    shape = (3, 5, 11, 7)
    x = make_input(shape, layout, dtype, device)
    w, b, rm, rv = make_params(shape[1], pdtype, device)
    for _ in range(2):
        check_train_step(x, w, b, rm, rv, stats, param_dtype=pdtype)
        x = make_input(shape, layout, dtype, device)


@pytest.fixture
def float32_scalars(monkeypatch):
    """A float argument reaches a compiled kernel as a float32 scalar; Triton's interpreter
    passes the Python float (float64) through.  Here the interpreter passes float32 scalars,
    as a GPU does (found on the first GPU run: float64 running stats 3e-8 off there, exact
    through the interpreter).  On a GPU the kernels get float32 scalars anyway."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter

        convert = interpreter._implicit_cvt

        def as_on_a_gpu(arg):
            if isinstance(arg, float):
                handle = interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32)
                return tl.tensor(handle, tl.float32)
            return convert(arg)
        monkeypatch.setattr(interpreter, "_implicit_cvt", as_on_a_gpu)
    yield


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("stats", STATS)
def test_float64_running_stats_are_torchs_with_float32_scalar_arguments(
        stats, momentum, device, path, float32_scalars):
    """The running-stat update of float64 in float64 throughout (the count's ratio M/(M-1)
    and the momentum, each a float32 argument): a few float64 operations, so within 1e-12 of
    torch's (the table's 1e-9 would pass a float32 momentum at this size)."""
    C = 3
    x = (torch.randn(5, C, 9, 7, dtype=torch.float64) * 2 + 0.5).to(device)
    ref = torch.nn.BatchNorm2d(C, momentum=momentum).double()
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1), ref.running_var.uniform_(0.5, 1.5)
        ref.num_batches_tracked.fill_(3)
    mine = kernels.BatchNorm2d(C, momentum=momentum, stats=stats).double().to(device)
    mine.load_state_dict(ref.state_dict())
    y, y_ref = mine(x), ref(x.cpu())
    assert_close(y, y_ref, torch.float64, "y")
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(mine, name).cpu(), getattr(ref, name), rtol=1e-12,
                                   atol=1e-14, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("shape", [(6, 7), (5, 3, 10), (2, 3, 5, 4, 3)], ids=["2d", "3d", "5d"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("stats", STATS)
def test_train_other_ranks(shape, layout, stats, device, path):
    """(N, C) as BatchNorm1d, (N, C, L) and (N, C, D, H, W) in both layouts."""
    x = make_input(shape, layout, torch.float32, device)
    w, b, rm, rv = make_params(shape[1], torch.float32, device)
    check_train_step(x, w, b, rm, rv, stats)


@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("running", [True, False])
def test_train_without_affine_or_running_stats(affine, running, layout, stats, device, path):
    x = make_input((3, 5, 9, 7), layout, torch.float32, device)
    w, b, rm, rv = make_params(5, torch.float32, device)
    check_train_step(x, w if affine else None, b if affine else None,
                     rm if running else None, rv if running else None, stats)


@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_train_fusions(fusion, layout, stats, device, path):
    """act(bn(x) + residual) and its gradients, the residual's included (act: relu, silu)."""
    shape = (3, 5, 9, 7)
    epilogue = Epilogue(fusion)
    x = make_input(shape, layout, torch.float32, device, shift=0.0)
    w, b, rm, rv = make_params(5, torch.float32, device)
    residual = make_input(shape, "nchw", torch.float32, device) if epilogue.residual else None
    activation = None if epilogue.activation == "none" else epilogue.activation
    y = check_train_step(x, w, b, rm, rv, stats, residual=residual, activation=activation)
    if activation == "relu":
        assert (y == 0).any() and (y > 0).any(), "the ReLU case must have both signs"
    if activation == "silu":  # silu's minimum is about -0.278, at z = -1.28
        assert (y < -0.1).any() and (y > 1).any(), "the SiLU case must cover both branches"


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_train_fusions_half_residual(dtype, activation, device, path):
    x = make_input((3, 5, 9, 7), "channels_last", dtype, device, shift=0.0)
    w, b, rm, rv = make_params(5, torch.float32, device)
    residual = make_input((3, 5, 9, 7), "channels_last", dtype, device)
    check_train_step(x, w, b, rm, rv, "single_pass", residual=residual, activation=activation,
                     param_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_train_silu_large_values(layout, stats, dtype, device, path):
    """SiLU where sigmoid saturates (|z| past 88, where exp(-z) overflows float32: sigmoid
    is then 0 or 1) stays finite and right, gradients through the saturated branches too:
    biases of +-100 put whole channels there, one channel stays around 0."""
    x = make_input((3, 5, 9, 7), layout, dtype, device, shift=0.0)
    w, _, rm, rv = make_params(5, dtype, device)
    b = torch.tensor([100.0, -100.0, 95.0, -95.0, 0.0], device=device, dtype=dtype)
    y = check_train_step(x, w, b, rm, rv, stats, activation="silu")
    assert y.max() > 88 and y.min() > -0.28 and torch.isfinite(y).all()
    assert (y[:, 1] == 0).all() or (y[:, 1].abs() < 1e-30).all()  # silu(-100) ~ -4e-42


@pytest.mark.parametrize("dtypes", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "spatial_stride"])
@pytest.mark.parametrize("fusion", ["none"] + FUSIONS)
def test_eval(dtypes, layout, fusion, device):
    """Fixed statistics: output and gradients, running stats untouched."""
    dtype, pdtype = dtypes
    shape = (3, 5, 11, 7)
    x = make_input(shape, layout, dtype, device).requires_grad_()
    w, b, rm, rv = make_params(5, pdtype, device)
    w.requires_grad_()
    b.requires_grad_()
    rm0, rv0 = rm.clone(), rv.clone()
    epilogue = Epilogue(fusion)
    residual = (make_input(shape, "nchw", dtype, device).requires_grad_()
                if epilogue.residual else None)
    activation = None if epilogue.activation == "none" else epilogue.activation
    xr, wr, br, rr = f64(x, True), f64(w, True), f64(b, True), f64(residual, True)
    y_ref = torch_batch_norm(xr, f64(rm), f64(rv), wr, br, False, 0.1, 1e-5, rr, activation)
    y = kernels.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5, residual=residual,
                           activation=activation)
    assert_close(y, y_ref, dtype, "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(f64(dy))
    assert_close(x.grad, xr.grad, dtype, "dx")
    assert_close(w.grad, wr.grad, pdtype, "dweight")
    assert_close(b.grad, br.grad, pdtype, "dbias")
    if residual is not None:
        assert_close(residual.grad, rr.grad, dtype, "dresidual")
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0), "eval must not touch running stats"


@pytest.mark.parametrize("stats", STATS)
def test_partial_gradients(stats, device, path):
    """Only some inputs need grad: the others get none, the rest are right."""
    x = make_input((3, 5, 9, 7), "nchw", torch.float32, device)
    w, b, _, _ = make_params(5, torch.float32, device)
    w.requires_grad_()
    y = kernels.batch_norm(x, None, None, w, b, True, stats=stats)
    xr, wr = f64(x), f64(w, True)
    y_ref = torch_batch_norm(xr, None, None, wr, f64(b), True, 0.1, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(f64(dy))
    assert x.grad is None and b.grad is None
    assert_close(w.grad, wr.grad, torch.float32, "dweight")


@pytest.mark.quick
@pytest.mark.parametrize("training", [True, False])
def test_zero_size_batch(training, device):
    """N=0: empty output, zero parameter gradients, running stats unchanged (as torch)."""
    x = torch.randn(0, 5, 4, 3, device=device, requires_grad=True)
    w, b, rm, rv = make_params(5, torch.float32, device)
    w.requires_grad_()
    b.requires_grad_()
    rm0, rv0 = rm.clone(), rv.clone()
    y = kernels.batch_norm(x, rm, rv, w, b, training)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize("shape", [(3, 5, 17, 13), (12, 4, 28, 28)],
                         ids=["single-launch", "general"])
def test_autotuned_kernels_update_running_stats_once(shape, stats, device, monkeypatch):
    """With autotuning on, every trial config runs the kernel that updates the running stats;
    restore_value must leave them updated exactly once per call (two steps checked)."""
    import kernels._tuning as tuning

    trials = []

    def counting_bench(kernel_call, quantiles):
        trials.append(1)
        kernel_call()
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(tuning, "_enabled", True)
    monkeypatch.setattr(tuning, "_tuned", {})
    monkeypatch.setattr(tuning, "_do_bench", counting_bench)
    x = make_input(shape, "nchw", torch.float32, device)
    w, b, rm, rv = make_params(shape[1], torch.float32, device)
    for _ in range(2):
        check_train_step(x, w, b, rm, rv, stats)
        x = make_input(shape, "nchw", torch.float32, device)
    assert len(trials) >= 3, "the autotuner did not benchmark several configurations"


@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize("dtypes", [d for d in DTYPES if d.id in ("fp32", "bf16-fp32params")])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(7, 3, 31, 23), (5, 2, 3, 3)], ids=["general", "single-launch"])
def test_fast_interpreter_plans(shape, layout, dtypes, stats, device):
    """FAST_INTERPRETER_PLANS (bnbench train's plans without a GPU) runs the same kernels in
    few programs with large tiles: same tolerances, and the plan really changes.  The
    general shape's 4,991 elements per channel take several tiles per program when
    fast_tile_elems is lowered to 1024, so the in-program merges run too."""
    from kernels._plan import TARGET_WAVES, plan

    dtype, pdtype = dtypes
    x = make_input(shape, layout, dtype, device)
    gpu_plan = plan(x, layout == "channels_last")
    with kernels.planning(kernels.FAST_INTERPRETER_PLANS, fast_tile_elems=1024):
        fast_plan = plan(x, layout == "channels_last")
        if torch.device(device).type == "cuda":
            assert fast_plan == gpu_plan, "CUDA launches must keep the GPU plan"
        else:
            assert fast_plan.programs < gpu_plan.programs or fast_plan.single_launch
            assert fast_plan.split <= TARGET_WAVES
            if not fast_plan.single_launch:
                assert fast_plan.tiles_per_prog > 1
        w, b, rm, rv = make_params(shape[1], pdtype, device)
        for _ in range(2):
            check_train_step(x, w, b, rm, rv, stats, param_dtype=pdtype)
            x = make_input(shape, layout, dtype, device)
        y = kernels.batch_norm(x, rm, rv, w, b, training=False)
    y_ref = torch_batch_norm(f64(x), f64(rm), f64(rv), f64(w), f64(b), False, 0.1, 1e-5)
    assert_close(y, y_ref, dtype, "y (eval)")
