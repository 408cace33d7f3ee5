"""The one place that touches Triton's internals (anything not in Triton's documented API).

Each feature probes the internals it needs when it is used, and checks them by what they
are (names, signatures, attributes), never by a version number. The features checked
against Triton 3.3.1, 3.6.0 and 3.9.0 (``CHECKED``; the version matrix's environments run
``tests/test_versions.py`` on each) are:

``launch recording`` (:func:`record_launches`, :class:`Launch`)
    Replaces, within a block, ``JITFunction.run`` (``run(self, *args, grid, warmup,
    **kwargs)`` in every version checked) and the interpreter's ``InterpretedFunction``
    launch: a class-level ``run`` in Triton 3.4+, whereas Triton 3.3 sets ``run`` on each
    instance and launches ``kernel[grid]`` through ``InterpretedFunction.__getitem__``
    (recorded there; an autotuned launch under 3.3's interpreter is not recorded). Used by
    ``bnbench.aot``, ``bnbench traffic`` (program counts) and ``bnbench gpu-day``.

``access counting`` (:func:`count_accesses`)
    Wraps, within a block, the interpreter's ``interpreter_builder.create_masked_load`` and
    ``create_masked_store`` (their ``ptrs`` and ``mask`` arguments are interpreter
    ``TensorHandle`` objects: ``.data`` NumPy arrays, ``get_element_ty()``; the other
    arguments differ by version: ``cache_modifier, eviction_policy`` up to 3.6,
    ``cache_policy`` in 3.9) and ``GridExecutor.__call__`` (its ``fn`` and ``grid``).
    Used by ``bnbench traffic``.

``ahead-of-time binding`` (:func:`bind`, :func:`signature_key`)
    Specialises a recorded launch as a real launch would: Triton's own binder
    (``triton.runtime.jit.create_function_from_signature(sig, kparams, backend)``, with
    ``triton.compiler.make_backend``), then ``JITFunction._pack_args`` (Triton 3.4+) or, on
    Triton 3.3 where ``run`` inlines those steps, the same steps copied from 3.3's ``run``
    (``triton._utils.find_paths_if``/``get_iterable_path``, ``backend.parse_options``/
    ``parse_attr``). Used by ``bnbench.aot`` (``bnbench inspect``, ``bnbench gpu-day``).

Where those internals are missing or different, the feature raises
:class:`TritonInternalsUnavailable` (a ``RuntimeError``) naming the feature, what was
missing, the installed Triton version and the versions checked; :func:`available` reports
every feature without raising. The commands that need one (``bnbench traffic``,
``bnbench inspect``) then print one line, ``unavailable: <reason>``, and exit with status 2.

Two patches of the interpreter (``TRITON_INTERPRET=1``; compiled kernels are untouched) are
optional, so they do not raise: each is installed only where Triton's internals are the ones
it was written against, and elsewhere is silently off and the interpreter runs as Triton
ships it. :func:`install` (called by ``kernels.ops`` when the kernels are interpreted)
returns which of them are on; :data:`INSTALLED` keeps it.

``index`` (a fix: without it the kernels fail under Triton <= 3.6 with NumPy >= 2.4)
    The interpreter holds every scalar as a 1-element NumPy array, and Triton up to 3.6
    converts one to a Python int (``tensor.__index__``, used by ``range(start, end)`` with
    run-time bounds, as in every kernel's tile loop) by ``int(array)``. NumPy 2.4 removed
    that conversion for arrays of ndim > 0 (deprecated since 1.25), so the loop raises
    ``TypeError('only 0-dimensional arrays can be converted to Python scalars')``, which
    the interpreter reports as an ``InterpreterError``. Triton 3.7+ converts
    ``int(array.squeeze())``. This patch wraps ``interpreter._patch_lang_tensor`` so that,
    after Triton sets its ``__index__``, a version that fails on a 1-element array is
    replaced by the squeezing one (through the same patch scope, so Triton restores it
    after the launch as it restores its own). On Triton 3.7+ the check finds nothing to
    fix; without ``_patch_lang_tensor`` the patch is off.

``memo`` (speed only)
    The interpreter patches ``triton.language`` before a launch and restores it after; but
    it also re-patches on every call of a ``@triton.jit`` helper inside the kernel, through
    ``inspect.getmembers`` over the language modules: about a millisecond per call, which
    made these kernels' many small helpers (``kernels._common``) cost most of the
    interpreter's time. The language stays patched for the whole launch, so the
    re-patching does nothing; this patch remembers, per launch, which language modules are
    already patched and skips it. Needs ``interpreter._patch_lang`` returning a
    ``_LangPatchScope`` (Triton 3.4+) and ``interpreter.GridExecutor``; on Triton 3.3
    (``_patch_lang`` patches in place and returns nothing) it is off.
"""

import contextlib
import inspect
import math
from dataclasses import dataclass, field

from . import _versions

_versions.check()  # imported by kernels.ops before its ops are defined: floors first

CHECKED = ("3.3.1", "3.6.0", "3.9.0")  # the Triton versions every feature was checked on
RECORDING, COUNTING, BINDING = "launch recording", "access counting", "ahead-of-time binding"
FEATURES = (RECORDING, COUNTING, BINDING)


def _triton_version():
    try:
        import triton
    except ImportError:
        return "none"
    return getattr(triton, "__version__", "unknown")


class TritonInternalsUnavailable(RuntimeError):
    """A feature of this module cannot run on the installed Triton: its internals differ
    from those of the versions it was checked against (``CHECKED``)."""

    def __init__(self, feature, missing, message=None):
        self.feature, self.missing = feature, missing
        super().__init__(message or (
            f"{feature} needs {missing} (installed Triton {_triton_version()}; checked "
            f"against Triton {', '.join(CHECKED)})"))

    @classmethod
    def relayed(cls, message):
        """The exception another process reported as ``unavailable: <message>``."""
        feature = next((f for f in FEATURES if message.startswith(f)), "")
        return cls(feature, "", message)


def require(*features):
    """Raise TritonInternalsUnavailable for the first of `features` (default: all) that
    cannot run here."""
    for feature, reason in available().items():
        if reason is not None and (not features or feature in features):
            raise TritonInternalsUnavailable(feature, "", reason)


def available():
    """{feature: None where it can run here, else the reason it cannot} (never raises)."""
    probes = {RECORDING: lambda: _launch_hooks(None, None), COUNTING: _counting_internals,
              BINDING: _binding_internals}
    out = {}
    for feature, probe in probes.items():
        try:
            probe()
            out[feature] = None
        except TritonInternalsUnavailable as e:
            out[feature] = str(e)
    return out


def _keyword(fn, name):
    """True when callable `fn` takes a parameter `name` (False where it has no signature)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# launch recording

@dataclass
class Launch:
    """One recorded kernel launch: the kernel and the arguments it was called with."""

    scenario: str
    fn: object  # a JITFunction, or the interpreter's InterpretedFunction
    args: tuple
    kwargs: dict
    grid: tuple


@contextlib.contextmanager
def record_launches(scenario="", execute=False, keep_args=True):
    """Within the block, `kernel[grid](...)` appends a Launch to the yielded list instead of
    running (compiled or interpreted kernels alike; tensors may be on the meta device), or,
    with `execute`, before running as usual (to see which variants a real run launched).
    Without `keep_args` a Launch holds no arguments (``args=()``, ``kwargs={}``): the kernel
    and grid only, so the recording keeps no tensor alive (a kept gradient makes autograd
    copy it rather than take it: what counts allocations must not change them).
    Raises TritonInternalsUnavailable (before the block) where the launch internals differ."""
    launches = []
    originals = {}  # (class, attribute) -> original

    def saved(self, name):
        return next(o for (cls, n), o in originals.items() if n == name and isinstance(self, cls))

    def recorded(self, args, kwargs, grid):
        return Launch(scenario, self, args if keep_args else (), kwargs if keep_args else {},
                      tuple(grid))

    def record(self, *args, grid, warmup=False, **kwargs):
        launches.append(recorded(self, args, kwargs, grid))
        if execute:
            return saved(self, "run")(self, *args, grid=grid, warmup=warmup, **kwargs)

    def record_grid(self, grid):
        def launch(*args, **kwargs):
            launches.append(recorded(self, args, kwargs, grid))
            if execute:
                return saved(self, "__getitem__")(self, grid)(*args, **kwargs)
        return launch

    for cls, name, replacement in _launch_hooks(record, record_grid):
        originals[cls, name] = cls.__dict__[name]
        setattr(cls, name, replacement)
    try:
        yield launches
    finally:
        for (cls, name), original in originals.items():
            setattr(cls, name, original)


def _launch_hooks(record, record_grid):
    """(class, attribute, replacement) that route `kernel[grid](...)` to the recorder.

    ``JITFunction.run(self, *args, grid, ...)`` (every version checked), and the
    interpreter's ``InterpretedFunction``: a class-level ``run`` taking ``grid`` (Triton
    3.4+), or ``__getitem__`` (Triton 3.3: ``run`` is set per instance). Raises
    TritonInternalsUnavailable where neither form is found."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        raise TritonInternalsUnavailable(RECORDING, f"triton.runtime.jit.JITFunction ({e})")
    run = JITFunction.__dict__.get("run")
    if run is None or not _keyword(run, "grid"):
        raise TritonInternalsUnavailable(
            RECORDING, "JITFunction.run(self, *args, grid, warmup, **kwargs)")
    hooks = [(JITFunction, "run", record)]
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return hooks  # no interpreter: only compiled launches to record
    run = InterpretedFunction.__dict__.get("run")
    if run is not None and _keyword(run, "grid"):
        hooks.append((InterpretedFunction, "run", record))
    elif callable(InterpretedFunction.__dict__.get("__getitem__")):
        hooks.append((InterpretedFunction, "__getitem__", record_grid))
    else:
        raise TritonInternalsUnavailable(
            RECORDING, "triton.runtime.interpreter.InterpretedFunction with a class-level "
                       "run(self, *args, grid, ...) (Triton 3.4+) or __getitem__(grid) (3.3)")
    return hooks


# ---------------------------------------------------------------------------------------------
# access counting

@dataclass
class Accesses:
    """What :func:`count_accesses` saw: global loads and stores of the unmasked lanes, and
    launches of interpreted kernels."""

    accesses: list = field(default_factory=list)  # (kind, ndim, lowest, highest address, bytes)
    launches: list = field(default_factory=list)  # (kernel name, programs)

    def record(self, kind, ptrs, mask):
        """One load or store of the interpreter's pointer handle `ptrs` under `mask`."""
        addresses = ptrs.data[mask.data] if mask is not None else ptrs.data.ravel()
        if addresses.size:
            width = ptrs.get_element_ty().primitive_bitwidth // 8
            self.accesses.append((kind, ptrs.data.ndim, int(addresses.min()),
                                  int(addresses.max()), addresses.size * width))


def _counting_internals():
    """(interpreter, {builder method: (position of ptrs, position of mask)}), or raises."""
    try:
        from triton.runtime import interpreter
    except ImportError as e:
        raise TritonInternalsUnavailable(COUNTING, f"triton.runtime.interpreter ({e})")
    builder = getattr(interpreter, "interpreter_builder", None)
    if builder is None:
        raise TritonInternalsUnavailable(COUNTING, "triton.runtime.interpreter.interpreter_builder")
    positions = {}
    for name in ("create_masked_load", "create_masked_store"):
        method = getattr(builder, name, None)
        try:
            params = list(inspect.signature(method).parameters)
        except (TypeError, ValueError):
            params = []
        if "ptrs" not in params or "mask" not in params:
            raise TritonInternalsUnavailable(
                COUNTING, f"interpreter_builder.{name}(ptrs, ..., mask, ...)")
        positions[name] = (params.index("ptrs"), params.index("mask"))
    executor = getattr(interpreter, "GridExecutor", None)
    if executor is None or not callable(executor.__dict__.get("__call__")) or not (
            _keyword(executor.__init__, "fn") and _keyword(executor.__init__, "grid")):
        raise TritonInternalsUnavailable(
            COUNTING, "triton.runtime.interpreter.GridExecutor(fn, arg_names, grid) with a "
                      "__call__")
    handle = getattr(interpreter, "TensorHandle", None)
    if handle is None or not callable(getattr(handle, "get_element_ty", None)):
        raise TritonInternalsUnavailable(
            COUNTING, "triton.runtime.interpreter.TensorHandle.get_element_ty")
    return interpreter, positions


@contextlib.contextmanager
def count_accesses():
    """Within the block, every interpreted global load and store (bytes of its unmasked
    lanes) and every interpreted launch is recorded in the yielded :class:`Accesses`.
    Only interpreted kernels (``TRITON_INTERPRET=1``) are seen. Raises
    TritonInternalsUnavailable (before the block) where the interpreter's internals differ."""
    interpreter, positions = _counting_internals()
    counts = Accesses()
    builder = interpreter.interpreter_builder
    saved = {name: (name in vars(builder), vars(builder).get(name)) for name in positions}

    def counted(name, kind):
        original = getattr(builder, name)
        at_ptrs, at_mask = positions[name]

        def wrapper(*args, **kwargs):
            ptrs = args[at_ptrs] if len(args) > at_ptrs else kwargs["ptrs"]
            mask = args[at_mask] if len(args) > at_mask else kwargs.get("mask")
            counts.record(kind, ptrs, mask)
            return original(*args, **kwargs)
        return wrapper

    grid_call = interpreter.GridExecutor.__dict__["__call__"]

    def counted_call(executor, *args, **kwargs):
        counts.launches.append((executor.fn.__name__, math.prod(executor.grid)))
        return grid_call(executor, *args, **kwargs)

    builder.create_masked_load = counted("create_masked_load", "load")
    builder.create_masked_store = counted("create_masked_store", "store")
    interpreter.GridExecutor.__call__ = counted_call
    try:
        yield counts
    finally:
        for name, (had, value) in saved.items():
            if had:
                setattr(builder, name, value)
            else:
                delattr(builder, name)
        interpreter.GridExecutor.__call__ = grid_call


# ---------------------------------------------------------------------------------------------
# ahead-of-time binding

def _binding_internals(fn=None):
    """(make_backend, create_function_from_signature, pack) for kernel `fn` (default: a
    JITFunction), or raises; pack(fn, backend, kwargs, bound_args, specialization, options)
    -> (options, signature, constexprs, attrs)."""
    try:
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except ImportError as e:
        raise TritonInternalsUnavailable(
            BINDING, f"triton.compiler.make_backend and "
                     f"triton.runtime.jit.create_function_from_signature ({e})")
    try:
        params = list(inspect.signature(create_function_from_signature).parameters)
    except (TypeError, ValueError):
        params = []
    if len(params) != 3:
        raise TritonInternalsUnavailable(
            BINDING, "triton.runtime.jit.create_function_from_signature(sig, kparams, backend)")
    pack_args = getattr(JITFunction if fn is None else fn, "_pack_args", None)
    if pack_args is not None:  # Triton 3.4+: the step JITFunction.run takes
        if not all(_keyword(pack_args, p) for p in
                   ("backend", "kwargs", "bound_args", "specialization", "options")):
            raise TritonInternalsUnavailable(
                BINDING, "JITFunction._pack_args(backend, kwargs, bound_args, "
                         "specialization, options)")
        return (make_backend, create_function_from_signature,
                lambda fn, *rest: fn._pack_args(*rest))
    try:
        from triton._utils import find_paths_if, get_iterable_path  # noqa: F401
    except ImportError as e:
        raise TritonInternalsUnavailable(
            BINDING, f"JITFunction._pack_args (Triton 3.4+) or triton._utils.find_paths_if "
                     f"and get_iterable_path (Triton 3.3) ({e})")
    return make_backend, create_function_from_signature, _pack_args_33


def bind(launch, target):
    """(options, signature, constexprs, attrs) of a recorded :class:`Launch` exactly as a
    real launch on `target` (a ``GPUTarget``) would have them; raises
    TritonInternalsUnavailable where Triton's binding internals differ."""
    make_backend, create_function_from_signature, pack = _binding_internals(launch.fn)
    backend = make_backend(target)
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound = binder(*launch.args, **launch.kwargs)
    if not (isinstance(bound, tuple) and len(bound) == 3):
        raise TritonInternalsUnavailable(
            BINDING, "a binder returning (bound_args, specialization, options)")
    bound_args, specialization, options = bound
    return pack(launch.fn, backend, launch.kwargs, bound_args, specialization, options)


def _pack_args_33(fn, backend, kwargs, bound_args, specialization, options=None):
    """Triton 3.3's JITFunction.run inlines what 3.4+ names ``_pack_args``: the same steps
    (options, signature, constexprs, attributes), copied from 3.3's ``run``."""
    from triton._utils import find_paths_if, get_iterable_path

    if not (hasattr(backend, "parse_options") and hasattr(backend, "parse_attr")):
        raise TritonInternalsUnavailable(BINDING, "the backend's parse_options and parse_attr")
    options = backend.parse_options(kwargs)
    sigvals = [x[0] for x in specialization]
    signature = {p.name: v for p, v in zip(fn.params, sigvals)}
    constexprs = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {path: get_iterable_path(list(bound_args.values()), path) for path in constexprs}
    attrvals = [x[1] for x in specialization]
    attrs = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in attrs}
    return options, signature, constexprs, attrs


def signature_key(launch):
    """A string that is equal for two launches exactly when they compile to the same variant
    (bound for sm_90: types, constexprs, specialisation attributes, num_warps)."""
    from triton.backends.compiler import GPUTarget

    _, signature, constexprs, attrs = bind(launch, GPUTarget("cuda", 90, 32))
    return str((sorted(signature.items()), sorted(constexprs.items(), key=str),
                sorted(attrs.items(), key=str), launch.kwargs.get("num_warps")))


# ---------------------------------------------------------------------------------------------
# the interpreter's patches (optional: silently off where the internals differ)

INSTALLED = {}  # patch name -> True/False, set by install()


def _interpreter():
    """(triton.runtime.interpreter, triton.language), or None where there is none."""
    try:
        from triton.runtime import interpreter
        import triton.language as tl
    except ImportError:
        return None
    return interpreter, tl


class _Probe:
    """What ``tensor.__index__`` is called on: an object with ``handle.data``."""

    def __init__(self, data):
        self.handle = type("Handle", (), {"data": data})()


def _index_fails(index):
    """True when `index` (a ``__index__`` implementation) cannot convert the interpreter's
    1-element array scalar (``int(np.array([3]))`` under NumPy >= 2.4)."""
    import numpy as np

    try:
        return index(_Probe(np.array([3], dtype=np.int32))) != 3
    except TypeError:
        return True


def _squeezed_index(self):
    return int(self.handle.data.squeeze())


def install_index_fix():
    """Fix ``tensor.__index__`` of Triton <= 3.6's interpreter for NumPy >= 2.4 (see the
    module docstring); True if installed (or already), False where not needed or not
    applicable."""
    found = _interpreter()
    if found is None:
        return False
    interpreter, tl = found
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or not callable(original):
        return False
    if getattr(original, "_bnbench_index_fix", False):
        return True
    try:
        params = list(inspect.signature(original).parameters)
    except (TypeError, ValueError):
        return False
    if len(params) not in (1, 2):  # (tensor) in Triton 3.3, (tensor, scope) in 3.4-3.6
        return False

    # Does Triton's own __index__ fail? Run the original against a stand-in class.
    class Stand:
        pass

    probe_args = (Stand,) if len(params) == 1 else (Stand, _Scope())
    try:
        original(*probe_args)
    except Exception:
        return False  # internals differ from what this was written against
    index = Stand.__dict__.get("__index__")
    if index is None or not _index_fails(index):
        return False  # nothing to fix (Triton 3.7+, or NumPy < 2.4)

    def patch_lang_tensor(tensor, *scope):
        original(tensor, *scope)
        if _index_fails(getattr(tensor, "__index__")):
            if scope:
                scope[0].set_attr(tensor, "__index__", _squeezed_index)
            else:
                tensor.__index__ = _squeezed_index

    patch_lang_tensor._bnbench_index_fix = True
    patch_lang_tensor._bnbench_original = original
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


class _Scope:
    """A stand-in for Triton's ``_LangPatchScope`` when probing ``_patch_lang_tensor``."""

    def set_attr(self, obj, name, value):
        setattr(obj, name, value)


def install_memo():
    """Memoise the interpreter's language patching within each launch (idempotent); True if
    installed (or already), False where Triton's internals differ."""
    found = _interpreter()
    if found is None:
        return False
    interpreter, tl = found
    try:
        original_patch = interpreter._patch_lang
        original_launch = interpreter.GridExecutor.__call__
        empty_scope = interpreter._LangPatchScope
    except AttributeError:
        return False
    if getattr(interpreter, "_bnbench_memo", False):
        return True
    if not (callable(empty_scope) and hasattr(empty_scope, "restore")
            and callable(original_patch) and callable(original_launch)):
        return False
    patched = set()  # ids of the language modules patched during the current launch
    langs_of = {}  # id of a module's globals -> ids of the language modules among them

    def patch_lang(fn):
        key = id(fn.__globals__)
        if key not in langs_of:
            langs_of[key] = {id(v) for v in fn.__globals__.values()
                             if inspect.ismodule(v) and v in (tl, tl.core)}
        langs = langs_of[key]
        if langs and langs <= patched:
            return empty_scope()  # already patched for this launch: nothing to do or undo
        scope = original_patch(fn)
        patched.update(langs)
        return scope

    def launch(self, *args, **kwargs):
        patched.clear()
        try:
            return original_launch(self, *args, **kwargs)
        finally:
            patched.clear()

    interpreter._patch_lang = patch_lang
    interpreter.GridExecutor.__call__ = launch
    interpreter._bnbench_memo = True
    return True


def install():
    """Install every patch that applies; returns {"index": bool, "memo": bool}."""
    INSTALLED.update(index=install_index_fix(), memo=install_memo())
    return dict(INSTALLED)
