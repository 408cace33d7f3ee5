"""What one measurement is: a case (mode, N, C, H, W, dtype, layout, fusion), and its bytes.

Modes:
    eval           y = (x - running_mean) / sqrt(running_var + eps) * weight + bias
    train_fwd      batch statistics, y, running-stats update (inputs need no grad)
    train_fwd_bwd  train_fwd, then backward of y with a given dy: dx, dweight, dbias
    conv_bn_eval   (opt-in) a 3x3 Conv2d, C -> C channels, padding 1, with bias, then
                   the eval-mode BatchNorm2d of `eval` on its output: what folding the
                   BN into the conv saves (``bnbench.impls``)

Fusions (what follows the batch norm, in every mode):
    none           y = bn(x)
    relu           y = relu(bn(x))
    residual+relu  y = relu(bn(x) + r), r a tensor of x's shape, dtype and layout
                   (a ResNet block's end); train_fwd_bwd also gives dr
    silu           y = silu(bn(x)) = z * sigmoid(z), z = bn(x) (EfficientNet, CSP, YOLO)
    residual+silu  y = silu(bn(x) + r)

Minimal bytes moved, the numerator of every GB/s figure (E = element size of the
input's dtype, M = N*C*H*W; the C-sized parameters and statistics are left out):
    eval           read x + write y                        = 2 * M * E
    train_fwd      read x + write y                        = 2 * M * E
    train_fwd_bwd  train_fwd + read x, read dy, write dx   = 5 * M * E
    conv_bn_eval   read x + write y + read the conv weight = 2 * M * E + 9 * C*C * E
residual+relu and residual+silu add the read of r (+ M * E), and in train_fwd_bwd the
write of dr (+ M * E more: 7 * M * E).  relu and silu add nothing: without a residual
their backward recomputes z from x; with one, z (or relu's mask) needs r or y again,
or what the forward saved, which is not counted (this project's backward reads y again
for relu, r again for silu: one more M * E than the formula).
A kernel that reads x more than once (two-pass statistics read it three times)
moves more than this; the figure says how close it gets to the least possible.
conv_bn_eval is bound by the conv's 18 * M * C flops, not by memory: compare its
times; its GB/s is given for completeness.
"""

import itertools
import math
from dataclasses import dataclass

MODES = ("train_fwd", "train_fwd_bwd", "eval")  # the default sweep
OPT_IN_MODES = ("conv_bn_eval",)  # only when asked for with --modes
ALL_MODES = MODES + OPT_IN_MODES
FUSIONS = ("none", "relu", "residual+relu", "silu", "residual+silu")
DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
LAYOUTS = ("nchw", "nhwc")
ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
# Tensors of x's size moved: (without a residual, extra with one).
BYTES_FACTOR = {"eval": (2, 1), "train_fwd": (2, 1), "train_fwd_bwd": (5, 2),
                "conv_bn_eval": (2, 1)}
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
    def residual(self):
        """A residual tensor is added before the activation."""
        return self.fusion.startswith("residual+")

    @property
    def relu(self):
        return self.activation == "relu"

    @property
    def activation(self):
        """The activation applied last: None, "relu" or "silu"."""
        return None if self.fusion == "none" else self.fusion.split("+")[-1]

    @property
    def conv(self):
        """A conv runs before the batch norm (conv_bn_eval)."""
        return self.mode == "conv_bn_eval"

    @property
    def bytes_moved(self):
        """Minimal bytes the op moves (the module docstring gives the formula per mode)."""
        plain, extra = BYTES_FACTOR[self.mode]
        tensors = plain + (extra if self.residual else 0)
        weights = CONV_KERNEL * CONV_KERNEL * self.C * self.C if self.conv else 0
        return (tensors * self.numel + weights) * ELEMENT_SIZE[self.dtype]

    @property
    def training(self):
        return self.mode in ("train_fwd", "train_fwd_bwd")

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
