"""The torch and Triton versions the kernels need, checked when ``kernels`` is imported.

Floors, from what the code uses (README, "Supported versions", has the tested matrix):

* torch >= 2.7: the ops are ``torch.library.custom_op`` with ``register_fake`` (torch 2.4+),
  and their schemas are inferred from annotations with builtin generics (``list[bool]``,
  ``tuple[Tensor, ...]``): torch 2.5 and 2.6 reject ``list[bool]`` ("Parameter grad_mask
  has unsupported type list[bool]"); 2.7 accepts it.
* triton >= 3.3: the release torch 2.7 is built against, and the oldest tested; Triton's
  interpreter and launch internals this touches changed from 3.3 to 3.4 and 3.7, and are
  adapted to each in one module (``kernels._triton_internals``, checked against 3.3.1, 3.6.0
  and 3.9.0; ``bnbench.aot`` compiles through it). Older releases are not tested.

A version below a floor raises ImportError naming both versions, instead of an error from
deep inside torch.library or the interpreter.
"""

import importlib.metadata
import re

TORCH_FLOOR = (2, 7)
TRITON_FLOOR = (3, 3)


def parse(version):
    """(major, minor) of a version string such as "2.11.0+cu130" or "3.6.0"; (0, 0) if none."""
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def problems(torch_version, triton_version):
    """The floors the given versions miss, as sentences (empty when both are met)."""
    out = []
    if parse(torch_version) < TORCH_FLOOR:
        out.append(f"torch >= {'.'.join(map(str, TORCH_FLOOR))} (found {torch_version}): "
                   "custom_op schemas with list[bool]")
    if triton_version is not None and parse(triton_version) < TRITON_FLOOR:
        out.append(f"triton >= {'.'.join(map(str, TRITON_FLOOR))} (found {triton_version})")
    return out


def check():
    """Raise ImportError if the installed torch or triton is below its floor."""
    import torch

    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None  # the kernels' own import of triton says so
    missing = problems(torch.__version__, triton_version)
    if missing:
        raise ImportError("bnbench's kernels need " + " and ".join(missing)
                          + "; see the README's 'Supported versions'")
