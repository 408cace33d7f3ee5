r"""The folding maths, once: a layer's weight and bias with the eval-mode BatchNorm after it.

    s_c = gamma_c / sqrt(running_var_c + eps),
    W'[c] = W[c] * s_c,     b'_c = (b_c - running_mean_c) * s_c + beta_c

(gamma = 1, beta = 0 without affine; b = 0 without bias).  The output channel c is the
weight's dim 0 for a convolution and a Linear, and dim 1 of each group for a transposed
convolution (weight (in, out/groups, *k)).  Computed in float64 (float32 on MPS, which has
no float64) and returned in the weight's dtype.  Used by :func:`kernels.fold_conv_bn` (on
modules) and :mod:`kernels.fold_export` (on exported programs).
"""

import torch


def fold_dtype(device):
    """float64 for the fold arithmetic, float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def fold_weights(weight, bias, running_mean, running_var, gamma, beta, eps, *,
                 transposed=False, groups=1):
    """(W', b'): `weight`/`bias` of a conv, transposed conv or Linear with the BN folded in.

    Args:
        weight: (out, in/groups, *k), (in, out/groups, *k) when `transposed`, or (out, in).
        bias, gamma, beta: (C,) tensors or None.  running_mean, running_var: (C,).
        eps: the BN's epsilon.
    Returns:
        New tensors (no autograd history) in `weight`'s dtype and on its device.
    """
    w = weight.detach()
    acc = fold_dtype(w.device)
    with torch.no_grad():
        def f(t):  # a statistic or parameter, on the weight's device, in the fold dtype
            return t.detach().to(device=w.device, dtype=acc)

        C = running_var.numel()
        scale = torch.rsqrt(f(running_var) + eps)
        if gamma is not None:
            scale = scale * f(gamma)
        b = f(bias) if bias is not None else torch.zeros(C, dtype=acc, device=w.device)
        b = (b - f(running_mean)) * scale
        if beta is not None:
            b = b + f(beta)
        if transposed:
            # weight (in, out/groups, *k): output channel g*out/groups + j is column j of group g
            g = groups
            grouped = w.to(acc).reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
            view = scale.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
            folded = (grouped * view).reshape(w.shape)
        else:  # output channel c is row c
            folded = w.to(acc) * scale.reshape(-1, *([1] * (w.dim() - 1)))
    return folded.to(w.dtype), b.to(w.dtype)
