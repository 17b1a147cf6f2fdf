"""What every op module shares: the compiled extension, the schemas, and the helpers that
register a fallback kernel, Python autograd and autocast.

torch.ops.hvae_fast.* are real operators. Their schemas and CPU/CUDA kernels come from the
compiled module hvae_fast._C. Without it, this module defines the same schemas (SCHEMAS).
Each op module registers hvae_fast.reference as the kernel of every device without a compiled
one (`_fallback`): without hvae_fast._C, or on a device it has no kernels for, the same
operators run the reference, so code calling them never branches. Every op module imports
this one first: the schemas exist before any fake kernel, fallback or autograd is registered.
"""
import warnings

import torch

from .. import _extension

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
                  "(correct, not fused).", RuntimeWarning, stacklevel=3)  # at hvae_fast.ops' importer
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


def _accumulation_dtype(dtype):
    """The dtype the ops accumulate in: float32 for half precision, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _autocast_to_float32(*names):
    """Under autocast the ops run in float32, as torch's own log_softmax and nll_loss do:
    a per-example sum of hundreds of log-probabilities needs float32's resolution, and
    the posterior's inputs then share one dtype. Explicit half inputs still run the
    half CUDA kernels (with float32 accumulation)."""
    for name in names:
        for device in ("cpu", "cuda"):
            torch.library.register_autocast(f"hvae_fast::{name}", device, torch.float32, lib=_lib)
