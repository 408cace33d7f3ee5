"""Compilation: torch.compile sees the ops as ops, and every Triton kernel variant compiles
for real GPUs (sm_80, sm_90) without a GPU, without register spills, with 16-byte accesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import kernels
from helpers import assert_close

ROOT = Path(__file__).resolve().parents[1]


def _net(device):
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), kernels.BatchNorm2d(6, activation="relu"),
        nn.Conv2d(6, 4, 3), kernels.BatchNorm2d(4, momentum=None, stats="two_pass"),
    ).to(device)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph_matches_eager(train, device):
    """fullgraph=True fails on any graph break; the compiled model must equal eager,
    gradients and running stats included (momentum=None too, which torch's own BatchNorm
    cannot compile without a data-dependent guard)."""
    torch.manual_seed(0)
    eager = _net(device).train(train)
    compiled_model = _net(device).train(train)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = torch.randn(2, 3, 9, 7, device=device)
        y, y_c = eager(x), compiled(x)
        assert_close(y_c, y.double(), torch.float32, "compiled output")
        if train:
            y.square().sum().backward()
            y_c.square().sum().backward()
    if train:
        for (name, p), p_c in zip(eager.named_parameters(), compiled_model.parameters()):
            assert_close(p_c.grad, p.grad.double(), torch.float32, f"grad of {name}")
    for (name, b), b_c in zip(eager.named_buffers(), compiled_model.buffers()):
        assert torch.allclose(b_c.double(), b.double(), rtol=1e-5, atol=1e-6), name


def test_ops_are_single_graph_nodes(device):
    """Dynamo's explanation: one graph, no breaks, the custom op in it."""
    bn = kernels.BatchNorm2d(5, device=device)
    explanation = torch._dynamo.explain(bn)(torch.randn(3, 5, 4, 4, device=device))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    # the op sits in the forward body of the traced autograd.Function
    code = "".join(m.code for m in explanation.graphs[0].modules() if hasattr(m, "code"))
    assert "bnbench.batch_norm_train" in code


def test_cpu_fallback_without_interpreter():
    """Without TRITON_INTERPRET, CPU tensors use torch's batch norm (documented fallback)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = (
        "import torch, kernels\n"
        "assert not kernels.INTERPRETED and not kernels.uses_triton(torch.empty(1))\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(4, 3, 5, 5)\n"
        "m = kernels.BatchNorm2d(3, activation='relu')\n"
        "ref = torch.nn.BatchNorm2d(3)\n"
        "y, y_ref = m(x), torch.relu(ref(x))\n"
        "assert torch.allclose(y, y_ref) and torch.allclose(m.running_var, ref.running_var)\n"
        "print('fallback ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fallback ok" in out.stdout


@pytest.fixture(scope="module")
def compiled_variants():
    """Every launch the ops can make, compiled for sm_80 and sm_90 (one process per arch)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-m", "bnbench.aot", "--arch", str(arch)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for arch in (80, 90)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, err[-3000:]
        results += json.loads(out)
    return results


@pytest.fixture(scope="module")
def coverage():
    """What the full product of the registry's axes reaches, and what the compile list
    misses: (kernel, "NAME=value" / "pointers=..." / "num_warps=n") features, computed by
    recording every variant's launches (``python -m bnbench.aot --coverage``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "bnbench.aot", "--coverage"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout)
    return {tuple(f) for f in found["reached"]}, {tuple(f) for f in found["missed"]}


def test_compile_list_covers_the_full_product(coverage):
    """Every constexpr value, pointer-type pattern and num_warps that any variant of any op
    (every axis and option value, every shape class) launches is in the compile list."""
    reached, missed = coverage
    assert len({kernel for kernel, _ in reached}) == 6 and len(reached) > 100
    assert not missed, "the compile list misses:\n" + "\n".join(map(str, sorted(missed)))


def test_every_variant_compiles(compiled_variants, coverage):
    failed = [f"{r['arch']} {r['scenario']} {r['kernel']}: {r['error']}"
              for r in compiled_variants if r["error"]]
    assert not failed, "\n".join(failed)
    reached, _ = coverage
    kernels_reached = {kernel for kernel, _ in reached}
    assert {(r["kernel"], r["arch"]) for r in compiled_variants} == {
        (k, a) for k in kernels_reached for a in (80, 90)}
    # every constexpr value and num_warps the ops can launch was compiled, for each arch
    for arch in (80, 90):
        compiled = set()
        for r in compiled_variants:
            if r["arch"] == arch:
                compiled |= {(r["kernel"], f) for f in r["constexprs"].split(", ")}
                compiled.add((r["kernel"], f"num_warps={r['num_warps']}"))
        missing = sorted(f for f in reached
                         if not f[1].startswith("pointers=") and f not in compiled)
        assert not missing, f"sm_{arch}: not compiled: {missing}"


def test_no_register_spills(compiled_variants):
    spills = [f"{r['arch']} {r['scenario']} {r['kernel']}: {r['spill_stores']} B stores, "
              f"{r['spill_loads']} B loads, {r['stack_frame']} B stack"
              for r in compiled_variants
              if r["spill_stores"] or r["spill_loads"] or r["stack_frame"]]
    assert not spills, "\n".join(spills)


def test_16_byte_accesses_on_aligned_inputs(compiled_variants):
    """On aligned contiguous shapes ((32, 64, 56, 56) on the general path, (8, 128, 8, 8) on
    the single-launch path), every kernel's x loads are 16-byte vectors, and the kernels
    that write a tensor store 16-byte vectors."""
    aligned = [r for r in compiled_variants
               if "(32, 64, 56, 56)" in r["scenario"] or "(8, 128, 8, 8)" in r["scenario"]]
    assert aligned
    narrow = []
    for r in aligned:
        if "WRITE_DX=False, WRITE_DRES=False" in r["constexprs"]:
            continue  # dweight/dbias only: no pass over the tensors
        writes_tensor = r["kernel"] in ("_bn_fwd_apply_kernel", "_bn_bwd_dx_kernel",
                                        "_bn_fwd_single_launch_kernel",
                                        "_bn_bwd_single_launch_kernel")
        if r["max_load_bytes"] < 16 or (writes_tensor and r["max_store_bytes"] < 16):
            narrow.append(f"{r['arch']} {r['scenario']} {r['kernel']}: load "
                          f"{r['max_load_bytes']} B, store {r['max_store_bytes']} B")
    assert not narrow, "\n".join(narrow)


def test_inspect_command(tmp_path):
    """`bnbench inspect` writes the per-variant table (a subset here: eval on the aligned shape)."""
    out = subprocess.run(
        [sys.executable, "-m", "bnbench.cli", "inspect", "--match", r"^eval .*\(32, 64",
         "--arch", "90", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "not speeds" in out.stdout
    import pandas as pd

    df = pd.read_csv(tmp_path / "inspect.csv", keep_default_na=False)
    assert len(df) >= 6 and set(df.kernel) == {"_bn_fwd_apply_kernel"} and set(df.arch) == {90}
    assert (df.error == "").all() and (df.registers > 0).all() and (df.max_load_bytes > 0).all()
    assert {"spill_stores", "shared_bytes", "num_warps"} <= set(df.columns)
    from bnbench.environment import STAMP_COLUMNS

    # the metadata every bnbench CSV starts with; no GPU ran it, the compiler did
    assert list(df.columns[:len(STAMP_COLUMNS)]) == list(STAMP_COLUMNS)
    assert set(df.device_type) == {"none"} and set(df.triton_mode) == {"compiled"}
    # progress on stderr, as bnbench run's: the bar reaches every compiled variant
    assert "bnbench inspect: 100%" in out.stderr and f"{len(df)}/{len(df)}" in out.stderr
    assert set(df.method) == {"triton.compile + ptxas for sm_90, no GPU; registers, spills and "
                              "shared memory from the compiled kernel, widest load/store from "
                              "its PTX"}
