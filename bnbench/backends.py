"""Which code actually ran: one profiled call per implementation and case.

``torch.profiler`` records the operators called (CPU side) and, on CUDA, the
kernels launched; ``classify`` turns those names into the ``backend`` column:

    triton / triton_interpreter      this project's kernels (bnbench:: ops, _bn_* kernels)
    cudnn                            aten::cudnn_batch_norm*, cudnn::... / bn_fw_* / bn_bw_* kernels
    aten_native / aten_cpu           aten::native_batch_norm* (ATen's own kernels, CUDA / CPU)
    inductor_triton / inductor_cpp   a torch.compile'd region (Triton kernels on CUDA,
                                     C++ on CPU) with no ATen batch norm inside

Several families join with "+" (e.g. "cudnn+aten_native" if the forward ran on
cuDNN and something else on ATen); "unknown" when nothing is recognised.  A row's
``impl`` says what was asked for; ``backend`` says what ran.

conv_bn_eval rows name the conv and the batch norm apart, ``conv:<c>+bn:<b>``
(e.g. ``conv:cudnn+bn:triton``), both read from the profiled operator names only
(cuDNN's convolution kernels would otherwise pass for its batch norm's):
<c> is cudnn, onednn (aten::mkldnn_convolution), miopen, aten (ATen's own
slow_conv/thnn kernels) or unknown; <b> is one of the labels above, or "none"
when no batch norm ran (a folded conv).
"""

import contextlib
import os
import re
import sys

_CUDNN_KERNEL = re.compile(r"cudnn|(?<![A-Za-z0-9_])bn_(fw|bw)_|nhwcBatchNorm", re.IGNORECASE)
_ATEN_OPS = ("aten::native_batch_norm", "aten::_native_batch_norm_legit",
             "aten::batch_norm_backward", "aten::native_batch_norm_backward")
_COMPILED_OPS = ("Torch-Compiled Region", "CompiledFxGraph", "CompiledFunction")
FAMILY_ORDER = ("triton", "cudnn", "inductor", "aten")
# Convolution operators (substring of the profiled op name) -> the conv's backend.
_CONV_OPS = (("cudnn_convolution", "cudnn"), ("mkldnn_convolution", "onednn"),
             ("miopen_convolution", "miopen"), ("slow_conv", "aten"), ("thnn_conv", "aten"))


def families(op_names, kernel_names):
    """The set of backend families seen in the profiled op and (CUDA) kernel names."""
    found = set()
    for name in op_names:
        if name.startswith("bnbench::"):
            found.add("triton")
        elif name.startswith("aten::cudnn_batch_norm"):
            found.add("cudnn")
        elif name.startswith(_ATEN_OPS):
            found.add("aten")
        elif any(tag in name for tag in _COMPILED_OPS):
            found.add("inductor")
    for name in kernel_names:
        if name.startswith("_bn_"):
            found.add("triton")
        elif name.startswith("triton_"):
            found.add("inductor")
        elif _CUDNN_KERNEL.search(name):
            found.add("cudnn")
        elif "batch_norm" in name:
            found.add("aten")
    return found


def classify(op_names, kernel_names, device, interpreted, conv=False):
    """The backend label (see the module docstring) for one profiled call; with `conv`, the
    ``conv:<c>+bn:<b>`` label of a conv_bn_eval call."""
    found = families(op_names, () if conv else kernel_names)
    labels = {
        "triton": "triton_interpreter" if interpreted else "triton",
        "cudnn": "cudnn",
        "inductor": "inductor_triton" if device == "cuda" else "inductor_cpp",
        "aten": "aten_native" if device == "cuda" else "aten_cpu",
    }
    bn = "+".join(labels[f] for f in FAMILY_ORDER if f in found)
    if not conv:
        return bn or "unknown"
    convs = sorted({label for name in op_names for op, label in _CONV_OPS if op in name})
    return f"conv:{'+'.join(convs) or 'unknown'}+bn:{bn or 'none'}"


@contextlib.contextmanager
def quiet_native_stderr():
    """Silence C++ writes to stderr (fd 2) for the duration.

    torch 2.13's Kineto prints "USDT: ... profiler_start/stop" lines on every
    profiler start and stop whatever KINETO_LOG_LEVEL says (seen 2026-11); they would
    break the progress bar.  Python exceptions are unaffected.
    """
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def observe(step, device):
    """Run `step()` once under torch.profiler; return (op_names, kernel_names)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with quiet_native_stderr(), profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    ops, kernels = set(), set()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.add(event.name)
        else:
            ops.add(event.name)
    return ops, kernels
