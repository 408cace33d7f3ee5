"""`bnbench train --nproc N`: the seed-000 experiment over N processes (torch.distributed).

The processes are started here with ``torch.multiprocessing`` (spawn): gloo on 127.0.0.1
without a GPU (the kernels through Triton's interpreter in each process), NCCL with one GPU
per process on a machine with N GPUs.  Each process trains the same model
(``kernels.SyncBatchNorm`` under DistributedDataParallel, see ``train.train_variant``'s
``shard``) on its part of every batch; rank 0's rows (the whole batch's losses and
accuracies) come back to the caller.
"""

import os
import socket
import tempfile
import traceback

import torch


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, job, out_dir):
    if job["interpret"]:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    try:
        import torch.distributed as dist

        from . import train

        torch.set_num_threads(job["threads"])
        device = job["device"]
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        try:
            import kernels

            kernels.set_interpreter_plans(job["fast_plans"])
            experiment = train.EXPERIMENTS[job["experiment"]]
            data = train.load_digits_split(experiment.image_size, **job["sizes"])
            _, rows = train.train_variant(
                experiment, job["variant"], data, job["epochs"], device, job["seed"],
                max_steps=job["max_steps"], batch_size=job.get("batch_size"),
                lr=job.get("lr"), shard=(rank, world))
        finally:
            dist.destroy_process_group()
        if rank == 0:
            torch.save(rows, os.path.join(out_dir, "rows.pt"))
        message = "ok"
    except BaseException:  # noqa: BLE001 - the traceback goes back to the caller
        message = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(message)


def run_ranks(worker, nproc, job, timeout_s, collect=None):
    """Start ``worker(rank, nproc, port, job, out_dir)`` in `nproc` spawned processes (a free
    port on 127.0.0.1 for the process group), wait at most `timeout_s`, kill what is left.
    Each rank writes ``rank<r>.txt`` into out_dir: "ok" or its traceback.  Raises
    RuntimeError with the failed ranks' tracebacks; else returns ``collect(out_dir)``."""
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        port = _free_port()
        procs = [ctx.Process(target=worker, args=(r, nproc, port, job, out_dir))
                 for r in range(nproc)]
        for p in procs:
            p.start()
        try:
            for p in procs:
                p.join(timeout_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        failed = {}
        for r in range(nproc):
            path = os.path.join(out_dir, f"rank{r}.txt")
            message = open(path).read() if os.path.exists(path) else "no result (killed)"
            if message != "ok":
                failed[r] = message
        if failed:
            raise RuntimeError("\n".join(f"--- rank {r} of {nproc} ---\n{m}"
                                          for r, m in failed.items()))
        return collect(out_dir) if collect else None


def train_variant_distributed(job, nproc, timeout_s=3600):
    """Run `job` (experiment, variant, epochs, max_steps, sizes, seed, device, interpret,
    fast_plans, threads[, batch_size, lr]) on `nproc` processes; return rank 0's rows.
    Raises RuntimeError with a rank's traceback if one fails; leaves no process behind."""
    return run_ranks(_worker, nproc, job, timeout_s,
                     collect=lambda out_dir: torch.load(os.path.join(out_dir, "rows.pt")))
