"""``bnbench overhead``: the host cost of one BatchNorm call, beside torch's own call.

What a user pays on the host for each way of calling the kernels (:data:`PATHS`): the
modules in eval (under ``no_grad``, and with the parameters requiring grad), in training
(forward, forward + backward), the functional ``kernels.batch_norm``, a
``kernels.SyncBatchNorm`` and the synchronised ``kernels.sync_batch_norm`` in a group of
one rank (gloo, 127.0.0.1), a fused residual + ReLU call and a folded model's remaining
``BatchNormInference``; each timed beside torch's equivalent call on the same tiny tensor
in the same process, on one thread.

How it is measured.  Every Triton launch is stubbed at one boundary, the launch statement
``kernel[grid](...)``: :func:`kernels._triton_internals.record_launches` (``execute=False``)
records it and returns at once, so only host code runs, and the launches are counted.
The stub's own cost is measured and subtracted: the launches one call recorded are
replayed into the stub (the same ``kernel[grid](*args)`` statements) and timed the same
way; ``stub_us`` is what was subtracted, ``kernels_raw_us`` the time with it.  Torch's call
runs its kernel on the CPU (a tiny tensor: a few microseconds of its time is compute), so
the ratio slightly flatters torch's side, never the kernels'.  Timing: rounds of
back-to-back calls timed by ``time.perf_counter`` (the garbage collector off within a
round, as ``timeit`` does), torch's rounds and the kernels' interleaved so both see the
same load; the median per call over the rounds, and p20/p80.  The tensors are CPU tensors
and the kernels' host code is the interpreter build's (``TRITON_INTERPRET=1``, set by the
command before triton is imported, as ``bnbench traffic`` does); no launch runs, so this
is host time, whatever machine it is measured on, and no kernel speed.

On a GPU the same paths' wall time and CUDA-graph replay time, the kernels running, are
:func:`device_table` (``bnbench gpu-day``'s host-cost stage: ``host_paths.csv``), and the
functional calls' are ``bnbench run``'s ``wall_us`` and ``graph_us`` columns.
"""

import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .shapes import shape_list

DEFAULT_SHAPE = (2, 8, 4, 4)
DEFAULT_OUT = Path("results")
CSV_NAME = "overhead.csv"
QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class CallPath:
    """One way a user calls batch norm: its name, what runs on each side, and how it is built.

    `build(shape, group)` returns (torch_call, kernels_call): two functions of no arguments
    on tensors made once, outside the timed region."""

    name: str
    torch_call: str
    kernels_call: str
    build: object


def _tensors(shape, requires_grad=False):
    import torch

    x = torch.randn(shape)
    return x.requires_grad_(requires_grad)


def _modules(C, train, grad=True):
    """(torch.nn.BatchNorm2d, kernels.BatchNorm2d) with the same state, in train or eval."""
    import torch

    import kernels

    t = torch.nn.BatchNorm2d(C).train(train)
    k = kernels.convert_batchnorm(torch.nn.BatchNorm2d(C)).train(train)
    for m in (t, k):
        for p in m.parameters():
            p.requires_grad_(grad)
    return t, k


def _no_grad(fn):
    import torch

    def call():
        with torch.no_grad():
            return fn()
    return call


def _eval_no_grad(shape, group):
    x = _tensors(shape)
    t, k = _modules(shape[1], train=False)
    return _no_grad(lambda: t(x)), _no_grad(lambda: k(x))


def _eval(shape, group):
    x = _tensors(shape)
    t, k = _modules(shape[1], train=False)
    return (lambda: t(x)), (lambda: k(x))


def _train_forward(shape, group):
    x = _tensors(shape)
    t, k = _modules(shape[1], train=True)
    return (lambda: t(x)), (lambda: k(x))


def _train_forward_backward(shape, group):
    import torch

    x, dy = _tensors(shape, requires_grad=True), _tensors(shape)
    t, k = _modules(shape[1], train=True)

    def step(m):
        inputs = (x, m.weight, m.bias)
        return lambda: torch.autograd.grad(m(x), inputs, dy)
    return step(t), step(k)


def _functional(training):
    def build(shape, group):
        import torch
        import torch.nn.functional as F

        import kernels

        C = shape[1]
        x = _tensors(shape)
        w, b, rm, rv = torch.rand(C) + 0.5, torch.randn(C), torch.zeros(C), torch.ones(C)
        return (lambda: F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5),
                lambda: kernels.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5))
    return build


def _sync_module(shape, group):
    import torch

    import kernels

    x = _tensors(shape)
    t = torch.nn.BatchNorm2d(shape[1]).train()
    k = kernels.SyncBatchNorm(shape[1], process_group=group).train()
    return (lambda: t(x)), (lambda: k(x))


def _sync_functional(shape, group):
    import kernels

    x = _tensors(shape)
    t, k = _modules(shape[1], train=True)
    return (lambda: t(x)), (lambda: kernels.sync_batch_norm(
        x, k.running_mean, k.running_var, k.weight, k.bias, 0.1, 1e-5, group))


def _residual_relu(shape, group):
    import torch

    import kernels

    x, r = _tensors(shape), _tensors(shape)
    t = torch.nn.BatchNorm2d(shape[1]).train()
    k = kernels.BatchNorm2d(shape[1], activation="relu").train()
    return (lambda: torch.relu(t(x) + r)), (lambda: k(x, r))


def _folded_inference(shape, group):
    import torch

    import kernels

    x = _tensors(shape)
    C = shape[1]
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(C), torch.nn.Conv2d(C, C, 1)).eval()
    folded = kernels.fold_batchnorm(model)
    bn = folded[0]
    if not isinstance(bn, kernels.BatchNormInference):
        raise RuntimeError(f"fold_batchnorm kept {type(bn).__name__} for a BN before a conv; "
                           f"expected a BatchNormInference")
    return _no_grad(lambda: model[0](x)), _no_grad(lambda: bn(x))


PATHS = (
    CallPath("eval_no_grad", "nn.BatchNorm2d eval under no_grad",
             "kernels.BatchNorm2d eval under no_grad", _eval_no_grad),
    CallPath("eval", "nn.BatchNorm2d eval, params requiring grad",
             "kernels.BatchNorm2d eval, params requiring grad", _eval),
    CallPath("train_fwd", "nn.BatchNorm2d train forward",
             "kernels.BatchNorm2d train forward", _train_forward),
    CallPath("train_fwd_bwd",
             "nn.BatchNorm2d train forward + autograd.grad(x, weight, bias)",
             "kernels.BatchNorm2d train forward + autograd.grad(x, weight, bias)",
             _train_forward_backward),
    CallPath("functional_eval", "F.batch_norm(training=False)",
             "kernels.batch_norm(training=False)", _functional(False)),
    CallPath("functional_train", "F.batch_norm(training=True)",
             "kernels.batch_norm(training=True)", _functional(True)),
    CallPath("sync_module_one_rank",
             "nn.BatchNorm2d train forward (nn.SyncBatchNorm refuses CPU input in training; "
             "in a group of one it runs F.batch_norm)",
             "kernels.SyncBatchNorm train forward, gloo group of one (not synchronised: "
             "world size 1)", _sync_module),
    CallPath("sync_functional_one_rank",
             "nn.BatchNorm2d train forward (torch has no synchronised batch norm on CPU)",
             "kernels.sync_batch_norm train forward, gloo group of one (no communication: "
             "the single-process op)", _sync_functional),
    CallPath("residual_relu_train_fwd",
             "relu(nn.BatchNorm2d train forward + r)",
             "kernels.BatchNorm2d(activation='relu') train forward, residual=r (fused)",
             _residual_relu),
    CallPath("folded_inference",
             "nn.BatchNorm2d eval under no_grad (the BN before a conv)",
             "kernels.fold_batchnorm's BatchNormInference under no_grad (a BN before a conv "
             "does not fold)", _folded_inference),
)
PATH_NAMES = tuple(p.name for p in PATHS)


def _round(fn, calls):
    """Seconds per call of `calls` back-to-back calls of `fn` (the collector off)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls
    finally:
        if enabled:
            gc.enable()


def _calls_per_round(fn, round_ms):
    """How many calls of `fn` take about `round_ms` (at least 1)."""
    for _ in range(10):  # warm-up: plans, caches, the first autograd graph
        fn()
    per_call = min(_round(fn, 5) for _ in range(3))
    return max(1, int(round_ms * 1e-3 / max(per_call, 1e-9)))


def _quantiles(seconds):
    import numpy as np

    return [float(v) * 1e6 for v in np.quantile(seconds, QUANTILES)]


def measure_path(path, shape, group, rounds, round_ms, launches):
    """One row: `path`'s torch call and kernels call timed (see the module docstring);
    `launches` is the list record_launches(execute=False) appends to."""
    torch_fn, kernels_fn = path.build(shape, group)
    kernels_fn()  # a first call may launch more (autotuning): the second one is counted
    launches.clear()
    kernels_fn()
    one_call = list(launches)
    if not one_call:  # the kernels ran unstubbed (or not at all): no host time to report
        raise RuntimeError(
            f"bnbench overhead: {path.name} recorded no Triton launch: its launches bypass "
            f"the stub (kernels._triton_internals.record_launches hooks JITFunction.run and "
            f"the interpreter's run); a host time with the kernels running would be no "
            f"host time")
    torch_calls = _calls_per_round(torch_fn, round_ms)
    kernels_calls = _calls_per_round(kernels_fn, round_ms)

    def replay():  # the stub's own cost: the same launch statements, stubbed
        for launch in one_call:
            launch.fn[launch.grid](*launch.args, **launch.kwargs)

    replay_calls = _calls_per_round(replay, round_ms)
    torch_t, kernels_t, stub_t = [], [], []
    for _ in range(rounds):
        torch_t.append(_round(torch_fn, torch_calls))
        kernels_t.append(_round(kernels_fn, kernels_calls))
        stub_t.append(_round(replay, replay_calls))
        launches.clear()
    t_med, t_p20, t_p80 = _quantiles(torch_t)
    raw_med, raw_p20, raw_p80 = _quantiles(kernels_t)
    stub = _quantiles(stub_t)[0]
    k_med, k_p20, k_p80 = raw_med - stub, raw_p20 - stub, raw_p80 - stub
    return dict(
        path=path.name, torch_us=t_med, kernels_us=k_med, ratio=k_med / t_med,
        launches=len(one_call), kernels_launched="+".join(l.fn.__name__ for l in one_call),
        torch_p20_us=t_p20, torch_p80_us=t_p80, kernels_p20_us=k_p20, kernels_p80_us=k_p80,
        stub_us=stub, kernels_raw_us=raw_med,
        N=shape[0], C=shape[1], H=shape[2], W=shape[3], dtype="float32",
        rounds=rounds, torch_calls_per_round=torch_calls,
        kernels_calls_per_round=kernels_calls,
        torch_call=path.torch_call, kernels_call=path.kernels_call)


METHOD = ("host time per call, 1 CPU thread, CPU tensors: median (p20, p80) over rounds of "
          "back-to-back calls timed by time.perf_counter, torch's and the kernels' rounds "
          "interleaved; every Triton launch stubbed at kernel[grid](...) by "
          "kernels._triton_internals.record_launches(execute=False) (counted, not run); "
          "kernels_us = kernels_raw_us - stub_us, the recorded launches replayed into the "
          "stub")


def overhead_table(paths=PATHS, shape=DEFAULT_SHAPE, rounds=25, round_ms=4.0, progress=None):
    """Rows for every path in `paths` (the launches stubbed, a group of one rank open for
    the synchronised ones); `progress`: an object with update() (tqdm), or None."""
    import torch

    from kernels._triton_internals import record_launches

    from .registry import one_rank_group

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        with one_rank_group() as group, record_launches("overhead") as launches:
            for path in paths:
                torch.manual_seed(0)
                rows.append(measure_path(path, shape, group, rounds, round_ms, launches))
                if progress is not None:
                    progress.update()
    finally:
        torch.set_num_threads(threads)
    return rows


def device_table(paths=PATHS, shapes=None, device="cuda", calls=20, rounds=3):
    """The same paths on `device` with the kernels running (no stub): per call, the wall
    time of calls back to back (one synchronisation per round) and, on CUDA, the replay
    time of the call captured once with ``torch.cuda.graph`` (``bnbench.timing``), for
    torch's call and the kernels' side by side.  `shapes` (NxCxHxW): default ResNet-50's
    BatchNorm shapes at N = 1 and 8.  A group of one rank (NCCL on CUDA, gloo on CPU) is
    open for the synchronised paths.  One row per (path, shape); a call that cannot be
    captured has no graph time and says why."""
    import torch

    from . import timing
    from .registry import one_rank_group
    from .shapes import resnet50_bn_shapes

    if shapes is None:
        shapes = [(n, c, h, w) for n in (1, 8) for (c, h, w) in resnet50_bn_shapes()]
    rows = []
    with one_rank_group("nccl" if device == "cuda" else "gloo") as group:
        for path in paths:
            for shape in shapes:
                torch.manual_seed(0)
                with torch.device(device):
                    sides = dict(zip(("torch", "kernels"), path.build(shape, group)))
                row = dict(path=path.name, N=shape[0], C=shape[1], H=shape[2], W=shape[3],
                           dtype="float32")
                for side, fn in sides.items():
                    row[f"{side}_wall_us"] = timing.wall_per_call_us(fn, device, None, calls,
                                                                     rounds)
                    row[f"{side}_graph_us"], row[f"{side}_graph_error"] = None, None
                    if device != "cuda":
                        row[f"{side}_graph_error"] = "CUDA graphs need a CUDA GPU"
                        continue
                    try:
                        row[f"{side}_graph_us"] = timing.graph_replay_us(fn, None, calls, rounds)
                    except Exception as exc:  # noqa: BLE001 (the row says why)
                        from .runner import one_line

                        row[f"{side}_graph_error"] = one_line(exc)
                row["wall_ratio"] = row["kernels_wall_us"] / row["torch_wall_us"]
                rows.append(row)
    return rows


DEVICE_METHOD = ("per call, the kernels running: wall time of calls back to back (one "
                 "synchronisation per round, median of rounds, time.perf_counter) and the "
                 "replay time of the call captured once with torch.cuda.graph; torch's call "
                 "and the kernels' on the same tensors")


def stamped(rows, device="cpu", method=METHOD):
    """The rows as a DataFrame with the common metadata columns first."""
    import pandas as pd

    from .environment import stamp

    import kernels

    return stamp(pd.DataFrame(rows), device, interpreted=bool(kernels.INTERPRETED),
                 method=method)


def markdown(df):
    """The README's overhead table, from an overhead.csv."""
    head = df.iloc[0]
    rows = [f"| path ({head.N}x{head.C}x{head.H}x{head.W} {head['dtype']}) | torch, whole call | "
            f"kernels, launches stubbed | ratio | launches |", "|---|---|---|---|---|"]
    for r in df.itertuples():
        rows.append(f"| {r.path} | {r.torch_us:.1f} µs | {r.kernels_us:.1f} µs | "
                    f"{r.ratio:.1f}x | {r.launches} |")
    return "\n".join(rows)


def run_command(args):
    """Measure every chosen path; write the CSV; print the table.  0, or 2 with one line."""
    from . import environment

    out = args.out or DEFAULT_OUT
    folder, note = environment.keep_committed(out, [CSV_NAME], explicit=args.out is not None,
                                              local=DEFAULT_OUT / "local")
    try:
        environment.output_dir(folder)
    except environment.OutputError as exc:
        print(f"bnbench overhead: error: {exc}", file=sys.stderr)
        return 2
    if note:
        print(f"bnbench overhead: {note}", flush=True)
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: CPU tensors take the
    import kernels                        # kernels' path (no launch runs: they are stubbed)
    from tqdm import tqdm

    if not kernels.INTERPRETED:
        print("bnbench overhead: Triton was imported before the interpreter could be switched "
              "on; run it in a fresh process", file=sys.stderr)
        return 1
    paths = [p for p in PATHS if p.name in args.paths] if args.paths else list(PATHS)
    print("Host time per call, launches stubbed and counted (not run): no kernel speed.",
          flush=True)
    with tqdm(total=len(paths), desc="bnbench overhead", unit="path", file=sys.stderr) as bar:
        rows = overhead_table(paths, args.shape, args.rounds, args.round_ms, progress=bar)
    df = stamped(rows)
    path = folder / CSV_NAME
    df.to_csv(path, index=False)
    print(markdown(df))
    print(f"wrote {path}")
    return 0


def _shape(text):
    import argparse

    shapes = shape_list("NxCxHxW")(text)
    if len(shapes) != 1:
        raise argparse.ArgumentTypeError(f"expected one shape NxCxHxW, got {text!r}")
    return shapes[0]


def add_parser(subparsers):
    from .arguments import positive
    from .arguments import positive_int as _positive_int

    p = subparsers.add_parser(
        "overhead", help="host microseconds per call of each way to call the kernels, beside "
                         "torch's call (launches stubbed; no GPU needed)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=_shape, default=DEFAULT_SHAPE, metavar="NxCxHxW",
                   help="the input's shape (default 2x8x4x4: tiny, so the call is host time)")
    p.add_argument("--paths", type=_path_names, default=None, metavar="PATHS",
                   help="comma-separated indices (0-based) or names of the paths, default all: "
                        + "; ".join(f"{i} {name}" for i, name in enumerate(PATH_NAMES)))
    p.add_argument("--rounds", type=_positive_int, default=25,
                   help="timed rounds per call (default 25)")
    p.add_argument("--round-ms", type=positive, default=4.0,
                   help="about how long one round of back-to-back calls lasts (default 4)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder for {CSV_NAME} (default: results/; results/local/ "
                        f"where results/{CSV_NAME} is committed)")
    p.set_defaults(func=run_command, uses_device=False)


def _path_names(text):
    import argparse

    names = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item.isdigit() and int(item) < len(PATH_NAMES):
            names.append(PATH_NAMES[int(item)])
        elif item in PATH_NAMES:
            names.append(item)
        else:
            raise argparse.ArgumentTypeError(
                f"invalid path {item!r} (choose indices 0-{len(PATH_NAMES) - 1} or names: "
                f"{', '.join(PATH_NAMES)})")
    if not names:
        raise argparse.ArgumentTypeError("no path given")
    return tuple(dict.fromkeys(names))
