"""Compile every kernel variant ahead of time for real GPUs, without a GPU.

The Triton interpreter runs the kernels' code on CPU but hides compile errors,
register spills and unvectorised memory access.  This module:

1. runs the host functions on CPU tensors with kernel launches *recorded*, not
   executed (``kernels._triton_internals.record_launches``), over scenarios that cover every
   constexpr variant the ops can launch (:func:`scenarios`);
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

import torch
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


def _tensor(shape, dtype, channels_last=False):
    t = torch.empty(shape, dtype=dtype)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def scenarios():
    """(name, thunk) pairs whose launches cover every kernel variant the ops can launch.

    Both layouts; the general path on an aligned shape (16-byte vectors possible)
    with every dtype pattern, the single-launch path on an aligned shape with fp32,
    fp64 and fp16/bf16 input with fp32 parameters, both paths on an unaligned 7x7
    shape (fp32, bf16 with fp32 parameters); each fusion and option flag on the
    aligned fp32 shapes of both paths; and the num_warps configurations autotuning
    may try there.
    """
    from kernels._common import Epilogue
    from kernels.backward import bn_backward
    from kernels.forward import bn_forward_eval, bn_forward_train

    def train(shape, dtype, pdtype, cl, stats, affine=True, running=True, cumulative=False,
              epilogue=Epilogue.NONE):
        C = shape[1]
        x = _tensor(shape, dtype, cl)
        w = torch.empty(C, dtype=pdtype) if affine else None
        b = torch.empty(C, dtype=pdtype) if affine else None
        rm = torch.empty(C, dtype=pdtype) if running else None
        rv = torch.empty(C, dtype=pdtype) if running else None
        nbt = torch.ones((), dtype=torch.long) if cumulative else None
        r = _tensor(shape, dtype, cl) if epilogue.residual else None
        bn_forward_train(x, w, b, rm, rv, 0.1, 1e-5, stats, r, epilogue, nbt)

    def evaluate(shape, dtype, pdtype, cl, affine=True, epilogue=Epilogue.NONE):
        C = shape[1]
        x = _tensor(shape, dtype, cl)
        w = torch.empty(C, dtype=pdtype) if affine else None
        b = torch.empty(C, dtype=pdtype) if affine else None
        r = _tensor(shape, dtype, cl) if epilogue.residual else None
        bn_forward_eval(x, w, b, torch.empty(C, dtype=pdtype), torch.empty(C, dtype=pdtype),
                        1e-5, r, epilogue)

    def backward(shape, dtype, pdtype, cl, training=True, affine=True, epilogue=Epilogue.NONE,
                 need=(True, True, True, True)):
        C = shape[1]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x = _tensor(shape, dtype, cl)
        w = torch.empty(C, dtype=pdtype) if affine else None
        b = torch.empty(C, dtype=pdtype) if affine else None
        bn_backward(_tensor(shape, dtype, cl), x, _tensor(shape, dtype, cl), w, b,
                    torch.empty(C, dtype=acc), torch.empty(C, dtype=acc), training=training,
                    epilogue=epilogue, need_dx=need[0], need_dweight=need[1],
                    residual=_tensor(shape, dtype, cl) if epilogue.residual else None,
                    need_dbias=need[2], need_dresidual=need[3])

    # general path (aligned: 16-byte vectors possible; unaligned 7x7) and single-launch path
    general, general_7x7 = (32, 64, 56, 56), (64, 256, 7, 7)
    single_launch, single_launch_7x7 = (8, 128, 8, 8), (8, 256, 7, 7)
    all_dtypes = [(torch.float32, torch.float32), (torch.float16, torch.float16),
                  (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                  (torch.bfloat16, torch.float32), (torch.float64, torch.float64)]
    mixed_dtypes = [all_dtypes[0], all_dtypes[3], all_dtypes[4], all_dtypes[5]]
    out = []
    for shape, dtypes in ((general, all_dtypes), (single_launch, mixed_dtypes),
                          (general_7x7, all_dtypes[:1] + all_dtypes[4:5]),
                          (single_launch_7x7, all_dtypes[:1] + all_dtypes[4:5])):
        for cl in (False, True):
            for dtype, pdtype in dtypes:
                tag = f"{tuple(shape)} {'nhwc' if cl else 'nchw'} {dtype}/{pdtype}"
                for stats in ("single_pass", "two_pass"):
                    out.append((f"train {stats} {tag}",
                                lambda a=(shape, dtype, pdtype, cl, stats): train(*a)))
                out.append((f"eval {tag}", lambda a=(shape, dtype, pdtype, cl): evaluate(*a)))
                out.append((f"backward {tag}",
                            lambda a=(shape, dtype, pdtype, cl): backward(*a)))
    f32 = torch.float32
    train_flags = {
        "no affine": dict(affine=False), "no running stats": dict(running=False),
        "cumulative": dict(cumulative=True), "relu": dict(epilogue=Epilogue.RELU),
        "residual": dict(epilogue=Epilogue.RESIDUAL),
        "residual+relu": dict(epilogue=Epilogue.RESIDUAL_RELU),
        "silu": dict(epilogue=Epilogue.SILU),
        "residual+silu": dict(epilogue=Epilogue.RESIDUAL_SILU),
    }
    bwd_flags = {
        "eval stats": dict(training=False), "no affine": dict(affine=False),
        "relu": dict(epilogue=Epilogue.RELU),
        "residual+relu": dict(epilogue=Epilogue.RESIDUAL_RELU),
        "residual": dict(epilogue=Epilogue.RESIDUAL),
        "no dx": dict(need=(False, True, True, False)),
        "silu": dict(epilogue=Epilogue.SILU),
        "residual+silu": dict(epilogue=Epilogue.RESIDUAL_SILU),
        "eval silu": dict(training=False, epilogue=Epilogue.SILU),
        "eval dx only": dict(training=False, need=(True, False, False, False)),
    }
    for shape in (general, single_launch):
        for cl in (False, True):
            tag = f"{shape} {'nhwc' if cl else 'nchw'} fp32"
            for name, kw in train_flags.items():
                out.append((f"train single_pass {name} {tag}", lambda kw=kw, cl=cl, shape=shape:
                            train(shape, f32, f32, cl, "single_pass", **kw)))
            for name, kw in bwd_flags.items():
                out.append((f"backward {name} {tag}", lambda kw=kw, cl=cl, shape=shape:
                            backward(shape, f32, f32, cl, **kw)))
        for name, kw in (("no affine", dict(affine=False)),
                         ("relu", dict(epilogue=Epilogue.RELU)),
                         ("residual+relu", dict(epilogue=Epilogue.RESIDUAL_RELU)),
                         ("silu", dict(epilogue=Epilogue.SILU)),
                         ("residual+silu", dict(epilogue=Epilogue.RESIDUAL_SILU))):
            out.append((f"eval {name} {shape} nchw fp32",
                        lambda kw=kw, shape=shape: evaluate(shape, f32, f32, False, **kw)))
        # the num_warps an autotuned launch may try (kernels._tuning)
        for cl in (False, True):
            tag = f"{shape} {'nhwc' if cl else 'nchw'} fp32"
            for stats in ("single_pass", "two_pass"):
                out.append((f"autotuned train {stats} {tag}", lambda a=(shape, f32, f32, cl, stats):
                            _autotuned(train, *a)))
            out.append((f"autotuned backward {tag}", lambda a=(shape, f32, f32, cl):
                        _autotuned(backward, *a)))
    return out


def _autotuned(fn, *args):
    from kernels._tuning import autotune_enabled, set_autotune

    was = autotune_enabled()
    set_autotune(True)
    try:
        fn(*args)
    finally:
        set_autotune(was)


def recorded_launches(match=None):
    """Every distinct launch of every scenario (distinct by kernel and specialisation);
    `match`: a regular expression the scenario's name must contain."""
    launches, seen = [], set()
    for name, thunk in scenarios():
        if match and not re.search(match, name):
            continue
        with record_launches(name) as got:
            thunk()
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


def compile_all(archs=ARCHS, match=None):
    """Compile every distinct launch of every (matching) scenario for each architecture."""
    return [compile_launch(launch, arch) for launch in recorded_launches(match)
            for arch in archs]


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=[80, 86, 89, 90],
                        help="compute capability (repeatable; default 80 and 90)")
    parser.add_argument("--match", help="only scenarios whose name matches this regex")
    args = parser.parse_args(argv)
    try:
        results = compile_all(tuple(args.arch or ARCHS), args.match)
    except TritonInternalsUnavailable as e:
        print(f"unavailable: {e}", file=sys.stderr)
        return 2
    json.dump([asdict(r) for r in results], sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
