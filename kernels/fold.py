r"""Folding BatchNorm into the convolution before it, and an inference BN for the rest.

Maths.  In eval mode a BatchNorm with running statistics is a per-channel affine map

    bn(z)_c = z_c * s_c + t_c,    s_c = gamma_c / sqrt(running_var_c + eps),
                                  t_c = beta_c - running_mean_c * s_c

(gamma = 1, beta = 0 without affine).  A convolution is linear in its weight, one
output channel per weight slice, so bn(conv(x)) is the convolution with

    W'[c] = W[c] * s_c,     b'_c = (b_c - running_mean_c) * s_c + beta_c     (b = 0 without bias).

The output channel c is the weight's dim 0 for Conv1d/2d/3d and Linear, and dim 1
of each group for ConvTranspose1d/2d/3d (weight (in, out/groups, *k): the group
g's in/groups rows times out/groups columns).  s, W' and b' are computed in
float64 (float32 on devices without float64) from the BN's own statistics, so
a running_var above 65504 or near 0 with float16 conv weights does not overflow
or vanish before the product, then stored in the conv's dtype.

What is exact and what is not.  The fold is exact (up to rounding) for any
stride, padding, padding mode, dilation, groups and output padding, because the
BN acts on the conv's output.  It is not exact when the conv's output also goes
elsewhere, when the conv module is called again without the BN, when the BN
normalises with batch statistics (training mode, or no running statistics), or
when the BN comes before the conv (zero padding then pads normalised values with
0 where the fold would pad unnormalised ones).  :func:`fold_batchnorm` folds only
the exact cases and runs every other BN with :class:`BatchNormInference`.

Model zoos (:mod:`kernels.zoo`): timm's ``BatchNormAct2d`` (and ``SyncBatchNormAct``,
``FrozenBatchNormAct2d``) and torchvision's ``FrozenBatchNorm2d`` are recognised by their
contract: their BN part folds (the same maths from their own statistics), and their
``drop`` and ``act`` modules stay after the conv as modules.  Any other BatchNorm-like
module (a subclass, an unknown class) is left as it is and listed with its reason.

Assumed, not checked: a Conv1d followed by a BatchNorm1d gets batched (N, C, L)
input, and a Linear followed by a BatchNorm1d gets (N, features) input (with
unbatched or (N, L, F) input the BN would normalise another axis; such models
only run when two sizes happen to agree).
"""

import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._fold_maths import fold_weights
from ._kinds import fold_rank, kind_of
from .fold_export import fold_exported_program
from .modules import BatchNorm2d
from .ops import ACTIVATIONS, batch_norm

log = logging.getLogger(__name__)

# What folds into what: kernels._kinds (the one table of BatchNorm kinds, and of the layers
# a BN folds into, exact classes).  The zoo kinds are recognised by kernels.zoo (a subclass
# that keeps the known forward is one too); here torch's and the library's own kinds.
_FOLDABLE_ORIGINS = ("torch", "kernels")


def _table_kind(bn):
    """bn's entry in the table of kinds when it is torch's or the library's BN, else None."""
    k = kind_of(bn)
    return k if k is not None and k.origin in _FOLDABLE_ORIGINS and not k.frozen else None


def _zoo(bn):
    """The kernels.zoo description of a recognised zoo BatchNorm, or None."""
    from .zoo import zoo_batchnorm

    return zoo_batchnorm(bn)


def _foldable_type(bn):
    """A BN class fold_conv_bn takes: torch's, the project's, or a recognised zoo one."""
    return _table_kind(bn) is not None or _zoo(bn) is not None


def _bn_rank(bn):
    zb = _zoo(bn)
    return zb.rank if zb is not None else _table_kind(bn).rank


def _num_features(bn):
    zb = _zoo(bn)
    return zb.num_features if zb is not None else bn.num_features


def _is_frozen(bn):
    """Normalises with fixed statistics in train mode too (the frozen zoo modules)."""
    zb = _zoo(bn)
    return zb is not None and zb.frozen


def _out_features(conv):
    return conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels


def _check_bn(bn):
    """Raise the ValueError that says why `bn` cannot be folded, if it cannot."""
    if not _foldable_type(bn):
        from .zoo import unknown_batchnorm_reason

        why = unknown_batchnorm_reason(bn)
        raise TypeError(f"fold_conv_bn: expected a torch BatchNorm1d/2d/3d or SyncBatchNorm, "
                        f"kernels.BatchNorm2d, timm's BatchNormAct2d/SyncBatchNormAct/"
                        f"FrozenBatchNormAct2d or torchvision's FrozenBatchNorm2d, got "
                        f"{type(bn).__name__}" + (f" ({why})" if why else ""))
    if _is_frozen(bn):
        return
    if bn.training:
        raise ValueError("fold_conv_bn: the BatchNorm is in training mode, where it normalises "
                         "with each batch's statistics, which no fixed weights reproduce; call "
                         ".eval() on it first")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_conv_bn: the BatchNorm has no running statistics "
                         "(track_running_stats=False), so it normalises with each batch's "
                         "statistics even in eval mode, which no fixed weights reproduce")
    if getattr(bn, "activation", None) is not None:
        raise ValueError(f"fold_conv_bn: the BatchNorm applies activation={bn.activation!r} "
                         f"after normalising, which a convolution cannot")


def fold_conv_bn(conv, bn):
    """A new convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode.

    Args:
        conv: an ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` (any groups)
            or ``nn.Linear`` (followed by a BatchNorm1d on (N, features) input).
            Not modified.
        bn: an ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm`` or
            ``kernels.BatchNorm2d`` (without activation) in eval mode, with
            running statistics, over ``conv``'s output channels; or a zoo BN
            (:mod:`kernels.zoo`): timm's ``BatchNormAct2d``/``SyncBatchNormAct`` in
            eval mode, timm's ``FrozenBatchNormAct2d``, torchvision's
            ``FrozenBatchNorm2d`` (any mode: it is frozen).  Not modified.

    Returns:
        For a BN with a ``drop`` and ``act`` after it (timm's ``*Act2d``, when they
        are not identities): ``nn.Sequential(conv=folded conv, drop=..., act=...)``
        (copies of those modules, identities left out), equal to ``bn(conv(x))``.
        Otherwise a copy of ``conv`` (same class, stride, padding, padding mode, dilation,
        groups, device, dtype) whose weight is scaled per output channel and
        which always has a bias; both parameters are new and keep the
        ``requires_grad`` of the conv's weight (the bias: of the conv's bias
        when it had one).  The arithmetic is done in float64 from the BN's
        statistics and stored in the conv's dtype.

    Raises:
        TypeError: ``conv`` or ``bn`` is of a type that is not folded.
        ValueError: ``bn`` is in training mode, has no running statistics, has
            a fused activation, or has a channel count other than the conv's.
    """
    if fold_rank(conv) is None:
        raise TypeError(f"fold_conv_bn: expected a torch Conv1d/2d/3d, ConvTranspose1d/2d/3d, "
                        f"Linear or timm's Conv2dSame (exact class: a subclass may compute "
                        f"otherwise), got "
                        f"{type(conv).__name__}")
    _check_bn(bn)
    C = _out_features(conv)
    if _num_features(bn) != C:
        raise ValueError(f"fold_conv_bn: the BatchNorm has {_num_features(bn)} channels but the "
                         f"{type(conv).__name__} has {C} output channels")
    if _bn_rank(bn) not in (None, fold_rank(conv)):
        raise ValueError(f"fold_conv_bn: a {type(conv).__name__} does not feed a "
                         f"{type(bn).__name__} (it takes {_bn_rank(bn) + 2}-D input)")
    folded = _fold_pair(conv, bn)
    zb = _zoo(bn)
    if zb is not None and zb.act is not None:
        from .zoo import drop_act

        after = drop_act(zb, copy=True)
        if not isinstance(after, nn.Identity):
            return nn.Sequential(OrderedDict([("conv", folded), *after.named_children()]))
    return folded


def _fold_pair(conv, bn):
    """The folded copy of `conv` (checks done by the caller)."""
    transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
    weight, bias = fold_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                bn.weight, bn.bias, bn.eps, transposed=transposed,
                                groups=getattr(conv, "groups", 1))
    folded = copy.deepcopy(conv)
    bias_grad = conv.bias.requires_grad if conv.bias is not None else conv.weight.requires_grad
    folded.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    folded.bias = nn.Parameter(bias, requires_grad=bias_grad)
    return folded


class BatchNormInference(nn.Module):
    """A BatchNorm with frozen statistics, run by the one-pass inference kernel.

    ``forward(input, residual=None)`` computes
    ``act((input - running_mean) * weight / sqrt(running_var + eps) + bias [+ residual])``
    with ``kernels.batch_norm(..., training=False)`` on (N, C, *) input (what
    BatchNorm1d/2d/3d take: (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W)),
    NCHW or channels_last; the statistics are never updated, in train mode
    too (like torchvision's FrozenBatchNorm2d), and the result is
    differentiable in input, weight and bias.

    Args:
        num_features: C.
        eps: added to the variance.
        affine: with learnable weight and bias (else none).
        device, dtype: of the parameters and buffers.
        activation: None, "relu" or "silu", fused after the affine step.
    """

    def __init__(self, num_features, eps=1e-5, affine=True, device=None, dtype=None, *,
                 activation=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        kw = dict(device=device, dtype=dtype)
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.activation = activation
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **kw))
            self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))

    @classmethod
    def from_batchnorm(cls, bn, activation=None):
        """The inference module of an eval-mode BN with running statistics.

        Shares ``bn``'s weight and bias Parameters and its running-stat tensors
        (no copies), as ``convert_batchnorm`` does.
        """
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("BatchNormInference.from_batchnorm: the BatchNorm has no running "
                             "statistics (track_running_stats=False): it normalises with batch "
                             "statistics, which a frozen BN does not")
        out = cls(bn.num_features, bn.eps, bn.affine, device="meta", activation=activation)
        out.weight, out.bias = bn.weight, bn.bias
        out.running_mean, out.running_var = bn.running_mean, bn.running_var
        return out

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, affine={self.affine}, "
                f"activation={self.activation!r}")

    def forward(self, input, residual=None):
        return batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                          training=False, eps=self.eps, residual=residual,
                          activation=self.activation)


# ---------------------------------------------------------------------------------------------
# model-wide folding

@dataclass(frozen=True)
class FoldRecord:
    """What :func:`fold_batchnorm` did with one BatchNorm.

    Attributes:
        bn: the BN's qualified name in the model.
        action: "folded" (into `conv`, the BN replaced by nn.Identity),
            "inference" (replaced by BatchNormInference), "batch_stats"
            (replaced by a batch-statistics kernels.BatchNorm2d) or "unchanged".
        conv: the module it was folded into (action "folded"), else None.
        relu: the ReLU module fused into its replacement (then an nn.Identity), or None.
        reason: why it was not folded (empty when folded).
    """

    bn: str
    action: str
    conv: str | None = None
    relu: str | None = None
    reason: str = ""


@dataclass
class FoldReport:
    """All of :func:`fold_batchnorm`'s decisions; ``str()`` gives a readable summary.

    Attributes:
        method: "fx" (dataflow from torch.fx tracing) or "sequential" (tracing
            failed: only consecutive children of nn.Sequential containers).
        trace_error: why tracing failed (method "sequential"), else "".
        records: one FoldRecord per BatchNorm, in the model's module order.
    """

    method: str
    trace_error: str = ""
    records: list = field(default_factory=list)

    @property
    def folded(self):
        return [r for r in self.records if r.action == "folded"]

    @property
    def kept(self):
        return [r for r in self.records if r.action != "folded"]

    def __str__(self):
        lines = [f"fold_batchnorm ({self.method}"
                 + (f"; tracing failed: {self.trace_error}" if self.trace_error else "")
                 + f"): {len(self.folded)} folded, {len(self.kept)} kept"]
        for r in self.records:
            relu = f" + fused {r.relu}" if r.relu else ""
            if r.action == "folded":
                lines.append(f"  {r.bn}: folded into {r.conv}")
            else:
                lines.append(f"  {r.bn}: {r.action}{relu}: {r.reason}")
        return "\n".join(lines)


class _Tracer(fx.Tracer):
    """fx tracer that keeps convs, Linear and every BN (ours included) as leaf calls."""

    def is_leaf_module(self, m, module_qualified_name):
        from .zoo import looks_like_batchnorm

        return (isinstance(m, (_BatchNorm, BatchNormInference, nn.modules.conv._ConvNd, nn.Linear))
                or looks_like_batchnorm(m) or super().is_leaf_module(m, module_qualified_name))


def _has_hooks(m):
    """Hooks would see the folded values (or be lost with the module): leave such modules."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _is_relu(m):
    return type(m) is nn.ReLU and not _has_hooks(m)


@dataclass
class _Decision:
    action: str  # "fold", "inference", "batch_stats", "unchanged"
    reason: str = ""
    conv: nn.Module | None = None
    relu: nn.Module | None = None


def _has_act(bn):
    """A zoo BN whose drop/act epilogue is not an identity (a following ReLU cannot fuse)."""
    zb = _zoo(bn)
    if zb is None or zb.act is None:
        return False
    from .zoo import drop_act

    return not isinstance(drop_act(zb), nn.Identity)


def _unfoldable_bn(bn):
    """Why this BN is handled apart from folding ((action, reason)), or None when it may fold."""
    if not _foldable_type(bn):
        from .zoo import unknown_batchnorm_reason

        return "unchanged", unknown_batchnorm_reason(bn) or "not a BatchNorm class it knows"
    if _has_hooks(bn):
        return "unchanged", "it has hooks, which a replacement would lose"
    if bn.running_mean is None or bn.running_var is None:
        why = "no running statistics: it normalises with batch statistics even in eval"
        if type(bn) is nn.BatchNorm2d:
            return "batch_stats", why
        if type(bn) is BatchNorm2d:
            return "unchanged", why + " (already a kernels.BatchNorm2d)"
        if _zoo(bn) is not None:
            return "unchanged", why + " (a zoo module with its own drop and act: kept as is)"
        return "unchanged", why + " (kernels.BatchNorm2d takes 4-D input only, so kept as is)"
    if getattr(bn, "activation", None) is not None:
        return "inference", f"it applies activation={bn.activation!r}, which a conv cannot"
    return None


def _conv_fits(conv, bn):
    """Why `conv` cannot take `bn` (a reason), or "" when the pair folds exactly."""
    if fold_rank(conv) is None:
        return f"its input comes from a {type(conv).__name__}, not a torch conv or Linear"
    if _has_hooks(conv):
        return "the conv has hooks, which would see folded values"
    rank = _bn_rank(bn)
    if rank is not None and rank != fold_rank(conv):
        return f"a {type(conv).__name__} does not feed a {type(bn).__name__}"
    if _out_features(conv) != _num_features(bn):
        return f"the conv has {_out_features(conv)} output channels, the BN {_num_features(bn)}"
    return ""


def _plan_fx(model, graph, bns):
    """Decisions from the traced dataflow: fold where every call of the conv feeds only the BN."""
    calls, touched = {}, set()  # module -> its call nodes; modules whose attributes forward reads
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(model.get_submodule(node.target), []).append(node)
        elif node.op == "get_attr" and "." in node.target:
            try:
                touched.add(model.get_submodule(node.target.rsplit(".", 1)[0]))
            except AttributeError:  # an attribute of a non-module object
                pass

    def module_of(node):  # the module a node calls, or None
        if isinstance(node, fx.Node) and node.op == "call_module":
            return model.get_submodule(node.target)
        return None

    def sole_input(node):  # the argument of a one-argument call, or None
        return node.args[0] if len(node.args) == 1 and not node.kwargs else None

    def fold_blocker(bn, bn_calls):  # why bn cannot fold (a reason), or "" with the conv
        if not bn_calls:
            return "forward does not call it", None
        if any(sole_input(n) is None for n in bn_calls):
            return "it is called with more than one argument", None
        producers = {module_of(sole_input(n)) for n in bn_calls}
        conv = producers.pop() if len(producers) == 1 else None
        if conv is None:
            return ("its input is not a conv's output (a BN is never folded into the conv "
                    "after it, which zero padding makes inexact)"), None
        reason = _conv_fits(conv, bn)
        if not reason and conv in touched:
            reason = "forward reads the conv's attributes, which folding changes"
        if not reason and any(len(c.users) != 1 for c in calls[conv]):
            reason = "the conv's output also feeds other nodes"
        if not reason and any(module_of(next(iter(c.users))) is not bn for c in calls[conv]):
            reason = f"the conv module is called {len(calls[conv])} times, not always into this BN"
        return reason, conv

    def fused_relu(bn, bn_calls):  # the ReLU module that takes every output of bn and only that
        users = [list(n.users) for n in bn_calls]
        if not bn_calls or getattr(bn, "activation", None) is not None or _has_act(bn) or \
                any(len(u) != 1 or sole_input(u[0]) is None for u in users):
            return None
        relus = {module_of(u[0]) for u in users}
        relu = relus.pop() if len(relus) == 1 else None
        if relu is None or not _is_relu(relu) or relu in touched or \
                len(calls[relu]) != len(bn_calls):
            return None
        return relu

    plan = {}
    for bn in bns:
        special = _unfoldable_bn(bn)
        if special is None and bn in touched:
            special = "unchanged", "forward reads its attributes"
        if special is not None and special[0] == "unchanged":
            plan[bn] = _Decision(*special)
            continue
        bn_calls = calls.get(bn, [])
        if special is None:
            reason, conv = fold_blocker(bn, bn_calls)
            if not reason:
                plan[bn] = _Decision("fold", conv=conv)
                continue
            special = "inference", reason
        plan[bn] = _Decision(*special, relu=fused_relu(bn, bn_calls))
    return plan


def _plan_sequential(model, bns, trace_error):
    """Decisions for a model fx cannot trace: consecutive children of nn.Sequential only.

    Assumes a Sequential's children are called only by that Sequential (its
    forward is the dataflow); modules registered in more than one place are
    not folded.
    """
    counts = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[m] = counts.get(m, 0) + 1
    plan = {}
    for seq in model.modules():
        if type(seq) is not nn.Sequential:
            continue
        children = list(seq.children())
        for i, bn in enumerate(children):
            if bn not in bns or bn in plan or _unfoldable_bn(bn):
                continue
            prev = children[i - 1] if i > 0 else None
            if prev is not None and counts[prev] == 1 and counts[bn] == 1 \
                    and not _conv_fits(prev, bn):
                plan[bn] = _Decision("fold", conv=prev)
    for bn in bns:
        if bn in plan:
            continue
        special = _unfoldable_bn(bn)
        action, reason = special if special else (
            "inference", f"not after a conv in an nn.Sequential (model not traceable: "
                         f"{trace_error})")
        plan[bn] = _Decision(action, reason)
    # a ReLU right after a kept BN in a Sequential, registered nowhere else, is fused
    for seq in model.modules():
        if type(seq) is not nn.Sequential:
            continue
        children = list(seq.children())
        for bn, nxt in zip(children, children[1:]):
            d = plan.get(bn)
            if d is not None and d.action in ("inference", "batch_stats") and _is_relu(nxt) \
                    and counts[nxt] == 1 and counts[bn] == 1 \
                    and getattr(bn, "activation", None) is None and not _has_act(bn):
                d.relu = nxt
    return plan


def _replace_children(model, new):
    """Swap every registration of each module in `new` (old -> replacement), aliases included."""
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child in new:
                parent._modules[name] = new[child]


def fold_batchnorm(model, inplace=False):
    """Fold every BatchNorm that directly follows a convolution into it; run the rest frozen.

    Pairs are found by dataflow: ``torch.fx`` traces ``model.forward`` (convs,
    Linear and BNs as leaf calls).  A BN is folded into a conv (see
    :func:`fold_conv_bn`) when every call of the BN takes the output of a call
    of that conv and every call of the conv feeds only that BN.  If tracing
    fails, the consecutive (conv, BN) children of every ``nn.Sequential`` are
    folded instead, assuming those children are called only by their
    Sequential.

    The model zoos' BNs (:mod:`kernels.zoo`: timm's BatchNormAct2d and siblings,
    torchvision's FrozenBatchNorm2d) fold the same way; a folded one's ``drop`` and
    ``act`` modules take its place (``nn.Sequential``), a kept one runs the inference
    kernel with its ReLU/SiLU fused.  BatchNorm-like modules it does not know (a
    subclass with its own forward, an unknown class) are left as they are, and listed.

    Every BN that is not folded is replaced by :class:`BatchNormInference`
    (the one-pass inference kernel), fusing a following ``nn.ReLU`` module
    when that ReLU takes only this BN's output (the ReLU becomes
    ``nn.Identity``); a ``nn.BatchNorm2d`` without running statistics, which
    normalises with batch statistics even in eval, becomes a batch-statistics
    :class:`kernels.BatchNorm2d`.  Left unchanged: other BNs without running
    statistics, BNs with hooks, BNs whose tensors forward reads (``self.bn.weight``).
    Not detected (fx does not record it): a forward that reads a folded BN's
    plain attributes (``self.bn.eps``) fails with AttributeError on the
    Identity, and one that tests ``self.conv.bias is None`` sees the new bias.

    A folded BN's place in its parent is taken by ``nn.Identity`` (so every
    other module keeps its name and ``state_dict`` key); the BN and its
    ``state_dict`` entries are gone.

    An ``ExportedProgram`` is folded by :func:`kernels.fold_export.fold_exported_program`
    (a new program, its BatchNorm nodes after a conv, transposed conv or linear gone).

    Args:
        model: an ``nn.Module`` (not modified unless ``inplace``) or an ``ExportedProgram``
            (never modified; `inplace` is ignored).
        inplace: fold `model` itself instead of a deep copy.

    Returns:
        The folded model, in eval mode.  ``model.fold_report`` (a
        :class:`FoldReport`) says which BN was folded into which conv and
        which were kept and why; the summary is also logged at INFO level.
        Folding a folded model again changes nothing.
    """
    if isinstance(model, torch.export.ExportedProgram):
        return fold_exported_program(model)
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    from .zoo import drop_act, looks_like_batchnorm, zoo_inference_module

    bns = [m for m in dict.fromkeys(model.modules())
           if m is not model and (_table_kind(m) is not None or looks_like_batchnorm(m))]
    # a BN-like module inside another one (a zoo module's act) is its parent's business
    inner = {c for m in bns for c in m.modules() if c is not m}
    bns = [m for m in bns if m not in inner]
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # any tracing failure (control flow on values, unsupported ops)
        trace_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        report = FoldReport("sequential", trace_error)
        plan = _plan_sequential(model, set(bns), trace_error)
    else:
        report = FoldReport("fx")
        plan = _plan_fx(model, graph, bns)

    names = {}
    for name, m in model.named_modules():
        names.setdefault(m, name)
    new = {}
    for bn in bns:
        d = plan[bn]
        relu_name = names.get(d.relu) if d.relu is not None else None
        zb = _zoo(bn)
        if d.action == "fold":
            new[d.conv] = _fold_pair(d.conv, bn)
            # a zoo BN's drop and act stay, as modules in its place
            new[bn] = drop_act(zb) if zb is not None and zb.act is not None else nn.Identity()
            report.records.append(FoldRecord(names[bn], "folded", conv=names[d.conv]))
            continue
        activation = "relu" if d.relu is not None else getattr(bn, "activation", None)
        if d.action == "inference" and zb is not None:
            new[bn] = zoo_inference_module(zb, activation)
        elif d.action == "inference":
            new[bn] = BatchNormInference.from_batchnorm(bn, activation)
        elif d.action == "batch_stats":
            bs = BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine,
                             bn.track_running_stats, activation=activation)
            bs.weight, bs.bias = bn.weight, bn.bias
            bs.running_mean = bs.running_var = bs.num_batches_tracked = None  # batch stats only
            new[bn] = bs.eval()
        if d.relu is not None:
            new[d.relu] = nn.Identity()
        report.records.append(FoldRecord(names[bn], d.action, relu=relu_name, reason=d.reason))
    _replace_children(model, new)
    model.eval()
    model.fold_report = report
    log.info("%s", report)
    return model
