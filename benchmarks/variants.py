"""What the benchmarks run: each op written four ways, its inputs, its minimum traffic, the models.

Variants of every op (the runner adds "compile(seed)" and "compile(torch)", torch.compile of
the first two):
  seed       the seed's eager code as the seed text / its notebook write it
  torch      idiomatic eager PyTorch (cross_entropy, BCE-with-logits, addcmul ...)
  hvae_fast  hvae_fast.ops

Noise for posterior_sample: in "posterior" every variant draws it inside the timed call with
torch.randn_like, as the seed does (hvae_fast gets torch.randn_like too). "posterior_eps"
is the same maths with the noise drawn once, outside, and passed in as inputs.

Minimum bytes an op must move (min_bytes): every tensor input read once and every output
written once; for forward+backward add the backward's inputs (one gradient per output, plus
the saved inputs it must read again, `bwd_reads`) and the gradients it writes (`grad_writes`:
every differentiable input, except mu_p whose gradient is grad_z itself and needs no write).
Noise drawn inside the call is not an input: a counter-based generator needs no memory for it.

Transcendental functions an op must evaluate (`transcendentals`), the arithmetic floor of the
roofline: categorical, one exp per logit in the forward (the softmax sum) and one in the
backward (the softmax, from the saved log-sum-exp); Bernoulli, exp and log1p per element
forward, one exp (the sigmoid) backward; posterior_sample, two exps per element forward and
again backward, plus log, sin and cos per two normals when the noise is drawn in the call.
Per-row logs and square roots are not counted.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F

from hvae_fast import ops
from hvae_fast.model import HierarchicalVAE
from hvae_fast.optim import Adamax

SEED_EPS = 1e-7  # the notebook's probability clamp
LO, HI = -7.0, 2.0  # the seed's hardtanh bounds


# ---- the seed's eager code ---------------------------------------------------------------------

def log_categorical(x, p, num_classes=256, reduction=None, dim=None):
    """The notebook's log_categorical (with reduction='sum')."""
    x_one_hot = F.one_hot(x.long(), num_classes=num_classes)
    log_p = x_one_hot * torch.log(torch.clamp(p, SEED_EPS, 1. - SEED_EPS))
    return torch.sum(log_p, dim)


def log_bernoulli(x, p, reduction=None, dim=None):
    """The notebook's log_bernoulli (with reduction='sum')."""
    pp = torch.clamp(p, SEED_EPS, 1. - SEED_EPS)
    log_p = x * torch.log(pp) + (1. - x) * torch.log(1. - pp)
    return torch.sum(log_p, dim)


def reparameterization(mu, log_var):
    std = torch.exp(0.5 * log_var)
    eps = torch.randn_like(std)
    return mu + std * eps


def seed_categorical(h_d, x):
    mu_d = torch.softmax(h_d, 2)
    return log_categorical(x, mu_d, num_classes=h_d.shape[-1], reduction='sum', dim=-1).sum(-1)


def seed_bernoulli(h_d, x):
    return log_bernoulli(x, torch.sigmoid(h_d), reduction='sum', dim=-1)


def _seed_kl(delta_mu_2, delta_log_var_2, delta_mu_1, delta_log_var_1, log_var_1):
    KL_z_2 = 0.5 * (delta_mu_2**2 + torch.exp(delta_log_var_2) - delta_log_var_2 - 1).sum(-1)
    KL_z_1 = 0.5 * (delta_mu_1**2 / torch.exp(log_var_1) + torch.exp(delta_log_var_1) -
                    delta_log_var_1 - 1).sum(-1)
    return KL_z_2, KL_z_1


def seed_posterior(delta_mu_2, delta_log_var_2, delta_mu_1, delta_log_var_1, mu_1, log_var_1):
    """Steps 2-6 of the seed's forward and its KL lines (the networks' outputs are inputs here)."""
    delta_log_var_1 = F.hardtanh(delta_log_var_1, LO, HI)
    delta_log_var_2 = F.hardtanh(delta_log_var_2, LO, HI)
    z_2 = reparameterization(delta_mu_2, delta_log_var_2)
    z_1 = reparameterization(mu_1 + delta_mu_1, log_var_1 + delta_log_var_1)
    return (z_2, z_1) + _seed_kl(delta_mu_2, delta_log_var_2, delta_mu_1, delta_log_var_1, log_var_1)


def seed_posterior_eps(delta_mu_2, delta_log_var_2, delta_mu_1, delta_log_var_1, mu_1, log_var_1, eps_2, eps_1):
    delta_log_var_1 = F.hardtanh(delta_log_var_1, LO, HI)
    delta_log_var_2 = F.hardtanh(delta_log_var_2, LO, HI)
    z_2 = delta_mu_2 + torch.exp(0.5 * delta_log_var_2) * eps_2
    z_1 = mu_1 + delta_mu_1 + torch.exp(0.5 * (log_var_1 + delta_log_var_1)) * eps_1
    return (z_2, z_1) + _seed_kl(delta_mu_2, delta_log_var_2, delta_mu_1, delta_log_var_1, log_var_1)


# ---- idiomatic eager PyTorch -------------------------------------------------------------------

def torch_categorical(logits, x):
    K = logits.shape[-1]
    nll = F.cross_entropy(logits.reshape(-1, K), x.reshape(-1).long(), reduction='none')
    return -nll.view(x.shape).sum(-1)


def torch_bernoulli(logits, x):
    return -F.binary_cross_entropy_with_logits(logits, x, reduction='none').sum(-1)


def _torch_level(dmu, dlv, eps, mu_p=None, lvp=None):
    c = F.hardtanh(dlv, LO, HI)
    t = torch.expm1(c) - c
    if mu_p is None:
        return torch.addcmul(dmu, torch.exp(0.5 * c), eps), 0.5 * torch.addcmul(t, dmu, dmu).sum(-1)
    z = torch.addcmul(mu_p + dmu, torch.exp(0.5 * (lvp + c)), eps)
    return z, 0.5 * torch.addcmul(t, dmu * torch.exp(-lvp), dmu).sum(-1)


def _two_levels(level, dmu2, dlv2, dmu1, dlv1, mu1, lv1, eps2, eps1):
    z2, kl2 = level(dmu2, dlv2, eps2)
    z1, kl1 = level(dmu1, dlv1, eps1, mu1, lv1)
    return z2, z1, kl2, kl1


def torch_posterior(dmu2, dlv2, dmu1, dlv1, mu1, lv1):
    return _two_levels(_torch_level, dmu2, dlv2, dmu1, dlv1, mu1, lv1, torch.randn_like(dmu2), torch.randn_like(dmu1))


def torch_posterior_eps(*args):
    return _two_levels(_torch_level, *args)


# ---- hvae_fast ---------------------------------------------------------------------------------

def fused_posterior(dmu2, dlv2, dmu1, dlv1, mu1, lv1):
    return _two_levels(ops.posterior_sample, dmu2, dlv2, dmu1, dlv1, mu1, lv1,
                       torch.randn_like(dmu2), torch.randn_like(dmu1))


def fused_posterior_eps(*args):
    return _two_levels(ops.posterior_sample, *args)


def fused_posterior_in_kernel(dmu2, dlv2, dmu1, dlv1, mu1, lv1):
    """eps=None: the kernel draws the noise (Philox) and draws it again in the backward."""
    return _two_levels(ops.posterior_sample, dmu2, dlv2, dmu1, dlv1, mu1, lv1, None, None)


def compiled_arithmetic_posterior():
    """Eager randn_like and torch.compile of the arithmetic: the fastest compiled version of
    "posterior" on a CPU, where Inductor's randn is scalar. A factory: the runner compiles it
    afresh, as it does the compile(...) variants."""
    arithmetic = torch.compile(torch_posterior_eps, dynamic=False)

    def fn(dmu2, dlv2, dmu1, dlv1, mu1, lv1):
        return arithmetic(dmu2, dlv2, dmu1, dlv1, mu1, lv1, torch.randn_like(dmu2), torch.randn_like(dmu1))

    return fn


def fused_categorical_overwrite(logits, x):
    """overwrite_logits=True, as the package's models call it: the backward writes the gradient
    into the logits' storage. A view stands in for the decoder's output, so the timed call
    has no extra op; the logits then hold gradients, which changes no timing."""
    return ops.categorical_log_likelihood(logits.view(logits.shape), x, overwrite_logits=True)


# ---- the op table ------------------------------------------------------------------------------

def _categorical_inputs(B, D, K, device, dtype):
    logits = torch.randn(B, D, K, device=device, dtype=dtype)
    x = torch.randint(0, K, (B, D), device=device).float()  # as the model gets it: raw values, float32
    return [logits, x], [True, False]


def _bernoulli_inputs(B, D, device, dtype):
    return [torch.randn(B, D, device=device, dtype=dtype),
            torch.randint(0, 2, (B, D), device=device).to(dtype)], [True, False]


def _posterior_inputs(B, L, device, dtype, eps=False):
    def r(scale=1.0):
        return torch.randn(B, L, device=device, dtype=dtype) * scale

    ts = [r(), r(2.0), r(), r(2.0), r(), r(0.5)]  # dmu2, dlv2 (top); dmu1, dlv1, mu1, lv1 (lower)
    diff = [True] * 6
    if eps:
        ts += [r(), r()]
        diff += [False, False]
    return ts, diff


@dataclass
class Op:
    make: Callable  # (device, dtype, **size) -> (inputs, requires_grad flags)
    sizes: Dict[str, dict]
    variants: Dict[str, Callable]
    bwd_reads: Sequence[int]  # inputs the backward must read again
    grad_writes: Sequence[int]  # inputs whose gradient must be written
    transcendentals: Callable = None  # (backward, **size) -> count per call (module doc)
    factories: Dict[str, Callable] = field(default_factory=dict)  # compiled variants built by a factory
    note: str = ""


_POST_SIZES = {"tiny": dict(B=128, L=16), "large": dict(B=4096, L=1024)}

OPS = {
    "categorical": Op(_categorical_inputs,
                      {"digits": dict(B=128, D=64, K=17), "mnist": dict(B=128, D=784, K=256)},
                      {"seed": seed_categorical, "torch": torch_categorical,
                       "hvae_fast": ops.categorical_log_likelihood,
                       "hvae_fast(overwrite)": fused_categorical_overwrite},
                      bwd_reads=[0, 1], grad_writes=[0],
                      transcendentals=lambda backward, B, D, K: (2 if backward else 1) * B * D * K),
    "posterior": Op(_posterior_inputs, _POST_SIZES,
                    {"seed": seed_posterior, "torch": torch_posterior, "hvae_fast": fused_posterior,
                     "hvae_fast(eps=None)": fused_posterior_in_kernel},
                    bwd_reads=[0, 1, 2, 3, 5], grad_writes=[0, 1, 2, 3, 5],
                    transcendentals=lambda backward, B, L: 2 * B * L * ((4 if backward else 2) + 1.5),
                    factories={"compile(torch)+randn": compiled_arithmetic_posterior},
                    note="two levels, noise drawn inside: randn_like for every variant, but "
                         "hvae_fast(eps=None) whose kernel draws it"),
    "posterior_eps": Op(lambda device, dtype, **s: _posterior_inputs(device=device, dtype=dtype, eps=True, **s),
                        _POST_SIZES,
                        {"seed": seed_posterior_eps, "torch": torch_posterior_eps, "hvae_fast": fused_posterior_eps},
                        bwd_reads=[0, 1, 2, 3, 5, 6, 7], grad_writes=[0, 1, 2, 3, 5],
                        transcendentals=lambda backward, B, L: 2 * B * L * (4 if backward else 2),
                        note="two levels, noise drawn outside the timed call and passed in"),
    "bernoulli": Op(_bernoulli_inputs, {"mnist": dict(B=128, D=784)},
                    {"seed": seed_bernoulli, "torch": torch_bernoulli, "hvae_fast": ops.bernoulli_log_likelihood},
                    bwd_reads=[0, 1], grad_writes=[0],
                    transcendentals=lambda backward, B, D: (3 if backward else 2) * B * D),
}


def make_case(op, size, device, dtype):
    """The inputs of one op at one size, and those of them that need gradients."""
    inputs, diff = op.make(device=device, dtype=dtype, **op.sizes[size])
    leaves = [t.requires_grad_() if d else t for t, d in zip(inputs, diff)]
    return leaves, [t for t, d in zip(leaves, diff) if d]


def closures(fn, leaves, wrt):
    """fwd() and fwd_bwd() of fn on these inputs, and fn's outputs from one first call.

    fwd: the forward with autograd recording, as in training. fwd_bwd: the forward and
    torch.autograd.grad of every output (random, fixed incoming gradients) w.r.t. wrt.
    """
    def fwd():
        out = fn(*leaves)
        return out if isinstance(out, tuple) else (out,)

    outs = fwd()
    grads_out = [torch.randn_like(o) for o in outs]

    def fwd_bwd():
        return torch.autograd.grad(fwd(), wrt, grads_out)

    return fwd, fwd_bwd, outs


def min_bytes(op, inputs, outputs, backward):
    """The minimum traffic of one call, by the formula in this module's docstring."""
    n = sum(t.nbytes for t in inputs) + sum(t.nbytes for t in outputs)
    if backward:
        n += sum(t.nbytes for t in outputs)  # one incoming gradient per output
        n += sum(inputs[i].nbytes for i in op.bwd_reads)
        n += sum(inputs[i].nbytes for i in op.grad_writes)
    return n


# ---- whole training step -----------------------------------------------------------------------

def seed_forward(self, x, reduction='avg'):
    """The seed text's HierarchicalVAE.forward, verbatim but for layout, on a hvae_fast model's networks."""
    r_1 = self.nn_r_1(x)
    r_2 = self.nn_r_2(r_1)
    delta_1 = self.nn_delta_1(r_1)
    delta_mu_1, delta_log_var_1 = torch.chunk(delta_1, 2, dim=1)
    delta_log_var_1 = F.hardtanh(delta_log_var_1, -7., 2.)
    delta_2 = self.nn_delta_2(r_2)
    delta_mu_2, delta_log_var_2 = torch.chunk(delta_2, 2, dim=1)
    delta_log_var_2 = F.hardtanh(delta_log_var_2, -7., 2.)
    z_2 = reparameterization(delta_mu_2, delta_log_var_2)
    h_1 = self.nn_z_1(z_2)
    mu_1, log_var_1 = torch.chunk(h_1, 2, dim=1)
    z_1 = reparameterization(mu_1 + delta_mu_1, log_var_1 + delta_log_var_1)
    h_d = self.nn_x(z_1)
    if self.likelihood_type == 'categorical':
        b = h_d.shape[0]
        d = h_d.shape[1] // self.num_vals
        h_d = h_d.view(b, d, self.num_vals)
        mu_d = torch.softmax(h_d, 2)
        RE = log_categorical(x, mu_d, num_classes=self.num_vals, reduction='sum', dim=-1).sum(-1)
    else:
        mu_d = torch.sigmoid(h_d)
        RE = log_bernoulli(x, mu_d, reduction='sum', dim=-1)
    KL_z_2, KL_z_1 = _seed_kl(delta_mu_2, delta_log_var_2, delta_mu_1, delta_log_var_1, log_var_1)
    KL = KL_z_1 + KL_z_2
    if reduction == 'sum':
        return -(RE - KL).sum()
    return -(RE - KL).mean()


@dataclass
class Model:
    batch: int
    config: dict = field(default_factory=dict)


MODELS = {
    "digits": Model(64, dict(D=64, M=256, L=8, num_vals=17)),  # the recipe: 721,808 parameters, batch 64
    "mnist": Model(128, dict(D=784, M=512, L=8, num_vals=256)),  # the recipe's networks widened to M=512
}

@dataclass
class TrainVariant:
    backend: str  # of the HierarchicalVAE
    loss: Callable  # (model, x) -> loss
    optimizer: type = torch.optim.Adamax
    in_kernel_noise: bool = False


def foreach_adamax(params, **kw):
    """torch's Adamax with its multi-tensor (foreach) step, the fastest torch step on a CPU."""
    return torch.optim.Adamax(params, foreach=True, **kw)


TRAIN_VARIANTS = {
    "seed": TrainVariant("torch", seed_forward),
    "seed(foreach Adamax)": TrainVariant("torch", seed_forward, foreach_adamax),
    "torch": TrainVariant("torch", HierarchicalVAE.forward),  # hvae_fast.reference: log_softmax+gather, same KL
    "hvae_fast(torch Adamax)": TrainVariant("fused", HierarchicalVAE.forward),  # the fused ops alone
    "hvae_fast": TrainVariant("fused", HierarchicalVAE.forward, Adamax),  # as hvae_fast.train trains
    "hvae_fast(eps=None)": TrainVariant("fused", HierarchicalVAE.forward, Adamax, in_kernel_noise=True),
}


def make_model(name, device, dtype, seed=0):
    torch.manual_seed(seed)
    return HierarchicalVAE.from_recipe(**MODELS[name].config).to(device=device, dtype=dtype)


def make_batches(name, n, device, dtype):
    m = MODELS[name]
    D, K = m.config["D"], m.config["num_vals"]
    return [torch.randint(0, K, (m.batch, D), device=device).to(dtype) for _ in range(n)]
