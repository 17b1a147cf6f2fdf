"""bernoulli_log_likelihood: the per-example sum of x log sigmoid(l) + (1-x) log sigmoid(-l).

Kernels csrc/cpu/bernoulli_log_likelihood.cpp, csrc/cuda/bernoulli_log_likelihood.cu;
specification hvae_fast.reference.bernoulli_log_likelihood; tests tests/test_ops.py.
"""
import torch

from .. import _checks, reference
from ._registry import _autocast_to_float32, _fallback, _ops, _register_autograd

def bernoulli_log_likelihood(logits, x):
    """Fused per-example sum of x*log(sigmoid(l)) + (1-x)*log(sigmoid(-l)); see hvae_fast.reference."""
    _checks.bernoulli(logits, x)
    return _ops.bernoulli_log_likelihood(logits, x)


@_fallback("bernoulli_log_likelihood")
def _bernoulli_ref(logits, x):
    return reference.bernoulli_log_likelihood(logits, x)


@_fallback("bernoulli_log_likelihood_backward")
def _bernoulli_backward_ref(grad, logits, x):
    return reference.bernoulli_log_likelihood_backward(grad, logits, x)


@torch.library.register_fake("hvae_fast::bernoulli_log_likelihood")
def _(logits, x):
    _checks.bernoulli(logits, x)
    return logits.new_empty(logits.shape[0])


@torch.library.register_fake("hvae_fast::bernoulli_log_likelihood_backward")
def _(grad, logits, x):
    _checks.bernoulli(logits, x)
    return logits.new_empty(logits.shape)


def _bernoulli_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _bernoulli_backward(ctx, grad):
    logits, x = ctx.saved_tensors
    return _ops.bernoulli_log_likelihood_backward(grad, logits, x), None


_register_autograd("hvae_fast::bernoulli_log_likelihood", _bernoulli_backward,
                   setup_context=_bernoulli_setup)
_autocast_to_float32("bernoulli_log_likelihood")
