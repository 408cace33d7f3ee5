"""The harness's parts, in process: shapes, bytes, errors, backend labels, the runner, the CSV.

The runner tests run the real kernels (compiled on a GPU, interpreted on CPU) on
tiny cases, next to implementations that are deliberately wrong (an offset, a
fusion left out, a BN not folded) and one that raises, so that the error columns
and the error handling can be seen to work.  The float64 references of the fused
and conv_bn_eval cases are checked against the formulas written out here.
"""

import argparse
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import kernels
from bnbench import backends, numerics, registry, report, runner
from bnbench.cases import Case, gbps, make_cases
from bnbench.impls import CONV_MODES, IMPLS, Impl
from bnbench.shapes import SHAPE_SETS, parse_shapes, resnet50_bn_shapes
from helpers import TOL

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]


def test_resnet50_shapes_run_from_stem_to_last_block():
    shapes = resnet50_bn_shapes()
    assert shapes[0] == (64, 112, 112)  # stem, after the 7x7/2 conv
    assert shapes[-1] == (2048, 7, 7)  # last bottleneck's bn3
    assert len(shapes) == len(set(shapes)) == 12
    for shape in [(64, 56, 56), (256, 56, 56), (128, 28, 28), (512, 28, 28), (1024, 14, 14),
                  (512, 7, 7)]:
        assert shape in shapes
    assert SHAPE_SETS["resnet50"] == shapes


def test_parse_shapes():
    assert parse_shapes("64x56x56, 256x14x14") == ("custom", ((64, 56, 56), (256, 14, 14)))
    assert parse_shapes("quick") == ("quick", SHAPE_SETS["quick"])
    for bad in ["64x56", "64x0x3", "axbxc", "resnet51", ""]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse_shapes(bad)


def test_cases_and_bytes_formula():
    cases = make_cases(["eval", "train_fwd_bwd"], [(3, 4, 5)], [8, 2], ["float16"], ["nchw"])
    assert [(c.N, c.mode) for c in cases] == [(2, "eval"), (2, "train_fwd_bwd"),
                                              (8, "eval"), (8, "train_fwd_bwd")]
    # 2 * 3 * 4 * 5 = 120 elements of 2 bytes
    assert Case("train_fwd_bwd", 2, 3, 4, 5, "float16", "nchw").bytes_moved == 5 * 120 * 2
    assert Case("train_fwd", 2, 3, 4, 5, "float32", "nhwc").bytes_moved == 2 * 120 * 4
    assert Case("eval", 2, 3, 4, 5, "bfloat16", "nchw").bytes_moved == 2 * 120 * 2
    assert gbps(Case("eval", 2, 3, 4, 5, "float32", "nchw"), 1e-3) == pytest.approx(0.96)
    assert gbps(Case("eval", 2, 3, 4, 5, "float32", "nchw"), None) is None
    # fusions: relu moves nothing more; a residual is read (and dr written in fwd_bwd)
    assert Case("train_fwd", 2, 3, 4, 5, "float32", "nchw", "relu").bytes_moved == 2 * 120 * 4
    assert Case("eval", 2, 3, 4, 5, "float32", "nchw", "residual+relu").bytes_moved \
        == 3 * 120 * 4
    assert Case("train_fwd_bwd", 2, 3, 4, 5, "bfloat16", "nhwc", "residual+relu").bytes_moved \
        == 7 * 120 * 2
    # conv_bn_eval: x, y and the 3x3 conv's 3 x 3 x 3 x 3 weight
    assert Case("conv_bn_eval", 2, 3, 4, 5, "float16", "nchw").bytes_moved == (240 + 81) * 2
    assert Case("conv_bn_eval", 2, 3, 4, 5, "float32", "nchw", "residual+relu").bytes_moved \
        == (360 + 81) * 4
    fused = make_cases(["eval", "conv_bn_eval"], [(3, 4, 5)], [2], ["float32"], ["nchw"],
                       ["none", "relu"])
    assert [(c.fusion, c.mode) for c in fused] == [("none", "eval"), ("none", "conv_bn_eval"),
                                                   ("relu", "eval"), ("relu", "conv_bn_eval")]
    assert make_cases(["eval"], [(3, 4, 5)], [2], ["float32"], ["nchw"])[0].fusion == "none"


def test_errors_against_hand_computed_values():
    expected = torch.tensor([3.0, 4.0], dtype=torch.float64)
    max_abs, rel_l2 = numerics.errors(torch.tensor([3.0, 4.5]), expected)
    assert max_abs == pytest.approx(0.5)
    assert rel_l2 == pytest.approx(0.5 / 5.0)
    with pytest.raises(RuntimeError, match="shape"):
        numerics.errors(torch.zeros(3), expected)


CUDNN_FWD = ("void cudnn::detail::bn_fw_tr_1C11_kernel_NCHW<float, float, int=512, bool=1, "
             "int=1>(float, float, cudnnTensorStruct, float const *)")
ATEN_STATS = "void at::native::batch_norm_collect_statistics_kernel<at::native::InvStd, float>"
ATEN_BWD = "void at::native::batch_norm_backward_kernel<float, float, float, int>"
INDUCTOR = "triton_red_fused__native_batch_norm_legit_functional_0"


@pytest.mark.parametrize("ops, kernel_names, device, interpreted, expected", [
    ({"aten::batch_norm", "aten::cudnn_batch_norm"}, {CUDNN_FWD}, "cuda", False, "cudnn"),
    ({"aten::batch_norm", "aten::native_batch_norm"}, {ATEN_STATS}, "cuda", False, "aten_native"),
    ({"aten::cudnn_batch_norm"}, {CUDNN_FWD, ATEN_BWD}, "cuda", False, "cudnn+aten_native"),
    ({"Torch-Compiled Region: 0/0"}, {INDUCTOR}, "cuda", False, "inductor_triton"),
    ({"bnbench::batch_norm_train"}, {"_bn_fwd_stats_kernel", "_bn_fwd_apply_kernel"}, "cuda",
     False, "triton"),
    ({"bnbench::batch_norm_train", "bnbench::batch_norm_backward"}, set(), "cpu", True,
     "triton_interpreter"),
    ({"aten::batch_norm", "aten::native_batch_norm"}, set(), "cpu", False, "aten_cpu"),
    ({"Torch-Compiled Region: 0/0", "## Call CompiledFxGraph f2yn ##"}, set(), "cpu", False,
     "inductor_cpp"),
    ({"aten::add", "aten::empty"}, {"vectorized_elementwise_kernel"}, "cuda", False, "unknown"),
])
def test_backend_labels(ops, kernel_names, device, interpreted, expected):
    assert backends.classify(ops, kernel_names, device, interpreted) == expected


CUDNN_CONV = "cudnn::cnn::conv2d_grouped_direct_kernel<float, float, float, float, float>"


@pytest.mark.parametrize("ops, kernel_names, device, interpreted, expected", [
    ({"aten::conv2d", "aten::cudnn_convolution", "aten::cudnn_batch_norm"},
     {CUDNN_CONV, CUDNN_FWD}, "cuda", False, "conv:cudnn+bn:cudnn"),
    # a folded conv: cuDNN's conv kernel must not pass for a cuDNN batch norm
    ({"aten::conv2d", "aten::cudnn_convolution"}, {CUDNN_CONV}, "cuda", False,
     "conv:cudnn+bn:none"),
    ({"aten::cudnn_convolution", "bnbench::batch_norm_eval"}, {CUDNN_CONV, "_bn_eval_kernel"},
     "cuda", False, "conv:cudnn+bn:triton"),
    ({"aten::conv2d", "aten::mkldnn_convolution", "aten::native_batch_norm"}, set(), "cpu",
     False, "conv:onednn+bn:aten_cpu"),
    ({"aten::_slow_conv2d_forward", "bnbench::batch_norm_eval"}, set(), "cpu", True,
     "conv:aten+bn:triton_interpreter"),
    ({"aten::add"}, set(), "cpu", False, "conv:unknown+bn:none"),
])
def test_conv_backend_labels(ops, kernel_names, device, interpreted, expected):
    assert backends.classify(ops, kernel_names, device, interpreted, conv=True) == expected


def _broken_build():
    def fn(x, running_mean, running_var, weight, bias, training, momentum, eps, residual=None,
           relu=False):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum,
                            eps) + 0.01
    return fn


def _failing_build():
    def fn(*args):
        raise RuntimeError("boom\nsecond line")
    return fn


def _no_check(device):
    return None


BROKEN = Impl("broken", "baseline", ("train_fwd_bwd",), _broken_build, _no_check)
FAILING = Impl("failing", "baseline", ("train_fwd_bwd",), _failing_build, _no_check)


def test_runner_rows_errors_and_failures():
    case = Case("train_fwd_bwd", 3, 5, 9, 7, "float32", "nchw")  # odd sizes, masks everywhere
    opts = runner.Options(device=DEVICE, interpreted=kernels.INTERPRETED, warmup_ms=1, rep_ms=5)
    impls = [IMPLS["triton_single_pass"], BROKEN, FAILING, IMPLS["torch_native"]]
    rows = {row["impl"]: row for row in runner.run_case(case, impls, opts)}
    assert list(rows) == ["triton_single_pass", "broken", "failing", "torch_native"]

    tol = TOL[torch.float32]
    for name in ["triton_single_pass", "torch_native"]:
        row = rows[name]
        assert row["status"] == "ok", row.get("error")
        for q in registry.MODES["train_fwd_bwd"].quantities:
            max_abs, rel_l2 = (row[c] for c in numerics.error_columns(q))
            assert 0 <= max_abs < 100 * tol["atol"], (name, q, max_abs)
            assert 0 <= rel_l2 < 100 * tol["rtol"], (name, q, rel_l2)
        assert row["rel_l2_err"] > 0  # float32 never matches float64 exactly

    triton_row, native_row = rows["triton_single_pass"], rows["torch_native"]
    assert native_row["median_ms"] > 0 and native_row["p20_ms"] <= native_row["median_ms"] \
        <= native_row["p80_ms"]
    assert native_row["gbps"] == pytest.approx(case.bytes_moved / native_row["median_ms"] / 1e6)
    if kernels.INTERPRETED:
        assert triton_row["backend"] == "triton_interpreter"
        assert "median_ms" not in triton_row and "gbps" not in triton_row
    else:
        assert triton_row["backend"] == "triton"
        assert triton_row["median_ms"] > 0
    assert native_row["backend"] == ("aten_native" if DEVICE == "cuda" else "aten_cpu")

    # the wrong implementation shows its error: y is off by exactly 0.01
    assert rows["broken"]["status"] == "ok"
    assert rows["broken"]["max_abs_err"] == pytest.approx(0.01, rel=1e-3)
    assert rows["failing"]["status"] == "error"
    assert rows["failing"]["error"] == "RuntimeError: boom"
    assert "median_ms" not in rows["failing"]


def _fusion_dropped(drop):
    """A build that computes the fused op but leaves `drop` ("relu" or "residual") out."""
    def build():
        def fn(x, running_mean, running_var, weight, bias, training, momentum, eps,
               residual=None, relu=False):
            y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
            if residual is not None and drop != "residual":
                y = y + residual
            return torch.relu(y) if relu and drop != "relu" else y
        return fn
    return build


NO_RELU = Impl("no_relu", "baseline", ("train_fwd_bwd", "eval"), _fusion_dropped("relu"),
               _no_check)
NO_RESIDUAL = Impl("no_residual", "baseline", ("train_fwd_bwd", "eval"),
                   _fusion_dropped("residual"), _no_check)


def _f64_batch_norm(case, inputs):
    """relu(bn(x) + r) written out in float64: y, and the batch's mean and biased variance."""
    x = inputs.x.double()
    if case.training:
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    else:
        var, mean = inputs.running_var.double(), inputs.running_mean.double()
    y = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + numerics.EPS)
    y = y * inputs.weight.double().view(1, -1, 1, 1) + inputs.bias.double().view(1, -1, 1, 1)
    if inputs.residual is not None:
        y = y + inputs.residual.double()
    return torch.relu(y) if case.epilogue.activation == "relu" else y


@pytest.mark.parametrize("mode", ["train_fwd_bwd", "eval"])
def test_fused_reference_is_relu_of_bn_plus_residual(mode):
    case = Case(mode, 3, 5, 9, 7, "bfloat16", "nhwc", "residual+relu")
    inputs = numerics.make_inputs(case, DEVICE)
    assert inputs.residual.dtype == torch.bfloat16
    assert inputs.residual.is_contiguous(memory_format=torch.channels_last)
    ref = numerics.reference(case, inputs)
    torch.testing.assert_close(ref["y"], _f64_batch_norm(case, inputs), rtol=1e-12, atol=1e-12)
    assert (ref["y"] == 0).float().mean() > 0.2  # relu clips a good part of the values
    if mode == "train_fwd_bwd":
        # dr = dy where relu passes, 0 where it clips
        dy = inputs.dy.double()
        torch.testing.assert_close(ref["dresidual"], torch.where(ref["y"] > 0, dy, 0.0))
    plain = numerics.reference(Case(mode, 3, 5, 9, 7, "bfloat16", "nhwc"), inputs)
    assert (ref["y"] - plain["y"]).abs().max() > 0.5  # the fusion changes y a lot


@pytest.mark.parametrize("mode, triton", [("train_fwd_bwd", "triton_single_pass"),
                                          ("eval", "triton_eval")])
def test_fused_rows_errors_and_a_dropped_fusion(mode, triton):
    case = Case(mode, 3, 5, 9, 7, "float32", "nchw", "residual+relu")  # odd sizes
    opts = runner.Options(device=DEVICE, interpreted=kernels.INTERPRETED, warmup_ms=1, rep_ms=5)
    impls = [IMPLS[triton], IMPLS["torch_native"], NO_RELU, NO_RESIDUAL]
    rows = {row["impl"]: row for row in runner.run_case(case, impls, opts)}
    tol = TOL[torch.float32]
    quantities = numerics.quantities(case)
    assert ("dresidual" in quantities) == (mode == "train_fwd_bwd")
    for name in [triton, "torch_native"]:
        row = rows[name]
        assert row["status"] == "ok" and row["fusion"] == "residual+relu", row.get("error")
        for q in quantities:
            max_abs, rel_l2 = (row[c] for c in numerics.error_columns(q))
            assert 0 <= max_abs < 100 * tol["atol"], (name, q, max_abs)
            assert 0 <= rel_l2 < 100 * tol["rtol"], (name, q, rel_l2)
        assert row["rel_l2_err"] > 0
    assert rows["torch_native"]["gbps"] == pytest.approx(
        case.bytes_moved / rows["torch_native"]["median_ms"] / 1e6)
    # leaving the relu out shows in y (and in dr, dx)
    assert rows["no_relu"]["status"] == "ok"
    assert rows["no_relu"]["max_abs_err"] > 0.5 and rows["no_relu"]["rel_l2_err"] > 0.1
    if mode == "train_fwd_bwd":
        assert rows["no_relu"]["dresidual_rel_l2_err"] > 0.1
        assert rows["no_relu"]["dx_rel_l2_err"] > 0.1
        # leaving the residual out leaves it without a gradient: the row fails
        assert rows["no_residual"]["status"] == "error"
        assert "returned no value" in rows["no_residual"]["error"]
    else:  # or shows in y
        assert rows["no_residual"]["status"] == "ok"
        assert rows["no_residual"]["max_abs_err"] > 0.5
        assert rows["no_residual"]["rel_l2_err"] > 0.1


def _unfolded_build():
    """conv_bn_eval done wrong: the conv without its batch norm."""
    def prepare(conv, bn):
        def fn(x, residual=None, relu=False):
            return conv(x)
        return fn
    return prepare


UNFOLDED = Impl("bn_forgotten", "baseline", CONV_MODES, _unfolded_build, _no_check)


@pytest.mark.parametrize("dtype, fusion", [("float32", "none"), ("bfloat16", "residual+relu")])
def test_conv_bn_eval_rows(dtype, fusion):
    case = Case("conv_bn_eval", 2, 5, 9, 7, dtype, "nhwc", fusion)  # odd sizes
    inputs = numerics.make_inputs(case, DEVICE)
    conv, bn = inputs.conv, inputs.bn
    assert conv.weight.dtype == getattr(torch, dtype) and not bn.training
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # running statistics near the conv output's own, never ~0
    with torch.no_grad():
        z = conv(inputs.x).double()
    var = z.var(dim=(0, 2, 3), correction=0)
    assert (bn.running_var > 0.01).all()
    assert ((bn.running_var / var) > 0.7).all() and ((bn.running_var / var) < 1.4).all()
    # the reference, written out: bn(conv(x)) [+ r, relu] in float64
    z64 = F.conv2d(inputs.x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    y64 = (z64 - bn.running_mean.double().view(1, -1, 1, 1)) \
        / torch.sqrt(bn.running_var.double().view(1, -1, 1, 1) + bn.eps) \
        * bn.weight.double().view(1, -1, 1, 1) + bn.bias.double().view(1, -1, 1, 1)
    if case.residual:
        y64 = torch.relu(y64 + inputs.residual.double())
    torch.testing.assert_close(numerics.reference(case, inputs)["y"], y64, rtol=1e-12,
                               atol=1e-12)

    opts = runner.Options(device=DEVICE, interpreted=kernels.INTERPRETED, warmup_ms=1, rep_ms=5)
    impls = [IMPLS["conv+cudnn"], IMPLS["conv+triton_eval"], IMPLS["folded"], UNFOLDED]
    rows = {row["impl"]: row for row in runner.run_case(case, impls, opts)}
    tol = TOL[getattr(torch, dtype)]
    for name in ["conv+cudnn", "conv+triton_eval", "folded"]:
        row = rows[name]
        assert row["status"] == "ok", row.get("error")
        assert 0 < row["max_abs_err"] < 100 * tol["atol"], (name, row["max_abs_err"])
        assert 0 < row["rel_l2_err"] < 10 * tol["rtol"], (name, row["rel_l2_err"])
        assert row["backend"].startswith("conv:") and "conv:unknown" not in row["backend"]
    # folding rounds the scaled weights once: the error stays of the same order
    assert rows["folded"]["rel_l2_err"] < 10 * rows["conv+cudnn"]["rel_l2_err"]
    assert rows["folded"]["backend"].endswith("+bn:none")
    assert rows["conv+triton_eval"]["backend"].endswith(
        "+bn:triton_interpreter" if kernels.INTERPRETED else "+bn:triton")
    assert rows["bn_forgotten"]["rel_l2_err"] > 0.1
    for name in ["conv+cudnn", "folded"]:
        assert rows[name]["median_ms"] > 0
        assert rows[name]["gbps"] == pytest.approx(case.bytes_moved / rows[name]["median_ms"]
                                                   / 1e6)
    assert ("median_ms" in rows["conv+triton_eval"]) != kernels.INTERPRETED


def test_interpreter_size_limit_skips_triton_rows_only():
    big = Case("eval", 1, 2, runner.INTERPRETER_MAX_NUMEL, 1, "float32", "nchw")
    opts = runner.Options(device=DEVICE, interpreted=True)
    row = runner.run_impl(IMPLS["triton_eval"], big, None, None, opts)
    assert row["status"] == "skipped"
    assert row["error"].startswith("too large for Triton's interpreter")


def test_csv_writer_flushes_each_row(tmp_path):
    path = tmp_path / "run.csv"
    writer = report.CsvWriter(path, {"device": "test-device"})
    writer.write(dict(impl="torch_native", mode="eval", N=2, C=3, H=4, W=5, dtype="float32",
                      layout="nchw", status="ok", median_ms=0.5, max_abs_err=1e-7))
    df = pd.read_csv(path)  # read while the writer is still open, as after a crash
    assert list(df.columns) == list(report.COLUMNS)
    assert len(df) == 1 and df["device"][0] == "test-device" and df["median_ms"][0] == 0.5
    with pytest.raises(ValueError):
        writer.write(dict(not_a_column=1))
    writer.close()


def _row(impl, backend, N, ms, status="ok", mode="eval", fusion="none"):
    return dict(impl=impl, backend=backend, mode=mode, N=N, C=3, H=4, W=5, dtype="float32",
                layout="nchw", fusion=fusion, status=status, median_ms=ms, gbps=1.0,
                max_abs_err=1e-7, rel_l2_err=1e-8, frac_copy_bw=0.5)


def test_speedup_only_over_rows_where_cudnn_ran():
    df = pd.DataFrame([
        _row("cudnn", "cudnn", 1, 2.0), _row("triton_eval", "triton", 1, 1.0),
        _row("cudnn", "cudnn", 2, 2.0), _row("triton_eval", "triton", 2, 0.5),
        # PyTorch routed this cudnn row to ATen: no speed-up is taken against it
        _row("cudnn", "aten_native", 4, 1.0), _row("triton_eval", "triton", 4, 0.25),
        # a fused case is held against the cudnn row of the same fusion only
        _row("cudnn", "cudnn", 1, 3.0, fusion="relu"),
        _row("triton_eval", "triton", 1, 1.0, fusion="relu"),
        # conv_bn_eval: against conv+cudnn, whatever ran its batch norm
        _row("conv+cudnn", "conv:onednn+bn:aten_cpu", 1, 5.0, mode="conv_bn_eval"),
        _row("folded", "conv:onednn+bn:none", 1, 4.0, mode="conv_bn_eval"),
    ]).reindex(columns=list(report.COLUMNS))
    out, base = report.with_speedup(df)
    assert base == "cudnn"
    plain = out[out["fusion"] == "none"]
    triton = plain[plain["impl"] == "triton_eval"].set_index("N")["speedup"]
    assert triton[1] == pytest.approx(2.0) and triton[2] == pytest.approx(4.0)
    assert pd.isna(triton[4])
    relu = out[(out["fusion"] == "relu") & (out["impl"] == "triton_eval")]
    assert relu["speedup"].tolist() == [pytest.approx(3.0)]
    folded = out[out["impl"] == "folded"]
    assert folded["speedup"].tolist() == [pytest.approx(1.25)]
    assert folded["baseline"].tolist() == ["conv+cudnn"]
    table = report.summary(df).set_index(["fusion", "impl"])
    assert table.loc[("none", "triton_eval"), "speedup"] == pytest.approx(math.sqrt(8.0))
    assert table.loc[("none", "triton_eval"), "over"] == "cudnn"
    assert table.loc[("none", "cudnn"), "backend"] == "aten_native,cudnn"
    assert table.loc[("none", "folded"), "over"] == "conv+cudnn"
    assert table.loc[("none", "folded"), "speedup"] == pytest.approx(1.25)


def test_profiler_failure_leaves_the_row_with_an_unknown_backend(monkeypatch):
    def broken_profiler(step, device):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED")

    monkeypatch.setattr(backends, "observe", broken_profiler)
    case = Case("eval", 2, 3, 5, 7, "float32", "nhwc")
    opts = runner.Options(device=DEVICE, interpreted=kernels.INTERPRETED, warmup_ms=1, rep_ms=5)
    (row,) = runner.run_case(case, [IMPLS["torch_native"]], opts)
    assert row["status"] == "ok" and row["backend"] == "unknown"
    assert row["error"] == "backend not identified: RuntimeError: CUPTI_ERROR_NOT_INITIALIZED"
    assert row["median_ms"] > 0 and row["rel_l2_err"] < 1e-5


@pytest.mark.quick
def test_quick_runs_are_named_quick():
    """A quick run (the default without a GPU) never writes over a full run's CSV."""
    from bnbench import run

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    run.add_parser(sub)
    for argv, device, label in [(["run", "--quick"], "cuda", "quick"),
                                (["run"], "cpu", "quick"), (["run"], "cuda", "resnet50")]:
        _, got = run.resolve(parser.parse_args(argv), device)
        assert got == label, (argv, device)


def _git(*args):
    import subprocess

    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


@pytest.mark.quick
def test_provenance_in_a_checkout_and_outside_git(tmp_path, monkeypatch):
    import importlib.metadata
    import shutil
    import subprocess
    import sys

    from bnbench import environment

    # in the checkout: HEAD, "-dirty" when kernels/ or bnbench/ differ from it
    head = _git("rev-parse", "HEAD").stdout.strip()
    commit = environment.git_commit()
    dirty = _git("diff", "--quiet", "HEAD", "--", "kernels", "bnbench").returncode == 1
    assert commit == head + ("-dirty" if dirty else "")
    version = importlib.metadata.version("bnbench")
    fields = environment.metadata("cpu", interpreted=True, method="test")
    assert (fields["bnbench_version"], fields["git_commit"]) == (version, commit)
    assert "bnbench_version" in report.COLUMNS
    # a copy of the package outside git (as `pip install .` leaves it): the version, and
    # "unknown" for the commit, since pip recorded none
    copy = tmp_path / "site"
    shutil.copytree(ROOT / "bnbench", copy / "bnbench",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run(
        [sys.executable, "-c", "import bnbench.environment as e, json; "
         "print(e.__file__); print(json.dumps({'bnbench_version': e.package_version(), "
         "'git_commit': e.git_commit()}))"],
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(copy)},
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    where, provenance = out.stdout.splitlines()
    assert where.startswith(str(copy))
    assert json.loads(provenance) == {"bnbench_version": version,
                                                    "git_commit": "unknown"}
    # installed from a git URL: the commit pip wrote in direct_url.json

    class Dist:
        def read_text(self, name):
            assert name == "direct_url.json"
            return '{"url": "https://example.org/bnbench.git", "vcs_info": ' \
                   '{"vcs": "git", "commit_id": "0123abcd"}}'
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist())
    assert environment.git_commit(root=tmp_path) == "0123abcd"


@pytest.mark.quick
def test_summary_fits_100_columns_and_explains_every_column():
    df = report.read(ROOT / "results" / "run_quick_cpu.csv")
    text = report.format_summary(report.summary(df), df)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    header = next(line for line in lines if line.lstrip().startswith("impl"))
    legend = text[text.rindex("\n\n"):]
    for column in header.split():
        assert f"{column}:" in legend or f"{column}," in legend, column
    assert "-: not measured" in legend and "torch_native's time" in legend
    shapes = ", ".join(f"{c}x{h}x{w}" for c, h, w in sorted(set(zip(df.C, df.H, df.W))))
    assert f"shapes CxHxW: {shapes}; batch sizes N: 2, 8" in text
    # one block per case, its rows under it
    assert "\ntrain_fwd_bwd none bfloat16 nhwc\n  triton_two_pass " in text


def test_coinciding_errors_are_named():
    from bnbench.plot import coinciding

    values = {"triton_two_pass": [1e-3, 2e-7], "triton_single_pass": [1e-3, 2e-7],
              "torch_native": [1e-3, 3e-7]}
    assert coinciding(values, ["y", "dx"]) == ["two_pass = single_pass = native: y",
                                               "two_pass = single_pass: dx"]
    assert coinciding({"a": [1.0], "b": [2.0]}, ["y"]) == []


@pytest.mark.quick
def test_cpu_plots_show_the_kernels_errors_and_no_copy_line(tmp_path):
    """On a CPU run: the error figure has a marker series per implementation, the Triton
    kernels included, and notes equal errors; titles name shapes and batch sizes; no
    copy-bandwidth line; untimed implementations named in the speed panels."""
    from matplotlib.image import imread

    from bnbench import plot

    figures = {}
    real_savefig = __import__("matplotlib.figure").figure.Figure.savefig

    def keep(fig, path, **kw):
        figures[Path(path).stem.rsplit("_", 1)[1]] = fig
        return real_savefig(fig, path, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr("matplotlib.figure.Figure.savefig", keep)
    try:
        paths = plot.draw(ROOT / "results" / "run_quick_cpu.csv", tmp_path)
    finally:
        mp.undo()
    assert [p.name for p in paths] == [f"run_quick_cpu_{k}.png" for k in plot.KINDS]
    assert imread(paths[2]).shape[1] > 1000
    error = figures["error"]
    labels = {line.get_label() for ax in error.axes for line in ax.get_lines()}
    assert {"triton_two_pass", "triton_single_pass", "triton_eval", "torch_native"} <= labels
    for ax in error.axes:
        for line in ax.get_lines():
            assert line.get_marker() not in (None, "", "None") and line.get_linestyle() == "None"
        assert ax.get_yscale() == "log"
    notes = " ".join(t.get_text() for ax in error.axes for t in ax.texts)
    assert "equal errors:" in notes and "two_pass = single_pass" in notes
    for kind, fig in figures.items():
        title = fig._suptitle.get_text().replace("\n", " ")
        assert "32x9x7" in title and "batch sizes N 2, 8" in title, (kind, title)
        assert "copy bandwidth" not in {line.get_label() for ax in fig.axes
                                        for line in ax.get_lines()}
    speed_notes = " ".join(t.get_text() for ax in figures["throughput"].axes for t in ax.texts)
    assert "not timed: triton_single_pass, triton_two_pass" in speed_notes
    assert "No copy-bandwidth line on a CPU" in figures["throughput"]._suptitle.get_text() \
        .replace("\n", " ")


@pytest.mark.quick
def test_committed_results_are_not_replaced_without_out(tmp_path):
    from bnbench import environment

    results = ROOT / "results"
    assert environment.committed(results / "run_quick_cpu.csv")
    assert not environment.committed(results / "no_such_run.csv")
    (tmp_path / "x.csv").write_text("x")
    assert not environment.committed(tmp_path / "x.csv")  # outside the checkout
    local = tmp_path / "local"
    out, note = environment.keep_committed(results, ["run_quick_cpu.csv"], explicit=False,
                                           local=local)
    assert out == local and "run_quick_cpu.csv is a committed result" in note
    assert f"--out {results}" in note
    assert environment.keep_committed(results, ["run_quick_cpu.csv"], explicit=True,
                                      local=local) == (results, None)
    assert environment.keep_committed(tmp_path, ["x.csv"], explicit=False,
                                      local=local) == (tmp_path, None)


def _silu_dropped_build():
    """A build that adds the residual but leaves the SiLU out."""
    def fn(x, running_mean, running_var, weight, bias, training, momentum, eps, residual=None,
           activation=None):
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        return y + residual if residual is not None else y
    return fn


NO_SILU = Impl("no_silu", "baseline", ("train_fwd_bwd", "eval"), _silu_dropped_build, _no_check)


@pytest.mark.parametrize("fusion", ["silu", "residual+silu"])
@pytest.mark.parametrize("mode, triton", [("train_fwd_bwd", "triton_two_pass"),
                                          ("eval", "triton_eval")])
def test_silu_fusion_rows(mode, triton, fusion):
    """--fusions silu / residual+silu: the reference is silu(bn(x) [+ r]) in float64, the
    Triton kernels and F.batch_norm-then-F.silu agree with it, and a SiLU left out shows."""
    case = Case(mode, 3, 5, 9, 7, "float32", "nhwc", fusion)
    assert case.epilogue.activation == "silu" and case.residual == fusion.startswith("residual")
    inputs = numerics.make_inputs(case, DEVICE)
    ref = numerics.reference(case, inputs)
    # bn(x) [+ r] without activation (_f64_batch_norm adds inputs.residual when there is one)
    z = _f64_batch_norm(Case(mode, 3, 5, 9, 7, "float32", "nhwc", "none"), inputs)
    torch.testing.assert_close(ref["y"], F.silu(z), rtol=1e-12, atol=1e-12)
    opts = runner.Options(device=DEVICE, interpreted=kernels.INTERPRETED, warmup_ms=1, rep_ms=5)
    rows = {row["impl"]: row for row in runner.run_case(
        case, [IMPLS[triton], IMPLS["torch_native"], NO_SILU], opts)}
    tol = TOL[torch.float32]
    for name in [triton, "torch_native"]:
        row = rows[name]
        assert row["status"] == "ok" and row["fusion"] == fusion, row.get("error")
        for q in numerics.quantities(case):
            max_abs, rel_l2 = (row[c] for c in numerics.error_columns(q))
            assert 0 <= max_abs < 100 * tol["atol"], (name, q, max_abs)
            assert 0 <= rel_l2 < 100 * tol["rtol"], (name, q, rel_l2)
    assert rows["no_silu"]["status"] == "ok" and rows["no_silu"]["rel_l2_err"] > 0.1
