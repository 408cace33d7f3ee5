"""`bnbench comm`: the collectives kernels.SyncBatchNorm issues per rank, and their bytes.

Measured, not derived: one process runs ``kernels.SyncBatchNorm`` forward and backward in
a process group of one rank (gloo on 127.0.0.1, or NCCL on a GPU) with every
``torch.distributed`` collective recorded (kind, elements, dtype).  A rank's payload does
not depend on the world size; what it receives does, and is computed per world size:

* ``all_gather`` of n values: a rank sends its n and receives the others' (w - 1) * n;
* ``all_reduce`` of n values: ring algorithm (gloo's and NCCL's large-message choice), a
  rank sends and receives 2 (w - 1) / w * n values.

``torch.nn.SyncBatchNorm`` does not run on a CPU, so its row is read from its source
(``torch/nn/modules/_functions.py``): forward, one all_gather of (mean, invstd, count),
2C + 1 float32 values per rank; backward, one all_reduce of (sum_dy, sum_dy_xmu), 2C
values.  The first call of kernels.SyncBatchNorm per (C, dtype, group) also exchanges
(rank, C, dtype) with all_gather_object (a few hundred pickled bytes), reported apart.

Writes ``comm.csv`` (one row per implementation x phase x world size) and prints the table.
"""

import sys

from .arguments import integers, positive_int

WORLDS = (2, 8, 64)
METHOD = ("torch.distributed collectives recorded on one rank (gloo, NCCL on a GPU), bytes per "
          "world size computed (ring all_reduce); torch.nn.SyncBatchNorm's from its source")
CHANNELS = 256


def _record(dist):
    """Wrap the collectives of torch.distributed; returns (calls, restore)."""
    calls = []
    saved = {name: getattr(dist, name) for name in ("all_gather", "all_reduce",
                                                    "all_gather_object")}

    def wrap(name):
        def recorded(*args, **kwargs):
            if name == "all_gather":
                t = args[1]
                calls.append((name, t.numel(), t.element_size()))
            elif name == "all_reduce":
                t = args[0]
                calls.append((name, t.numel(), t.element_size()))
            else:
                calls.append((name, 0, 0))
            return saved[name](*args, **kwargs)
        return recorded

    for name in saved:
        setattr(dist, name, wrap(name))

    def restore():
        for name, fn in saved.items():
            setattr(dist, name, fn)
    return calls, restore


def _bytes(kind, numel, size, world):
    """(sent, received) bytes of one rank for one collective."""
    payload = numel * size
    if kind == "all_gather":
        return payload, (world - 1) * payload
    ring = 2 * (world - 1) / world * payload
    return ring, ring


def measure(channels=CHANNELS, shape=(4, 7, 7)):
    """{(stats, phase): [(kind, numel, element size), ...]} for kernels.SyncBatchNorm."""
    from unittest import mock

    import torch
    import torch.distributed as dist

    import kernels
    import kernels.sync

    from .registry import one_rank_group

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    with one_rank_group("nccl" if device == "cuda" else "gloo") as group:
        for stats in ("single_pass", "two_pass"):
            bn = kernels.SyncBatchNorm(channels, stats=stats, device=device)
            bn._group = lambda: group  # noqa: E731 - one rank, but take the synchronised path
            x = torch.randn(shape[0], channels, *shape[1:], device=device, requires_grad=True)
            calls, restore = _record(dist)
            # a group of one is the single-process op: make it take the synchronised path
            one_rank = mock.patch.object(kernels.sync, "_synchronises", lambda group: True)
            try:
                one_rank.start()
                bn(x).sum().backward()  # first call: the group check
                out[(stats, "first call")] = list(calls)
                calls.clear()
                y = bn(x)
                out[(stats, "forward")] = list(calls)
                calls.clear()
                y.sum().backward()
                out[(stats, "backward")] = list(calls)
            finally:
                one_rank.stop()
                restore()
    return out


def rows(measured, channels, worlds):
    """Long-format rows: implementation, phase, world, collectives, values and bytes."""
    table = dict(measured)
    table[("torch.nn.SyncBatchNorm (from source)", "forward")] = [
        ("all_gather", 2 * channels + 1, 4)]
    table[("torch.nn.SyncBatchNorm (from source)", "backward")] = [
        ("all_reduce", 2 * channels, 4)]
    out = []
    for (impl, phase), calls in table.items():
        name = impl if impl.startswith("torch") else f"kernels {impl}"
        for world in worlds:
            sent = received = 0.0
            for kind, numel, size in calls:
                s, r = _bytes(kind, numel, size, world)
                sent, received = sent + s, received + r
            out.append(dict(
                implementation=name, phase=phase, world=world, channels=channels,
                collectives=len(calls),
                ops="+".join(f"{k}({n})" if n else k for k, n, _ in calls) or "none",
                values_per_rank=sum(n for _, n, _ in calls),
                sent_bytes=round(sent), received_bytes=round(received)))
    return out


def run_command(args):
    import pandas as pd

    import torch

    import kernels

    from .environment import STAMP_COLUMNS, command_out, stamp

    out = command_out("comm", args.out, "results", ["comm.csv"])
    if out is None:
        return 2
    table = pd.DataFrame(rows(measure(args.channels), args.channels, args.worlds))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = stamp(table, device, interpreted=bool(kernels.INTERPRETED), method=METHOD)
    path = out / "comm.csv"
    table.to_csv(path, index=False)
    show = table[table.phase != "first call"].drop(columns=list(STAMP_COLUMNS))
    print(show.to_string(index=False))
    print(f"first call of kernels.SyncBatchNorm also: one all_gather_object; written {path}")
    return 0


def add_parser(subparsers):
    p = subparsers.add_parser(
        "comm", help="collectives and bytes per rank of kernels.SyncBatchNorm vs torch's",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=positive_int, default=CHANNELS, help=f"C (default {CHANNELS})")
    p.add_argument("--worlds", type=integers("world sizes", "2,8,64", minimum=2), default=WORLDS,
                   help="world sizes, default 2,8,64")
    p.add_argument("--out", default=None,
                   help="folder for comm.csv (default results/; in a checkout, results/local/ "
                        "where results/comm.csv is committed)")
    p.set_defaults(func=run_command)
