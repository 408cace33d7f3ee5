"""``kernels.BatchNorm2d``: a drop-in ``torch.nn.BatchNorm2d`` on the Triton kernels."""

import torch
from torch import nn

from .forward import STATS_MODES
from .ops import ACTIVATIONS, batch_norm, check_batch_norm_args


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by the Triton kernels.

    Same parameters, buffers, ``state_dict`` keys, running-stat rules
    (``momentum=None`` = cumulative average over ``num_batches_tracked``) and
    errors as the torch module.  Extra keyword-only options:

    Args:
        stats: "single_pass" (default) or "two_pass" batch statistics.
        activation: None or "relu", fused after the affine step.

    ``forward(input, residual=None)`` computes ``act(bn(input) + residual)``.
    A call that raises leaves the running stats and ``num_batches_tracked`` as they were.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, stats="single_pass",
                 activation=None, **torch_kwargs):
        if stats not in STATS_MODES:
            raise ValueError(f"stats must be one of {STATS_MODES}, got {stats!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be None or 'relu', got {activation!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **torch_kwargs)
        self.stats = stats
        self.activation = activation

    def extra_repr(self):
        return f"{super().extra_repr()}, stats={self.stats!r}, activation={self.activation!r}"

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # the running stats are used in eval, and updated in training when tracked
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        momentum = 0.0 if self.momentum is None else self.momentum
        # check before counting the batch, so a refused call changes nothing
        check_batch_norm_args(input, running_mean, running_var, self.weight, self.bias,
                              bn_training, momentum, self.stats, residual, self.activation)
        cumulative = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average: 1/num_batches_tracked
                cumulative = self.num_batches_tracked
        return batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training,
                          momentum, self.eps, stats=self.stats, residual=residual,
                          activation=self.activation, num_batches_tracked=cumulative)


def convert_batchnorm(module, **kwargs):
    """Return `module` with every ``torch.nn.BatchNorm2d`` replaced by :class:`BatchNorm2d`.

    Parameters and buffers are carried over (the same Parameter objects, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does), with the training
    flag.  `kwargs` (``stats=``, ``activation=``) go to each new module.  A
    module that is itself a BatchNorm2d is returned converted; others are
    changed in place.
    """
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, BatchNorm2d):
        out = BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                          module.track_running_stats, **kwargs)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_batchnorm(child, **kwargs))
    return out
