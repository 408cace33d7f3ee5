"""`bnbench plot CSV`: the PNGs of a run, drawn from its CSV and nothing else.

Three figures, each a grid of panels (rows: mode x fusion; columns: dtype x layout),
batch size on the x axis, one line per implementation:

* ``<stem>_throughput.png``: GB/s (minimal bytes / median time; median over the
  shapes), the device's copy bandwidth dotted;
* ``<stem>_speedup.png``: speed-up over cuDNN (rows where cuDNN ran; torch_native
  when there are none, as on a CPU; conv+cudnn in conv_bn_eval), geometric mean over
  the shapes;
* ``<stem>_error.png``: the worst rel_l2_err over the quantities compared (y, and in
  training dx, dweight, dbias, dresidual, running stats), the largest over the shapes.

Rows with an error, skipped rows and untimed rows (Triton through the interpreter)
draw nothing on the speed figures.
"""

import argparse
import textwrap
from pathlib import Path

KINDS = ("throughput", "speedup", "error")


def add_parser(subparsers):
    p = subparsers.add_parser(
        "plot", help="redraw the PNGs of a run from its CSV",
        description="Redraw a run's plots (throughput, speed-up, error against batch size) "
                    "from its CSV alone.")
    p.add_argument("csv", type=_existing_file, help="a CSV written by 'bnbench run'")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the PNGs (default: the CSV's folder)")
    p.add_argument("--shape", type=_shape, default=None, metavar="CxHxW",
                   help="draw one shape only, instead of aggregating over the shapes")
    p.set_defaults(func=plot_command, uses_device=False)


def _existing_file(text):
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _shape(text):
    from .shapes import parse_shape

    return parse_shape(text)


def plot_command(args):
    """Draw the PNGs; 2 with one line on stderr (the path and the problem) for a file that
    is not a bnbench run CSV, a shape it lacks, or an --out that cannot be written."""
    import sys

    from .environment import OutputError, output_dir

    try:
        output_dir(args.out if args.out is not None else args.csv.parent)
        paths = draw(args.csv, args.out, args.shape)
    except (ValueError, OutputError) as exc:  # OutputError, report.NotARunCsv: ValueErrors
        print(f"bnbench plot: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


def _grid(df):
    """The panels' rows ((mode, fusion) pairs present) and columns ((dtype, layout) pairs)."""
    from .cases import ALL_MODES, FUSIONS, LAYOUTS

    def rank(value, order):
        return order.index(value) if value in order else len(order)

    rows = sorted(set(zip(df["mode"], df["fusion"])),
                  key=lambda mf: (rank(mf[0], ALL_MODES), rank(mf[1], FUSIONS), mf))
    combos = sorted(set(zip(df["dtype"], df["layout"])),
                    key=lambda dl: (dl[0], rank(dl[1], LAYOUTS)))
    return rows, combos


def _styles(impls):
    """A fixed colour, marker and line style per implementation (equal lines stay visible)."""
    from .impls import IMPLS

    order = list(IMPLS) + sorted(set(impls) - set(IMPLS))
    markers = "os^Dvx<>"
    return {name: dict(color=f"C{i % 10}", marker=markers[i % len(markers)],
                       linestyle=("-", "--", ":")[i % 3], markersize=7 - (i % 3))
            for i, name in enumerate(order)}


def _figure(df, title, ylabel, value, logy=False, hline=None, empty_note="no data"):
    """One grid figure; `value(group)` reduces one panel's rows of an impl to a Series by N.

    `ylabel` and `hline` (None or (y, label)) may be functions of the panel's mode.
    """
    from matplotlib.figure import Figure

    rows, combos = _grid(df)
    styles = _styles(df["impl"].unique())
    width = 4.2 * max(1, len(combos))
    fig = Figure(figsize=(width, 3.2 * max(1, len(rows)) + 0.8), layout="constrained")
    axes = fig.subplots(max(1, len(rows)), max(1, len(combos)), squeeze=False)
    for i, (mode, fusion) in enumerate(rows):
        for j, (dtype, layout) in enumerate(combos):
            ax = axes[i][j]
            panel = df[(df["mode"] == mode) & (df["fusion"] == fusion) & (df["dtype"] == dtype)
                       & (df["layout"] == layout)]
            drawn = False
            for impl, g in panel.groupby("impl", sort=False):
                series = value(g).dropna()
                if len(series):
                    ax.plot(series.index, series.values, label=impl, **styles[impl])
                    drawn = True
            line = hline(mode) if callable(hline) else hline
            if line is not None:
                ax.axhline(line[0], color="grey", linestyle=":", label=line[1])
            if not drawn:
                ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes,
                        color="grey")
            ax.set_xscale("log", base=2)
            sizes = sorted(set(panel["N"]))
            ax.set_xticks(sizes, [str(n) for n in sizes])
            ax.minorticks_off()
            if logy and drawn:
                ax.set_yscale("log")
            fused = "" if fusion == "none" else f" +{fusion}"
            ax.set_title(f"{mode}{fused}, {dtype}, {layout}", fontsize=9)
            ax.set_xlabel("batch size N")
            ax.set_ylabel(ylabel(mode) if callable(ylabel) else ylabel)
            if drawn:
                ax.legend(fontsize=7)
    fig.suptitle("\n".join(textwrap.wrap(title, width=int(width * 14))), fontsize=9)
    return fig


def draw(csv_path, out_dir=None, shape=None):
    """Draw the three PNGs of `csv_path` into `out_dir` (default: beside it); return their paths."""
    import numpy as np

    from . import report

    csv_path = Path(csv_path)
    out_dir = Path(out_dir) if out_dir is not None else csv_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    df = report.read(csv_path)
    if shape is not None:
        c, h, w = shape
        df = df[(df["C"] == c) & (df["H"] == h) & (df["W"] == w)]
        if df.empty:
            raise ValueError(f"{csv_path} has no rows of shape {c}x{h}x{w}")
    df = df.copy()
    df["_worst_abs"], df["_worst_rel"] = report.worst_errors(df)
    df, base_name = report.with_speedup(df)
    ok = df[df["status"] == "ok"]
    baseline = dict(zip(df["mode"], df["baseline"]))
    over = base_name
    if (df["mode"] == "conv_bn_eval").any():
        over = f"{base_name} ({baseline['conv_bn_eval']} in conv_bn_eval)" \
            if (df["mode"] != "conv_bn_eval").any() else baseline["conv_bn_eval"]
    device = str(df["device"].iloc[0]) if "device" in df and len(df) else "unknown device"
    scope = f"shape {shape[0]}x{shape[1]}x{shape[2]}" if shape else "over the shapes"
    note = ""
    if "triton_mode" in df and (df["triton_mode"] == "interpreter").any():
        note = ". Triton rows untimed (Triton interpreter): no speed comparison without a GPU"
    copy = df["copy_gbps"].dropna() if "copy_gbps" in df else []
    hline = (float(copy.iloc[0]), "copy bandwidth") if len(copy) else None

    def by_n(column, how):
        return lambda g: g.groupby("N")[column].agg(how)

    def geomean(s):
        s = s.dropna()
        return float(np.exp(np.log(s).mean())) if len(s) else np.nan

    figures = {
        "throughput": _figure(ok, f"{device}: GB/s (median {scope}){note}",
                              "GB/s", by_n("gbps", "median"), hline=hline,
                              empty_note="no timed rows"),
        "speedup": _figure(ok[ok["impl"] != ok["baseline"]],
                           f"{device}: speed-up over {over} (geometric mean {scope}){note}",
                           lambda mode: f"x faster than {baseline[mode]}",
                           by_n("speedup", geomean), hline=lambda mode: (1.0, baseline[mode]),
                           empty_note="no timed rows"),
        "error": _figure(ok,
                         f"{device}: worst rel. L2 error vs float64 over y, grads, running "
                         f"stats (max {scope})", "rel_l2_err", by_n("_worst_rel", "max"),
                         logy=True),
    }
    paths = []
    for kind in KINDS:
        path = out_dir / f"{csv_path.stem}_{kind}.png"
        figures[kind].savefig(path, dpi=110)
        paths.append(path)
    return paths
