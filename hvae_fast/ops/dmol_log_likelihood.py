"""dmol_log_likelihood: the discretized logistic mixture's (PixelCNN++'s) log-likelihood, fused,
and dmol_sample and dmol_mean (pure PyTorch) to draw from the same mixture and take its mean.

Kernels csrc/cpu/dmol_log_likelihood.cpp, csrc/cuda/dmol_log_likelihood.cu; specification
hvae_fast.reference.dmol_log_likelihood; tests tests/test_dmol.py.
"""
import torch

from .. import _checks, reference
from ._registry import _autocast_to_float32, _fallback, _ops, _register_autograd

def dmol_log_likelihood(params, x, *, num_mixtures, num_vals=256, min_log_scale=-7.0):
    """Fused per-example sum over pixels of log p(x) under a discretized logistic mixture
    (PixelCNN++'s likelihood, exact for every input); see hvae_fast.reference.dmol_log_likelihood
    for the formula and the layout of params ([B, M (1 + 2C + C(C-1)/2), H, W]). x: [B, C, H, W]
    integer pixel values (uint8 or int64) in 0..num_vals-1. Returns [B]; x gets no gradient.

    The backward recomputes everything from params: the forward saves nothing but its inputs.
    A value of x out of range: on the CPU a ValueError naming it and where it is; on CUDA a
    device-side assert (see categorical_log_likelihood's docstring).
    """
    _checks.dmol(params, x, num_mixtures, num_vals, min_log_scale)
    return _ops.dmol_log_likelihood(params, x, int(num_mixtures), int(num_vals), float(min_log_scale))


@_fallback("dmol_log_likelihood")
def _dmol_ref(params, x, num_mixtures, num_vals=256, min_log_scale=-7.0):
    return reference.dmol_log_likelihood(params, x, num_mixtures=num_mixtures, num_vals=num_vals,
                                         min_log_scale=min_log_scale)


@_fallback("dmol_log_likelihood_backward")
def _dmol_backward_ref(grad, params, x, num_mixtures, num_vals=256, min_log_scale=-7.0):
    return reference.dmol_log_likelihood_backward(grad, params, x, num_mixtures=num_mixtures, num_vals=num_vals,
                                                  min_log_scale=min_log_scale)


@torch.library.register_fake("hvae_fast::dmol_log_likelihood")
def _(params, x, num_mixtures, num_vals=256, min_log_scale=-7.0):
    _checks.dmol(params, x, num_mixtures, num_vals, min_log_scale)
    return params.new_empty(params.shape[0])


@torch.library.register_fake("hvae_fast::dmol_log_likelihood_backward")
def _(grad, params, x, num_mixtures, num_vals=256, min_log_scale=-7.0):
    _checks.dmol(params, x, num_mixtures, num_vals, min_log_scale)
    torch._check(grad.dim() == 1 and grad.shape[0] == params.shape[0],
                 lambda: f"dmol_log_likelihood_backward: grad must have shape [{params.shape[0]}], "
                 f"got {tuple(grad.shape)}")
    return params.new_empty(params.shape)


def _dmol_setup(ctx, inputs, output):
    params, x, *ctx.consts = inputs
    ctx.save_for_backward(params, x)


def _dmol_backward(ctx, grad):
    params, x = ctx.saved_tensors
    return _ops.dmol_log_likelihood_backward(grad, params, x, *ctx.consts), None, None, None, None


_register_autograd("hvae_fast::dmol_log_likelihood", _dmol_backward, setup_context=_dmol_setup)
_autocast_to_float32("dmol_log_likelihood")


def _dmol_split(params, num_mixtures, channels, num_vals, min_log_scale, op):
    if not isinstance(params, torch.Tensor) or not params.is_floating_point() or params.dim() != 4:
        raise ValueError(f"{op}: params must be a floating-point [B, P, H, W] tensor")
    if num_mixtures < 1 or channels < 1 or not 2 <= num_vals <= 2**24:
        raise ValueError(f"{op}: need num_mixtures >= 1, channels >= 1 and num_vals in 2..2^24, got "
                         f"{num_mixtures}, {channels}, {num_vals}")
    P = _checks.dmol_channels(num_mixtures, channels)
    if params.shape[1] != P:
        raise ValueError(f"{op}: params has {params.shape[1]} channels, but num_mixtures = {num_mixtures} and "
                         f"C = {channels} need M * (1 + 2C + C(C-1)/2) = {P}")
    logits, means, log_scales, coefs = reference.dmol_parameters(params, num_mixtures, channels)
    return logits, means, torch.clamp(log_scales, min=min_log_scale), torch.tanh(coefs)


@torch.no_grad()
def dmol_sample(params, *, num_mixtures, channels, num_vals=256, min_log_scale=-7.0, temperature=1.0,
                generator=None):
    """Pixel values [B, C, H, W] (int64, in 0..num_vals-1) drawn from the discretized logistic mixture
    that dmol_log_likelihood scores: per pixel a component m from softmax(logits), then channel by
    channel a logistic draw y = mean + temperature * exp(log_scale) * logit(u), u ~ U(0, 1), rounded to
    its bin v = clamp(round((y + 1) / 2 * (num_vals - 1)), 0, num_vals - 1), the mean of each later
    channel shifted by tanh(coef) times this channel's drawn value (scaled to [-1, 1]), as in the
    likelihood. temperature scales the logistic scales only (0: each component's mean, rounded).
    Pure PyTorch, no gradient."""
    logits, means, log_scales, coefs = _dmol_split(params, num_mixtures, channels, num_vals, min_log_scale,
                                                   "dmol_sample")
    B, _, H, W = params.shape
    K = num_vals

    def uniform(shape):  # in (0, 1); a generator must be on params' device
        u = torch.rand(shape, generator=generator, dtype=params.dtype, device=params.device)
        return u.clamp(torch.finfo(params.dtype).tiny, 1 - torch.finfo(params.dtype).eps)

    gumbel = -torch.log(-torch.log(uniform(logits.shape)))
    m = torch.argmax(logits + gumbel, 1, keepdim=True)  # [B, 1, H, W]

    def pick(t):  # [B, M, H, W] -> [B, H, W] at the chosen component
        return t.gather(1, m).squeeze(1)

    values, scaled = [], []
    for c in range(channels):
        mean = pick(means[:, c])
        for k in range(c):
            mean = mean + pick(coefs[:, c * (c - 1) // 2 + k]) * scaled[k]
        u = uniform(mean.shape)
        y = mean + temperature * torch.exp(pick(log_scales[:, c])) * (torch.log(u) - torch.log1p(-u))
        v = torch.clamp(torch.round((y + 1) / 2 * (K - 1)), 0, K - 1)
        values.append(v.long())
        scaled.append(v / (K - 1) * 2 - 1)
    return torch.stack(values, 1)


@torch.no_grad()
def dmol_mean(params, *, num_mixtures, channels, num_vals=256, min_log_scale=-7.0):
    """The expected pixel value (a float in [0, num_vals - 1]) per pixel and channel, [B, C, H, W]:
    sum over components of softmax(logits)_m E[v | m], with E[v | m] of channel c its discretized
    logistic's exact mean, sum over v = 1..K-1 of P(V >= v) = sigmoid((mean - edge_v) / scale),
    edge_v = (2v - 1) / (K - 1) - 1 the bin's lower edge. The coupling shifts channel c's mean in
    component m by tanh(coef) times the earlier channels' expected (scaled) values in m: exact for one
    channel or zero coefficients; with coupling the mean of a shift by the expectation, not the
    expectation over the earlier channels' values. Pure PyTorch, no gradient."""
    logits, means, log_scales, coefs = _dmol_split(params, num_mixtures, channels, num_vals, min_log_scale,
                                                   "dmol_mean")
    K = num_vals
    weights = torch.softmax(logits, 1)
    inv = torch.exp(-log_scales)  # [B, C, M, H, W]
    n = means[:, 0].numel()
    step = max(1, (1 << 24) // max(1, n))  # bins per chunk: about 16M elements at a time
    out, scaled = [], []
    for c in range(channels):
        mean = means[:, c]
        for k in range(c):
            mean = mean + coefs[:, c * (c - 1) // 2 + k] * scaled[k]
        expected = torch.zeros_like(mean)
        for v0 in range(1, K, step):
            v = torch.arange(v0, min(K, v0 + step), dtype=params.dtype, device=params.device)
            edge = (2 * v - 1) / (K - 1) - 1
            expected += torch.sigmoid((mean.unsqueeze(-1) - edge) * inv[:, c].unsqueeze(-1)).sum(-1)
        scaled.append(expected / (K - 1) * 2 - 1)
        out.append((weights * expected).sum(1))
    return torch.stack(out, 1)
