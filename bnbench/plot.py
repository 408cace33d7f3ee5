"""`bnbench plot CSV`: the PNGs of a run, drawn from its CSV and nothing else.

Three figures, each a grid of panels (rows: mode x fusion; columns: dtype x layout),
batch size on the x axis, one line per implementation:

* ``<stem>_throughput.png``: GB/s (minimal bytes / median time; median over the
  shapes) against batch size, the device's copy bandwidth dotted (on a GPU only: on a
  CPU the small cases run from cache, faster than a copy from memory);
* ``<stem>_speedup.png``: speed-up over cuDNN (rows where cuDNN ran; torch_native
  when there are none, as on a CPU; conv+cudnn in conv_bn_eval), geometric mean over
  the shapes, against batch size;
* ``<stem>_error.png``: the rel_l2_err of each quantity compared (y, and in training
  dx, dweight, dbias, dresidual, running stats), the largest over shapes and batch
  sizes: one marker per implementation, side by side, and a note in the panel when
  implementations' errors are equal (so that no series hides another).

* ``<stem>_host.png`` (a GPU run only: its ``wall_us`` and ``graph_us`` columns): time per
  call against batch size, median over the shapes, per implementation: do_bench's device
  time (dashed), the wall time of calls back to back (solid: host cost included) and the
  CUDA-graph replay time (dotted), so that the small-batch regime shows what a user pays
  on the host.

The speed figures share one y axis, the error figure one per column (dtype), on whole
decades.  Titles name the device, shapes and batch sizes.  Rows with an error, skipped
rows and untimed rows (Triton through the interpreter) draw nothing on the speed figures;
each panel names the implementations that ran untimed.
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
                   help="folder for the PNGs (default: the CSV's folder; its local/ where "
                        "that would replace PNGs committed in the checkout)")
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

    from .environment import OutputError, keep_committed, output_dir

    out, note = keep_committed(args.csv.parent, [f"{args.csv.stem}_{k}.png" for k in KINDS],
                               explicit=args.out is not None, local=args.csv.parent / "local")
    out = args.out if args.out is not None else out
    if note:
        print(f"bnbench plot: {note}")
    try:
        output_dir(out)
        paths = draw(args.csv, out, args.shape)
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


def _decades(ax, values, below=0):
    """Log y axis labelled at whole powers of ten only (1e-07, 1e-06, ...), spanning at
    least one decade, so that no panel shows a lone or crowded pair of mantissa labels."""
    import math

    from matplotlib.ticker import LogLocator, NullFormatter

    values = [v for v in values if v > 0 and math.isfinite(v)]
    if not values:
        return
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    hi = max(hi, lo + 1)
    lo -= below  # room for notes under the lowest point
    ax.set_yscale("log")
    ax.set_ylim(10.0 ** lo, 10.0 ** hi)
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=12))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _panels(df, sharey=False):
    """The grid (rows: mode x fusion, columns: dtype x layout), its figure and axes."""
    from matplotlib.figure import Figure

    rows, combos = _grid(df)
    width = 4.2 * max(1, len(combos))
    fig = Figure(figsize=(width, 3.0 * max(1, len(rows)) + 1.4), layout="constrained")
    axes = fig.subplots(max(1, len(rows)), max(1, len(combos)), squeeze=False, sharey=sharey)
    cells = []
    for i, (mode, fusion) in enumerate(rows):
        for j, (dtype, layout) in enumerate(combos):
            panel = df[(df["mode"] == mode) & (df["fusion"] == fusion) & (df["dtype"] == dtype)
                       & (df["layout"] == layout)]
            fused = "" if fusion == "none" else f" +{fusion}"
            axes[i][j].set_title(f"{mode}{fused}, {dtype}, {layout}", fontsize=9)
            cells.append((axes[i][j], mode, panel))
    return fig, axes, cells, width


def _finish(fig, width, title, handles):
    """The figure's title (wrapped) and one legend for every panel, below them."""
    lines = textwrap.wrap(title, width=int(width * 14), break_on_hyphens=False)
    fig.suptitle("\n".join(lines), fontsize=9)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(len(handles), 6), fontsize=8, frameon=False)


def _figure(df, title, ylabel, value, logy=False, hline=None, empty_note="no data",
            untimed=(), note_at="top"):
    """One grid figure; `value(group)` reduces one panel's rows of an impl to a Series by N.

    `ylabel` and `hline` (None or (y, label)) may be functions of the panel's mode;
    `untimed` names the implementations that ran but have no time (noted in each panel, at
    its "top" or "bottom").
    """
    styles = _styles(df["impl"].unique())
    fig, axes, cells, width = _panels(df, sharey="all")
    handles, drawn_values = {}, []
    for ax, mode, panel in cells:
        drawn = False
        for impl, g in panel.groupby("impl", sort=False):
            series = value(g).dropna()
            if len(series):
                (handles[impl],) = ax.plot(series.index, series.values, label=impl,
                                           **styles[impl])
                drawn_values += list(series.values)
                drawn = True
        line = hline(mode) if callable(hline) else hline
        if line is not None:
            handles[line[1]] = ax.axhline(line[0], color="grey", linestyle=":", label=line[1])
        missing = [i for i in untimed if i in set(panel["impl"])]
        if missing:
            top = note_at == "top"
            ax.text(0.02 if top else 0.98, 0.97 if top else 0.03,
                    "not timed: " + ", ".join(missing), transform=ax.transAxes,
                    ha="left" if top else "right", va=note_at, fontsize=7, color="dimgrey",
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8))
        if not drawn:
            ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes,
                    color="grey")
        ax.set_xscale("log", base=2)
        sizes = sorted(set(panel["N"]))
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size N")
        ax.set_ylabel(ylabel(mode) if callable(ylabel) else ylabel)
        ax.grid(alpha=0.3)
    if logy:
        for ax, _, _ in cells:
            _decades(ax, drawn_values)
    _finish(fig, width, title, handles)
    return fig


# the quantities compared against float64, as the CSV names their rel_l2_err columns
QUANTITIES = (("y", "rel_l2_err"), ("dx", "dx_rel_l2_err"), ("dweight", "dweight_rel_l2_err"),
              ("dbias", "dbias_rel_l2_err"), ("dresidual", "dresidual_rel_l2_err"),
              ("running_mean", "running_mean_rel_l2_err"),
              ("running_var", "running_var_rel_l2_err"))


def _short(impl):
    return impl.removeprefix("triton_").removeprefix("torch_")


def coinciding(values, names):
    """Implementations with equal errors (to 6 significant digits), and in which quantities:
    {impl: [error per quantity]}, the quantities' names -> ["a = b", "a = b = c: y, dx", ...]
    (names without "triton_"/"torch_"; no quantities listed: equal in all of them)."""
    where = {}
    for k, name in enumerate(names):
        groups = {}
        for impl, errs in values.items():
            if errs[k] == errs[k]:  # not NaN
                groups.setdefault(f"{errs[k]:.6g}", []).append(impl)
        for group in groups.values():
            if len(group) > 1:
                where.setdefault(tuple(group), []).append(name)
    return [" = ".join(_short(i) for i in group)
            + ("" if len(qs) == len(names) else ": " + ", ".join(qs))
            for group, qs in where.items()]


def _error_figure(df, title):
    """Relative L2 error per quantity (x), one marker per implementation, side by side so
    that equal errors stay visible; panels note the implementations whose errors coincide."""
    import math

    styles = _styles(df["impl"].unique())
    fig, axes, cells, width = _panels(df, sharey="col")
    handles = {}
    for ax, mode, panel in cells:
        quantities = [(q, c) for q, c in QUANTITIES if c in panel and panel[c].notna().any()]
        impls = list(dict.fromkeys(panel["impl"]))
        values = {}
        for k, impl in enumerate(impls):
            g = panel[panel["impl"] == impl]
            errs = [float(g[c].max()) for _, c in quantities]
            values[impl] = errs
            offset = (k - (len(impls) - 1) / 2) * 0.8 / max(1, len(impls))
            style = {key: v for key, v in styles[impl].items() if key != "linestyle"}
            (handles[impl],) = ax.plot([i + offset for i in range(len(quantities))], errs,
                                       linestyle="none", label=impl, **style)
        ax.set_xticks(range(len(quantities)), [q for q, _ in quantities], fontsize=8,
                      rotation=30 if len(quantities) > 4 else 0)
        ax.set_xlim(-0.6, len(quantities) - 0.4)
        ax.set_ylabel("rel. L2 error vs float64")
        ax.grid(alpha=0.3, axis="y")
        same = coinciding(values, [q for q, _ in quantities])
        if same:
            note = "\n".join(textwrap.fill(line, 58, subsequent_indent="   ")
                             for line in ["equal errors:"] + same)
            ax.text(0.02, 0.03, note, transform=ax.transAxes, fontsize=6.5, color="dimgrey",
                    va="bottom").set_in_layout(False)
    for j in range(axes.shape[1]):  # one decade scale per column (its dtype)
        column = [v for ax, _, panel in cells if ax in axes[:, j]
                  for _, c in QUANTITIES if c in panel for v in panel[c].dropna()]
        _decades(axes[0][j], [v for v in column if math.isfinite(v)], below=1)
    _finish(fig, width, title, handles)
    return fig


HOST_KIND = "host"  # drawn only from a run with wall_us / graph_us (a GPU run)
HOST_LINES = (("median_ms", 1e3, "device (do_bench)", "--"), ("wall_us", 1.0, "wall", "-"),
              ("graph_us", 1.0, "CUDA graph", ":"))


def has_host_times(df):
    """True when `df` (a run's rows) has wall-time figures to draw (a GPU run)."""
    return "wall_us" in df and bool(df["wall_us"].notna().any())


def _host_figure(df, title):
    """Microseconds per call against batch size: per implementation (its colour and
    marker), the device time, the back-to-back wall time and the CUDA-graph replay time
    (one line style each), median over the shapes."""
    from matplotlib.lines import Line2D

    styles = _styles(df["impl"].unique())
    fig, axes, cells, width = _panels(df, sharey="all")
    handles, drawn = {}, []
    for ax, mode, panel in cells:
        for impl, g in panel.groupby("impl", sort=False):
            style = dict(styles[impl])
            for column, scale, _, linestyle in HOST_LINES:
                if column not in g:
                    continue
                series = (g.groupby("N")[column].median() * scale).dropna()
                if len(series):
                    style["linestyle"] = linestyle
                    ax.plot(series.index, series.values, **style)
                    drawn += list(series.values)
                    handles[impl] = Line2D([], [], color=style["color"], marker=style["marker"],
                                           linestyle="none")
        ax.set_xscale("log", base=2)
        sizes = sorted(set(panel["N"]))
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("batch size N")
        ax.set_ylabel("µs per call")
        ax.grid(alpha=0.3)
    for ax, _, _ in cells:
        _decades(ax, drawn)
    for _, _, label, linestyle in HOST_LINES:
        handles[label] = Line2D([], [], color="black", linestyle=linestyle)
    _finish(fig, width, title, handles)
    return fig


def _sweep_text(df):
    """The shapes and batch sizes of `df`, for a figure's title."""
    shapes = sorted(set(zip(df["C"], df["H"], df["W"])))
    sizes = sorted(set(df["N"]))
    return (f"shape{'s' if len(shapes) > 1 else ''} CxHxW "
            f"{', '.join(f'{c}x{h}x{w}' for c, h, w in shapes)}, batch sizes N "
            f"{', '.join(str(n) for n in sizes)}")


def draw(csv_path, out_dir=None, shape=None):
    """Draw the PNGs of `csv_path` (three, and the host figure for a run with wall times) into
    `out_dir` (default: beside it); return their paths."""
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
    if ok.empty:
        raise ValueError(f"{csv_path} has no rows with status ok: nothing to draw")
    baseline = dict(zip(df["mode"], df["baseline"]))
    over = base_name
    if (df["mode"] == "conv_bn_eval").any():
        over = f"{base_name} ({baseline['conv_bn_eval']} in conv_bn_eval)" \
            if (df["mode"] != "conv_bn_eval").any() else baseline["conv_bn_eval"]
    device = str(df["device"].iloc[0]) if "device" in df and len(df) else "unknown device"
    sweep = _sweep_text(ok)
    several = ok[["C", "H", "W"]].drop_duplicates().shape[0] > 1
    untimed = sorted(set(ok[ok["median_ms"].isna()]["impl"]))
    note = ""
    if untimed and "triton_mode" in df and (df["triton_mode"] == "interpreter").any():
        note = (". Triton rows untimed (Triton's interpreter): no speed comparison without a "
                f"GPU; their errors are in {csv_path.stem}_error.png")
    copy = df["copy_gbps"].dropna() if "copy_gbps" in df else []
    cpu = "device_type" in df and (df["device_type"] == "cpu").all()
    hline, copy_note = None, ""
    if len(copy) and not cpu:
        hline = (float(copy.iloc[0]), f"copy bandwidth ({float(copy.iloc[0]):.0f} GB/s)")
    elif len(copy):
        copy_note = (". No copy-bandwidth line on a CPU: it is measured on a large copy, from "
                 "memory, while these small cases run from cache and can exceed it")

    def by_n(column, how):
        return lambda g: g.groupby("N")[column].agg(how)

    def geomean(s):
        s = s.dropna()
        return float(np.exp(np.log(s).mean())) if len(s) else np.nan

    median = "median over the shapes, " if several else ""
    mean = "geometric mean over the shapes, " if several else ""
    figures = {
        "throughput": _figure(ok, f"{device}: GB/s (minimal bytes / median time; {median}"
                                  f"{sweep}){note}{copy_note}",
                              "GB/s", by_n("gbps", "median"), hline=hline,
                              empty_note="no timed rows", untimed=untimed),
        "speedup": _figure(ok[ok["impl"] != ok["baseline"]],
                           f"{device}: speed-up over {over} (its time / this time; {mean}"
                           f"{sweep}){note}",
                           lambda mode: f"x faster than {baseline[mode]}",
                           by_n("speedup", geomean),
                           hline=lambda mode: (1.0, f"{baseline[mode]} (1x)"),
                           empty_note="no timed rows", untimed=untimed, note_at="bottom"),
        "error": _error_figure(ok, f"{device}: relative L2 error against float64 of each "
                                   f"quantity (the largest over {sweep}); markers side by "
                                   f"side, equal errors noted in the panel"),
    }
    kinds = list(KINDS)
    if has_host_times(ok):
        figures[HOST_KIND] = _host_figure(
            ok, f"{device}: µs per call ({median}{sweep}): device time (do_bench, L2 flushed), "
                f"wall time of calls back to back (host cost included) and CUDA-graph replay")
        kinds.append(HOST_KIND)
    paths = []
    for kind in kinds:
        path = out_dir / f"{csv_path.stem}_{kind}.png"
        figures[kind].savefig(path, dpi=110)
        paths.append(path)
    return paths
