"""posterior_sample: the delta posterior's sample z and its KL in one pass, forward and backward.

Two operators: posterior_sample (the caller's noise eps) and posterior_sample_philox (eps=None:
counter-based noise drawn in the kernels from a seed, never written to memory).
Kernels csrc/cpu/posterior_sample.cpp, csrc/cuda/posterior_sample.cu; specification
hvae_fast.reference.posterior_sample and philox_normal; tests tests/test_ops.py,
tests/test_noise.py, tests/test_compile_noise.py.
"""
import torch

from .. import _checks, reference
from ._registry import _autocast_to_float32, _fallback, _ops, _register_autograd

# The fake kernels check what the wrappers check: a raw op given a meta tensor beside a
# real one dispatches to them, and must refuse it rather than return empty memory.

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
_autocast_to_float32("posterior_sample", "posterior_sample_philox")
