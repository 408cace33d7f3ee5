"""The `bnbench` command line.

Each command lives in ``bnbench/<name>.py``, named in ``COMMANDS``; the module exposes
``add_parser(subparsers)``, which adds its subparser and calls
``set_defaults(func=...)``: ``func(args)`` runs the command and returns the exit status.
A command that measures nothing on a device (``plot``) also sets ``uses_device=False``.
Building the parser imports no torch, triton, pandas or matplotlib, so ``--help`` and
argument errors answer at once: a command module imports those inside its functions, or
keeps its parser in a light module named in ``PARSER_MODULES`` (``train``).

Before a command runs, and so before anything imports triton, ``main`` checks for a CUDA
device.  Without one it sets ``TRITON_INTERPRET=1`` (the Triton kernels then run through
Triton's interpreter, for their numerics only) and, for device commands, prints a banner:
no speed comparison is possible without a GPU.

Bad arguments exit with status 2 and one line on stderr, never a traceback; so does a
command that needs Triton internals this Triton does not have
(``kernels._triton_internals.TritonInternalsUnavailable``: ``unavailable: <reason>``).
"""

import argparse
import importlib
import os
import sys
import textwrap

COMMANDS = ["run", "plot", "traffic", "inspect", "train", "gpu-day", "zoo", "comm", "overhead"]
# commands whose module imports torch at the top keep their parser elsewhere
PARSER_MODULES = {"train": "train_args", "gpu-day": "gpuday"}

BANNER = (
    "bnbench: no CUDA GPU found. The Triton kernels run through Triton's interpreter "
    "(TRITON_INTERPRET=1) for their numerical error only: their time columns stay empty and "
    "no speed comparison is possible without a GPU. CPU baselines are timed on the CPU."
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: message``, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser():
    """The top-level parser, with one subparser per module in COMMANDS."""
    parser = ArgumentParser(
        prog="bnbench",
        description="Triton BatchNorm2d kernels held against cuDNN, native PyTorch and "
                    "torch.compile: speed and numerical error.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = PARSER_MODULES.get(name, name)
        importlib.import_module(f"bnbench.{module}").add_parser(subparsers)
    return parser


def prepare_device(banner=BANNER):
    """Return "cuda" or "cpu"; without CUDA, turn Triton's interpreter on and print `banner`
    (the command's own: ``bnbench train`` has another).

    Must run before triton is first imported: the interpreter is chosen at import time.
    """
    import torch

    if torch.cuda.is_available():
        return "cuda"
    os.environ["TRITON_INTERPRET"] = "1"
    if banner:
        print(textwrap.fill(banner, 100), flush=True)
    return "cpu"


def main(argv=None):
    """Parse `argv` (default: sys.argv[1:]), run the command, return its exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "uses_device", True):
        prepare_device()
    try:
        return args.func(args)
    except RuntimeError as e:
        internals = sys.modules.get("kernels._triton_internals")  # imported if it raised
        if internals is None or not isinstance(e, internals.TritonInternalsUnavailable):
            raise
        print(f"bnbench {args.command}: unavailable: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
