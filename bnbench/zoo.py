"""``bnbench zoo``: fold and convert real model-zoo networks (timm, torchvision), exactly.

For each model (random init, every BatchNorm's statistics and affine parameters
randomised, so that a fold that ignored them would show):

* **fold**: ``kernels.fold_batchnorm`` on the float64 model in eval; the relative error
  ``max|folded(x) - model(x)| / max|model(x)|`` on a tiny random input, the number of
  BatchNorms, folded and kept (with the reasons from ``fold_report``), and the time;
* **convert** (the smaller models, or ``--convert all``): ``kernels.convert_batchnorm``
  on the float32 model, run by the Triton kernels (through the interpreter without a
  GPU), against the float64 original: eval (1x3x32x32) and train (2x3x64x64, every
  BatchNorm on batch statistics, the other modules in eval so dropout does not draw),
  beside PyTorch's own float32 error on the same input.

Writes ``<out>/zoo.csv`` (one row per model: library, model, bns, folded, kept,
kept_reasons, fold_rel_err, fold_s, convert_eval_rel_err, torch_eval_rel_err,
convert_train_rel_err, torch_train_rel_err, convert_s, error, timm_version,
torchvision_version, after the metadata columns every bnbench CSV starts with:
``bnbench.environment.STAMP_COLUMNS``) and prints the README table.

timm and torchvision are test dependencies (``pip install -e ".[test]"``).  The
torchvision wheel on PyPI is a CUDA build: beside a CPU-only torch its C extension
(``torchvision::nms`` and the other detection ops) does not load, and ``import
torchvision`` fails at its operator registrations.  :func:`import_zoo_libraries`
then defines the two operator schemas that ``torchvision/_meta_registrations.py``
registers fake kernels for (``nms``, ``qnms``; no implementation), so the package
and its pure-Python model code import; the detection ops themselves stay
unavailable, which no model here calls.
"""

import copy
import sys
import time

# (library, name, builder(timm, torchvision) -> model, converted by default)
MODELS = [
    ("torchvision", "resnet18", lambda tm, tv: tv.models.resnet18(), False),
    ("torchvision", "resnet50", lambda tm, tv: tv.models.resnet50(), False),
    ("torchvision", "resnext50_32x4d", lambda tm, tv: tv.models.resnext50_32x4d(), False),
    ("torchvision", "mobilenet_v2", lambda tm, tv: tv.models.mobilenet_v2(), False),
    ("torchvision", "mobilenet_v3_small", lambda tm, tv: tv.models.mobilenet_v3_small(), False),
    ("torchvision", "efficientnet_b0", lambda tm, tv: tv.models.efficientnet_b0(), False),
    ("torchvision", "regnet_y_400mf", lambda tm, tv: tv.models.regnet_y_400mf(), False),
    ("torchvision", "shufflenet_v2_x1_0", lambda tm, tv: tv.models.shufflenet_v2_x1_0(), False),
    ("torchvision", "mnasnet0_5", lambda tm, tv: tv.models.mnasnet0_5(), False),
    ("torchvision", "densenet121", lambda tm, tv: tv.models.densenet121(), False),
    ("torchvision", "resnet18 (FrozenBatchNorm2d)",
     lambda tm, tv: tv.models.resnet18(norm_layer=tv.ops.misc.FrozenBatchNorm2d), True),
    ("torchvision", "resnet50 FPN backbone (FrozenBatchNorm2d)",
     lambda tm, tv: _fpn_backbone(tv), False),
    ("timm", "efficientnet_b0", lambda tm, tv: tm.create_model("efficientnet_b0"), False),
    ("timm", "mobilenetv3_small_100", lambda tm, tv: tm.create_model("mobilenetv3_small_100"),
     False),
    ("timm", "regnety_002", lambda tm, tv: tm.create_model("regnety_002"), False),
    ("timm", "cspresnet50", lambda tm, tv: tm.create_model("cspresnet50"), False),
    ("timm", "cspdarknet53", lambda tm, tv: tm.create_model("cspdarknet53"), False),
    ("timm", "rexnet_100", lambda tm, tv: tm.create_model("rexnet_100"), False),
    ("timm", "efficientnet_b0 (FrozenBatchNormAct2d)",
     lambda tm, tv: tm.layers.freeze_batch_norm_2d(tm.create_model("efficientnet_b0")), False),
    ("timm", "test_efficientnet", lambda tm, tv: tm.create_model("test_efficientnet"), True),
    ("timm", "test_byobnet", lambda tm, tv: tm.create_model("test_byobnet"), True),
    ("timm", "test_efficientnet (FrozenBatchNormAct2d)",
     lambda tm, tv: tm.layers.freeze_batch_norm_2d(tm.create_model("test_efficientnet")), True),
    ("timm", "mobilenetv3_small_050", lambda tm, tv: tm.create_model("mobilenetv3_small_050"),
     True),
]
METHOD = ("fold: float64 eval, relative error against the unfolded model; convert: "
          "kernels.convert_batchnorm in float32 against the float64 model, one random input "
          "per mode; times time.perf_counter")
EVAL_INPUT = (1, 3, 32, 32)
TRAIN_INPUT = (2, 3, 64, 64)  # 2x2 at the last stage: batch statistics of 8 values


def _fpn_backbone(tv):
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)


def import_zoo_libraries():
    """(timm, torchvision), importable beside a CPU-only torch (see the module docstring).

    Raises ImportError (with the reason) when either is not installed.
    """
    import torch

    try:
        import torchvision
    except RuntimeError as e:  # the CUDA wheel's C extension did not load
        if "torchvision::nms" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        global _TORCHVISION_SCHEMAS
        _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            _TORCHVISION_SCHEMAS.define(
                f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    import timm

    return timm, torchvision


def randomise_batchnorms(model, seed=0):
    """Random running statistics and affine parameters in every BatchNorm-like module:
    mean N(0, 0.5^2), var U(0.5, 1.5), weight U(0.5, 1.5), bias N(0, 0.5^2)."""
    import torch

    from kernels.zoo import looks_like_batchnorm

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not looks_like_batchnorm(m) or getattr(m, "running_mean", None) is None:
                continue
            C = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(C, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(C, generator=g) + 0.5)
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(C, generator=g) + 0.5)
                m.bias.copy_(torch.randn(C, generator=g) * 0.5)
    return model


def flat_output(out):
    """A model's output as one flat tensor (tuples, named tuples and dicts of tensors too)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out.reshape(-1)
    if isinstance(out, dict):
        out = list(out.values())
    return torch.cat([flat_output(o) for o in out])


def rel_err(actual, expected):
    """max |actual - expected| / max |expected|, in float64."""
    a, e = flat_output(actual).double(), flat_output(expected).double()
    return ((a - e).abs().max() / e.abs().max()).item()


def batchnorm_train_mode(model):
    """Every BatchNorm-like module in training mode, everything else in eval (no dropout)."""
    from kernels.zoo import looks_like_batchnorm

    model.eval()
    for m in model.modules():
        if looks_like_batchnorm(m):
            m.train()
    return model


def fold_check(model, shape=EVAL_INPUT, seed=0):
    """Fold the float64 `model` (randomised beforehand): dict of bns, folded, kept,
    kept_reasons, fold_rel_err, fold_s."""
    import torch

    import kernels

    model = model.double().eval()
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    t = time.perf_counter()
    folded = kernels.fold_batchnorm(model)
    fold_s = time.perf_counter() - t
    with torch.no_grad():
        err = rel_err(folded(x), model(x))
    report = folded.fold_report
    reasons = {}
    for r in report.kept:
        key = f"{r.action}: {r.reason}"
        reasons[key] = reasons.get(key, 0) + 1
    return dict(bns=len(report.records), folded=len(report.folded), kept=len(report.kept),
                kept_reasons="; ".join(f"{n} x {k}" for k, n in reasons.items()),
                fold_rel_err=err, fold_s=fold_s, folded_model=folded)


def convert_check(model, mode, seed=0, device="cpu"):
    """Convert the float32 `model` and run it on the kernels (mode "eval" or "train"):
    dict with convert_<mode>_rel_err and torch_<mode>_rel_err against the float64
    original, converted (modules converted), seconds, and the models run: model (the
    converted one) and reference (the float64 original), on `device`."""
    import torch

    import kernels

    shape = EVAL_INPUT if mode == "eval" else TRAIN_INPUT
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    prepare = (lambda m: m.eval()) if mode == "eval" else batchnorm_train_mode
    ref32 = prepare(copy.deepcopy(model).float().to(device))
    ref64 = prepare(copy.deepcopy(model).double().to(device))
    converted = kernels.convert_batchnorm(prepare(copy.deepcopy(model).float().to(device)))
    with torch.no_grad():
        t = time.perf_counter()
        y = converted(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        y64, y32 = ref64(x.double()), ref32(x)
    report = getattr(converted, "conversion_report", None)
    n_converted = (sum(1 for r in report.records if r.converted) if report is not None
                   else None)
    return {f"convert_{mode}_rel_err": rel_err(y, y64), f"torch_{mode}_rel_err": rel_err(y32, y64),
            "converted": n_converted, "seconds": seconds, "model": converted,
            "reference": ref64}


def run_command(args):
    import pandas as pd

    from bnbench.environment import command_out, read_tf32, stamp

    out = command_out("zoo", args.out, "results", ["zoo.csv"])
    if out is None:
        return 2
    import kernels
    import torch

    timm, torchvision = import_zoo_libraries()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernels.set_interpreter_plans(device == "cpu")
    rows = []
    wanted = [m for m in MODELS if not args.models or any(s in m[1] for s in args.models)]
    from tqdm import tqdm

    bar = tqdm(wanted, desc="bnbench zoo", unit="model", file=sys.stderr)
    for library, name, build, small in bar:
        bar.set_postfix_str(name)
        row = dict(library=library, model=name)
        torch.manual_seed(0)  # the model's own initialisation: the same network every run
        try:
            model = randomise_batchnorms(build(timm, torchvision))
            fold = fold_check(model)
            fold.pop("folded_model")
            row.update(fold)
            if args.convert == "all" or (args.convert == "small" and small):
                t = time.perf_counter()
                for mode in ("eval", "train"):
                    res = convert_check(model, mode, device=device)
                    row[f"convert_{mode}_rel_err"] = res[f"convert_{mode}_rel_err"]
                    row[f"torch_{mode}_rel_err"] = res[f"torch_{mode}_rel_err"]
                    row["converted"] = res["converted"]
                row["convert_s"] = time.perf_counter() - t
            row["error"] = ""
        except Exception as e:  # one model's failure is a row, not the end of the sweep
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        bar.write(_line(row))
        rows.append(row)
    df = pd.DataFrame(rows)
    df["timm_version"], df["torchvision_version"] = timm.__version__, torchvision.__version__
    df = stamp(df, device, interpreted=bool(kernels.INTERPRETED), method=METHOD,
               tf32=read_tf32() if device == "cuda" else None)
    df.to_csv(out / "zoo.csv", index=False)
    print(f"wrote {out / 'zoo.csv'}\n")
    print(markdown_table(df))
    return 1 if (df["error"] != "").any() else 0


def _fmt(v, spec):
    import math

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return format(v, spec)


def _line(row):
    """One model's result; the conversion part only for a model that was converted."""
    line = (f"{row['library']:12s} {row['model']:42s} BNs {row.get('bns', '')!s:>3} folded "
            f"{row.get('folded', '')!s:>3} fold err {_fmt(row.get('fold_rel_err'), '.1e')}")
    if "convert_s" in row:
        line += (f" convert eval/train {_fmt(row.get('convert_eval_rel_err'), '.1e')}"
                 f"/{_fmt(row.get('convert_train_rel_err'), '.1e')}")
    return f"{line} {row.get('error', '')}".rstrip()


def markdown_table(df):
    """The README's zoo table."""
    lines = ["| library | model | BNs | folded | kept (reason) | fold rel. error | fold s | "
             "converted: eval / train rel. error (torch fp32) | convert s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in df.to_dict("records"):
        if r.get("error"):
            lines.append(f"| {r['library']} | {r['model']} | error: {r['error']} |||||||")
            continue
        kept = str(r["kept"]) + (f" ({r['kept_reasons']})" if r.get("kept_reasons") else "")
        conv = ""
        if _fmt(r.get("convert_eval_rel_err"), ".1e"):
            conv = (f"{_fmt(r['convert_eval_rel_err'], '.1e')} / "
                    f"{_fmt(r['convert_train_rel_err'], '.1e')} "
                    f"({_fmt(r['torch_eval_rel_err'], '.1e')} / "
                    f"{_fmt(r['torch_train_rel_err'], '.1e')})")
        lines.append(f"| {r['library']} | {r['model']} | {r['bns']} | {r['folded']} | {kept} | "
                     f"{_fmt(r['fold_rel_err'], '.1e')} | {_fmt(r['fold_s'], '.1f')} | {conv} | "
                     f"{_fmt(r.get('convert_s'), '.0f')} |")
    return "\n".join(lines)


def _model_substrings(text):
    """--models: comma-separated substrings, each naming at least one model in MODELS."""
    import argparse

    wanted = [m for m in text.split(",") if m]
    bad = [m for m in wanted if not any(m in name for _, name, _, _ in MODELS)]
    if bad or not wanted:
        raise argparse.ArgumentTypeError(
            f"no model matches {', '.join(bad) or repr(text)} (models: "
            f"{', '.join(name for _, name, _, _ in MODELS)})")
    return wanted


def add_parser(subparsers):
    p = subparsers.add_parser(
        "zoo", help="fold and convert timm/torchvision models: exactness, BNs folded and kept",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=_model_substrings,
                   help="comma-separated substrings of model names (default: all)")
    p.add_argument("--convert", choices=("small", "all", "none"), default="small",
                   help="which models to also convert and run on the kernels (default: the "
                        "small ones; through the interpreter that takes seconds each)")
    p.add_argument("--out", default=None,
                   help="folder for zoo.csv (default results/; in a checkout, results/local/ "
                        "where results/zoo.csv is committed)")
    p.set_defaults(func=run_command)
