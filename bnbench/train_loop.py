"""The training loop of ``bnbench train`` (in one process or over several) and the loss surface.

Recorded, in one long-format CSV (``train.csv``, written by ``bnbench.train``; every row
carries the run's device, versions and commit):

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
"""

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .train_args import SEED
from .train_models import bn_kind, build_model

ROW_FIELDS = ("experiment", "variant", "bn", "epoch", "step", "metric", "value", "w1", "w2")
EPOCH_METRICS = ("train_loss", "train_acc", "test_acc", "epoch_time_s")


def _check_kernels_run(device):
    """Refuse to label torch's CPU fallback as the kernels."""
    import kernels

    if not kernels.uses_triton(torch.empty(1, device=device)):
        raise RuntimeError(
            "the kernels variants would run PyTorch's CPU fallback, not the Triton kernels: "
            "set TRITON_INTERPRET=1 before triton is imported (bnbench does this without CUDA)")


def _sampled_weights(conv, sampled):
    return [conv.weight[index].item() for index in sampled]


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
