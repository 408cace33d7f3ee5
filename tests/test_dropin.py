"""The drop-in contract beyond the common path (issue 9): strided state, tracing, higher-order
and forward-mode autograd, torch.func, export, safe conversion, the module family, argument
checks.  Every result is held against torch's own batch norm on the same inputs."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

import kernels
from helpers import assert_close, f64

STATS = ["single_pass", "two_pass"]
FUSIONS = {  # name: (activation, with a residual)
    "none": (None, False), "relu": ("relu", False), "residual+relu": ("relu", True),
    "residual+silu": ("silu", True)}


def _ref(x, rm, rv, w, b, training, momentum=0.1, eps=1e-5, residual=None, activation=None):
    return kernels.torch_batch_norm(x, rm, rv, w, b, training, momentum, eps, residual,
                                    activation)


# ---------------------------------------------------------------------------------------------
# 1. strided per-channel state

def _strided_state(device):
    """weight/bias as every-other-element slices, running stats as offset views of a buffer
    whose other elements must stay untouched."""
    w6, b6 = torch.rand(10, device=device) + 0.5, torch.randn(10, device=device)
    store = torch.full((20,), 7.0, device=device)
    store[3:13:2] = torch.randn(5, device=device)
    store[14:19] = torch.rand(5, device=device) + 0.5
    return w6[::2], b6[1::2], store, store[3:13:2], store[14:19]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("stats", STATS)
def test_strided_state_is_read_and_updated_in_place(layout, stats, device, path):
    x = torch.randn(3, 5, 7, 6, device=device)
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    w, b, store, rm, rv = _strided_state(device)
    before = store.clone()
    ref_rm, ref_rv = f64(rm), f64(rv)
    y = kernels.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, stats=stats)
    y_ref = F.batch_norm(f64(x), ref_rm, ref_rv, f64(w), f64(b), True, 0.3)
    assert_close(y, y_ref, torch.float32, "y with strided weight/bias")
    assert_close(rm, ref_rm, torch.float32, "strided running_mean")
    assert_close(rv, ref_rv, torch.float32, "strided running_var")
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[3:13:2] = False
    untouched[14:19] = False
    assert torch.equal(store[untouched], before[untouched]), "wrote outside the running stats"
    y_eval = kernels.batch_norm(x, rm, rv, w, b, training=False)
    assert_close(y_eval, F.batch_norm(f64(x), ref_rm, ref_rv, f64(w), f64(b), False),
                 torch.float32, "eval with strided state")


def test_expanded_running_stats_write_only_their_element(device):
    """A stride-0 running_mean (the issue's example) is one memory location: only it changes,
    to one of the channels' updates, as in torch."""
    x = torch.randn(4, 3, 5, 6, device=device)
    base = torch.zeros(8, device=device)
    base[1:] = 7
    kernels.batch_norm(x, base[:1].expand(3), torch.ones(3, device=device), training=True)
    assert torch.equal(base[1:], torch.full((7,), 7.0, device=device))
    updates = 0.1 * x.double().mean((0, 2, 3)).cpu()
    assert torch.isclose(updates, base[0].double().cpu(), atol=1e-6).any(), (base[0], updates)


def test_module_with_assigned_strided_state(device):
    """load_state_dict(assign=True) puts the caller's (strided) tensors in the module."""
    torch.manual_seed(3)
    w, b, store, rm, rv = _strided_state(device)
    ours = kernels.BatchNorm2d(5, device=device)
    ref = nn.BatchNorm2d(5, dtype=torch.float64)
    state = {"weight": w, "bias": b, "running_mean": rm, "running_var": rv,
             "num_batches_tracked": torch.tensor(0)}
    ref.load_state_dict({k: f64(v) if v.is_floating_point() else v for k, v in state.items()})
    ours.load_state_dict(state, assign=True)
    x = torch.randn(2, 5, 3, 9, device=device)
    assert_close(ours(x), ref(f64(x)), torch.float32, "y")
    assert_close(ours.running_var, ref.running_var, torch.float32, "running_var")
    assert ours.running_var.data_ptr() == rv.data_ptr(), "updated in the caller's tensor"


# ---------------------------------------------------------------------------------------------
# 2. tracing and scripting

def test_jit_trace_in_training_updates_running_stats_like_torch(device):
    ours, ref = kernels.BatchNorm2d(3, device=device), nn.BatchNorm2d(3).to(device)
    x = torch.randn(4, 3, 5, 6, device=device)
    traced = torch.jit.trace(ours, (x,), check_trace=False)
    ours.load_state_dict(ref.state_dict())  # undo the tracing call's update
    for _ in range(2):
        x = torch.randn(4, 3, 5, 6, device=device)
        assert_close(traced(x), ref(x).double(), torch.float32, "traced y")
    assert_close(ours.running_mean, ref.running_mean.double(), torch.float32, "running_mean")
    assert_close(ours.running_var, ref.running_var.double(), torch.float32, "running_var")
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)  # a traced model can be saved and loaded
    buffer.seek(0)
    assert_close(torch.jit.load(buffer)(x), F.batch_norm(x.double(), None, None, training=True),
                 torch.float32, "loaded trace (traced in training: batch statistics)")


def test_jit_script_says_why_and_what_to_use():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), kernels.BatchNorm2d(3))
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile.*torch.compile"):
        torch.jit.script(model)


# ---------------------------------------------------------------------------------------------
# 3-4. higher-order and forward-mode autograd

def _diff_inputs(fusion, training, shape=(3, 3, 4, 5)):
    act, res = FUSIONS[fusion]
    x = torch.randn(*shape, dtype=torch.float64).mul(2).add(1).requires_grad_()
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    r = torch.randn(*shape, dtype=torch.float64, requires_grad=True) if res else None
    rm = None if training else torch.randn(shape[1], dtype=torch.float64)
    rv = None if training else torch.rand(shape[1], dtype=torch.float64) + 0.5
    return act, (x, w, b) + ((r,) if res else ()), rm, rv


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("stats", STATS)
def test_gradgradcheck_and_forward_ad(fusion, training, stats):
    act, inputs, rm, rv = _diff_inputs(fusion, training)

    def f(x, w, b, r=None):
        return kernels.batch_norm(x, rm, rv, w, b, training, stats=stats, residual=r,
                                  activation=act)

    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("fusion", list(FUSIONS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_matches_torch(fusion, training, device):
    """A gradient penalty: d/dinputs of |d loss / dx|^2, against torch's batch norm."""
    act, inputs, rm, rv = _diff_inputs(fusion, training)
    results = []
    for bn in (kernels.batch_norm, F.batch_norm):
        def f(x, w, b, r=None):
            if bn is F.batch_norm:
                return _ref(x, rm, rv, w, b, training, residual=r, activation=act)
            return bn(x, rm, rv, w, b, training, residual=r, activation=act)
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        loss = f(*leaves).pow(3).sum()
        (gx,) = torch.autograd.grad(loss, leaves[0], create_graph=True)
        results.append(torch.autograd.grad(gx.pow(2).sum(), leaves))
    for name, ours, ref in zip(["x", "weight", "bias", "residual"], *results):
        assert_close(ours, ref, torch.float64, f"second-order grad of {name}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fusion", ["residual+relu", "residual+silu"])
def test_forward_ad_and_forward_over_reverse_match_torch(training, fusion):
    act, (x, w, b, r), rm, rv = _diff_inputs(fusion, training)
    tangents = tuple(torch.randn_like(t) for t in (x, w, b, r))
    primals = tuple(t.detach() for t in (x, w, b, r))

    def ours(x, w, b, r):
        return kernels.batch_norm(x, rm, rv, w, b, training, residual=r, activation=act)

    def ref(x, w, b, r):
        return _ref(x, rm, rv, w, b, training, residual=r, activation=act)

    assert_close(jvp(ours, primals, tangents)[1], jvp(ref, primals, tangents)[1],
                 torch.float64, "jvp")
    with torch.autograd.forward_ad.dual_level():  # the autograd.forward_ad API
        duals = [torch.autograd.forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
        tangent = torch.autograd.forward_ad.unpack_dual(ours(*duals)).tangent
    assert_close(tangent, jvp(ref, primals, tangents)[1], torch.float64, "forward_ad")

    def hvp(f):  # forward-over-reverse
        return jvp(grad(lambda x: f(x, *primals[1:]).pow(3).sum()), primals[:1], tangents[:1])[1]

    assert_close(hvp(ours), hvp(ref), torch.float64, "forward-over-reverse")


def test_first_order_backward_runs_the_triton_kernels(monkeypatch):
    """The fast path stays Triton: a plain backward calls the backward op, not torch ops
    (the full route, as under torch.compile), or the Triton host function (the lean route)."""
    calls = []
    op = torch.ops.bnbench.batch_norm_backward
    monkeypatch.setattr(kernels.ops.torch.ops.bnbench, "batch_norm_backward",
                        lambda *a: calls.append(1) or op(*a), raising=False)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    with kernels._eager.full_route():
        kernels.batch_norm(x, None, None, torch.ones(4), None, True).sum().backward()
    assert calls == [1] and x.grad is not None
    lean = []
    host = kernels._eager.bn_backward
    monkeypatch.setattr(kernels._eager, "bn_backward", lambda *a, **k: lean.append(1) or host(*a, **k))
    x.grad = None
    kernels.batch_norm(x, None, None, torch.ones(4), None, True).sum().backward()
    assert lean == [1] and calls == [1] and x.grad is not None


# ---------------------------------------------------------------------------------------------
# 5. torch.func

def test_torch_func_transforms_match_torch():
    _, (x, w, b), _, _ = _diff_inputs("none", True)
    x, w, b = x.detach(), w.detach(), b.detach()
    small = x[:2, :, :2, :3].contiguous()

    def ours(x, w=w, b=b, rm=None, rv=None, training=True):
        return kernels.batch_norm(x, rm, rv, w, b, training)

    def ref(x, w=w, b=b, rm=None, rv=None, training=True):
        return F.batch_norm(x, rm, rv, w, b, training)

    def loss(f):
        return lambda x, w, b: f(x, w, b).pow(3).sum()

    for name, transform in {
        "grad": lambda f: grad(loss(f), argnums=(0, 1, 2))(x, w, b),
        "vjp": lambda f: vjp(f, x)[1](torch.ones_like(x)),
        "jacrev": lambda f: jacrev(f)(small),
        "jvp": lambda f: jvp(f, (x,), (torch.ones_like(x),))[1],
    }.items():
        for o, r in zip(torch.utils._pytree.tree_leaves(transform(ours)),
                        torch.utils._pytree.tree_leaves(transform(ref))):
            assert_close(o, r, torch.float64, name)
    xb = torch.randn(2, *x.shape, dtype=torch.float64)
    assert_close(vmap(ours)(xb), vmap(ref)(xb), torch.float64, "vmap, train")
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert_close(vmap(lambda x: ours(x, rm=rm, rv=rv, training=False))(xb),
                 vmap(lambda x: ref(x, rm=rm, rv=rv, training=False))(xb), torch.float64,
                 "vmap, eval")
    wb = torch.rand(2, 3, dtype=torch.float64) + 0.5  # batched weight too
    assert_close(vmap(lambda x, w: ours(x, w))(xb, wb), vmap(lambda x, w: ref(x, w))(xb, wb),
                 torch.float64, "vmap, batched weight")
    # batched running stats are updated per sample, as torch does
    rms, rvs = [torch.zeros(2, 3, dtype=torch.float64) for _ in range(2)]
    rmt, rvt = [torch.zeros(2, 3, dtype=torch.float64) for _ in range(2)]
    vmap(lambda x, m, v: ours(x, rm=m, rv=v))(xb, rms, rvs)
    vmap(lambda x, m, v: ref(x, rm=m, rv=v))(xb, rmt, rvt)
    assert_close(rms, rmt, torch.float64, "vmapped running_mean")
    assert_close(rvs, rvt, torch.float64, "vmapped running_var")
    with pytest.raises(RuntimeError, match="not batched"):
        vmap(lambda x: ours(x, rm=rm.clone(), rv=rv.clone()))(xb)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_call_grad_matches_torch(training):
    ours = kernels.BatchNorm2d(3, dtype=torch.float64).train(training)
    ref = nn.BatchNorm2d(3, dtype=torch.float64).train(training)
    with torch.no_grad():
        ours.running_mean.normal_()
        ours.weight.uniform_(0.5, 1.5)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 3, 4, 5, dtype=torch.float64)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    grads = []
    for module in (ours, ref):
        buffers = {k: v.clone() for k, v in module.named_buffers()}
        grads.append(grad(lambda p, b: functional_call(module, (p, b), (x,)).pow(3).sum())(
            params, buffers))
    for key in params:
        assert_close(grads[0][key], grads[1][key], torch.float64, f"d/d{key}")


# ---------------------------------------------------------------------------------------------
# 6. export

def _net():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.BatchNorm2d(4))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    return net


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_export_round_trip(training):
    net = _net().train(training)
    ours = kernels.convert_batchnorm(copy.deepcopy(net))
    x = torch.randn(2, 3, 9, 9)
    exported = torch.export.export(ours, (x,))
    ops = {str(n.target) for gm in exported.graph_module.modules()  # nested graphs too
           if isinstance(gm, torch.fx.GraphModule)
           for n in gm.graph.nodes if n.op == "call_function"}
    assert any("bnbench" in op for op in ops), ops
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    module = torch.export.load(buffer).module()
    assert_close(module(x), net(x).double(), torch.float32, "exported model")
    if training:  # the running-stat updates are in the exported program
        state = dict(module.named_buffers())
        for key, value in net.state_dict().items():
            if "running" in key:
                assert_close(state[key], value.double(), torch.float32, key)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_runs_in_onnxruntime(dynamo, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extra")
    onnx = pytest.importorskip("onnx", reason="onnx is in the test extra")
    net = _net().eval()
    x = torch.randn(2, 3, 9, 9)
    for name, model in {"converted": kernels.convert_batchnorm(copy.deepcopy(net)),
                        "folded": kernels.fold_batchnorm(net)}.items():
        assert any(isinstance(m, (kernels.BatchNorm2d, kernels.BatchNormInference))
                   for m in model.modules()), name
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo)
        graph = onnx.load(str(path)).graph
        assert all(n.domain in ("", "ai.onnx") for n in graph.node), "standard ONNX ops only"
        session = ort.InferenceSession(str(path))
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out), net(x), atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{name} in onnxruntime: {m}")


# ---------------------------------------------------------------------------------------------
# 7. safe conversion

class _ScaledBN(nn.BatchNorm2d):
    """A subclass with its own forward, as model zoos have."""

    def forward(self, x):
        return super().forward(x) * 2 + 1


class _PlainBN(nn.BatchNorm2d):
    """A subclass that only sets things up: it behaves as BatchNorm2d."""

    def __init__(self, c):
        super().__init__(c, momentum=0.2)


def test_convert_leaves_subclasses_with_behaviour_and_reports_them(device):
    model = nn.Sequential(_ScaledBN(3), _PlainBN(3), nn.BatchNorm1d(3), nn.SyncBatchNorm(3))
    ref = copy.deepcopy(model)
    out = kernels.convert_batchnorm(model)
    assert type(out[0]) is _ScaledBN and type(out[3]) is kernels.SyncBatchNorm
    assert type(out[1]) is kernels.BatchNorm2d and out[1].momentum == 0.2
    report = out.conversion_report
    kept = {r.name: r.reason for r in report.kept}
    assert set(kept) == {"0"} and "forward" in kept["0"], str(report)
    assert {r.name for r in report.converted} == {"1", "2", "3"}
    class _ExtraStateBN(nn.BatchNorm2d):  # only __init__, but a buffer of its own
        def __init__(self, c):
            super().__init__(c)
            self.register_buffer("scale", torch.ones(c))

    extra = kernels.convert_batchnorm(nn.Sequential(_ExtraStateBN(3)))
    assert type(extra[0]) is _ExtraStateBN
    assert "'scale'" in extra.conversion_report.kept[0].reason
    lazy = kernels.convert_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()))
    assert type(lazy[0]) is nn.LazyBatchNorm2d and len(lazy.conversion_report.kept) == 1
    x = torch.randn(2, 3, 4, 4, device=device)
    out.eval()
    ref.eval()
    assert_close(out[0](x), ref[0](x).double(), torch.float32, "kept subclass")


def test_convert_keeps_hooks_sharing_and_the_module_family():
    shared = nn.BatchNorm2d(3)
    seen = []
    handle = shared.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Flatten(), nn.BatchNorm1d(12))
    model3d = nn.Sequential(nn.BatchNorm3d(2))
    out = kernels.convert_batchnorm(model, stats="two_pass")
    assert out[0] is out[2] and type(out[0]) is kernels.BatchNorm2d, "one module, registered twice"
    assert type(out[4]) is kernels.BatchNorm1d and out[4].stats == "two_pass"
    assert type(kernels.convert_batchnorm(model3d)[0]) is kernels.BatchNorm3d
    out(torch.randn(2, 3, 2, 2))
    assert len(seen) == 2, "the forward hook moved with the module"
    handle.remove()
    out(torch.randn(2, 3, 2, 2))
    assert len(seen) == 2, "its handle still removes it"
    again = kernels.convert_batchnorm(out, activation="relu")  # own modules, new options
    assert again[0].activation == "relu" and again[0].stats == "two_pass"
    assert again[0].weight is shared.weight


def test_convert_keeps_a_full_backward_hook_firing_as_torch_does(device):
    """register_full_backward_hook (and its pre-hook) still fire after conversion, with the
    gradients torch's module gives them."""
    def hooked():
        bn = nn.BatchNorm2d(3).to(device)
        seen = []
        bn.register_full_backward_pre_hook(lambda m, go: seen.append(("pre", go[0])))
        bn.register_full_backward_hook(lambda m, gi, go: seen.append(("full", gi[0], go[0])))
        return bn, seen

    ref, ref_seen = hooked()
    bn, seen = hooked()
    converted = kernels.convert_batchnorm(nn.Sequential(bn))[0]
    assert type(converted) is kernels.BatchNorm2d
    x = torch.randn(2, 3, 5, 3, device=device)
    dy = torch.randn_like(x)
    for module in (ref, converted):
        module(x.clone().requires_grad_()).backward(dy)
    assert [s[0] for s in seen] == [s[0] for s in ref_seen] == ["pre", "full"]
    assert_close(seen[1][1], ref_seen[1][1].double(), torch.float32, "grad_input the hook saw")
    assert torch.equal(seen[1][2], dy) and torch.equal(seen[0][1], dy)


# ---------------------------------------------------------------------------------------------
# 8. argument checks: torch's exception types, nothing changed

def _bad_calls():
    x = torch.randn(3, 5, 4, 4)
    rm, rv = torch.zeros(5), torch.ones(5)
    half = x.half()
    return {  # name: (call(bn), args for F.batch_norm and kernels.batch_norm)
        "eps-zero-train": (x, rm, rv, None, None, True, 0.1, 0.0),
        "eps-negative-train": (x, rm, rv, None, None, True, 0.1, -1e-5),
        "eps-negative-eval": (x, rm, rv, None, None, False, 0.1, -1e-5),
        "training-none": (x, rm, rv, None, None, None, 0.1, 1e-5),
        "training-int": (x, rm, rv, None, None, 1, 0.1, 1e-5),
        "momentum-1d-tensor": (x, rm, rv, None, None, True, torch.tensor([0.3]), 1e-5),
        "momentum-none": (x, rm, rv, None, None, True, None, 1e-5),
        "1d-input": (torch.randn(5), None, None, None, None, True, 0.1, 1e-5),
        "0d-input": (torch.tensor(1.0), None, None, None, None, True, 0.1, 1e-5),
        "mean-without-var-train": (x, rm, None, None, None, True, 0.1, 1e-5),
        "var-without-mean-train": (x, None, rv, None, None, True, 0.1, 1e-5),
        "mean-without-var-eval": (x, rm, None, None, None, False, 0.1, 1e-5),
        "eval-without-stats": (x, None, None, None, None, False, 0.1, 1e-5),
        "float64-weight": (x, rm, rv, torch.ones(5, dtype=torch.float64), None, True, 0.1, 1e-5),
        "half-weight-float-input": (x, rm, rv, torch.ones(5).half(), None, True, 0.1, 1e-5),
        "half-input-mixed-params": (half, rm, rv, torch.ones(5).half(), None, True, 0.1, 1e-5),
        "half-input-float64-stats": (half, rm.double(), rv.double(), None, None, True, 0.1,
                                     1e-5),
        "double-input-float-weight": (x.double(), None, None, torch.ones(5), None, True, 0.1,
                                      1e-5),
        "weight-size": (x, rm, rv, torch.ones(4), None, True, 0.1, 1e-5),
        "one-value-per-channel": (x[:1, :, :1, :1], rm, rv, None, None, True, 0.1, 1e-5),
        "integer-input": (x.long(), rm, rv, None, None, True, 0.1, 1e-5),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_arguments_raise_torch_exception_type(name):
    args = _bad_calls()[name]
    try:
        F.batch_norm(*[t.clone() if isinstance(t, torch.Tensor) else t for t in args])
    except Exception as e:  # noqa: BLE001 - torch's type is what we compare with
        torch_error = type(e)
    else:  # older torch (e.g. 2.7 for eps <= 0) accepts some of these; ours follows newer torch
        pytest.skip(f"torch {torch.__version__} accepts this call")
    state = [t.clone() for t in args[1:5] if t is not None]
    with pytest.raises(torch_error) as ours:
        kernels.batch_norm(*args)
    assert len(str(ours.value)) > 20, "a message that says what is wrong"
    after = [t for t in args[1:5] if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(state, after)), "a refused call changed state"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_a_0d_tensor_momentum_and_eps_are_taken_as_torch_takes_them(training, device):
    x = torch.randn(3, 5, 4, 3, device=device)
    rm, rv = torch.randn(5, device=device), torch.rand(5, device=device) + 0.5
    ref_rm, ref_rv = f64(rm), f64(rv)
    momentum, eps = torch.tensor(0.3), torch.tensor(1e-3, dtype=torch.float64)
    y = kernels.batch_norm(x, rm, rv, None, None, training, momentum, eps)
    y_ref = F.batch_norm(f64(x), ref_rm, ref_rv, None, None, training, momentum, eps)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(rm, ref_rm, torch.float32, "running_mean")
    assert_close(rv, ref_rv, torch.float32, "running_var")


@pytest.mark.quick
def test_dtype_errors_name_the_tensor():
    x = torch.randn(3, 5, 4, 4).half()
    with pytest.raises(RuntimeError, match="running_mean has dtype torch.float32 but weight|"
                                           "weight has dtype torch.float16 but running_mean"):
        kernels.batch_norm(x, torch.zeros(5), torch.ones(5), torch.ones(5).half(), None, True)


@pytest.mark.parametrize("cls", [kernels.BatchNorm1d, kernels.BatchNorm3d], ids=["1d", "3d"])
def test_module_eps_and_input_dim_errors_leave_state(cls):
    x = torch.randn(5, 4, 3) if cls is kernels.BatchNorm1d else torch.randn(2, 4, 3, 3, 3)
    try:  # torch's type (torch counts the batch first); torch 2.7 accepts eps = 0
        getattr(nn, cls.__name__)(4, eps=0.0)(x)
    except ValueError as e:
        assert "eps" in str(e)
    bn = cls(4, eps=0.0)
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError, match="eps"):
        bn(x)
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items()), "state changed"
    with pytest.raises(ValueError, match="expected"):
        cls(4)(torch.randn(4, 4, 2, 2, 2, 2))


# ---------------------------------------------------------------------------------------------
# 9. the module family

@pytest.mark.parametrize("cls, shape", [
    (kernels.BatchNorm1d, (6, 4)), (kernels.BatchNorm1d, (3, 4, 7)),
    (kernels.BatchNorm3d, (2, 4, 3, 5, 3))], ids=["1d-NC", "1d-NCL", "3d"])
@pytest.mark.parametrize("stats", STATS)
def test_module_family_matches_torch(cls, shape, stats, device):
    ours = cls(4, stats=stats, momentum=None, device=device)
    ref = getattr(nn, cls.__name__)(4, momentum=None, dtype=torch.float64)
    assert isinstance(ours, getattr(nn, cls.__name__))
    assert list(ours.state_dict()) == list(ref.state_dict())
    for training in (True, True, False):
        ours.train(training)
        ref.train(training)
        x = torch.randn(*shape, device=device).mul(3).add(2).requires_grad_()
        xr = f64(x, requires_grad=True)
        y, y_ref = ours(x), ref(xr)
        assert_close(y, y_ref, torch.float32, f"y, training={training}")
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(f64(dy))
        assert_close(x.grad, xr.grad, torch.float32, "dx")
    for key, value in ref.state_dict().items():
        if value.dtype == torch.long:
            assert torch.equal(ours.state_dict()[key].cpu(), value), key
        else:
            assert_close(ours.state_dict()[key], value, torch.float32, key)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_compile_fullgraph_matches_torch(momentum, device):
    """No graph break (fullgraph=True) in training and eval, through AOT autograd (the
    functionalised running-stat updates); Inductor compiles the same graph."""
    torch._dynamo.reset()
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                        nn.Flatten(), nn.BatchNorm1d(4 * 5 * 5, momentum=momentum)).to(device)
    ours = kernels.convert_batchnorm(copy.deepcopy(net))
    ref = copy.deepcopy(net).cpu().double()  # the float64 reference
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    for training in (True, True, False):
        ref.train(training)
        ours.train(training)
        x = torch.randn(8, 3, 7, 7, device=device)
        y, y_ref = compiled(x), ref(f64(x))
        assert_close(y, y_ref, torch.float32, f"compiled y, training={training}")
        if training:
            y.square().sum().backward()
            y_ref.square().sum().backward()
    scale = ref[0].weight.grad.abs().max()  # a sum over the whole model: compare scaled
    assert_close(ours[0].weight.grad / scale, ref[0].weight.grad / scale, torch.float32,
                 "conv grad / max |conv grad|")
    for key, value in ref.state_dict().items():
        assert_close(ours.state_dict()[key].double(), value.double(), torch.float32, key)


@pytest.mark.parametrize("training", [True, False])
def test_an_empty_float64_batch_through_a_float32_module_is_torchs(training):
    """torch's test_BatchNorm_empty case: an empty float64 batch through a float32 module is
    accepted (nothing to compute); the output is float64 and empty, the running statistics
    are untouched, the batch is counted in training, the parameters' gradients are zeros.
    A non-empty mix still raises in both."""
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1), ref.running_var.uniform_(0.5, 2)
    ours = kernels.convert_batchnorm(copy.deepcopy(ref))
    outs = []
    for m in (ref, ours):
        m.train(training)
        x = torch.randn(0, 3, 5, 4, dtype=torch.float64, requires_grad=True)
        y = m(x)
        y.sum().backward()
        outs.append((y, x.grad, m.weight.grad, m.bias.grad, *m.state_dict().values()))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    full = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    for m in (ref, ours):
        with pytest.raises(RuntimeError):
            m(full)


@pytest.mark.parametrize("stats", ["single_pass", "two_pass"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_inf_at_the_first_element_of_a_channel_is_torchs(stats, layout, path):
    """The statistics are shifted by each channel's first element: an inf there must give
    torch's running mean (inf, not NaN) and torch's NaN pattern in the output; the other
    channels are untouched by it."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 3)
    x[0, 0, 0, 0] = float("inf")
    x[1, 2, 0, 0] = float("-inf")  # not a first element: as torch already
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ref = torch.nn.BatchNorm2d(4, dtype=torch.float64).train()
    ours = kernels.BatchNorm2d(4, stats=stats).train()
    y_ref, y = ref(x.double()), ours(x)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    for got, want in ((ours.running_mean, ref.running_mean), (ours.running_var, ref.running_var)):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), (got, want)
        finite = torch.isfinite(want)
        assert_close(got[finite], want[finite].float(), torch.float32, "running stats")
    assert ours.running_mean[0] == float("inf")
