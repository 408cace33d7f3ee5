"""What one measurement is: a case (mode, N, C, H, W, dtype, layout, fusion), and its bytes.

The modes, their ops, the fusions (``kernels.Epilogue`` values) and the minimal bytes each
op moves are declared once, in ``bnbench.registry``; this module names a point of the
sweep and turns those figures into bytes.

Minimal bytes moved, the numerator of every GB/s figure (E = element size of the input's
dtype, M = N*C*H*W; the C-sized parameters and statistics are left out): the mode's ops'
minimal x-sized tensors (``registry.Mode.elements``) times M * E, and in conv_bn_eval
the conv weight (9 * C*C * E):
    eval, train_fwd   read x + write y                        = 2 * M * E
    train_fwd_bwd     train_fwd + read x, read dy, write dx   = 5 * M * E
    conv_bn_eval      eval + read the conv weight             = 2 * M * E + 9 * C*C * E
residual+relu and residual+silu add the read of r (+ M * E), and in train_fwd_bwd the
write of dr (+ M * E more: 7 * M * E).  relu and silu add nothing: without a residual
their backward recomputes z from x; with one, this project's backward reads y (relu) or
r (silu) again, which is not counted (``registry``'s recompute elements).
A kernel that reads x more than once (two-pass statistics read it three times)
moves more than this; the figure says how close it gets to the least possible.
conv_bn_eval is bound by the conv's 18 * M * C flops, not by memory: compare its
times; its GB/s is given for completeness.
"""

import itertools
import math
from dataclasses import dataclass

from . import registry

ALL_MODES = tuple(registry.MODES)
MODES = tuple(m.name for m in registry.MODES.values() if m.default)  # the default sweep
FUSIONS = registry.HARNESS_FUSIONS
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
LAYOUTS = registry.LAYOUTS
ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
CONV_KERNEL = 3  # conv_bn_eval's conv: CONV_KERNEL x CONV_KERNEL, padding CONV_KERNEL // 2


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
    fusion: str = "none"

    @property
    def numel(self):
        return self.N * self.C * self.H * self.W

    @property
    def spec(self):
        """The mode's description (``registry.Mode``)."""
        return registry.MODES[self.mode]

    @property
    def epilogue(self):
        """The fusion as ``kernels.Epilogue``."""
        return registry.epilogues((self.fusion,))[0]

    @property
    def residual(self):
        """A residual tensor is added before the activation."""
        return self.epilogue.residual

    @property
    def conv(self):
        """A conv runs before the batch norm (conv_bn_eval)."""
        return self.spec.conv

    @property
    def bytes_moved(self):
        """Minimal bytes the op moves (the module docstring gives the formula per mode)."""
        weights = CONV_KERNEL * CONV_KERNEL * self.C * self.C if self.conv else 0
        return ((self.spec.elements(self.epilogue) * self.numel + weights)
                * ELEMENT_SIZE[self.dtype])

    @property
    def training(self):
        return self.spec.training

    def describe(self):
        fusion = "" if self.fusion == "none" else f" +{self.fusion}"
        return (f"{self.mode} {self.N}x{self.C}x{self.H}x{self.W} {self.dtype} {self.layout}"
                f"{fusion}")


def make_cases(modes, shapes, batch_sizes, dtypes, layouts, fusions=("none",)):
    """All cases of the sweep: shapes in the given order, then batch size, dtype, layout,
    fusion, mode."""
    return [Case(mode, n, c, h, w, dtype, layout, fusion)
            for (c, h, w), n, dtype, layout, fusion, mode
            in itertools.product(shapes, sorted(batch_sizes), dtypes, layouts, fusions, modes)]


def gbps(case, ms):
    """Throughput in GB/s (1e9 bytes) of `case` done in `ms` milliseconds."""
    if ms is None or not math.isfinite(ms) or ms <= 0:
        return None
    return case.bytes_moved / (ms * 1e-3) / 1e9
