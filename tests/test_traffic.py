"""The memory-traffic, launch and parallelism targets (issue 5), counted by `bnbench traffic`.

Bytes are counted by running the real kernels through Triton's interpreter with their
global loads and stores hooked (a subprocess, so the suite stays device-agnostic).
"""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bnbench.traffic import parallelism_table

ROOT = Path(__file__).resolve().parents[1]
SHAPES = "12x4x28x28,160x4x7x7,8x16x7x7"  # like (32,64,56,56), (256,2048,7,7), (2048,7,7) N<=64


def _traffic(tmp_path, *extra):
    out = subprocess.run(
        [sys.executable, "-m", "bnbench.cli", "traffic", "--shapes", SHAPES, "--out",
         str(tmp_path), "--no-parallelism", *extra],  # a later --shapes overrides
        cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "not speeds" in out.stdout
    return pd.read_csv(tmp_path / "traffic.csv")


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    return _traffic(tmp_path_factory.mktemp("traffic"), "--fusions", "none")


def _rows(df, op, path, stats=None):
    sel = df[(df.op == op) & (df.path == path)]
    if stats:
        sel = sel[sel.stats == stats]
    assert len(sel) >= 2, f"no {op} {stats or ''} rows on the {path} path"
    assert set(sel.layout) == {"nchw", "nhwc"}
    return sel


@pytest.mark.parametrize("op, stats, path, max_bytes, max_launches", [
    ("train_fwd", "single_pass", "general", 12, 2),   # x read twice, y written once
    ("train_fwd", "two_pass", "general", 16, 3),      # x read three times
    ("train_bwd", None, "general", 20, 2),            # x and dy read twice, dx written once
    ("eval", None, "general", 8, 1),                  # x read once, y written once
    ("train_fwd", "single_pass", "single_launch", 8, 1),
    ("train_fwd", "two_pass", "single_launch", 8, 1),
    ("train_bwd", None, "single_launch", 12, 1),
])
def test_traffic_targets(traffic, op, stats, path, max_bytes, max_launches):
    rows = _rows(traffic, op, path, stats)
    for _, r in rows.iterrows():
        case = f"{op} {r.stats} {r.layout} {r.N}x{r.C}x{r.H}x{r.W}"
        assert r.elem_B_per_elem <= max_bytes + 1e-9, f"{case}: {r.elem_B_per_elem} B/elem"
        assert r.elem_B_per_elem >= r.min_B_per_elem - 1e-9, f"{case}: below the minimum"
        assert r.launches <= max_launches, f"{case}: {r.launches} launches"
        # statistics, partials and parameters are small and counted apart
        assert 0 < r.per_channel_B_per_elem < 0.5, f"{case}: {r.per_channel_B_per_elem}"


def test_counts_are_exact_where_the_op_is_at_the_floor(traffic):
    """Eval and the single-launch path read and write each element exactly once: the
    counter must report exactly 4 B read and 4 B written per fp32 element."""
    exact = traffic[(traffic.op == "eval") | (traffic.path == "single_launch")]
    exact = exact[exact.op != "train_bwd"]
    assert len(exact) >= 4
    assert (exact.read_B_per_elem == 4.0).all() and (exact.write_B_per_elem == 4.0).all()


def test_fused_residual_relu_traffic(tmp_path):
    """With relu(bn(x) + residual) the residual adds one read forward; backward writes its
    gradient and reads y for the ReLU mask (in both passes on the general path)."""
    df = _traffic(tmp_path, "--fusions", "residual+relu", "--layouts", "nchw",
                  "--shapes", "12x4x28x28,8x16x7x7")
    fwd = df[(df.op == "train_fwd") & (df.stats == "single_pass")]
    assert (fwd[fwd.path == "general"].elem_B_per_elem <= 16).all()
    assert (fwd[fwd.path == "single_launch"].elem_B_per_elem == 12).all()
    bwd = df[df.op == "train_bwd"]
    assert (bwd[bwd.path == "general"].elem_B_per_elem <= 32).all()  # 2x (x, dy, y) + dx, dres
    assert (bwd[bwd.path == "single_launch"].elem_B_per_elem == 20).all()


def test_fused_silu_traffic(tmp_path):
    """A fused SiLU moves nothing more than the plain op (its input z is recomputed from x in
    the backward); after a residual, forward reads r once more and backward reads r again
    (for z) and writes its gradient: the same bytes as residual+relu, which reads y."""
    df = _traffic(tmp_path, "--fusions", "none,silu,residual+silu", "--layouts", "nchw,nhwc",
                  "--shapes", "12x4x28x28,8x16x7x7")
    key = ["op", "stats", "layout", "N", "C", "H", "W", "path"]
    plain = df[df.fusion == "none"].set_index(key).elem_B_per_elem
    silu = df[df.fusion == "silu"].set_index(key).elem_B_per_elem
    assert len(silu) == len(plain) >= 8 and (silu == plain.loc[silu.index]).all()
    res = df[df.fusion == "residual+silu"]
    fwd = res[res.op == "train_fwd"]
    assert (fwd[fwd.path == "single_launch"].elem_B_per_elem == 12).all()
    assert (res[(res.op == "eval")].elem_B_per_elem == 12).all()
    bwd = res[res.op == "train_bwd"]
    assert (bwd[bwd.path == "general"].elem_B_per_elem <= 32).all()  # 2x (x, dy, r) + dx, dres
    assert (bwd[bwd.path == "single_launch"].elem_B_per_elem == 20).all()
    assert (res.min_B_per_elem == res.op.map({"train_fwd": 12, "eval": 12, "train_bwd": 20})).all()


@pytest.mark.quick
def test_parallelism_fills_an_h100():
    """ResNet-50's BatchNorm shapes at batch >= 32: every launch has >= 2 x 132 programs,
    whatever C is, in both layouts and every op (launches recorded on meta tensors)."""
    rows = pd.DataFrame(parallelism_table(batches=(32, 64, 256)))
    assert set(rows.C) >= {64, 256, 512, 1024, 2048}
    thin = rows[rows.min_programs < 2 * 132]
    assert thin.empty, thin.to_string()


def test_single_launch_path_taken_for_late_layers():
    """(2048, 7, 7) at N <= 64 in NCHW takes the single-launch path (one launch each way)."""
    rows = pd.DataFrame(parallelism_table(batches=(1, 8, 32, 64), layouts=("nchw",)))
    late = rows[(rows.C == 2048) & (rows.op != "eval")]
    assert (late.path == "single_launch").all() and (late.launches == 1).all()
