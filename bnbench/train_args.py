"""The options of `bnbench train`, apart from ``bnbench.train`` so that building the parser
(``bnbench --help``, ``bnbench train --help``, argument errors) imports no torch.

``bnbench.train`` holds the experiments and imports torch; it is imported only when the
command runs.
"""

from pathlib import Path

from .arguments import nonnegative_int as _nonnegative_int, positive_int as _positive_int

SEED = 5842  # the seed article's set_seed(5842)
QUICK = dict(train_size=10, test_size=10, epochs=1, lenet_epochs=1, grid=7)
# `bnbench train --quick` measured on the 2-core CPU (README, "The seeds' experiments")
QUICK_TIME = "about 15 s on a 2-core CPU"
FULL_OUT = Path("results/train")
QUICK_OUT = Path("results/train_quick")  # a quick run never replaces the full run's files
# without --out, committed files are never replaced: the run goes to results/local/<name>
LOCAL_ROOT = Path("results/local")


def add_arguments(p):
    """The options of `bnbench train` (shared by the CLI subparser and ``python -m``)."""
    from .environment import add_cpu_threads_argument

    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {QUICK['train_size']} training and {QUICK['test_size']} "
                        f"test images (one step per epoch), {QUICK['epochs']} epoch, a "
                        f"{QUICK['grid']}x{QUICK['grid']} loss grid ({QUICK_TIME}); written "
                        f"to {QUICK_OUT}/ unless --out is given")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs of three_convs (default 30, the seed's; 1 with --quick)")
    p.add_argument("--lenet-epochs", type=_positive_int, default=None,
                   help="epochs of lenet_bn (default 10, the seed's; 1 with --quick)")
    p.add_argument("--kernel-steps", type=_nonnegative_int, default=None,
                   help="stop the kernels variants after this many steps, the first batches "
                        "the torch variants see (default: no limit; 0 leaves them out). "
                        "Through Triton's interpreter a three_convs step takes about 1.5 s")
    p.add_argument("--gpu-plans", action="store_true",
                   help="through the interpreter, launch the kernels with the programs and "
                        "tiles an H100 would get (about 35 s a three_convs step) instead of "
                        "few programs with large tiles (the default without CUDA)")
    p.add_argument("--train-size", type=_positive_int, default=None,
                   help="train on a stratified subset of this many images (default: all 1437)")
    p.add_argument("--test-size", type=_positive_int, default=None,
                   help="test on a stratified subset of this many images (default: all 360)")
    p.add_argument("--seed", type=int, default=SEED,
                   help=f"seed of the initial weights and the data order (default {SEED})")
    add_cpu_threads_argument(p)
    p.add_argument("--nproc", type=_positive_int, default=1,
                   help="train seed 000's experiment over this many processes with "
                        "torch.distributed (gloo on a CPU, NCCL with one GPU each), the batch "
                        "split between them, BatchNorm as kernels.SyncBatchNorm under "
                        "DistributedDataParallel; variants no_bn and kernels_* (torch_bn too "
                        "on GPUs); default 1")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder for train.csv and the PNGs (default: {FULL_OUT}; "
                        f"{QUICK_OUT} with --quick; in a checkout, {LOCAL_ROOT}/<that name> "
                        "where the default holds committed files)")


def _train_command(args):
    from .train import train_command  # torch is imported here, when the command runs

    return train_command(args)


def add_parser(subparsers):
    p = subparsers.add_parser(
        "train", help="train the seeds' CNNs with and without BatchNorm (torch's and the kernels')",
        description="Reproduce the seed articles' with-and-without-BatchNorm experiments on "
                    "scikit-learn's digits: seed 000's three-conv network (no BN, torch BN, "
                    "kernels two-pass and single-pass) and seed 002's LeNet with BN (torch BN, "
                    "kernels). Writes train.csv, four PNGs and a summary table.")
    add_arguments(p)
    # train sets up the device itself (its own banner), also under `python -m bnbench.train`
    p.set_defaults(func=_train_command, uses_device=False)
