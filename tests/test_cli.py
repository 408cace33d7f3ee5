"""`bnbench` as a user types it: a subprocess, started from a foreign working directory.

Device-agnostic: on a GPU the Triton rows must carry times; without one they must
not (the interpreter is never timed) and the banner must say so.
"""

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
BANNER_START = "bnbench: no CUDA GPU found"
TIME_COLUMNS = ["median_ms", "p20_ms", "p80_ms", "gbps", "frac_copy_bw"]
# The columns the issue asks for, and the run's provenance.
REQUIRED_COLUMNS = ["device", "impl", "mode", "N", "C", "H", "W", "dtype", "layout", "median_ms",
                    "gbps", "max_abs_err", "rel_l2_err", "p20_ms", "p80_ms", "backend",
                    "peak_mem_mb", "torch_version", "triton_version", "cuda_version",
                    "git_commit", "timestamp", "status", "error", "frac_copy_bw", "copy_gbps",
                    "dx_max_abs_err", "dx_rel_l2_err", "dweight_rel_l2_err", "dbias_rel_l2_err",
                    "running_mean_rel_l2_err", "running_var_rel_l2_err", "fusion",
                    "dresidual_max_abs_err", "dresidual_rel_l2_err"]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # bnbench must set it up itself
    return env


def bnbench(*args, cwd):
    """`bnbench ARGS` in a subprocess.  No timeout: a loaded 2-core machine needs minutes for
    the sweep below (62 s alone, over 300 s under load; issue 11)."""
    return subprocess.run([sys.executable, "-m", "bnbench.cli", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True)


@pytest.mark.quick
def test_help_lists_the_commands(tmp_path):
    out = bnbench("--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "run" in out.stdout and "plot" in out.stdout


HEAVY = ("torch", "triton", "pandas", "matplotlib", "kernels")


def cli_commands():
    from bnbench import cli

    return list(cli.COMMANDS)


SUBCOMMANDS = cli_commands()  # every command, including ones added later


@pytest.mark.quick
def test_building_the_parser_imports_no_heavy_module():
    """The parser (every subcommand's) and --help import none of torch, triton, pandas,
    matplotlib, kernels: checked in a fresh interpreter, since this one has torch."""
    code = (
        "import sys\n"
        "from bnbench import cli\n"
        "parser = cli.build_parser()\n"
        f"for argv in [['--help']] + [[c, '--help'] for c in {SUBCOMMANDS!r}]:\n"
        "    try:\n"
        "        parser.parse_args(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print('LOADED', sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout[-500:]
    assert {"run", "plot", "traffic", "inspect", "train"} <= set(SUBCOMMANDS)


def _best_time(argv, repeat=3):
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, env=_env(), capture_output=True, cwd=ROOT)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.quick
def test_help_and_argument_errors_answer_at_once():
    """Against `python -c pass` on the same machine (a ratio, so a loaded machine slows both):
    importing torch alone takes 7 to 30 s on a 2-core CPU."""
    base = _best_time([sys.executable, "-c", "pass"])
    cases = [["--help"], *([c, "--help"] for c in SUBCOMMANDS), ["run", "--dtypes", "float7"],
             ["train", "--epochs", "0"], ["frobnicate"]]
    for args in cases:
        took = _best_time([sys.executable, "-m", "bnbench.cli", *args])
        assert took < 3 * base + 0.5, f"bnbench {' '.join(args)}: {took:.2f} s, " \
                                      f"python -c pass {base:.2f} s"


@pytest.mark.parametrize("args, what", [
    (["run", "--batch-sizes", "abc"], "abc"),
    (["run", "--batch-sizes", "8,0"], "8,0"),
    (["run", "--dtypes", "float7"], "float7"),
    (["run", "--layouts", "nchw,nwhc"], "nwhc"),
    (["run", "--modes", "inference"], "inference"),
    (["run", "--modes", "eval,conv_bn_evaluation"], "conv_bn_evaluation"),
    (["run", "--fusions", "relu6"], "relu6"),
    (["run", "--fusions", "residual"], "residual"),
    (["run", "--modes", "eval", "--impls", "conv+cudnn,folded"], "conv+cudnn,folded"),
    (["run", "--impls", "cudnn9"], "cudnn9"),
    (["run", "--shapes", "64x56"], "64x56"),
    (["run", "--warmup-ms", "-1"], "-1"),
    (["run", "--cpu-threads", "0"], "0"),
    (["frobnicate"], "frobnicate"),
    ([], "COMMAND"),
    (["plot", "no_such.csv"], "no_such.csv"),
    (["train", "--epochs", "0"], "0"),
    (["train", "--cpu-threads", "x"], "x"),
])
@pytest.mark.quick
def test_bad_arguments_exit_2_with_one_line(tmp_path, args, what):
    out = bnbench(*args, cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("bnbench") and "error" in lines[0] and what in lines[0]


# One small sweep shared by the tests below: every implementation that runs without cuDNN
# (and cudnn on a GPU), every mode, two batch sizes, both layouts, one odd shape.
SWEEP_IMPLS = ["triton_two_pass", "triton_single_pass", "triton_eval", "torch_native",
               "torch_compile"] + (["cudnn"] if CUDA else [])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")
    out = bnbench("run", "--shapes", "6x5x3", "--batch-sizes", "2,3", "--dtypes", "bfloat16",
                  "--impls", ",".join(SWEEP_IMPLS), "--rep-ms", "5", "--warmup-ms", "1",
                  "--out", "res", cwd=cwd)
    assert out.returncode == 0, out.stdout + out.stderr
    csvs = list((cwd / "res").glob("*.csv"))
    assert len(csvs) == 1
    return out, csvs[0], pd.read_csv(csvs[0])


def test_run_writes_one_row_per_impl_and_case(sweep):
    out, path, df = sweep
    for column in REQUIRED_COLUMNS:
        assert column in df.columns, column
    n_impls = {"train_fwd": len(SWEEP_IMPLS) - 1, "train_fwd_bwd": len(SWEEP_IMPLS) - 1,
               "eval": len(SWEEP_IMPLS) - 2}  # triton_eval runs eval only; the others training
    assert len(df) == 2 * 2 * sum(n_impls.values())  # 2 batch sizes x 2 layouts
    assert not df.duplicated(["impl", "mode", "N", "layout"]).any()
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"][["impl", "mode", "error"]]
    assert set(df["layout"]) == {"nchw", "nhwc"} and set(df["N"]) == {2, 3}
    # the default sweep: no fusion, and no conv_bn_eval (opt-in)
    assert set(df["mode"]) == {"train_fwd", "train_fwd_bwd", "eval"}
    assert set(df["fusion"]) == {"none"} and df["dresidual_rel_l2_err"].isna().all()
    assert (df[["C", "H", "W"]] == [6, 5, 3]).all().all()
    for column in ["device", "torch_version", "triton_version", "git_commit", "timestamp"]:
        assert df[column].notna().all() and df[column].nunique() == 1, column
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", df["git_commit"][0])
    assert ("cpu" in path.name) == (not CUDA)


def test_triton_rows_times_only_on_a_gpu(sweep):
    out, path, df = sweep
    triton = df[df["impl"].str.startswith("triton")]
    baselines = df[~df["impl"].str.startswith("triton")]
    if CUDA:
        assert BANNER_START not in out.stdout
        assert (triton["median_ms"] > 0).all() and (triton["peak_mem_mb"] > 0).all()
        assert set(triton["backend"]) == {"triton"}
        assert (df["triton_mode"] == "compiled").all()
    else:
        assert out.stdout.startswith(BANNER_START)
        assert "no speed comparison is possible without a GPU" in " ".join(out.stdout.split())
        assert triton[TIME_COLUMNS + ["peak_mem_mb"]].isna().all().all()
        assert set(triton["backend"]) == {"triton_interpreter"}
        assert (df["triton_mode"] == "interpreter").all()
    # baselines are timed everywhere, and GB/s follows the minimal-bytes formula
    assert (baselines["p20_ms"] <= baselines["median_ms"]).all()
    assert (baselines["median_ms"] <= baselines["p80_ms"]).all()
    factor = baselines["mode"].map({"eval": 2, "train_fwd": 2, "train_fwd_bwd": 5})
    nbytes = factor * baselines["N"] * 6 * 5 * 3 * 2  # bfloat16: 2 bytes
    assert (baselines["gbps"] - nbytes / baselines["median_ms"] / 1e6).abs().max() \
        <= 1e-5 * baselines["gbps"].max()


def test_error_columns_are_real_figures(sweep):
    out, path, df = sweep
    y_cols = ["max_abs_err", "rel_l2_err"]
    grad_cols = [f"{q}_{e}" for q in ("dx", "dweight", "dbias") for e in y_cols]
    stat_cols = [f"{q}_{e}" for q in ("running_mean", "running_var") for e in y_cols]
    # bfloat16 keeps 8 bits: errors are small but never zero against float64
    assert (df["rel_l2_err"] > 0).all() and (df["rel_l2_err"] < 2e-2).all()
    bwd = df[df["mode"] == "train_fwd_bwd"]
    assert bwd[grad_cols + stat_cols].notna().all().all()
    assert (bwd[[c for c in grad_cols if c.endswith("rel_l2_err")]] < 5e-2).all().all()
    fwd = df[df["mode"] == "train_fwd"]
    assert fwd[stat_cols].notna().all().all() and fwd[grad_cols].isna().all().all()
    assert df[df["mode"] == "eval"][grad_cols + stat_cols].isna().all().all()


def test_backend_column_says_what_ran(sweep):
    out, path, df = sweep
    backend = df.groupby("impl")["backend"].unique().map(lambda b: ",".join(sorted(b)))
    assert backend["torch_native"] == ("aten_native" if CUDA else "aten_cpu")
    assert backend["torch_compile"] == ("inductor_triton" if CUDA else "inductor_cpp")
    if CUDA:  # bfloat16: PyTorch may route cudnn rows elsewhere; never "cudnn" without cuDNN
        assert set(df[df["impl"] == "cudnn"]["backend"]) <= {"cudnn", "aten_native",
                                                            "cudnn+aten_native"}


def test_summary_table_and_plots(sweep):
    out, path, df = sweep
    assert "worst_rel_l2" in out.stdout
    for impl in SWEEP_IMPLS:
        assert impl in out.stdout
    # what the sweep held, on screen (the summary's header; its width: test_harness)
    assert "shapes CxHxW: 6x5x3; batch sizes N: 2, 3" in out.stdout
    assert max(len(line) for line in out.stdout.splitlines()
               if str(path.parent) not in line) <= 100  # but for the lines naming the files
    pngs = [path.with_name(f"{path.stem}_{kind}.png") for kind in ("throughput", "speedup",
                                                                  "error")]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        png.unlink()
    # `bnbench plot` redraws them from the CSV alone, from any working directory
    redraw = bnbench("plot", str(path), cwd=path.parent.parent.parent)
    assert redraw.returncode == 0, redraw.stderr
    assert BANNER_START not in redraw.stdout
    for png in pngs:
        assert png.stat().st_size > 10_000


def test_fusions_and_conv_bn_eval(tmp_path):
    # the default implementations: each runs the modes it has
    out = bnbench("run", "--shapes", "4x5x3", "--batch-sizes", "2", "--dtypes", "float32",
                  "--layouts", "nhwc", "--modes", "train_fwd_bwd,conv_bn_eval",
                  "--fusions", "none,residual+relu", "--rep-ms", "5", "--warmup-ms", "1",
                  "--name", "fused", "--out", ".", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    df = pd.read_csv(tmp_path / "fused.csv")
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"][["impl", "mode", "error"]]
    train = ["triton_two_pass", "triton_single_pass", "torch_native", "torch_compile"]
    conv = ["conv+cudnn", "conv+triton_eval", "folded"]
    for fusion in ["none", "residual+relu"]:
        rows = df[df["fusion"] == fusion].groupby("mode")["impl"].apply(sorted)
        assert rows["train_fwd_bwd"] == sorted(train + (["cudnn"] if CUDA else []))
        assert rows["conv_bn_eval"] == sorted(conv)
    # float32 against float64: small, never exactly zero
    assert (df["rel_l2_err"] > 0).all() and (df["rel_l2_err"] < 1e-5).all()
    fused_bwd = df[(df["mode"] == "train_fwd_bwd") & (df["fusion"] == "residual+relu")]
    assert (fused_bwd[["dx_rel_l2_err", "dresidual_rel_l2_err"]] < 1e-5).all().all()
    assert df[df["fusion"] == "none"]["dresidual_rel_l2_err"].isna().all()
    convs = df[df["mode"] == "conv_bn_eval"].set_index(["fusion", "impl"])
    assert convs["backend"].str.startswith("conv:").all()
    assert convs.loc[("none", "folded"), "backend"].endswith("+bn:none")
    for fusion in ["none", "residual+relu"]:  # folding keeps the error of the same order
        assert convs.loc[(fusion, "folded"), "rel_l2_err"] \
            < 10 * convs.loc[(fusion, "conv+cudnn"), "rel_l2_err"]
    timed = convs.loc[[(f, i) for f in ["none", "residual+relu"] for i in ["conv+cudnn",
                                                                           "folded"]]]
    assert (timed["median_ms"] > 0).all()
    assert convs["median_ms"].isna().sum() == (0 if CUDA else 2)  # conv+triton_eval on CPU
    assert "conv_bn_eval residual+relu" in " ".join(out.stdout.split())
    for kind in ("throughput", "speedup", "error"):
        assert (tmp_path / f"fused_{kind}.png").stat().st_size > 10_000


def test_failing_case_is_recorded_and_the_sweep_goes_on(tmp_path):
    # N=1 of a 1x1 image is one value per channel: training must refuse it (ValueError)
    out = bnbench("run", "--shapes", "3x1x1", "--batch-sizes", "1,2", "--modes", "train_fwd",
                  "--dtypes", "float32", "--layouts", "nchw",
                  "--impls", "triton_single_pass,torch_native", "--no-plots",
                  "--rep-ms", "5", "--warmup-ms", "1", "--name", "fails", "--out", ".",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    df = pd.read_csv(tmp_path / "fails.csv").set_index(["impl", "N"])
    for impl in ["triton_single_pass", "torch_native"]:
        assert df.loc[(impl, 1), "status"] == "error"
        assert df.loc[(impl, 1), "error"].startswith("ValueError: Expected more than 1 value")
        assert df.loc[(impl, 2), "status"] == "ok"
        assert df.loc[(impl, 2), "rel_l2_err"] < 1e-5
    assert "2 failed" in out.stdout
    fail = bnbench("run", "--shapes", "3x1x1", "--batch-sizes", "1", "--modes", "train_fwd",
                   "--dtypes", "float32", "--layouts", "nchw", "--impls", "torch_native",
                   "--no-plots", "--fail-on-error", "--name", "fails", "--out", ".",
                   cwd=tmp_path)
    assert fail.returncode == 1
    assert "fails.csv (replacing the one there)" in " ".join(fail.stdout.split())  # not silent


def test_interrupted_run_keeps_its_rows(tmp_path):
    sizes = ",".join(str(n) for n in range(2, 200))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnbench.cli", "run", "--shapes", "4x3x3", "--batch-sizes", sizes,
         "--modes", "eval", "--dtypes", "float32", "--layouts", "nchw",
         "--impls", "triton_eval,torch_native", "--rep-ms", "20", "--warmup-ms", "1",
         "--name", "interrupted", "--out", "."],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = tmp_path / "interrupted.csv"
    deadline = time.monotonic() + 1800  # generous: torch's import alone can take 30 s loaded
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= 4:  # header + 3 rows
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=1800)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stdout and "Traceback" not in stderr
    df = pd.read_csv(path)
    assert 3 <= len(df) < 2 * 198
    assert (df["status"] == "ok").all() and df["rel_l2_err"].notna().all()
    assert path.read_text().endswith("\n")  # no half-written row


def _one_line_error(out, *words):
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("bnbench") and "error" in lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture
def blocked(tmp_path):
    """--out values that cannot be used: a file, a folder under a file, /proc (no folders
    can be made there, even by root)."""
    (tmp_path / "a_file").write_text("x")
    return [("a_file", "a file"), ("a_file/sub", "a file"), ("/proc/bnbench_out", "/proc")]


@pytest.mark.parametrize("command", [["run", "--shapes", "3x2x2", "--batch-sizes", "2",
                                      "--modes", "eval", "--impls", "torch_native"],
                                     ["train", "--quick", "--kernel-steps", "0"]])
def test_unusable_out_exits_2_with_one_line(tmp_path, blocked, command):
    for out_dir, what in blocked:
        out = bnbench(*command, "--out", out_dir, cwd=tmp_path)
        _one_line_error(out, out_dir, what)
    assert not list(tmp_path.rglob("*.csv"))


@pytest.mark.quick
def test_plot_rejects_what_is_not_a_run_csv(tmp_path, blocked):
    files = {"empty.csv": (b"", "empty"), "binary.csv": (bytes(range(256)) * 4, "UTF-8"),
             "latin1.csv": ("mode,N\nentraînement,2\n".encode("latin-1"), "UTF-8"),
             "other.csv": (b"a,b\n1,2\n", "missing columns"),
             "header.csv": (",".join(REQUIRED_COLUMNS).encode() + b"\n", "no rows"),
             "ragged.csv": (b'a,b\n1,2\n3,4,5,6\n"x\n', "cannot parse")}
    for name, (content, what) in files.items():
        (tmp_path / name).write_bytes(content)
        _one_line_error(bnbench("plot", name, cwd=tmp_path), name, what)
    _one_line_error(bnbench("plot", str(tmp_path), cwd=tmp_path), str(tmp_path))  # a folder
    good = tmp_path / "good.csv"
    good.write_text((ROOT / "results" / "run_quick_cpu.csv").read_text())
    for out_dir, what in blocked:
        _one_line_error(bnbench("plot", "good.csv", "--out", out_dir, cwd=tmp_path),
                        out_dir, what)
    assert not list(tmp_path.rglob("*.png"))


def scratch_clone(tmp_path):
    """A git clone of this checkout's committed state in `tmp_path`: a test that writes
    where a user's checkout would write works there, never in the user's own files."""
    clone = tmp_path / "checkout"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)],
                   check=True, capture_output=True, timeout=1200)
    return clone


def test_a_run_in_the_checkout_never_replaces_a_committed_result(tmp_path):
    """Without --out, `bnbench run` and `bnbench plot` in the checkout write results/local/
    where results/ holds a committed file of the same name, and say so.  In a scratch clone:
    the user's own results/local/ is never touched (issue 24)."""
    import hashlib

    root = scratch_clone(tmp_path)
    env = dict(_env(), PYTHONPATH=str(root))

    def in_clone(*args):
        return subprocess.run([sys.executable, "-m", "bnbench.cli", *args], cwd=root, env=env,
                              capture_output=True, text=True)

    committed = [root / "results" / f"run_quick_cpu{end}"
                 for end in (".csv", "_throughput.png", "_speedup.png", "_error.png")]
    before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in committed]
    local = root / "results" / "local"
    made = [local / p.name for p in committed]
    out = in_clone("run", "--shapes", "3x2x2", "--batch-sizes", "2", "--modes", "eval",
                   "--dtypes", "float32", "--layouts", "nchw", "--impls", "torch_native",
                   "--rep-ms", "5", "--warmup-ms", "1", "--name", "run_quick_cpu")
    assert out.returncode == 0, out.stderr
    assert "results/run_quick_cpu.csv is a committed result" in " ".join(out.stdout.split())
    assert len(pd.read_csv(local / "run_quick_cpu.csv")) == 1
    for path in made[1:]:
        path.unlink()
    redraw = in_clone("plot", "results/run_quick_cpu.csv")
    assert redraw.returncode == 0, redraw.stderr
    assert "is a committed result: writing into results/local/" in redraw.stdout
    assert all(p.exists() for p in made[1:])
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in committed] == before
    status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                            text=True, check=True).stdout
    assert status == "", status



BAD_INPUTS = [  # issue 22: each a one-line error, exit 2, nothing written
    ("zoo", "--models", "nosuchnet"),
    ("zoo", "--out", "afile"),
    ("inspect", "--match", "(["),
    ("comm", "--channels", "-5"),
    ("comm", "--channels", "0"),
    ("gpu-day", "--workers", "0"),
    ("gpu-day", "--workers", "-4"),
    ("gpu-day", "--dry-run", "--budget", "inf"),
    ("run", "--rep-ms", "inf"),
    ("run", "--warmup-ms", "nan"),
    ("run", "--name", "../x"),
    ("run", "--cpu-threads", "0"),
    ("traffic", "--out", "afile"),
    ("train", "--epochs", "0"),
]


@pytest.mark.parametrize("args", BAD_INPUTS, ids=" ".join)
def test_a_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args):
    (tmp_path / "afile").write_text("mine\n")
    out = bnbench(*args, cwd=tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in out.stderr, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert (tmp_path / "afile").read_text() == "mine\n"


@pytest.mark.quick
def test_inspect_draws_progress_from_the_compiler_subprocess(monkeypatch):
    """`bnbench inspect`'s bar moves with the `<done> <total>` lines `python -m bnbench.aot`
    writes on the descriptor it is given (the compiler replaced by a stand-in that writes
    them): created once at the first line, moved to the end, closed."""
    import json
    from types import SimpleNamespace

    from bnbench import inspect as bn_inspect

    def fake_run(cmd, **kwargs):
        fd = int(cmd[cmd.index("--progress-fd") + 1])
        assert fd in kwargs["pass_fds"]
        os.write(fd, b"0 3\n1 3\n2 3\n3 3\n")
        row = {c: 0 for c in bn_inspect.COLUMNS}
        return subprocess.CompletedProcess(cmd, 0, json.dumps([row]), "")

    monkeypatch.setattr(bn_inspect.subprocess, "run", fake_run)
    bars = []

    def make_bar(total):
        bars.append(SimpleNamespace(total=total, n=0, closed=False))
        bars[-1].update = lambda k: setattr(bars[-1], "n", bars[-1].n + k)
        bars[-1].close = lambda: setattr(bars[-1], "closed", True)
        return bars[-1]

    df = bn_inspect.compile_variants((90,), "x", progress=make_bar)
    assert len(df) == 1
    assert [(b.total, b.n, b.closed) for b in bars] == [(3, 3, True)]
