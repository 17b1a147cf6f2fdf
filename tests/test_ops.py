"""hvae_fast operators against hvae_fast.reference (the spec) and the seed's formulas.

The `device` fixture (tests/conftest.py) runs the shared cases on "cpu" and, when a
GPU and the CUDA kernels are there, on "cuda"; tests/test_cuda.py adds the
CUDA-only extras and reuses the helpers below.
"""
import math
import os
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import hvae_fast
from hvae_fast import ops, reference

POST, CAT, BERN = "posterior_sample", "categorical_log_likelihood", "bernoulli_log_likelihood"
RAW = torch.ops.hvae_fast
FLOATS = [torch.float32, torch.float64]
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-12, "atol": 1e-12}}
LAYOUTS = ["contiguous", "transposed", "sliced"]
needs_extension = pytest.mark.skipif(not hvae_fast.extension_available(),
                                     reason="hvae_fast._C is not loaded")


def dtype_id(d):
    return str(d).removeprefix("torch.")


# ---- inputs ---------------------------------------------------------------------------

def laid_out(shape, layout, make):
    """A tensor of `shape` from make(shape'): contiguous, transposed (dims 0 and -1) or sliced."""
    shape = tuple(shape)
    if layout == "contiguous":
        return make(shape)
    if layout == "transposed" and len(shape) >= 2:
        return make((shape[-1],) + shape[1:-1] + (shape[0],)).transpose(0, -1)
    return make(shape[:-1] + (2 * shape[-1],))[..., ::2]  # every other element


@dataclass(frozen=True)
class Case:
    op: str
    shape: tuple          # of delta_mu (posterior) or logits
    layout: str = "contiguous"
    prior: bool = False   # posterior only
    x_dtype: torch.dtype = torch.float32  # likelihood targets
    scale: float = 1.0    # of the logits

    def __str__(self):
        parts = [self.op.split("_")[0], "x".join(map(str, self.shape)), self.layout]
        if self.op == POST:
            parts.append("prior" if self.prior else "top")
        else:
            parts.append(dtype_id(self.x_dtype))
        return "-".join(parts + ([f"scale{self.scale:g}"] if self.scale != 1.0 else []))

    def build(self, dtype, device, seed=0):
        """(args, leaves): the op's positional args and the float inputs that get gradients."""
        gen = torch.Generator().manual_seed(seed)

        def leaf(scale=1.0, shape=self.shape):
            def make(s):
                return (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

            return laid_out(shape, self.layout, make).detach().requires_grad_()

        def target(high, shape):
            def make(s):
                return torch.randint(0, high, s, generator=gen).to(self.x_dtype).to(device)

            return laid_out(shape, self.layout, make)

        if self.op == POST:
            args = [leaf(), leaf(3.0), leaf()]  # delta_logvar often beyond the clamp
            args += [leaf(), leaf(0.5)] if self.prior else [None, None]
            return tuple(args), [a for a in args if a is not None]
        logits = leaf(self.scale)
        if self.op == CAT:
            return (logits, target(self.shape[-1], self.shape[:-1])), [logits]
        return (logits, target(2, self.shape)), [logits]


def outputs_and_grads(fn, args, leaves, kwargs=None, seed=1):
    """fn's outputs and the gradients to `leaves` for fixed random output cotangents."""
    outs = fn(*args, **(kwargs or {}))
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, cots, allow_unused=True, materialize_grads=True)
    return [o.detach() for o in outs] + list(grads)


def assert_all_close(actual, expected, **tol):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a, e, **tol, msg=lambda m, i=i: f"tensor {i} (outputs, then grads): {m}")


def check_vs_reference(case, dtype, device, kwargs=None, args=None, leaves=None):
    """Forward values and gradients of hvae_fast.ops vs hvae_fast.reference; returns ops'."""
    if args is None:
        args, leaves = case.build(dtype, device)
    fast = outputs_and_grads(getattr(ops, case.op), args, leaves, kwargs)
    ref = outputs_and_grads(getattr(reference, case.op), args, leaves, kwargs)
    assert_all_close(fast, ref, **TOL[dtype])
    return fast


# ---- cases -------------------------------------------------------------------------------

_rng = random.Random(1234)


def random_shape(ndim, last=None):
    dims = [_rng.randint(1, 9) for _ in range(ndim)]
    return tuple(dims[:-1] + [last]) if last else tuple(dims)


# B = 1, D = 1, 4-d, several row chunks (> 4096 elements per example), random
DENSE_SHAPES = [(1, 7), (5, 1), (3, 17), (2, 3, 4, 5), (2, 5000), random_shape(2), random_shape(3)]
# logits [B, ..., K]: K = 2, 17, 256, 1000; B = 1; D = 1; 4-d [B, H, W, K]; > 64 rows per example
LOGIT_SHAPES = [(3, 2), (1, 5, 17), (4, 1, 2), (2, 3, 256), (2, 3, 1000), (2, 3, 4, 17), (2, 70, 5),
                random_shape(3, last=17), random_shape(2, last=256)]
INT_X = [torch.int64, torch.int32, torch.uint8]
FLOAT_X = [torch.float32, torch.float64, torch.float16]

REFERENCE_CASES = (
    [Case(POST, s, lay, prior=p) for s in DENSE_SHAPES for lay in LAYOUTS for p in (False, True)]
    + [Case(CAT, s, lay, x_dtype=torch.int64) for s in LOGIT_SHAPES for lay in LAYOUTS]
    + [Case(CAT, s, lay, x_dtype=xd) for s in [(3, 17), (2, 3, 4, 17)] for lay in LAYOUTS
       for xd in INT_X[1:] + FLOAT_X]
    + [Case(BERN, s, lay) for s in DENSE_SHAPES + [(6,)] for lay in LAYOUTS]
    + [Case(BERN, (2, 3, 4, 5), lay, x_dtype=xd) for lay in LAYOUTS
       for xd in [torch.float64, torch.bool] + INT_X]
)


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=str)
def test_matches_reference(case, dtype, device):
    args, leaves = case.build(dtype, device)
    if case.layout != "contiguous" and args[0].numel() > 1 and min(args[0].shape) > 1:
        assert not args[0].is_contiguous()
    check_vs_reference(case, dtype, device, args=args, leaves=leaves)


# Outputs of several MiB: the CPU kernels advise their fresh outputs onto huge pages.
LARGE_CASES = [Case(POST, (4, 2**19), prior=True), Case(CAT, (8, 64, 4096), x_dtype=torch.int64),
               Case(BERN, (4, 2**19))]


@pytest.mark.parametrize("case", LARGE_CASES, ids=str)
def test_large_outputs_match_reference(case, device):
    check_vs_reference(case, torch.float32, device)


@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("used", ["z", "kl"])
def test_posterior_one_output_used(used, prior, device):
    """Autograd materializes the missing output gradient as zeros."""
    args, leaves = Case(POST, (3, 5), prior=prior).build(torch.float64, device)

    def pick(module):
        return lambda *a: module.posterior_sample(*a)[0 if used == "z" else 1]

    assert_all_close(outputs_and_grads(pick(ops), args, leaves),
                     outputs_and_grads(pick(reference), args, leaves), **TOL[torch.float64])


def test_posterior_some_inputs_without_grad(device):
    args, leaves = Case(POST, (3, 5), prior=True).build(torch.float64, device)
    args = tuple(a.detach() if i in (2, 3) else a for i, a in enumerate(args))  # eps, mu_p
    leaves = [a for i, a in enumerate(args) if i not in (2, 3)]
    check_vs_reference(Case(POST, (3, 5), prior=True), torch.float64, device, args=args, leaves=leaves)
    # eps needs no gradient: the backward op writes none
    dmu, dlv, eps, _, lvp = (a.detach() for a in args)
    g = RAW.posterior_sample_backward(torch.ones_like(dmu), torch.ones(3, dtype=dmu.dtype, device=device),
                                      dmu, dlv, eps, lvp, -7.0, 2.0, False)
    assert g[2].numel() == 0 and g[0].shape == dmu.shape


# ---- extreme values ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("values", ["pm1e4", "randn_x1e4"])
@pytest.mark.parametrize("op,shape", [(CAT, (3, 4, 17)), (CAT, (6, 3)), (BERN, (3, 4, 17))],
                         ids=["cat-3x4x17", "cat-6x3", "bern-3x4x17"])
def test_extreme_logits(op, shape, values, dtype, device, request):
    case = Case(op, shape, x_dtype=torch.int64, scale=1e4)
    args, leaves = case.build(dtype, device)
    if values == "pm1e4":  # exactly +-1e4, with ties
        signs = torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(7)) * 2 - 1
        leaves = [(signs * 1e4).to(dtype=dtype, device=device).requires_grad_()]
        args = (leaves[0], args[1])
    fast = outputs_and_grads(getattr(ops, op), args, leaves)
    assert all(bool(t.isfinite().all()) for t in fast)
    assert_all_close(fast, outputs_and_grads(getattr(reference, op), args, leaves), **TOL[dtype])


def float_neighbors(v, dtype):
    """v in dtype, and the next representable values below and above it."""
    t = torch.tensor(v, dtype=dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    return t, torch.nextafter(t, -inf), torch.nextafter(t, inf)


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("bounds", [None, (-7.0, 2.0), (-3.0, 0.5), (-2.3, 0.7), (-20.0, 5.0)],
                         ids=lambda b: "default" if b is None else f"{b[0]:g}_{b[1]:g}")
def test_logvar_clamp(bounds, prior, dtype, device):
    """delta_logvar at, just beyond, far beyond and just inside the bounds."""
    lo, hi = bounds or (-7.0, 2.0)
    kwargs = {} if bounds is None else {"min_logvar": lo, "max_logvar": hi}
    (lo_t, below_lo, above_lo), (hi_t, below_hi, above_hi) = (float_neighbors(lo, dtype),
                                                              float_neighbors(hi, dtype))
    at_or_beyond = [lo_t, hi_t, below_lo, above_hi, lo_t - 1, hi_t + 1, -1e4, 1e4, -math.inf, math.inf]
    inside = [above_lo, below_hi, (lo_t + hi_t) / 2]
    edge = torch.tensor([float(v) for v in at_or_beyond + inside], dtype=dtype)
    case = Case(POST, (3, 16), prior=prior)
    args, leaves = case.build(dtype, device)
    with torch.no_grad():
        args[1][0, :len(edge)] = edge.to(device)
    out = check_vs_reference(case, dtype, device, kwargs=kwargs, args=args, leaves=leaves)
    g_dlv = out[3][0].cpu()
    assert torch.equal(g_dlv[:len(at_or_beyond)], torch.zeros(len(at_or_beyond), dtype=dtype))
    assert bool((g_dlv[len(at_or_beyond):len(edge)] != 0).all())
    assert all(bool(t.isfinite().all()) for t in out)


# ---- the seed's formulas (the blog post's HierarchicalVAE), as a test oracle -----------------

SEED_EPS = 1.e-7


def seed_log_categorical(x, p, num_classes, reduction=None, dim=None):
    x_one_hot = F.one_hot(x.long(), num_classes=num_classes)
    log_p = x_one_hot * torch.log(torch.clamp(p, SEED_EPS, 1. - SEED_EPS))
    return torch.sum(log_p, dim) if reduction == "sum" else log_p


def seed_log_bernoulli(x, p, reduction=None, dim=None):
    pp = torch.clamp(p, SEED_EPS, 1. - SEED_EPS)
    log_p = x * torch.log(pp) + (1. - x) * torch.log(1. - pp)
    return torch.sum(log_p, dim) if reduction == "sum" else log_p


def seed_reparameterization(mu, log_var, eps):
    return mu + torch.exp(0.5 * log_var) * eps


def seed_posterior_top(delta_mu_2, raw_delta_log_var_2, eps, *_):
    delta_log_var_2 = F.hardtanh(raw_delta_log_var_2, -7., 2.)
    z_2 = seed_reparameterization(delta_mu_2, delta_log_var_2, eps)
    KL_z_2 = 0.5 * (delta_mu_2**2 + torch.exp(delta_log_var_2) - delta_log_var_2 - 1).sum(-1)
    return z_2, KL_z_2


def seed_posterior_lower(delta_mu_1, raw_delta_log_var_1, eps, mu_1, log_var_1):
    # mu_1, log_var_1: the prior p(z_1 | z_2)
    delta_log_var_1 = F.hardtanh(raw_delta_log_var_1, -7., 2.)
    z_1 = seed_reparameterization(mu_1 + delta_mu_1, log_var_1 + delta_log_var_1, eps)
    KL_z_1 = 0.5 * (delta_mu_1**2 / torch.exp(log_var_1) + torch.exp(delta_log_var_1)
                    - delta_log_var_1 - 1).sum(-1)
    return z_1, KL_z_1


def seed_categorical(h_d, x):
    b, d = x.shape
    num_vals = h_d.shape[-1]
    mu_d = torch.softmax(h_d.reshape(b, -1).view(b, d, num_vals), 2)
    return seed_log_categorical(x, mu_d, num_vals, reduction="sum", dim=-1).sum(-1)


def seed_bernoulli(h, x):
    p = torch.clamp(torch.sigmoid(h), SEED_EPS, 1. - SEED_EPS)
    return seed_log_bernoulli(x, p, reduction="sum", dim=-1)


SEED_CASES = [
    (seed_posterior_top, Case(POST, (4, 32))),
    (seed_posterior_lower, Case(POST, (4, 32), prior=True)),
    (seed_categorical, Case(CAT, (4, 6, 17), x_dtype=torch.int64, scale=0.5)),
    (seed_bernoulli, Case(BERN, (4, 32), scale=0.5)),
]


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("seed_fn,case", SEED_CASES, ids=[c.op.split("_")[0] + ("-prior" if c.prior else "")
                                                          for _, c in SEED_CASES])
def test_matches_seed_formulas(seed_fn, case, dtype, device):
    args, leaves = case.build(dtype, device)
    if case.op != POST:  # the seed's probability clamp must be inactive
        p = torch.softmax(args[0], -1) if case.op == CAT else torch.sigmoid(args[0])
        assert SEED_EPS < p.min() and p.max() < 1 - SEED_EPS
    fast = outputs_and_grads(getattr(ops, case.op), args, leaves)
    seed = outputs_and_grads(seed_fn, args, leaves)
    assert_all_close(fast, seed, **TOL[dtype])


# ---- gradcheck, opcheck, torch.compile ----------------------------------------------------------

GRADCHECK_CASES = [
    Case(POST, (2, 3)), Case(POST, (2, 3), prior=True), Case(POST, (2, 3, 2), "transposed", prior=True),
    Case(CAT, (2, 3, 4), x_dtype=torch.int64), Case(CAT, (2, 5), "sliced", x_dtype=torch.float64),
    Case(BERN, (2, 3, 2)), Case(BERN, (3, 4), "transposed", x_dtype=torch.bool),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
def test_gradcheck(case):
    args, leaves = case.build(torch.float64, "cpu")

    def fn(*ts):
        it = iter(ts)
        return getattr(ops, case.op)(*[next(it) if a is not None and a.requires_grad else a for a in args])

    assert torch.autograd.gradcheck(fn, leaves)


def raw_args(case, requires_grad=True):
    """The raw forward op's args for a Case (bounds appended for posterior_sample)."""
    args, _ = case.build(torch.float64, "cpu")
    args = [a if a is None or requires_grad or not a.requires_grad else a.detach() for a in args]
    return tuple(args) + ((-7.0, 2.0) if case.op == POST else ())


def backward_args(name):
    gen = torch.Generator().manual_seed(3)

    def r(*s):
        return torch.randn(s, generator=gen, dtype=torch.float64)

    if name.startswith("posterior"):
        (dmu, dlv, eps, _, lvp, lo, hi) = raw_args(Case(POST, (2, 3, 4), prior=True), False)
        eps_grad = () if name.endswith("eps_grad") else (False,)  # the gradient of eps skipped
        return (r(2, 3, 4), r(2), dmu, dlv, eps, lvp if "prior" in name else None, lo, hi) + eps_grad
    if name.startswith("categorical"):
        logits, x = raw_args(Case(CAT, (2, 3, 5), x_dtype=torch.int64), False)
        return (r(2), logits, x, RAW.categorical_log_likelihood(logits, x)[1])
    logits, x = raw_args(Case(BERN, (2, 3, 5)), False)
    return (r(2), logits, x)


OPCHECK_FORWARD = [Case(POST, (2, 3, 4)), Case(POST, (2, 3, 4), "transposed", prior=True),
                   Case(CAT, (2, 3, 5), x_dtype=torch.int64), Case(CAT, (3, 5), "sliced", x_dtype=torch.float32),
                   Case(BERN, (2, 3, 5)), Case(BERN, (2, 3, 5), "transposed", x_dtype=torch.bool)]


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("case", OPCHECK_FORWARD, ids=str)
def test_opcheck_forward(case, requires_grad):
    op = getattr(RAW, case.op).default
    result = torch.library.opcheck(op, raw_args(case, requires_grad))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("name", ["posterior_top_eps_grad", "posterior_prior_eps_grad", "posterior_top",
                                  "posterior_prior", "categorical", "bernoulli"])
def test_opcheck_backward(name):
    op = {"posterior": RAW.posterior_sample_backward, "categorical": RAW.categorical_log_likelihood_backward,
          "bernoulli": RAW.bernoulli_log_likelihood_backward}[name.split("_")[0]].default
    result = torch.library.opcheck(op, backward_args(name))
    assert set(result.values()) == {"SUCCESS"}, result


def hvae_step(dmu, dlv, eps, mu_p, lvp, logits_c, x_c, logits_b, x_b):
    """All three public ops, two posterior levels chained through z."""
    z1, kl1 = ops.posterior_sample(dmu, dlv, eps, mu_p, lvp, min_logvar=-5.0, max_logvar=1.5)
    z2, kl2 = ops.posterior_sample(z1, dlv, eps)
    nll = -ops.categorical_log_likelihood(logits_c, x_c) - ops.bernoulli_log_likelihood(logits_b, x_b)
    return nll + kl1 + kl2, z2


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph():
    post_args, post_leaves = Case(POST, (3, 8), prior=True).build(torch.float32, "cpu")
    cat_args, cat_leaves = Case(CAT, (3, 4, 7), x_dtype=torch.int64).build(torch.float32, "cpu", seed=1)
    bern_args, bern_leaves = Case(BERN, (3, 6)).build(torch.float32, "cpu", seed=2)
    args, leaves = post_args + cat_args + bern_args, post_leaves + cat_leaves + bern_leaves
    torch._dynamo.reset()
    compiled = torch.compile(hvae_step, fullgraph=True, backend="inductor")
    assert_all_close(outputs_and_grads(compiled, args, leaves), outputs_and_grads(hvae_step, args, leaves),
                     **TOL[torch.float32])


# ---- bad inputs ----------------------------------------------------------------------------

def f32(*shape, device="cpu", dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, device=device)


def ints(*shape, high=2, dtype=torch.int64, device="cpu"):
    return torch.randint(0, high, shape).to(dtype=dtype, device=device)


def p(op, make_args, exc, match, id, **kwargs):
    return pytest.param(op, make_args, kwargs, exc, match, id=id)


def B3():
    return f32(2, 3), f32(2, 3), f32(2, 3)


BAD_INPUTS = [
    p(POST, lambda: (f32(2, 3), f32(2, 4), f32(2, 3)), ValueError, "delta_logvar has shape", "dlv-shape"),
    p(POST, lambda: (f32(2, 3), f32(2, 3), f32(3, 3)), ValueError, "eps has shape", "eps-shape"),
    p(POST, lambda: B3() + (f32(2, 1), f32(2, 3)), ValueError, "mu_p has shape", "mu_p-shape"),
    p(POST, lambda: B3() + (f32(2, 3), f32(3)), ValueError, "logvar_p has shape", "logvar_p-shape"),
    p(POST, lambda: (ints(2, 3), f32(2, 3), f32(2, 3)), TypeError, "delta_mu must be a floating", "int-dmu"),
    p(POST, lambda: (f32(2, 3), f32(2, 3), ints(2, 3)), TypeError, "eps must be a floating", "int-eps"),
    p(POST, lambda: (f32(2, 3), f32(2, 3), f32(2, 3, dtype=torch.float64)), TypeError, "eps has dtype",
      "eps-f64"),
    p(POST, lambda: B3() + (f32(2, 3), f32(2, 3, dtype=torch.float64)), TypeError, "logvar_p has dtype",
      "logvar_p-f64"),
    p(POST, lambda: (f32(2, 3), f32(2, 3), f32(2, 3, device="meta")), ValueError, "eps is on meta",
      "eps-meta"),
    p(POST, lambda: B3() + (f32(2, 3, device="meta"), f32(2, 3)), ValueError, "mu_p is on meta", "mu_p-meta"),
    p(POST, lambda: (f32(2, 3, device="meta"), f32(2, 3), f32(2, 3)), ValueError,
      "delta_logvar is on cpu but delta_mu is on meta", "dmu-meta"),
    p(POST, lambda: B3() + (f32(2, 3), None), ValueError, "both mu_p and logvar_p", "only-mu_p"),
    p(POST, lambda: B3() + (None, f32(2, 3)), ValueError, "both mu_p and logvar_p", "only-logvar_p"),
    p(POST, B3, ValueError, "min_logvar", "min-eq-max", min_logvar=1.0, max_logvar=1.0),
    p(POST, B3, ValueError, "min_logvar", "min-gt-max", min_logvar=3.0, max_logvar=-3.0),
    p(POST, lambda: (f32(0, 3), f32(0, 3), f32(0, 3)), ValueError, "delta_mu must have a non-empty batch",
      "empty-batch"),
    p(POST, lambda: (f32(), f32(), f32()), ValueError, "delta_mu must have a non-empty batch", "0-d"),
    p(POST, lambda: ([1.0], f32(1), f32(1)), TypeError, "delta_mu must be a torch.Tensor", "list"),

    p(CAT, lambda: (ints(2, 3, 5), ints(2, 3)), TypeError, "logits must be a floating", "int-logits"),
    p(CAT, lambda: (f32(2, 3, 5), ints(2, 4)), ValueError, "x must have shape", "x-shape"),
    p(CAT, lambda: (f32(2, 3, 5), ints(2, 3, 5)), ValueError, "x must have shape", "x-full-shape"),
    p(CAT, lambda: (f32(5), ints()), ValueError, "logits must have shape", "1d-logits"),
    p(CAT, lambda: (f32(2, 3, 1), ints(2, 3, high=1)), ValueError, "logits need K >= 2", "K1"),
    p(CAT, lambda: (f32(0, 5), ints(0)), ValueError, "logits must have a non-empty batch", "empty-batch"),
    p(CAT, lambda: (f32(2, 5), ints(2, device="meta")), ValueError, "x is on meta", "x-meta"),
    p(CAT, lambda: (f32(2, 5, device="meta"), ints(2)), ValueError, "logits is on meta", "logits-meta"),
    p(CAT, lambda: (f32(2, 5), ints(2, dtype=torch.bool)), TypeError, "x holds class indices", "bool-x"),
    p(CAT, lambda: (f32(2, 5), [0, 1]), TypeError, "x must be a torch.Tensor", "list-x"),
    p(CAT, lambda: (f32(2, 5), f32(2, dtype=torch.complex64)), TypeError, "x must be real", "complex-x"),

    p(BERN, lambda: (ints(2, 3), ints(2, 3)), TypeError, "logits must be a floating", "int-logits"),
    p(BERN, lambda: (f32(2, 3), ints(2, 4)), ValueError, "x must have the shape of logits", "x-shape"),
    p(BERN, lambda: (f32(2, 3), ints(2, 3, device="meta")), ValueError, "x is on meta", "x-meta"),
    p(BERN, lambda: (f32(2, 3, device="meta"), ints(2, 3)), ValueError, "logits is on meta", "logits-meta"),
    p(BERN, lambda: (f32(0, 3), ints(0, 3)), ValueError, "logits must have a non-empty batch", "empty-batch"),
    p(BERN, lambda: (f32(2, 3), [[0, 1, 0]] * 2), TypeError, "x must be a torch.Tensor", "list-x"),
    p(BERN, lambda: (f32(2, 3), f32(2, 3, dtype=torch.complex64)), TypeError, "x must be real", "complex-x"),
]


@pytest.mark.parametrize("impl", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("op,make_args,kwargs,exc,match", BAD_INPUTS)
def test_bad_inputs_raise(impl, op, make_args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        getattr(impl, op)(*make_args(), **kwargs)


def with_bad_value(x, value, flat_pos=-1):
    """x with one element (the last by default: a later row chunk) set to value."""
    x = x.clone()
    x.view(-1)[flat_pos] = value
    return x


BAD_CLASS = [(-1, torch.int64), (5, torch.int64), (-1, torch.int32), (5, torch.int32), (5, torch.uint8),
             (-1, torch.int8), (5.0, torch.float32), (-1.0, torch.float32), (2.5, torch.float32),
             (-0.5, torch.float64), (4.0000001, torch.float64), (math.nan, torch.float32),
             (math.inf, torch.float64), (2.5, torch.float16)]


@pytest.mark.parametrize("impl", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("value,x_dtype", BAD_CLASS, ids=[f"{v}-{dtype_id(d)}" for v, d in BAD_CLASS])
def test_bad_class_index_raises(impl, value, x_dtype):
    logits = f32(2, 70, 5)  # x [2, 70]: the bad index is in the second chunk of 64 rows
    x = with_bad_value(ints(2, 70, high=5, dtype=x_dtype), value)
    with pytest.raises(IndexError, match="x holds"):
        impl.categorical_log_likelihood(logits, x)


BAD_BINARY = [(0.5, torch.float32), (2.0, torch.float32), (-1.0, torch.float64), (math.nan, torch.float32),
              (math.inf, torch.float32), (2, torch.int64), (-1, torch.int32), (3, torch.uint8),
              (0.5, torch.float16)]


@pytest.mark.parametrize("impl", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("value,x_dtype", BAD_BINARY, ids=[f"{v}-{dtype_id(d)}" for v, d in BAD_BINARY])
def test_non_binary_target_raises(impl, value, x_dtype):
    logits = f32(2, 5000)  # the bad target is in the second row chunk of the last example
    x = with_bad_value(ints(2, 5000, dtype=x_dtype), value)
    with pytest.raises(ValueError, match="x must hold 0 or 1"):
        impl.bernoulli_log_likelihood(logits, x)


def test_non_binary_target_rounded_by_cast_raises():
    x = with_bad_value(ints(2, 3, dtype=torch.float64), 1 + 1e-12)
    with pytest.raises(ValueError, match="x must hold 0 or 1"):
        ops.bernoulli_log_likelihood(f32(2, 3), x)


RAW_BAD = [  # the C++ checks, reached by calling torch.ops.hvae_fast.* directly
    (POST, lambda: (f32(2, 3), f32(2, 4), f32(2, 3), None, None, -7.0, 2.0), ValueError, "delta_logvar"),
    (POST, lambda: (ints(2, 3), f32(2, 3), f32(2, 3), None, None, -7.0, 2.0), TypeError, "delta_mu"),
    (POST, lambda: (f32(2, 3), f32(2, 3), f32(2, 3, dtype=torch.float64), None, None, -7.0, 2.0),
     TypeError, "eps has dtype"),
    (POST, lambda: B3() + (f32(2, 3), None, -7.0, 2.0), ValueError, "both mu_p and logvar_p"),
    (POST, lambda: B3() + (f32(2, 3), f32(3, 3), -7.0, 2.0), ValueError, "logvar_p has shape"),
    (POST, lambda: (f32(0, 3), f32(0, 3), f32(0, 3), None, None, -7.0, 2.0), ValueError, "delta_mu"),
    ("posterior_sample_backward", lambda: (f32(2, 4), f32(2)) + B3() + (None, -7.0, 2.0), ValueError,
     "grad_z has shape"),
    ("posterior_sample_backward", lambda: (f32(2, 3), f32(3)) + B3() + (None, -7.0, 2.0), ValueError,
     "grad must have shape"),
    ("posterior_sample_backward", lambda: (f32(2, 3), f32(2)) + B3() + (f32(2, 1), -7.0, 2.0), ValueError,
     "logvar_p has shape"),
    (CAT, lambda: (f32(2, 3, 5), with_bad_value(ints(2, 3, high=5), 5)), IndexError, "x holds 5"),
    (CAT, lambda: (f32(2, 3, 5), with_bad_value(ints(2, 3, high=5), -1)), IndexError, "x holds -1"),
    (CAT, lambda: (f32(2, 3, 5), with_bad_value(f32(2, 3).abs().floor(), 2.5)), IndexError, "x holds 2.5"),
    (CAT, lambda: (f32(2, 3, 5), with_bad_value(f32(2, 3).abs().floor(), math.nan)), IndexError, "x holds nan"),
    (CAT, lambda: (f32(2, 3, 5), ints(2, 4)), ValueError, "x must have shape"),
    (CAT, lambda: (f32(2, 3, 1), ints(2, 3, high=1)), ValueError, "K = 1"),
    (CAT, lambda: (ints(2, 3, 5), ints(2, 3)), TypeError, "logits must be a floating"),
    (CAT, lambda: (f32(2, 5), ints(2, dtype=torch.bool)), TypeError, "x holds class indices"),
    ("categorical_log_likelihood_backward",
     lambda: (f32(2), f32(2, 3, 5), with_bad_value(ints(2, 3, high=5), 7), f32(2, 3, 2)), IndexError, "x holds 7"),
    ("categorical_log_likelihood_backward", lambda: (f32(3), f32(2, 3, 5), ints(2, 3), f32(2, 3, 2)),
     ValueError, "grad must have shape"),
    ("categorical_log_likelihood_backward", lambda: (f32(2), f32(2, 3, 5), ints(2, 3), f32(2, 3)),
     ValueError, "lse must have shape"),
    ("categorical_log_likelihood_backward", lambda: (f32(2), f32(2, 3, 5), ints(2, 3), f32(2, 3, 2).double()),
     TypeError, "lse must have dtype"),
    ("categorical_log_likelihood_backward_", lambda: (f32(2), f32(2, 3, 5), ints(2, 3), f32(2, 3, 2).double()),
     TypeError, "lse must have dtype"),
    # a meta lse dispatches to the fake kernel, whose check this is (the C++ one: tests/test_cuda.py)
    ("categorical_log_likelihood_backward",
     lambda: (f32(2), f32(2, 3, 5), ints(2, 3), f32(2, 3, 2, device="meta")), ValueError, "lse is on"),
    ("categorical_log_likelihood_backward_",
     lambda: (f32(2), f32(2, 3, 5), ints(2, 3), f32(2, 3, 2, device="meta")), ValueError, "lse is on"),
    (BERN, lambda: (f32(2, 3), with_bad_value(ints(2, 3).float(), 0.5)), ValueError, "x must hold 0 or 1"),
    (BERN, lambda: (f32(2, 3), with_bad_value(ints(2, 3), 2)), ValueError, "x must hold 0 or 1"),
    (BERN, lambda: (f32(2, 3), ints(3, 2)), ValueError, "x must have the shape"),
    (BERN, lambda: (ints(2, 3), ints(2, 3)), TypeError, "logits must be a floating"),
    ("bernoulli_log_likelihood_backward", lambda: (f32(2, 1), f32(2, 3), ints(2, 3)), ValueError,
     "grad must have shape"),
    ("bernoulli_log_likelihood_backward", lambda: (f32(2), f32(2, 3), ints(2, 4)), ValueError,
     "x must have the shape"),
]


@needs_extension
@pytest.mark.parametrize("name,make_args,exc,match", RAW_BAD, ids=[f"{n}-{m}" for n, _, _, m in RAW_BAD])
def test_raw_op_checks(name, make_args, exc, match):
    with pytest.raises(exc, match=match):
        getattr(RAW, name)(*make_args())


@pytest.mark.parametrize("name,make_args", [
    (CAT, lambda: (f32(2, 5), ints(2, device="meta"))),
    (BERN, lambda: (f32(2, 3), ints(2, 3, device="meta").float())),
    (POST, lambda: (f32(2, 3), f32(2, 3), f32(2, 3, device="meta"), None, None, -7.0, 2.0)),
], ids=[CAT, BERN, POST])
def test_raw_op_device_mismatch(name, make_args):
    with pytest.raises(ValueError, match="is on"):
        getattr(RAW, name)(*make_args())


@pytest.mark.cuda
@pytest.mark.parametrize("inplace", [False, True])
def test_raw_categorical_backward_refuses_a_host_lse_for_cuda_logits(inplace):
    logits = torch.randn(2, 3, 5, device="cuda")
    x = torch.randint(0, 5, (2, 3), device="cuda")
    op = RAW.categorical_log_likelihood_backward_ if inplace else RAW.categorical_log_likelihood_backward
    with pytest.raises(ValueError, match="lse is on cpu"):
        op(torch.ones(2, device="cuda"), logits, x, torch.zeros(2, 3, 2))


def test_raw_categorical_returns_logsumexp():
    args, _ = Case(CAT, (2, 3, 17), "transposed", x_dtype=torch.int64).build(torch.float64, "cpu")
    ll, lse = RAW.categorical_log_likelihood(*args)
    assert lse.shape == args[1].shape + (2,)
    assert_close(lse[..., 0], args[0].amax(-1), rtol=0, atol=0)  # the max, and the log of the sum beside it
    assert_close(lse.sum(-1), torch.logsumexp(args[0], -1), **TOL[torch.float64])
    assert_close(ll, reference.categorical_log_likelihood(*args), **TOL[torch.float64])


def test_posterior_1d_inputs():
    check_vs_reference(Case(POST, (6,)), torch.float64, "cpu")


# ---- schemas, build info, determinism, fallback ----------------------------------------------------

@needs_extension
def test_schemas_match_cpp():
    """ops.SCHEMAS, the fallback's copy, matches every op with a compiled (CPU) kernel."""
    compiled = {str(s).removeprefix("hvae_fast::") for s in torch._C._jit_get_all_schemas()
                if s.name.startswith("hvae_fast::") and torch._C._dispatch_has_kernel_for_dispatch_key(s.name, "CPU")}
    assert compiled == set(ops.SCHEMAS.values())
    for name, schema in ops.SCHEMAS.items():
        assert str(getattr(RAW, name).default._schema) == "hvae_fast::" + schema


def test_build_info():
    info = hvae_fast.build_info()
    assert info["loaded"] is hvae_fast.extension_available()
    assert (info["why_not_loaded"] is None) is info["loaded"]
    if info["loaded"]:
        assert info["torch_version"] == torch.__version__


DETERMINISM_CASES = [Case(POST, (4, 20000), prior=True), Case(CAT, (4, 256, 256), x_dtype=torch.int64),
                     Case(BERN, (4, 20000))]


def run_case(case, device):
    args, leaves = case.build(torch.float32, device)
    return outputs_and_grads(getattr(ops, case.op), args, leaves)


def assert_bit_identical(runs):
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run, strict=True))


@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=str)
def test_deterministic_across_calls(case, device):
    assert_bit_identical([run_case(case, device) for _ in range(3)])


@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=str)
def test_deterministic_across_thread_counts(case):
    before = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            runs.append(run_case(case, "cpu"))
    finally:
        torch.set_num_threads(before)
    assert_bit_identical(runs)


FALLBACK_SCRIPT = textwrap.dedent("""
    import sys, warnings
    if sys.argv[1] == "broken_build":
        sys.modules["hvae_fast._C"] = None  # makes `import hvae_fast._C` fail
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import hvae_fast
    import pytest, torch
    from test_ops import CAT, POST, BERN, Case, check_vs_reference
    from hvae_fast import ops

    assert not hvae_fast.extension_available()
    assert sys.argv[2] in hvae_fast.build_info()["why_not_loaded"], hvae_fast.build_info()
    assert "hvae_fast._C" not in sys.modules or sys.modules["hvae_fast._C"] is None
    assert any(w.category is RuntimeWarning and "reference" in str(w.message) for w in caught), caught
    for name, schema in ops.SCHEMAS.items():
        assert str(getattr(torch.ops.hvae_fast, name).default._schema) == "hvae_fast::" + schema
    for case in [Case(POST, (3, 5)), Case(POST, (2, 3, 4), "transposed", prior=True),
                 Case(CAT, (2, 3, 17), "sliced", x_dtype=torch.int32), Case(BERN, (3, 7), x_dtype=torch.bool)]:
        for dtype in (torch.float32, torch.float64):
            check_vs_reference(case, dtype, "cpu")
    with pytest.raises(IndexError, match="x holds"):
        ops.categorical_log_likelihood(torch.zeros(2, 3), torch.tensor([0, 3]))
    # ops called below autograd (the fused head's backward) and with tensor lists (the optimizer)
    from hvae_fast import reference
    from hvae_fast.optim import Adamax
    h, w = torch.randn(2, 4, requires_grad=True), torch.randn(15, 4, requires_grad=True)
    x = torch.randint(0, 5, (2, 3))
    grads = [torch.autograd.grad(f(h, w, None, x).sum(), (h, w))
             for f in (ops.linear_categorical_log_likelihood, reference.linear_categorical_log_likelihood)]
    torch.testing.assert_close(grads[0], grads[1])
    p = torch.nn.Parameter(torch.randn(3))
    (p ** 2).sum().backward()
    before = p.detach().clone()
    Adamax([p], lr=0.1).step()
    assert not torch.equal(p.detach(), before)
    print("FALLBACK OK")
""")


@pytest.mark.parametrize("how,env,reason", [
    ("env_switch", {"HVAE_FAST_DISABLE_EXTENSION": "1"}, "HVAE_FAST_DISABLE_EXTENSION=1"),
    ("broken_build", {}, "hvae_fast._C failed to load"),
])
def test_fallback_without_extension(how, env, reason):
    """In a fresh interpreter without the compiled kernels, the same torch.ops names run the reference."""
    base = {k: v for k, v in os.environ.items() if k != "HVAE_FAST_DISABLE_EXTENSION"}
    path = [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")]
    env = dict(base, **env, PYTHONPATH=os.pathsep.join(filter(None, path)))
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT, how, reason], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "FALLBACK OK" in proc.stdout, proc.stdout + proc.stderr


OP_MODULE_FIRST_SCRIPT = textwrap.dedent("""
    import importlib, types
    import torch
    import hvae_fast.ops.dmol_log_likelihood  # an op's module first, in a fresh interpreter
    import hvae_fast.ops.posterior_sample as bound
    from hvae_fast import ops

    # hvae_fast.ops.<op> stays the function that the op's module of the same name defines
    assert isinstance(bound, types.FunctionType), bound
    for name in ops.__all__:
        if name.islower():
            assert isinstance(getattr(ops, name), types.FunctionType), (name, getattr(ops, name))
    module = importlib.import_module("hvae_fast.ops.dmol_log_likelihood")
    assert isinstance(module, types.ModuleType) and module.dmol_log_likelihood is ops.dmol_log_likelihood
    ll = ops.dmol_log_likelihood(torch.zeros(2, 3, 2, 2, requires_grad=True), torch.zeros(2, 1, 2, 2, dtype=torch.long),
                                 num_mixtures=1)
    ll.sum().backward()
    print("IMPORTS OK")
""")


@pytest.mark.parametrize("env", [{}, {"HVAE_FAST_DISABLE_EXTENSION": "1"}], ids=["extension", "fallback"])
def test_importing_an_op_module_first(env):
    """`import hvae_fast.ops.<op>` alone registers every op once (a second registration of the
    fallback's schemas or kernels would raise) and leaves hvae_fast.ops.<op> the function."""
    base = {k: v for k, v in os.environ.items() if k != "HVAE_FAST_DISABLE_EXTENSION"}
    path = [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")]
    proc = subprocess.run([sys.executable, "-c", OP_MODULE_FIRST_SCRIPT],
                          env=dict(base, **env, PYTHONPATH=os.pathsep.join(filter(None, path))),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "IMPORTS OK" in proc.stdout, proc.stdout + proc.stderr
