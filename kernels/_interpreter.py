"""Patches for Triton's interpreter (``TRITON_INTERPRET=1``); compiled kernels are untouched.

Two independent patches, each installed only where Triton's internals are the ones it was
written against, and checked per version by what those internals are and do (never by a
version number): where they differ, that patch is silently off and the interpreter runs as
Triton ships it. :func:`install` returns which of them are on; :data:`INSTALLED` keeps it.

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

import inspect

from . import _versions

_versions.check()  # imported by kernels.ops before its ops are defined: floors first

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
