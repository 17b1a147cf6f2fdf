"""The specification: every hvae_fast op in plain PyTorch, no custom operators.

Each test compares the fused kernels with these functions, and they are what runs
when the compiled extension is missing (see hvae_fast.ops).
"""
import math

import torch
import torch.nn.functional as F

from . import _checks


def per_example_sum(t):
    """Sum over every dimension but the first: [B, ...] -> [B]."""
    return t.reshape(t.shape[0], -1).sum(1)


def posterior_sample(delta_mu, delta_logvar, eps, mu_p=None, logvar_p=None, *,
                     min_logvar=-7.0, max_logvar=2.0, generator=None):
    """Sample of the NVAE-style delta posterior and its KL to the prior.

    c = hardtanh(delta_logvar, min_logvar, max_logvar).
    With a prior N(mu_p, exp(logvar_p)):
        z  = mu_p + delta_mu + exp((logvar_p + c) / 2) * eps
        kl = 0.5 * (delta_mu**2 / exp(logvar_p) + exp(c) - c - 1)
    Top level (mu_p = logvar_p = None, prior N(0, 1)):
        z  = delta_mu + exp(c / 2) * eps
        kl = 0.5 * (delta_mu**2 + exp(c) - c - 1)
    Returns z (the inputs' shape) and kl summed over all but the first dim: [B].
    eps=None: eps = philox_normal(delta_mu.shape, draw_seed(generator), ...), the noise
    the fused op draws in its kernel.
    """
    _checks.posterior(delta_mu, delta_logvar, eps, mu_p, logvar_p, min_logvar, max_logvar)
    if eps is None:
        eps = philox_normal(delta_mu.shape, draw_seed(generator), dtype=delta_mu.dtype, device=delta_mu.device)
    c = F.hardtanh(delta_logvar, min_logvar, max_logvar)
    if mu_p is None:
        z = delta_mu + torch.exp(0.5 * c) * eps
        kl = 0.5 * (delta_mu**2 + torch.exp(c) - c - 1)
    else:
        z = mu_p + delta_mu + torch.exp(0.5 * (logvar_p + c)) * eps
        kl = 0.5 * (delta_mu**2 / torch.exp(logvar_p) + torch.exp(c) - c - 1)
    return z, per_example_sum(kl)


# ---- the gradients, written out --------------------------------------------------------
# What the backward kernels compute, in plain PyTorch without autograd (the fallback
# backward kernels run them, also below autograd, e.g. inside a custom op's backward).
# tests/test_reference.py checks each against autograd through the functions above.

def _per_example(g, like):
    """A [B] gradient broadcast against `like` ([B, ...])."""
    return g.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def posterior_sample_backward(grad_z, grad_kl, delta_mu, delta_logvar, eps, logvar_p=None, *,
                              min_logvar=-7.0, max_logvar=2.0):
    """Gradients of posterior_sample w.r.t. (delta_mu, delta_logvar, eps, logvar_p); that
    w.r.t. mu_p is grad_z itself. The last is None at the top level."""
    c = F.hardtanh(delta_logvar, min_logvar, max_logvar)
    inside = (delta_logvar > min_logvar) & (delta_logvar < max_logvar)  # hardtanh's derivative
    gkl = _per_example(grad_kl, delta_mu)
    if logvar_p is None:
        std, inv_var_p = torch.exp(0.5 * c), torch.ones_like(delta_mu)
    else:
        std, inv_var_p = torch.exp(0.5 * (logvar_p + c)), torch.exp(-logvar_p)
    dz_dstd_half = 0.5 * grad_z * eps * std
    g_dmu = grad_z + gkl * delta_mu * inv_var_p
    g_dlv = torch.where(inside, dz_dstd_half + 0.5 * gkl * (torch.exp(c) - 1), torch.zeros_like(c))
    g_lvp = None if logvar_p is None else dz_dstd_half - 0.5 * gkl * delta_mu**2 * inv_var_p
    return g_dmu, g_dlv, grad_z * std, g_lvp


def categorical_log_likelihood_backward(grad, logits, x):
    """grad [B] times d categorical_log_likelihood / d logits: g * (onehot(x) - softmax)."""
    idx = class_indices(x, logits.shape[-1])
    g = _per_example(grad, logits)
    out = -g * torch.softmax(logits, dim=-1)
    return out.scatter_add(-1, idx.unsqueeze(-1), g.expand(*idx.shape, 1))


def bernoulli_log_likelihood_backward(grad, logits, x):
    """grad [B] times d bernoulli_log_likelihood / d logits: g * (x - sigmoid(l))."""
    return _per_example(grad, logits) * (binary_targets(x, logits.dtype) - torch.sigmoid(logits))


# ---- in-kernel noise: Philox4x32-10 and Box-Muller (csrc/formulas.h has the layout) ------

NOISE_BLOCK = 64  # elements per 16 Philox counters
_M32 = 0xFFFFFFFF


def draw_seed(generator=None):
    """A 63-bit Philox key from `generator` (torch's default CPU generator if None), so
    that torch.manual_seed makes the in-kernel noise reproducible: a 0-dim int64 tensor on
    the CPU, the seed argument of the posterior_sample_philox ops. A tensor rather than an
    int, so that torch.compile(fullgraph=True) traces the draw into the graph (an int would
    be a data-dependent value). A generator on another device draws there; the key is then
    copied to the CPU, which waits for that device."""
    device = generator.device if generator is not None else "cpu"
    seed = torch.randint(0, 2**63 - 1, (), generator=generator, device=device, dtype=torch.int64)
    return seed if seed.device.type == "cpu" else seed.cpu()


def _mulhilo(a, m):
    """(hi, lo) 32-bit words of a * m for int64 tensors a < 2^32 and an int m < 2^32,
    without overflowing int64."""
    hi_part, lo_part = a * (m >> 16), a * (m & 0xFFFF)
    mid = lo_part + ((hi_part & 0xFFFF) << 16)
    return (hi_part >> 16) + (mid >> 32), mid & _M32


def philox4x32_10(counter, seed, high=(0, 0)):
    """The Philox4x32-10 block cipher (Salmon et al., 2011) of the 128-bit counters
    (counter's two 32-bit words, then the words `high`; the noise keeps them 0) under a
    64-bit key: four int64 tensors holding 32-bit words."""
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2, c3 = (torch.full_like(counter, h) for h in high)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, 0xD2511F53)
        hi1, lo1 = _mulhilo(c2, 0xCD9E8D57)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def philox_normal(shape, seed, *, dtype=torch.float32, device="cpu"):
    """Standard normal noise of `shape` ([B, ...]) from the key `seed`: what
    posterior_sample draws in its kernel when eps is None. seed is an int or a 0-dim
    integer tensor (draw_seed's); its 64 bits as an int64 are the key, the same noise either way.

    Each row of M = prod(shape[1:]) values is padded to blocks of 64; block t of row b
    takes the Philox counters (b * ceil(M / 64) + t) * 16 + k, k < 16, whose words
    w0..w3 give element 16 * lane + k: r0 cos t0, r0 sin t0, r1 cos t1, r1 sin t1 for
    lanes 0..3 (Box-Muller), r = sqrt(-2 log u(w0 or w2)), t = 2 pi u(w1 or w3),
    u(w) = (floor(w / 256) + 1/2) / 2^24.
    The uniforms and Box-Muller are computed in float32 (float64 for float64 noise) and
    cast to `dtype` at the end, as the kernels do: floor(w / 256) overflows float16.
    """
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise ValueError(f"philox_normal: seed must be an int or a 0-dim integer tensor, got a {seed.dtype} "
                             f"tensor of shape {tuple(seed.shape)}")
        seed = seed.to(device=device, dtype=torch.int64)  # the key's words are computed beside the counters
    B, M = shape[0], math.prod(shape[1:])
    nb = -(-M // NOISE_BLOCK)
    counters = torch.arange(B * nb * (NOISE_BLOCK // 4), dtype=torch.int64, device=device)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    u = [(w >> 8).to(work) * 2.0**-24 + 2.0**-25 for w in philox4x32_10(counters, seed)]
    r0, r1 = (torch.sqrt(-2 * torch.log(u[i])) for i in (0, 2))
    t0, t1 = (2 * math.pi * u[i] for i in (1, 3))
    lanes = torch.stack([r0 * torch.cos(t0), r0 * torch.sin(t0), r1 * torch.cos(t1), r1 * torch.sin(t1)])
    noise = lanes.view(4, B, nb, NOISE_BLOCK // 4).permute(1, 2, 0, 3).reshape(B, nb * NOISE_BLOCK)
    return noise[:, :M].reshape(shape).to(dtype)


def class_indices(x, num_classes, op="categorical_log_likelihood"):
    """x as int64 class indices; raises if a value is not an integer in 0..K-1."""
    if x.is_floating_point():
        bad = ~((x == torch.floor(x)) & (x >= 0) & (x < num_classes))
    else:  # compared as int64: a uint8 x against K = 256 would wrap the 256 to 0
        bad = (x.long() < 0) | (x.long() >= num_classes)
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


def pixel_categorical_log_likelihood(features, weight, bias, x):
    """categorical_log_likelihood of a 1x1 convolution's logits: an image decoder's last
    layer and its likelihood.

    features: [B, C, H, W]; weight: [channels*K, C] (a 1x1 conv weight squeezed: row
    c*K + k is channel c, class k); bias: [channels*K] or None; x: [B, channels, H, W]
    class indices in 0..K-1. Returns [B], summed over all pixels and channels.
    """
    _checks.pixel_categorical(features, weight, bias, x)
    B, channels, H, W = x.shape
    K = weight.shape[0] // channels
    class_indices(x, K, "pixel_categorical_log_likelihood")  # names this op in the error
    logits = F.conv2d(features, weight[:, :, None, None], bias).view(B, channels, K, H, W)
    return categorical_log_likelihood(logits.movedim(2, -1), x)


def adamax_(params, grads, exp_avgs, exp_infs, neg_clrs, *, beta1, beta2, eps, weight_decay=0.0):
    """One step of torch.optim.Adamax (maximize=False) on each tensor, in place, in torch's
    order of operations; neg_clrs[j] = -lr / (1 - beta1**step_j)."""
    _checks.adamax(params, grads, exp_avgs, exp_infs, neg_clrs)
    with torch.no_grad():
        for p, g, m, u, v in zip(params, grads, exp_avgs, exp_infs, neg_clrs):
            if weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            m.lerp_(g, 1 - beta1)
            torch.maximum(u.mul_(beta2), g.abs().add_(eps), out=u)
            p.addcdiv_(m, u, value=v)


# ---- discretized logistic mixture (PixelCNN++'s likelihood, exact) ---------------------------

def pixel_values(x, num_vals, op="dmol_log_likelihood"):
    """x as int64 pixel values; raises a ValueError naming the first value not in 0..num_vals-1."""
    v = x.long()
    bad = (v < 0) | (v >= num_vals)
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        raise ValueError(f"{op}: x holds {v[tuple(where)].item()} at {where}, which is not a pixel value in "
                         f"0..{num_vals - 1} (num_vals = {num_vals})")
    return v


def dmol_parameters(params, num_mixtures, channels):
    """params [B, P, H, W] split as the op reads them: mixture logits [B, M, H, W], means and
    (unclamped) log-scales [B, C, M, H, W], coupling coefficients (before tanh) [B, C(C-1)/2, M, H, W],
    pair j = (c, k), k < c, in the order (1,0), (2,0), (2,1), (3,0), ...: j = c(c-1)/2 + k."""
    B, _, H, W = params.shape
    M, C = num_mixtures, channels
    logits = params[:, :M]
    means = params[:, M:M + C * M].reshape(B, C, M, H, W)
    log_scales = params[:, M + C * M:M + 2 * C * M].reshape(B, C, M, H, W)
    coefs = params[:, M + 2 * C * M:].reshape(B, C * (C - 1) // 2, M, H, W)
    return logits, means, log_scales, coefs


def dmol_means(means, coefs, xs):
    """Each channel's mean in each component with the coupling applied: mean(c) + sum over k < c of
    tanh(coef(c, k)) * xs[:, k] (xs [B, C, H, W] the scaled values); [B, C, M, H, W]."""
    out = []
    for c in range(means.shape[1]):
        mean = means[:, c]
        for k in range(c):
            mean = mean + torch.tanh(coefs[:, c * (c - 1) // 2 + k]) * xs[:, k:k + 1]
        out.append(mean)
    return torch.stack(out, 1)


def dmol_log_likelihood(params, x, *, num_mixtures, num_vals=256, min_log_scale=-7.0):
    """Per example, the sum over pixels of log p(x) under a discretized logistic mixture
    (PixelCNN++, Salimans et al. 2017), exact for every input.

    x: [B, C, H, W] integer pixel values in 0..num_vals-1, scaled to xs = x / (num_vals - 1) * 2 - 1;
    bins of half-width h = 1 / (num_vals - 1). params: [B, M (1 + 2C + C(C-1)/2), H, W] for
    M = num_mixtures: channel m < M the mixture logits, M + c M + m the mean of channel c in
    component m, M + C M + c M + m its log-scale (clamped below at min_log_scale), M + 2 C M + j M + m
    the coupling coefficient j (dmol_parameters): channel c's mean adds tanh(coef(c, k)) xs_k, k < c.
    With inv = exp(-log_scale), a = inv (xs - mean + h), b = inv (xs - mean - h), a - b = 2 h inv:
    x = 0: log sigmoid(a); x = num_vals - 1: log sigmoid(-b); otherwise
    log(sigmoid(a) - sigmoid(b)) = log sigmoid(a) + log sigmoid(-b) + log(-expm1(-2 h inv)).
    log p(x) = logsumexp over m of (log_softmax(logits)_m + sum over c of the bin's log-probability).
    Returns [B].
    """
    _checks.dmol(params, x, num_mixtures, num_vals, min_log_scale)
    C = x.shape[1]
    v = pixel_values(x, num_vals).to(params.dtype)
    xs = v / (num_vals - 1) * 2 - 1
    h = 1.0 / (num_vals - 1)
    logits, means, log_scales, coefs = dmol_parameters(params, num_mixtures, C)
    centred = xs.unsqueeze(2) - dmol_means(means, coefs, xs)  # [B, C, M, H, W]
    inv = torch.exp(-torch.clamp(log_scales, min=min_log_scale))
    la = F.logsigmoid(inv * (centred + h))
    lnb = F.logsigmoid(-(inv * (centred - h)))
    interior = la + lnb + torch.log(-torch.expm1(-(2 * h) * inv))
    v = v.unsqueeze(2)
    bins = torch.where(v == 0, la, torch.where(v == num_vals - 1, lnb, interior))
    comp = torch.log_softmax(logits, 1) + bins.sum(1)
    return per_example_sum(torch.logsumexp(comp, 1))


def dmol_log_likelihood_backward(grad, params, x, *, num_mixtures, num_vals=256, min_log_scale=-7.0):
    """grad [B] times d dmol_log_likelihood / d params, by autograd through the function above."""
    with torch.enable_grad():
        p = params.detach().requires_grad_()
        ll = dmol_log_likelihood(p, x, num_mixtures=num_mixtures, num_vals=num_vals, min_log_scale=min_log_scale)
        (g,) = torch.autograd.grad(ll, p, grad.to(ll.dtype))
    return g
