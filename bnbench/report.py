"""The run's CSV (long format: one row per implementation x case, written row by row), its summary.

Columns, in order:

* the run: the metadata every bnbench CSV starts with (``bnbench.environment.STAMP_COLUMNS``):
  ``timestamp`` (UTC, start of the run), ``bnbench_version`` (the installed package's),
  ``git_commit`` (``-dirty`` when the code differs from it; ``unknown`` outside a checkout
  unless pip recorded it), ``device`` (GPU or CPU name), ``device_type`` (cuda/cpu),
  ``torch_version``, ``triton_version``, ``cuda_version``, ``cudnn_version``,
  ``triton_mode`` (compiled/interpreter), ``tf32``, ``method`` (the timer, in words);
  then ``copy_gbps`` (the device's copy bandwidth, measured once per run);
* the case: ``impl``, ``backend`` (what actually ran, see ``bnbench.backends``),
  ``mode``, ``N``, ``C``, ``H``, ``W``, ``dtype``, ``layout``, ``fusion`` (none, relu,
  residual+relu; see ``bnbench.cases``);
* the outcome: ``status`` (ok/error/skipped) and ``error`` (the exception or reason);
* speed: ``median_ms``, ``p20_ms``, ``p80_ms``, ``gbps`` (minimal bytes / median time,
  see ``bnbench.cases``), ``frac_copy_bw`` (gbps / copy_gbps), ``peak_mem_mb`` (CUDA:
  memory one call allocates beyond what was resident before it), ``wall_us`` (CUDA: wall
  time per call of calls back to back, no flush, one synchronisation per round: what a
  user pays, host cost included) and ``graph_us`` (CUDA: the call captured once with
  ``torch.cuda.graph``, per replay; empty where it cannot be captured, ``error`` saying
  why).  Empty for Triton rows run by the interpreter, for failed rows, and peak memory,
  wall and graph times on CPU;
* error against the float64 reference: ``max_abs_err``, ``rel_l2_err`` (output y) and
  the same for dx, dweight, dbias, dresidual, running_mean, running_var
  (``bnbench.numerics``).

Speed-ups (summary and plots) are taken per case against one baseline: in the batch-norm
modes ``cudnn`` where cuDNN ran (else ``torch_native``, as on a CPU); in conv_bn_eval
``conv+cudnn`` (the unfolded torch pair, whatever ran its batch norm: see its backend).
"""

import csv
import math
import textwrap

from .environment import STAMP_COLUMNS
from .numerics import ERROR_COLUMNS

RUN_COLUMNS = STAMP_COLUMNS + ("copy_gbps",)
CASE_COLUMNS = ("impl", "backend", "mode", "N", "C", "H", "W", "dtype", "layout",
                "fusion")
OUTCOME_COLUMNS = ("status", "error")
SPEED_COLUMNS = ("median_ms", "p20_ms", "p80_ms", "gbps", "frac_copy_bw", "peak_mem_mb",
                 "wall_us", "graph_us")
COLUMNS = RUN_COLUMNS + CASE_COLUMNS + OUTCOME_COLUMNS + SPEED_COLUMNS + ERROR_COLUMNS


def cell(value, digits=6):
    """A CSV cell: None and NaN empty, floats to `digits` significant digits."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}g}"
    return value


class CsvWriter:
    """Writes rows as they come, flushed one by one, so an interrupted run keeps its rows."""

    def __init__(self, path, run_fields):
        self.path = path
        self.run_fields = dict(run_fields)
        self.rows = 0
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
        self._writer.writeheader()
        self._file.flush()

    def write(self, row):
        """Write one row (the run's fields added); unknown columns raise ValueError."""
        self._writer.writerow({k: cell(v) for k, v in {**self.run_fields, **row}.items()})
        self._file.flush()
        self.rows += 1

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NotARunCsv(ValueError):
    """A file that is not a bnbench run CSV; the message names the path and what is wrong."""


def read(path):
    """The CSV as a pandas DataFrame.

    Raises NotARunCsv (a ValueError; one line naming the path and the problem) for an empty
    or binary file, one pandas cannot parse, one without the columns of a bnbench run, or
    one without rows.  A CSV from before fusions were measured gets ``fusion`` "none".
    """
    import pandas as pd

    def fail(problem):
        return NotARunCsv(f"{path} is not a bnbench run CSV: {problem}")

    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise NotARunCsv(f"cannot read {path}: {exc.strerror or exc}") from None
    if not head.strip():
        raise fail("the file is empty")
    try:
        head.decode("utf-8")
        text = True
    except UnicodeDecodeError as exc:
        text = exc.start >= len(head) - 3  # only a multi-byte character cut at the end
    if not text or b"\0" in head:
        raise fail("binary data, not UTF-8 text")
    try:
        df = pd.read_csv(path, keep_default_na=True)
    except UnicodeDecodeError:
        raise fail("binary data, not UTF-8 text") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise fail(f"pandas cannot parse it ({str(exc).splitlines()[0].strip()})") from None
    if "fusion" not in df.columns:
        df["fusion"] = "none"
    missing = [c for c in CASE_COLUMNS + OUTCOME_COLUMNS + ("median_ms", "gbps", "max_abs_err",
                                                            "rel_l2_err") if c not in df.columns]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4
                                           else "")
        raise fail(f"missing columns {shown}")
    if df.empty:
        raise fail("a header and no rows")
    return df


def worst_errors(df):
    """Per row: the largest max_abs_err and rel_l2_err over the quantities compared."""
    abs_cols = [c for c in ERROR_COLUMNS if c.endswith("max_abs_err") and c in df.columns]
    rel_cols = [c for c in ERROR_COLUMNS if c.endswith("rel_l2_err") and c in df.columns]
    return df[abs_cols].max(axis=1), df[rel_cols].max(axis=1)


def speed_baseline(df):
    """The batch-norm modes' baseline: (name, its timed rows): cudnn where cuDNN ran, else
    torch_native."""
    timed = df[(df["status"] == "ok") & df["median_ms"].notna()]
    cudnn = timed[(timed["impl"] == "cudnn") & (timed["backend"] == "cudnn")]
    if len(cudnn):
        return "cudnn", cudnn
    return "torch_native", timed[timed["impl"] == "torch_native"]


KEYS = ["mode", "fusion", "N", "C", "H", "W", "dtype", "layout"]


def with_speedup(df):
    """`df` plus ``speedup`` (baseline median / row median, same case) and ``baseline`` (the
    baseline's impl name, per row's mode); and the batch-norm modes' baseline name."""
    import pandas as pd

    from .impls import CONV_BASELINE

    name, base = speed_baseline(df)
    timed = df[(df["status"] == "ok") & df["median_ms"].notna()]
    base = pd.concat([base, timed[timed["impl"] == CONV_BASELINE]])
    base = base[KEYS + ["median_ms"]].rename(columns={"median_ms": "_base_ms"})
    out = df.merge(base, on=KEYS, how="left")
    out["speedup"] = out["_base_ms"] / out["median_ms"]
    out.loc[out["status"] != "ok", "speedup"] = pd.NA
    out["baseline"] = out["mode"].map(lambda m: CONV_BASELINE if m == "conv_bn_eval" else name)
    return out.drop(columns="_base_ms"), name


def summary(df):
    """One line per (mode, fusion, dtype, layout, impl), over shapes and batch sizes.

    Columns: backend(s) seen; rows ok / all; median GB/s and percentage of the
    copy bandwidth; ``speedup``, the geometric-mean speed-up over the baseline
    named in ``over`` (same cases); the worst max_abs_err and rel_l2_err over every
    quantity compared.
    """
    import numpy as np
    import pandas as pd

    df = df.copy()
    df["worst_abs_err"], df["worst_rel_l2_err"] = worst_errors(df)
    df, _ = with_speedup(df)
    lines = []
    for (mode, fusion, dtype, layout, impl), g in df.groupby(
            ["mode", "fusion", "dtype", "layout", "impl"], sort=False):
        ok = g[g["status"] == "ok"]
        speed = ok["speedup"].dropna()
        lines.append({
            "mode": mode, "fusion": fusion, "dtype": dtype, "layout": layout, "impl": impl,
            "backend": ",".join(sorted(set(ok["backend"].dropna().astype(str)))) or "-",
            "ok": f"{len(ok)}/{len(g)}",
            "GB/s": ok["gbps"].median(),
            "%copy_bw": 100 * ok["frac_copy_bw"].median() if "frac_copy_bw" in ok else np.nan,
            "speedup": float(np.exp(np.log(speed).mean())) if len(speed) else np.nan,
            "over": g["baseline"].iloc[0],
            "worst_abs_err": ok["worst_abs_err"].max(),
            "worst_rel_l2": ok["worst_rel_l2_err"].max(),
        })
    return pd.DataFrame(lines)


def _number(spec):
    def fmt(value):
        return "-" if value is None or value != value else spec.format(value)
    return fmt


GROUP = ("mode", "fusion", "dtype", "layout")


def sweep_lines(df):
    """What the sweep held, for the summary's header: device, shapes, batch sizes, dtypes."""
    shapes = sorted(set(zip(df["C"], df["H"], df["W"])))
    sizes = sorted(set(df["N"]))
    first = df.iloc[0]
    lines = [f"device: {first['device']}"
             + (f" (Triton {first['triton_mode']})" if "triton_mode" in df else ""),
             f"shapes CxHxW: {', '.join(f'{c}x{h}x{w}' for c, h, w in shapes)}; batch sizes N: "
             f"{', '.join(str(n) for n in sizes)}"]
    return [textwrap.fill(line, 100, subsequent_indent="  ") for line in lines]


def legend_lines(df):
    """One line per column and abbreviation of the summary."""
    _, base = with_speedup(df)
    copy = df["copy_gbps"].dropna() if "copy_gbps" in df else []
    copy = f" ({float(copy.iloc[0]):.1f} GB/s, measured at the run's start)" if len(copy) else ""
    per_group = len(set(zip(df["C"], df["H"], df["W"]))) * df["N"].nunique()
    lines = [
        "mode fusion dtype layout: the case above each block; impl: the implementation, "
        "backend: what actually ran",
        f"ok: rows without error / rows run (one per shape x batch size: {per_group})",
        "GB/s: median over those rows of minimal bytes / median time",
        f"%copy: GB/s as a percentage of the device's copy bandwidth{copy}"
        + ("; on a CPU small cases run from cache and can pass 100"
           if "device_type" in df and (df["device_type"] == "cpu").all() else ""),
        f"speedup: geometric mean over those rows of {base}'s time / this time"
        + (" (conv+cudnn's in conv_bn_eval)" if (df["mode"] == "conv_bn_eval").any() else ""),
        "worst_abs_err, worst_rel_l2: largest max-abs and relative-L2 error against float64, "
        "over the rows and y, dx, dweight, dbias, dresidual, running stats",
    ]
    if "triton_mode" in df and (df["triton_mode"] == "interpreter").any():
        lines.append("-: not measured (Triton through the interpreter is never timed; "
                     "errors only)")
    else:
        lines.append("-: not measured")
    return [textwrap.fill(line, 100, subsequent_indent="  ") for line in lines]


def format_summary(table, df=None):
    """The summary as text, at most about 100 columns: one block per (mode, fusion, dtype,
    layout), speeds and ratios to 3 significant digits, errors as %.1e.  With the run's
    rows `df`, a header naming the shapes and batch sizes and a legend of every column."""
    fmt = {c: _number("{:.3g}") for c in ("GB/s", "%copy", "speedup")}
    fmt.update({c: _number("{:.1e}") for c in ("worst_abs_err", "worst_rel_l2")})
    shown = table.rename(columns={"%copy_bw": "%copy"})
    cols = [c for c in shown.columns if c not in GROUP + ("over",)]
    cells = {c: [fmt.get(c, str)(v) for v in shown[c]] for c in cols}
    widths = {c: max([len(c)] + [len(v) for v in cells[c]]) for c in cols}
    left = ("impl", "backend", "ok")  # names left-aligned, numbers right-aligned

    def line(values):
        return " ".join(v.ljust(widths[c]) if c in left else v.rjust(widths[c])
                        for c, v in zip(cols, values)).rstrip()
    lines = [line(cols)] + [line(row) for row in zip(*(cells[c] for c in cols))]
    out = [] if df is None else sweep_lines(df) + [""]
    out.append("  " + lines[0])
    previous = None
    for key, line in zip(shown[list(GROUP)].itertuples(index=False, name=None), lines[1:]):
        if key != previous:
            out.append(" ".join(str(k) for k in key))
            previous = key
        out.append("  " + line)
    if df is not None:
        out += [""] + legend_lines(df)
    return "\n".join(out)
