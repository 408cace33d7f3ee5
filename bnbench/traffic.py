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

The ops, their calls, their inputs and their minimum element traffic come from
``bnbench.registry``: training forward and eval read x once and write y once (2
elements' bytes; +1 with a residual); backward reads x and dy and writes dx (3; +1
for the residual's gradient, +1 for the output y read for a ReLU after a residual,
or the residual read again for a SiLU after one, to recompute its input z).  The
issue targets (fp32, no epilogue) are the registry's too.

How the programs are counted.  The same ops on ResNet-50's BatchNorm shapes at
full size are launched on the meta device with the launches recorded, not run:
the grid of every launch is what a real launch on an H100 (132 SMs) would get.
"""

import contextlib
import math
import os
import sys
from pathlib import Path

from .arguments import choices
from .cases import DTYPE_ALIASES
from .registry import HARNESS_FUSIONS, LAYOUTS
from .shapes import shape_list

# Scaled-down stand-ins the interpreter runs in seconds, with the code paths of the real shapes:
# (16, 4, 28, 28) like (32, 64, 56, 56): many programs per channel, merged partials;
# (256, 8, 7, 7) like (256, 2048, 7, 7) at large batch: general path, small H*W;
# (8, 16, 7, 7) like (2048, 7, 7) at small batch: the single-launch path.
SCALED_SHAPES = ((16, 4, 28, 28), (256, 8, 7, 7), (8, 16, 7, 7))
FUSIONS = HARNESS_FUSIONS
DTYPES = ("float32", "float16", "bfloat16", "float64")
FULL_SCALE_BATCHES = (1, 8, 32, 64, 128, 256)

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


def measure(variant, shape):
    """Count one variant (``bnbench.registry``) on real tensors of x's `shape`; returns the
    row of the traffic table."""
    from bnbench import registry

    t = registry.make_tensors(variant, shape, "real")
    counter = Counter()
    with counter.hooked():
        out = registry.run_variant(variant, t)
    x = t["x"]
    big = [v for v in (*t.values(), *out.values()) if v is not None and v.shape == x.shape]
    read, written, per_channel = counter.split(big)
    numel, elem, op, epi = x.numel(), x.element_size(), variant.op, variant.epilogue
    path = _path(name for name, _ in counter.launches)
    base = epi.value == "none" and variant.dtype == "float32"
    target = op.targets.get((variant.stats, path)) if base else None
    return dict(
        op=op.name, stats=variant.stats, fusion=epi.value, layout=variant.layout,
        N=shape[0], C=shape[1], H=shape[2], W=shape[3], dtype=variant.dtype, path=path,
        launches=len(counter.launches),
        programs="+".join(str(p) for _, p in counter.launches),
        read_B_per_elem=read / numel, write_B_per_elem=written / numel,
        elem_B_per_elem=(read + written) / numel,
        min_B_per_elem=(op.min_elements(epi) + op.recompute_elements(epi)) * elem,
        target_B_per_elem=target[0] * elem if target else None,
        target_launches=target[1] if target else None,
        per_channel_bytes=per_channel, per_channel_B_per_elem=per_channel / numel,
    )


def _path(kernel_names):
    """"single_launch" when a single-launch kernel ran, else "general"."""
    return ("single_launch" if any(k in SINGLE_LAUNCH_KERNELS for k in kernel_names)
            else "general")


def _op_variants(fusion, layout, dtype):
    """Every op of the registry (each statistics mode) with default options."""
    from bnbench import registry

    pair = (dtype, registry.param_dtype_for(dtype))
    return [v for op in registry.OPS.values()
            for v in registry.variants(op, (fusion,), (layout,), (pair,))]


def traffic_table(shapes=SCALED_SHAPES, dtypes=("float32",), layouts=("nchw", "nhwc"),
                  fusions=FUSIONS, progress=False):
    """Counted rows for every op, statistics mode, fusion, layout, shape and dtype;
    `progress`: a tqdm bar on stderr (the command's; minutes through the interpreter)."""
    points = [(v, shape) for shape in shapes for dtype in dtypes for layout in layouts
              for fusion in fusions for v in _op_variants(fusion, layout, dtype)]
    if progress:
        from tqdm import tqdm

        from kernels._triton_internals import COUNTING, require

        require(COUNTING)  # fail in one line before the bar draws itself
        points = tqdm(points, desc="bnbench traffic", unit="variant", file=sys.stderr)
    return [measure(v, shape) for v, shape in points]


def parallelism_table(batches=FULL_SCALE_BATCHES, layouts=("nchw", "nhwc")):
    """Programs of every launch at ResNet-50's full BatchNorm shapes (meta tensors, not run)."""
    from bnbench import registry
    from bnbench.shapes import resnet50_bn_shapes
    from kernels._triton_internals import record_launches

    rows = []
    for (C, H, W) in resnet50_bn_shapes():
        for N in batches:
            for layout in layouts:
                for v in _op_variants("none", layout, "float32"):
                    name = v.op.name if v.stats == "-" else f"{v.op.name} {v.stats}"
                    with record_launches(name) as launches:
                        registry.run_variant(v, registry.make_tensors(v, (N, C, H, W), "meta"))
                    programs = [math.prod(launch.grid) for launch in launches]
                    rows.append(dict(op=name, layout=layout, N=N, C=C, H=H, W=W,
                                     path=_path(launch.fn.__name__ for launch in launches),
                                     launches=len(launches), min_programs=min(programs),
                                     programs="+".join(map(str, programs))))
    return rows


def markdown(df):
    """The README's traffic table, from a traffic.csv: fp32 without epilogue, one row per
    op, statistics mode and path; the largest count over the shapes, per layout."""
    base = df[(df.fusion == "none") & (df.dtype == "float32")]
    rows = ["| op | stats | path | read + write, B per element of x (nchw / nhwc) | minimum | "
            "target | launches | per-channel B/elem |", "|---|---|---|---|---|---|---|---|"]
    for (op, stats, path), g in base.groupby(["op", "stats", "path"], sort=False):
        by_layout = " / ".join(f"{g[g.layout == layout].elem_B_per_elem.max():g}"
                               for layout in LAYOUTS)
        per_channel = g.per_channel_B_per_elem
        rows.append(f"| {op} | {stats} | {path} | {by_layout} | {g.min_B_per_elem.max():g} | "
                    f"≤ {g.target_B_per_elem.max():g} | {g.launches.max()} | "
                    f"{per_channel.min():.2f}–{per_channel.max():.2f} |")
    return "\n".join(rows)


def parallelism_markdown(df, batches=(1, 8, 32, 256)):
    """The README's parallelism table, from a parallelism.csv: the fewest programs in any
    launch of any op, per shape, layout and batch size."""
    df = df[df.N.isin(batches)]
    pivot = df.pivot_table(index=["C", "H", "W"], columns=["layout", "N"],
                           values="min_programs", aggfunc="min")
    head = " | ".join(f"{layout} N={n}" for layout, n in pivot.columns)
    rows = [f"| C, H, W | {head} |", "|---" * (len(pivot.columns) + 1) + "|"]
    for (C, H, W), r in pivot.iterrows():
        rows.append(f"| {C}, {H}, {W} | " + " | ".join(str(int(v)) for v in r) + " |")
    return "\n".join(rows)


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
    from .environment import command_out

    names = ["traffic.csv"] + ([] if args.no_parallelism else ["parallelism.csv"])
    out = command_out("traffic", args.out, "results", names)
    if out is None:
        return 2
    print("Measured proxies for speed, not speeds: bytes counted in Triton's interpreter.",
          flush=True)
    traffic = _stamp(pd.DataFrame(traffic_table(args.shapes, args.dtypes, args.layouts,
                                                args.fusions, progress=True)))
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


def add_parser(subparsers):
    p = subparsers.add_parser(
        "traffic", help="count bytes moved, launches and programs of each op (no GPU needed)",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=shape_list("NxCxHxW"), default=SCALED_SHAPES,
                   help="NxCxHxW,... to count, the batch included: the counts are per launch "
                        "(default: scaled stand-ins for ResNet-50 shapes)")
    p.add_argument("--dtypes", type=choices("dtypes", DTYPES, DTYPE_ALIASES),
                   default=("float32",), help=f"from {', '.join(DTYPES)}, default float32")
    p.add_argument("--layouts", type=choices("layouts", LAYOUTS), default=LAYOUTS,
                   help="comma-separated, default nchw,nhwc")
    p.add_argument("--fusions", type=choices("fusions", FUSIONS), default=FUSIONS,
                   help=f"from {', '.join(FUSIONS)}, default all")
    p.add_argument("--out", default=None,
                   help="folder for traffic.csv and parallelism.csv (default results/; in a "
                        "checkout, results/local/ where results/ holds them committed)")
    p.add_argument("--no-parallelism", action="store_true",
                   help="skip the full-scale program counts")
    p.set_defaults(func=run_command, uses_device=False)
