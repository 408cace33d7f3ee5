"""``bnbench traffic``: the bytes each op moves, its launches and programs, counted without a GPU.

BatchNorm is memory-bound: on a GPU its time is set by the bytes it moves, the
launches it makes (microseconds each, which dominate at small batch) and how many
programs share the work.  These are measured proxies for speed, not speeds.

How the bytes are counted.  Each op runs through Triton's interpreter with its
global loads and stores hooked; an access counts the bytes of its unmasked
lanes.  Accesses fall in two classes:

* element traffic: tile accesses (2-D blocks) into the N*C*H*W tensors (x, y,
  dy, dx, the residual and its gradient), reported in bytes per element of x;
* per-channel traffic: everything else (statistics, per-program partials,
  parameters, pivots), O(C * programs) bytes, reported apart.

The minimum element traffic of each op stands beside it: training forward and
eval read x once and write y once (2 elements' bytes; +1 with a residual);
backward reads x and dy and writes dx (3; +1 for the residual's gradient, +1 for
the output y read for a ReLU after a residual, or the residual read again for a SiLU
after one, to recompute its input z).

How the programs are counted.  The same ops on ResNet-50's BatchNorm shapes at
full size are launched on the meta device with the launches recorded, not run:
the grid of every launch is what a real launch on an H100 (132 SMs) would get.
"""

import contextlib
import math
import os
import sys
from pathlib import Path

# Scaled-down stand-ins the interpreter runs in seconds, with the code paths of the real shapes:
# (16, 4, 28, 28) like (32, 64, 56, 56): many programs per channel, merged partials;
# (256, 8, 7, 7) like (256, 2048, 7, 7) at large batch: general path, small H*W;
# (8, 16, 7, 7) like (2048, 7, 7) at small batch: the single-launch path.
SCALED_SHAPES = ((16, 4, 28, 28), (256, 8, 7, 7), (8, 16, 7, 7))
FUSIONS = (None, "relu", "residual+relu", "silu", "residual+silu")
FULL_SCALE_BATCHES = (1, 8, 32, 64, 128, 256)

# Issue targets in elements' bytes per element of x (fp32: x4 bytes) and launches.
TARGETS = {
    ("train_fwd", "single_pass", "general"): (3, 2),
    ("train_fwd", "two_pass", "general"): (4, 3),
    ("train_bwd", "-", "general"): (5, 2),
    ("train_fwd", "single_pass", "single_launch"): (2, 1),
    ("train_fwd", "two_pass", "single_launch"): (2, 1),
    ("train_bwd", "-", "single_launch"): (3, 1),
    ("eval", "-", "general"): (2, 1),
}
SINGLE_LAUNCH_KERNELS = {"_bn_fwd_single_launch_kernel", "_bn_bwd_single_launch_kernel"}


class Counter:
    """Global loads/stores (bytes of unmasked lanes) and launches of interpreted kernels,
    seen through ``kernels._triton_internals.count_accesses``."""

    def __init__(self):
        self.accesses = []  # (kind, ndim, lowest address, highest address, bytes)
        self.launches = []  # (kernel name, programs)

    @contextlib.contextmanager
    def hooked(self):
        """Count every interpreted load, store and launch made within the block (raises
        TritonInternalsUnavailable where the interpreter's internals differ)."""
        from kernels._triton_internals import count_accesses

        with count_accesses() as counts:
            try:
                yield self
            finally:
                self.accesses += counts.accesses
                self.launches += counts.launches

    def split(self, element_tensors):
        """(element bytes read, element bytes written, per-channel bytes)."""
        spans = [_span(t) for t in element_tensors if t is not None and t.numel()]
        read = written = per_channel = 0
        for kind, ndim, lo, hi, nbytes in self.accesses:
            tile = ndim == 2 and any(a <= lo and hi < b for a, b in spans)
            if not tile:
                per_channel += nbytes
            elif kind == "load":
                read += nbytes
            else:
                written += nbytes
        return read, written, per_channel


def _span(t):
    """[first byte, last byte + 1) of the memory a tensor's elements occupy."""
    size = t.element_size()
    lo = t.data_ptr() + size * sum(st * (s - 1) for s, st in zip(t.shape, t.stride()) if st < 0)
    hi = t.data_ptr() + size * sum(st * (s - 1) for s, st in zip(t.shape, t.stride()) if st > 0)
    return lo, hi + size


def _inputs(shape, dtype, channels_last, residual):
    import torch

    def tensor():
        t = torch.randn(shape, dtype=dtype)
        return t.to(memory_format=torch.channels_last) if channels_last else t

    C = shape[1]
    return dict(x=tensor(), w=torch.rand(C) + 0.5, b=torch.randn(C), rm=torch.randn(C),
                rv=torch.rand(C) + 0.5, r=tensor() if residual else None, dy=tensor())


def measure(op, stats, shape, dtype, channels_last, fusion):
    """Count one op; returns the row of the traffic table."""
    from kernels import Epilogue
    from kernels.backward import bn_backward
    from kernels.forward import bn_forward_eval, bn_forward_train

    epilogue = Epilogue(fusion or "none")
    residual = epilogue.residual
    t = _inputs(shape, dtype, channels_last, residual)
    counter = Counter()
    if op == "train_fwd":
        with counter.hooked():
            y, _, _ = bn_forward_train(t["x"], t["w"], t["b"], t["rm"], t["rv"], 0.1, 1e-5, stats,
                                       t["r"], epilogue)
        big = [t["x"], t["r"], y]
        minimum = 2 + residual
    elif op == "eval":
        with counter.hooked():
            y = bn_forward_eval(t["x"], t["w"], t["b"], t["rm"], t["rv"], 1e-5, t["r"], epilogue)
        big = [t["x"], t["r"], y]
        minimum = 2 + residual
    else:
        y, mean, rstd = bn_forward_train(t["x"], t["w"], t["b"], None, None, 0.1, 1e-5, stats,
                                         t["r"], epilogue)
        with counter.hooked():
            dx, _, _, dres = bn_backward(t["dy"], t["x"], y, t["w"], t["b"], mean, rstd,
                                         training=True, epilogue=epilogue, residual=t["r"])
        big = [t["x"], t["dy"], y, t["r"], dx, dres]
        # after a residual, the activation's gradient needs y (relu's mask) or r (silu's z)
        minimum = 3 + residual + (epilogue.activation != "none" and residual)
    read, written, per_channel = counter.split(big)
    numel = t["x"].numel()
    elem = t["x"].element_size()
    single = any(k in SINGLE_LAUNCH_KERNELS for k, _ in counter.launches)
    path = "single_launch" if single else "general"
    base = fusion is None and dtype_name(dtype) == "float32"
    target = TARGETS.get((op, stats if op == "train_fwd" else "-", path)) if base else None
    return dict(
        op=op, stats=stats if op == "train_fwd" else "-", fusion=fusion or "-",
        layout="nhwc" if channels_last else "nchw", N=shape[0], C=shape[1],
        H=shape[2], W=shape[3], dtype=dtype_name(dtype), path=path,
        launches=len(counter.launches),
        programs="+".join(str(p) for _, p in counter.launches),
        read_B_per_elem=read / numel, write_B_per_elem=written / numel,
        elem_B_per_elem=(read + written) / numel, min_B_per_elem=minimum * elem,
        target_B_per_elem=target[0] * elem if target else None,
        target_launches=target[1] if target else None,
        per_channel_bytes=per_channel, per_channel_B_per_elem=per_channel / numel,
    )


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def traffic_table(shapes=SCALED_SHAPES, dtypes=("float32",), layouts=("nchw", "nhwc"),
                  fusions=FUSIONS):
    """Counted rows for every op, statistics mode, fusion, layout, shape and dtype."""
    import torch

    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for layout in layouts:
                for fusion in fusions:
                    cases = [("train_fwd", "single_pass"), ("train_fwd", "two_pass"),
                             ("train_bwd", "single_pass"), ("eval", "-")]
                    for op, stats in cases:
                        rows.append(measure(op, stats, shape, getattr(torch, dtype),
                                            layout == "nhwc", fusion))
    return rows


def parallelism_table(batches=FULL_SCALE_BATCHES, layouts=("nchw", "nhwc")):
    """Programs of every launch at ResNet-50's full BatchNorm shapes (meta tensors, not run)."""
    import torch

    from bnbench.shapes import resnet50_bn_shapes
    from kernels._triton_internals import record_launches
    from kernels.backward import bn_backward
    from kernels.forward import bn_forward_eval, bn_forward_train

    rows = []
    for (C, H, W) in resnet50_bn_shapes():
        for N in batches:
            for layout in layouts:
                def t():
                    x = torch.empty((N, C, H, W), device="meta")
                    return x.to(memory_format=torch.channels_last) if layout == "nhwc" else x
                vec = torch.empty(C, device="meta")
                ops = {
                    "train_fwd single_pass": lambda: bn_forward_train(
                        t(), vec, vec, vec, vec, 0.1, 1e-5, "single_pass"),
                    "train_fwd two_pass": lambda: bn_forward_train(
                        t(), vec, vec, vec, vec, 0.1, 1e-5, "two_pass"),
                    "train_bwd": lambda: bn_backward(t(), t(), None, vec, vec, vec, vec,
                                                     training=True),
                    "eval": lambda: bn_forward_eval(t(), vec, vec, vec, vec, 1e-5),
                }
                for name, call in ops.items():
                    with record_launches(name) as launches:
                        call()
                    programs = [math.prod(launch.grid) for launch in launches]
                    single = any(launch.fn.__name__ in SINGLE_LAUNCH_KERNELS for launch in launches)
                    rows.append(dict(op=name, layout=layout, N=N, C=C, H=H, W=W,
                                     path="single_launch" if single else "general",
                                     launches=len(launches), min_programs=min(programs),
                                     programs="+".join(map(str, programs))))
    return rows


def _stamp(df):
    """`df` with the metadata columns every bnbench CSV starts with (environment.stamp)."""
    from bnbench.environment import stamp

    return stamp(df, "cpu", interpreted=True,
                 method="triton interpreter (CPU); programs planned for 132 SMs")


def run_command(args):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import kernels
    import pandas as pd

    if not kernels.INTERPRETED:
        print("bnbench traffic: Triton was imported before the interpreter could be switched "
              "on; run it in a fresh process", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("Measured proxies for speed, not speeds: bytes counted in Triton's interpreter.",
          flush=True)
    fusions = tuple(None if f == "none" else f for f in args.fusions)
    traffic = _stamp(pd.DataFrame(traffic_table(args.shapes, args.dtypes, args.layouts, fusions)))
    traffic.to_csv(out / "traffic.csv", index=False)
    shown = ["op", "stats", "fusion", "layout", "N", "C", "H", "W", "dtype", "path", "launches",
             "programs", "read_B_per_elem", "write_B_per_elem", "min_B_per_elem",
             "target_B_per_elem", "per_channel_B_per_elem"]
    print(traffic[shown].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"wrote {out / 'traffic.csv'}")
    if not args.no_parallelism:
        par = _stamp(pd.DataFrame(parallelism_table()))
        par.to_csv(out / "parallelism.csv", index=False)
        pivot = par.pivot_table(index=["C", "H", "W"], columns=["layout", "N"],
                                values="min_programs", aggfunc="min")
        print("\nFewest programs in any launch (all ops), ResNet-50 BatchNorm shapes, H100 plan:")
        print(pivot.to_string())
        print(f"wrote {out / 'parallelism.csv'}")
    return 0


def _nchw(text):
    import argparse

    try:
        dims = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}: expected NxCxHxW, e.g. 16x4x28x28")
    return dims


def _shapes(text):
    return tuple(_nchw(t) for t in text.split(",") if t.strip())


def _choices(allowed):
    def parse(text):
        import argparse

        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: choose from {', '.join(allowed)}")
        return items
    return parse


def add_parser(subparsers):
    p = subparsers.add_parser(
        "traffic", help="count bytes moved, launches and programs of each op (no GPU needed)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=_shapes, default=SCALED_SHAPES,
                   help="NxCxHxW,... to count (default: scaled stand-ins for ResNet-50 shapes)")
    p.add_argument("--dtypes", type=_choices(("float32", "float16", "bfloat16", "float64")),
                   default=("float32",), help="comma-separated, default float32")
    p.add_argument("--layouts", type=_choices(("nchw", "nhwc")), default=("nchw", "nhwc"),
                   help="comma-separated, default nchw,nhwc")
    fusions = ("none", "relu", "residual+relu", "silu", "residual+silu")
    p.add_argument("--fusions", type=_choices(fusions), default=fusions,
                   help="comma-separated, default all")
    p.add_argument("--out", default="results", help="folder for traffic.csv and parallelism.csv")
    p.add_argument("--no-parallelism", action="store_true",
                   help="skip the full-scale program counts")
    p.set_defaults(func=run_command, uses_device=False)
