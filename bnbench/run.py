"""`bnbench run`: the sweep; one CSV row per implementation x case, a summary table, the plots.

Cases are mode x shape x batch size x dtype x layout x fusion (``bnbench.cases``);
the implementations are in ``bnbench.impls``; each case is run by ``bnbench.runner``.
The CSV goes to ``<out>/<name>.csv`` (default name ``run_<sweep>_<device>``, e.g.
``run_quick_cpu``), written row by row; the PNGs (``bnbench.plot``) beside it.  Without
``--out``, a file committed in the checkout is never replaced: the run then goes to
``results/local/`` and says so.

Presets (an option given on the command line wins over the preset):
    full   (default on a GPU) shapes resnet50, batch sizes 1,8,32,128,256,
           dtypes float32,float16,bfloat16, layouts nchw,nhwc, modes train_fwd,
           train_fwd_bwd, eval, fusion none
    quick  (--quick, and the default without a GPU) shapes quick, batch sizes 2,8,
           dtypes float32,bfloat16, layouts nchw,nhwc, the same modes, fusion none
The opt-in mode conv_bn_eval (conv then eval BN: what folding saves) and the fusions
relu and residual+relu run only when asked for (--modes, --fusions).

Without a GPU the Triton rows are checked through Triton's interpreter (numerics
only, time columns empty) and the CPU baselines are timed on ``--cpu-threads``
threads (1 by default).
"""

import sys
import textwrap
from pathlib import Path

from .arguments import choices, integers, positive, stem
from .cases import ALL_MODES, DTYPE_ALIASES, DTYPES, FUSIONS, LAYOUTS, MODES
from .environment import add_cpu_threads_argument
from .plot import KINDS
from .shapes import SHAPE_SETS, parse_shapes

DEFAULT_OUT = Path("results")
# `bnbench run --quick` measured on the 2-core CPU (README, "Benchmark: bnbench run")
QUICK_TIME = "about 1.5 min on a 2-core CPU"

PRESETS = {
    "full": dict(shapes=("resnet50", SHAPE_SETS["resnet50"]), batch_sizes=(1, 8, 32, 128, 256),
                 dtypes=DTYPES, layouts=LAYOUTS, modes=MODES, fusions=("none",)),
    "quick": dict(shapes=("quick", SHAPE_SETS["quick"]), batch_sizes=(2, 8),
                  dtypes=("float32", "bfloat16"), layouts=LAYOUTS, modes=MODES,
                  fusions=("none",)),
}


def add_parser(subparsers):
    from .impls import IMPLS

    p = subparsers.add_parser(
        "run", help="run the sweep: speed and numerical error of every implementation",
        description="Measure the Triton BatchNorm kernels against cuDNN, native PyTorch and "
                    "torch.compile: time, GB/s, peak memory and error against float64, over "
                    "modes x shapes x batch sizes x dtypes x layouts. Without a GPU the Triton "
                    "kernels run through Triton's interpreter for their numerics only.")
    p.add_argument("--quick", action="store_true",
                   help=f"a small sweep ({QUICK_TIME}); the default without a GPU")
    p.add_argument("--shapes", type=parse_shapes, metavar="SHAPES",
                   help=f"shape sets ({', '.join(SHAPE_SETS)}) and/or CxHxW, comma-separated, "
                        "e.g. 64x56x56,256x14x14 (default: resnet50; quick with --quick)")
    p.add_argument("--batch-sizes", type=integers("batch sizes", "1,8,32"), metavar="N,N,...",
                   help="batch sizes (default: 1,8,32,128,256; 2,8 with --quick); on a GPU, "
                        "cases that would not fit in memory are skipped")
    p.add_argument("--dtypes", type=choices("dtypes", DTYPES, DTYPE_ALIASES),
                   metavar="DTYPES",
                   help=f"from {', '.join(DTYPES)} (default: all; float32,bfloat16 with --quick)")
    p.add_argument("--layouts", type=choices("layouts", LAYOUTS), metavar="LAYOUTS",
                   help="nchw and/or nhwc (channels_last) (default: both)")
    p.add_argument("--modes", type=choices("modes", ALL_MODES), metavar="MODES",
                   help=f"from {', '.join(ALL_MODES)} (default: {','.join(MODES)}; "
                        "conv_bn_eval times a 3x3 conv then the eval BN, unfolded and folded)")
    p.add_argument("--fusions", type=choices("fusions", FUSIONS), metavar="FUSIONS",
                   help=f"what follows the BN, from {', '.join(FUSIONS)} (default: none); "
                        "act(bn(x) [+ r]), act relu or silu, in one Triton kernel, as torch "
                        "ops in the baselines (F.batch_norm, then y += r, then relu_/F.silu)")
    p.add_argument("--impls", type=choices("implementations", tuple(IMPLS)), metavar="IMPLS",
                   help=f"from {', '.join(IMPLS)} (default: all that apply; cudnn only on a GPU)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: results/; in a checkout, results/local/ "
                        "where results/ holds a committed file of the same name)")
    p.add_argument("--name", type=stem, default=None,
                   help="file name stem (default: run_<sweep>_<device>, e.g. run_quick_cpu)")
    p.add_argument("--warmup-ms", type=positive, default=25.0, help="warm-up time per row")
    p.add_argument("--rep-ms", type=positive, default=100.0, help="timed repetitions per row")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs")
    add_cpu_threads_argument(p)
    p.add_argument("--no-plots", action="store_true", help="write the CSV and table only")
    p.add_argument("--fail-on-error", action="store_true",
                   help="exit with status 1 if any row failed (for CI)")
    p.set_defaults(func=run_command)


def resolve(args, device):
    """The sweep's settings: the preset, overridden by the options given; and its label."""
    quick = args.quick or device != "cuda"
    preset = PRESETS["quick" if quick else "full"]
    settings = {key: getattr(args, key) or value for key, value in preset.items()}
    label = "quick" if quick and args.shapes is None else settings["shapes"][0]
    settings["shapes"] = settings["shapes"][1]
    return settings, label


def method(device, interpreted):
    """The CSV's ``method``: how ``bnbench run``'s runner (also gpu-day's) got its numbers."""
    if device == "cuda":
        timer = "triton.testing.do_bench (CUDA events, L2 flushed before each call)"
    else:
        timer = "time.perf_counter (do_bench's protocol, no cache flush)"
    triton = ("Triton rows through the interpreter, untimed" if interpreted
              else "Triton rows compiled")
    return f"median of repetitions, {timer}; {triton}; errors against a float64 reference"


def run_command(args):
    """Run the sweep; return 0 (1 with --fail-on-error if a row failed, 130 if interrupted,
    2 with one line on stderr if --out cannot be written)."""
    from . import environment

    out = args.out or DEFAULT_OUT
    try:
        environment.output_dir(out)
    except environment.OutputError as exc:
        print(f"bnbench run: error: {exc}", file=sys.stderr)
        return 2
    import torch
    from tqdm import tqdm

    import kernels

    from . import impls, report, runner, timing
    from .cases import make_cases

    device = "cuda" if torch.cuda.is_available() else "cpu"
    interpreted = bool(kernels.INTERPRETED)
    settings, label = resolve(args, device)
    chosen = [impls.IMPLS[name] for name in (args.impls or impls.default_impls(device))]
    cases = make_cases(settings["modes"], settings["shapes"], settings["batch_sizes"],
                       settings["dtypes"], settings["layouts"], settings["fusions"])
    total = sum(case.mode in impl.modes for case in cases for impl in chosen)
    if total == 0:
        print(f"bnbench run: error: none of the implementations "
              f"{','.join(impl.name for impl in chosen)} runs the modes "
              f"{','.join(settings['modes'])} (see 'bnbench run --help')", file=sys.stderr)
        return 2

    environment.set_cpu_threads(device, args.cpu_threads)
    tf32 = environment.pin_tf32()
    run_fields = environment.metadata(device, interpreted=interpreted, tf32=tf32,
                                      method=method(device, interpreted))
    run_fields["copy_gbps"] = timing.copy_bandwidth(device)
    opts = runner.Options(device=device, interpreted=interpreted, warmup_ms=args.warmup_ms,
                          rep_ms=args.rep_ms, seed=args.seed, copy_gbps=run_fields["copy_gbps"])

    name = args.name or f"run_{label}_{environment.device_slug(device)}"
    out, note = environment.keep_committed(
        out, [f"{name}.csv"] + [f"{name}_{kind}.png" for kind in KINDS],
        explicit=args.out is not None, local=DEFAULT_OUT / "local")
    if note:
        try:
            environment.output_dir(out)
        except environment.OutputError as exc:
            print(f"bnbench run: error: {exc}", file=sys.stderr)
            return 2
        print(f"bnbench run: {note}", flush=True)
    csv_path = out / f"{name}.csv"
    replaces = " (replacing the one there)" if csv_path.exists() else ""
    print(textwrap.fill(
        f"bnbench run: {len(cases)} cases, {total} rows on {run_fields['device']} "
        f"(Triton {run_fields['triton_mode']}, TF32 {tf32}, copy bandwidth "
        f"{run_fields['copy_gbps']:.1f} GB/s) -> {csv_path}{replaces}", 100,
        subsequent_indent="  ", break_on_hyphens=False, break_long_words=False), flush=True)

    with report.CsvWriter(csv_path, run_fields) as writer, \
            tqdm(total=total, desc="bnbench run", unit="row", file=sys.stderr) as bar:
        try:
            for case in cases:
                bar.set_postfix_str(case.describe(), refresh=False)
                for row in runner.run_case(case, chosen, opts):
                    writer.write(row)
                    bar.update()
        except KeyboardInterrupt:
            bar.close()
            print(f"\nbnbench run: interrupted; the {writer.rows} rows done are in {csv_path}",
                  flush=True)
            return 130

    df = report.read(csv_path)
    print()
    print(report.format_summary(report.summary(df), df))
    failed = df[df["status"] == "error"]
    skipped = df[df["status"] == "skipped"]
    print(f"\n{len(df)} rows in {csv_path}: {len(df) - len(failed) - len(skipped)} ok, "
          f"{len(failed)} failed, {len(skipped)} skipped (see the error column)")
    not_cudnn = df[(df["impl"] == "cudnn") & (df["status"] == "ok") & (df["backend"] != "cudnn")]
    if len(not_cudnn):
        print(f"{len(not_cudnn)} cudnn rows did not run cuDNN (PyTorch routed them elsewhere; "
              f"see the backend column): they are left out of the speed-ups over cuDNN")
    if not args.no_plots:
        from .plot import draw

        for path in draw(csv_path):
            print(f"wrote {path}")
    return 1 if args.fail_on_error and len(failed) else 0
