"""The specification: every hvae_fast op in plain PyTorch, no custom operators.

Each test compares the fused kernels with these functions, and they are what runs
when the compiled extension is missing (see hvae_fast.ops).
"""
import torch
import torch.nn.functional as F

from . import _checks


def per_example_sum(t):
    """Sum over every dimension but the first: [B, ...] -> [B]."""
    return t.reshape(t.shape[0], -1).sum(1)


def posterior_sample(delta_mu, delta_logvar, eps, mu_p=None, logvar_p=None, *,
                     min_logvar=-7.0, max_logvar=2.0):
    """Sample of the NVAE-style delta posterior and its KL to the prior.

    c = hardtanh(delta_logvar, min_logvar, max_logvar).
    With a prior N(mu_p, exp(logvar_p)):
        z  = mu_p + delta_mu + exp((logvar_p + c) / 2) * eps
        kl = 0.5 * (delta_mu**2 / exp(logvar_p) + exp(c) - c - 1)
    Top level (mu_p = logvar_p = None, prior N(0, 1)):
        z  = delta_mu + exp(c / 2) * eps
        kl = 0.5 * (delta_mu**2 + exp(c) - c - 1)
    Returns z (the inputs' shape) and kl summed over all but the first dim: [B].
    """
    _checks.posterior(delta_mu, delta_logvar, eps, mu_p, logvar_p, min_logvar, max_logvar)
    c = F.hardtanh(delta_logvar, min_logvar, max_logvar)
    if mu_p is None:
        z = delta_mu + torch.exp(0.5 * c) * eps
        kl = 0.5 * (delta_mu**2 + torch.exp(c) - c - 1)
    else:
        z = mu_p + delta_mu + torch.exp(0.5 * (logvar_p + c)) * eps
        kl = 0.5 * (delta_mu**2 / torch.exp(logvar_p) + torch.exp(c) - c - 1)
    return z, per_example_sum(kl)


def class_indices(x, num_classes, op="categorical_log_likelihood"):
    """x as int64 class indices; raises if a value is not an integer in 0..K-1."""
    if x.is_floating_point():
        bad = ~((x == torch.floor(x)) & (x >= 0) & (x < num_classes))
    else:
        bad = (x < 0) | (x >= num_classes)
    if bool(bad.any()):
        v = x[bad][0].item()
        raise IndexError(f"{op}: x holds {v}, which is not a class index in 0..{num_classes - 1}")
    return x.long()


def categorical_log_likelihood(logits, x, *, overwrite_logits=False):
    """Per example, the sum over all positions of log_softmax(logits)[x].

    logits: [B, ..., K], classes last. x: [B, ...] class indices in 0..K-1, integer
    or integral float. Returns [B]. overwrite_logits is accepted for the fused op's
    interface and does nothing here.
    """
    _checks.categorical(logits, x)
    idx = class_indices(x, logits.shape[-1])
    ll = torch.log_softmax(logits, dim=-1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    return per_example_sum(ll)


def binary_targets(x, dtype, op="bernoulli_log_likelihood"):
    bad = ~((x == 0) | (x == 1))
    if bool(bad.any()):
        raise ValueError(f"{op}: x must hold 0 or 1, got {x[bad][0].item()}")
    return x.to(dtype)


def bernoulli_log_likelihood(logits, x):
    """Per example, the sum of x*log(sigmoid(l)) + (1-x)*log(sigmoid(-l)). Returns [B]."""
    _checks.bernoulli(logits, x)
    x = binary_targets(x, logits.dtype)
    ll = x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)
    return per_example_sum(ll)


def linear_categorical_log_likelihood(h, weight, bias, x):
    """categorical_log_likelihood(F.linear(h, weight, bias).view(B, D, K), x).

    h: [B, H]; weight: [D*K, H]; bias: [D*K] or None; x: [B, D] class indices.
    """
    _checks.linear_categorical(h, weight, bias, x)
    logits = F.linear(h, weight, bias).view(x.shape[0], x.shape[1], -1)
    return categorical_log_likelihood(logits, x)
