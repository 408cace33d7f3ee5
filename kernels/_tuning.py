"""Optional autotuning of the launch's num_warps (off by default).

The work split and block sizes come from the shape (kernels._plan); with
autotuning on (``BNBENCH_AUTOTUNE=1`` in the environment, or
``kernels.set_autotune(True)``) each kernel also tries num_warps 4, 8 and 16 the
first time it meets a shape, keeping the fastest.  Configurations that would
give a thread fewer than 16 bytes of a tile (no 16-byte vectors) or more than 16
elements (register spills) are pruned.

Benchmarking runs a kernel several times, so the kernels that update the running
statistics are tuned with ``restore_value``: the statistics are restored after
every trial and updated exactly once per call.  Without a GPU (the interpreter)
every trial is run once and timed as equal, so the first configuration wins.
"""

import contextlib
import os

import triton

NUM_WARPS = (4, 8, 16)
MAX_ELEMS_PER_THREAD = 16
_enabled = os.environ.get("BNBENCH_AUTOTUNE", "0") == "1"
_tuned = {}
_timed = True  # False: trials run once and tie (launches recorded, not run: bnbench.registry)


def set_autotune(enabled):
    """Turn autotuning of num_warps on or off for later launches."""
    global _enabled
    _enabled = bool(enabled)


def autotune_enabled():
    return _enabled


def _prune(configs, named_args, **kwargs):
    """Keep the configs that give each thread 16 bytes to 16 elements of a tile: fewer
    cannot load 16-byte vectors, more spill registers."""
    elems = kwargs["BLOCK_ROW"] * kwargs["BLOCK_COL"]
    least = max(4, 16 // named_args["x_ptr"].element_size())
    kept = [c for c in configs
            if least <= elems // (32 * c.num_warps) <= MAX_ELEMS_PER_THREAD]
    return kept or [min(configs, key=lambda c: abs(elems // (32 * c.num_warps) - least))]


def _do_bench(kernel_call, quantiles):
    import torch

    if _timed and torch.cuda.is_available():
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)
    kernel_call()  # the interpreter: run the trial (restore_value is exercised), time nothing
    return [1.0, 1.0, 1.0]


def launcher(kernel, num_warps, restore=()):
    """(kernel to launch, launch options): `kernel` with the planned num_warps, or its
    autotuned twin (which chooses num_warps itself), restoring `restore` between trials."""
    if not _enabled:
        return kernel, {"num_warps": num_warps}
    key = (kernel, tuple(restore))
    if key not in _tuned:
        _tuned[key] = triton.autotune(
            configs=[triton.Config({}, num_warps=w) for w in NUM_WARPS],
            key=["C", "n_rows", "n_cols"], restore_value=list(restore),
            prune_configs_by={"early_config_prune": _prune}, do_bench=_do_bench,
        )(kernel)
    return _tuned[key], {}


@contextlib.contextmanager
def autotuning(enabled=True, timed=True):
    """Autotuning on (or off) within the block, with autotuners of its own: the launches
    made there try every configuration again, whatever was tuned before (so recording the
    launches of an autotuned call, ``bnbench.aot``, sees every num_warps it may try).
    `timed=False`: the trials are not timed (for launches that are recorded, not run).
    The previous settings and tuned configurations come back on exit."""
    global _enabled, _tuned, _timed
    saved = _enabled, _tuned, _timed
    _enabled, _tuned, _timed = bool(enabled), {}, bool(timed)
    try:
        yield
    finally:
        _enabled, _tuned, _timed = saved
