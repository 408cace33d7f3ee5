"""`bnbench gpu-day`: the plan and its budget, the dry run, the stages that need no GPU
(correctness checks through the interpreter, the sweep's budget stops, the deadlines)."""

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bnbench import gpuday
from bnbench.cases import Case
from bnbench.shapes import SHAPE_SETS

ROOT = Path(__file__).resolve().parents[1]


def test_tier1_is_the_missions_question():
    """Tier 1: ResNet-50 BN shapes x N 32, 256 x bf16, fp32 x NCHW, NHWC x train_fwd_bwd,
    eval, with every implementation."""
    cases = gpuday.TIERS[0].cases()
    assert {(c.C, c.H, c.W) for c in cases} == set(SHAPE_SETS["resnet50"])
    assert {c.N for c in cases} == {32, 256}
    assert {c.dtype for c in cases} == {"bfloat16", "float32"}
    assert {c.layout for c in cases} == {"nchw", "nhwc"}
    assert {c.mode for c in cases} == {"train_fwd_bwd", "eval"}
    assert len(cases) == len(set(cases)) == 12 * 2 * 2 * 2 * 2
    assert set(gpuday.impls_for("train_fwd_bwd")) == {
        "triton_single_pass", "triton_two_pass", "cudnn", "torch_native", "torch_compile_dynamic"}
    assert set(gpuday.impls_for("eval")) == {"triton_eval", "cudnn", "torch_native",
                                             "torch_compile_dynamic"}


def test_plan_fits_480_s_with_tier_1():
    p = gpuday.plan(480, variants=900)
    assert p.estimate_s <= 480
    assert p.tiers[0][4], "tier 1 must be planned"
    assert p.cases[:len(gpuday.TIERS[0].cases())] == gpuday.TIERS[0].cases()
    names = [s.name for s in p.stages]
    assert names == ["startup", "environment", "compile", "correctness", "sweep", "final",
                     "safety"]


def test_plan_widens_with_the_budget_in_tier_order():
    small, big = gpuday.plan(480, 900), gpuday.plan(3600, 900)
    taken = [t[4] for t in big.tiers]
    assert sum(taken) > sum(t[4] for t in small.tiers)
    assert taken == sorted(taken, reverse=True), "a tier is planned only after all before it"
    assert big.estimate_s <= 3600 and len(big.cases) > len(small.cases)


def test_plan_says_when_tier_1_does_not_fit():
    p = gpuday.plan(100, 900)
    assert p.tiers[0][4] and not any(t[4] for t in p.tiers[1:])
    assert p.estimate_s > 100
    assert "DOES NOT FIT" in gpuday.format_plan(p, verbose=False)


def test_cost_model_arithmetic():
    """The stated model: a case is case + numel*ns + rows * (row + (warm-up + rep) * bench);
    the compile stage is pool_start + ceil(variants / workers) * compile."""
    m = gpuday.MODEL
    case = Case("eval", 32, 64, 56, 56, "bfloat16", "nchw")
    rows = len(gpuday.impls_for("eval"))
    expected = (m["case"] + case.numel * m["case_ns_per_elem"] * 1e-9
                + rows * (m["row"] + (10 + 25) / 1e3 * m["bench"]))
    assert gpuday.case_cost(case, m, 10, 25) == pytest.approx(expected)
    p = gpuday.plan(480, variants=33, workers=16)
    compile_stage = next(s for s in p.stages if s.name == "compile")
    assert compile_stage.estimate_s == pytest.approx(m["pool_start"] + 3 * m["compile"])
    # a longer do_bench makes the same plan dearer
    assert gpuday.plan(480, 33, rep_ms=200).estimate_s > p.estimate_s


def test_dry_run_prints_the_plan_and_fits(tmp_path):
    """The real command, as CI runs it: no GPU, no interpreter needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "bnbench.cli", "gpu-day", "--budget", "480",
                          "--dry-run", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    assert "budget 480 s" in text and "(fits)" in text
    for stage in ("startup", "environment", "compile", "correctness", "sweep", "final"):
        assert f"\n{stage}" in text
    assert "tier 1 planned" in text and "cost model (s):" in text
    assert "train_fwd_bwd bfloat16 nhwc N=256,32 x 12 resnet50 shapes" in text
    estimate = float(text.split("estimated ")[1].split(" s")[0])
    assert estimate <= 480
    plan_text, wrote = text.strip().rsplit("\n", 1)
    assert wrote == f"wrote {tmp_path / 'gpu_day_plan.txt'}"
    assert (tmp_path / "gpu_day_plan.txt").read_text().strip() == plan_text.strip()


def test_a_dry_run_without_out_writes_nothing(tmp_path):
    """Issue 23: `bnbench gpu-day --dry-run` prints its plan and writes no file (results/gpu_day
    is made only by a real run or an explicit --out)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-m", "bnbench.cli", "gpu-day", "--dry-run"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cost model (s):" in out.stdout and "wrote" not in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_without_gpu_and_without_dry_run_exits_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the command would run")
    out = subprocess.run([sys.executable, "-m", "bnbench.cli", "gpu-day", "--out",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "--dry-run" in out.stderr


def test_checks_cover_every_kernel_variant():
    """Every mode-switch variant of the registry's compile list is launched by some check
    (launches recorded, not run)."""
    from bnbench.aot import record_launches

    expected = gpuday.expected_variants()
    launched = set()
    for check in gpuday.checks():
        with record_launches(check.name) as got:
            gpuday.run_check(check, device="cpu", reference=False)
        launched |= {gpuday.variant_key(launch, full=False) for launch in got}
    missing = expected - launched
    assert len(expected) > 100 and not missing, sorted(map(str, missing))[:5]


@pytest.mark.parametrize("kw", [
    dict(),
    dict(stats="two_pass", dtype="bfloat16", pdtype="float32", layout="nhwc"),
    dict(training=False, residual=True, activation="relu", grads=("x", "w", "b", "r")),
    dict(cumulative=True, activation="silu"),
    dict(affine=False, running=False, grads=("x",)),
], ids=["fp32", "two_pass-bf16-nhwc", "eval-residual-relu", "cumulative-silu", "bare"])
def test_run_check_compares_with_float64(kw, device):
    check = gpuday.Check("t", (3, 4, 5, 3), kw.pop("dtype", "float32"),
                         kw.pop("pdtype", "float32"), kw.pop("layout", "nchw"), **kw)
    row = gpuday.run_check(check, device=device)
    assert row["status"] == "ok", row
    assert row["y_rel_l2"] > 0 and row["worst_over_tol"] < 1
    if check.grads:
        assert "dx_rel_l2" in row or "x" not in check.grads
    if check.training and check.running:
        assert "running_var_rel_l2" in row


def test_run_check_fails_past_its_tolerance(monkeypatch, device):
    monkeypatch.setitem(gpuday.TOLERANCE, "float32", 1e-12)
    row = gpuday.run_check(gpuday.Check("t", (3, 4, 5, 3), "float32", "float32", "nchw"),
                           device=device)
    assert row["status"] == "fail" and "rel L2" in row["error"]


class _Clock(gpuday.Clock):
    """A clock whose elapsed time is set by the test."""

    def __init__(self, budget_s, elapsed):
        super().__init__(budget_s)
        self.now = elapsed

    def elapsed(self):
        return self.now


def _plan(cases):
    p = gpuday.plan(480, 0)
    p.cases = cases
    return p


def test_sweep_stops_before_a_case_that_would_not_fit(tmp_path):
    cases = [Case("eval", 2, 4, 3, 3, "float32", "nchw")]
    path, rows, note, done = gpuday.run_sweep(
        tmp_path, _Clock(480, 479), _plan(cases), {"device": "test"}, reserve=25,
        warmup_ms=1, rep_ms=1, device="cpu", only=("triton_eval",))
    assert done == 0 and rows == 0 and "stopped at the budget" in note


def test_sweep_writes_rows_as_it_goes(tmp_path):
    """Within the budget: the case runs (Triton through the interpreter here) and its rows
    are in the CSV, with the run's fields."""
    import pandas as pd

    cases = [Case("eval", 2, 4, 3, 3, "float32", "nchw"),
             Case("train_fwd_bwd", 2, 4, 3, 3, "float32", "nhwc")]
    path, rows, note, done = gpuday.run_sweep(
        tmp_path, _Clock(480, 0), _plan(cases), {"device": "test"}, reserve=25, warmup_ms=1,
        rep_ms=1, device="cpu", only=("triton_eval", "triton_single_pass", "torch_native"),
        widen=False)
    assert done == 2 and note == "" and rows == 4
    df = pd.read_csv(path)
    assert list(df["impl"]) == ["triton_eval", "torch_native", "triton_single_pass",
                                "torch_native"]
    assert set(df["status"]) == {"ok"} and set(df["device"]) == {"test"}


def test_soft_deadline_interrupts_the_main_thread():
    clock = gpuday.Clock(1.3)
    timer = gpuday._arm(clock, reserve=1.0, hard=False)
    try:
        with pytest.raises(gpuday.BudgetExceeded):
            while clock.elapsed() < 10:
                time.sleep(0.05)
    finally:
        gpuday._disarm(timer)
    assert clock.elapsed() < 3


def test_torch_compile_dynamic_caps_recompiles():
    import torch

    config = torch._dynamo.config
    names = [n for n in ("recompile_limit", "cache_size_limit", "fail_on_recompile_limit_hit")
             if hasattr(config, n)]
    saved = {n: getattr(config, n) for n in names}
    try:
        impl = gpuday.compile_dynamic_impl()
        fn = impl.build()
        assert impl.build() is fn, "compiled once, reused by every case"
        assert impl.name == "torch_compile_dynamic" and "eval" in impl.modes
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        assert getattr(config, limit) == gpuday.RECOMPILE_CAP
        if hasattr(config, "fail_on_recompile_limit_hit"):
            assert config.fail_on_recompile_limit_hit is True
    finally:
        for n, v in saved.items():
            setattr(config, n, v)


def test_sweep_launches_are_recorded_without_a_gpu():
    cases = [replace(c, N=2) for c in gpuday.TIERS[0].cases()[:2]]
    launches = gpuday.sweep_launches(cases)
    assert {l.fn.__name__ for l in launches} >= {"_bn_bwd_dx_kernel", "_bn_fwd_apply_kernel"} \
        or {l.fn.__name__ for l in launches} >= {"_bn_fwd_single_launch_kernel"}


def test_run_checks_writes_rows_and_coverage(tmp_path, device):
    import pandas as pd

    the_checks = [gpuday.Check("a", (3, 4, 5, 3), "float32", "float32", "nchw"),
                  gpuday.Check("b", (3, 4, 5, 3), "bfloat16", "float32", "nhwc",
                               training=False)]
    rows, note = gpuday.run_checks(tmp_path, _Clock(480, 0), the_checks, reserve=25,
                                   check_s=0.3, device=device)
    df = pd.read_csv(tmp_path / "correctness.csv")
    assert list(df["name"]) == ["a", "b"] and set(df["status"]) == {"ok"}
    assert "coverage:" in note
    assert (tmp_path / "correctness_coverage.txt").read_text().startswith("coverage: ")
    rows, note = gpuday.run_checks(tmp_path, _Clock(480, 479), the_checks, reserve=25,
                                   check_s=0.3, device=device)
    assert rows == [] and note.startswith("stopped at the budget")


def test_precompile_in_worker_processes(tmp_path):
    """The compile stage's machinery: spawned workers, each records the same launch list
    and compiles its share (one variant each here) for sm_90, rows to compile.csv."""
    import pandas as pd

    p = gpuday.plan(480, 0, workers=2)
    rows, note = gpuday.precompile(tmp_path, _Clock(480, 0), p, reserve=25, arch=90, limit=1)
    assert note == "" and len(rows) == 2
    df = pd.read_csv(tmp_path / "compile.csv", keep_default_na=False)
    assert len(df) == 2 and (df["error"] == "").all() and (df["registers"] > 0).all()
    assert set(df["arch"]) == {90}


@pytest.mark.parametrize("sweep_outcome", ["done", "budget", "fails"])
def test_gpu_day_orchestration(tmp_path, monkeypatch, sweep_outcome):
    """The stages in order with the stage functions stubbed (no GPU here): a summary with
    every stage, also when the sweep hits the soft deadline or raises."""
    import argparse

    import torch

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(gpuday, "all_launches", lambda cases: [])
    monkeypatch.setattr(gpuday, "_arm", lambda clock, reserve, hard=True: None)
    monkeypatch.setattr(gpuday, "_disarm", lambda timer: None)

    def env(out):
        calls.append("environment")
        return {"copy_gbps": 1.0}, {"device": "stub GPU", "sm_count": 132}

    def compile_(out, clock, p, reserve, arch, limit=None):
        calls.append(("compile", arch))
        return [{"error": ""}], ""

    def checks(out, clock, the_checks, reserve, check_s, device="cuda"):
        calls.append("correctness")
        return [{"status": "ok"}], "coverage: 1 of 1 kernel variants ran"

    def sweep(out, clock, p, run_fields, reserve, warmup_ms, rep_ms, device="cuda",
              only=None):
        calls.append(("sweep", run_fields["copy_gbps"]))
        if sweep_outcome == "budget":
            raise gpuday.BudgetExceeded()
        if sweep_outcome == "fails":
            raise RuntimeError("boom")
        return None, 7, "", 3

    monkeypatch.setattr(gpuday, "record_environment", env)
    monkeypatch.setattr(gpuday, "precompile", compile_)
    monkeypatch.setattr(gpuday, "run_checks", checks)
    monkeypatch.setattr(gpuday, "run_sweep", sweep)
    args = argparse.Namespace(budget=480.0, out=tmp_path, dry_run=False, workers=16,
                              warmup_ms=10.0, rep_ms=25.0, start=time.monotonic())
    assert gpuday.gpu_day(args) == 0
    assert calls == ["environment", ("compile", 90), "correctness", ("sweep", 1.0)]
    summary = (tmp_path / "summary.txt").read_text()
    for stage in ("startup", "environment", "compile", "correctness", "sweep", "final"):
        assert f"\n{stage} " in summary
    assert "stub GPU (132 SMs" in summary and "coverage: 1 of 1" in summary
    sweep_line = next(l for l in summary.splitlines() if l.startswith("sweep "))
    expected = {"done": "7 rows", "budget": "stopped at the budget",
                "fails": "failed: RuntimeError: boom"}[sweep_outcome]
    assert expected in sweep_line
    assert (tmp_path / "gpu_day_plan.txt").exists()


def test_sweep_widens_into_unplanned_tiers_while_time_remains(tmp_path):
    import pandas as pd

    tiny = gpuday.Tier("a", "planned", ("eval",), ("float32",), ("nchw",), (2,), "quick")
    more = gpuday.Tier("b", "left out", ("eval",), ("float32",), ("nhwc",), (2,), "quick")
    p = gpuday.plan(480, 0, tiers=(tiny,))
    p.tiers = [(tiny, 1, 2, 1.0, True), (more, 1, 2, 1.0, False)]
    p.cases = tiny.cases()
    path, rows, note, done = gpuday.run_sweep(
        tmp_path, _Clock(480, 0), p, {"device": "test"}, reserve=25, warmup_ms=1, rep_ms=1,
        device="cpu", only=("triton_eval",))
    assert done == 2 and rows == 2
    assert list(pd.read_csv(path)["layout"]) == ["nchw", "nhwc"]
