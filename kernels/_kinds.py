"""The one table of BatchNorm kinds the library knows, and of the layers a BatchNorm folds into.

Each kind is named by its class's qualified name (``module.QualName``), so this module
imports nothing from the rest of ``kernels`` (nor timm or torchvision) and every other
module may import it.  A class is matched exactly: a subclass may compute something else
(a subclass of a zoo class that keeps its forward is :mod:`kernels.zoo`'s business).

Fields of a :class:`BatchNormKind`:
    rank: the spatial rank of the input it takes (1 for (N, C) / (N, C, L), 2 for NCHW,
        3 for NCDHW), None for any rank (SyncBatchNorm).
    origin: "torch", "kernels", "timm" or "torchvision".
    activation: where the activation after the normalisation is read: None (none),
        "attribute" (the library's ``activation=`` option) or "drop_act" (timm's ``drop``
        and ``act`` modules).
    frozen: normalises with its fixed statistics in training mode too.
    sync: a SyncBatchNorm (statistics over a process group in training; one BN in eval).
    torch_class: the torch class it reverts to (:func:`kernels.revert_batchnorm`), for the
        library's own modules.
"""

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BatchNormKind:
    name: str
    rank: int | None
    origin: str
    activation: str | None = None
    frozen: bool = False
    sync: bool = False
    torch_class: type | None = None


def _kinds(*kinds):
    return {k.name: k for k in kinds}


KINDS = _kinds(
    BatchNormKind("torch.nn.modules.batchnorm.BatchNorm1d", 1, "torch"),
    BatchNormKind("torch.nn.modules.batchnorm.BatchNorm2d", 2, "torch"),
    BatchNormKind("torch.nn.modules.batchnorm.BatchNorm3d", 3, "torch"),
    BatchNormKind("torch.nn.modules.batchnorm.SyncBatchNorm", None, "torch", sync=True),
    BatchNormKind("kernels.modules.BatchNorm1d", 1, "kernels", "attribute",
                  torch_class=nn.BatchNorm1d),
    BatchNormKind("kernels.modules.BatchNorm2d", 2, "kernels", "attribute",
                  torch_class=nn.BatchNorm2d),
    BatchNormKind("kernels.modules.BatchNorm3d", 3, "kernels", "attribute",
                  torch_class=nn.BatchNorm3d),
    BatchNormKind("kernels.sync.SyncBatchNorm", None, "kernels", "attribute", sync=True,
                  torch_class=nn.SyncBatchNorm),
    # inference modules: frozen statistics, any (N, C, *) input
    BatchNormKind("kernels.fold.BatchNormInference", None, "kernels", "attribute", frozen=True),
    BatchNormKind("timm.layers.norm_act.BatchNormAct2d", 2, "timm", "drop_act"),
    BatchNormKind("timm.layers.norm_act.SyncBatchNormAct", 2, "timm", "drop_act", sync=True),
    BatchNormKind("timm.layers.norm_act.FrozenBatchNormAct2d", 2, "timm", "drop_act",
                  frozen=True),
    BatchNormKind("timm.models.layers.norm_act.BatchNormAct2d", 2, "timm", "drop_act"),  # < 0.9
    BatchNormKind("torchvision.ops.misc.FrozenBatchNorm2d", 2, "torchvision", frozen=True),
)

# The layers a BatchNorm folds into (exact classes), with the rank of the BatchNorm that
# follows them.  A subclass may compute otherwise from its weight (QAT, parametrized), so
# only those listed, whose forward reads ``self.weight`` and ``self.bias`` as the conv does:
# timm's Conv2dSame pads its input dynamically ("same" padding) and then runs F.conv2d.
FOLD_INTO = {
    "torch.nn.modules.linear.Linear": 1,
    "torch.nn.modules.conv.Conv1d": 1,
    "torch.nn.modules.conv.ConvTranspose1d": 1,
    "torch.nn.modules.conv.Conv2d": 2,
    "torch.nn.modules.conv.ConvTranspose2d": 2,
    "torch.nn.modules.conv.Conv3d": 3,
    "torch.nn.modules.conv.ConvTranspose3d": 3,
    "timm.layers.conv2d_same.Conv2dSame": 2,
    "timm.models.layers.conv2d_same.Conv2dSame": 2,
}


def qualname(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def kind_of(module):
    """The :class:`BatchNormKind` of `module`'s exact class, or None."""
    return KINDS.get(qualname(type(module)))


def fold_rank(module):
    """The rank of the BatchNorm a layer of this exact class feeds, or None (not foldable into)."""
    return FOLD_INTO.get(qualname(type(module)))
