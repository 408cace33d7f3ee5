"""`bnbench train`: the seeds' with-and-without-BatchNorm experiments, trained with these kernels.

The command (:func:`train_command`; also ``python -m bnbench.train``), its parts in modules
of their own, whose names this module also holds (``from bnbench import train`` reaches them
all): ``bnbench.train_data`` (the digits and their split), ``bnbench.train_models`` (the two
experiments, their variants and networks), ``bnbench.train_loop`` (the training loop, in one
process or over several, the loss surface, and the metrics the CSV records),
``bnbench.train_report`` (the summary and the PNGs, from the CSV alone); the options are
``bnbench.train_args``'s (no torch), ``--nproc`` is ``bnbench.train_dist``'s.

Without CUDA the kernels run through Triton's interpreter, whose time goes on Python work per
program and per tile.  The launches are then planned for it (``kernels.set_interpreter_plans``:
the same kernels in a few programs with large tiles; column ``kernel_plans`` =
``interpreter-fast``): a training step of the three-conv network (batch 32) takes about 1.5 s on
a 2-core CPU, against about 35 s with the 512-program plans of an H100 (``--gpu-plans``) and
15 ms with torch's BatchNorm.  ``--kernel-steps`` can stop the kernels variants after their
first steps (the same batches the torch variants start with), and ``--quick`` trains on 10
images for one epoch, into ``results/train_quick/`` (never over the full run's
``results/train/``).  A progress bar on stderr counts each variant's steps.
"""

import argparse
import csv
import math
import time

from .environment import STAMP_COLUMNS
from .train_args import (QUICK, QUICK_OUT, FULL_OUT, LOCAL_ROOT, SEED,  # noqa: F401
                         add_arguments, add_parser)
from .train_data import SPLIT_SEED, TEST_FRACTION, load_digits_split  # noqa: F401
from .train_loop import (EPOCH_METRICS, ROW_FIELDS, _check_kernels_run,  # noqa: F401
                         _distribute, _distributed_step, _grid_range, _sampled_weights,
                         accuracy, loss_surface, train_variant)
from .train_models import (EXPERIMENTS, Experiment, bn_kind, build_model,  # noqa: F401
                           lenet_bn, three_convs, variant_stats)
from .train_report import (PNG_NAMES, STYLE, TITLES, _footer, _read, _save,  # noqa: F401
                           _style, _tidy, draw, step_loss_gap, summary)

SURFACE_SAMPLES = 256  # training images the loss surface is computed on
FULL_GRID = 21

RUN_FIELDS = STAMP_COLUMNS + ("kernel_plans", "nproc")
COLUMNS = RUN_FIELDS + ROW_FIELDS
METHOD = ("training on scikit-learn's digits, losses and accuracies as computed in the loop; "
          "epoch times time.perf_counter wall time")


# ---------------------------------------------------------------------------------------------
# the command

def plan(args):
    """What the command runs: [(experiment, variant, epochs, max_steps)], data sizes, grid."""
    quick = QUICK if args.quick else {}
    epochs = {"three_convs": args.epochs or quick.get("epochs"),
              "lenet_bn": args.lenet_epochs or quick.get("lenet_epochs")}
    runs = []
    for name, experiment in EXPERIMENTS.items():
        for variant in experiment.variants:
            max_steps = args.kernel_steps if bn_kind(variant) == "kernels" else None
            if max_steps != 0:
                runs.append((experiment, variant, epochs[name] or experiment.epochs, max_steps))
    sizes = dict(train_size=args.train_size or quick.get("train_size"),
                 test_size=args.test_size or quick.get("test_size"))
    return runs, sizes, quick.get("grid", FULL_GRID)


TRAIN_BANNER = (
    "bnbench train: no CUDA GPU found. The kernels variants run the Triton kernels through "
    "Triton's interpreter (fast interpreter plans unless --gpu-plans): their losses and "
    "accuracies are the kernels' own, their step times are the interpreter's, not kernel speeds.")


def train_command(args):
    """Train every variant, write <out>/train.csv and the PNGs, print the summary; return 0
    (2 with one line on stderr if --out cannot be written)."""
    import sys

    from tqdm import tqdm

    from . import environment
    from .cli import prepare_device
    from .report import cell

    out = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    out, note = environment.keep_committed(out, ["train.csv", *PNG_NAMES],
                                           explicit=args.out is not None,
                                           local=LOCAL_ROOT / out.name)
    try:
        environment.output_dir(out)
    except environment.OutputError as exc:
        print(f"bnbench train: error: {exc}", file=sys.stderr)
        return 2
    device = prepare_device(TRAIN_BANNER)
    if note:
        print(f"bnbench train: {note}", flush=True)
    import kernels

    runs, sizes, grid = plan(args)
    if args.nproc > 1:  # seed 000 over processes; torch's SyncBatchNorm needs CUDA
        runs = [r for r in runs if r[0].name == "three_convs"
                and (bn_kind(r[1]) != "torch" or device == "cuda")]
    environment.set_cpu_threads(device, args.cpu_threads)
    tf32 = environment.pin_tf32() if device == "cuda" else None
    run_fields = environment.metadata(device, interpreted=bool(kernels.INTERPRETED), tf32=tf32,
                                      method=METHOD)
    fast_plans = device == "cpu" and not args.gpu_plans
    kernels.set_interpreter_plans(fast_plans)
    run_fields["kernel_plans"] = "interpreter-fast" if fast_plans else "gpu"
    run_fields["nproc"] = args.nproc
    csv_path = out / "train.csv"
    data = {name: load_digits_split(exp.image_size, **sizes) for name, exp in EXPERIMENTS.items()}
    replaces = " (replacing the one there)" if csv_path.exists() else ""
    print(f"bnbench train: {len(data['three_convs'][1])} training / "
          f"{len(data['three_convs'][3])} test digits; device {run_fields['device']}, "
          f"Triton {run_fields['triton_mode']}, {run_fields['kernel_plans']} plans "
          f"-> {csv_path}{replaces}", flush=True)
    eval_steps = {args.kernel_steps} if args.kernel_steps else set()
    wall = time.perf_counter()
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()

        def write(row):
            writer.writerow({**run_fields, **{k: cell(v, 8) for k, v in row.items()}})
            f.flush()

        for experiment, variant, epochs, max_steps in runs:
            start = time.perf_counter()
            n_train = len(data[experiment.name][1])
            steps = epochs * math.ceil(n_train / experiment.batch_size)
            if args.nproc > 1:
                from .train_dist import train_variant_distributed

                model, rows = None, train_variant_distributed(dict(
                    experiment=experiment.name, variant=variant, epochs=epochs,
                    max_steps=max_steps, sizes=sizes, seed=args.seed, device=device,
                    interpret=bool(kernels.INTERPRETED), fast_plans=fast_plans,
                    threads=args.cpu_threads), args.nproc)
                for row in rows:
                    write(row)
            else:
                with tqdm(total=min(steps, max_steps or steps), unit="step", file=sys.stderr,
                          desc=f"{experiment.name} {variant}", leave=False) as bar:
                    model, rows = train_variant(
                        experiment, variant, data[experiment.name], epochs, device, args.seed,
                        max_steps=max_steps, eval_steps=eval_steps, on_row=write,
                        on_step=lambda epoch: (bar.update(), bar.set_postfix(epoch=epoch)))
            last = {r["metric"]: r for r in rows}
            done = (f"{last['test_acc']['epoch']} epochs, test acc {last['test_acc']['value']:.1f}%"
                    if "test_acc" in last else "no full epoch")
            print(f"  {experiment.name:<12} {variant:<20} {last['step_loss']['step']:>5} steps "
                  f"{time.perf_counter() - start:8.1f} s  {done}", flush=True)
            if model is not None and experiment.sampled_weights and bn_kind(variant) in (
                    "none", "torch"):
                path = [r for r in rows if r["metric"] == "step_loss"]
                x_train, y_train = (t[:SURFACE_SAMPLES].to(device)
                                    for t in data[experiment.name][:2])
                for w1, w2, loss in loss_surface(
                        model, experiment, x_train, y_train,
                        _grid_range([r["w1"] for r in path]),
                        _grid_range([r["w2"] for r in path]), grid):
                    write(dict(experiment=experiment.name, variant=variant, bn=bn_kind(variant),
                               epoch=path[-1]["epoch"], step=path[-1]["step"],
                               metric="surface_loss", value=loss, w1=w1, w2=w2))
    total = time.perf_counter() - wall
    for path in draw(csv_path, out):
        print(f"wrote {path}")
    print(f"wrote {csv_path}")
    print(summary(csv_path).to_string(index=False))
    print(f"total wall time {total:.0f} s")
    return 0


def main(argv=None):
    """``python -m bnbench.train [options]``: the same command outside the ``bnbench`` CLI."""
    parser = argparse.ArgumentParser(prog="bnbench train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return train_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
