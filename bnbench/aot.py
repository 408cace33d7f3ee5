"""Compile every kernel variant ahead of time for real GPUs, without a GPU.

The Triton interpreter runs the kernels' code on CPU but hides compile errors,
register spills and unvectorised memory access.  This module:

1. runs the host functions on CPU tensors with kernel launches *recorded*, not
   executed (``kernels._triton_internals.record_launches``), over the compile list of
   ``bnbench.registry`` (:func:`bnbench.registry.compile_variants`), whose coverage of
   every constexpr value, argument dtype and num_warps the full product of the ops' axes
   reaches is computed (``--coverage``, :func:`bnbench.registry.coverage`);
2. specialises each recorded launch exactly as a real launch would (Triton's
   own binder: argument types, 16-divisibility and alignment hints;
   ``kernels._triton_internals.bind``);
3. compiles it with ``triton.compile`` for a ``GPUTarget`` (sm_80, sm_90) and
   reads the compiled resources: registers and spills from ``ptxas -v`` (the
   ptxas that ships in the triton wheel), shared memory, and the widest global
   load and store in the PTX (``ld.global.v4.b32`` = 16 bytes).

Compiling needs the interpreter off (``TRITON_INTERPRET`` unset before triton
is imported): ``python -m bnbench.aot`` prints a JSON list of results, or one line
``unavailable: <reason>`` on stderr and exit status 2 where Triton's internals differ from
those checked (``kernels._triton_internals``). Development tooling, so it lives in
``bnbench``, not in the runtime package ``kernels``.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from kernels._triton_internals import (Launch, TritonInternalsUnavailable, bind,  # noqa: F401
                                       record_launches, signature_key)

ARCHS = (80, 90)


@dataclass
class Compiled:
    """What the compiler produced for one launch on one architecture."""

    scenario: str
    kernel: str
    arch: int
    constexprs: str
    num_warps: int
    num_stages: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared_bytes: int
    max_load_bytes: int
    max_store_bytes: int
    error: str = ""


def recorded_launches(match=None):
    """Every distinct launch of the compile list (``bnbench.registry.compile_variants``),
    distinct by kernel and specialisation; `match`: a regular expression the scenario's
    name must contain."""
    from bnbench import registry

    scenarios = [s for s in registry.compile_variants() if not match or re.search(match, s.name)]
    launches, seen = [], set()
    with registry.launch_context(scenarios):
        for scenario in scenarios:
            with record_launches(scenario.name) as got:
                scenario.launch("empty")
            for launch in got:
                key = (launch.fn.__name__, signature_key(launch))
                if key not in seen:
                    seen.add(key)
                    launches.append(launch)
    return launches


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_VEC_BITS = {"v2": 2, "v4": 4, "v8": 8}


def _widest(ptx, op):
    """Widest access in bytes of `op` (ld.global / st.global) in the PTX."""
    widest = 0
    for line in ptx.splitlines():
        if op not in line:
            continue
        m = re.search(rf"{re.escape(op)}((?:\.\w+)*)", line)
        parts = m.group(1).split(".")
        lanes = next((_VEC_BITS[p] for p in parts if p in _VEC_BITS), 1)
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p)), 0)
        widest = max(widest, lanes * bits // 8)
    return widest


def _tool_path(tool):
    """The binary's path: a ``knobs.NvidiaTool`` (Triton 3.4+: ``.path``) or, in Triton 3.3,
    a (path, version) tuple."""
    return tool.path if hasattr(tool, "path") else tool[0]


def _ptxas_resources(ptx, arch):
    """(registers, stack frame, spill stores, spill loads) from `ptxas -v` on the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [_tool_path(get_ptxas(arch)), "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
             "-o", os.path.join(d, "k.cubin")],
            capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = int(_PTXAS_USED.search(log).group(1))
    stack, stores, loads = (int(v) for v in _PTXAS_SPILL.search(log).groups())
    return regs, stack, stores, loads


def compile_launch(launch, arch):
    """Compile one recorded launch for sm_<arch>; never raises (errors go in `error`)."""
    if not isinstance(launch.fn, JITFunction):
        raise RuntimeError("bnbench.aot compiles with TRITON_INTERPRET unset before triton "
                           "is imported (the interpreter's kernels cannot be compiled)")
    target = GPUTarget("cuda", arch, 32)
    options, signature, constexprs, attrs = bind(launch, target)
    names = launch.fn.arg_names
    shown = ", ".join(f"{names[k[0]]}={v}" for k, v in sorted(constexprs.items())
                      if names[k[0]].isupper())
    result = Compiled(launch.scenario, launch.fn.__name__, arch, shown, options.num_warps,
                      options.num_stages, 0, 0, 0, 0, 0, 0, 0)
    try:
        src = ASTSource(launch.fn, signature, constexprs, attrs)
        with contextlib.redirect_stdout(io.StringIO()):
            compiled = triton.compile(src, target=target, options=options.__dict__)
        ptx = compiled.asm["ptx"]
        (result.registers, result.stack_frame, result.spill_stores,
         result.spill_loads) = _ptxas_resources(ptx, arch)
        result.shared_bytes = compiled.metadata.shared
        result.max_load_bytes = _widest(ptx, "ld.global")
        result.max_store_bytes = _widest(ptx, "st.global")
    except Exception as e:  # recorded, so one broken variant does not hide the others
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return result


def compile_all(archs=ARCHS, match=None, progress=None):
    """Compile every distinct launch of every (matching) scenario for each architecture;
    `progress(done, total)`, if given, is called before the first compile and after each."""
    launches = recorded_launches(match)
    total = len(launches) * len(archs)
    results = []
    if progress:
        progress(0, total)
    for launch in launches:
        for arch in archs:
            results.append(compile_launch(launch, arch))
            if progress:
                progress(len(results), total)
    return results


def _progress_writer(fd):
    """A `progress` for compile_all writing ``<done> <total>`` lines to file descriptor `fd`
    (``bnbench inspect`` draws its bar from them)."""
    stream = os.fdopen(fd, "w", buffering=1)

    def progress(done, total):
        stream.write(f"{done} {total}\n")
    return progress


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=[80, 86, 89, 90],
                        help="compute capability (repeatable; default 80 and 90)")
    parser.add_argument("--match", help="only scenarios whose name matches this regex")
    parser.add_argument("--coverage", action="store_true",
                        help="compile nothing: print the features (kernel, constexpr value / "
                             "argument dtypes / num_warps) the full product of axes reaches "
                             "and those the compile list misses, as JSON")
    parser.add_argument("--progress-fd", type=int,
                        help="write '<done> <total>' lines to this open file descriptor")
    args = parser.parse_args(argv)
    try:
        if args.coverage:
            from bnbench import registry

            reached, missed = registry.coverage()
            json.dump(dict(reached=sorted(reached), missed=sorted(missed)), sys.stdout, indent=1)
            return 0
        progress = None if args.progress_fd is None else _progress_writer(args.progress_fd)
        results = compile_all(tuple(args.arch or ARCHS), args.match, progress)
    except TritonInternalsUnavailable as e:
        print(f"unavailable: {e}", file=sys.stderr)
        return 2
    json.dump([asdict(r) for r in results], sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
