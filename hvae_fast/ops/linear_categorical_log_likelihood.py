"""linear_categorical_log_likelihood: an MLP decoder's last Linear layer and the categorical
log-likelihood in one operator, in chunks of pixels.

No kernels of its own: a custom op in Python, composed of matmuls and the categorical
kernels (csrc/*/categorical_log_likelihood*), on every device. Specification
hvae_fast.reference.linear_categorical_log_likelihood; tests tests/test_linear_categorical.py.
"""
import sys
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _checks
from ._registry import _accumulation_dtype, _autocast_to_float32, _ops

# The decoder's last Linear layer and the categorical likelihood, in chunks of pixels,
# so the [B, D, K] logits never exist at once: each chunk's logits are made, used and
# dropped, in the forward and again (recomputed) in the backward.

# The chunk size is hvae_fast.ops.LINEAR_CHUNK_BYTES, one setting for both fused heads: read
# from the package at each call, so that setting it there (or a test's monkeypatch) applies.
_package = sys.modules[__package__]


def _pixel_chunks(B, D, K, itemsize):
    c = max(1, min(D, _package.LINEAR_CHUNK_BYTES // max(1, B * K * itemsize)))
    return [(d0, min(D, d0 + c)) for d0 in range(0, D, c)]


def _chunk_logits(h, weight, bias, d0, d1, K):
    rows = slice(d0 * K, d1 * K)
    return F.linear(h, weight[rows], None if bias is None else bias[rows]).view(h.shape[0], d1 - d0, K)


def linear_categorical_log_likelihood(h, weight, bias, x):
    """categorical_log_likelihood(F.linear(h, weight, bias).view(B, D, K), x) without the
    full logits: h [B, H], weight [D*K, H], bias [D*K] or None, x [B, D]. Returns [B]."""
    _checks.linear_categorical(h, weight, bias, x)
    return _ops.linear_categorical_log_likelihood(h, weight, bias, x)[0]


@torch.library.custom_op("hvae_fast::linear_categorical_log_likelihood", mutates_args=())
def _linear_categorical(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    (B, D), K = x.shape, weight.shape[0] // x.shape[1]
    ll = h.new_zeros(B)
    lse = h.new_empty((B, D, 2), dtype=_accumulation_dtype(h.dtype))
    for d0, d1 in _pixel_chunks(B, D, K, h.element_size()):
        ll_c, lse[:, d0:d1] = _ops.categorical_log_likelihood(_chunk_logits(h, weight, bias, d0, d1, K),
                                                              x[:, d0:d1])
        ll += ll_c
    return ll, lse


@torch.library.custom_op("hvae_fast::linear_categorical_log_likelihood_backward", mutates_args=())
def _linear_categorical_backward(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                                 bias: Optional[torch.Tensor], x: torch.Tensor,
                                 lse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (B, D), K = x.shape, weight.shape[0] // x.shape[1]
    grad_h = torch.zeros_like(h)
    grad_w = torch.empty_like(weight)
    grad_b = weight.new_empty(weight.shape[0])
    for d0, d1 in _pixel_chunks(B, D, K, h.element_size()):
        logits = _chunk_logits(h, weight, bias, d0, d1, K)
        _ops.categorical_log_likelihood_backward_(grad, logits, x[:, d0:d1], lse[:, d0:d1])
        g = logits.view(B, -1)  # the chunk's logits, now holding their gradient
        rows = slice(d0 * K, d1 * K)
        grad_h.addmm_(g, weight[rows])
        torch.mm(g.t(), h, out=grad_w[rows])
        torch.sum(g, 0, out=grad_b[rows])
    return grad_h, grad_w, grad_b


@_linear_categorical.register_fake
def _(h, weight, bias, x):
    _checks.linear_categorical(h, weight, bias, x)
    return h.new_empty(x.shape[0]), h.new_empty(x.shape + (2,), dtype=_accumulation_dtype(h.dtype))


@_linear_categorical_backward.register_fake
def _(grad, h, weight, bias, x, lse):
    return torch.empty_like(h), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _register_head_autograd(op, backward):
    """Autograd of a fused head (inputs, weight, bias, x) -> (ll, lse): the backward op
    recomputes each chunk's logits from what the forward saved."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[1])
        ctx.mark_non_differentiable(output[1])

    def grad(ctx, grad_ll, _grad_lse):
        inputs, weight, bias, x, lse = ctx.saved_tensors
        grad_in, grad_w, grad_b = backward(grad_ll, inputs, weight, bias, x, lse)
        return grad_in, grad_w, (grad_b if bias is not None else None), None

    op.register_autograd(grad, setup_context=setup)


_register_head_autograd(_linear_categorical, _ops.linear_categorical_log_likelihood_backward)
_autocast_to_float32("linear_categorical_log_likelihood")
