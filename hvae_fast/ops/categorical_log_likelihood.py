"""categorical_log_likelihood: the per-example sum of log_softmax(logits)[x], forward and backward.

The backward has two operators: categorical_log_likelihood_backward (a fresh gradient) and
categorical_log_likelihood_backward_ (the gradient written into the logits: overwrite_logits).
Kernels csrc/cpu/categorical_log_likelihood.cpp, csrc/cuda/categorical_log_likelihood*.cu;
specification hvae_fast.reference.categorical_log_likelihood; tests tests/test_ops.py,
tests/test_overwrite_logits.py.
"""
import torch

from .. import _checks, reference
from ._registry import _accumulation_dtype, _autocast_to_float32, _fallback, _ops, _register_autograd

def categorical_log_likelihood(logits, x, *, overwrite_logits=False):
    """Fused per-example sum of log_softmax(logits)[x]; see hvae_fast.reference.

    overwrite_logits=True lets the backward write the gradient into logits' own storage
    instead of a fresh logits-sized tensor (on the CPU the fresh tensor's page faults
    cost more than the kernel). Use it when nothing reads the logits after the backward,
    e.g. the output of a Linear layer: the logits then hold their gradient, and any
    other autograd use of them fails loudly (their version counter moves). It applies
    to contiguous logits outside torch.compile; elsewhere it is ignored.

    Class indices out of range (x not an integer in 0..K-1): on the CPU an IndexError that
    names the first bad value and where it is, which can be caught. On CUDA the kernels check
    on the device, so the error is a device-side assert: it surfaces at the next
    synchronizing call as a RuntimeError ("device-side assert triggered") and leaves the
    process's CUDA context unusable, so that every later CUDA call fails too and the process
    must restart. Check x beforehand where bad values can occur (e.g.
    ``((x >= 0) & (x < K)).all()``, one synchronization). The same holds for the per-pixel
    and linear heads, and for Bernoulli targets that are not 0 or 1.
    """
    _checks.categorical(logits, x)
    return _ops.categorical_log_likelihood(logits, x, bool(overwrite_logits))[0]


def _row_lse(logits):
    """Each row's (max, log sum exp(l - max)): the second output of the categorical op,
    [..., 2]; their sum is the log-sum-exp, kept apart so that neither rounds the other."""
    lg = logits.to(_accumulation_dtype(logits.dtype))
    m = lg.amax(-1)
    log_s = torch.log(torch.exp(lg - m.unsqueeze(-1)).sum(-1))
    return torch.stack([m, log_s], -1)


@_fallback("categorical_log_likelihood")
def _categorical_ref(logits, x, overwrite_logits=False):
    return reference.categorical_log_likelihood(logits, x), _row_lse(logits)


@_fallback("categorical_log_likelihood_backward")
def _categorical_backward_ref(grad, logits, x, lse):
    _checks.categorical_lse(lse, x, logits, "categorical_log_likelihood_backward")
    return reference.categorical_log_likelihood_backward(grad, logits, x)


@_fallback("categorical_log_likelihood_backward_")
def _categorical_backward_inplace_ref(grad, logits, x, lse):
    logits.copy_(_categorical_backward_ref(grad, logits, x, lse))


@torch.library.register_fake("hvae_fast::categorical_log_likelihood")
def _(logits, x, overwrite_logits=False):
    _checks.categorical(logits, x)
    lse = logits.new_empty(logits.shape[:-1] + (2,), dtype=_accumulation_dtype(logits.dtype))
    return logits.new_empty(logits.shape[0]), lse


@torch.library.register_fake("hvae_fast::categorical_log_likelihood_backward")
def _(grad, logits, x, lse):
    _checks.categorical(logits, x)
    _checks.categorical_lse(lse, x, logits, "categorical_log_likelihood_backward")
    return logits.new_empty(logits.shape)


@torch.library.register_fake("hvae_fast::categorical_log_likelihood_backward_")
def _(grad, logits, x, lse):
    _checks.categorical(logits, x)
    _checks.categorical_lse(lse, x, logits, "categorical_log_likelihood_backward_")


def _categorical_setup(ctx, inputs, output):
    logits, x, overwrite = inputs
    ctx.save_for_backward(logits, x, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.overwrite = overwrite and logits.is_contiguous()


def _categorical_backward(ctx, grad, _grad_lse):
    logits, x, lse = ctx.saved_tensors
    if ctx.overwrite and not torch.compiler.is_compiling():
        _ops.categorical_log_likelihood_backward_(grad, logits, x, lse)
        torch.autograd.graph.increment_version(logits)  # other saved uses of logits now fail loudly
        return logits, None, None
    return _ops.categorical_log_likelihood_backward(grad, logits, x, lse), None, None


_register_autograd("hvae_fast::categorical_log_likelihood", _categorical_backward,
                   setup_context=_categorical_setup)
_autocast_to_float32("categorical_log_likelihood")
