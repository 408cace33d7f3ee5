"""``bnbench inspect``: the compiled code of every kernel variant, for real GPUs, without a GPU.

Each launch of the compile list (``bnbench.registry.compile_variants``) is specialised as
a real launch would be and compiled with ``triton.compile`` for sm_80 and sm_90 (``ptxas``
ships with Triton).  Reported per variant: registers per thread, spill bytes, stack frame, shared
memory, the widest global load and store in the PTX (16 bytes = ``ld.global.v4.b32``),
num_warps and num_stages.  Compiled resources are measured proxies for speed, not speeds.

The compiler runs in a subprocess with ``TRITON_INTERPRET`` unset: the interpreter's
kernels cannot be compiled.
"""

import json
import os
import subprocess
import sys
import threading

COLUMNS = ["kernel", "arch", "scenario", "registers", "spill_stores", "spill_loads",
           "stack_frame", "shared_bytes", "max_load_bytes", "max_store_bytes", "num_warps",
           "num_stages", "constexprs", "error"]


def compile_variants(archs=(80, 90), match=None, progress=None):
    """Run ``python -m bnbench.aot`` (interpreter off) and return its results as a DataFrame.

    The subprocess imports the installed packages (no dependence on the working directory).
    `progress`: called with the number of variants once they are known, it returns a bar
    (tqdm: ``update``, ``close``) fed from the subprocess's ``<done> <total>`` lines on a pipe
    of its own as each variant compiles; nothing is drawn before the first line.
    Raises TritonInternalsUnavailable where launch recording or ahead-of-time binding cannot
    run on the installed Triton."""
    import pandas as pd

    from kernels import _triton_internals as internals

    internals.require(internals.RECORDING, internals.BINDING)

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bnbench.aot"]
    cmd += [a for arch in archs for a in ("--arch", str(arch))]
    if match:
        cmd += ["--match", match]
    read_end, write_end = os.pipe()
    reader = threading.Thread(target=_follow, args=(read_end, progress), daemon=True)
    reader.start()
    try:
        out = subprocess.run(cmd + ["--progress-fd", str(write_end)], env=env,
                             capture_output=True, text=True, pass_fds=(write_end,))
    finally:
        os.close(write_end)
        reader.join()
    last = out.stderr.strip().splitlines()[-1:]
    if out.returncode == 2 and last and last[0].startswith("unavailable: "):
        raise internals.TritonInternalsUnavailable.relayed(last[0][len("unavailable: "):])
    if out.returncode != 0:
        raise RuntimeError(f"bnbench.aot failed: {out.stderr.strip().splitlines()[-1:]}")
    return pd.DataFrame(json.loads(out.stdout))[COLUMNS]


def _follow(fd, progress):
    """Read ``<done> <total>`` lines from `fd` until the writers close it; a bar from
    `progress(total)` at the first, moved at each, closed at the end."""
    shown, bar = 0, None
    with os.fdopen(fd) as stream:
        for line in stream:
            done, total = (int(v) for v in line.split())
            if progress is None:
                continue
            if bar is None:
                bar = progress(total)
            bar.update(done - shown)
            shown = done
    if bar is not None:
        bar.close()


def summary(df):
    """One line per kernel and arch: variants, the register range, spills, widest accesses."""
    return df.groupby(["kernel", "arch"]).agg(
        variants=("scenario", "size"), regs_min=("registers", "min"),
        regs_max=("registers", "max"), spill_bytes=("spill_stores", "sum"),
        stack_max=("stack_frame", "max"), smem_max=("shared_bytes", "max"),
        widest_load=("max_load_bytes", "max"), widest_store=("max_store_bytes", "max"),
        errors=("error", lambda e: int((e != "").sum())))


def markdown(df):
    """The README's table of compiled resources (one row per kernel, both archs), from an
    inspect.csv."""
    rows = ["| kernel | variants (sm_80 + sm_90) | registers/thread | spill bytes | shared "
            "memory, B | widest load / store, B |", "|---|---|---|---|---|---|"]
    for kernel, k in df.groupby("kernel"):
        rows.append(f"| `{kernel}` | {len(k)} | {k.registers.min()}–{k.registers.max()} | "
                    f"{k.spill_stores.sum() + k.spill_loads.sum()} | ≤ {k.shared_bytes.max()} | "
                    f"{k.max_load_bytes.max()} / {k.max_store_bytes.max()} |")
    return "\n".join(rows)


def run_command(args):
    from tqdm import tqdm

    from bnbench.environment import command_out, stamp

    out = command_out("inspect", args.out, "results", ["inspect.csv"])
    if out is None:
        return 2
    archs = tuple(args.arch)
    df = compile_variants(archs, args.match, progress=lambda total: tqdm(
        total=total, desc="bnbench inspect", unit="variant", file=sys.stderr))
    method = ("triton.compile + ptxas for " + "/".join(f"sm_{a}" for a in archs)
              + ", no GPU; registers, spills and shared memory from the compiled kernel, "
              "widest load/store from its PTX")
    df = stamp(df, None, interpreted=False, method=method)
    path = out / "inspect.csv"
    df.to_csv(path, index=False)
    print("Compiled resources are measured proxies for speed, not speeds.")
    print(summary(df).to_string())
    print(f"{len(df)} compiled variants; wrote {path}")
    failed = (df.error != "") | (df.spill_stores > 0) | (df.spill_loads > 0)
    return 1 if failed.any() else 0


def add_parser(subparsers):
    from .arguments import regex

    p = subparsers.add_parser(
        "inspect", help="compile every kernel variant for sm_80/sm_90 and report its resources",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", choices=[80, 86, 89, 90],
                   help="compute capability (repeatable; default 80 and 90)")
    p.add_argument("--match", type=regex, help="only scenarios whose name matches this regular expression")
    p.add_argument("--out", default=None,
                   help="folder for inspect.csv (default results/; in a checkout, "
                        "results/local/ where results/inspect.csv is committed)")
    p.set_defaults(func=_with_default_archs, uses_device=False)


def _with_default_archs(args):
    args.arch = args.arch or [80, 90]
    return run_command(args)
