"""The harness's parts, in process: shapes, bytes, errors, backend labels, the runner, the CSV.

The runner test runs the real kernels (compiled on a GPU, interpreted on CPU) on
one tiny case, next to an implementation that is deliberately wrong and one
that raises, so that the error columns and the error handling can be seen to work.
"""

import argparse
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import kernels
from bnbench import backends, numerics, report, runner
from bnbench.cases import Case, gbps, make_cases
from bnbench.impls import IMPLS, Impl
from bnbench.shapes import SHAPE_SETS, parse_shapes, resnet50_bn_shapes
from helpers import TOL

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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


def _broken_build():
    def fn(x, running_mean, running_var, weight, bias, training, momentum, eps):
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
        for q in numerics.MODE_QUANTITIES["train_fwd_bwd"]:
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


def _row(impl, backend, N, ms, status="ok"):
    return dict(impl=impl, backend=backend, mode="eval", N=N, C=3, H=4, W=5, dtype="float32",
                layout="nchw", status=status, median_ms=ms, gbps=1.0, max_abs_err=1e-7,
                rel_l2_err=1e-8, frac_copy_bw=0.5)


def test_speedup_only_over_rows_where_cudnn_ran():
    df = pd.DataFrame([
        _row("cudnn", "cudnn", 1, 2.0), _row("triton_eval", "triton", 1, 1.0),
        _row("cudnn", "cudnn", 2, 2.0), _row("triton_eval", "triton", 2, 0.5),
        # PyTorch routed this cudnn row to ATen: no speed-up is taken against it
        _row("cudnn", "aten_native", 4, 1.0), _row("triton_eval", "triton", 4, 0.25),
    ]).reindex(columns=list(report.COLUMNS))
    out, base = report.with_speedup(df)
    assert base == "cudnn"
    triton = out[out["impl"] == "triton_eval"].set_index("N")["speedup"]
    assert triton[1] == pytest.approx(2.0) and triton[2] == pytest.approx(4.0)
    assert pd.isna(triton[4])
    table = report.summary(df).set_index("impl")
    assert table.loc["triton_eval", "x_vs_cudnn"] == pytest.approx(math.sqrt(8.0))
    assert table.loc["cudnn", "backend"] == "aten_native,cudnn"


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
