"""Triton kernels for BatchNorm2d: training (two-pass and single-pass statistics) and inference.

Public API:
    batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, stats="single_pass", residual=None, activation=None)
    BatchNorm1d / BatchNorm2d / BatchNorm3d(num_features, ..., *, stats="single_pass",
                                            activation=None)
    SyncBatchNorm(num_features, ..., process_group=None, *, stats=, activation=): over
        torch.distributed (NCCL for CUDA, gloo for CPU); SyncBatchNorm.convert_sync_batchnorm
    convert_batchnorm(module, **kwargs): the returned module's conversion_report says
        what was converted and what was kept, with the reason
    fold_conv_bn(conv, bn), fold_batchnorm(model, inplace=False), BatchNormInference
    fold_batchnorm(exported_program) / fold_exported_program(_report): a torch.export program
        with its BatchNorm nodes folded into the conv / linear weights
    set_autotune(enabled): try num_warps 4/8/16 per shape (also BNBENCH_AUTOTUNE=1)
    set_interpreter_plans(fast): few programs and large tiles for interpreted (CPU) launches
    planning(policy=None, **overrides): a context with a PlanPolicy (GPU_PLANS,
        FAST_INTERPRETER_PLANS, or fields replaced) for the launch plans made in it
    Epilogue: the residual add and activation after the affine step, one value from the
        API to the kernels (Epilogue.of(residual, activation), .value "residual+relu"...)
    torch_batch_norm(...): PyTorch's batch norm with the same epilogue (the CPU fallback,
        and the float64 reference)

On CPU the kernels run through Triton's interpreter when TRITON_INTERPRET=1 is set
before triton is imported; otherwise CPU tensors use PyTorch's own batch norm.
"""

from ._common import Epilogue
from .fold import BatchNormInference, FoldRecord, FoldReport, fold_batchnorm, fold_conv_bn
from .fold_export import ExportFoldRecord, fold_exported_program, fold_exported_program_report
from .modules import (BatchNorm1d, BatchNorm2d, BatchNorm3d, ConversionRecord, ConversionReport,
                      convert_batchnorm)
from ._plan import (FAST_INTERPRETER_PLANS, GPU_PLANS, PlanPolicy, planning,
                    set_interpreter_plans)
from ._tuning import set_autotune
from .ops import INTERPRETED, batch_norm, torch_batch_norm, uses_triton
from .sync import SyncBatchNorm, sync_batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "sync_batch_norm",
           "ConversionRecord", "Epilogue", "torch_batch_norm",
           "ConversionReport", "batch_norm", "convert_batchnorm", "uses_triton", "INTERPRETED",
           "set_autotune", "set_interpreter_plans", "BatchNormInference", "FoldRecord",
           "planning", "PlanPolicy", "GPU_PLANS", "FAST_INTERPRETER_PLANS",
           "FoldReport", "fold_batchnorm", "fold_conv_bn", "ExportFoldRecord",
           "fold_exported_program", "fold_exported_program_report"]
