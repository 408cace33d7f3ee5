"""One metadata stamp for every CSV bnbench writes (issue 13).

``bnbench.environment.STAMP_COLUMNS`` is the schema; :func:`metadata` fills it and
:func:`stamp` puts it first in a DataFrame.  Every writer (run, train, gpu-day, comm, zoo,
inspect, traffic/parallelism) must start its CSV with those columns, in that order, with no
empty value and none of the old per-writer names (commit, torch, triton, counted_with).
The writers are run here where that is cheap: traffic for real (one tiny shape), comm, zoo,
inspect and gpu-day with their measurement replaced by a stand-in, run and train through
their column lists and CsvWriter (tests/test_cli.py and tests/test_train.py run them).
"""

import csv
import os
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from bnbench import environment, report
from bnbench.environment import STAMP_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ("timestamp", "bnbench_version", "git_commit", "device", "device_type",
          "torch_version", "triton_version", "cuda_version", "cudnn_version", "triton_mode",
          "tf32", "method")
OLD_NAMES = {"commit", "torch", "triton", "counted_with", "timm", "torchvision"}


def assert_stamped(path, method=None):
    """The CSV at `path` starts with the stamp, every stamp cell filled; returns it."""
    df = pd.read_csv(path, keep_default_na=False)
    assert list(df.columns[:len(STAMP_COLUMNS)]) == list(STAMP_COLUMNS), list(df.columns)
    assert not OLD_NAMES & set(df.columns), OLD_NAMES & set(df.columns)
    assert len(df) > 0
    for column in STAMP_COLUMNS:
        assert (df[column].astype(str) != "").all() and df[column].nunique() == 1, column
    if method is not None:
        assert set(df["method"]) == {method}
    return df


@pytest.mark.quick
def test_the_schema_and_its_order():
    assert STAMP_COLUMNS == SCHEMA
    fields = environment.metadata("cpu", interpreted=True, method="how")
    assert tuple(fields) == SCHEMA
    assert fields["device_type"] == "cpu" and fields["device"].startswith("cpu: ")
    assert fields["triton_mode"] == "interpreter" and fields["method"] == "how"
    assert fields["tf32"] == "none"  # does not apply: written "none", not left out
    none = environment.metadata(None, interpreted=False, method="compiled", tf32="off (x)")
    assert tuple(none) == SCHEMA
    assert (none["device"], none["device_type"], none["triton_mode"], none["tf32"]) == (
        "none", "none", "compiled", "off (x)")
    assert all(value not in ("", None) for value in {**fields, **none}.values())


@pytest.mark.quick
def test_stamp_puts_the_columns_first_and_keeps_the_rest():
    df = pd.DataFrame({"a": [1, 2], "device": ["old", "old"], "b": ["x", "y"]}, index=[5, 7])
    out = environment.stamp(df, "cpu", interpreted=True, method="m")
    assert list(out.columns) == [*SCHEMA, "a", "b"]
    assert list(out.index) == [5, 7] and list(out["a"]) == [1, 2] and list(out["b"]) == ["x", "y"]
    assert (out["device_type"] == "cpu").all() and (out["device"] != "old").all()
    assert list(environment.stamp(df.iloc[:0], "cpu", interpreted=True, method="m").columns) \
        == [*SCHEMA, "a", "b"]


@pytest.mark.quick
def test_run_and_train_columns_start_with_the_stamp(tmp_path):
    from bnbench import train

    assert report.COLUMNS[:len(SCHEMA)] == SCHEMA and report.RUN_COLUMNS[len(SCHEMA):] == (
        "copy_gbps",)
    assert train.COLUMNS[:len(SCHEMA)] == SCHEMA
    # bnbench run's (and gpu-day's) writer, with the run's fields as run_command builds them
    from bnbench import run

    fields = environment.metadata("cpu", interpreted=True, tf32="off (test)",
                                  method=run.method("cpu", True))
    fields["copy_gbps"] = 10.0
    with report.CsvWriter(tmp_path / "run.csv", fields) as writer:
        writer.write(dict(impl="torch_native", mode="eval", status="ok"))
    df = assert_stamped(tmp_path / "run.csv", method=run.method("cpu", True))
    assert "perf_counter" in df["method"][0] and "do_bench" in run.method("cuda", False)


def test_traffic_csv(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "bnbench.cli", "traffic", "--shapes", "2x3x5x5", "--fusions",
         "none", "--layouts", "nchw", "--no-parallelism", "--out", str(tmp_path)],
        cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    df = assert_stamped(tmp_path / "traffic.csv",
                        method="triton interpreter (CPU); programs planned for 132 SMs")
    assert set(df["triton_mode"]) == {"interpreter"} and "read_B_per_elem" in df
    # parallelism.csv goes through the same _stamp
    from bnbench.traffic import _stamp

    _stamp(pd.DataFrame({"op": ["eval"], "min_programs": [3]})).to_csv(
        tmp_path / "parallelism.csv", index=False)
    assert_stamped(tmp_path / "parallelism.csv")


def test_comm_csv(tmp_path, monkeypatch):
    from bnbench import comm

    measured = {(stats, phase): [("all_reduce", 4, 4)] for stats in ("single_pass", "two_pass")
                for phase in ("first call", "forward", "backward")}
    monkeypatch.setattr(comm, "measure", lambda channels: measured)
    args = types.SimpleNamespace(out=tmp_path, channels=2, worlds=(2, 8))
    assert comm.run_command(args) == 0
    df = assert_stamped(tmp_path / "comm.csv", method=comm.METHOD)
    assert list(df.columns[len(SCHEMA):len(SCHEMA) + 2]) == ["implementation", "phase"]


def test_zoo_csv(tmp_path, monkeypatch):
    import torch

    from bnbench import zoo

    libs = (types.SimpleNamespace(__version__="1.0"), types.SimpleNamespace(__version__="2.0"))
    monkeypatch.setattr(zoo, "import_zoo_libraries", lambda: libs)
    tiny = ("torch", "conv+bn", lambda tm, tv: torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), False)
    monkeypatch.setattr(zoo, "MODELS", [tiny])
    args = types.SimpleNamespace(out=str(tmp_path), models=None, convert="none")
    assert zoo.run_command(args) == 0
    df = assert_stamped(tmp_path / "zoo.csv", method=zoo.METHOD)
    assert (df["timm_version"].astype(str) == "1.0").all()
    assert (df["torchvision_version"].astype(str) == "2.0").all()


def test_inspect_csv(tmp_path, monkeypatch):
    from bnbench import inspect

    row = {c: 0 for c in inspect.COLUMNS}
    row.update(kernel="k", arch=90, scenario="s", registers=32, constexprs="", error="")
    monkeypatch.setattr(inspect, "compile_variants",
                        lambda archs, match, progress=None: pd.DataFrame([row])[inspect.COLUMNS])
    args = types.SimpleNamespace(out=str(tmp_path), arch=[80, 90], match=None)
    assert inspect.run_command(args) == 0
    df = assert_stamped(tmp_path / "inspect.csv")
    assert set(df["device_type"]) == {"none"} and set(df["triton_mode"]) == {"compiled"}
    assert df["method"][0].startswith("triton.compile + ptxas for sm_80/sm_90, no GPU")


def test_gpuday_fields_are_the_run_columns(tmp_path, monkeypatch):
    """gpu-day's environment stage builds the fields its sweep's CsvWriter stamps rows with
    (a GPU stood in for: its name, properties, copy bandwidth)."""
    import torch

    from bnbench import gpuday, timing

    props = types.SimpleNamespace(multi_processor_count=132, major=9, minor=0,
                                  total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 (stand-in)")
    monkeypatch.setattr(timing, "copy_bandwidth", lambda device: 3000.0)
    monkeypatch.setattr(environment, "pin_tf32", lambda: "off (test)")
    fields, env = gpuday.record_environment(tmp_path)
    assert tuple(fields) == report.RUN_COLUMNS
    assert fields["device"] == "NVIDIA H100 (stand-in)" and fields["device_type"] == "cuda"
    assert fields["method"].startswith("bnbench gpu-day sweep: ") and "do_bench" in \
        fields["method"]
    with report.CsvWriter(tmp_path / "gpu_day.csv", fields) as writer:
        writer.write(dict(impl="cudnn", mode="eval", status="ok"))
    assert_stamped(tmp_path / "gpu_day.csv")
    with open(tmp_path / "gpu_day.csv", newline="") as f:
        assert tuple(next(csv.reader(f))) == report.COLUMNS
