"""A speed-up for Triton's interpreter (``TRITON_INTERPRET=1``); compiled kernels are untouched.

The interpreter patches ``triton.language`` before a launch and restores it after; but it
also re-patches on every call of a ``@triton.jit`` helper inside the kernel, through
``inspect.getmembers`` over the language modules: about a millisecond per call, which made
these kernels' many small helpers (``kernels._common``) cost most of the interpreter's time.
The language stays patched for the whole launch, so the re-patching does nothing; this
module remembers, per launch, which language modules are already patched and skips it.

Installed by ``kernels`` when the interpreter is active, only if Triton's internals are the
ones this was written against (Triton 3.x: ``interpreter._patch_lang``,
``interpreter.GridExecutor``); otherwise nothing changes.
"""

import inspect


def install():
    """Memoise the interpreter's language patching within each launch (idempotent)."""
    try:
        from triton.runtime import interpreter
        import triton.language as tl

        original_patch = interpreter._patch_lang
        original_launch = interpreter.GridExecutor.__call__
        empty_scope = interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return False
    if getattr(interpreter, "_bnbench_memo", False):
        return True
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
