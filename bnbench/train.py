"""`bnbench train`: the seeds' with-and-without-BatchNorm experiments, trained with these kernels.

Two experiments from the seed articles (``shared/seeds/``), on the handwritten digits that
scikit-learn ships (``sklearn.datasets.load_digits``: 1,797 8x8 images, nothing downloaded),
upsampled bilinearly to the seed's image size, ink scaled to [0, 1], with one fixed stratified
train/test split (80/20, ``random_state=0``: 1,437 / 360 images):

* ``three_convs`` (seed 000): three 3x3 convs (16 filters, padding 1) + ReLU, 2x2 max-pool,
  flatten, linear to 10 classes, on 32x32 images; batch 32, plain SGD with lr 0.001 (the
  seed's ``ml_utils.train_model``), 30 epochs, seed 5842.  Variants: ``no_bn``, ``torch_bn``
  (``torch.nn.BatchNorm2d`` after each conv, before the ReLU), ``kernels_two_pass`` and
  ``kernels_single_pass`` (the same model put through ``kernels.convert_batchnorm``).
* ``lenet_bn`` (seed 002): LeNet with BatchNorm after every conv and hidden linear layer,
  sigmoid activations, on 28x28 images (the seed's Fashion-MNIST size, so its
  ``Linear(16*4*4, 120)`` applies unchanged); batch 256, SGD lr 1.0, 10 epochs, Xavier-uniform
  weights (d2l's ``train_ch6``).  Variants: ``torch_bn`` and ``kernels_single_pass``
  (``kernels.convert_batchnorm``: ``kernels.BatchNorm2d`` after the convs,
  ``kernels.BatchNorm1d`` on the (N, C) activations after the linears).

Every variant of an experiment starts from the same weights (built after the same
``torch.manual_seed``; BatchNorm's ones/zeros draw no random numbers) and sees the same batches
(one ``torch.Generator`` per variant, seeded alike).  Recorded, in one long-format CSV
(``train.csv``; every row carries the run's device, versions and commit):

* per epoch: ``train_loss`` and ``train_acc`` (over the epoch's training batches, as the seeds
  count them), ``test_acc`` (eval mode, running statistics), ``epoch_time_s`` (the epoch's
  training wall time, without the test pass); accuracies in percent;
* per step (``step_loss``): the batch's loss, with two weights of the last conv as they were
  when that loss was computed (three_convs only): ``w1`` = weight[3, 13, 1, 0] and ``w2`` =
  weight[3, 14, 1, 0], the seed's filter 3, row 1, column 0.  The seed follows input channels
  4 and 8; without BN, with this seed, those come from conv2 filters whose ReLU never fires, so
  their weights never move, and live channels are followed instead;
* ``surface_loss`` (no_bn and torch_bn of three_convs): the training loss on a grid of
  (``w1``, ``w2``), every other weight at its final value, BatchNorm on batch statistics.

The PNGs are drawn from the CSV alone (:func:`draw`): ``test_accuracy.png`` and
``train_loss.png`` (the seed's figures 6 and 7, one line per variant) and ``weight_path.png``
(figure 8: the path of (w1, w2) over the contours of ``surface_loss``, no BN against BN).

Without CUDA the kernels run through Triton's interpreter, whose time goes on Python work per
program and per tile.  The launches are then planned for it (``kernels.set_interpreter_plans``:
the same kernels in a few programs with large tiles; column ``kernel_plans`` =
``interpreter-fast``): a training step of the three-conv network (batch 32) takes about 1.5 s on
a 2-core CPU, against about 35 s with the 512-program plans of an H100 (``--gpu-plans``) and
15 ms with torch's BatchNorm.  ``--kernel-steps`` can stop the kernels variants after their
first steps (the same batches the torch variants start with), and ``--quick`` trains on 10
images for one epoch, into ``results/train_quick/`` (never over the full run's
``results/train/``).  A progress bar on stderr counts each variant's steps.
"""

import argparse
import copy
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .train_args import (QUICK, QUICK_OUT, FULL_OUT, LOCAL_ROOT, SEED,  # noqa: F401
                         add_arguments, add_parser)

PNG_NAMES = ("test_accuracy.png", "train_loss.png", "step_loss.png", "weight_path.png")

SPLIT_SEED = 0  # random_state of the stratified train/test split
TEST_FRACTION = 0.2
SURFACE_SAMPLES = 256  # training images the loss surface is computed on
FULL_GRID = 21

RUN_FIELDS = ("timestamp", "git_commit", "bnbench_version", "device", "device_type",
              "torch_version", "triton_version", "cuda_version", "cudnn_version", "triton_mode",
              "tf32", "kernel_plans", "nproc")
ROW_FIELDS = ("experiment", "variant", "bn", "epoch", "step", "metric", "value", "w1", "w2")
COLUMNS = RUN_FIELDS + ROW_FIELDS
EPOCH_METRICS = ("train_loss", "train_acc", "test_acc", "epoch_time_s")


@dataclass(frozen=True)
class Experiment:
    """One seed's network and its training settings."""

    name: str
    seed_article: str
    image_size: int
    batch_size: int
    lr: float
    epochs: int
    variants: tuple
    xavier: bool  # Xavier-uniform conv/linear weights (d2l), else PyTorch's default init
    sampled_weights: tuple = ()  # (out, in, row, col) indices in the last conv's weight


EXPERIMENTS = {
    "three_convs": Experiment(
        name="three_convs", seed_article="000", image_size=32, batch_size=32, lr=0.001,
        epochs=30, variants=("no_bn", "torch_bn", "kernels_two_pass", "kernels_single_pass"),
        xavier=False, sampled_weights=((3, 13, 1, 0), (3, 14, 1, 0))),
    "lenet_bn": Experiment(
        name="lenet_bn", seed_article="002", image_size=28, batch_size=256, lr=1.0,
        epochs=10, variants=("torch_bn", "kernels_single_pass"), xavier=True),
}


def bn_kind(variant):
    """The BatchNorm a variant uses: "none", "torch" or "kernels"."""
    return {"no_bn": "none", "torch_bn": "torch"}.get(variant, "kernels")


def variant_stats(variant):
    """The kernels' ``stats`` mode of a kernels variant ("two_pass"/"single_pass")."""
    return variant.removeprefix("kernels_")


# ---------------------------------------------------------------------------------------------
# data

def load_digits_split(image_size, train_size=None, test_size=None):
    """The digits, upsampled to `image_size`, split 80/20 stratified by class (fixed).

    Returns (x_train, y_train, x_test, y_test): float32 (n, 1, size, size) images with ink
    in [0, 1] and int64 labels.  `train_size`/`test_size` take a stratified subset of each
    part (the same one every time).
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                           align_corners=False).clamp_(0.0, 1.0)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(index, test_size=TEST_FRACTION,
                                           stratify=digits.target, random_state=SPLIT_SEED)

    def subset(idx, size):
        if size is None or size >= len(idx):
            return idx
        kept, _ = train_test_split(idx, train_size=size, stratify=digits.target[idx],
                                   random_state=SPLIT_SEED)
        return kept

    train_idx, test_idx = subset(train_idx, train_size), subset(test_idx, test_size)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


# ---------------------------------------------------------------------------------------------
# models

def three_convs(batch_norm):
    """Seed 000's network: 3 x (conv 3x3, 16 filters, [BatchNorm2d], ReLU), max-pool, linear."""
    layers = []
    for in_channels in (1, 16, 16):
        layers.append(nn.Conv2d(in_channels, 16, 3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(16))
        layers.append(nn.ReLU(inplace=True))
    layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16 * 16, 10)]
    return nn.Sequential(*layers)


def lenet_bn():
    """Seed 002's LeNet with BatchNorm after every conv and hidden linear layer (28x28 input)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), nn.BatchNorm2d(6), nn.Sigmoid(),
        nn.MaxPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), nn.BatchNorm2d(16), nn.Sigmoid(),
        nn.MaxPool2d(kernel_size=2, stride=2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), nn.BatchNorm1d(120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.BatchNorm1d(84), nn.Sigmoid(),
        nn.Linear(84, 10))


def build_model(experiment, variant, seed=SEED):
    """The model of `variant`; every variant of an experiment gets the same initial weights."""
    if variant not in experiment.variants:
        raise ValueError(f"{experiment.name} has variants {experiment.variants}, got {variant!r}")
    torch.manual_seed(seed)
    if experiment.name == "three_convs":
        model = three_convs(batch_norm=variant != "no_bn")
    else:
        model = lenet_bn()
    if experiment.xavier:
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
    if bn_kind(variant) == "kernels":
        import kernels

        model = kernels.convert_batchnorm(model, stats=variant_stats(variant))
    return model


def _check_kernels_run(device):
    """Refuse to label torch's CPU fallback as the kernels."""
    import kernels

    if not kernels.uses_triton(torch.empty(1, device=device)):
        raise RuntimeError(
            "the kernels variants would run PyTorch's CPU fallback, not the Triton kernels: "
            "set TRITON_INTERPRET=1 before triton is imported (bnbench does this without CUDA)")


def _sampled_weights(conv, sampled):
    return [conv.weight[index].item() for index in sampled]


# ---------------------------------------------------------------------------------------------
# training

def train_variant(experiment, variant, data, epochs, device, seed=SEED, *, max_steps=None,
                  eval_steps=(), batch_size=None, lr=None, on_row=None, on_step=None,
                  shard=None):
    """Train one variant; return (the trained model, its rows).

    Args:
        experiment: an :class:`Experiment`.
        variant: one of ``experiment.variants``.
        data: (x_train, y_train, x_test, y_test) from :func:`load_digits_split`.
        epochs: epochs to train.
        device: "cuda" or "cpu".
        seed: seeds the initial weights and the data order (alike for every variant).
        max_steps: stop after this many optimizer steps (an epoch cut short writes no
            per-epoch rows).
        eval_steps: steps after which ``test_acc_at_step`` is also measured.
        batch_size, lr: override the experiment's values (tests).
        on_row: called with each row dict as it is made (the CSV writer).
        on_step: called with the epoch after each optimizer step (the progress bar).
        shard: (rank, world) when this is one process of a ``torch.distributed`` run
            (``bnbench.train_dist``): the model's BatchNorms become
            ``kernels.SyncBatchNorm`` under DistributedDataParallel, each batch is split
            between the processes, and the losses and accuracies are the whole batch's.

    Rows are dicts with the ROW_FIELDS keys; per-epoch rows carry the step they were taken
    at.  Metrics: see the module docstring; also ``test_acc_at_step`` and, at the end,
    ``step_time_s`` (mean training wall time per step).
    """
    if bn_kind(variant) == "kernels":
        _check_kernels_run(device)
    on_step = on_step or (lambda epoch: None)
    batch_size = batch_size or experiment.batch_size
    model = build_model(experiment, variant, seed).to(device)
    net = model if shard is None else _distribute(model, variant, device)
    x_train, y_train, x_test, y_test = (t.to(device) for t in data)
    order_gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=experiment.lr if lr is None else lr)
    loss_fn = nn.CrossEntropyLoss()
    last_conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    rows = []

    def emit(epoch, step, metric, value, w=(None, None)):
        row = dict(experiment=experiment.name, variant=variant, bn=bn_kind(variant),
                   epoch=epoch, step=step, metric=metric, value=value, w1=w[0], w2=w[1])
        rows.append(row)
        if on_row is not None:
            on_row(row)

    def clock():
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    step, train_time = 0, 0.0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(y_train), generator=order_gen).to(device)
        loss_sum, correct, epoch_time = 0.0, 0, 0.0
        for idx in order.split(batch_size):
            model.train()
            xb, yb = x_train[idx], y_train[idx]
            weights = _sampled_weights(last_conv, experiment.sampled_weights) or (None, None)
            start = clock()
            if shard is None:
                logits = net(xb)
                loss = loss_fn(logits, yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss_value = loss.item()
                n_correct = (logits.argmax(1) == yb).sum().item()
            else:
                loss_value, n_correct = _distributed_step(net, optimizer, xb, yb, shard)
            epoch_time += clock() - start
            step += 1
            loss_sum += loss_value * len(yb)
            correct += n_correct
            emit(epoch, step, "step_loss", loss_value, weights)
            on_step(epoch)
            if step in eval_steps:
                emit(epoch, step, "test_acc_at_step", accuracy(model, x_test, y_test, batch_size))
            if max_steps is not None and step >= max_steps:
                break
        train_time += epoch_time
        if step < epoch * math.ceil(len(y_train) / batch_size):
            break  # cut short by max_steps
        emit(epoch, step, "train_loss", loss_sum / len(y_train))
        emit(epoch, step, "train_acc", 100.0 * correct / len(y_train))
        emit(epoch, step, "test_acc", accuracy(model, x_test, y_test, batch_size))
        emit(epoch, step, "epoch_time_s", epoch_time)
        if max_steps is not None and step >= max_steps:
            break  # the cap fell on an epoch's end
    emit(epoch, step, "step_time_s", train_time / step)
    return model, rows


def _distribute(model, variant, device):
    """DistributedDataParallel over `model`, its BatchNorms synchronised (kernels' for the
    kernels variants; torch's for torch_bn, which needs CUDA)."""
    import kernels

    if bn_kind(variant) == "torch":
        if device != "cuda":
            raise RuntimeError("torch.nn.SyncBatchNorm runs on CUDA only: torch_bn cannot "
                               "train over processes on a CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    else:
        model = kernels.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [torch.cuda.current_device()] if device == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _distributed_step(net, optimizer, xb, yb, shard):
    """One step of this process on its part of the batch; (the whole batch's mean loss, its
    correct predictions).  Each process's loss is its share of the batch's sum, scaled by the
    world size, so DistributedDataParallel's average of the gradients is the whole batch's."""
    import torch.distributed as dist

    rank, world = shard
    part = torch.arange(len(yb), device=yb.device).tensor_split(world)[rank]
    logits = net(xb[part])
    loss_sum = F.cross_entropy(logits, yb[part], reduction="sum")
    optimizer.zero_grad()
    (loss_sum * (world / len(yb))).backward()
    optimizer.step()
    totals = torch.stack([loss_sum.detach(), (logits.argmax(1) == yb[part]).sum().to(
        loss_sum.dtype)])
    dist.all_reduce(totals)
    return totals[0].item() / len(yb), int(totals[1].item())


def accuracy(model, x, y, batch_size):
    """Accuracy in percent, in eval mode (running statistics)."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            correct += (model(xb).argmax(1) == yb).sum().item()
    return 100.0 * correct / len(y)


def loss_surface(model, experiment, x, y, w1_range, w2_range, points):
    """Training loss on a `points` x `points` grid of the two sampled weights; returns
    [(w1, w2, loss)].  Every other weight stays at its value in `model` (left unchanged);
    BatchNorm uses batch statistics, as in training, without touching the running ones."""
    model = copy.deepcopy(model)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0  # running stats stay as they are
    conv = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    (i1, i2), loss_fn = experiment.sampled_weights, nn.CrossEntropyLoss(reduction="sum")
    out = []
    with torch.no_grad():
        for a in torch.linspace(*w1_range, points).tolist():
            for b in torch.linspace(*w2_range, points).tolist():
                conv.weight[i1], conv.weight[i2] = a, b
                total = sum(loss_fn(model(xb), yb).item()
                            for xb, yb in zip(x.split(experiment.batch_size),
                                              y.split(experiment.batch_size)))
                out.append((a, b, total / len(y)))
    return out


def _grid_range(values, margin=0.5, min_width=0.05):
    lo, hi = min(values), max(values)
    pad = max(margin * (hi - lo), min_width)
    return lo - pad, hi + pad


# ---------------------------------------------------------------------------------------------
# the command

def plan(args):
    """What the command runs: [(experiment, variant, epochs, max_steps)], data sizes, grid."""
    quick = QUICK if args.quick else {}
    epochs = {"three_convs": args.epochs or quick.get("epochs"),
              "lenet_bn": args.lenet_epochs or quick.get("lenet_epochs")}
    runs = []
    for name, experiment in EXPERIMENTS.items():
        for variant in experiment.variants:
            max_steps = args.kernel_steps if bn_kind(variant) == "kernels" else None
            if max_steps != 0:
                runs.append((experiment, variant, epochs[name] or experiment.epochs, max_steps))
    sizes = dict(train_size=args.train_size or quick.get("train_size"),
                 test_size=args.test_size or quick.get("test_size"))
    return runs, sizes, quick.get("grid", FULL_GRID)


TRAIN_BANNER = (
    "bnbench train: no CUDA GPU found. The kernels variants run the Triton kernels through "
    "Triton's interpreter (fast interpreter plans unless --gpu-plans): their losses and "
    "accuracies are the kernels' own, their step times are the interpreter's, not kernel speeds.")


def train_command(args):
    """Train every variant, write <out>/train.csv and the PNGs, print the summary; return 0
    (2 with one line on stderr if --out cannot be written)."""
    import sys

    from tqdm import tqdm

    from . import environment
    from .cli import prepare_device
    from .report import cell

    out = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    out, note = environment.keep_committed(out, ["train.csv", *PNG_NAMES],
                                           explicit=args.out is not None,
                                           local=LOCAL_ROOT / out.name)
    try:
        environment.output_dir(out)
    except environment.OutputError as exc:
        print(f"bnbench train: error: {exc}", file=sys.stderr)
        return 2
    device = prepare_device(TRAIN_BANNER)
    if note:
        print(f"bnbench train: {note}", flush=True)
    import kernels

    runs, sizes, grid = plan(args)
    if args.nproc > 1:  # seed 000 over processes; torch's SyncBatchNorm needs CUDA
        runs = [r for r in runs if r[0].name == "three_convs"
                and (bn_kind(r[1]) != "torch" or device == "cuda")]
    environment.set_cpu_threads(device, args.cpu_threads)
    tf32 = environment.pin_tf32() if device == "cuda" else "n/a (cpu)"
    run_fields = environment.collect(device, bool(kernels.INTERPRETED), tf32)
    fast_plans = device == "cpu" and not args.gpu_plans
    kernels.set_interpreter_plans(fast_plans)
    run_fields["kernel_plans"] = "interpreter-fast" if fast_plans else "gpu"
    run_fields["nproc"] = args.nproc
    csv_path = out / "train.csv"
    data = {name: load_digits_split(exp.image_size, **sizes) for name, exp in EXPERIMENTS.items()}
    replaces = " (replacing the one there)" if csv_path.exists() else ""
    print(f"bnbench train: {len(data['three_convs'][1])} training / "
          f"{len(data['three_convs'][3])} test digits; device {run_fields['device']}, "
          f"Triton {run_fields['triton_mode']}, {run_fields['kernel_plans']} plans "
          f"-> {csv_path}{replaces}", flush=True)
    eval_steps = {args.kernel_steps} if args.kernel_steps else set()
    wall = time.perf_counter()
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()

        def write(row):
            writer.writerow({**run_fields, **{k: cell(v, 8) for k, v in row.items()}})
            f.flush()

        for experiment, variant, epochs, max_steps in runs:
            start = time.perf_counter()
            n_train = len(data[experiment.name][1])
            steps = epochs * math.ceil(n_train / experiment.batch_size)
            if args.nproc > 1:
                from .train_dist import train_variant_distributed

                model, rows = None, train_variant_distributed(dict(
                    experiment=experiment.name, variant=variant, epochs=epochs,
                    max_steps=max_steps, sizes=sizes, seed=args.seed, device=device,
                    interpret=bool(kernels.INTERPRETED), fast_plans=fast_plans,
                    threads=args.cpu_threads), args.nproc)
                for row in rows:
                    write(row)
            else:
                with tqdm(total=min(steps, max_steps or steps), unit="step", file=sys.stderr,
                          desc=f"{experiment.name} {variant}", leave=False) as bar:
                    model, rows = train_variant(
                        experiment, variant, data[experiment.name], epochs, device, args.seed,
                        max_steps=max_steps, eval_steps=eval_steps, on_row=write,
                        on_step=lambda epoch: (bar.update(), bar.set_postfix(epoch=epoch)))
            last = {r["metric"]: r for r in rows}
            done = (f"{last['test_acc']['epoch']} epochs, test acc {last['test_acc']['value']:.1f}%"
                    if "test_acc" in last else "no full epoch")
            print(f"  {experiment.name:<12} {variant:<20} {last['step_loss']['step']:>5} steps "
                  f"{time.perf_counter() - start:8.1f} s  {done}", flush=True)
            if model is not None and experiment.sampled_weights and bn_kind(variant) in (
                    "none", "torch"):
                path = [r for r in rows if r["metric"] == "step_loss"]
                x_train, y_train = (t[:SURFACE_SAMPLES].to(device)
                                    for t in data[experiment.name][:2])
                for w1, w2, loss in loss_surface(
                        model, experiment, x_train, y_train,
                        _grid_range([r["w1"] for r in path]),
                        _grid_range([r["w2"] for r in path]), grid):
                    write(dict(experiment=experiment.name, variant=variant, bn=bn_kind(variant),
                               epoch=path[-1]["epoch"], step=path[-1]["step"],
                               metric="surface_loss", value=loss, w1=w1, w2=w2))
    total = time.perf_counter() - wall
    for path in draw(csv_path, out):
        print(f"wrote {path}")
    print(f"wrote {csv_path}")
    print(summary(csv_path).to_string(index=False))
    print(f"total wall time {total:.0f} s")
    return 0


# ---------------------------------------------------------------------------------------------
# summary and plots, from the CSV alone

def _read(csv_path):
    import pandas as pd

    return pd.read_csv(csv_path)


def step_loss_gap(df, experiment, variant):
    """Largest relative difference of `variant`'s step losses from torch_bn's at the same
    steps (NaN when either has no steps)."""
    steps = df[(df.experiment == experiment) & (df.metric == "step_loss")]
    ours = steps[steps.variant == variant].set_index("step").value
    ref = steps[steps.variant == "torch_bn"].set_index("step").value
    common = ours.index.intersection(ref.index)
    if len(common) == 0:
        return float("nan")
    return float(((ours[common] - ref[common]).abs() / ref[common].abs()).max())


def summary(csv_path):
    """One row per (experiment, variant): steps, last full epoch's figures, the test accuracy
    where the kernels variants stop, the step-loss gap to torch_bn, seconds per step."""
    import pandas as pd

    df = _read(csv_path)
    out = []
    for experiment, exp in EXPERIMENTS.items():
        for variant in exp.variants:
            rows = df[(df.experiment == experiment) & (df.variant == variant)]
            if rows.empty:
                continue

            def last(metric):
                m = rows[rows.metric == metric].sort_values("step")
                return m.value.iloc[-1] if len(m) else float("nan")

            epochs = rows[rows.metric == "test_acc"]
            out.append({
                "experiment": experiment, "variant": variant,
                "steps": int(rows[rows.metric == "step_loss"].step.max()),
                "epochs": int(epochs.epoch.max()) if len(epochs) else 0,
                "train_loss": round(last("train_loss"), 4),
                "train_acc": round(last("train_acc"), 1),
                "test_acc": round(last("test_acc"), 1),
                "best_test_acc": round(epochs.value.max(), 1) if len(epochs) else float("nan"),
                "test_acc_at_step": (f"{last('test_acc_at_step'):.1f} @ "
                                     f"{int(rows[rows.metric == 'test_acc_at_step'].step.max())}"
                                     if (rows.metric == "test_acc_at_step").any() else ""),
                "step_loss_gap": (f"{step_loss_gap(df, experiment, variant):.1e}"
                                  if bn_kind(variant) == "kernels" else ""),
                "s_per_step": round(last("step_time_s"), 3),
            })
    return pd.DataFrame(out)


# every variant with a marker (a one-epoch run draws points, not lines), big hollow ones
# under small filled ones, so that variants with equal values stay visible
STYLE = {"no_bn": dict(color="tab:red", marker="s", ms=6),
         "torch_bn": dict(color="tab:blue", marker="o", ms=9, mfc="none"),
         "kernels_two_pass": dict(color="tab:orange", ls="--", marker="o", ms=4),
         "kernels_single_pass": dict(color="tab:green", ls=":", marker="x", ms=6)}


def _style(variant, points):
    """STYLE, with a marker on about 40 of the `points` of a long series."""
    return dict(STYLE[variant], markevery=max(1, points // 40))


def _tidy(ax, integer_x=False):
    """Plain tick labels (no offset such as 1e-7+2.516149), integer epochs, and some room
    around a single point or a flat line."""
    from matplotlib.ticker import MaxNLocator

    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        values = [v for line in ax.get_lines() for v in line.get_ydata()]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        if hi - lo < 1e-3 * max(abs(hi), 1e-12):
            pad = max(0.05 * abs(hi), 1e-3)
            ax.set_ylim(lo - pad, hi + pad)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        xs = [x for line in ax.get_lines() for x in line.get_xdata()]
        if xs and min(xs) == max(xs):
            ax.set_xlim(min(xs) - 1, max(xs) + 1)
TITLES = {"three_convs": "seed 000: three convs, SGD lr 0.001, batch 32",
          "lenet_bn": "seed 002: LeNet + BN, sigmoid, SGD lr 1.0, batch 256"}


def _footer(fig, df):
    first = df.iloc[0]
    fig.text(0.01, 0.005, f"{first.device} | torch {first.torch_version} | triton "
             f"{first.triton_version} ({first.triton_mode}, {first.kernel_plans} plans) | "
             f"commit {str(first.git_commit)[:12]} | {first.timestamp}", fontsize=7, color="gray")


def _save(fig, df, path):
    _footer(fig, df)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def draw(csv_path, out_dir):
    """Draw test_accuracy.png, train_loss.png, step_loss.png and weight_path.png from the CSV
    at `csv_path` alone; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    df = _read(csv_path)
    out_dir = Path(out_dir)
    paths = []
    # the seed's figures 6 and 7: one line per variant, over its full epochs
    for metric, label, name in (("test_acc", "test accuracy (%)", "test_accuracy.png"),
                                ("train_loss", "train loss", "train_loss.png")):
        fig, axes = plt.subplots(1, len(EXPERIMENTS), figsize=(12, 4.5), squeeze=False)
        for ax, experiment in zip(axes[0], EXPERIMENTS):
            sub = df[(df.experiment == experiment) & (df.metric == metric)]
            for variant in EXPERIMENTS[experiment].variants:
                line = sub[sub.variant == variant].sort_values("epoch")
                if len(line):
                    ax.plot(line.epoch, line.value, label=variant, **_style(variant, len(line)))
            ax.set(title=TITLES[experiment], xlabel="epoch", ylabel=label)
            _tidy(ax, integer_x=True)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        paths.append(_save(fig, df, out_dir / name))

    # every step: the loss (top) and the kernels' relative gap to torch_bn (bottom)
    steps = df[df.metric == "step_loss"]
    fig, axes = plt.subplots(2, len(EXPERIMENTS), figsize=(12, 7), squeeze=False,
                             sharex="col")
    for col, experiment in enumerate(EXPERIMENTS):
        sub = steps[steps.experiment == experiment]
        kernel_steps = sub[sub.bn == "kernels"].step
        shown = sub[sub.step <= (kernel_steps.max() if len(kernel_steps) else sub.step.max())]
        ref = shown[shown.variant == "torch_bn"].set_index("step").value
        for variant in EXPERIMENTS[experiment].variants:
            line = shown[shown.variant == variant].sort_values("step")
            if line.empty:
                continue
            axes[0, col].plot(line.step, line.value, label=variant,
                              **_style(variant, len(line)))
            if bn_kind(variant) == "kernels" and len(ref):
                gap = (line.set_index("step").value - ref).abs() / ref.abs()
                axes[1, col].semilogy(gap.index, gap.clip(lower=1e-12).values, label=variant,
                                      **_style(variant, len(gap)))
        axes[0, col].set(title=TITLES[experiment], ylabel="training loss of the batch")
        axes[1, col].axhline(0.01, color="gray", lw=0.8, ls="--")
        axes[1, col].set(xlabel="step", ylabel="|kernels - torch_bn| / torch_bn (0 at 1e-12)")
        _tidy(axes[0, col], integer_x=True)
        axes[1, col].xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    paths.append(_save(fig, df, out_dir / "step_loss.png"))

    # the seed's figure 8: two weights of the last conv over the loss surface
    steps = steps[steps.experiment == "three_convs"]
    surface = df[(df.experiment == "three_convs") & (df.metric == "surface_loss")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), squeeze=False)
    panels = (("no_bn", ()), ("torch_bn", ("kernels_two_pass", "kernels_single_pass")))
    for ax, (variant, overlays) in zip(axes[0], panels):
        grid = surface[surface.variant == variant].pivot_table(index="w2", columns="w1",
                                                               values="value")
        if len(grid):
            cs = ax.contourf(grid.columns, grid.index, grid.values, levels=20, cmap="viridis")
            fig.colorbar(cs, ax=ax, label="train loss, other weights at their final values")
        for v in (variant, *overlays):
            path = steps[steps.variant == v].sort_values("step")
            if path.empty:
                continue
            style = {k: val for k, val in STYLE[v].items() if k not in ("marker", "ms")}
            ax.plot(path.w1, path.w2, label=f"{v} ({len(path)} steps)", lw=1.0, **style)
        path = steps[steps.variant == variant].sort_values("step")
        if len(path):
            ax.plot(path.w1.iloc[0], path.w2.iloc[0], "o", color="white", mec="black")
            ax.plot(path.w1.iloc[-1], path.w2.iloc[-1], "*", color="white", mec="black", ms=12)
        ax.set(title=f"three convs, {'no BN' if variant == 'no_bn' else 'with BN'}: two "
                     f"last-conv weights, step by step (o start, * end of {variant})",
               xlabel="w1 = conv3.weight[3, 13, 1, 0]", ylabel="w2 = conv3.weight[3, 14, 1, 0]")
        ax.title.set_fontsize(9)
        ax.ticklabel_format(useOffset=False)
        ax.legend(fontsize=8, loc="best")
    paths.append(_save(fig, df, out_dir / "weight_path.png"))
    return paths


def main(argv=None):
    """``python -m bnbench.train [options]``: the same command outside the ``bnbench`` CLI."""
    parser = argparse.ArgumentParser(prog="bnbench train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return train_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
