"""`bnbench train`: the data split, identical starts, the BatchNorm1d wrapper, and the parity of
training with the kernels against training with torch.nn.BatchNorm2d (issue 6).

The parity runs are short (one step per epoch on 10-20 images): through Triton's interpreter a
three-conv training step takes tens of seconds.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import kernels
from bnbench import train as T
from helpers import assert_close, f64

ROOT = Path(__file__).resolve().parents[1]


def test_digits_split_is_fixed_stratified_and_scaled():
    x_train, y_train, x_test, y_test = T.load_digits_split(32)
    assert x_train.shape == (1437, 1, 32, 32) and x_test.shape == (360, 1, 32, 32)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0 and x_train.max() > 0.9
    # stratified: each class holds its share of the test set, to within one image
    counts_all = torch.bincount(torch.cat([y_train, y_test]), minlength=10).double()
    counts_test = torch.bincount(y_test, minlength=10).double()
    assert ((counts_test - T.TEST_FRACTION * counts_all).abs() <= 1).all(), counts_test
    # fixed: the same split every time, and the 28x28 LeNet data is the same split
    again = T.load_digits_split(32)
    assert torch.equal(again[0], x_train) and torch.equal(again[3], y_test)
    lenet = T.load_digits_split(28)
    assert lenet[0].shape == (1437, 1, 28, 28) and torch.equal(lenet[1], y_train)
    # subsets are stratified too, and taken from the split's own parts
    sub = T.load_digits_split(32, train_size=20, test_size=10)
    assert len(sub[1]) == 20 and len(sub[3]) == 10
    assert torch.bincount(sub[1], minlength=10).tolist() == [2] * 10


@pytest.mark.parametrize("experiment", list(T.EXPERIMENTS))
def test_variants_start_from_identical_weights(experiment):
    exp = T.EXPERIMENTS[experiment]
    models = {v: T.build_model(exp, v) for v in exp.variants}
    ref = dict(models["torch_bn"].named_parameters())
    for variant, model in models.items():
        params = dict(model.named_parameters())
        if variant == "no_bn":  # the same convs and linear, without BN layers in between
            ref_weights = [p for m in models["torch_bn"].modules()
                           if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                           for p in m.parameters()]
            weights = [p for m in model.modules()
                       if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for p in m.parameters()]
            assert len(weights) == len(ref_weights) == 8
            for a, b in zip(weights, ref_weights):
                assert torch.equal(a, b), f"{variant}: initial weights differ"
            continue
        assert params.keys() == ref.keys(), variant
        for name, p in params.items():
            assert torch.equal(p, ref[name]), f"{variant}: initial {name} differs"
        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert len(bns) == (3 if experiment == "three_convs" else 4)
        if T.bn_kind(variant) == "kernels":
            stats = T.variant_stats(variant)
            for m in bns:
                assert isinstance(m, (kernels.BatchNorm2d, kernels.BatchNorm1d)), type(m)
                assert m.stats == stats
        else:
            assert not any(isinstance(m, (kernels.BatchNorm2d, kernels.BatchNorm1d))
                           for m in bns)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_kernels_batchnorm1d_matches_float64_reference(device, momentum):
    """kernels.BatchNorm1d on LeNet's (N, C) activations (it replaced train.py's own copy)."""
    N, C = 7, 5  # odd sizes
    bn = kernels.BatchNorm1d(C, momentum=momentum, stats="single_pass").to(device)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C) + 0.5)
        bn.bias.copy_(torch.randn(C))
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(2):  # two batches: the cumulative average differs from momentum 0.1
        x = (torch.randn(N, C) * 3 + 1).to(device).requires_grad_()
        dy = torch.randn(N, C).to(device)
        y = bn(x)
        y.backward(dy)
        xr, wr, br = f64(x, True), f64(bn.weight, True), f64(bn.bias, True)
        ref_momentum = 1.0 / float(bn.num_batches_tracked) if momentum is None else momentum
        rm, rv = rm.double(), rv.double()
        yr = F.batch_norm(xr, rm, rv, wr, br, True, ref_momentum, bn.eps)
        yr.backward(f64(dy))
        assert_close(y, yr, torch.float32, "y")
        assert_close(x.grad, xr.grad, torch.float32, "dx")
        assert_close(bn.weight.grad, wr.grad, torch.float32, "dweight")
        assert_close(bn.bias.grad, br.grad, torch.float32, "dbias")
        assert_close(bn.running_mean, rm, torch.float32, "running_mean")
        assert_close(bn.running_var, rv, torch.float32, "running_var")
        bn.weight.grad = bn.bias.grad = None
    assert int(bn.num_batches_tracked) == 2
    bn.eval()
    x = torch.randn(N, C).to(device)
    expected = F.batch_norm(f64(x), rm, rv, f64(bn.weight), f64(bn.bias), False, 0.0, bn.eps)
    assert_close(bn(x), expected, torch.float32, "eval y")
    with pytest.raises(ValueError, match="2D or 3D input"):  # torch's own check and message
        bn(torch.randn(2, C, 3, 3, device=device))


def _epoch_metrics(rows, metric):
    return [r["value"] for r in rows if r["metric"] == metric]


def _check_parity(experiment, variant, data, epochs, device):
    """Train torch_bn and `variant` alike: per-epoch train losses within 1%, final test
    accuracy within 1 point, the comparison not vacuous, and after one step the same
    weights to float32 tolerance (what the kernels guarantee, on any CPU)."""
    exp = T.EXPERIMENTS[experiment]
    assert kernels.uses_triton(torch.empty(1, device=device)), "the kernels would not run"
    _, ref = T.train_variant(exp, "torch_bn", data, epochs, device)
    _, ours = T.train_variant(exp, variant, data, epochs, device)
    ref_loss, loss = _epoch_metrics(ref, "train_loss"), _epoch_metrics(ours, "train_loss")
    assert len(loss) == len(ref_loss) == epochs
    for epoch, (a, b) in enumerate(zip(loss, ref_loss), 1):
        assert abs(a - b) <= 0.01 * abs(b), f"epoch {epoch}: train loss {a} vs torch_bn {b}"
    ref_acc, acc = _epoch_metrics(ref, "test_acc")[-1], _epoch_metrics(ours, "test_acc")[-1]
    assert abs(acc - ref_acc) <= 1.0, f"final test accuracy {acc}% vs torch_bn {ref_acc}%"
    # not vacuous: training moved the loss by more than the tolerance
    assert abs(ref_loss[-1] - ref_loss[0]) > 0.05 * ref_loss[0], ref_loss
    # One step from the same start: the same weights to float32 tolerance.  The weights at
    # the end of a run are not compared: training (lenet: sigmoid, lr 1.0) amplifies
    # rounding differences, so they depend on the CPU's floating-point order (issue 11).
    ref_model, _ = T.train_variant(exp, "torch_bn", data, 1, device, max_steps=1)
    model, _ = T.train_variant(exp, variant, data, 1, device, max_steps=1)
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, ref_params[name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"{variant} {name} after one step: {m}")
    return ref_loss


@pytest.fixture
def fast_plans():
    """The fast interpreter plans `bnbench train` uses without CUDA, for one test."""
    with kernels.planning(kernels.FAST_INTERPRETER_PLANS):
        yield


def test_three_convs_kernels_train_like_torch_batchnorm(device, fast_plans):
    """With the fast interpreter plans `bnbench train` uses without CUDA (the LeNet test below
    keeps the GPU plans)."""
    data = T.load_digits_split(32, train_size=10, test_size=20)  # one step per epoch
    ref_loss = _check_parity("three_convs", "kernels_two_pass", data, 2, device)
    # the 1% tolerance tells BatchNorm from none: without it the losses differ by more
    _, no_bn = T.train_variant(T.EXPERIMENTS["three_convs"], "no_bn", data, 2, device)
    gaps = [abs(a - b) / b for a, b in zip(_epoch_metrics(no_bn, "train_loss"), ref_loss)]
    assert max(gaps) > 0.01, gaps


def test_lenet_kernels_train_like_torch_batchnorm(device):
    data = T.load_digits_split(28, train_size=20, test_size=20)
    _check_parity("lenet_bn", "kernels_single_pass", data, 3, device)


def test_step_cap_stops_kernels_variants_and_keeps_the_data_order(device):
    exp = T.EXPERIMENTS["three_convs"]
    data = T.load_digits_split(32, train_size=70, test_size=10)  # 3 steps per epoch
    _, full = T.train_variant(exp, "no_bn", data, 2, device, eval_steps={2})
    _, capped = T.train_variant(exp, "no_bn", data, 2, device, max_steps=2, eval_steps={2})
    steps = [r for r in full if r["metric"] == "step_loss"]
    assert [r["step"] for r in steps] == list(range(1, 7))
    capped_steps = [r for r in capped if r["metric"] == "step_loss"]
    assert capped_steps == steps[:2]  # same batches, same weights, same losses
    # an epoch cut short writes no per-epoch rows; both wrote the test accuracy at step 2
    assert not [r for r in capped if r["metric"] in T.EPOCH_METRICS]
    at = [r for r in full + capped if r["metric"] == "test_acc_at_step"]
    assert [r["step"] for r in at] == [2, 2] and at[0]["value"] == at[1]["value"]
    # a cap on an epoch's end: that epoch is complete, and no step follows it
    _, one_epoch = T.train_variant(exp, "no_bn", data, 2, device, max_steps=3)
    assert [r["step"] for r in one_epoch if r["metric"] == "step_loss"] == [1, 2, 3]
    assert [r["epoch"] for r in one_epoch if r["metric"] == "test_acc"] == [1]


def test_command_from_another_directory_writes_csv_plots_and_summary(tmp_path):
    """`python -m bnbench.train` sets up Triton itself; the kernels variants are left out
    (--kernel-steps 0) to keep this fast: the parity tests above train them.  --quick writes
    results/train_quick/ and leaves a full run's results/train/ alone."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    full = tmp_path / "results" / "train"
    full.mkdir(parents=True)
    (full / "train.csv").write_text("a full run\n")
    proc = subprocess.run(
        [sys.executable, "-m", "bnbench.train", "--quick", "--kernel-steps", "0"],
        cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in full.iterdir()] == ["train.csv"]
    assert (full / "train.csv").read_text() == "a full run\n"
    out = tmp_path / "results" / "train_quick"
    assert T.QUICK_OUT == Path("results/train_quick")
    # its own banner (not run's about time columns), a progress bar naming each variant,
    # and the thread count bnbench run uses (one rule, environment.set_cpu_threads)
    if not torch.cuda.is_available():
        assert proc.stdout.startswith("bnbench train: no CUDA GPU found")
        assert "time columns" not in proc.stdout
        assert "(1 threads)" in proc.stdout
    for variant in ("three_convs no_bn", "three_convs torch_bn", "lenet_bn torch_bn"):
        assert re.search(rf"{variant}: 100%.*1/1 \[", proc.stderr), proc.stderr[-2000:]
    df = pd.read_csv(out / "train.csv")
    assert list(df.columns) == list(T.COLUMNS)
    assert (df.triton_mode == ("compiled" if torch.cuda.is_available() else "interpreter")).all()
    assert (df.kernel_plans == ("gpu" if torch.cuda.is_available() else "interpreter-fast")).all()
    assert set(zip(df.experiment, df.variant)) == {("three_convs", "no_bn"),
                                                   ("three_convs", "torch_bn"),
                                                   ("lenet_bn", "torch_bn")}
    for (experiment, variant), g in df.groupby(["experiment", "variant"]):
        metrics = set(g.metric)
        assert {"step_loss", "step_time_s", *T.EPOCH_METRICS} <= metrics, (variant, metrics)
        if experiment == "three_convs":
            assert (g.metric == "surface_loss").sum() == T.QUICK["grid"] ** 2
            assert g[g.metric == "step_loss"][["w1", "w2"]].notna().all().all()
    for name in ("test_accuracy.png", "train_loss.png", "step_loss.png", "weight_path.png"):
        assert (out / name).stat().st_size > 10_000, name
    assert "test_acc" in proc.stdout and "three_convs" in proc.stdout  # the summary table


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "expected a positive integer"),
    (["--kernel-steps", "-1"], "expected a non-negative integer"),
    (["--train-size", "x"], "expected a positive integer"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    T.add_arguments(parser)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.quick
def test_training_plots_mark_points_and_use_no_offset():
    """A one-epoch run draws single points: every variant has a marker; a flat series
    (2.516149 +- 1e-7) is labelled plainly, not as 1e-7+2.516149."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for exp in T.EXPERIMENTS.values():
        for variant in exp.variants:
            assert T.STYLE[variant].get("marker"), variant
    fig, ax = plt.subplots()
    ax.plot([1, 1], [2.516149, 2.516149 + 1e-7], **T._style("torch_bn", 2))
    T._tidy(ax, integer_x=True)
    fig.canvas.draw()
    assert ax.yaxis.get_major_formatter().get_offset() == ""
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels and all("e" not in label for label in labels), labels
    lo, hi = ax.get_ylim()
    assert hi - lo > 0.1  # room around a flat line
    assert ax.get_xlim() == (0, 2)
    plt.close(fig)


def test_distributed_training_matches_one_process(device, fast_plans):
    """`bnbench train --nproc 2`: seed 000's network over two gloo processes (the batch split
    between them, kernels.SyncBatchNorm under DDP) trains like one process with the whole
    batch: per-epoch losses within 1%, test accuracy within 1 point; and the uneven split of
    a 20-image epoch (batches of 16 and 4: 8/8, then 2/2 per rank) is part of it."""
    from bnbench.train_dist import train_variant_distributed

    sizes = dict(train_size=20, test_size=20)
    data = T.load_digits_split(32, **sizes)
    exp = T.EXPERIMENTS["three_convs"]
    for variant in ("kernels_single_pass", "no_bn"):
        _, one = T.train_variant(exp, variant, data, 2, device, batch_size=16, lr=0.05)
        two = train_variant_distributed(dict(
            experiment="three_convs", variant=variant, epochs=2, max_steps=None, sizes=sizes,
            seed=T.SEED, device=device, interpret=True, fast_plans=True, threads=1,
            batch_size=16, lr=0.05), nproc=2)
        losses = _epoch_metrics(one, "train_loss"), _epoch_metrics(two, "train_loss")
        assert len(losses[0]) == len(losses[1]) == 2
        for epoch, (a, b) in enumerate(zip(*losses), 1):
            assert abs(a - b) <= 0.01 * abs(b), f"{variant} epoch {epoch}: {a} (2 processes) vs {b}"
        acc = _epoch_metrics(one, "test_acc")[-1], _epoch_metrics(two, "test_acc")[-1]
        assert abs(acc[0] - acc[1]) <= 1.0, (variant, acc)
        if variant != "no_bn":  # with BatchNorm the loss moves past the tolerance
            assert abs(losses[0][1] - losses[0][0]) > 0.01 * losses[0][0], losses
