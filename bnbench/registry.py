"""The operator variants: one description of each op, read by every consumer.

Ops (the project's host functions in ``kernels``; the baselines are torch's batch norm
followed by the same epilogue, ``bnbench.impls``):

    train_fwd   batch statistics (axis ``stats``: single_pass = Welford/Chan merges,
                two_pass = mean, then centred sum of squares), y, running-stat update
    train_bwd   dx, dweight, dbias (and dresidual) from dy and the saved statistics
    eval        y from the running statistics, one launch

Axes every op has: ``epilogue`` (``kernels.Epilogue``: what follows the normalisation in
the same launch), ``layout`` (nchw, nhwc), ``dtype`` pair (input, parameters), and the
code ``path`` (general or single_launch), which the launch plan picks from the shape:
the shape classes of :data:`SHAPE_CLASSES` reach each.  Option axes (the first value
is the default) are the flags a user's call can set: no affine parameters, no running
statistics, cumulative averages (momentum=None), eval-mode statistics in the backward,
which gradients are needed, autotuned launches.

The harness's modes (``bnbench run``) are made of ops: train_fwd, train_fwd_bwd
(train_fwd then train_bwd), eval, and conv_bn_eval (a 3x3 conv, then eval).  Each
mode says which quantities it compares and how one step calls an implementation.

Minimal bytes.  An op must read its x-sized inputs and write its x-sized outputs once
(``min_elements``, E bytes each): train_fwd and eval read x and write y (2; a residual
adds its read), train_bwd reads x and dy and writes dx (3; a residual adds the write of
its gradient).  After a residual, the activation's gradient needs z (or ReLU's mask)
again: this project's backward reads y (ReLU) or r (SiLU) once more
(``recompute_elements``).  ``bnbench run``'s GB/s divides the minimal bytes; ``bnbench
traffic``'s minimum column adds the recompute read.

Consumers: ``bnbench run`` (modes, bytes, quantities, steps), ``bnbench traffic`` and
its parallelism table (inputs real or meta, launches, minimum, targets),
``bnbench.aot`` (the compile list :func:`compile_variants`; its coverage of the full
product of axes, :func:`coverage`), the tests (axis values), the README's table
(:func:`variants_markdown`).  Adding an epilogue or an option: the kernel, this file,
and its test.
"""

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Callable

# Nothing here imports torch, triton or kernels at import time: the command-line parsers
# read these names before the interpreter is switched on.  ``kernels.Epilogue`` values
# are the fusions' names; :func:`epilogues` gives the members.
LAYOUTS = ("nchw", "nhwc")
STATS = ("single_pass", "two_pass")
# (input dtype, parameter dtype): matching dtypes and the mixed-precision pattern
DTYPE_PAIRS = (("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"),
               ("float16", "float32"), ("bfloat16", "float32"), ("float64", "float64"))
# what follows the batch norm in the harness: the epilogues a network ends a block with
HARNESS_FUSIONS = ("none", "relu", "residual+relu", "silu", "residual+silu")


def epilogues(names=None):
    """``kernels.Epilogue`` members: all of them, or those named."""
    from kernels import Epilogue

    return tuple(Epilogue) if names is None else tuple(Epilogue(n) for n in names)
MOMENTUM = 0.1
EPS = 1e-5


def param_dtype_for(dtype):
    """The harness's parameter dtype: float32 for 16-bit input (as under autocast)."""
    return "float32" if dtype in ("float16", "bfloat16") else dtype


# ---------------------------------------------------------------------------------------------
# ops

@dataclass(frozen=True, eq=False)  # one object per op: compared and hashed by identity
class Op:
    """One host function and its axes.

    Attributes:
        name: the op's name in every CSV (``op`` column) and compile-list scenario.
        stats: values of the statistics axis, ("-",) for an op that computes none.
        options: option axis -> its values, the default first.
        launch: (tensors, variant) -> outputs: calls the host function (tensors from
            :func:`make_tensors`).
        min_elements, recompute_elements: (epilogue) -> x-sized tensors moved (module
            docstring).
        inputs: names of its x-sized inputs (as :func:`make_tensors` names them).
        targets: (stats, path) -> (element bytes per element of x in units of E,
            launches): the targets an fp32 op without epilogue is held to.
        group: launched in a process group (the synchronised ops: :func:`one_rank_group`).
    """

    name: str
    stats: tuple
    options: dict
    launch: Callable
    min_elements: Callable
    recompute_elements: Callable
    inputs: tuple
    targets: dict = field(default_factory=dict)
    group: bool = False  # launched in a process group (the synchronised ops)


@dataclass(frozen=True)
class Variant:
    """One point of an op's axes (options as sorted (name, value) pairs)."""

    op: Op
    stats: str
    epilogue: object  # kernels.Epilogue
    layout: str = "nchw"
    dtype: str = "float32"
    param_dtype: str = "float32"
    options: tuple = ()

    def option(self, name, absent=None):
        """The variant's value of option `name` (its op's default when not set), or
        `absent` for an op without that option."""
        if name not in self.op.options:
            return absent
        return dict(self.options).get(name, self.op.options[name][0])

    def describe(self):
        parts = [self.op.name] + ([self.stats] if self.stats != "-" else [])
        flags = [f"{k}={v}" for k, v in self.options if v != self.op.options[k][0]]
        if self.epilogue.value != "none":
            flags.insert(0, self.epilogue.value)
        return " ".join(parts + [self.layout, f"{self.dtype}/{self.param_dtype}"] + flags)


def _train_fwd(t, v):
    from kernels.forward import bn_forward_train

    y, mean, rstd = bn_forward_train(
        t["x"], t["weight"], t["bias"], t["running_mean"], t["running_var"], MOMENTUM, EPS,
        v.stats, residual=t["residual"], epilogue=v.epilogue,
        num_batches_tracked=t["num_batches_tracked"])
    return dict(y=y, mean=mean, rstd=rstd)


def _train_bwd(t, v):
    from kernels.backward import bn_backward

    need = GRADS[v.option("grads")]
    dx, dweight, dbias, dres = bn_backward(
        t["dy"], t["x"], t["y"], t["weight"], t["bias"], t["mean"], t["rstd"],
        training=v.option("training"), epilogue=v.epilogue, residual=t["residual"],
        need_dx=need[0], need_dweight=need[1], need_dbias=need[2], need_dresidual=need[3])
    return dict(dx=dx, dweight=dweight, dbias=dbias, dresidual=dres)


def _eval(t, v):
    from kernels.forward import bn_forward_eval

    y = bn_forward_eval(t["x"], t["weight"], t["bias"], t["running_mean"], t["running_var"], EPS,
                        residual=t["residual"], epilogue=v.epilogue)
    return dict(y=y)


# the backward's gradient patterns: (dx, dweight, dbias, dresidual)
GRADS = {"all": (True, True, True, True), "no_dx": (False, True, True, False),
         "dx_only": (True, False, False, False)}

TRAIN_FWD = Op(
    "train_fwd", STATS,
    options=dict(affine=(True, False), running=(True, False), cumulative=(False, True),
                 autotune=(False, True)),
    launch=_train_fwd,
    min_elements=lambda e: 2 + e.residual,
    recompute_elements=lambda e: 0,
    inputs=("x", "residual"),
    targets={("single_pass", "general"): (3, 2), ("two_pass", "general"): (4, 3),
             ("single_pass", "single_launch"): (2, 1), ("two_pass", "single_launch"): (2, 1)},
)
TRAIN_BWD = Op(
    "train_bwd", ("-",),
    options=dict(training=(True, False), affine=(True, False), grads=tuple(GRADS),
                 autotune=(False, True)),
    launch=_train_bwd,
    min_elements=lambda e: 3 + e.residual,
    recompute_elements=lambda e: int(e.reads_output or e.reads_residual),
    inputs=("x", "dy", "y", "residual"),
    targets={("-", "general"): (5, 2), ("-", "single_launch"): (3, 1)},
)
EVAL = Op(
    "eval", ("-",),
    options=dict(affine=(True, False)),
    launch=_eval,
    min_elements=lambda e: 2 + e.residual,
    recompute_elements=lambda e: 0,
    inputs=("x", "residual"),
    targets={("-", "general"): (2, 1)},
)
OPS = {op.name: op for op in (TRAIN_FWD, TRAIN_BWD, EVAL)}


def _sync_train_fwd(t, v):
    import torch

    y, mean, rstd, count = torch.ops.bnbench.sync_batch_norm_train(
        t["x"], t["weight"], t["bias"], t["residual"], t["running_mean"], t["running_var"],
        t["num_batches_tracked"], MOMENTUM, EPS, v.stats, v.epilogue.value, t["group"])
    return dict(y=y, mean=mean, rstd=rstd, count=count)


def _sync_train_bwd(t, v):
    import torch

    C = t["x"].shape[1]
    count = t["mean"].new_full((C,), t["x"].numel() // C)
    need = [n and present for n, present in zip(
        GRADS[v.option("grads")], (True, t["weight"] is not None, t["bias"] is not None,
                                   v.epilogue.residual))]
    dx, dweight, dbias, dres = torch.ops.bnbench.sync_batch_norm_backward(
        t["dy"], t["x"], t["y"], t["weight"], t["bias"], t["residual"], t["mean"], t["rstd"],
        count, v.epilogue.value, t["group"], need)
    return {k: g if n else None for k, g, n in zip(("dx", "dweight", "dbias", "dresidual"),
                                                   (dx, dweight, dbias, dres), need)}


# The synchronised op (kernels.SyncBatchNorm): the statistics launches, the collectives of
# bnbench comm between them, the eval kernel with the merged statistics; the backward's
# general path with one all_reduce.  Launched in a process group (one_rank_group() outside a
# distributed job); the least traffic is the plain op's.
SYNC_TRAIN_FWD = Op(
    "sync_train_fwd", STATS,
    options=dict(affine=(True, False), running=(True, False), cumulative=(False, True)),
    launch=_sync_train_fwd, min_elements=TRAIN_FWD.min_elements,
    recompute_elements=TRAIN_FWD.recompute_elements, inputs=("x", "residual"),
    targets={("single_pass", "general"): (3, 2), ("two_pass", "general"): (4, 3)},
    group=True,
)
SYNC_TRAIN_BWD = Op(
    "sync_train_bwd", ("-",),
    options=dict(affine=(True, False), grads=("all", "no_dx")),
    launch=_sync_train_bwd, min_elements=TRAIN_BWD.min_elements,
    recompute_elements=TRAIN_BWD.recompute_elements, inputs=("x", "dy", "y", "residual"),
    targets={("-", "general"): (5, 2)}, group=True,
)
SYNC_OPS = {op.name: op for op in (SYNC_TRAIN_FWD, SYNC_TRAIN_BWD)}
ALL_OPS = {**OPS, **SYNC_OPS}


@contextlib.contextmanager
def one_rank_group(backend="gloo"):
    """A process group of this process alone (a fresh ``torch.distributed`` world of one,
    on 127.0.0.1), so that the synchronised ops take their synchronised path outside a
    distributed job; yields it (``new_group([0])``).  The world is destroyed on exit."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    try:
        group = dist.new_group([0])
        _GROUPS.append(group.group_name)
        try:
            yield group
        finally:
            _GROUPS.pop()
    finally:
        dist.destroy_process_group()


_GROUPS = []  # names of the groups one_rank_group() opened, innermost last


def launch_context(scenarios):
    """The context the `scenarios` launch in: :func:`one_rank_group` when one of them is a
    synchronised op, else none."""
    needed = any(s.variant.op.group for s in scenarios)
    return one_rank_group() if needed else contextlib.nullcontext()


def variants(op, epilogue_names=None, layouts=LAYOUTS, dtype_pairs=DTYPE_PAIRS, options=None):
    """Every variant of `op` over the given axis values (epilogues: all by default;
    options: name -> values, default: only the defaults)."""
    names = sorted(options or {})
    for stats, epi, layout, (dtype, pdtype), values in itertools.product(
            op.stats, epilogues(epilogue_names), layouts, dtype_pairs,
            itertools.product(*((options or {})[n] for n in names))):
        yield Variant(op, stats, epi, layout, dtype, pdtype, tuple(zip(names, values)))


def make_tensors(variant, shape, kind="real", seed=0):
    """The tensors `variant.op` reads, for x of `shape`, by name.

    kind: "real" (random values on the CPU: normal, positive ones in [0.5, 1.5) for weight,
    running_var and rstd; the backward's saved statistics are x's own, its y the forward's
    output), "empty"
    (allocated on the CPU, not written: enough to compile a launch) or "meta" (no
    storage: launches can only be recorded).
    """
    import torch

    dtype, pdtype = getattr(torch, variant.dtype), getattr(torch, variant.param_dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    device = "meta" if kind == "meta" else "cpu"
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]

    def new(size, dt, positive=False):
        if kind != "real":
            return torch.empty(size, dtype=dt, device=device)
        t = torch.rand(size, generator=gen, dtype=torch.float64) + 0.5 if positive else \
            torch.randn(size, generator=gen, dtype=torch.float64)
        return t.to(dt)

    def big():
        if variant.layout == "nhwc":
            return new((shape[0], *shape[2:], C), dtype).movedim(-1, 1)
        return new(shape, dtype)

    affine = variant.option("affine")
    running = variant.option("running", True)
    cumulative = variant.option("cumulative", False)
    t = dict(
        x=big(),
        weight=new(C, pdtype, positive=True) if affine else None,
        bias=new(C, pdtype) if affine else None,
        running_mean=new(C, pdtype) if running else None,
        running_var=new(C, pdtype, positive=True) if running else None,
        num_batches_tracked=(torch.ones((), dtype=torch.long, device=device)
                             if cumulative else None),
        residual=big() if variant.epilogue.residual else None,
    )
    if "dy" in variant.op.inputs:
        t.update(dy=big(), y=big(), mean=new(C, acc), rstd=new(C, acc, positive=True))
        if kind == "real":
            _saved_statistics(t, variant)
    if variant.op.group:
        if not _GROUPS:
            raise RuntimeError(f"{variant.op.name} launches in a process group: call it "
                               "within bnbench.registry.one_rank_group()")
        if kind == "meta":
            raise ValueError(f"{variant.op.name}'s collectives need tensors with storage: "
                             "kind 'real' or 'empty'")
        t["group"] = _GROUPS[-1]
    return t


def _saved_statistics(t, variant):
    """The backward's mean, rstd and y as its forward would have saved them: x's batch
    statistics (or, for eval-mode statistics, the running ones), y = the forward's output."""
    import torch

    from kernels import torch_batch_norm

    x = t["x"].double()
    red = [0, *range(2, x.dim())]
    if variant.option("training", True):
        var, mean = torch.var_mean(x, dim=red, correction=0)
    else:
        mean, var = t["running_mean"].double(), t["running_var"].double()
    t["mean"].copy_(mean)
    t["rstd"].copy_((var + EPS).rsqrt())
    y = torch_batch_norm(x, mean, var, _double(t["weight"]), _double(t["bias"]), False, 0.0,
                         EPS, _double(t["residual"]), variant.epilogue.activation)
    t["y"].copy_(y)


def _double(t):
    return None if t is None else t.double()


def run_variant(variant, tensors):
    """Launch `variant` (autotuned when its option says so: timed only on CUDA tensors);
    returns its outputs."""
    if variant.option("autotune", False):
        from kernels._tuning import autotuning

        with autotuning(timed=tensors["x"].is_cuda):
            return variant.op.launch(tensors, variant)
    return variant.op.launch(tensors, variant)


# ---------------------------------------------------------------------------------------------
# the ahead-of-time compile list, and its coverage of the full product of axes

# Shapes that reach each code path: aligned (16-byte vectors possible) and 7x7 (unaligned)
SHAPE_CLASSES = {
    "general": (32, 64, 56, 56),
    "general_7x7": (64, 256, 7, 7),
    "single_launch": (8, 128, 8, 8),
    "single_launch_7x7": (8, 256, 7, 7),
}
_F32, _BF16_MIXED = DTYPE_PAIRS[0], DTYPE_PAIRS[4]
# dtype pairs compiled on each shape class with default options and no epilogue
COMPILE_DTYPES = {
    "general": DTYPE_PAIRS,
    "single_launch": (DTYPE_PAIRS[0], DTYPE_PAIRS[3], DTYPE_PAIRS[4], DTYPE_PAIRS[5]),
    "general_7x7": (_F32, _BF16_MIXED),
    "single_launch_7x7": (_F32, _BF16_MIXED),
}
# on the aligned shapes, beside every epilogue and option value one at a time in fp32:
# (op, epilogue, options, dtype pairs) that the one-at-a-time points miss (found by
# coverage(): the batch counter of momentum=None beside 16-bit and fp64 data)
COMPILE_COMBINATIONS = (
    ("train_bwd", "silu", dict(training=False), (_F32,)),
    ("train_bwd", "none", dict(training=False, grads="dx_only"), (_F32,)),
    ("train_fwd", "none", dict(cumulative=True), DTYPE_PAIRS[3:]),
)


@dataclass(frozen=True)
class Scenario:
    """One entry of the compile list: a variant on a shape class."""

    name: str
    variant: Variant
    shape: tuple

    def launch(self, kind="empty"):
        return run_variant(self.variant, make_tensors(self.variant, self.shape, kind))


def _scenario(variant, shape_class):
    shape = SHAPE_CLASSES[shape_class]
    return Scenario(f"{variant.describe()} {shape_class} {tuple(shape)}", variant, shape)


def compile_variants():
    """The compile list: every single-process op on every shape class, layout and compiled
    dtype pair, the synchronised ops in fp32 on every shape class; then, on the aligned
    fp32 shapes in both layouts, every epilogue and every non-default option value of
    every single-process op one at a time, and :data:`COMPILE_COMBINATIONS`.  Whether it
    covers every constexpr value, pointer-type pattern and num_warps the full product of
    axes reaches is computed (:func:`coverage`), not assumed."""
    out = []
    for cls, dtypes in COMPILE_DTYPES.items():
        for op in OPS.values():
            out += [_scenario(v, cls) for v in variants(op, ("none",), LAYOUTS, dtypes)]
    for cls, op in itertools.product(SHAPE_CLASSES, SYNC_OPS.values()):
        # the single-process ops' kernels, general path only: fp32 covers what they add
        out += [_scenario(v, cls) for v in variants(op, ("none",), LAYOUTS, (_F32,))]
    none = epilogues(("none",))[0]
    for cls in ("general", "single_launch"):
        for op in OPS.values():
            points = [(e, {}, _F32) for e in epilogues() if e is not none]
            points += [(none, {name: value}, _F32)
                       for name, values in op.options.items() for value in values[1:]]
            points += [(epilogues((e,))[0], opts, pair)
                       for name, e, opts, pairs in COMPILE_COMBINATIONS if name == op.name
                       for pair in pairs]
            for epi, opts, pair in points:
                for stats, layout in itertools.product(op.stats, LAYOUTS):
                    v = Variant(op, stats, epi, layout, *pair, tuple(sorted(opts.items())))
                    out.append(_scenario(v, cls))
    return out


def full_product():
    """Every variant of every op (all axes, all option values) on every shape class."""
    for cls in SHAPE_CLASSES:
        for op in ALL_OPS.values():
            for v in variants(op, options=op.options):
                yield _scenario(v, cls)


def features(launch):
    """What a recorded launch needs compiled: its kernel with each constexpr value (block
    sizes included), with its pointers' element types, and with its num_warps."""
    from triton.backends.compiler import GPUTarget

    from kernels._triton_internals import bind

    name, names = launch.fn.__name__, launch.fn.arg_names
    _, signature, constexprs, _ = bind(launch, GPUTarget("cuda", 90, 32))
    out = {(name, f"{names[path[0]]}={v}") for path, v in constexprs.items()
           if names[path[0]].isupper()}
    pointers = sorted({v for v in signature.values() if v.startswith("*")})
    out.add((name, "pointers=" + ",".join(pointers)))
    out.add((name, f"num_warps={launch.kwargs.get('num_warps')}"))
    return out


def reached_features(scenarios):
    """The union of :func:`features` over the launches `scenarios` record (on meta tensors;
    the synchronised ops, whose collectives run, on empty ones)."""
    from kernels._triton_internals import record_launches

    scenarios = list(scenarios)
    reached = set()
    with launch_context(scenarios):
        for s in scenarios:
            with record_launches(s.name) as got:
                s.launch("empty" if s.variant.op.group else "meta")
            for launch in got:
                reached |= features(launch)
    return reached


def coverage():
    """(features the full product reaches, those the compile list misses)."""
    full = reached_features(full_product())
    return full, full - reached_features(compile_variants())


# ---------------------------------------------------------------------------------------------
# the harness's modes

@dataclass(frozen=True)
class Mode:
    """A measurement of ``bnbench run``: its ops, what it compares, whether it is swept by
    default."""

    name: str
    ops: tuple
    training: bool
    quantities: tuple
    default: bool = True
    conv: bool = False
    doc: str = ""

    def elements(self, epilogue):
        """x-sized tensors the mode must move at least (the ops' minimal elements)."""
        return sum(OPS[op].min_elements(epilogue) for op in self.ops)

    def compared(self, epilogue):
        """The quantities compared: the mode's, and dresidual when a residual gets a gradient."""
        extra = ("dresidual",) if "train_bwd" in self.ops and epilogue.residual else ()
        return self.quantities + extra


RUNNING = ("running_mean", "running_var")
MODES = {m.name: m for m in (
    Mode("train_fwd", ("train_fwd",), True, ("y",) + RUNNING,
         doc="batch statistics, y, running-stats update (inputs need no grad)"),
    Mode("train_fwd_bwd", ("train_fwd", "train_bwd"), True,
         ("y", "dx", "dweight", "dbias") + RUNNING,
         doc="train_fwd, then backward of y with a given dy: dx, dweight, dbias"),
    Mode("eval", ("eval",), False, ("y",),
         doc="y = (x - running_mean) / sqrt(running_var + eps) * weight + bias"),
    Mode("conv_bn_eval", ("eval",), False, ("y",), default=False, conv=True,
         doc="a 3x3 Conv2d, C -> C, padding 1, with bias, then eval's BatchNorm2d"),
)}
QUANTITIES = ("y", "dx", "dweight", "dbias", "dresidual") + RUNNING


def make_step(fn, mode, epilogue, inputs, running_mean, running_var):
    """One call of an implementation in `mode`: (step, grads, outputs).

    ``step()`` makes the call (updating `running_mean`/`running_var`); ``grads`` are the
    leaves whose .grad a timing loop resets between calls (None without a backward);
    ``outputs()`` gives the compared quantities of the last call.  The leaves are made
    here, once, outside any timed region.  `fn` is a batch-norm function of
    ``bnbench.impls`` (``fn(x, running_mean, running_var, weight, bias, training,
    momentum, eps, residual, activation) -> y``), or in conv_bn_eval a prepared
    ``fn(x, residual, activation) -> y``.
    """
    act = None if epilogue.activation == "none" else epilogue.activation
    residual, last = inputs.residual, {}
    if mode.conv:
        def step():
            last["y"] = fn(inputs.x, residual, act)
        return step, None, lambda: dict(last)
    x, w, b, grads = inputs.x, inputs.weight, inputs.bias, None
    backward = "train_bwd" in mode.ops
    if backward:
        x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
        grads = [x, w, b]
        if residual is not None:
            residual = residual.detach().requires_grad_()
            grads.append(residual)

    def step():
        y = fn(x, running_mean, running_var, w, b, mode.training, MOMENTUM, EPS, residual, act)
        if backward:
            y.backward(inputs.dy)
        last["y"] = y

    def outputs():
        out = dict(y=last["y"].detach())
        if backward:
            out.update(dx=x.grad, dweight=w.grad, dbias=b.grad)
            if residual is not None:
                out["dresidual"] = residual.grad
        if mode.training:
            out.update(running_mean=running_mean, running_var=running_var)
        return out
    return step, grads, outputs


# ---------------------------------------------------------------------------------------------
# the README's table

def variants_markdown():
    """The README's table of ops: axes, options, minimal traffic, targets."""
    lines = ["| op | stats | options (default first) | least x-sized tensors moved, by "
             "epilogue | targets, fp32 without epilogue: B/elem, launches |",
             "|---|---|---|---|---|"]
    for op in ALL_OPS.values():
        opts = "; ".join(f"{k} {'/'.join(str(v) for v in vs)}" for k, vs in op.options.items())
        by_count = {}
        for e in epilogues():
            by_count.setdefault(op.min_elements(e) + op.recompute_elements(e), []).append(e.value)
        mins = "; ".join(f"{n}: {', '.join(names)}" for n, names in by_count.items())
        targets = "; ".join(f"{s + ' ' if s != '-' else ''}{path}: {4 * b}, {n}"
                            for (s, path), (b, n) in op.targets.items())
        lines.append(f"| {op.name} | {'/'.join(op.stats)} | {opts} | {mins} | {targets} |")
    return "\n".join(lines)
