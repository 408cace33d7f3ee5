"""Folding BatchNorm in a ``torch.export`` program (``kernels.fold_batchnorm(exported_program)``).

Each eval-mode BatchNorm node whose input is the only use of a convolution, transposed
convolution or linear node is removed, and that node's weight and bias (parameters,
buffers or constants of the program) carry it (:func:`kernels._fold_maths.fold_weights`,
the maths :func:`kernels.fold_conv_bn` uses).  The user inputs and outputs, and every other
node, are unchanged; the placeholders only the folded BN read (its weight, running
statistics) leave the program with their state.  A layer without bias takes the BN's bias
placeholder (or its running_mean's) as its bias, so no input is added.

The BatchNorm node forms met and folded (the statistics must be running ones):

- ``aten.batch_norm.default`` with ``training=False``: the default (training) IR of
  ``torch.export.export`` of an eval-mode model;
- ``aten._native_batch_norm_legit_no_training.default``: the inference IR
  (``ep.run_decompositions()``), output 0 through ``getitem``;
- ``aten.native_batch_norm``, ``aten.cudnn_batch_norm``, ``aten.miopen_batch_norm`` with
  ``training=False`` and ``aten._batch_norm_no_update`` (older or device-specific IRs).

Kept as they are (listed in the report with the reason): BatchNorms in training mode
(``training=True``, ``_batch_norm_with_update``, ``_native_batch_norm_legit``: a program
exported from a model in train mode normalises with each batch's statistics, which no
fixed weights reproduce), BatchNorms after anything but those layers, layers whose output
or weight has other users, and a linear whose output is not 2-D (BatchNorm1d over its
features is then another axis).  Layers recognised: ``aten.conv1d/2d/3d`` (both
overloads), ``aten.convolution`` (transposed or not), ``aten.conv_transpose1d/2d/3d``,
``aten.linear``.
"""

import copy
import logging
import operator
from dataclasses import dataclass

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind

from ._fold_maths import fold_weights

log = logging.getLogger(__name__)
aten = torch.ops.aten


# BatchNorm forms: op -> (index of `training` in args or None (eval form), index of eps,
# whether the node returns a tuple whose item 0 is the output)
_BN_FORMS = {
    aten.batch_norm.default: (5, 7, False),
    aten._native_batch_norm_legit_no_training.default: (None, 6, True),
    aten.native_batch_norm.default: (5, 7, True),
    aten.cudnn_batch_norm.default: (5, 7, True),
    aten.miopen_batch_norm.default: (5, 7, True),
    aten._batch_norm_no_update.default: (None, 6, True),
}
_TRAINING_FORMS = {aten._batch_norm_with_update.default,
                   aten._batch_norm_with_update_functional.default,
                   aten._native_batch_norm_legit.default,
                   aten._native_batch_norm_legit_functional.default}
BATCHNORM_OPS = frozenset(_BN_FORMS) | frozenset(_TRAINING_FORMS)


def _conv_arg_layout(node):
    """(bias index, transposed, groups) of a layer node, or None when it is not one."""
    t, a = node.target, node.args
    if t in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
             aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding):
        return 2, False, (a[6] if len(a) > 6 else node.kwargs.get("groups", 1))
    if t == aten.convolution.default:
        return 2, bool(a[6]), a[8]
    if t in (aten.conv_transpose1d.default, aten.conv_transpose2d.input,
             aten.conv_transpose3d.input):
        return 2, True, (a[6] if len(a) > 6 else node.kwargs.get("groups", 1))
    if t == aten.linear.default:
        return 2, False, 1
    return None


def _matmul_weight(node):
    """The weight placeholder of the inference IR's linear (addmm(b, x, permute(w)) or
    mm(x, permute(w))), or None."""
    if node.target not in (aten.addmm.default, aten.mm.default):
        return None
    t = node.args[-1]
    if isinstance(t, torch.fx.Node) and t.target == aten.permute.default \
            and list(t.args[1]) == [1, 0] and len(t.users) == 1 and not node.kwargs:
        return t.args[0]
    return None


@dataclass(frozen=True)
class ExportFoldRecord:
    """One BatchNorm node of the program: folded into `layer`, or kept with `reason`."""

    bn: str
    action: str  # "folded" or "kept"
    layer: str | None = None
    reason: str = ""


class _State:
    """The program's placeholders' values, read and written by placeholder node."""

    def __init__(self, ep):
        self.specs = {s.arg.name: s for s in ep.graph_signature.input_specs
                      if hasattr(s.arg, "name")}
        self.state_dict = dict(ep.state_dict)
        self.constants = dict(ep.constants)

    def _where(self, node):
        spec = self.specs.get(node.name) if node.op == "placeholder" else None
        if spec is None or spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER,
                                             InputKind.CONSTANT_TENSOR):
            return None
        if spec.target in self.state_dict:
            return self.state_dict
        return self.constants if spec.target in self.constants else None

    def known(self, node):
        return node is None or (isinstance(node, torch.fx.Node) and self._where(node) is not None)

    def get(self, node):
        return None if node is None else self._where(node)[self.specs[node.name].target]

    def set(self, node, value):
        store, target = self._where(node), self.specs[node.name].target
        old = store[target]
        store[target] = (torch.nn.Parameter(value, requires_grad=old.requires_grad)
                         if isinstance(old, torch.nn.Parameter) else value)

    def drop(self, node):
        store, target = self._where(node), self.specs[node.name].target
        del store[target]
        del self.specs[node.name]


def _fold_one(gm, bn, state):
    """Fold the BN node `bn` into its input layer; returns (layer name, "") or (None, reason)."""
    training_at, eps_at, returns_tuple = _BN_FORMS[bn.target]
    args = bn.args
    if training_at is not None and args[training_at]:
        return None, "training=True: normalises with batch statistics"
    x, gamma, beta, mean, var = args[:5]
    if mean is None or var is None:
        return None, "no running statistics"
    if not all(state.known(t) for t in (gamma, beta, mean, var)):
        return None, "its weight or statistics are not parameters, buffers or constants"
    if not all(t is None or len(t.users) == 1 for t in (gamma, beta, mean, var)):
        return None, "its weight or statistics are read elsewhere too"
    outputs = list(bn.users)
    if returns_tuple and not all(u.target is operator.getitem and u.args[1] == 0
                                 for u in outputs):
        return None, "an output other than the normalised tensor is used"
    if not isinstance(x, torch.fx.Node) or x.op != "call_function" or (
            (layout := _conv_arg_layout(x)) is None and _matmul_weight(x) is None):
        return None, f"its input is not a conv or linear ({getattr(x, 'target', x)})"
    if len(x.users) != 1:
        return None, f"the output of {x.name} also feeds other nodes"
    if layout is None:  # inference IR's linear
        w, transposed, groups = _matmul_weight(x), False, 1
        b = x.args[0] if x.target == aten.addmm.default else None
    else:
        bias_at, transposed, groups = layout
        w = x.args[1]
        b = x.args[bias_at] if len(x.args) > bias_at else x.kwargs.get("bias")
    if not (state.known(w) and w is not None and state.known(b)):
        return None, f"{x.name}'s weight or bias is not a parameter, buffer or constant"
    if len(w.users) != 1 or (b is not None and len(b.users) != 1):
        return None, f"{x.name}'s weight or bias is used elsewhere too"
    out = x.meta.get("val")
    if x.target == aten.linear.default and (out is None or out.dim() != 2):
        return None, "a linear whose output is not 2-D (the BN normalises another axis)"
    weight = state.get(w)
    C = state.get(var).numel()
    channels = weight.shape[1] * groups if transposed else weight.shape[0]
    if channels != C:
        return None, f"{x.name} has {channels} output channels, the BN {C}"
    new_w, new_b = fold_weights(weight, state.get(b), state.get(mean), state.get(var),
                                state.get(gamma), state.get(beta), args[eps_at],
                                transposed=transposed, groups=groups)
    state.set(w, new_w)
    if b is None and layout is None:  # mm(x, wt) -> addmm(b, x, wt)
        b = beta if beta is not None else mean
        x.target, x.args = aten.addmm.default, (b, *x.args)
    elif b is None:  # the BN's bias (or running_mean) placeholder becomes the layer's bias
        b = beta if beta is not None else mean
        new_args = list(x.args) + [None] * max(0, bias_at + 1 - len(x.args))
        new_args[bias_at] = b
        x.args = tuple(new_args)
        x.kwargs = {k: v for k, v in x.kwargs.items() if k != "bias"}
    state.set(b, new_b.to(state.get(b).dtype))
    # the BN's outputs are now the layer's
    for u in (outputs if returns_tuple else [bn]):
        u.replace_all_uses_with(x)
        if u is not bn:
            gm.graph.erase_node(u)
    gm.graph.erase_node(bn)
    for t in (gamma, beta, mean, var):
        if t is not None and t is not b and not t.users:
            state.drop(t)
            gm.graph.erase_node(t)
    return x.name, ""


def fold_exported_program(ep):
    """A new ExportedProgram with every foldable BatchNorm node folded (see the module).

    Returns the program; ``fold_exported_program_report(ep)`` returns it with the records.
    """
    return fold_exported_program_report(ep)[0]


def fold_exported_program_report(ep):
    """(folded ExportedProgram, list of :class:`ExportFoldRecord`); `ep` is not modified."""
    gm = copy.deepcopy(ep.graph_module)
    # the copy may rename a placeholder that shadows a builtin ("input" -> "input_1")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, ep.graph_signature.input_specs):
        if hasattr(spec.arg, "name") and node.name != spec.arg.name:
            node.name = node.target = spec.arg.name
    state = _State(ep)
    records = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in BATCHNORM_OPS:
            continue
        if node.target in _TRAINING_FORMS:
            records.append(ExportFoldRecord(node.name, "kept", reason="a training-mode form: "
                                            "normalises with batch statistics"))
            continue
        name = node.name
        layer, reason = _fold_one(gm, node, state)
        records.append(ExportFoldRecord(name, "folded" if layer else "kept", layer, reason))
    gm.graph.lint()
    gm.recompile()
    kept_names = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    input_specs = [s for s in ep.graph_signature.input_specs
                   if not hasattr(s.arg, "name") or s.arg.name in kept_names]
    signature = ExportGraphSignature(input_specs=input_specs,
                                     output_specs=list(ep.graph_signature.output_specs))
    folded = ExportedProgram(root=gm, graph=gm.graph, graph_signature=signature,
                             state_dict=state.state_dict,
                             range_constraints=copy.copy(ep.range_constraints),
                             module_call_graph=copy.deepcopy(ep.module_call_graph),
                             example_inputs=ep.example_inputs, constants=state.constants,
                             verifiers=[ep.verifier])
    log.info("fold_batchnorm(ExportedProgram): %d folded, %d kept",
             sum(r.action == "folded" for r in records),
             sum(r.action == "kept" for r in records))
    return folded, records


def batchnorm_nodes(program):
    """The BatchNorm nodes (any form above) of an ExportedProgram or a GraphModule."""
    graph = program.graph if hasattr(program, "graph") else program.graph_module.graph
    return [n for n in graph.nodes if n.op == "call_function" and n.target in BATCHNORM_OPS]
