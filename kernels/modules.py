"""The module family ``kernels.BatchNorm1d/2d/3d``: drop-ins for ``torch.nn.BatchNorm*d`` on the
Triton kernels, and ``convert_batchnorm``, which swaps them into a model where that is exact."""

from dataclasses import dataclass, field

import torch
from torch import nn

from . import _eager
from .forward import STATS_MODES
from .ops import ACTIVATIONS, batch_norm, check_batch_norm_args, torch_batch_norm


class _BatchNormKernels:
    """The shared implementation (as torch's ``_BatchNorm``), mixed in before a torch class.

    Same parameters, buffers, ``state_dict`` keys, running-stat rules
    (``momentum=None`` = cumulative average over ``num_batches_tracked``) and
    errors as the torch module.  Extra keyword-only options:

    Args:
        stats: "single_pass" (default) or "two_pass" batch statistics.
        activation: None, "relu" or "silu", fused after the affine step (and the residual).

    ``forward(input, residual=None)`` computes ``act(bn(input) + residual)``.
    A call that raises leaves the running stats and ``num_batches_tracked`` as they were.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, stats="single_pass",
                 activation=None, **torch_kwargs):
        if stats not in STATS_MODES:
            raise ValueError(f"stats must be one of {STATS_MODES}, got {stats!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, **torch_kwargs)
        self.stats = stats
        self.activation = activation

    def extra_repr(self):
        return f"{super().extra_repr()}, stats={self.stats!r}, activation={self.activation!r}"

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"torch.jit.script cannot compile {type(self).__module__}.{type(self).__name__}: "
            f"it calls Triton kernels from Python, which TorchScript cannot represent. Use "
            f"torch.compile (no graph break), torch.export.export, or torch.jit.trace instead")

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        # each parameter and buffer read once, from its dict where nothing can stand in
        # between (a module attribute costs a __getattr__; a parametrization's class differs)
        if type(self) in _PLAIN:
            params, buffers = self._parameters, self._buffers
            weight, bias = params["weight"], params["bias"]
            running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        else:
            weight, bias = self.weight, self.bias
            running_mean, running_var = self.running_mean, self.running_var
        training, eps, momentum = self.training, self.eps, self.momentum
        bn_training = training or (running_mean is None and running_var is None)
        # the running stats are used in eval, and updated in training when tracked
        nbt = None  # the batch counter, counted in training when the stats are tracked
        if training:
            if self.track_running_stats:
                nbt = self.num_batches_tracked
            else:
                running_mean = running_var = None
        cumulative = nbt if momentum is None else None
        momentum = 0.0 if momentum is None else momentum
        # check before counting the batch, so a refused call changes nothing
        lean = _eager.lean(input)
        if lean:  # checked once per call signature (kernels._eager)
            prepared = _eager.prepare(
                check_batch_norm_args, input, running_mean, running_var, weight, bias,
                bn_training, momentum, eps, self.stats, residual, self.activation, cumulative)
        else:
            check_batch_norm_args(input, running_mean, running_var, weight, bias, bn_training,
                                  momentum, self.stats, residual, self.activation, eps)
        if nbt is not None:
            nbt.add_(1)  # cumulative: momentum = 1/num_batches_tracked
        if lean:
            y = _eager.call(prepared, input, running_mean, running_var, weight, bias, momentum,
                            eps, residual, cumulative, torch_batch_norm)
            if y is not None:
                return y
        return batch_norm(input, running_mean, running_var, weight, bias, bn_training,
                          momentum, eps, stats=self.stats, residual=residual,
                          activation=self.activation, num_batches_tracked=cumulative)


class BatchNorm1d(_BatchNormKernels, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on the Triton kernels: input (N, C) or (N, C, L)."""


class BatchNorm2d(_BatchNormKernels, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on the Triton kernels: input (N, C, H, W)."""


class BatchNorm3d(_BatchNormKernels, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on the Triton kernels: input (N, C, D, H, W)."""


# classes whose parameters and buffers forward reads from their dicts (kernels.sync adds its own)
_PLAIN = {BatchNorm1d, BatchNorm2d, BatchNorm3d}

# the torch class each of ours replaces
KERNELS_FOR = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d,
               nn.BatchNorm3d: BatchNorm3d}

# module dicts whose hooks a converted module keeps (shared, so a handle's remove() still works)
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


@dataclass
class ConversionRecord:
    name: str  # qualified name in the model ("" for the top module)
    kind: str  # the module's class
    converted: bool
    reason: str


@dataclass
class ConversionReport:
    """What ``convert_batchnorm`` did with each BatchNorm-like module it met."""

    records: list = field(default_factory=list)

    @property
    def converted(self):
        return [r for r in self.records if r.converted]

    @property
    def kept(self):
        return [r for r in self.records if not r.converted]

    def __str__(self):
        lines = [f"convert_batchnorm: {len(self.converted)} converted, {len(self.kept)} kept"]
        lines += [f"  {r.name or '<top>'} ({r.kind}): "
                  f"{'converted' if r.converted else 'kept'}: {r.reason}" for r in self.records]
        return "\n".join(lines)


def _torch_base(module):
    """The torch BatchNorm class `module` is an instance of, or None."""
    return next((base for base in KERNELS_FOR if isinstance(module, base)), None)


_BATCHNORM_STATE = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def _why_not_exact(module):
    """None when `module` can be converted exactly, else the reason it cannot."""
    kind = type(module)
    if kind in KERNELS_FOR or kind in KERNELS_FOR.values():
        return None
    base = _torch_base(module)
    # a subclass that only sets things up in __init__ behaves as its torch base
    own = {name for cls in kind.__mro__[:kind.__mro__.index(base)]
           for name in vars(cls) if not name.startswith("__") or name in ("__call__",)}
    if own:
        return (f"a subclass of torch.nn.{base.__name__} with its own behaviour "
                f"({', '.join(sorted(own))}): converting it would drop that")
    extra = {name for name, _ in [*module.named_parameters(recurse=False),
                                  *module.named_buffers(recurse=False)]} - _BATCHNORM_STATE
    if extra or list(module.children()):
        what = sorted(f"{n!r}" for n in extra) + (["submodules"] if list(module.children()) else [])
        return (f"a subclass of torch.nn.{base.__name__} with state of its own "
                f"({', '.join(what)}): converting it would drop that")
    return None


def _zoo_converter():
    """kernels.zoo's (converter, reason) for model-zoo BatchNorms (timm, torchvision)."""
    from .zoo import convert_zoo_module, convert_zoo_reason

    return convert_zoo_module, convert_zoo_reason


def _carry_over(old, new):
    """Parameters, buffers (the same objects), training flag, hooks and attributes."""
    if old.affine:
        new.weight, new.bias = old.weight, old.bias
    new.running_mean, new.running_var = old.running_mean, old.running_var
    new.num_batches_tracked = old.num_batches_tracked
    new.train(old.training)
    for name in _HOOK_DICTS:
        if name in vars(old):
            setattr(new, name, getattr(old, name))
    # a full backward hook is told apart from a legacy one by this flag (None in a fresh
    # module): without it, _backward_hooks would be carried but never called
    new._is_full_backward_hook = old._is_full_backward_hook
    for name, value in vars(old).items():  # user attributes (qconfig, tags, ...)
        if name not in vars(new):
            setattr(new, name, value)


def _convert_one(module, options, target=None, extra=None):
    """(new module or None, reason) for one BatchNorm module.  `target`: the class to
    convert into (default: the kernels class of the module's torch class); `extra`: more
    constructor arguments (SyncBatchNorm's process_group)."""
    kind = type(module)
    if isinstance(module, _BatchNormKernels) and kind in KERNELS_FOR.values():
        if not options and target in (None, kind):
            return None, "already a kernels module"
        opts = {"stats": module.stats, "activation": module.activation, **options}
        cls = target or kind
    else:
        why = _why_not_exact(module)
        if why is not None:
            return None, why
        cls, opts = target or KERNELS_FOR[_torch_base(module)], options
    extra = dict(extra or {})
    if issubclass(cls, nn.SyncBatchNorm) and extra.get("process_group") is None:
        extra["process_group"] = getattr(module, "process_group", None)
    new = cls(module.num_features, module.eps, module.momentum, module.affine,
              module.track_running_stats, device="meta", **extra, **opts)
    _carry_over(module, new)
    return new, f"into kernels.{cls.__name__}"


def convert_batchnorm(module, **kwargs):
    """Return `module` with every ``torch.nn.BatchNorm1d/2d/3d`` replaced by the kernels' module.

    Exactly these torch classes are converted (and ``torch.nn.SyncBatchNorm``, into
    ``kernels.SyncBatchNorm``), and ``kernels``' own modules (given new `kwargs`); a
    subclass with its own methods, parameters, buffers or submodules is left as it is
    (converting it would drop its behaviour), and so is any other BatchNorm (lazy
    modules).  Known model-zoo BatchNorms are converted by ``kernels.zoo`` where it
    knows an exact equivalent.

    Parameters and buffers are carried over (the same Parameter objects, as
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does), with the training flag,
    hooks and instance attributes; a module registered at two places stays one
    module.  `kwargs` (``stats=``, ``activation=``) go to each new module.  A module
    that is itself a BatchNorm is returned converted; others are changed in place.
    The returned module's ``conversion_report`` lists every BatchNorm met, converted
    or kept, with the reason.
    """
    return convert_tree(module, kwargs)


def convert_tree(module, options, target=None, extra=None):
    """convert_batchnorm's walk; with `target`, every convertible BatchNorm becomes that class
    (SyncBatchNorm.convert_sync_batchnorm) and the model-zoo converters are not used."""
    unknown = set(options) - {"stats", "activation"}
    if unknown:
        raise TypeError(f"convert_batchnorm() got unexpected options {sorted(unknown)}; "
                        f"it takes stats= and activation=")
    report, done = ConversionReport(), {}
    zoo, zoo_reason = _zoo_converter()
    if target is not None:  # the zoo's replacements are not synchronised
        zoo = None

    def convert(mod, name):
        if id(mod) in done:
            return done[id(mod)]
        new, reason = None, None
        if zoo is not None:
            new = zoo(mod, **options)
            reason = "known model-zoo module, converted exactly" if new is not None else None
        if new is None and isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if _torch_base(mod) is None:
                reason = (f"{type(mod).__name__} is not a BatchNorm1d/2d/3d or SyncBatchNorm: "
                          f"left as it is")
            else:
                new, reason = _convert_one(mod, options, target, extra)
        if reason is None and not isinstance(mod, nn.modules.batchnorm._BatchNorm):
            reason = zoo_reason(mod)  # a BatchNorm-like module kernels does not know
        if reason is not None:
            report.records.append(ConversionRecord(name, type(mod).__name__, new is not None,
                                                   reason))
        out = mod if new is None else new
        done[id(mod)] = out
        if out is mod:  # recurse into what stays (a converted BN has no children)
            for child_name, child in list(mod._modules.items()):  # named_children() would
                if child is None:                                   # skip a repeated module
                    continue
                converted = convert(child, f"{name}.{child_name}" if name else child_name)
                if converted is not child:
                    out.add_module(child_name, converted)
        return out

    with torch.no_grad():
        out = convert(module, "")
    out.conversion_report = report
    return out
