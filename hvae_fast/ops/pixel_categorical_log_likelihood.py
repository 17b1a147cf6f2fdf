"""pixel_categorical_log_likelihood: an image decoder's last 1x1 convolution and the
categorical log-likelihood in one operator, in chunks of pixels.

No kernels of its own: a custom op in Python, composed of matmuls and the categorical
kernels (csrc/*/categorical_log_likelihood*), on every device; its chunks are those of
linear_categorical_log_likelihood (LINEAR_CHUNK_BYTES). Specification
hvae_fast.reference.pixel_categorical_log_likelihood; tests tests/test_pixel_categorical.py.
"""
from typing import Optional, Tuple

import torch

from .. import _checks
from ._registry import _accumulation_dtype, _autocast_to_float32, _ops
from .linear_categorical_log_likelihood import _pixel_chunks, _register_head_autograd

# An image decoder's last 1x1 convolution and the categorical likelihood, in chunks of
# pixels: the features as rows, one per pixel ([B*H*W, C], a view for channels_last
# features, else one copy), each chunk's logits [P, channels, K] made in one buffer by
# a matmul, used and overwritten, in the forward and again (recomputed) in the backward.
# The [B, channels, K, H, W] logits never exist.

def _pixel_rows(features, x):
    """features as [B*H*W, C] and x as [B*H*W, channels]: one row per pixel."""
    B, C = features.shape[:2]
    return features.permute(0, 2, 3, 1).reshape(-1, C), x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _pixel_logits(rows, weight, bias, r0, r1, buf):
    """The logits of pixel rows r0..r1 in buf[:r1 - r0], as [P, channels*K]."""
    out = buf[:r1 - r0]
    if bias is None:
        return torch.mm(rows[r0:r1], weight.t(), out=out)
    return torch.addmm(bias, rows[r0:r1], weight.t(), out=out)


def _bad_class(x, K, cause):
    """Raises an IndexError naming the first value of x that is not a class index, where it is."""
    bad = ~((x == torch.floor(x)) & (x >= 0) & (x < K)) if x.is_floating_point() else (x < 0) | (x >= K)
    where = bad.nonzero()
    if where.shape[0] == 0:
        raise cause
    b, c, i, j = where[0].tolist()
    raise IndexError(f"pixel_categorical_log_likelihood: x holds {x[b, c, i, j].item()} at [{b}, {c}, {i}, {j}], "
                     f"which is not a class index in 0..{K - 1}") from cause


def pixel_categorical_log_likelihood(features, weight, bias, x):
    """categorical_log_likelihood of F.conv2d(features, weight[:, :, None, None], bias) viewed
    [B, channels, K, H, W] (classes moved last), x, without the full logits: features
    [B, C, H, W], weight [channels*K, C] (row c*K + k: channel c, class k), bias
    [channels*K] or None, x [B, channels, H, W] class indices. Returns [B], summed over
    the pixels and channels. See hvae_fast.reference.pixel_categorical_log_likelihood."""
    _checks.pixel_categorical(features, weight, bias, x)
    return _ops.pixel_categorical_log_likelihood(features, weight, bias, x)[0]


@torch.library.custom_op("hvae_fast::pixel_categorical_log_likelihood", mutates_args=())
def _pixel_categorical(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    B, channels, H, W = x.shape
    K = weight.shape[0] // channels
    rows, xrows = _pixel_rows(features, x)
    N, acc = rows.shape[0], _accumulation_dtype(features.dtype)
    pixel_ll = features.new_empty(N, dtype=acc)  # summed per example at the end, in a fixed order
    lse = features.new_empty((N, channels, 2), dtype=acc)
    chunks = _pixel_chunks(1, N, channels * K, features.element_size())
    buf = features.new_empty((chunks[0][1] if chunks else 0, channels * K))
    for r0, r1 in chunks:
        logits = _pixel_logits(rows, weight, bias, r0, r1, buf).view(r1 - r0, channels, K)
        try:
            pixel_ll[r0:r1], lse[r0:r1] = _ops.categorical_log_likelihood(logits, xrows[r0:r1])
        except IndexError as e:
            _bad_class(x, K, e)
    return pixel_ll.view(B, H * W).sum(1).to(features.dtype), lse


@torch.library.custom_op("hvae_fast::pixel_categorical_log_likelihood_backward", mutates_args=())
def _pixel_categorical_backward(grad: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                                bias: Optional[torch.Tensor], x: torch.Tensor,
                                lse: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, channels, H, W = x.shape
    C, K = features.shape[1], weight.shape[0] // channels
    rows, xrows = _pixel_rows(features, x)
    N, acc = rows.shape[0], _accumulation_dtype(features.dtype)
    grad_rows = features.new_empty((N, C))  # grad_features as [B, H, W, C]: channels_last
    grad_w = torch.zeros_like(weight, dtype=acc, memory_format=torch.contiguous_format)
    grad_b = weight.new_zeros(weight.shape[0], dtype=acc)
    grad_pixel = grad.repeat_interleave(H * W)  # each pixel row's upstream gradient
    chunks = _pixel_chunks(1, N, channels * K, features.element_size())
    buf = features.new_empty((chunks[0][1] if chunks else 0, channels * K))
    for r0, r1 in chunks:
        g = _pixel_logits(rows, weight, bias, r0, r1, buf)
        _ops.categorical_log_likelihood_backward_(grad_pixel[r0:r1], g.view(r1 - r0, channels, K),
                                                  xrows[r0:r1], lse[r0:r1])
        # g, the chunk's logits, now holds their gradient
        torch.mm(g, weight, out=grad_rows[r0:r1])
        if acc == weight.dtype:
            grad_w.addmm_(g.t(), rows[r0:r1])
            grad_b += g.sum(0)
        else:  # half precision: each chunk's share in half, their sum in float32
            grad_w += torch.mm(g.t(), rows[r0:r1])
            grad_b += g.sum(0, dtype=acc)
    grad_features = grad_rows.view(B, H, W, C).permute(0, 3, 1, 2)
    return grad_features, grad_w.to(weight.dtype), grad_b.to(weight.dtype)


@_pixel_categorical.register_fake
def _(features, weight, bias, x):
    _checks.pixel_categorical(features, weight, bias, x)
    B, channels, H, W = x.shape
    acc = _accumulation_dtype(features.dtype)
    return features.new_empty(B), features.new_empty((B * H * W, channels, 2), dtype=acc)


@_pixel_categorical_backward.register_fake
def _(grad, features, weight, bias, x, lse):
    B, C, H, W = features.shape
    grad_features = features.new_empty((B, H, W, C)).permute(0, 3, 1, 2)
    return grad_features, weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


_register_head_autograd(_pixel_categorical, _ops.pixel_categorical_log_likelihood_backward)
_autocast_to_float32("pixel_categorical_log_likelihood")
