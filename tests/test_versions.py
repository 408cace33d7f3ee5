"""Version support: the floors, and every touch of Triton's internals
(``kernels._triton_internals``) tested for both outcomes: on the internals it was written
against, the patches are on and the features work; on other internals, the patches are
silently off and each feature raises TritonInternalsUnavailable (``bnbench traffic`` and
``bnbench inspect``: one line, exit status 2).

The installed versions' own outcome is tested too, so running this file in each environment
of the matrix (README, "Supported versions"; .github/workflows/cpu.yml) checks each one.
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import triton

import kernels
from bnbench import aot, registry
from kernels import _triton_internals as internals
from kernels import _versions

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# floors

@pytest.mark.parametrize("torch_v, triton_v, bad", [
    ("2.13.0+cpu", "3.9.0", []),
    ("2.11.0+cu130", "3.6.0", []),
    ("2.7.1+cu126", "3.3.1", []),
    ("2.6.0", "3.2.0", ["torch", "triton"]),
    ("2.5.1", "3.3.1", ["torch"]),
    ("2.13.0", "3.1.0", ["triton"]),
    ("2.13.0", None, []),  # no triton distribution: the kernels' own import says so
])
def test_floors(torch_v, triton_v, bad):
    found = _versions.problems(torch_v, triton_v)
    assert [p.split()[0] for p in found] == bad
    for p in found:
        assert "found" in p


def test_below_floor_raises_import_error_naming_versions(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.6.0")
    with pytest.raises(ImportError, match=r"torch >= 2\.7 \(found 2\.6\.0\)"):
        _versions.check()


def test_installed_versions_meet_the_floors():
    assert _versions.problems(torch.__version__, triton.__version__) == []


# ---------------------------------------------------------------------------------------------
# kernels._triton_internals: the __index__ fix (Triton <= 3.6 with NumPy >= 2.4)

def _fake_interpreter(monkeypatch, patch_lang_tensor=None, **attrs):
    """A stand-in for triton.runtime.interpreter with the given internals."""
    import triton.language as tl

    fake = types.SimpleNamespace(**attrs)
    if patch_lang_tensor is not None:
        fake._patch_lang_tensor = patch_lang_tensor
    monkeypatch.setattr(internals, "_interpreter", lambda: (fake, tl))
    return fake


class _Scope:
    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((obj, name))
        setattr(obj, name, value)


def _scalar(value):
    """An interpreter scalar: a 1-element array behind .handle.data."""
    return internals._Probe(np.array([value], dtype=np.int32))


def _buggy_36(tensor, scope):  # Triton 3.4-3.6: int() of the 1-element array
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def _buggy_33(tensor):  # Triton 3.3: set in place
    tensor.__index__ = lambda self: int(self.handle.data)


def _fixed(tensor, scope):  # Triton 3.7+
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


def _numpy_rejects_1_element_int():
    try:
        int(np.array([3]))
    except TypeError:
        return True
    return False


@pytest.mark.skipif(not _numpy_rejects_1_element_int(), reason="NumPy < 2.4 converts "
                    "1-element arrays itself: there is no bug to fix")
@pytest.mark.parametrize("buggy", [_buggy_36, _buggy_33], ids=["triton3.4-3.6", "triton3.3"])
def test_index_fix_installs_where_tritons_index_fails(monkeypatch, buggy):
    fake = _fake_interpreter(monkeypatch, buggy)
    assert internals.install_index_fix() is True
    assert fake._patch_lang_tensor is not buggy

    class Tensor:
        pass

    scope = _Scope()
    args = (Tensor, scope) if buggy is _buggy_36 else (Tensor,)
    fake._patch_lang_tensor(*args)
    assert Tensor.__index__(_scalar(7)) == 7
    if buggy is _buggy_36:  # through Triton's scope, so the launch's restore undoes it
        assert scope.changes[-1] == (Tensor, "__index__")
    assert internals.install_index_fix() is True  # idempotent
    assert fake._patch_lang_tensor._bnbench_index_fix


@pytest.mark.parametrize("fake_internals", [
    dict(patch_lang_tensor=_fixed),  # Triton 3.7+: nothing to fix
    dict(),  # no _patch_lang_tensor at all
    dict(patch_lang_tensor=lambda a, b, c: None),  # another signature
    dict(patch_lang_tensor=lambda tensor, scope: 1 / 0),  # fails on the probe
], ids=["already-fixed", "absent", "other-signature", "raises"])
def test_index_fix_off_where_internals_differ(monkeypatch, fake_internals):
    fake = _fake_interpreter(monkeypatch, **fake_internals)
    before = getattr(fake, "_patch_lang_tensor", None)
    assert internals.install_index_fix() is False
    assert getattr(fake, "_patch_lang_tensor", None) is before


def test_index_fix_outcome_on_installed_triton():
    """The real interpreter: where kernels run through it, the fix is on exactly when
    Triton's own __index__ fails on a 1-element array (and the fixed one works)."""
    import inspect

    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    patched = getattr(patch, "_bnbench_index_fix", False)
    assert patched == bool(internals.INSTALLED.get("index"))

    class Tensor:
        pass

    original = getattr(patch, "_bnbench_original", patch)
    two = len(inspect.signature(original).parameters) == 2  # (tensor, scope): Triton 3.4+
    patch(Tensor, _Scope()) if two else patch(Tensor)
    fails = internals._index_fails(Tensor.__index__)
    assert not fails or not kernels.INTERPRETED, "Triton's __index__ fails and no fix is on"
    if not patched and kernels.INTERPRETED:
        assert internals.install_index_fix() is False  # nothing to fix here


def test_kernel_with_runtime_loop_bounds_runs(device):
    """The general path's tile loop (range over run-time bounds): the loop the fix is for."""
    x = torch.randn(3, 5, 17, 13, device=device)
    with kernels.planning(single_launch_max_elems=0):
        y = kernels.batch_norm(x, None, None, training=True)
    ref = torch.nn.functional.batch_norm(x.double(), None, None, training=True)
    assert (y.double() - ref).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# kernels._triton_internals: the memo (speed only)

def test_memo_off_where_internals_differ(monkeypatch):
    class GridExecutor:
        def __call__(self):
            pass

    # Triton 3.3: _patch_lang patches in place; no _LangPatchScope
    fake = _fake_interpreter(monkeypatch, _patch_lang=lambda fn: None, GridExecutor=GridExecutor)
    assert internals.install_memo() is False
    assert not getattr(fake, "_bnbench_memo", False)


def test_memo_installs_on_the_internals_it_was_written_for(monkeypatch):
    class Scope:
        def restore(self):
            pass

    class GridExecutor:
        def __call__(self, *args):
            return "launched"

    calls = []
    fake = _fake_interpreter(monkeypatch, _patch_lang=lambda fn: calls.append(fn) or Scope(),
                             GridExecutor=GridExecutor, _LangPatchScope=Scope)
    assert internals.install_memo() is True
    assert fake._bnbench_memo and GridExecutor()() == "launched"


def test_memo_outcome_on_installed_triton():
    from triton.runtime import interpreter

    expected = hasattr(interpreter, "_LangPatchScope")  # Triton 3.4+
    assert internals.INSTALLED.get("memo", False) is (expected and kernels.INTERPRETED)


# ---------------------------------------------------------------------------------------------
# kernels._triton_internals: launch recording; bnbench.aot: compiling on each Triton's internals

def test_launch_hooks_class_level_run(monkeypatch):
    """Triton 3.4+: InterpretedFunction.run is a method of the class."""
    import triton.runtime.interpreter as interp

    class InterpretedFunction:
        def run(self, *args, grid, warmup, **kwargs):
            pass

    monkeypatch.setattr(interp, "InterpretedFunction", InterpretedFunction)
    hooks = internals._launch_hooks("record", "record_grid")
    assert (InterpretedFunction, "run", "record") in hooks


def test_launch_hooks_instance_run(monkeypatch):
    """Triton 3.3: run is set per instance; kernel[grid] goes through __getitem__."""
    import triton.runtime.interpreter as interp

    class InterpretedFunction:
        def __init__(self):
            self.run = lambda *a, **k: None

        def __getitem__(self, grid):
            return lambda *a, **k: "ran"

    monkeypatch.setattr(interp, "InterpretedFunction", InterpretedFunction)
    hooks = internals._launch_hooks("record", "record_grid")
    assert (InterpretedFunction, "__getitem__", "record_grid") in hooks
    assert not any(cls is InterpretedFunction and name == "run" for cls, name, _ in hooks)


def test_record_launches_on_installed_triton():
    """kernel[grid](...) is recorded, not run, and the hooks are undone after the block."""
    from triton.runtime.jit import JITFunction

    before = dict(vars(JITFunction))
    scenario = registry.compile_variants()[0]
    with internals.record_launches(scenario.name) as launches:
        scenario.launch("empty")
    assert launches and {type(l.fn).__name__ for l in launches} <= {"JITFunction",
                                                                     "InterpretedFunction"}
    assert dict(vars(JITFunction)) == before


def test_tool_path_both_forms():
    assert aot._tool_path(types.SimpleNamespace(path="/bin/ptxas")) == "/bin/ptxas"
    assert aot._tool_path(("/bin/ptxas", "12.8")) == "/bin/ptxas"


def test_aot_compiles_on_installed_triton():
    """One variant compiled for sm_90 (interpreter off), through ``_pack_args`` where Triton
    has it (3.4+) and 3.3's inline binding steps otherwise (the matrix runs both): the
    compile gives registers and 16-byte loads."""
    script = (
        "import json, bnbench.aot as a\n"
        "l = a.recorded_launches(r'^eval nchw float32/float32 general')[0]\n"
        "r = a.compile_launch(l, 90)\n"
        "print(json.dumps(dict(error=r.error, regs=r.registers, "
        "load=r.max_load_bytes)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["error"] == "" and got["regs"] > 0 and got["load"] == 16, got


# ---------------------------------------------------------------------------------------------
# kernels._triton_internals: each feature unavailable (not a crash) where internals differ

_CHECKED = r"checked against Triton 3\.3\.1, 3\.6\.0, 3\.9\.0"


def _unavailable(feature):
    """pytest.raises for `feature`, its message naming the feature and the versions."""
    import re

    return pytest.raises(internals.TritonInternalsUnavailable,
                         match=rf"^{feature} needs .*installed Triton "
                               rf"{re.escape(triton.__version__)}; {_CHECKED}\)$")


def test_every_feature_available_on_installed_triton():
    assert internals.available() == {f: None for f in internals.FEATURES}
    assert issubclass(internals.TritonInternalsUnavailable, RuntimeError)


def test_launch_recording_unavailable(monkeypatch):
    import triton.runtime.interpreter as interp

    class InterpretedFunction:  # neither a class-level run(grid=...) nor __getitem__
        pass

    monkeypatch.setattr(interp, "InterpretedFunction", InterpretedFunction)
    with _unavailable("launch recording"):
        with internals.record_launches():
            pass
    assert "InterpretedFunction" in internals.available()["launch recording"]


def test_launch_recording_unavailable_without_jit_run_grid(monkeypatch):
    from triton.runtime.jit import JITFunction

    monkeypatch.setattr(JITFunction, "run", lambda self, *args: None)
    with _unavailable("launch recording"):
        internals._launch_hooks(None, None)
    assert "JITFunction.run" in internals.available()["launch recording"]


@pytest.mark.parametrize("broken", ["builder", "load", "executor"])
def test_access_counting_unavailable(monkeypatch, broken):
    from triton.runtime import interpreter

    if broken == "builder":
        monkeypatch.delattr(interpreter, "interpreter_builder")
    elif broken == "load":
        monkeypatch.setattr(interpreter, "interpreter_builder", types.SimpleNamespace(
            create_masked_load=lambda pointers, m: None,
            create_masked_store=lambda ptrs, value, mask: None))
    else:
        class GridExecutor:
            def __init__(self, fn, arg_names):
                pass

            def __call__(self):
                pass
        monkeypatch.setattr(interpreter, "GridExecutor", GridExecutor)
    with _unavailable("access counting"):
        with internals.count_accesses():
            pass
    assert internals.available()["access counting"].startswith("access counting needs")


@pytest.mark.skipif(not kernels.INTERPRETED, reason="counts interpreted launches only")
def test_access_counting_on_installed_triton():
    """Loads, stores and launches of a real interpreted op; the hooks undone afterwards
    (the load/store arguments differ by version: 3.3-3.6 and 3.9 both counted)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    names = ("create_masked_load", "create_masked_store")
    before = ({n: vars(builder).get(n) for n in names},
              interpreter.GridExecutor.__dict__["__call__"])
    x = torch.randn(4, 3, 5, 5)
    with internals.count_accesses() as counts:
        kernels.batch_norm(x, torch.zeros(3), torch.ones(3), training=False)
    kinds = {a[0] for a in counts.accesses}
    assert kinds == {"load", "store"} and counts.launches and all(p > 0 for _, p in counts.launches)
    written = sum(a[4] for a in counts.accesses if a[0] == "store")
    assert written == x.numel() * x.element_size()  # y, once
    assert ({n: vars(builder).get(n) for n in names},
            interpreter.GridExecutor.__dict__["__call__"]) == before


@pytest.mark.parametrize("broken", ["binder", "pack_args"])
def test_binding_unavailable(monkeypatch, broken):
    import triton.runtime.jit as jit

    fn = types.SimpleNamespace(_pack_args=lambda backend: None)  # another signature
    if broken == "binder":
        monkeypatch.setattr(jit, "create_function_from_signature", lambda sig, backend: None)
        fn = object()
    else:
        monkeypatch.setattr(jit.JITFunction, "_pack_args", fn._pack_args, raising=False)
    launch = internals.Launch("", fn, (), {}, (1,))
    with _unavailable("ahead-of-time binding"):
        internals.bind(launch, None)
    assert internals.available()["ahead-of-time binding"] is not None


def test_require_names_the_first_unavailable_feature(monkeypatch):
    import triton.runtime.jit as jit

    internals.require()  # all available here
    monkeypatch.setattr(jit, "create_function_from_signature", lambda: None)
    internals.require(internals.RECORDING)
    with _unavailable("ahead-of-time binding"):
        internals.require(internals.RECORDING, internals.BINDING)


def test_traffic_cli_unavailable_one_line_exit_2(monkeypatch, capsys, tmp_path):
    from triton.runtime import interpreter

    from bnbench import cli

    monkeypatch.delattr(interpreter, "interpreter_builder")
    status = cli.main(["traffic", "--shapes", "8x16x7x7", "--layouts", "nchw", "--fusions",
                       "none", "--no-parallelism", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("bnbench traffic: unavailable: access counting needs")
    assert "3.3.1, 3.6.0, 3.9.0" in err and "Traceback" not in err


def test_inspect_cli_unavailable_one_line_exit_2(monkeypatch, capsys, tmp_path):
    import triton.runtime.jit as jit

    from bnbench import cli

    monkeypatch.setattr(jit, "create_function_from_signature", lambda: None)
    status = cli.main(["inspect", "--arch", "90", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("bnbench inspect: unavailable: ahead-of-time binding needs")
    assert "3.3.1, 3.6.0, 3.9.0" in err


def test_inspect_relays_the_aot_subprocess_unavailable(monkeypatch):
    """`python -m bnbench.aot` says `unavailable: ...` and exits 2; inspect raises it."""
    from bnbench import inspect as bn_inspect

    line = "ahead-of-time binding needs X (installed Triton 9.9; checked against Triton ...)"
    monkeypatch.setattr(bn_inspect.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 2, "", f"some warning\nunavailable: {line}\n"))
    with pytest.raises(internals.TritonInternalsUnavailable) as got:
        bn_inspect.compile_variants((90,))
    assert str(got.value) == line and got.value.feature == "ahead-of-time binding"


def test_aot_main_unavailable_exit_2():
    """The AOT driver itself, in a process where binding's internals are broken."""
    script = (
        "import sys, triton.runtime.jit as j\n"
        "j.create_function_from_signature = lambda: None\n"
        "import bnbench.aot as a\n"
        "sys.exit(a.main(['--arch', '90', '--match', '^eval nchw float32/float32 general']))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        "unavailable: ahead-of-time binding needs")
    assert out.stdout == ""


def test_inspect_runs_outside_the_source_tree(monkeypatch, tmp_path):
    """`python -m bnbench.aot` from another directory (the installed package, not the cwd)."""
    from bnbench import inspect as bn_inspect

    monkeypatch.chdir(tmp_path)
    df = bn_inspect.compile_variants((90,), r"^eval nchw float32/float32 general")
    assert len(df) and (df.error == "").all() and (df.registers > 0).all()
