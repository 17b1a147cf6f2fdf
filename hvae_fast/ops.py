"""The fused operators: public functions, fake kernels, autograd, and the fallback.

torch.ops.hvae_fast.* are real operators. Their schemas and CPU/CUDA kernels come
from the compiled module hvae_fast._C. Without it, or on a device it has no kernel
for, the same operators run hvae_fast.reference, so code calling them never branches.
"""
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _checks, _extension, reference

# The same strings as csrc/hvae_fast.cpp (tests/test_ops.py checks they agree);
# defined here only when the compiled module is missing.
SCHEMAS = {
    "posterior_sample": "posterior_sample(Tensor delta_mu, Tensor delta_logvar, Tensor eps, "
    "Tensor? mu_p, Tensor? logvar_p, float min_logvar, float max_logvar) -> (Tensor, Tensor)",
    "posterior_sample_backward": "posterior_sample_backward(Tensor grad_z, Tensor grad_kl, "
    "Tensor delta_mu, Tensor delta_logvar, Tensor eps, Tensor? logvar_p, float min_logvar, "
    "float max_logvar, bool eps_grad=True) -> (Tensor, Tensor, Tensor, Tensor)",
    "posterior_sample_philox": "posterior_sample_philox(Tensor delta_mu, Tensor delta_logvar, "
    "Tensor? mu_p, Tensor? logvar_p, Tensor seed, float min_logvar, float max_logvar) -> (Tensor, Tensor)",
    "posterior_sample_philox_backward": "posterior_sample_philox_backward(Tensor grad_z, "
    "Tensor grad_kl, Tensor delta_mu, Tensor delta_logvar, Tensor? logvar_p, Tensor seed, "
    "float min_logvar, float max_logvar) -> (Tensor, Tensor, Tensor)",
    "categorical_log_likelihood": "categorical_log_likelihood(Tensor logits, Tensor x, "
    "bool overwrite_logits=False) -> (Tensor, Tensor)",
    "categorical_log_likelihood_backward": "categorical_log_likelihood_backward(Tensor grad, "
    "Tensor logits, Tensor x, Tensor lse) -> Tensor",
    "categorical_log_likelihood_backward_": "categorical_log_likelihood_backward_(Tensor grad, "
    "Tensor(a!) logits, Tensor x, Tensor lse) -> ()",
    "bernoulli_log_likelihood": "bernoulli_log_likelihood(Tensor logits, Tensor x) -> Tensor",
    "bernoulli_log_likelihood_backward": "bernoulli_log_likelihood_backward(Tensor grad, "
    "Tensor logits, Tensor x) -> Tensor",
    "dmol_log_likelihood": "dmol_log_likelihood(Tensor params, Tensor x, int num_mixtures, int num_vals=256, "
    "float min_log_scale=-7.) -> Tensor",
    "dmol_log_likelihood_backward": "dmol_log_likelihood_backward(Tensor grad, Tensor params, Tensor x, "
    "int num_mixtures, int num_vals=256, float min_log_scale=-7.) -> Tensor",
    "adamax_": "adamax_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_infs, "
    "float[] neg_clrs, float beta1, float beta2, float eps, float weight_decay) -> ()",
}

# The ops that read their seed on the host carry torch's cudagraph_unsafe tag where torch
# has it (2.8 and later), as csrc/hvae_fast.cpp defines them: torch.compile's
# mode="reduce-overhead" then runs them outside its CUDA graphs, each call with its own seed.
_CUDAGRAPH_UNSAFE = getattr(torch.Tag, "cudagraph_unsafe", None)
HOST_SEED_OPS = ("posterior_sample_philox", "posterior_sample_philox_backward")

BUILD_INFO, WHY_NO_EXTENSION = _extension.load()
EXTENSION_LOADED = WHY_NO_EXTENSION is None

_lib = torch.library.Library("hvae_fast", "FRAGMENT")
if not EXTENSION_LOADED:
    warnings.warn(f"{WHY_NO_EXTENSION}. hvae_fast runs its pure-PyTorch reference instead "
                  "(correct, not fused).", RuntimeWarning, stacklevel=2)
    for _name, _schema in SCHEMAS.items():
        _tags = (_CUDAGRAPH_UNSAFE,) if _name in HOST_SEED_OPS and _CUDAGRAPH_UNSAFE is not None else ()
        _lib.define(_schema, tags=_tags)

_ops = torch.ops.hvae_fast
_warned_devices = set()


def _fallback(name):
    """Registers fn as the kernel of every device without a compiled one."""

    def register(fn):
        def kernel(*args):
            tensors = (t for a in args for t in (a if isinstance(a, (list, tuple)) else (a,)))
            dev = next((t.device for t in tensors if isinstance(t, torch.Tensor)), torch.device("cpu"))
            if EXTENSION_LOADED and dev.type not in _warned_devices:
                _warned_devices.add(dev.type)
                warnings.warn(f"hvae_fast._C has no {dev.type} kernels in this build; "
                              "running the pure-PyTorch reference on this device.", RuntimeWarning)
            out = fn(*args)
            # contiguous, like the compiled kernels' outputs (and the fake kernels')
            if isinstance(out, tuple):
                return tuple(t.contiguous() for t in out)
            return out.contiguous() if isinstance(out, torch.Tensor) else out

        _lib.impl(name, kernel, "CompositeExplicitAutograd")
        return fn

    return register


def _register_autograd(name, backward, setup_context):
    """Autograd in Python, only without the compiled module: csrc/autograd.cpp registers the
    same formulas in C++ (about 100 us less per call)."""
    if not EXTENSION_LOADED:
        torch.library.register_autograd(name, backward, setup_context=setup_context, lib=_lib)


# The fake kernels check what the wrappers check: a raw op given a meta tensor beside a
# real one dispatches to them, and must refuse it rather than return empty memory.

# ---- posterior_sample ---------------------------------------------------------------------

def posterior_sample(delta_mu, delta_logvar, eps, mu_p=None, logvar_p=None, *,
                     min_logvar=-7.0, max_logvar=2.0, generator=None):
    """Fused sample and KL of the delta posterior; see hvae_fast.reference.posterior_sample.

    eps=None draws the noise in the kernel (counter-based Philox, keyed by a seed drawn
    from `generator`, torch's default CPU generator if None) and draws it again in the
    backward: the noise is never written to memory. The seed is a 0-dim int64 CPU tensor
    (reference.draw_seed), so eps=None compiles under torch.compile(fullgraph=True),
    forward and backward, with generator=None (dynamo does not trace a torch.Generator
    argument: passing one is a graph break). The draw is then part of the graph; torch
    2.13's Inductor runs it as ATen's randint on the default generator, so after the same
    torch.manual_seed compiled and eager runs draw the same noise. CUDA graph capture with
    eps=None is refused (the seed is read on the host: every replay would draw the same
    noise), eagerly here and in the CUDA kernels; the ops carry torch's cudagraph_unsafe
    tag, which keeps them out of torch.compile(mode="reduce-overhead")'s CUDA graphs.
    The numbers are those of hvae_fast.reference.philox_normal, on every device, not those
    of torch.randn_like. Across devices, what holds: the same Philox bits and uniforms everywhere, and normals
    that agree to about 1.5e-6 in float32 between the CPU and CUDA kernels, not bit for bit
    (the CPU reduces the angle exactly and uses its own polynomials; CUDA calls sinf, cosf and
    logf). Bit for bit holds on one device: the same seed gives the same bits on every run.
    """
    _checks.posterior(delta_mu, delta_logvar, eps, mu_p, logvar_p, min_logvar, max_logvar)
    if eps is None:
        # Traced by torch.compile, the check is the kernels' (they refuse capture themselves)
        if not torch.compiler.is_compiling():
            _refuse_capture(delta_mu, "posterior_sample(eps=None)")
        return _ops.posterior_sample_philox(delta_mu, delta_logvar, mu_p, logvar_p, reference.draw_seed(generator),
                                            float(min_logvar), float(max_logvar))
    return _ops.posterior_sample(delta_mu, delta_logvar, eps, mu_p, logvar_p,
                                 float(min_logvar), float(max_logvar))


def _refuse_capture(delta_mu, what):
    # the seed is read on the host: a captured graph would replay the same noise
    if delta_mu.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{what} cannot be captured in a CUDA graph: every replay would draw the same noise. "
                           "Pass eps (e.g. torch.randn_like(delta_mu)) inside the graph instead")


@_fallback("posterior_sample")
def _posterior_sample_ref(delta_mu, delta_logvar, eps, mu_p, logvar_p, lo, hi):
    return reference.posterior_sample(delta_mu, delta_logvar, eps, mu_p, logvar_p,
                                      min_logvar=lo, max_logvar=hi)


@_fallback("posterior_sample_backward")
def _posterior_sample_backward_ref(grad_z, grad_kl, delta_mu, delta_logvar, eps, logvar_p, lo, hi, eps_grad=True):
    g_dmu, g_dlv, g_eps, g_lvp = reference.posterior_sample_backward(grad_z, grad_kl, delta_mu, delta_logvar, eps,
                                                                     logvar_p, min_logvar=lo, max_logvar=hi)
    empty = delta_mu.new_empty(0)
    return g_dmu, g_dlv, g_eps if eps_grad else empty, empty.clone() if g_lvp is None else g_lvp


@torch.library.register_fake("hvae_fast::posterior_sample")
def _(delta_mu, delta_logvar, eps, mu_p, logvar_p, lo, hi):
    _checks.posterior(delta_mu, delta_logvar, eps, mu_p, logvar_p, lo, hi)
    return delta_mu.new_empty(delta_mu.shape), delta_mu.new_empty(delta_mu.shape[0])


def _posterior_backward_fake(grad_z, delta_mu, delta_logvar, eps, logvar_p, lo, hi):
    """Checks of both posterior backward ops; their gradients' shapes: (full, that of g_lvp)."""
    _checks.posterior(delta_mu, delta_logvar, eps, None, None, lo, hi)
    _checks.like(grad_z, delta_mu, "posterior_sample_backward", "grad_z", "delta_mu")
    if logvar_p is not None:
        _checks.like(logvar_p, delta_mu, "posterior_sample_backward", "logvar_p", "delta_mu")
    return delta_mu.shape, delta_mu.shape if logvar_p is not None else (0,)


@torch.library.register_fake("hvae_fast::posterior_sample_backward")
def _(grad_z, grad_kl, delta_mu, delta_logvar, eps, logvar_p, lo, hi, eps_grad=True):
    s, s_lvp = _posterior_backward_fake(grad_z, delta_mu, delta_logvar, eps, logvar_p, lo, hi)
    new = delta_mu.new_empty
    return new(s), new(s), new(s if eps_grad else (0,)), new(s_lvp)


def _posterior_setup(ctx, inputs, output):
    delta_mu, delta_logvar, eps, mu_p, logvar_p, lo, hi = inputs
    ctx.save_for_backward(delta_mu, delta_logvar, eps, logvar_p)
    ctx.has_prior = mu_p is not None
    ctx.bounds = (lo, hi)


def _posterior_backward(ctx, grad_z, grad_kl):
    delta_mu, delta_logvar, eps, logvar_p = ctx.saved_tensors
    g_dmu, g_dlv, g_eps, g_lvp = _ops.posterior_sample_backward(
        grad_z, grad_kl, delta_mu, delta_logvar, eps, logvar_p, *ctx.bounds, ctx.needs_input_grad[2])
    g_eps = g_eps if ctx.needs_input_grad[2] else None
    if ctx.has_prior:
        return g_dmu, g_dlv, g_eps, grad_z, g_lvp, None, None
    return g_dmu, g_dlv, g_eps, None, None, None, None


_register_autograd("hvae_fast::posterior_sample", _posterior_backward,
                   setup_context=_posterior_setup)


def _philox_noise(delta_mu, seed):
    return reference.philox_normal(delta_mu.shape, seed, dtype=delta_mu.dtype, device=delta_mu.device)


@_fallback("posterior_sample_philox")
def _posterior_sample_philox_ref(delta_mu, delta_logvar, mu_p, logvar_p, seed, lo, hi):
    _checks.philox_seed(seed, "posterior_sample_philox")
    _refuse_capture(delta_mu, "posterior_sample_philox")
    return _posterior_sample_ref(delta_mu, delta_logvar, _philox_noise(delta_mu, seed), mu_p, logvar_p, lo, hi)


@_fallback("posterior_sample_philox_backward")
def _posterior_sample_philox_backward_ref(grad_z, grad_kl, delta_mu, delta_logvar, logvar_p, seed, lo, hi):
    _checks.philox_seed(seed, "posterior_sample_philox_backward")
    _refuse_capture(delta_mu, "posterior_sample_philox_backward")
    g_dmu, g_dlv, _, g_lvp = _posterior_sample_backward_ref(grad_z, grad_kl, delta_mu, delta_logvar,
                                                            _philox_noise(delta_mu, seed), logvar_p, lo, hi, False)
    return g_dmu, g_dlv, g_lvp


@torch.library.register_fake("hvae_fast::posterior_sample_philox")
def _(delta_mu, delta_logvar, mu_p, logvar_p, seed, lo, hi):
    _checks.philox_seed(seed, "posterior_sample_philox")
    _checks.posterior(delta_mu, delta_logvar, None, mu_p, logvar_p, lo, hi)
    return delta_mu.new_empty(delta_mu.shape), delta_mu.new_empty(delta_mu.shape[0])


@torch.library.register_fake("hvae_fast::posterior_sample_philox_backward")
def _(grad_z, grad_kl, delta_mu, delta_logvar, logvar_p, seed, lo, hi):
    _checks.philox_seed(seed, "posterior_sample_philox_backward")
    s, s_lvp = _posterior_backward_fake(grad_z, delta_mu, delta_logvar, None, logvar_p, lo, hi)
    return delta_mu.new_empty(s), delta_mu.new_empty(s), delta_mu.new_empty(s_lvp)


def _posterior_philox_setup(ctx, inputs, output):
    delta_mu, delta_logvar, mu_p, logvar_p, seed, lo, hi = inputs
    ctx.save_for_backward(delta_mu, delta_logvar, logvar_p, seed)  # the tensor: traced under torch.compile
    ctx.has_prior = mu_p is not None
    ctx.bounds = (lo, hi)


def _posterior_philox_backward(ctx, grad_z, grad_kl):
    delta_mu, delta_logvar, logvar_p, seed = ctx.saved_tensors
    g_dmu, g_dlv, g_lvp = _ops.posterior_sample_philox_backward(grad_z, grad_kl, delta_mu, delta_logvar, logvar_p,
                                                                seed, *ctx.bounds)
    if ctx.has_prior:
        return g_dmu, g_dlv, grad_z, g_lvp, None, None, None
    return g_dmu, g_dlv, None, None, None, None, None


_register_autograd("hvae_fast::posterior_sample_philox", _posterior_philox_backward,
                   setup_context=_posterior_philox_setup)


# ---- categorical_log_likelihood -----------------------------------------------------------

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


def _accumulation_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


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


# ---- bernoulli_log_likelihood -------------------------------------------------------------

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


# ---- dmol_log_likelihood ------------------------------------------------------------------

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


# ---- adamax_ (the step of hvae_fast.optim.Adamax) ------------------------------------------

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


# ---- linear_categorical_log_likelihood ----------------------------------------------------
# The decoder's last Linear layer and the categorical likelihood, in chunks of pixels,
# so the [B, D, K] logits never exist at once: each chunk's logits are made, used and
# dropped, in the forward and again (recomputed) in the backward.

LINEAR_CHUNK_BYTES = 8 * 2**20  # logits per chunk; about an L2 cache's worth


def _pixel_chunks(B, D, K, itemsize):
    c = max(1, min(D, LINEAR_CHUNK_BYTES // max(1, B * K * itemsize)))
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



# ---- pixel_categorical_log_likelihood -----------------------------------------------------
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

# Under autocast the ops run in float32, as torch's own log_softmax and nll_loss do:
# a per-example sum of hundreds of log-probabilities needs float32's resolution, and
# the posterior's inputs then share one dtype. Explicit half inputs still run the
# half CUDA kernels (with float32 accumulation).
for _name in ("posterior_sample", "posterior_sample_philox", "categorical_log_likelihood", "bernoulli_log_likelihood",
              "linear_categorical_log_likelihood", "pixel_categorical_log_likelihood", "dmol_log_likelihood"):
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast(f"hvae_fast::{_name}", _device, torch.float32, lib=_lib)
