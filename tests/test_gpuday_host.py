"""`bnbench gpu-day`'s GPU-only stages (issue 18): the host-cost stage (N = 1 and 8 at
ResNet-50's BatchNorm shapes, wall and CUDA-graph times) and the GPU tests (CUDA-graph
capture, reduce-overhead), planned after tier 1 when they fit, listed by the dry run either
way, run before the sweep; their parts that need no GPU, checked here."""

import argparse
import time
from pathlib import Path

import pandas as pd

from bnbench import gpuday

ROOT = Path(__file__).resolve().parents[1]


def test_the_stages_are_planned_after_tier_1_when_they_fit():
    small, big = gpuday.plan(480, 900), gpuday.plan(900, 900)
    assert [s.name for s in small.unplanned] == ["host", "gpu_tests"]
    assert "host" not in [s.name for s in small.stages]
    names = [s.name for s in big.stages]
    assert names[names.index("correctness") + 1:names.index("sweep")] == ["host", "gpu_tests"]
    assert big.unplanned == [] and big.estimate_s <= 900 and big.tiers[0][4]
    host = next(s for s in big.stages if s.name == "host")
    assert host.estimate_s == gpuday.host_cost() > 0


def test_the_dry_run_lists_the_host_stage_and_the_gpu_tests():
    for budget in (480, 900):
        text = gpuday.format_plan(gpuday.plan(budget, 900))
        assert "GPU-only stages" in text
        assert "host " + ("planned" if budget == 900 else "not planned") in text
        assert "train_fwd_bwd float32 nchw N=8,1 x 12 resnet50 shapes" in text
        for test in gpuday.GPU_TESTS:
            assert test in text


def test_the_host_tier_is_small_batch_resnet50():
    cases = gpuday.HOST_TIER.cases()
    assert {c.N for c in cases} == {1, 8} and len(cases) == 12 * 2 * 2
    assert set(gpuday.host_impls("train_fwd_bwd")) == {"triton_single_pass", "cudnn",
                                                       "torch_native"}


def test_the_gpu_tests_exist():
    for test in gpuday.GPU_TESTS:
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test


def test_run_host_cost_writes_rows_as_it_goes(tmp_path, monkeypatch):
    """On CPU (Triton through the interpreter): the rows, without wall/graph times there."""
    tiny = gpuday.Tier("host", "test", ("eval",), ("float32",), ("nchw",), (2,), "quick")
    monkeypatch.setattr(gpuday, "HOST_TIER", tiny)
    monkeypatch.setattr(gpuday, "HOST_IMPLS", ("triton_eval", "torch_native"))
    from bnbench import overhead

    monkeypatch.setattr(overhead, "device_table", lambda device: [
        dict(path="eval", N=1, torch_wall_us=1.0, kernels_wall_us=2.0)])
    p = gpuday.plan(480, 0)
    path, rows, note, done = gpuday.run_host_cost(tmp_path, gpuday.Clock(480), p,
                                                  {"device": "test"}, 25, 1, 1, device="cpu")
    df = pd.read_csv(path)
    assert done == len(tiny.cases()) and rows == len(df) == 2 * done, note
    assert set(df["impl"]) == {"triton_eval", "torch_native"} and set(df["status"]) == {"ok"}
    assert df["wall_us"].isna().all() and df["graph_us"].isna().all()
    paths = pd.read_csv(tmp_path / "host_paths.csv")
    assert list(paths.path) == ["eval"] and "host_paths.csv: 1 rows" in note
    assert (paths.device_type == "cpu").all() and "torch.cuda.graph" in paths.method[0]


def test_run_gpu_tests_runs_pytest_and_reports_its_summary(tmp_path):
    test = "tests/test_host_times.py::test_wall_per_call_calls_back_to_back_and_resets_the_grads"
    done, note = gpuday.run_gpu_tests(tmp_path, gpuday.Clock(480), 25, 200, tests=(test,))
    assert done == 1 and note.startswith("pytest exit 0") and "1 passed" in note, note
    assert "passed" in (tmp_path / "gpu_tests.txt").read_text()


def test_orchestration_runs_the_stages_before_the_sweep(tmp_path, monkeypatch):
    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(gpuday, "all_launches", lambda cases: [])
    monkeypatch.setattr(gpuday, "_arm", lambda clock, reserve, hard=True: None)
    monkeypatch.setattr(gpuday, "_disarm", lambda timer: None)
    monkeypatch.setattr(gpuday, "record_environment",
                        lambda out: ({"copy_gbps": 1.0}, {"device": "stub GPU"}))
    monkeypatch.setattr(gpuday, "precompile", lambda *a, **k: ([], ""))
    monkeypatch.setattr(gpuday, "run_checks", lambda *a, **k: ([], ""))

    def host(*a, **k):
        calls.append("host")
        return None, 5, "", 2

    def tests(*a, **k):
        calls.append("gpu_tests")
        return 3, "pytest exit 0: 3 passed"

    def sweep(*a, **k):
        calls.append("sweep")
        return None, 0, "", 0

    monkeypatch.setattr(gpuday, "run_host_cost", host)
    monkeypatch.setattr(gpuday, "run_gpu_tests", tests)
    monkeypatch.setattr(gpuday, "run_sweep", sweep)
    args = argparse.Namespace(budget=900.0, out=tmp_path, dry_run=False, workers=16,
                              warmup_ms=10.0, rep_ms=25.0, start=time.monotonic())
    assert gpuday.gpu_day(args) == 0
    assert calls == ["host", "gpu_tests", "sweep"]
    summary = (tmp_path / "summary.txt").read_text()
    assert "5 rows" in summary and "3 passed" in summary
