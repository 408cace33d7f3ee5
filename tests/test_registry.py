"""The registry of operator variants (bnbench.registry): its calls reach the host functions
with what each variant says, its modes' figures are the documented ones, and its names
are the kernels' own."""

import pytest
import torch

import kernels
from bnbench import cases, registry
from helpers import assert_close

SHAPE = (3, 5, 4, 3)  # odd sizes, masks everywhere


def _points(op):
    """Every epilogue with default options, and every non-default option value alone
    (autotuning left out: on a CPU it would time configs through the interpreter)."""
    points = [(e, {}) for e in registry.epilogues()]
    points += [(registry.epilogues(("none",))[0], {name: value})
               for name, values in op.options.items() if name != "autotune"
               for value in values[1:]]
    return [registry.Variant(op, stats, e, layout, "float32", "float32",
                             tuple(sorted(opts.items())))
            for e, opts in points for stats in op.stats for layout in registry.LAYOUTS]


def _variant_id(v):
    return v.describe().replace(" ", "-")


def _f64(t, grad=False):
    return None if t is None else t.detach().double().requires_grad_(grad)


def _reference(v, t):
    """The float64 results of variant `v` on tensors `t`: kernels.torch_batch_norm, autograd."""
    act = v.epilogue.activation
    if v.op.name.endswith("train_fwd"):
        rm, rv = _f64(t["running_mean"]), _f64(t["running_var"])
        momentum = 1.0 if v.option("cumulative") else registry.MOMENTUM  # 1 / (batches = 1)
        x = _f64(t["x"])
        y = kernels.torch_batch_norm(x, rm, rv, _f64(t["weight"]), _f64(t["bias"]), True,
                                     momentum, registry.EPS, _f64(t["residual"]), act)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        return dict(y=y, mean=mean, rstd=(var + registry.EPS).rsqrt(), running_mean=rm,
                    running_var=rv)
    if v.op.name == "eval":
        return dict(y=kernels.torch_batch_norm(
            _f64(t["x"]), _f64(t["running_mean"]), _f64(t["running_var"]), _f64(t["weight"]),
            _f64(t["bias"]), False, 0.0, registry.EPS, _f64(t["residual"]), act))
    x, r = _f64(t["x"], True), _f64(t["residual"], True)
    w, b = _f64(t["weight"], True), _f64(t["bias"], True)
    training = v.option("training", True)
    rm = None if training else _f64(t["running_mean"])
    rv = None if training else _f64(t["running_var"])
    y = kernels.torch_batch_norm(x, rm, rv, w, b, training, 0.0, registry.EPS, r, act)
    y.backward(_f64(t["dy"]))
    need = dict(zip(("dx", "dweight", "dbias", "dresidual"), registry.GRADS[v.option("grads")]))
    grads = dict(dx=x.grad, dweight=None if w is None else w.grad,
                 dbias=None if b is None else b.grad, dresidual=None if r is None else r.grad)
    return {k: g if need[k] else None for k, g in grads.items()}


@pytest.fixture
def group():
    """A process group of this process alone, for the synchronised ops."""
    with registry.one_rank_group() as g:
        yield g


@pytest.mark.parametrize("variant", [v for op in registry.ALL_OPS.values() for v in _points(op)],
                         ids=_variant_id)
def test_each_variant_calls_its_host_function_as_it_says(variant, request):
    """run_variant on real tensors (make_tensors) matches the float64 reference of what the
    variant declares: its statistics, epilogue, layout and options (the synchronised ops in
    a group of one rank: the statistics of the whole batch)."""
    if variant.op.group:
        request.getfixturevalue("group")
    t = registry.make_tensors(variant, SHAPE, "real")
    expected = _reference(variant, t)
    out = registry.run_variant(variant, t)
    if variant.op.name.endswith("train_fwd"):
        out.update(running_mean=t["running_mean"], running_var=t["running_var"])
    for name, ref in expected.items():
        got = out[name]
        if ref is None:
            assert got is None, f"{name} computed though the variant does not need it"
            continue
        assert_close(got, ref, torch.float32, f"{variant.describe()}: {name}")
    if "y" in out and variant.layout == "nhwc":
        assert out["y"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kind, device", [("real", "cpu"), ("empty", "cpu"), ("meta", "meta")])
def test_make_tensors_kinds_layouts_and_options(kind, device):
    op = registry.OPS["train_fwd"]
    v = registry.Variant(op, "single_pass", registry.epilogues(("residual+relu",))[0], "nhwc",
                         "bfloat16", "float32", (("affine", False), ("cumulative", True)))
    t = registry.make_tensors(v, SHAPE, kind)
    assert t["x"].device.type == device and t["x"].dtype == torch.bfloat16
    assert t["x"].is_contiguous(memory_format=torch.channels_last)
    assert t["residual"].shape == SHAPE and t["weight"] is None and t["bias"] is None
    assert t["running_mean"].dtype == torch.float32 and t["num_batches_tracked"] is not None


def test_saved_statistics_are_the_inputs_own():
    """The backward's real tensors hold x's batch statistics and the forward's y."""
    op = registry.OPS["train_bwd"]
    v = registry.Variant(op, "-", registry.epilogues(("residual+relu",))[0], "nchw",
                         "float32", "float32")
    t = registry.make_tensors(v, SHAPE, "real")
    var, mean = torch.var_mean(t["x"].double(), dim=(0, 2, 3), correction=0)
    assert_close(t["mean"], mean, torch.float32, "mean")
    assert_close(t["rstd"], (var + registry.EPS).rsqrt(), torch.float32, "rstd")
    assert (t["y"] >= 0).all() and (t["y"] > 0).any()  # the forward's ReLU output


def test_synchronised_ops_need_a_group():
    v = registry.Variant(registry.SYNC_OPS["sync_train_fwd"], "single_pass",
                         registry.epilogues(("none",))[0])
    with pytest.raises(RuntimeError, match="one_rank_group"):
        registry.make_tensors(v, SHAPE, "real")


def test_names_are_the_kernels_own():
    assert {e.value for e in kernels.Epilogue} >= set(registry.HARNESS_FUSIONS)
    assert registry.epilogues() == tuple(kernels.Epilogue)
    assert cases.FUSIONS == registry.HARNESS_FUSIONS
    assert set(cases.ALL_MODES) == set(registry.MODES) and "conv_bn_eval" not in cases.MODES


@pytest.mark.parametrize("mode, fusion, tensors", [
    # the documented minimal bytes (bnbench.cases' docstring), in tensors of x's size
    ("eval", "none", 2), ("eval", "relu", 2), ("eval", "residual+silu", 3),
    ("train_fwd", "silu", 2), ("train_fwd", "residual+relu", 3),
    ("train_fwd_bwd", "none", 5), ("train_fwd_bwd", "relu", 5),
    ("train_fwd_bwd", "residual+relu", 7), ("train_fwd_bwd", "residual+silu", 7),
])
def test_mode_bytes_are_the_documented_formula(mode, fusion, tensors):
    case = cases.Case(mode, 4, 8, 5, 3, "bfloat16", "nchw", fusion)
    assert case.bytes_moved == tensors * 4 * 8 * 5 * 3 * 2
    conv = cases.Case("conv_bn_eval", 4, 8, 5, 3, "float32", "nhwc", fusion)
    assert conv.bytes_moved == ((3 if conv.residual else 2) * conv.numel + 9 * 8 * 8) * 4


def test_compared_quantities():
    epi = {n: registry.epilogues((n,))[0] for n in ("none", "residual+silu")}
    bwd = registry.MODES["train_fwd_bwd"]
    assert bwd.compared(epi["none"]) == ("y", "dx", "dweight", "dbias", "running_mean",
                                         "running_var")
    assert bwd.compared(epi["residual+silu"])[-1] == "dresidual"
    assert registry.MODES["eval"].compared(epi["residual+silu"]) == ("y",)


def test_compile_list_names_are_unique_and_span_every_op_and_shape_class():
    scenarios = registry.compile_variants()
    names = [s.name for s in scenarios]
    assert len(names) == len(set(names))
    assert {s.variant.op.name for s in scenarios} == set(registry.ALL_OPS)
    assert {s.shape for s in scenarios} == set(registry.SHAPE_CLASSES.values())
