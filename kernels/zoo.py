r"""The BatchNorm variants of the two big model zoos, recognised by their behaviour contract.

timm and torchvision are optional: nothing here imports them.  A module is recognised
when its class (or the first class of its MRO that is one of these, with no class in
between defining ``forward``) is one of the classes below, identified by module path
and name, and it has the attributes that class's contract reads.  The contracts, in
eval mode (``bn`` is ``F.batch_norm`` with the running statistics):

* ``timm.layers.norm_act.BatchNormAct2d`` (kind ``bn_act``): ``act(drop(bn(x)))``, with
  batch statistics in training (a ``nn.BatchNorm2d`` subclass);
* ``timm.layers.norm_act.SyncBatchNormAct`` (``bn_act``): the same on ``nn.SyncBatchNorm``
  (drop and act applied where set);
* ``timm.layers.norm_act.FrozenBatchNormAct2d`` (``frozen_act``): ``act(drop(x * s + t))``;
* ``torchvision.ops.misc.FrozenBatchNorm2d`` (``frozen``): ``x * s + t``, in training too;

with ``s = weight / sqrt(running_var + eps)`` and ``t = bias - running_mean * s``
(the frozen classes hold weight and bias as buffers, and never update anything).
timm's ``FrozenBatchNorm2d`` is torchvision's class (timm imports it), and timm
before 0.9 had the same classes under ``timm.models.layers.norm_act``.

What the rest of ``kernels`` does with them:

* :func:`kernels.fold_batchnorm` / :func:`kernels.fold_conv_bn` fold the BN part of
  each into the conv before it (frozen: always; BatchNormAct2d: in eval), and the
  ``drop`` and ``act`` modules stay after the conv as modules (:func:`drop_act`).
* :func:`convert_zoo_module` (called by :func:`kernels.convert_batchnorm`) returns
  the exact replacement on the Triton kernels.

Any other BatchNorm-like module (a subclass of torch's ``_BatchNorm`` that is not one
of torch's or the project's own classes, or a class named like a BatchNorm with
running statistics) is "unknown": :func:`unknown_batchnorm_reason` says why it is
left as it is.
"""

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._common import ACTIVATION_TABLE
from .fold import BatchNormInference
from .modules import BatchNorm2d

# qualified class name -> kind
KNOWN = {
    "timm.layers.norm_act.BatchNormAct2d": "bn_act",
    "timm.layers.norm_act.SyncBatchNormAct": "bn_act",
    "timm.layers.norm_act.FrozenBatchNormAct2d": "frozen_act",
    "timm.models.layers.norm_act.BatchNormAct2d": "bn_act",  # timm < 0.9
    "torchvision.ops.misc.FrozenBatchNorm2d": "frozen",
}
# the activations the kernels fuse, by exact class
FUSED_ACTIVATIONS = {a.module: name for name, a in ACTIVATION_TABLE.items() if name != "none"}


def _qualname(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def _has_hooks(m):
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


@dataclass(frozen=True)
class ZooBatchNorm:
    """A recognised zoo BatchNorm, as the parts of its contract.

    Attributes:
        module: the module itself.
        kind: "bn_act", "frozen" or "frozen_act" (see the module docstring).
        cls: the known class's qualified name (the module may be a subclass that
            keeps its forward).
        num_features, eps: C and the variance epsilon.
        weight, bias, running_mean, running_var: the module's tensors (weight and
            bias may be None for a BatchNormAct2d without affine).
        drop, act: the modules applied after the BN (None for "frozen").
    """

    module: nn.Module
    kind: str
    cls: str
    num_features: int
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    drop: nn.Module | None = None
    act: nn.Module | None = None

    @property
    def frozen(self):
        """Normalises with its fixed statistics in train mode too."""
        return self.kind in ("frozen", "frozen_act")

    @property
    def sync(self):
        return isinstance(self.module, nn.SyncBatchNorm)

    @property
    def rank(self):
        """Spatial rank of the input it takes (4-D input)."""
        return 2

    @property
    def fused_activation(self):
        """(fusable, activation): whether drop and act are an epilogue the kernels compute
        (drop an ``nn.Identity``; act an ``nn.Identity``, ``nn.ReLU`` or ``nn.SiLU``,
        exact classes without hooks), and that activation (None, "relu" or "silu")."""
        if self.act is None:
            return True, None
        if type(self.drop) is not nn.Identity or _has_hooks(self.drop) or _has_hooks(self.act):
            return False, None
        if type(self.act) is nn.Identity:
            return True, None
        name = FUSED_ACTIVATIONS.get(type(self.act))
        return name is not None, name


def _known_base(cls):
    """The known class in `cls`'s MRO with no class before it defining forward, or None."""
    for c in cls.__mro__:
        if _qualname(c) in KNOWN:
            return c
        if "forward" in vars(c):
            return None
    return None


def _is_vector(t, C=None):
    return isinstance(t, torch.Tensor) and t.dim() == 1 and (C is None or t.numel() == C)


def zoo_batchnorm(module):
    """The :class:`ZooBatchNorm` of a recognised zoo BatchNorm, or None."""
    base = _known_base(type(module))
    if base is None:
        return None
    kind = KNOWN[_qualname(base)]
    eps = getattr(module, "eps", None)
    if not isinstance(eps, (int, float)):
        return None
    rm, rv = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    drop, act = getattr(module, "drop", None), getattr(module, "act", None)
    if kind == "bn_act":
        # SyncBatchNormAct applies drop and act only where set (timm sets both)
        optional = isinstance(module, nn.SyncBatchNorm)
        if not isinstance(module, _BatchNorm) or not all(
                isinstance(m, nn.Module) or (optional and m is None) for m in (drop, act)):
            return None
        C = module.num_features
    else:
        if not _is_vector(rv):
            return None
        C = rv.numel()
        if not all(_is_vector(t, C) for t in (w, b, rm)):
            return None
        if kind == "frozen_act" and not (isinstance(drop, nn.Module)
                                         and isinstance(act, nn.Module)):
            return None
        if kind == "frozen":
            drop = act = None
    return ZooBatchNorm(module, kind, _qualname(base), C, float(eps), w, b, rm, rv, drop, act)


def looks_like_batchnorm(module):
    """A module that is, or looks like, a BatchNorm: a torch ``_BatchNorm`` (subclasses
    included), the project's inference module, a recognised zoo module, or a class whose
    name contains "BatchNorm" that has running_mean and running_var tensors."""
    if isinstance(module, (_BatchNorm, BatchNormInference)) or zoo_batchnorm(module):
        return True
    return ("batchnorm" in type(module).__name__.lower()
            and isinstance(getattr(module, "running_mean", None), torch.Tensor)
            and isinstance(getattr(module, "running_var", None), torch.Tensor))


def unknown_batchnorm_reason(module):
    """Why a BatchNorm-like module is left as it is (a sentence), or None when it is one
    the project handles: torch's BatchNorm1d/2d/3d and SyncBatchNorm (exact classes), the
    project's own modules, and the zoo classes above."""
    if not looks_like_batchnorm(module) or zoo_batchnorm(module) is not None:
        return None
    own = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, BatchNorm2d,
           BatchNormInference)
    if type(module) in own or type(module).__module__.split(".")[0] == "kernels":
        return None
    name = _qualname(type(module))
    for c in type(module).__mro__[1:]:
        if _qualname(c) in KNOWN or c in own:
            return (f"unknown BatchNorm variant {name}: a subclass of {_qualname(c)} that may "
                    f"compute otherwise (own forward or attributes), so no exact equivalent "
                    f"is known")
    return f"unknown BatchNorm variant {name}: its forward's maths is not known"


def drop_act(zb, copy=False):
    """The modules a recognised BN applies after normalising, as one module: its ``drop``
    then its ``act`` (an ``nn.Sequential`` with those names, identities left out), or
    ``nn.Identity`` when there are none.  `copy`: deep copies instead of the modules."""
    import copy as _copy

    parts = [(n, m) for n, m in (("drop", zb.drop), ("act", zb.act))
             if m is not None and not (type(m) is nn.Identity and not _has_hooks(m))]
    if copy:
        parts = [(n, _copy.deepcopy(m)) for n, m in parts]
    return nn.Sequential(OrderedDict(parts)) if parts else nn.Identity()


class _ThenDropAct:
    """Mixin: the parent's forward, then ``self.drop`` and ``self.act`` (timm's order)."""

    def forward(self, input, residual=None):
        return self.act(self.drop(super().forward(input, residual)))


class BatchNormAct2d(_ThenDropAct, BatchNorm2d):
    """``kernels.BatchNorm2d`` then the original ``drop`` and ``act`` modules: what a timm
    BatchNormAct2d becomes when its epilogue is not one the kernels fuse.  Same
    ``state_dict`` keys as timm's module."""


class BatchNormInferenceAct(_ThenDropAct, BatchNormInference):
    """``kernels.BatchNormInference`` then the original ``drop`` and ``act`` modules (timm's
    FrozenBatchNormAct2d when its epilogue is not one the kernels fuse)."""


def zoo_inference_module(zb, activation=None):
    """The inference-kernel module equal to a recognised zoo BN with frozen statistics
    (a frozen class, or a BatchNormAct2d in eval), sharing its tensors (no copies).

    ``kernels.BatchNormInference`` with the module's activation fused, when its
    epilogue is one the kernels compute (:attr:`ZooBatchNorm.fused_activation`), else
    :class:`BatchNormInferenceAct` (then the original drop and act).  Weight and bias
    stay buffers where the original holds them as buffers.

    Args:
        zb: a :class:`ZooBatchNorm` with running statistics.
        activation: "relu" to fuse a ReLU module that follows the BN (only for a BN
            with no epilogue of its own), or None.
    """
    fusable, own = zb.fused_activation
    if activation is not None and own is not None:
        raise ValueError(f"{zb.cls} already applies {own}; a second activation is not fused")
    if zb.running_mean is None or zb.running_var is None:
        raise ValueError(f"{zb.cls} has no running statistics: it normalises with batch "
                         f"statistics, which the inference kernel does not")
    affine = zb.weight is not None
    cls = BatchNormInference if fusable else BatchNormInferenceAct
    new = cls(zb.num_features, zb.eps, affine=affine, device="meta",
              activation=(own or activation) if fusable else None)
    if affine:
        if isinstance(zb.weight, nn.Parameter):
            new.weight, new.bias = zb.weight, zb.bias
        else:  # the frozen modules hold them as buffers
            del new.weight, new.bias
            new.register_buffer("weight", zb.weight)
            new.register_buffer("bias", zb.bias)
    new.running_mean, new.running_var = zb.running_mean, zb.running_var
    if not fusable:
        new.drop, new.act = zb.drop, zb.act
    return new


def convert_zoo_module(module, **kwargs):
    """The exact replacement on the Triton kernels of a known zoo BatchNorm, or None.

    * timm ``BatchNormAct2d``: a ``kernels.BatchNorm2d`` with the activation fused
      (``activation="relu"``/``"silu"``, or none) when its act is ``nn.ReLU``,
      ``nn.SiLU`` or ``nn.Identity`` and its drop an ``nn.Identity``; otherwise
      ``kernels.zoo.BatchNormAct2d``, the kernels' BN followed by the original drop
      and act modules.  Training and eval, running-stat rules, momentum=None: as
      timm's (which are torch's BatchNorm2d's).
    * torchvision's (and timm's) ``FrozenBatchNorm2d``: ``kernels.BatchNormInference``
      (frozen in train mode too, as the original), weight and bias kept as buffers.
    * timm ``FrozenBatchNormAct2d``: ``BatchNormInference`` with the activation fused,
      or ``kernels.zoo.BatchNormInferenceAct`` (then drop and act).

    The new module shares the original's tensors (no copies), keeps its training flag
    and its ``state_dict`` keys.  Returned as None (left as it is): any module that is
    not recognised (:func:`zoo_batchnorm`), one with hooks, timm's ``SyncBatchNormAct``
    (cross-process statistics, which the kernels' BN does not compute).

    Args:
        module: any module.
        kwargs: ``stats=`` for the batch-statistics BN.  ``activation=`` is ignored:
            the module's own act decides.

    Returns:
        The replacement module, or None.
    """
    zb = zoo_batchnorm(module)
    if zb is None or _has_hooks(module) or zb.sync:
        return None
    fusable, activation = zb.fused_activation
    if zb.kind == "bn_act":
        opts = {k: v for k, v in kwargs.items() if k != "activation"}
        cls = BatchNorm2d if fusable else BatchNormAct2d
        new = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats, device="meta", activation=activation, **opts)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        if not fusable:
            new.drop, new.act = zb.drop, zb.act
    else:
        new = zoo_inference_module(zb)
    new.train(module.training)
    return new


def convert_zoo_reason(module):
    """Why :func:`convert_zoo_module` returns None for a BatchNorm-like `module` (a
    sentence), or None when it converts it or `module` is no BatchNorm."""
    zb = zoo_batchnorm(module)
    if zb is None:
        return unknown_batchnorm_reason(module)
    if _has_hooks(module):
        return f"{zb.cls} with hooks, which a replacement would lose: left as it is"
    if zb.sync:
        return (f"{zb.cls} computes statistics across processes, which kernels.BatchNorm2d "
                f"does not: left as it is")
    return None
