"""The seeds' experiments of ``bnbench train``: their settings, variants and networks.

Two experiments from the seed articles (``shared/seeds/``), on the handwritten digits of
``bnbench.train_data``:

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
(one ``torch.Generator`` per variant, seeded alike; ``bnbench.train_loop``).
"""

from dataclasses import dataclass

import torch
from torch import nn

from .train_args import SEED


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
