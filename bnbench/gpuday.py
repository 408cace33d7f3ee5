"""`bnbench gpu-day`: make the most of a first, short loan of one GPU, within a budget in seconds.

Meant for a machine with one NVIDIA GPU, its preinstalled torch and triton and no network:
run from a checkout with ``PYTHONPATH=. python -m bnbench.cli gpu-day --budget 480 --out
DIR`` (nothing to install). It stops by itself before the budget; everything is written
into DIR as it is made, so a run cut short keeps all it did. Stages, in order:

1. ``environment.json``: device, driver (``nvidia-smi``), versions, SM count, memory,
   measured copy bandwidth, which interpreter/AOT patches apply.
2. ``compile.csv``: every kernel variant the correctness checks and the sweep launch,
   compiled ahead of time in parallel worker processes (``bnbench.aot``) into Triton's
   on-disk cache, with registers, spills and vector widths on this GPU's architecture;
   the later launches then load the compiled kernels instead of compiling one by one.
3. ``correctness.csv``: every kernel variant at least once (the constexpr modes of
   ``bnbench.registry``'s compile list: paths, layouts, dtype patterns, statistics modes,
   options, epilogues, autotuning), compiled, against a float64 reference; one row per check,
   written as it is done; ``coverage`` lines at the end say which variants ran.
4. ``gpu_day.csv`` (+ ``_throughput.png``, ``_speedup.png``, ``_error.png``): the
   prioritised ``bnbench run`` sweep (the same runner, columns and plots), in tiers:
   tier 1 answers the mission's question first (ResNet-50's BatchNorm shapes at N = 32
   and 256, bfloat16 and float32, NCHW and channels_last, train_fwd_bwd and eval, every
   implementation), the next tiers widen it: planned when their estimate fits, and run
   after the planned cases while the clock allows. ``torch.compile`` runs as
   ``torch_compile_dynamic``: one compile with dynamic shapes per (mode, dtype, layout,
   fusion), with a recompile cap that fails loudly rather than running eagerly.
   Its rows have no ``wall_us`` / ``graph_us`` (those are the host stage's).
   Planned after tier 1 when they fit (the dry run lists them either way), and run before
   the sweep: the host-cost stage, ``host_cost.csv`` (+ its PNGs, ``host_cost_host.png``
   among them): ``HOST_TIER``, ResNet-50's BatchNorm shapes at N = 1 and 8 (float32, NCHW,
   training forward + backward and eval, the Triton kernels, cuDNN and native PyTorch)
   with do_bench's device time beside the wall time per call back to back and the
   CUDA-graph replay time (``wall_us``, ``graph_us``), and ``host_paths.csv``: the same for
   each way a user calls the kernels (``bnbench.overhead.device_table``: modules,
   functional, sync in a one-rank NCCL group, fused, folded) beside torch's call; and the
   GPU tests,
   ``gpu_tests.txt``: ``GPU_TESTS`` (CUDA-graph capture and replay of a converted model's
   training step, ``torch.compile(mode="reduce-overhead")`` running as CUDA graphs, the
   host-time functions) run by pytest, where pytest is installed.
5. ``summary.txt``: stage times (estimated and measured), what was done and skipped, the
   sweep's summary table.

``--dry-run`` (any machine, no GPU needed) prints the plan: the cases of each tier and the
estimated time of every stage from the cost model below (``MODEL``), and which tiers fit
the budget. The estimates are a stated model, not measurements; the real run re-checks
the clock before every item and ends each stage when its next item would not fit.

The cost model (seconds, for an H100/H200-class GPU on a 16-core host):

    startup            python + torch + CUDA context + triton import; the launches
                       recorded (no GPU) to count the variants
    env                nvidia-smi, device properties, copy bandwidth (do_bench, 1 GiB)
    pool_start         spawn the compile workers (each imports torch, records launches)
    compile            one kernel variant: triton.compile + ptxas, per worker
    check              one correctness check (cached kernels): inputs, forward (and
                       backward), float64 reference, compare
    case + numel*ns    one sweep case's inputs and float64 reference
    row                one row's first call and compare, profiler pass, peak memory
    bench              do_bench's (warm-up + rep) ms times this overshoot factor
    host_row           the host stage's extra per row: wall rounds and a CUDA-graph
                       capture and replays (about twice do_bench's rep)
    host_paths         the host stage's user paths (bnbench.overhead.device_table: 10
                       paths x 24 shapes, torch and kernels, wall and graph)
    gpu_tests          the GPU tests (pytest start, torch.compile's reduce-overhead)
    graph_first/graph  torch.compile (Inductor, dynamic shapes): the first graph
                       (Inductor's cold start), then each (mode, dtype, layout) group;
                       train_fwd_bwd compiles forward and backward (x graph_bwd)
    final              plots and summary
    safety             kept free at the end
"""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

_T0 = time.monotonic()  # the budget's clock starts when the CLI imports this module

MODEL = {
    "startup": 15.0, "env": 5.0, "pool_start": 12.0, "compile": 0.8, "check": 0.3,
    "case": 0.1, "case_ns_per_elem": 2.0, "row": 0.15, "bench": 1.3,
    "graph_first": 30.0, "graph": 8.0, "graph_bwd": 1.5, "final": 15.0, "safety": 10.0,
    "host_row": 0.12, "host_paths": 40.0, "gpu_tests": 90.0,
}
WARMUP_MS, REP_MS = 10.0, 25.0  # do_bench per row (bnbench run's defaults: 25 and 100)
WORKERS = 16  # compile workers planned for (the lent machine's cores); at run time: cpu_count
DEFAULT_OUT = Path("results/gpu_day")  # gpu-day's folder unless --out says another
RECOMPILE_CAP = 16  # torch.compile recompiles per code object; beyond it a row fails
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
IMPL_ORDER = ("triton_single_pass", "triton_two_pass", "triton_eval", "cudnn", "torch_native",
              "torch_compile_dynamic")


# ---------------------------------------------------------------------------------------------
# the plan: tiers of sweep cases, correctness checks, and their estimated times

@dataclass(frozen=True)
class Tier:
    """One tier of the sweep: the product of its settings, in this order of priority."""

    name: str
    why: str
    modes: tuple
    dtypes: tuple
    layouts: tuple
    batch_sizes: tuple
    shapes: str = "resnet50"
    fusions: tuple = ("none",)

    def cases(self):
        """The cases, grouped by (mode, dtype, layout, fusion) so each torch.compile group is
        compiled once, larger batch first, shapes in network order."""
        from .cases import Case
        from .shapes import SHAPE_SETS

        return [Case(mode, n, c, h, w, dtype, layout, fusion)
                for mode in self.modes for dtype in self.dtypes for layout in self.layouts
                for fusion in self.fusions for n in sorted(self.batch_sizes, reverse=True)
                for (c, h, w) in SHAPE_SETS[self.shapes]]


TIERS = (
    Tier("1", "the mission's question: every implementation at ResNet-50's BN shapes",
         ("train_fwd_bwd", "eval"), ("bfloat16", "float32"), ("nchw", "nhwc"), (256, 32)),
    Tier("2", "forward-only training (statistics + normalise)",
         ("train_fwd",), ("bfloat16", "float32"), ("nchw", "nhwc"), (256, 32)),
    Tier("3", "fused residual + ReLU (a ResNet block's end)",
         ("train_fwd_bwd", "eval"), ("bfloat16",), ("nchw", "nhwc"), (256, 32),
         fusions=("residual+relu",)),
    Tier("4", "small and mid batches (launch-bound, single-launch path)",
         ("train_fwd_bwd", "eval"), ("bfloat16",), ("nchw", "nhwc"), (1, 8, 128)),
    Tier("5", "float16", ("train_fwd_bwd", "eval"), ("float16",), ("nchw", "nhwc"), (256, 32)),
    Tier("6", "conv then eval BN: what folding saves", ("conv_bn_eval",), ("bfloat16",),
         ("nchw", "nhwc"), (32,)),
)


# the host-cost stage: what a user pays per call at small batch (issue 18)
HOST_TIER = Tier("host", "host cost at small batch: device, wall and CUDA-graph time per call",
                 ("train_fwd_bwd", "eval"), ("float32",), ("nchw",), (1, 8))
HOST_IMPLS = ("triton_single_pass", "triton_eval", "cudnn", "torch_native")
GPU_TESTS = (
    "tests/test_graph_safe.py::test_cuda_graph_captures_and_replays_a_training_step",
    "tests/test_graph_safe.py::test_compile_reduce_overhead_runs_as_cuda_graphs",
    "tests/test_host_times.py::test_host_times_of_a_capturable_call_and_of_one_that_syncs",
)


def host_impls(mode):
    """The implementations the host-cost stage runs in `mode`."""
    return tuple(n for n in impls_for(mode) if n in HOST_IMPLS)


def host_cost(model=MODEL, warmup_ms=WARMUP_MS, rep_ms=REP_MS):
    """Estimated seconds of the host-cost stage: its cases, with the host timing per row."""
    total = 0.0
    for case in HOST_TIER.cases():
        rows = len(host_impls(case.mode))
        full = len(impls_for(case.mode))
        per_case = case_cost(case, model, warmup_ms, rep_ms)
        case_part = model["case"] + case.numel * model["case_ns_per_elem"] * 1e-9
        total += case_part + (per_case - case_part) * rows / full + rows * model["host_row"]
    return total + model["host_paths"]


def impls_for(mode):
    """The implementations a mode runs, in IMPL_ORDER (conv_bn_eval: its own three)."""
    from .impls import CONV_MODES

    if mode in CONV_MODES:
        return ("conv+cudnn", "conv+triton_eval", "folded")
    train = mode in ("train_fwd", "train_fwd_bwd")
    return tuple(n for n in IMPL_ORDER
                 if (n != "triton_eval" or not train)
                 and (not n.startswith("triton_") or n == "triton_eval" or train))


def case_cost(case, model=MODEL, warmup_ms=WARMUP_MS, rep_ms=REP_MS):
    """Estimated seconds of one case, all its rows (torch.compile's compiles apart)."""
    rows = len(impls_for(case.mode))
    bench = (warmup_ms + rep_ms) / 1e3 * model["bench"]
    return model["case"] + case.numel * model["case_ns_per_elem"] * 1e-9 + rows * (
        model["row"] + bench)


def compile_group(case):
    """The torch.compile group of a case: one dynamic-shape compile each."""
    return (case.mode, case.dtype, case.layout, case.fusion, min(case.N, 2), min(case.H, 2))


def graph_cost(case, first, model=MODEL):
    base = model["graph_first"] if first else model["graph"]
    return base * (model["graph_bwd"] if case.mode == "train_fwd_bwd" else 1.0)


@dataclass(frozen=True)
class Check:
    """One correctness check: kernels.BatchNorm2d (or kernels.batch_norm) on the GPU against
    torch.nn.BatchNorm2d in float64; `grads` names the inputs that need a gradient."""

    name: str
    shape: tuple
    dtype: str
    pdtype: str
    layout: str
    training: bool = True
    stats: str = "single_pass"
    affine: bool = True
    running: bool = True
    cumulative: bool = False
    residual: bool = False
    activation: str = None
    grads: tuple = ("x", "w", "b")
    autotune: bool = False


def checks():
    """The correctness checks: the fewest checks through the public API whose launches hold
    every mode-switch variant (``variant_key(full=False)``) of ``bnbench.registry``'s compile
    list, at its shapes (so the same compiled variants): one candidate per distinct
    setting of the list, chosen greedily (most new variants first), kept in list order."""
    from kernels._triton_internals import record_launches

    from . import registry

    found = {}  # setting (a check without its name) -> [check, variants its scenarios launch]
    for scenario in _plain(registry.compile_variants()):
        check = _check_of(scenario)
        with record_launches(scenario.name) as got:
            scenario.launch("meta")
        entry = found.setdefault(replace(check, name=""), [check, set()])
        entry[1] |= {variant_key(launch, full=False) for launch in got}
    left = set().union(*(keys for _, keys in found.values()))
    chosen = set()
    while left:
        check, keys = max(found.values(), key=lambda entry: len(entry[1] & left))
        chosen.add(check.name)
        left -= keys
    return [check for check, _ in found.values() if check.name in chosen]


def _plain(scenarios):
    """The scenarios of the single-process ops (the synchronised ones need a process group,
    and the sweep does not run them)."""
    return [s for s in scenarios if not s.variant.op.group]


def _check_of(scenario):
    """The Check that launches `scenario`'s variant through kernels.batch_norm: a training
    forward (and backward), an eval forward (and backward), or the backward of either."""
    from .registry import GRADS

    v = scenario.variant
    epilogue, option = v.epilogue, v.option
    affine = option("affine", True)
    need = GRADS[option("grads", "all")]
    grads = (("x",) if need[0] else ()) + (("w", "b") if affine and need[1] else ())
    grads += ("r",) if epilogue.residual and need[3] else ()
    return Check(
        scenario.name, scenario.shape, v.dtype, v.param_dtype, v.layout,
        training=v.op.name == "train_fwd" or option("training", False),
        stats=v.stats if v.stats != "-" else "single_pass", affine=affine,
        running=option("running", True), cumulative=option("cumulative", False),
        residual=epilogue.residual,
        activation=None if epilogue.activation == "none" else epilogue.activation,
        grads=grads, autotune=option("autotune", False))


@dataclass
class Stage:
    name: str
    what: str
    estimate_s: float
    items: int = 0
    measured_s: float = None
    done: int = 0
    note: str = ""


@dataclass
class Plan:
    budget_s: float
    stages: list
    tiers: list  # (Tier, cases, rows, estimate_s, included)
    cases: list  # the included cases, in order
    checks: list
    variants: int
    workers: int
    model: dict = field(default_factory=lambda: dict(MODEL))
    unplanned: list = field(default_factory=list)  # the GPU-only stages left out (no time)

    @property
    def estimate_s(self):
        return sum(s.estimate_s for s in self.stages)


def plan(budget_s, variants, workers=WORKERS, tiers=TIERS, model=MODEL, warmup_ms=WARMUP_MS,
         rep_ms=REP_MS):
    """The stages and the sweep's tiers that fit `budget_s` by the cost model.

    A tier is taken whole or not at all, in order; tier 1 is always planned (if it does not
    fit, the plan says so: the run then stops tier 1 where the clock says). `variants`: the
    kernel variants to compile (``count_variants``).
    """
    the_checks = checks()
    fixed = [
        Stage("startup", "python, torch, CUDA context, triton", model["startup"]),
        Stage("environment", "device, driver, versions, SMs, copy bandwidth", model["env"]),
        Stage("compile", f"{variants} kernel variants on {workers} workers",
              model["pool_start"] + math.ceil(variants / max(workers, 1)) * model["compile"],
              items=variants),
        Stage("correctness", f"{len(the_checks)} checks against float64",
              len(the_checks) * model["check"], items=len(the_checks)),
    ]
    final = [Stage("final", "plots and summary", model["final"]),
             Stage("safety", "kept free", model["safety"])]
    left = budget_s - sum(s.estimate_s for s in fixed + final)
    groups, tier_rows, included = set(), [], []
    sweep_s = 0.0
    extra, unplanned, extra_s = [], [], 0.0  # the GPU-only stages planned and not
    for i, tier in enumerate(tiers):
        cases = tier.cases()
        cost, new_groups = 0.0, set()
        for case in cases:
            cost += case_cost(case, model, warmup_ms, rep_ms)
            g = compile_group(case)
            if g not in groups and g not in new_groups and case.mode != "conv_bn_eval":
                cost += graph_cost(case, not groups and not new_groups, model)
                new_groups.add(g)
        rows = sum(len(impls_for(c.mode)) for c in cases)
        take = i == 0 or sweep_s + cost <= left
        if take and (i == 0 or all(t[4] for t in tier_rows)):
            sweep_s += cost
            groups |= new_groups
            included.extend(cases)
        else:
            take = False
        tier_rows.append((tier, len(cases), rows, cost, take))
        if i == 0:  # next in priority: the GPU-only stages, when they fit
            for stage in (Stage("host", f"{len(HOST_TIER.cases())} cases at N=1,8: device, "
                                        f"wall and CUDA-graph µs per call",
                                host_cost(model, warmup_ms, rep_ms),
                                items=len(HOST_TIER.cases())),
                          Stage("gpu_tests", f"{len(GPU_TESTS)} GPU tests (pytest): CUDA "
                                             f"graphs", model["gpu_tests"],
                                items=len(GPU_TESTS))):
                if sweep_s + extra_s + stage.estimate_s <= left:
                    extra.append(stage)
                    extra_s += stage.estimate_s
                else:
                    unplanned.append(stage)
            left -= extra_s
    names = [t[0].name for t in tier_rows if t[4]]
    sweep = Stage("sweep", f"{sum(t[2] for t in tier_rows if t[4])} rows in tier"
                  f"{'s' if len(names) > 1 else ''} {','.join(names)}", sweep_s,
                  items=len(included))
    return Plan(budget_s, fixed + extra + [sweep] + final, tier_rows, included, the_checks,
                variants, workers, dict(model), unplanned)


def format_plan(p, verbose=True):
    """The plan as text: stages with estimates, then each tier and its case groups."""
    lines = [f"bnbench gpu-day plan: budget {p.budget_s:.0f} s, estimated {p.estimate_s:.0f} s "
             f"({'fits' if p.estimate_s <= p.budget_s else 'DOES NOT FIT'})",
             "", f"{'stage':<12} {'estimate':>9}  what"]
    for s in p.stages:
        lines.append(f"{s.name:<12} {s.estimate_s:>8.0f}s  {s.what}")
    lines += ["", f"sweep tiers (do_bench warm-up {WARMUP_MS:.0f} ms + rep {REP_MS:.0f} ms "
              f"per row; torch.compile dynamic, recompile cap {RECOMPILE_CAP}):"]
    for tier, n_cases, rows, cost, take in p.tiers:
        lines.append(f"  tier {tier.name} {'planned' if take else 'not planned (no time)'}: "
                     f"{n_cases} cases, {rows} rows, ~{cost:.0f} s: {tier.why}")
        if verbose:
            from .shapes import SHAPE_SETS

            n_shapes = len(SHAPE_SETS[tier.shapes])
            for mode in tier.modes:
                impls = ",".join(impls_for(mode))
                for dtype in tier.dtypes:
                    for layout in tier.layouts:
                        for fusion in tier.fusions:
                            lines.append(
                                f"    {mode} {dtype} {layout}"
                                f"{'' if fusion == 'none' else ' +' + fusion} "
                                f"N={','.join(map(str, sorted(tier.batch_sizes, reverse=True)))}"
                                f" x {n_shapes} {tier.shapes} shapes: {impls}")
    lines += ["", "GPU-only stages (planned after tier 1 when they fit, run before the sweep):"]
    for stage in [s for s in p.stages if s.name in ("host", "gpu_tests")] + p.unplanned:
        state = "planned" if stage in p.stages else "not planned (no time)"
        lines.append(f"  {stage.name} {state}: ~{stage.estimate_s:.0f} s: {stage.what}")
        if stage.name == "host":
            for mode in HOST_TIER.modes:
                lines.append(f"    {mode} float32 nchw N=8,1 x 12 resnet50 shapes, "
                             f"wall_us + graph_us: {','.join(host_impls(mode))}")
        else:
            lines += [f"    {test}" for test in GPU_TESTS]
    lines += ["", "cost model (s): " + ", ".join(f"{k}={v:g}" for k, v in p.model.items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# kernel variants: recorded launches (no GPU needed), deduplicated

def variant_key(launch, full=True):
    """What makes a launch a distinct variant, without Triton's binder: the kernel, its
    constexpr keyword arguments and the dtypes of its tensor arguments; `full`: also the
    block sizes, num_warps and the 16-divisibility of integer arguments (what a compile
    specialises on), else only the mode switches (what the correctness coverage counts)."""
    import torch

    kwargs = {k: v for k, v in launch.kwargs.items()
              if full or (k.isupper() and not k.startswith("BLOCK"))}
    if not full:  # the modes and the dtypes met, whichever argument carries them
        dtypes = sorted({str(a.dtype) for a in launch.args if isinstance(a, torch.Tensor)})
        return (launch.fn.__name__, tuple(sorted((k, str(v)) for k, v in kwargs.items())),
                tuple(dtypes))
    args = []
    for a in launch.args:
        if isinstance(a, torch.Tensor):
            args.append(str(a.dtype))
        elif isinstance(a, bool) or a is None:
            args.append(a)
        elif isinstance(a, int):
            args.append(("int", a % 16 == 0, a == 1))
        else:
            args.append(type(a).__name__)
    return (launch.fn.__name__, tuple(sorted((k, str(v)) for k, v in kwargs.items())),
            tuple(args))


def sweep_launches(cases):
    """The launches the sweep's Triton rows make (recorded on meta tensors, not run): each
    case's ops (``registry.Mode.ops``), both statistics modes in training; conv_bn_eval's BN
    is the eval kernel at the same shapes."""
    from kernels._triton_internals import record_launches

    from . import registry

    out, seen = [], set()
    for case in cases:
        pair = (case.dtype, registry.param_dtype_for(case.dtype))
        for name in case.spec.ops:
            for v in registry.variants(registry.OPS[name], (case.fusion,), (case.layout,), (pair,)):
                shape = (case.N, case.C, case.H, case.W)
                if (v, shape) in seen:
                    continue
                seen.add((v, shape))
                with record_launches(case.describe()) as got:
                    registry.run_variant(v, registry.make_tensors(v, shape, "meta"))
                out.extend(got)
    return out


def _compile_list_launches():
    """The launches of ``bnbench.registry.compile_variants``' single-process ops (recorded,
    not run)."""
    from kernels._triton_internals import record_launches

    from . import registry

    launches = []
    for scenario in _plain(registry.compile_variants()):
        with record_launches(scenario.name) as got:
            scenario.launch("empty")
        launches.extend(got)
    return launches


def all_launches(cases):
    """Distinct launches (full variant_key) of the correctness scenarios and the sweep."""
    distinct = {}
    for launch in _compile_list_launches() + sweep_launches(cases):
        distinct.setdefault(variant_key(launch), launch)
    return list(distinct.values())


def expected_variants():
    """The mode-switch variants (variant_key(full=False)) of the compile list."""
    return {variant_key(launch, full=False) for launch in _compile_list_launches()}


# ---------------------------------------------------------------------------------------------
# the run

class BudgetExceeded(BaseException):
    """Raised in the main thread (SIGALRM) when the soft deadline passes; a BaseException,
    like KeyboardInterrupt, so that the runner's ``except Exception`` (a failed row is
    recorded and the sweep goes on) does not swallow it."""


class Clock:
    """Seconds since the command started, against the budget."""

    def __init__(self, budget_s, start=None):
        self.budget_s = budget_s
        self.start = time.monotonic() if start is None else start

    def elapsed(self):
        return time.monotonic() - self.start

    def fits(self, seconds, reserve):
        """True when `seconds` more still end before the budget less `reserve`."""
        return self.elapsed() + seconds <= self.budget_s - reserve


def _arm(clock, reserve, hard=True):
    """A soft deadline (BudgetExceeded at budget - reserve, in the main thread) and, with
    `hard`, a hard one (exit at budget - 2 s; every file is written as it goes)."""
    def soft(signum, frame):
        raise BudgetExceeded()

    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, soft)
        signal.setitimer(signal.ITIMER_REAL, max(clock.budget_s - reserve - clock.elapsed(), 1))

    def hard_exit():
        print(f"bnbench gpu-day: hard deadline ({clock.budget_s:.0f} s) reached; exiting",
              flush=True)
        os._exit(124)

    timer = threading.Timer(max(clock.budget_s - 2 - clock.elapsed(), 1), hard_exit)
    timer.daemon = True
    if hard:
        timer.start()
    return timer


def _disarm(timer):
    if hasattr(signal, "SIGALRM"):
        signal.setitimer(signal.ITIMER_REAL, 0)
    timer.cancel()


def record_environment(out):
    """Stage 1: environment.json; returns the run fields for the sweep's CSV."""
    import torch

    import kernels

    from . import environment, timing

    device = "cuda"
    tf32 = environment.pin_tf32()
    from .run import method

    interpreted = bool(kernels.INTERPRETED)
    fields = environment.metadata(device, interpreted=interpreted, tf32=tf32,
                                  method="bnbench gpu-day sweep: "
                                         + method(device, interpreted))
    props = torch.cuda.get_device_properties(0)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                              "clocks.max.sm,clocks.max.mem,power.limit", "--format=csv"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        smi = f"nvidia-smi failed: {exc}"
    fields["copy_gbps"] = timing.copy_bandwidth(device)
    from kernels import _triton_internals

    env = dict(fields, sm_count=props.multi_processor_count,
               capability=f"{props.major}.{props.minor}",
               memory_gib=round(props.total_memory / 2**30, 1), nvidia_smi=smi,
               python=sys.version.split()[0], interpreter_patches=dict(_triton_internals.INSTALLED),
               cpu_count=os.cpu_count())
    (out / "environment.json").write_text(json.dumps(env, indent=1, default=str))
    return fields, env


def _compile_worker(index, workers, arch, tiers_included, limit=None):
    """One compile worker: the same launch list as every worker, every `workers`-th one
    (`limit`: at most that many, for tests)."""
    os.environ.pop("TRITON_INTERPRET", None)
    from bnbench.aot import compile_launch

    cases = [c for t in TIERS if t.name in tiers_included for c in t.cases()]
    launches = all_launches(cases)
    rows = []
    for launch in launches[index::workers][:limit]:
        start = time.monotonic()
        r = compile_launch(launch, arch)
        rows.append(dict(asdict(r), seconds=round(time.monotonic() - start, 3)))
    return rows


def precompile(out, clock, p, reserve, arch, limit=None):
    """Stage 2: compile every variant in worker processes (spawned: CUDA is initialised
    here); rows to compile.csv as each worker finishes. Returns (rows, note)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    import pandas as pd

    workers = min(p.workers, os.cpu_count() or 1)
    included = tuple(t.name for t, *_rest, take in p.tiers if take)
    rows, note = [], ""
    path = out / "compile.csv"
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    try:
        futures = [pool.submit(_compile_worker, i, workers, arch, included, limit)
                   for i in range(workers)]
        # at most twice the stage's estimate (and never past the budget): the checks and
        # the sweep compile whatever is left as they launch it
        estimate = next(s.estimate_s for s in p.stages if s.name == "compile")
        wait_s = min(clock.budget_s - reserve - clock.elapsed(), 2 * estimate + 30)
        for fut in cf.as_completed(futures, timeout=max(wait_s, 1)):
            rows.extend(fut.result())
            pd.DataFrame(rows).to_csv(path, index=False)
    except cf.TimeoutError:
        note = "stopped at twice its estimate"
    except Exception as exc:  # noqa: BLE001 (the checks then compile as they go)
        note = f"compile workers failed: {type(exc).__name__}: {exc}"[:300]
    finally:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()  # a worker still compiling must not hold the exit
        pool.shutdown(wait=False, cancel_futures=True)
    return rows, note


def _rel_l2(a, ref):
    import torch

    a, ref = a.double(), ref.double()
    den = torch.linalg.vector_norm(ref).item()
    num = torch.linalg.vector_norm(a - ref).item()
    return num / den if den > 0 else num


def _activation(t, name):
    from kernels import Epilogue

    return Epilogue.of(False, name).apply(t)


def run_check(check, device="cuda", seed=0, reference=True):
    """One correctness check; a row: status ok/fail/error and the worst relative L2 error of
    every output against float64 (y, grads, running stats), computed on `device`.
    `reference=False`: only the kernels' calls (to record which variants launch)."""
    import torch
    from torch import nn

    import kernels

    dt, pdt = getattr(torch, check.dtype), getattr(torch, check.pdtype)
    g = torch.Generator(device=device).manual_seed(seed)
    N, C = check.shape[:2]

    def rand(shape, scale=1.0, shift=0.0):
        if not reference:  # values unused: no time on random numbers
            return torch.empty(shape, dtype=torch.float64, device=device)
        return torch.randn(shape, generator=g, dtype=torch.float64, device=device) * scale \
            + shift

    fmt = torch.channels_last if check.layout == "nhwc" else torch.contiguous_format
    x64 = rand(check.shape, 2.0, 0.5)
    r64 = rand(check.shape) if check.residual else None
    dy64 = rand(check.shape)
    momentum = None if check.cumulative else 0.1
    mine = kernels.BatchNorm2d(C, momentum=momentum, affine=check.affine,
                               track_running_stats=check.running, stats=check.stats,
                               activation=check.activation)
    ref = nn.BatchNorm2d(C, momentum=momentum, affine=check.affine,
                         track_running_stats=check.running)
    with torch.no_grad():
        if check.affine:
            ref.weight.copy_(rand(C, 0.5, 1.0))
            ref.bias.copy_(rand(C, 0.5))
        if check.running:
            ref.running_mean.copy_(rand(C, 0.1, 0.5))
            ref.running_var.copy_(rand(C, 0.1).abs().nan_to_num() + 0.5)
            ref.num_batches_tracked.fill_(3)
    mine.load_state_dict(ref.state_dict())
    mine = mine.to(device=device, dtype=pdt).train(check.training)
    ref.load_state_dict(mine.state_dict())  # the parameters as rounded to pdtype
    ref = ref.to(device=device, dtype=torch.float64).train(check.training)

    def inputs(dtype, dev):
        x = x64.to(dev, dtype).contiguous(memory_format=fmt)
        r = r64.to(dev, dtype).contiguous(memory_format=fmt) if r64 is not None else None
        return x, r

    x, r = inputs(dt, device)
    # the reference sees exactly the rounded inputs the kernels see
    xr, rr = (t.detach().double() if t is not None else None for t in (x, r))
    if "x" in check.grads:
        x.requires_grad_(), xr.requires_grad_()
    if r is not None and "r" in check.grads:
        r.requires_grad_(), rr.requires_grad_()
    for name, mod in (("w", "weight"), ("b", "bias")):
        if check.affine:
            getattr(mine, mod).requires_grad_(name in check.grads)
            getattr(ref, mod).requires_grad_(name in check.grads)
    was = None
    if check.autotune:
        was = kernels._tuning.autotune_enabled()
        kernels.set_autotune(True)
    try:
        y = mine(x, residual=r) if r is not None else mine(x)
        if not reference:
            if check.grads:
                y.backward(torch.ones_like(y))
            return dict(asdict(check), status="not compared", error="")
        y_ref = ref(xr)
        if rr is not None:
            y_ref = y_ref + rr
        y_ref = _activation(y_ref, check.activation)
        pairs = [("y", y, y_ref)]
        if check.grads:
            dy = dy64.to(device, dt).contiguous(memory_format=fmt)
            y.backward(dy)
            y_ref.backward(dy.double())
            named = [("dx", x, xr), ("dresidual", r, rr)]
            if check.affine:
                named += [("dweight", mine.weight, ref.weight), ("dbias", mine.bias, ref.bias)]
            for name, a, b in named:
                if a is not None and a.requires_grad:
                    pairs.append((name, a.grad, b.grad))
        if check.running and check.training:
            pairs += [("running_mean", mine.running_mean, ref.running_mean),
                      ("running_var", mine.running_var, ref.running_var)]
        if device == "cuda":
            torch.cuda.synchronize()
    finally:
        if was is not None:
            kernels.set_autotune(was)
    row = dict(asdict(check), status="ok", error="")
    worst = 0.0
    for name, a, b in pairs:
        if a is None:
            row.update(status="fail", error=f"{name}: no output")
            continue
        err = _rel_l2(a.detach(), b.detach())
        tol = TOLERANCE[str(a.dtype).replace("torch.", "")]
        row[f"{name}_rel_l2"] = err
        worst = max(worst, err / tol)
        if not err <= tol:
            row.update(status="fail", error=f"{name}: rel L2 {err:.3g} > {tol:g}")
    row["worst_over_tol"] = worst
    return row


def run_checks(out, clock, the_checks, reserve, check_s, device="cuda"):
    """Stage 3: every check, rows to correctness.csv as they are done; coverage at the end.
    Returns (rows, note)."""
    import pandas as pd
    import torch

    from kernels._triton_internals import record_launches

    from .runner import one_line

    rows, note, path = [], "", out / "correctness.csv"
    with record_launches(execute=True) as ran:
        for check in the_checks:
            if not clock.fits(check_s, reserve):
                note = "stopped at the budget"
                break
            start = time.monotonic()
            try:
                row = run_check(check, device)
            except BudgetExceeded:
                note = "stopped at the budget"
                break
            except Exception as exc:  # noqa: BLE001 (recorded; the other checks go on)
                row = dict(asdict(check), status="error", error=one_line(exc))
                if device == "cuda":
                    torch.cuda.empty_cache()
            row["seconds"] = round(time.monotonic() - start, 3)
            rows.append(row)
            pd.DataFrame(rows).to_csv(path, index=False)
    launched = {variant_key(launch, full=False) for launch in ran}
    try:
        expected = expected_variants()
        missing = sorted(map(str, expected - launched))
        cover = f"coverage: {len(expected & launched)} of {len(expected)} kernel variants ran"
        (out / "correctness_coverage.txt").write_text(cover + "\n" + "\n".join(missing) + "\n")
        note = (note + "; " if note else "") + cover
    except Exception as exc:  # noqa: BLE001
        note = (note + "; " if note else "") + f"coverage not computed: {one_line(exc)}"
    return rows, note


def compile_dynamic_impl():
    """``torch_compile_dynamic``: torch.compile of the baselines' function with dynamic
    shapes, compiled once per process (a recompile per mode/dtype/layout guard), capped at
    RECOMPILE_CAP recompiles; past the cap dynamo raises (the row fails) instead of silently
    running eagerly."""
    from .impls import BN_MODES, Impl, _compile_check, make_torch_batch_norm

    compiled = []

    def build():
        import torch

        if not compiled:
            config = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(config, name):
                    setattr(config, name, RECOMPILE_CAP)
            if hasattr(config, "fail_on_recompile_limit_hit"):
                config.fail_on_recompile_limit_hit = True
            compiled.append(torch.compile(make_torch_batch_norm(), dynamic=True))
        return compiled[0]

    return Impl("torch_compile_dynamic", "baseline", BN_MODES, build, _compile_check)


def run_sweep(out, clock, p, run_fields, reserve, warmup_ms, rep_ms, device="cuda",
              only=None, widen=True):
    """Stage 4: the planned cases in order, rows to gpu_day.csv as they come; each case only
    if its estimate still fits; with `widen`, then the unplanned tiers' cases in order while
    time remains. `only`: implementation names to keep (tests). Returns (csv path, rows,
    note, cases done)."""
    from . import impls, report, runner

    chosen = {name: impls.IMPLS[name] for name in impls.IMPLS}
    chosen["torch_compile_dynamic"] = compile_dynamic_impl()
    import kernels

    opts = runner.Options(device=device, interpreted=bool(kernels.INTERPRETED),
                          warmup_ms=warmup_ms, rep_ms=rep_ms,
                          copy_gbps=run_fields.get("copy_gbps"), host_times=False)
    path = out / "gpu_day.csv"
    groups, note, done = set(), "", 0
    with report.CsvWriter(path, run_fields) as writer:
        try:
            # the planned cases, then the tiers the plan left out, while the clock allows
            # (their Triton variants were not precompiled: they compile as they launch)
            extra = [c for tier, *_rest, take in p.tiers if not take for c in tier.cases()]
            for case in p.cases + (extra if widen else []):
                cost = case_cost(case, p.model, warmup_ms, rep_ms)
                g = compile_group(case)
                if g not in groups and case.mode != "conv_bn_eval":
                    cost += graph_cost(case, not groups, p.model)
                if not clock.fits(cost, reserve):
                    note = f"stopped at the budget before {case.describe()}"
                    break
                groups.add(g)
                names = [n for n in impls_for(case.mode) if only is None or n in only]
                for row in runner.run_case(case, [chosen[n] for n in names], opts):
                    writer.write(row)
                done += 1
        except BudgetExceeded:
            note = "stopped at the budget (soft deadline)"
        rows = writer.rows
    return path, rows, note, done


def run_host_cost(out, clock, p, run_fields, reserve, warmup_ms, rep_ms, device="cuda"):
    """The host-cost stage: HOST_TIER's cases with HOST_IMPLS, rows with wall_us and
    graph_us to host_cost.csv as they come, then its plots.  Returns (csv path, rows,
    note, cases done)."""
    from . import impls, report, runner

    import kernels

    opts = runner.Options(device=device, interpreted=bool(kernels.INTERPRETED),
                          warmup_ms=warmup_ms, rep_ms=rep_ms,
                          copy_gbps=run_fields.get("copy_gbps"), host_times=True)
    path, note, done = out / "host_cost.csv", "", 0
    with report.CsvWriter(path, run_fields) as writer:
        try:
            for case in HOST_TIER.cases():
                names = host_impls(case.mode)
                cost = case_cost(case, p.model, warmup_ms, rep_ms) + len(names) * p.model[
                    "host_row"]
                if not clock.fits(cost, reserve):
                    note = f"stopped at the budget before {case.describe()}"
                    break
                for row in runner.run_case(case, [impls.IMPLS[n] for n in names], opts):
                    writer.write(row)
                done += 1
        except BudgetExceeded:
            note = "stopped at the budget (soft deadline)"
        rows = writer.rows
    if rows:
        try:
            from .plot import draw

            draw(path)
        except Exception as exc:  # noqa: BLE001 (the CSV stays)
            from .runner import one_line

            note = (note + "; " if note else "") + f"plots failed: {one_line(exc)}"
    if clock.fits(p.model["host_paths"], reserve):
        try:  # the ways a user calls the kernels (modules, functional, sync, fused, folded)
            from . import overhead

            table = overhead.stamped(overhead.device_table(device=device), device,
                                     overhead.DEVICE_METHOD)
            table.to_csv(out / "host_paths.csv", index=False)
            note = (note + "; " if note else "") + f"host_paths.csv: {len(table)} rows"
        except BudgetExceeded:
            raise
        except Exception as exc:  # noqa: BLE001 (the stage's other results stay)
            from .runner import one_line

            note = (note + "; " if note else "") + f"host_paths failed: {one_line(exc)}"
    return path, rows, note, done


def run_gpu_tests(out, clock, reserve, estimate_s, tests=GPU_TESTS):
    """The GPU tests, by pytest in a subprocess from the checkout (its output to
    gpu_tests.txt), within twice their estimate and the budget.  Returns (tests run, note):
    pytest's summary line, or why they did not run."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    if importlib.util.find_spec("pytest") is None:
        return 0, "not run: pytest is not installed here"
    if not all((root / t.split("::")[0]).exists() for t in tests):
        return 0, "not run: the tests are not in this checkout"
    timeout = min(2 * estimate_s, clock.budget_s - clock.elapsed() - reserve)
    if timeout <= 0:
        return 0, "not run: no time left"
    command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-o",
               "addopts=", *tests]
    try:
        done = subprocess.run(command, cwd=root, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONPATH": str(root)})
        text, status = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:  # its output may come back as bytes
        parts = [p.decode(errors="replace") if isinstance(p, bytes) else p or ""
                 for p in (exc.stdout, exc.stderr)]
        text, status = "".join(parts) + f"\ntimed out after {timeout:.0f} s", -1
    (out / "gpu_tests.txt").write_text(text)
    last = [line for line in text.splitlines() if line.strip()]
    summary = last[-1].strip("= ") if last else "no output"
    return len(tests), f"pytest exit {status}: {summary}"


def finish(out, csv_path, stages, started, env, clock):
    """Stage 5: plots and summary.txt (within the reserve kept for them)."""
    lines = [f"bnbench gpu-day on {env.get('device', '?')} ({env.get('sm_count', '?')} SMs, "
             f"driver from nvidia-smi below), torch {env.get('torch_version')}, triton "
             f"{env.get('triton_version')}, commit {env.get('git_commit')}",
             f"started {started}, budget {clock.budget_s:.0f} s, "
             f"elapsed {clock.elapsed():.0f} s", "",
             f"{'stage':<12} {'estimate':>9} {'measured':>9}  done  note"]
    for s in stages:
        measured = f"{s.measured_s:8.1f}s" if s.measured_s is not None else "        -"
        lines.append(f"{s.name:<12} {s.estimate_s:8.0f}s {measured}  {s.done}/{s.items}  "
                     f"{s.note}")
    if csv_path is not None and csv_path.exists():
        try:
            from . import report

            df = report.read(csv_path)
            lines += ["", report.format_summary(report.summary(df))]
            from .plot import draw

            for png in draw(csv_path):
                lines.append(f"wrote {png}")
        except Exception as exc:  # noqa: BLE001 (the CSV stays; the summary says why)
            lines.append(f"summary/plots failed: {type(exc).__name__}: {exc}")
    lines += ["", "nvidia-smi:", str(env.get("nvidia_smi", ""))]
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    return text


def gpu_day(args):
    """Run the stages within the budget; 0, or 2 without a GPU (use --dry-run there)."""
    import datetime

    clock = Clock(args.budget, start=getattr(args, "start", None) or _T0)
    from . import environment

    if args.dry_run:
        os.environ.pop("TRITON_INTERPRET", None)  # recording needs no interpreter
        p = plan(args.budget, len(all_launches(_planned_cases(args.budget))),
                 workers=args.workers, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        text = format_plan(p)
        if args.out is not None:  # a dry run writes nothing unless asked (--out)
            out = environment.command_out("gpu-day", args.out, None, [])
            if out is None:
                return 2
        print(text)
        if args.out is not None:
            (out / "gpu_day_plan.txt").write_text(text + "\n")
            print(f"wrote {out / 'gpu_day_plan.txt'}")
        return 0 if p.estimate_s <= args.budget else 1

    out = environment.command_out("gpu-day", args.out, DEFAULT_OUT, [])
    if out is None:
        return 2

    import torch

    if not torch.cuda.is_available():
        print("bnbench gpu-day: error: no CUDA GPU here; 'bnbench gpu-day --dry-run' prints "
              "the plan on any machine", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    reserve = MODEL["final"] + MODEL["safety"]
    timer = _arm(clock, reserve)
    env, csv_path, p = {}, None, None
    stages = []

    def stage(name, fn):
        s = next(x for x in p.stages if x.name == name)
        start = time.monotonic()
        print(f"bnbench gpu-day: {name} (estimate {s.estimate_s:.0f} s, "
              f"elapsed {clock.elapsed():.0f} s)", flush=True)
        try:
            result = fn(s)
        except BudgetExceeded:
            s.note = "stopped at the budget (soft deadline)"
            s.measured_s = time.monotonic() - start
            stages.append(s)
            raise  # the later stages are skipped; the summary is still written
        except Exception as exc:  # noqa: BLE001 (recorded; the next stages still run)
            from .runner import one_line

            s.note, result = f"failed: {one_line(exc)}", None
        s.measured_s = time.monotonic() - start
        stages.append(s)
        return result

    try:
        import bnbench.aot  # noqa: F401 (before the plan: its import is part of startup)

        cases = _planned_cases(args.budget)
        p = plan(args.budget, len(all_launches(cases)), workers=min(args.workers,
                 os.cpu_count() or 1), warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        (out / "gpu_day_plan.txt").write_text(format_plan(p) + "\n")
        p.stages[0].measured_s, p.stages[0].done = clock.elapsed(), 1
        stages.append(p.stages[0])

        def env_stage(s):
            fields, e = record_environment(out)
            env.update(e)
            s.done, s.items = 1, 1
            return fields
        run_fields = stage("environment", env_stage) or {}
        major, minor = torch.cuda.get_device_capability()
        arch = major * 10 + minor

        def compile_stage(s):
            rows, s.note = precompile(out, clock, p, reserve, arch)
            s.done = len(rows)
            bad = sum(1 for r in rows if r.get("error"))
            if bad:
                s.note = (s.note + "; " if s.note else "") + f"{bad} failed to compile"
        stage("compile", compile_stage)

        def check_stage(s):
            rows, s.note = run_checks(out, clock, p.checks, reserve, p.model["check"])
            s.done = len(rows)
            failed = sum(1 for r in rows if r["status"] != "ok")
            s.note = f"{failed} failed; " + s.note if failed else s.note
        stage("correctness", check_stage)

        planned = {x.name for x in p.stages}
        if "host" in planned:
            def host_stage(s):
                _, rows, note, s.done = run_host_cost(out, clock, p, run_fields, reserve,
                                                      args.warmup_ms, args.rep_ms)
                s.note = f"{rows} rows; " + note if note else f"{rows} rows"
            stage("host", host_stage)
        if "gpu_tests" in planned:
            def tests_stage(s):
                s.done, s.note = run_gpu_tests(out, clock, reserve, s.estimate_s)
            stage("gpu_tests", tests_stage)

        def sweep_stage(s):
            nonlocal csv_path
            csv_path, rows, s.note, s.done = run_sweep(out, clock, p, run_fields, reserve,
                                                       args.warmup_ms, args.rep_ms)
            s.note = f"{rows} rows; " + s.note if s.note else f"{rows} rows"
        stage("sweep", sweep_stage)
    except BudgetExceeded:
        pass
    finally:
        _disarm(timer)
    start = time.monotonic()
    if p is not None:
        final = next(x for x in p.stages if x.name == "final")
        final.items = 1
        text = finish(out, csv_path, stages + [final], started, env, clock)
        line = f"final: plots and summary took {time.monotonic() - start:.1f} s\n"
        with open(out / "summary.txt", "a") as f:
            f.write(line)
        print(text + line)
    print(f"bnbench gpu-day: done in {clock.elapsed():.0f} s of {clock.budget_s:.0f}; "
          f"files in {out}", flush=True)
    return 0


def _planned_cases(budget):
    """The cases of the tiers the plan takes (a plan with no compile estimate first: the
    tiers chosen do not depend on the variant count by more than a few seconds)."""
    return plan(budget, 0).cases


def add_parser(subparsers):
    from .arguments import positive, positive_int

    p = subparsers.add_parser(
        "gpu-day", help="a budgeted first run on a GPU: environment, compiled-kernel "
                        "correctness, the prioritised sweep (--dry-run: the plan)",
        description=__doc__.split("\n\n")[0] + " Stages: environment, compile, correctness, "
                    "prioritised sweep, summary; --dry-run prints the plan and its estimates "
                    "on any machine.")
    p.add_argument("--budget", type=positive, default=480.0,
                   help="seconds for the whole command, start to end (default 480)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default {DEFAULT_OUT}; --dry-run writes its plan "
                        "only with --out)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the planned cases and the estimated time per stage; no GPU")
    p.add_argument("--workers", type=positive_int, default=WORKERS,
                   help=f"compile worker processes (default {WORKERS}, at most the CPU count)")
    p.add_argument("--warmup-ms", type=positive, default=WARMUP_MS,
                   help=f"do_bench warm-up per row (default {WARMUP_MS:g})")
    p.add_argument("--rep-ms", type=positive, default=REP_MS,
                   help=f"do_bench repetitions per row (default {REP_MS:g})")
    p.set_defaults(func=_command, uses_device=False)


def _command(args):
    return gpu_day(args)
