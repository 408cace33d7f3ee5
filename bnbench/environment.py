"""What a run records about where it ran: device, versions, commit, time, TF32 settings.

These go into every row of the CSV, so a row read on its own says what produced it.
"""

import datetime
import importlib.metadata
import platform
import re
import subprocess
from pathlib import Path


def git_commit():
    """The commit of the bnbench checkout (whatever the working directory), or "unknown".

    "-dirty" is appended when tracked files under kernels/ or bnbench/ differ from
    that commit: the numbers then come from code no commit holds.
    """
    root = Path(__file__).resolve().parents[1]

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10)
    try:
        out = git("rev-parse", "--show-toplevel", "HEAD")
        lines = out.stdout.split()
        if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
            return "unknown"  # not a bnbench checkout (e.g. installed into another repo)
        dirty = git("diff", "--quiet", "HEAD", "--", "kernels", "bnbench").returncode == 1
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return lines[1] + ("-dirty" if dirty else "")


def cpu_name():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu: {cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device):
    """A file-name-safe device label: "cpu", or the GPU's name ("nvidia-h100-80gb-hbm3")."""
    if device != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def pin_tf32():
    """Turn TF32 off for matmuls and cuDNN (BatchNorm does no matmul; pinned so runs compare).

    Returns the settings as read back, e.g. "off (matmul=ieee, cudnn=ieee)".
    """
    import torch

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        # torch >= 2.9: the new API only; mixing it with allow_tf32 makes reading the flags raise.
        matmul.fp32_precision = "ieee"
        cudnn.fp32_precision = "ieee"
        read = (matmul.fp32_precision, cudnn.fp32_precision)
        state = "on" if "tf32" in read else "off"
        return f"{state} (matmul={read[0]}, cudnn={read[1]})"
    matmul.allow_tf32 = False
    cudnn.allow_tf32 = False
    state = "on" if (matmul.allow_tf32 or cudnn.allow_tf32) else "off"
    return f"{state} (matmul.allow_tf32={matmul.allow_tf32}, cudnn.allow_tf32={cudnn.allow_tf32})"


def collect(device, interpreted, tf32):
    """The run's metadata columns.

    Args:
        device: "cuda" or "cpu".
        interpreted: the Triton kernels run through Triton's interpreter.
        tf32: the TF32 settings, as pin_tf32 returned them.
    """
    import torch

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "none"

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "device": device_name(device),
        "device_type": device,
        "torch_version": torch.__version__,
        "triton_version": version("triton"),
        "cuda_version": torch.version.cuda or "none",
        "cudnn_version": cudnn if cudnn is not None else "none",
        "triton_mode": "interpreter" if interpreted else "compiled",
        "tf32": tf32,
    }
