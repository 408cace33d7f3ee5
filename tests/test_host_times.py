"""bnbench run's host-cost columns (issue 18): wall_us (calls back to back, one
synchronisation per round) and graph_us (CUDA-graph replays), measured on CUDA only; empty
on a CPU run; the host figure drawn from them.  The CUDA parts skip on CPU naming the reason
(bnbench gpu-day's host-cost stage runs them)."""

from pathlib import Path

import pandas as pd
import pytest
import torch

import kernels
from bnbench import plot, report, runner, timing
from bnbench.cases import Case
from bnbench.impls import IMPLS

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="wall and CUDA-graph times need a CUDA GPU")


def test_wall_per_call_calls_back_to_back_and_resets_the_grads():
    leaf = torch.ones(3, requires_grad=True)
    seen = []

    def fn():
        seen.append(leaf.grad)
        leaf.grad = torch.zeros(3)
    us = timing.wall_per_call_us(fn, "cpu", [leaf], calls=4, rounds=3)
    assert us > 0
    assert len(seen) == 1 + 4 * 3 and all(g is None for g in seen)


def test_the_run_csv_has_the_columns_and_a_cpu_run_leaves_them_empty():
    assert {"wall_us", "graph_us"} <= set(report.SPEED_COLUMNS) <= set(report.COLUMNS)
    if torch.cuda.is_available():
        pytest.skip("a CPU run's rows: this machine has a GPU")
    case = Case("train_fwd_bwd", 3, 5, 9, 7, "float32", "nchw")
    opts = runner.Options(device="cpu", interpreted=kernels.INTERPRETED, warmup_ms=1, rep_ms=2)
    (row,) = runner.run_case(case, [IMPLS["torch_native"]], opts)
    assert row["status"] == "ok" and row["median_ms"] > 0
    assert "wall_us" not in row and "graph_us" not in row


def _gpu_like(tmp_path, with_host=True):
    """The committed CPU run as if from a GPU: timed rows with wall and graph times."""
    df = report.read(ROOT / "results" / "run_quick_cpu.csv")
    df = df[df["impl"] == "torch_native"].copy()
    df["device_type"], df["device"] = "cuda", "a GPU"
    if with_host:
        df["wall_us"] = df["median_ms"] * 1e3 + 20
        df["graph_us"] = df["median_ms"] * 1e3 + 2
    path = tmp_path / "run_gpu.csv"
    df.reindex(columns=list(report.COLUMNS)).to_csv(path, index=False)
    return path


def test_the_host_figure_is_drawn_from_wall_and_graph_times(tmp_path):
    paths = plot.draw(_gpu_like(tmp_path), tmp_path)
    assert [p.name for p in paths] == [f"run_gpu_{k}.png" for k in (*plot.KINDS, plot.HOST_KIND)]
    assert all(p.stat().st_size > 0 for p in paths)


def test_no_host_figure_without_wall_times(tmp_path):
    paths = plot.draw(_gpu_like(tmp_path, with_host=False), tmp_path)
    assert [p.name for p in paths] == [f"run_gpu_{k}.png" for k in plot.KINDS]
    assert not plot.has_host_times(pd.read_csv(tmp_path / "run_gpu.csv"))


@needs_cuda
def test_host_times_of_a_capturable_call_and_of_one_that_syncs():
    x = torch.randn(2, 8, 4, 4, device="cuda")
    rm, rv = torch.zeros(8, device="cuda"), torch.ones(8, device="cuda")
    t = timing.host_times(lambda: kernels.batch_norm(x, rm, rv, training=True), median_ms=0.01,
                          rep_ms=5)
    assert t.wall_us > 0 and t.graph_us > 0 and t.graph_error is None
    bad = timing.host_times(lambda: x.sum().item(), median_ms=0.01, rep_ms=5)
    assert bad.wall_us > 0 and bad.graph_us is None and bad.graph_error
    # the device still works after a failed capture
    assert torch.isfinite(kernels.batch_norm(x, rm, rv, training=True)).all()
