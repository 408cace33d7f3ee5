"""What one measurement is: a case (mode, N, C, H, W, dtype, layout), and the bytes it must move.

Modes:
    eval           y = (x - running_mean) / sqrt(running_var + eps) * weight + bias
    train_fwd      batch statistics, y, running-stats update (inputs need no grad)
    train_fwd_bwd  train_fwd, then backward of y with a given dy: dx, dweight, dbias

Minimal bytes moved, the numerator of every GB/s figure (E = element size of the
input's dtype; the C-sized parameters and statistics are left out):
    eval           read x + write y                        = 2 * N*C*H*W * E
    train_fwd      read x + write y                        = 2 * N*C*H*W * E
    train_fwd_bwd  train_fwd + read x, read dy, write dx   = 5 * N*C*H*W * E
A kernel that reads x more than once (two-pass statistics read it three times)
moves more than this; the figure says how close it gets to the least possible.
"""

import itertools
import math
from dataclasses import dataclass

MODES = ("train_fwd", "train_fwd_bwd", "eval")
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
LAYOUTS = ("nchw", "nhwc")
ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
BYTES_FACTOR = {"eval": 2, "train_fwd": 2, "train_fwd_bwd": 5}


@dataclass(frozen=True)
class Case:
    """One input set: every implementation measured on it gives one row."""

    mode: str
    N: int
    C: int
    H: int
    W: int
    dtype: str
    layout: str

    @property
    def numel(self):
        return self.N * self.C * self.H * self.W

    @property
    def bytes_moved(self):
        """Minimal bytes the op moves (the module docstring gives the formula per mode)."""
        return BYTES_FACTOR[self.mode] * self.numel * ELEMENT_SIZE[self.dtype]

    @property
    def training(self):
        return self.mode != "eval"

    def describe(self):
        return f"{self.mode} {self.N}x{self.C}x{self.H}x{self.W} {self.dtype} {self.layout}"


def make_cases(modes, shapes, batch_sizes, dtypes, layouts):
    """All cases of the sweep: shapes in the given order, then batch size, dtype, layout, mode."""
    return [Case(mode, n, c, h, w, dtype, layout)
            for (c, h, w), n, dtype, layout, mode
            in itertools.product(shapes, sorted(batch_sizes), dtypes, layouts, modes)]


def gbps(case, ms):
    """Throughput in GB/s (1e9 bytes) of `case` done in `ms` milliseconds."""
    if ms is None or not math.isfinite(ms) or ms <= 0:
        return None
    return case.bytes_moved / (ms * 1e-3) / 1e9
