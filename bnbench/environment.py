"""What a run records about where it ran: device, versions, commit, time, TF32 settings.

One schema (:data:`STAMP_COLUMNS`, :func:`metadata`, :func:`stamp`) for every CSV bnbench
writes: these columns come first in every row, so a row read on its own says what produced
it and how.
Also the settings ``bnbench run`` and ``bnbench train`` share: the CPU thread count.
No torch at import time (the CLI's parsers import this module).
"""

import datetime
import json
import platform
import re
import subprocess
from pathlib import Path

PACKAGE = "bnbench"


def package_version():
    """bnbench's installed version (importlib.metadata), or "unknown" if it is not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _checkout_commit(root):
    """The commit of the git checkout whose top is `root` ("-dirty" if kernels/ or bnbench/
    differ from it), or None when `root` is not the top of a checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10)
    try:
        out = git("rev-parse", "--show-toplevel", "HEAD")
        lines = out.stdout.split()
        if out.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root:
            return None  # not a bnbench checkout (e.g. installed into another repo)
        dirty = git("diff", "--quiet", "HEAD", "--", "kernels", "bnbench").returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return lines[1] + ("-dirty" if dirty else "")


def _installed_commit():
    """The commit pip recorded when bnbench was installed from a git URL
    (``pip install git+https://...``: ``direct_url.json``'s ``vcs_info``), or None."""
    import importlib.metadata

    try:
        text = importlib.metadata.distribution(PACKAGE).read_text("direct_url.json")
        commit = json.loads(text or "{}").get("vcs_info", {}).get("commit_id")
    except (importlib.metadata.PackageNotFoundError, ValueError, AttributeError):
        return None
    return commit or None


def git_commit(root=None):
    """The commit of the bnbench code that runs, or "unknown" when no commit can be found.

    From the git checkout this package lies in (whatever the working directory), with
    "-dirty" appended when tracked files under kernels/ or bnbench/ differ from that
    commit (the numbers then come from code no commit holds); outside a checkout (``pip
    install .`` copies the files), the commit pip recorded for a ``git+`` install.
    """
    root = Path(root or Path(__file__).resolve().parents[1]).resolve()
    return _checkout_commit(root) or _installed_commit() or "unknown"


def add_cpu_threads_argument(p):
    """``--cpu-threads``, the same option in ``bnbench run`` and ``bnbench train``."""
    from .arguments import positive_int

    p.add_argument("--cpu-threads", type=positive_int, default=1,
                   help="torch threads without a GPU (default 1: the small CPU shapes gain "
                        "nothing from more, and a thread waiting for a busy core would be "
                        "timed)")


def set_cpu_threads(device, threads):
    """Without a GPU, run torch on `threads` threads; return the count torch uses.

    One rule for ``bnbench run`` and ``bnbench train``, so both report the same count.
    """
    import torch

    if device != "cuda":
        torch.set_num_threads(threads)
    return torch.get_num_threads()


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


def read_tf32():
    """The TF32 settings as they are (nothing changed), e.g. "on (matmul=tf32, cudnn=tf32)"."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        read = (matmul.fp32_precision, cudnn.fp32_precision)
        state = "on" if "tf32" in read else "off"
        return f"{state} (matmul={read[0]}, cudnn={read[1]})"
    state = "on" if (matmul.allow_tf32 or cudnn.allow_tf32) else "off"
    return f"{state} (matmul.allow_tf32={matmul.allow_tf32}, cudnn.allow_tf32={cudnn.allow_tf32})"


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
    else:
        matmul.allow_tf32 = False
        cudnn.allow_tf32 = False
    return read_tf32()


STAMP_COLUMNS = ("timestamp", "bnbench_version", "git_commit", "device", "device_type",
                 "torch_version", "triton_version", "cuda_version", "cudnn_version",
                 "triton_mode", "tf32", "method")
"""The metadata columns every bnbench CSV starts with, in this order (:func:`metadata`)."""

NONE = "none"  # the value of a metadata column that does not apply


def metadata(device, *, interpreted, method, tf32=None):
    """The metadata columns of every bnbench CSV: a dict in STAMP_COLUMNS order.

    The one schema: ``bnbench run``, ``train``, ``gpu-day``, ``comm``, ``zoo``, ``inspect``
    and ``traffic`` all stamp their rows with it (:func:`stamp` for a DataFrame).

    Args:
        device: "cuda" or "cpu" (what ran the numbers), or None where no device ran them
            (``bnbench inspect`` compiles only): device and device_type are then "none".
        interpreted: the Triton kernels ran through Triton's interpreter (triton_mode
            "interpreter", else "compiled").
        method: how the numbers were obtained (timer, counter, compiler), in words.
        tf32: the TF32 settings, as pin_tf32 or read_tf32 returned them; None (written
            "none") where no matmul or convolution ran.

    timestamp is UTC, to the second; git_commit as :func:`git_commit`; triton_version,
    cuda_version and cudnn_version "none" where there is none.
    """
    import importlib.metadata

    import torch

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return NONE

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bnbench_version": package_version(),
        "git_commit": git_commit(),
        "device": device_name(device) if device else NONE,
        "device_type": device or NONE,
        "torch_version": torch.__version__,
        "triton_version": version("triton"),
        "cuda_version": torch.version.cuda or NONE,
        "cudnn_version": cudnn if cudnn is not None else NONE,
        "triton_mode": "interpreter" if interpreted else "compiled",
        "tf32": NONE if tf32 is None else tf32,
        "method": method,
    }


def stamp(df, device, *, interpreted, method, tf32=None):
    """`df` (a pandas DataFrame) with the :func:`metadata` columns first, in their order,
    then its own columns (a column of `df` with a metadata name is replaced)."""
    import pandas as pd

    fields = metadata(device, interpreted=interpreted, method=method, tf32=tf32)
    rest = df.drop(columns=[c for c in STAMP_COLUMNS if c in df.columns])
    head = pd.DataFrame({k: [v] * len(rest) for k, v in fields.items()}, index=rest.index)
    return pd.concat([head, rest], axis=1)


class OutputError(ValueError):
    """An output folder that cannot be used; the message names the path and the problem."""


def output_dir(path):
    """Create the output folder `path` if needed and check that files can be written in it.

    Returns the path; raises OutputError (one line naming the path and the problem)
    instead of the OSError a later write would raise with a traceback.
    """
    import errno
    import tempfile

    path = Path(path)
    problem = None
    if path.exists() and not path.is_dir():
        problem = "it is a file, not a folder"
    else:
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except FileExistsError:
            problem = "a part of it is a file, not a folder"
        except NotADirectoryError:
            problem = "a part of it is a file, not a folder"
        except PermissionError:
            problem = "permission denied"
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EROFS:
                reason = "read-only file system"
            problem = f"cannot create or write there ({reason})"
    if problem:
        raise OutputError(f"cannot write to --out {path}: {problem}")
    return path


def committed(path):
    """True when `path` is a file git tracks in the bnbench checkout this package lies in
    (a committed result), False elsewhere or without git."""
    root = Path(__file__).resolve().parents[1]
    path = Path(path).resolve()
    try:
        path.relative_to(root)
        out = subprocess.run(["git", "-C", str(root), "ls-files", "--error-unmatch", "--",
                              str(path)], capture_output=True, text=True, timeout=10)
    except (ValueError, OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


def keep_committed(out, names, explicit, local):
    """Where a command writes: `out`, unless `out` is the default (not `explicit`) and one of
    the files `names` there is committed in this checkout; then `local` (a run in a checkout
    never replaces a committed result unless asked to with --out).

    Returns (folder, note): note is None, or one line saying what was not replaced.
    """
    kept = [Path(out) / name for name in names if committed(Path(out) / name)]
    if explicit or not kept:
        return Path(out), None
    return Path(local), (f"{kept[0]} is a committed result: writing into {local}/ instead "
                         f"(--out {out} replaces it)")


def command_out(command, out, default, names, local="results/local"):
    """The folder a writing command uses, by `bnbench run`'s rule: `out` when given (--out);
    else `default`, unless one of the files `names` there is committed in this checkout,
    then `local` (and the command says so).  The folder is created and checked first, so a
    bad --out fails before any work.

    Returns the folder, or None after one line on stderr (the caller exits 2).
    """
    import sys

    folder, note = keep_committed(out if out is not None else default, names,
                                  explicit=out is not None, local=local)
    try:
        output_dir(folder)
    except OutputError as exc:
        print(f"bnbench {command}: error: {exc}", file=sys.stderr)
        return None
    if note:
        print(f"bnbench {command}: {note}", flush=True)
    return Path(folder)
