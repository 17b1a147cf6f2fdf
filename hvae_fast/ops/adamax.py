"""adamax_: one torch.optim.Adamax step over lists of tensors, in place (the step of
hvae_fast.optim.Adamax).

Kernels csrc/cpu/adamax.cpp, csrc/cuda/adamax.cu; specification hvae_fast.reference.adamax_;
tests tests/test_optim.py.
"""
import torch

from .. import _checks, reference
from ._registry import _fallback, _ops

def adamax_(params, grads, exp_avgs, exp_infs, neg_clrs, *, beta1, beta2, eps, weight_decay=0.0):
    """One torch.optim.Adamax step over lists of tensors, in place, one pass over each;
    neg_clrs[j] = -lr / (1 - beta1**step_j). See hvae_fast.reference.adamax_."""
    _checks.adamax(params, grads, exp_avgs, exp_infs, neg_clrs)
    _ops.adamax_(params, grads, exp_avgs, exp_infs, [float(c) for c in neg_clrs], float(beta1), float(beta2),
                 float(eps), float(weight_decay))


@_fallback("adamax_")
def _adamax_ref(params, grads, exp_avgs, exp_infs, neg_clrs, beta1, beta2, eps, weight_decay):
    reference.adamax_(params, grads, exp_avgs, exp_infs, neg_clrs, beta1=beta1, beta2=beta2, eps=eps,
                      weight_decay=weight_decay)


@torch.library.register_fake("hvae_fast::adamax_")
def _(params, grads, exp_avgs, exp_infs, neg_clrs, beta1, beta2, eps, weight_decay):
    _checks.adamax(params, grads, exp_avgs, exp_infs, neg_clrs)
