"""The summary table and the figures of ``bnbench train``, from its CSV alone.

The PNGs are drawn from the CSV alone (:func:`draw`): ``test_accuracy.png`` and
``train_loss.png`` (the seed's figures 6 and 7, one line per variant) and ``weight_path.png``
(figure 8: the path of (w1, w2) over the contours of ``surface_loss``, no BN against BN).
"""

from pathlib import Path

from .train_models import EXPERIMENTS, bn_kind

PNG_NAMES = ("test_accuracy.png", "train_loss.png", "step_loss.png", "weight_path.png")


def _read(csv_path):
    import pandas as pd

    return pd.read_csv(csv_path)


def step_loss_gap(df, experiment, variant):
    """Largest relative difference of `variant`'s step losses from torch_bn's at the same
    steps (NaN when either has no steps)."""
    steps = df[(df.experiment == experiment) & (df.metric == "step_loss")]
    ours = steps[steps.variant == variant].set_index("step").value
    ref = steps[steps.variant == "torch_bn"].set_index("step").value
    common = ours.index.intersection(ref.index)
    if len(common) == 0:
        return float("nan")
    return float(((ours[common] - ref[common]).abs() / ref[common].abs()).max())


def summary(csv_path):
    """One row per (experiment, variant): steps, last full epoch's figures, the test accuracy
    where the kernels variants stop, the step-loss gap to torch_bn, seconds per step."""
    import pandas as pd

    df = _read(csv_path)
    out = []
    for experiment, exp in EXPERIMENTS.items():
        for variant in exp.variants:
            rows = df[(df.experiment == experiment) & (df.variant == variant)]
            if rows.empty:
                continue

            def last(metric):
                m = rows[rows.metric == metric].sort_values("step")
                return m.value.iloc[-1] if len(m) else float("nan")

            epochs = rows[rows.metric == "test_acc"]
            out.append({
                "experiment": experiment, "variant": variant,
                "steps": int(rows[rows.metric == "step_loss"].step.max()),
                "epochs": int(epochs.epoch.max()) if len(epochs) else 0,
                "train_loss": round(last("train_loss"), 4),
                "train_acc": round(last("train_acc"), 1),
                "test_acc": round(last("test_acc"), 1),
                "best_test_acc": round(epochs.value.max(), 1) if len(epochs) else float("nan"),
                "test_acc_at_step": (f"{last('test_acc_at_step'):.1f} @ "
                                     f"{int(rows[rows.metric == 'test_acc_at_step'].step.max())}"
                                     if (rows.metric == "test_acc_at_step").any() else ""),
                "step_loss_gap": (f"{step_loss_gap(df, experiment, variant):.1e}"
                                  if bn_kind(variant) == "kernels" else ""),
                "s_per_step": round(last("step_time_s"), 3),
            })
    return pd.DataFrame(out)


# every variant with a marker (a one-epoch run draws points, not lines), big hollow ones
# under small filled ones, so that variants with equal values stay visible
STYLE = {"no_bn": dict(color="tab:red", marker="s", ms=6),
         "torch_bn": dict(color="tab:blue", marker="o", ms=9, mfc="none"),
         "kernels_two_pass": dict(color="tab:orange", ls="--", marker="o", ms=4),
         "kernels_single_pass": dict(color="tab:green", ls=":", marker="x", ms=6)}


def _style(variant, points):
    """STYLE, with a marker on about 40 of the `points` of a long series."""
    return dict(STYLE[variant], markevery=max(1, points // 40))


def _tidy(ax, integer_x=False):
    """Plain tick labels (no offset such as 1e-7+2.516149), integer epochs, and some room
    around a single point or a flat line."""
    from matplotlib.ticker import MaxNLocator

    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        values = [v for line in ax.get_lines() for v in line.get_ydata()]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        if hi - lo < 1e-3 * max(abs(hi), 1e-12):
            pad = max(0.05 * abs(hi), 1e-3)
            ax.set_ylim(lo - pad, hi + pad)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        xs = [x for line in ax.get_lines() for x in line.get_xdata()]
        if xs and min(xs) == max(xs):
            ax.set_xlim(min(xs) - 1, max(xs) + 1)
TITLES = {"three_convs": "seed 000: three convs, SGD lr 0.001, batch 32",
          "lenet_bn": "seed 002: LeNet + BN, sigmoid, SGD lr 1.0, batch 256"}


def _footer(fig, df):
    first = df.iloc[0]
    fig.text(0.01, 0.005, f"{first.device} | torch {first.torch_version} | triton "
             f"{first.triton_version} ({first.triton_mode}, {first.kernel_plans} plans) | "
             f"commit {str(first.git_commit)[:12]} | {first.timestamp}", fontsize=7, color="gray")


def _save(fig, df, path):
    _footer(fig, df)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def draw(csv_path, out_dir):
    """Draw test_accuracy.png, train_loss.png, step_loss.png and weight_path.png from the CSV
    at `csv_path` alone; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    df = _read(csv_path)
    out_dir = Path(out_dir)
    paths = []
    # the seed's figures 6 and 7: one line per variant, over its full epochs
    for metric, label, name in (("test_acc", "test accuracy (%)", "test_accuracy.png"),
                                ("train_loss", "train loss", "train_loss.png")):
        fig, axes = plt.subplots(1, len(EXPERIMENTS), figsize=(12, 4.5), squeeze=False)
        for ax, experiment in zip(axes[0], EXPERIMENTS):
            sub = df[(df.experiment == experiment) & (df.metric == metric)]
            for variant in EXPERIMENTS[experiment].variants:
                line = sub[sub.variant == variant].sort_values("epoch")
                if len(line):
                    ax.plot(line.epoch, line.value, label=variant, **_style(variant, len(line)))
            ax.set(title=TITLES[experiment], xlabel="epoch", ylabel=label)
            _tidy(ax, integer_x=True)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        paths.append(_save(fig, df, out_dir / name))

    # every step: the loss (top) and the kernels' relative gap to torch_bn (bottom)
    steps = df[df.metric == "step_loss"]
    fig, axes = plt.subplots(2, len(EXPERIMENTS), figsize=(12, 7), squeeze=False,
                             sharex="col")
    for col, experiment in enumerate(EXPERIMENTS):
        sub = steps[steps.experiment == experiment]
        kernel_steps = sub[sub.bn == "kernels"].step
        shown = sub[sub.step <= (kernel_steps.max() if len(kernel_steps) else sub.step.max())]
        ref = shown[shown.variant == "torch_bn"].set_index("step").value
        for variant in EXPERIMENTS[experiment].variants:
            line = shown[shown.variant == variant].sort_values("step")
            if line.empty:
                continue
            axes[0, col].plot(line.step, line.value, label=variant,
                              **_style(variant, len(line)))
            if bn_kind(variant) == "kernels" and len(ref):
                gap = (line.set_index("step").value - ref).abs() / ref.abs()
                axes[1, col].semilogy(gap.index, gap.clip(lower=1e-12).values, label=variant,
                                      **_style(variant, len(gap)))
        axes[0, col].set(title=TITLES[experiment], ylabel="training loss of the batch")
        axes[1, col].axhline(0.01, color="gray", lw=0.8, ls="--")
        axes[1, col].set(xlabel="step", ylabel="|kernels - torch_bn| / torch_bn (0 at 1e-12)")
        _tidy(axes[0, col], integer_x=True)
        axes[1, col].xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    paths.append(_save(fig, df, out_dir / "step_loss.png"))

    # the seed's figure 8: two weights of the last conv over the loss surface
    steps = steps[steps.experiment == "three_convs"]
    surface = df[(df.experiment == "three_convs") & (df.metric == "surface_loss")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), squeeze=False)
    panels = (("no_bn", ()), ("torch_bn", ("kernels_two_pass", "kernels_single_pass")))
    for ax, (variant, overlays) in zip(axes[0], panels):
        grid = surface[surface.variant == variant].pivot_table(index="w2", columns="w1",
                                                               values="value")
        if len(grid):
            cs = ax.contourf(grid.columns, grid.index, grid.values, levels=20, cmap="viridis")
            fig.colorbar(cs, ax=ax, label="train loss, other weights at their final values")
        for v in (variant, *overlays):
            path = steps[steps.variant == v].sort_values("step")
            if path.empty:
                continue
            style = {k: val for k, val in STYLE[v].items() if k not in ("marker", "ms")}
            ax.plot(path.w1, path.w2, label=f"{v} ({len(path)} steps)", lw=1.0, **style)
        path = steps[steps.variant == variant].sort_values("step")
        if len(path):
            ax.plot(path.w1.iloc[0], path.w2.iloc[0], "o", color="white", mec="black")
            ax.plot(path.w1.iloc[-1], path.w2.iloc[-1], "*", color="white", mec="black", ms=12)
        ax.set(title=f"three convs, {'no BN' if variant == 'no_bn' else 'with BN'}: two "
                     f"last-conv weights, step by step (o start, * end of {variant})",
               xlabel="w1 = conv3.weight[3, 13, 1, 0]", ylabel="w2 = conv3.weight[3, 14, 1, 0]")
        ax.title.set_fontsize(9)
        ax.ticklabel_format(useOffset=False)
        ax.legend(fontsize=8, loc="best")
    paths.append(_save(fig, df, out_dir / "weight_path.png"))
    return paths
