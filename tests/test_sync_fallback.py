"""The README's SyncBatchNorm script under torchrun on a CPU, without TRITON_INTERPRET (the
torch fallback of kernels.SyncBatchNorm) and with it (the kernels through the interpreter):
both run and print the same last loss (issue 23)."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_script():
    text = (ROOT / "README.md").read_text()
    after = text.split("save it as `sync_train.py`", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


# A worker that dies in gloo's C++ code ("terminate called without an active exception",
# SIGABRT): seen once, in CI with the suite beside it on 2 cores, not reproduced here in 18
# runs (12 of them three at once). Such a run is started once more and a second such death
# fails the test; any other failure (an exception, a wrong loss) fails at once.
TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(script, interpret, tries=2):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    for attempt in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
             "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
             str(script)],
            cwd=script.parent, env=env, capture_output=True, text=True, timeout=1200,
            start_new_session=True)  # a timeout kills torchrun; its workers die with it
        if out.returncode == 0 or TEARDOWN_ABORT not in out.stderr:
            break
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    found = re.search(r"2 process\(es\): .*last loss (\S+)", out.stdout)
    assert found, out.stdout
    return float(found.group(1))


def test_the_readme_sync_script_runs_on_cpu_without_the_interpreter(tmp_path):
    script = tmp_path / "sync_train.py"
    script.write_text(readme_script())
    fallback = torchrun(script, interpret=False)
    interpreted = torchrun(script, interpret=True)
    assert abs(fallback - interpreted) <= 1e-3, (fallback, interpreted)
