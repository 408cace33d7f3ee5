"""`bnbench plot CSV`: the PNGs of a run, drawn from its CSV and nothing else.

Three figures, each a grid of panels (rows: modes; columns: dtype x layout), batch
size on the x axis, one line per implementation:

* ``<stem>_throughput.png``: GB/s (minimal bytes / median time; median over the
  shapes), the device's copy bandwidth dotted;
* ``<stem>_speedup.png``: speed-up over cuDNN (rows where cuDNN ran; torch_native
  when there are none, as on a CPU), geometric mean over the shapes;
* ``<stem>_error.png``: the worst rel_l2_err over the quantities compared (y, and in
  training dx, dweight, dbias, running stats), the largest over the shapes.

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
    try:
        paths = draw(args.csv, args.out, args.shape)
    except ValueError as exc:
        print(f"bnbench plot: error: {exc}")
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


def _grid(df):
    from .cases import LAYOUTS, MODES

    modes = [m for m in MODES if m in set(df["mode"])]
    combos = sorted({(d, l) for d, l in zip(df["dtype"], df["layout"])},
                    key=lambda dl: (dl[0], LAYOUTS.index(dl[1]) if dl[1] in LAYOUTS else 9))
    return modes, combos


def _styles(impls):
    """A fixed colour, marker and line style per implementation (equal lines stay visible)."""
    from .impls import IMPLS

    order = list(IMPLS) + sorted(set(impls) - set(IMPLS))
    markers = "os^Dvx<>"
    return {name: dict(color=f"C{i % 10}", marker=markers[i % len(markers)],
                       linestyle=("-", "--", ":")[i % 3], markersize=7 - (i % 3))
            for i, name in enumerate(order)}


def _figure(df, title, ylabel, value, logy=False, hline=None, empty_note="no data"):
    """One grid figure; `value(group)` reduces one panel's rows of an impl to a Series by N."""
    from matplotlib.figure import Figure

    modes, combos = _grid(df)
    styles = _styles(df["impl"].unique())
    width = 4.2 * max(1, len(combos))
    fig = Figure(figsize=(width, 3.2 * max(1, len(modes)) + 0.8), layout="constrained")
    axes = fig.subplots(max(1, len(modes)), max(1, len(combos)), squeeze=False)
    for i, mode in enumerate(modes):
        for j, (dtype, layout) in enumerate(combos):
            ax = axes[i][j]
            panel = df[(df["mode"] == mode) & (df["dtype"] == dtype) & (df["layout"] == layout)]
            drawn = False
            for impl, g in panel.groupby("impl", sort=False):
                series = value(g).dropna()
                if len(series):
                    ax.plot(series.index, series.values, label=impl, **styles[impl])
                    drawn = True
            if hline is not None:
                ax.axhline(hline[0], color="grey", linestyle=":", label=hline[1])
            if not drawn:
                ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes,
                        color="grey")
            ax.set_xscale("log", base=2)
            sizes = sorted(set(panel["N"]))
            ax.set_xticks(sizes, [str(n) for n in sizes])
            ax.minorticks_off()
            if logy and drawn:
                ax.set_yscale("log")
            ax.set_title(f"{mode}, {dtype}, {layout}", fontsize=9)
            ax.set_xlabel("batch size N")
            ax.set_ylabel(ylabel)
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
        "speedup": _figure(ok[ok["impl"] != base_name],
                           f"{device}: speed-up over {base_name} (geometric mean {scope}){note}",
                           f"x faster than {base_name}", by_n("speedup", geomean),
                           hline=(1.0, base_name), empty_note="no timed rows"),
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
