"""Metadata checks shared by hvae_fast.ops and hvae_fast.reference.

They read shapes, dtypes and devices only, so torch.compile traces them without a
graph break. Checks that read values (class indices, binary targets) run inside
the kernels, and in hvae_fast.reference.
"""
import torch


def floating(t, op, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def like(t, ref, op, name, ref_name):
    floating(t, op, name)
    if t.shape != ref.shape:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    if t.dtype != ref.dtype and not torch.is_autocast_enabled(t.device.type):  # autocast casts them
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def batch(t, op, name):
    if t.dim() < 1 or t.shape[0] == 0:
        raise ValueError(f"{op}: {name} must have a non-empty batch dimension, got shape {tuple(t.shape)}")


def posterior(delta_mu, delta_logvar, eps, mu_p, logvar_p, min_logvar, max_logvar):
    op = "posterior_sample"
    floating(delta_mu, op, "delta_mu")
    batch(delta_mu, op, "delta_mu")
    like(delta_logvar, delta_mu, op, "delta_logvar", "delta_mu")
    if eps is not None:
        like(eps, delta_mu, op, "eps", "delta_mu")
    if (mu_p is None) != (logvar_p is None):
        raise ValueError(f"{op}: give both mu_p and logvar_p (a lower level) or neither (the top level)")
    if mu_p is not None:
        like(mu_p, delta_mu, op, "mu_p", "delta_mu")
        like(logvar_p, delta_mu, op, "logvar_p", "delta_mu")
    if not min_logvar < max_logvar:
        raise ValueError(f"{op}: min_logvar ({min_logvar}) must be below max_logvar ({max_logvar})")


def philox_seed(seed, op):
    """The seed of the posterior_sample_philox ops: a 0-dim int64 tensor on the CPU (a
    tensor, so that torch.compile keeps its draw in the graph; the kernels read it on the
    host). The same checks, in the same order, as csrc/inputs.h's philox_seed."""
    want = "seed must be a 0-dim int64 tensor on the CPU"
    if not isinstance(seed, torch.Tensor):
        raise TypeError(f"{op}: {want}, got {type(seed).__name__}")
    if seed.device.type != "cpu":
        raise ValueError(f"{op}: {want} (the kernels read it on the host), got one on {seed.device}")
    if seed.dtype != torch.int64:
        raise TypeError(f"{op}: {want}, got dtype {seed.dtype}")
    if seed.dim() != 0:
        raise ValueError(f"{op}: {want}, got shape {tuple(seed.shape)}")


def _target(x, logits, op):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.device != logits.device:
        raise ValueError(f"{op}: x is on {x.device} but logits is on {logits.device}")
    if x.is_complex():
        raise TypeError(f"{op}: x must be real, got {x.dtype}")


def categorical(logits, x):
    op = "categorical_log_likelihood"
    floating(logits, op, "logits")
    batch(logits, op, "logits")
    _target(x, logits, op)
    if logits.dim() < 2:
        raise ValueError(f"{op}: logits must have shape [B, ..., K], got {tuple(logits.shape)}")
    if logits.shape[-1] < 2:
        raise ValueError(f"{op}: logits need K >= 2 classes in the last dimension, got K = {logits.shape[-1]}")
    if x.shape != logits.shape[:-1]:
        raise ValueError(f"{op}: x must have shape {tuple(logits.shape[:-1])} "
                         f"(logits without the class dimension), got {tuple(x.shape)}")
    if x.dtype == torch.bool:
        raise TypeError(f"{op}: x holds class indices; got a bool tensor")


def categorical_lse(lse, x, logits, op):
    """The backward's saved lse: x's shape + (2,), logits' device, the accumulation dtype."""
    acc = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    if lse.shape != x.shape + (2,):
        raise ValueError(f"{op}: lse must have shape {tuple(x.shape) + (2,)} (x's shape and 2: each row's max "
                         f"and log sum), got {tuple(lse.shape)}")
    if lse.device != logits.device:
        raise ValueError(f"{op}: lse is on {lse.device} but logits is on {logits.device}")
    if lse.dtype != acc:
        raise TypeError(f"{op}: lse must have dtype {acc} for {logits.dtype} logits (the forward's), got {lse.dtype}")


def bernoulli(logits, x):
    op = "bernoulli_log_likelihood"
    floating(logits, op, "logits")
    batch(logits, op, "logits")
    _target(x, logits, op)
    if x.shape != logits.shape:
        raise ValueError(f"{op}: x must have the shape of logits {tuple(logits.shape)}, got {tuple(x.shape)}")


def linear_categorical(h, weight, bias, x):
    op = "linear_categorical_log_likelihood"
    floating(h, op, "h")
    batch(h, op, "h")
    floating(weight, op, "weight")
    if h.dim() != 2 or weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"{op}: h must be [B, H] and weight [D*K, H]; got h {tuple(h.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != h.shape[0]:
        raise ValueError(f"{op}: x must be [B, D] with B = {h.shape[0]}, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[1] == 0 or weight.shape[0] % x.shape[1]:
        raise ValueError(f"{op}: weight has {weight.shape[0]} rows, not D*K for D = {x.shape[1]}")
    if bias is not None:
        like(bias, weight[:, 0], op, "bias", "weight's first column")
    for name, t in (("weight", weight), ("x", x)) + ((("bias", bias),) if bias is not None else ()):
        if t.device != h.device:
            raise ValueError(f"{op}: {name} is on {t.device} but h is on {h.device}")
    if weight.dtype != h.dtype and not torch.is_autocast_enabled(h.device.type):
        raise TypeError(f"{op}: weight has dtype {weight.dtype} but h has dtype {h.dtype}")


def pixel_categorical(features, weight, bias, x):
    op = "pixel_categorical_log_likelihood"
    floating(features, op, "features")
    batch(features, op, "features")
    if features.dim() != 4:
        raise ValueError(f"{op}: features must be [B, C, H, W], got shape {tuple(features.shape)}")
    floating(weight, op, "weight")
    if weight.dim() != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(f"{op}: weight must be [channels*K, C] with C = {features.shape[1]} (features' "
                         f"dimension 1; a 1x1 conv weight squeezed), got weight {tuple(weight.shape)}")
    B, _, H, W = features.shape
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[0] != B or x.shape[2:] != features.shape[2:] or x.shape[1] == 0:
        raise ValueError(f"{op}: x must be [B, channels, H, W] with B, H, W = {B}, {H}, {W} (features') and "
                         f"channels >= 1, got {tuple(x.shape)}")
    channels = x.shape[1]
    if weight.shape[0] % channels:
        raise ValueError(f"{op}: weight has {weight.shape[0]} rows, not channels*K for channels = {channels}")
    if weight.shape[0] // channels < 2:
        raise ValueError(f"{op}: weight has {weight.shape[0]} rows, so K = {weight.shape[0] // channels} for "
                         f"channels = {channels}; need K >= 2 classes")
    if x.is_complex():
        raise TypeError(f"{op}: x must be real, got {x.dtype}")
    if x.dtype == torch.bool:
        raise TypeError(f"{op}: x holds class indices; got a bool tensor")
    if bias is not None:
        floating(bias, op, "bias")
    for name, t in (("weight", weight), ("x", x)) + ((("bias", bias),) if bias is not None else ()):
        if t.device != features.device:
            raise ValueError(f"{op}: {name} is on {t.device} but features is on {features.device}")
    if bias is not None:
        like(bias, weight[:, 0], op, "bias", "weight's first column")
    if weight.dtype != features.dtype and not torch.is_autocast_enabled(features.device.type):
        raise TypeError(f"{op}: weight has dtype {weight.dtype} but features has dtype {features.dtype}")


def adamax(params, grads, exp_avgs, exp_infs, neg_clrs):
    op = "adamax_"
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_infs) == len(neg_clrs) == n):
        raise ValueError(f"{op}: params, grads, exp_avgs, exp_infs and neg_clrs must have one entry each per "
                         f"parameter, got {n}, {len(grads)}, {len(exp_avgs)}, {len(exp_infs)}, {len(neg_clrs)}")
    for j, p in enumerate(params):
        floating(p, op, f"params[{j}]")
        for name, t in (("grads", grads[j]), ("exp_avgs", exp_avgs[j]), ("exp_infs", exp_infs[j])):
            like(t, p, op, f"{name}[{j}]", f"params[{j}]")
            if not t.is_contiguous():
                raise ValueError(f"{op}: {name}[{j}] must be contiguous")
        if not p.is_contiguous():
            raise ValueError(f"{op}: params[{j}] must be contiguous")


def dmol_channels(num_mixtures, channels):
    """The parameter channels of a discretized logistic mixture: M (1 + 2C + C(C-1)/2)."""
    return num_mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)


def dmol(params, x, num_mixtures, num_vals, min_log_scale=-7.0):
    """The same checks, in the same order, as csrc/inputs.h's prepare_dmol."""
    op = "dmol_log_likelihood"
    floating(params, op, "params")
    if params.dim() != 4:
        raise ValueError(f"{op}: params must be [B, P, H, W], got shape {tuple(params.shape)}")
    batch(params, op, "params")
    if isinstance(num_mixtures, (bool, float)) or num_mixtures < 1:
        raise ValueError(f"{op}: num_mixtures must be at least 1, got {num_mixtures!r}")
    if isinstance(num_vals, (bool, float)) or not 2 <= num_vals <= 2**24:
        raise ValueError(f"{op}: num_vals must be in 2..2^24, got {num_vals!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.device != params.device:
        raise ValueError(f"{op}: x is on {x.device} but params is on {params.device}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{op}: x must be an integer tensor of pixel values (uint8 or int64), got {x.dtype}")
    B, _, H, W = params.shape
    if x.dim() != 4 or x.shape[0] != B or x.shape[2:] != params.shape[2:] or x.shape[1] < 1:
        raise ValueError(f"{op}: x must be [B, C, H, W] with C >= 1 and B, H, W = {B}, {H}, {W} (params'), "
                         f"got {tuple(x.shape)}")
    P = dmol_channels(num_mixtures, x.shape[1])
    if params.shape[1] != P:
        raise ValueError(f"{op}: params has {params.shape[1]} channels, but num_mixtures = {num_mixtures} and "
                         f"C = {x.shape[1]} (x's channels) need M * (1 + 2C + C(C-1)/2) = {P}")
