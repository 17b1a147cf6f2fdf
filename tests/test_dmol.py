"""dmol_log_likelihood (the discretized logistic mixture) against hvae_fast.reference: values and
gradients on every device and CPU level, its exactness, gradcheck, opcheck, torch.compile, bad
inputs. CUDA cases run through the `device` fixture and the `cuda` mark (tests/conftest.py),
skipped without a GPU."""
import math
from decimal import Decimal, getcontext

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import hvae_fast
from hvae_fast import _checks, ops, reference

RAW = torch.ops.hvae_fast
FLOATS = [torch.float32, torch.float64]
TOL = {torch.float32: {"rtol": 2e-5, "atol": 2e-4}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}
needs_extension = pytest.mark.skipif(not hvae_fast.extension_available(), reason="hvae_fast._C is not loaded")
LEVELS = hvae_fast.build_info().get("cpu_levels_supported", []) if hvae_fast.extension_available() else []


def dtype_id(d):
    return str(d).removeprefix("torch.")


def make(B, C, H, W, M, *, dtype=torch.float64, device="cpu", K=256, x_dtype=torch.int64, seed=0,
         log_scale=(-4.0, 0.0), spread=1.0):
    """params [B, P, H, W] (log-scales uniform in `log_scale`, means about the data) and x [B, C, H, W]
    with every bin kind: x = 0, K - 1 and interior values."""
    gen = torch.Generator().manual_seed(seed)
    P = _checks.dmol_channels(M, C)
    params = torch.randn(B, P, H, W, generator=gen, dtype=torch.float64) * spread
    lo, hi = log_scale
    ls = slice(M + C * M, M + 2 * C * M)
    params[:, ls] = torch.rand(B, C * M, H, W, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    x = torch.randint(0, K, (B, C, H, W), generator=gen)
    x.view(-1)[::5] = 0
    x.view(-1)[1::7] = K - 1
    return params.to(device=device, dtype=dtype), x.to(device=device, dtype=x_dtype)


def value_and_grad(fn, params, x, **kw):
    p = params.detach().clone().requires_grad_()
    ll = fn(p, x, **kw)
    g = torch.randn(ll.shape, generator=torch.Generator().manual_seed(7), dtype=ll.dtype).to(ll.device)
    (grad,) = torch.autograd.grad(ll, p, g)
    return ll.detach(), grad


SHAPES = [  # (B, C, H, W, M)
    (2, 1, 3, 5, 1), (3, 1, 7, 9, 4), (2, 2, 5, 3, 2), (1, 2, 9, 11, 7), (2, 3, 5, 7, 10), (3, 3, 1, 3, 5),
    (2, 4, 3, 5, 3), (1, 4, 7, 3, 9), (2, 3, 11, 13, 6),
]


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}H{}W{}M{}".format(*s))
def test_matches_reference(shape, dtype, device):
    B, C, H, W, M = shape
    params, x = make(B, C, H, W, M, dtype=dtype, device=device, x_dtype=torch.uint8 if M % 2 else torch.int64)
    got = value_and_grad(ops.dmol_log_likelihood, params, x, num_mixtures=M)
    want = value_and_grad(reference.dmol_log_likelihood, params, x, num_mixtures=M)
    assert got[0].dtype == dtype and got[0].shape == (B,)
    assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("K", [2, 3, 17])
def test_other_num_vals_and_clamp(K, device):
    params, x = make(2, 3, 5, 7, 3, K=K, device=device, log_scale=(-9.0, -5.0))  # the clamp at -7 is active
    kw = dict(num_mixtures=3, num_vals=K, min_log_scale=-7.0)
    assert_close(value_and_grad(ops.dmol_log_likelihood, params, x, **kw),
                 value_and_grad(reference.dmol_log_likelihood, params, x, **kw), **TOL[torch.float64])


def test_no_gradient_below_the_clamp(device):
    M, C = 2, 3
    params, x = make(2, C, 3, 5, M, device=device, log_scale=(-12.0, -8.0))
    _, grad = value_and_grad(ops.dmol_log_likelihood, params, x, num_mixtures=M, min_log_scale=-7.0)
    assert torch.all(grad[:, M + C * M:M + 2 * C * M] == 0)
    assert torch.any(grad[:, M:M + C * M] != 0)
    # the clamped log-scales act as -7 exactly
    clamped = params.clone()
    clamped[:, M + C * M:M + 2 * C * M] = -7.0
    assert_close(ops.dmol_log_likelihood(params, x, num_mixtures=M),
                 ops.dmol_log_likelihood(clamped, x, num_mixtures=M), rtol=0, atol=0)


def independent_log_prob(mean, log_scale, v, K):
    """log P(v) for one logistic from its CDF difference in 60-digit decimal arithmetic (no mixture,
    no coupling): the naive formula, made exact by precision instead of by rewriting."""
    getcontext().prec = 60
    x = Decimal(v) / (K - 1) * 2 - 1
    h = Decimal(1) / (K - 1)
    s = Decimal(log_scale).exp()
    cdf = lambda t: 1 / (1 + ((Decimal(mean) - t) / s).exp())  # noqa: E731
    sf = lambda t: 1 / (1 + ((t - Decimal(mean)) / s).exp())  # 1 - cdf(t), without cancellation  # noqa: E731
    if v == 0:
        p = cdf(x + h)
    elif v == K - 1:
        p = sf(x - h)
    elif x > Decimal(mean):  # both CDFs near 1: the difference of the tails
        p = sf(x - h) - sf(x + h)
    else:
        p = cdf(x + h) - cdf(x - h)
    return float(p.ln())


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
def test_edge_values_exact(dtype, device):
    """Edge bins, tiny and huge scales, the clamp, huge |mean|: finite, equal to the reference in float64,
    and to the CDF difference itself in 60-digit arithmetic."""
    K = 256
    cases = [(0.0, -3.0, 0), (0.0, -3.0, 255), (0.3, -7.0, 128), (0.3, -20.0, 166), (-0.2, 6.0, 17),
             (0.1, 12.0, 200), (1e4, -2.0, 0), (-1e4, -2.0, 255), (50.0, 0.0, 3), (-3.0, -5.0, 254),
             (0.999, -7.0, 255), (-1.0, -7.0, 0), (0.5, 2.0, 1)]
    n = len(cases)
    params = torch.zeros(1, 3, 1, n, dtype=torch.float64)  # C = 1, M = 1: logit, mean, log-scale
    x = torch.zeros(1, 1, 1, n, dtype=torch.int64)
    for i, (mean, ls, v) in enumerate(cases):
        params[0, 1, 0, i], params[0, 2, 0, i], x[0, 0, 0, i] = mean, ls, v
    params, x = params.to(device=device, dtype=dtype), x.to(device)
    # one pixel per call, so that each value is seen alone
    got = torch.stack([ops.dmol_log_likelihood(params[..., i:i + 1], x[..., i:i + 1], num_mixtures=1)
                       for i in range(n)]).squeeze(1)
    assert torch.isfinite(got).all(), got
    ref = torch.stack([reference.dmol_log_likelihood(params[..., i:i + 1].double(), x[..., i:i + 1], num_mixtures=1)
                       for i in range(n)]).squeeze(1)
    assert_close(got.double(), ref, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-5)
    for i, (mean, ls, v) in enumerate(cases):
        mean, ls = params[0, 1, 0, i].item(), params[0, 2, 0, i].item()  # as rounded to dtype
        exact = independent_log_prob(mean, max(ls, -7.0), v, K)
        assert math.isclose(ref[i].item(), exact, rel_tol=1e-9, abs_tol=1e-9), (cases[i], ref[i].item(), exact)
    _, grad = value_and_grad(ops.dmol_log_likelihood, params, x, num_mixtures=1)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("K", [2, 5, 256])
def test_sums_to_one_over_the_values(K, device):
    """exp(log p(v0, v1)) over every pair of values sums to 1: C = 2 with coupling, M = 3, scales from
    tiny (clamped) to huge."""
    M, C, pixels = 3, 2, 4
    params = torch.randn(1, _checks.dmol_channels(M, C), 1, pixels, dtype=torch.float64) * 2
    params[0, M + C * M:M + 2 * C * M] = torch.tensor([-9.0, -6.0, 0.5, 8.0], dtype=torch.float64)
    x = torch.cartesian_prod(torch.arange(K), torch.arange(K)).view(K * K, C, 1, 1)
    for j in range(pixels):
        p = params[..., j:j + 1].expand(K * K, -1, -1, -1)
        ll = ops.dmol_log_likelihood(p.to(device), x.to(device), num_mixtures=M, num_vals=K).cpu()
        assert_close(torch.logsumexp(ll, 0), torch.tensor(0.0, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 1, 3, 3, 1), (1, 2, 3, 1, 2), (2, 3, 1, 3, 3), (1, 4, 3, 3, 2)],
                         ids=lambda s: "B{}C{}H{}W{}M{}".format(*s))
def test_gradcheck(shape):
    B, C, H, W, M = shape
    params, x = make(B, C, H, W, M, K=8, log_scale=(-3.0, 0.5))
    params.requires_grad_()
    assert torch.autograd.gradcheck(lambda p: ops.dmol_log_likelihood(p, x, num_mixtures=M, num_vals=8), (params,))


@needs_extension
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("x_dtype", [torch.uint8, torch.int64, torch.int32], ids=dtype_id)
def test_opcheck_forward(x_dtype, requires_grad):
    params, x = make(2, 3, 3, 5, 2, x_dtype=x_dtype)
    params.requires_grad_(requires_grad)
    result = torch.library.opcheck(RAW.dmol_log_likelihood.default, (params, x, 2, 256, -7.0))
    assert set(result.values()) == {"SUCCESS"}, result


@needs_extension
def test_opcheck_backward():
    params, x = make(2, 2, 3, 5, 3)
    result = torch.library.opcheck(RAW.dmol_log_likelihood_backward.default,
                                   (torch.randn(2, dtype=torch.float64), params, x, 3, 256, -7.0))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph():
    params, x = make(2, 3, 5, 7, 4, dtype=torch.float32, x_dtype=torch.uint8)

    def step(p, x):
        return -ops.dmol_log_likelihood(p * 1.5, x, num_mixtures=4).mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    got = value_and_grad(lambda p, x: compiled(p, x).reshape(1), params, x)
    want = value_and_grad(lambda p, x: step(p, x).reshape(1), params, x)
    assert_close(got, want, **TOL[torch.float32])


def test_deterministic_across_thread_counts_and_calls():
    params, x = make(3, 3, 40, 40, 5, dtype=torch.float32)  # several chunks per example
    before = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            runs.append(value_and_grad(ops.dmol_log_likelihood, params, x, num_mixtures=5))
    finally:
        torch.set_num_threads(before)
    for r in runs[1:]:
        assert torch.equal(r[0], runs[0][0]) and torch.equal(r[1], runs[0][1])


def test_autocast_runs_in_float32():
    params, x = make(2, 3, 3, 5, 2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ll = ops.dmol_log_likelihood(params.bfloat16(), x, num_mixtures=2)
    assert ll.dtype == torch.float32


# ---- bad inputs -------------------------------------------------------------------------------

def bad_cases():
    p, x = make(2, 3, 4, 5, 2, dtype=torch.float32)
    yield "channels", p[:, :-1], x, {}, ValueError, r"params has 19 channels, but num_mixtures = 2 and C = 3"
    yield "mixtures", p, x, {"num_mixtures": 3}, ValueError, r"need M \* \(1 \+ 2C \+ C\(C-1\)/2\) = 30"
    yield "zero_mixtures", p, x, {"num_mixtures": 0}, ValueError, "num_mixtures must be at least 1"
    yield "num_vals", p, x, {"num_vals": 1}, ValueError, "num_vals must be in 2"
    yield "batch", p, x[:1], {}, ValueError, r"x must be \[B, C, H, W\]"
    yield "height", p, x[:, :, :3], {}, ValueError, r"x must be \[B, C, H, W\]"
    yield "x_3d", p, x[:, 0], {}, ValueError, r"x must be \[B, C, H, W\]"
    yield "params_3d", p[:, :, 0], x, {}, ValueError, r"params must be \[B, P, H, W\]"
    yield "float_x", p, x.float(), {}, TypeError, "x must be an integer tensor"
    yield "bool_x", p, x.bool(), {}, TypeError, "x must be an integer tensor"
    yield "int_params", p.long(), x, {}, TypeError, "params must be a floating-point tensor"
    yield "empty_batch", p[:0], x[:0], {}, ValueError, "params must have a non-empty batch"


@pytest.mark.parametrize("impl", ["ops", "reference", "raw"])
@pytest.mark.parametrize("name,params,x,kw,exc,match", list(bad_cases()), ids=lambda v: v if isinstance(v, str)
                         and v.isidentifier() else "")
def test_bad_inputs_raise(impl, name, params, x, kw, exc, match):
    kw = {"num_mixtures": 2, **kw}
    if impl == "raw":
        if not hvae_fast.extension_available():
            pytest.skip("the raw op's checks are the compiled kernels'")
        with pytest.raises(exc, match=match):
            RAW.dmol_log_likelihood(params, x, kw["num_mixtures"], kw.get("num_vals", 256), -7.0)
        return
    fn = ops.dmol_log_likelihood if impl == "ops" else reference.dmol_log_likelihood
    with pytest.raises(exc, match=match):
        fn(params, x, **kw)


@pytest.mark.parametrize("impl", ["ops", "reference", "backward"])
@pytest.mark.parametrize("value,x_dtype,K", [(256, torch.int64, 256), (-1, torch.int64, 256),
                                             (200, torch.uint8, 100), (17, torch.int32, 17)])
def test_pixel_value_out_of_range_raises(impl, value, x_dtype, K):
    params, x = make(2, 3, 4, 5, 2, dtype=torch.float32, K=min(K, 256))
    x = x % K
    x[1, 2, 3, 1] = value
    x = x.to(x_dtype)
    match = rf"x holds {value} at \[1, 2, 3, 1\], which is not a pixel value in 0..{K - 1}"
    with pytest.raises(ValueError, match=match):
        if impl == "backward":
            RAW.dmol_log_likelihood_backward(torch.ones(2), params, x, 2, K, -7.0)
        else:
            getattr(hvae_fast, impl if impl == "reference" else "ops").dmol_log_likelihood(
                params, x, num_mixtures=2, num_vals=K)


def test_bad_grad_raises():
    params, x = make(2, 1, 3, 3, 1, dtype=torch.float32)
    if not hvae_fast.extension_available():
        pytest.skip("the raw op's checks are the compiled kernels'")
    with pytest.raises(ValueError, match=r"grad must have shape \[2\]"):
        RAW.dmol_log_likelihood_backward(torch.ones(3), params, x, 1, 256, -7.0)


# ---- every CPU level ---------------------------------------------------------------------------

@pytest.fixture(params=LEVELS)
def level(request):
    previous = hvae_fast.set_cpu_level(request.param)
    yield request.param
    hvae_fast.set_cpu_level(previous)


LEVEL_SHAPES = [(2, 1, 5, 7, 3), (2, 3, 5, 7, 10), (2, 4, 3, 11, 2), (1, 3, 17, 19, 5)]  # tails and whole vectors


@needs_extension
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("shape", LEVEL_SHAPES, ids=lambda s: "B{}C{}H{}W{}M{}".format(*s))
def test_every_cpu_level_matches_the_reference(level, shape, dtype):
    B, C, H, W, M = shape
    params, x = make(B, C, H, W, M, dtype=dtype, log_scale=(-9.0, 3.0), spread=2.0)
    grad = torch.randn(B, dtype=dtype)
    ll = RAW.dmol_log_likelihood(params, x, M, 256, -7.0)
    g = RAW.dmol_log_likelihood_backward(grad, params, x, M, 256, -7.0)
    assert_close(ll, reference.dmol_log_likelihood(params, x, num_mixtures=M), **TOL[dtype])
    assert_close(g, reference.dmol_log_likelihood_backward(grad, params, x, num_mixtures=M), **TOL[dtype])


EDGE_CASES = [(0.0, -3.0, 0), (0.0, -3.0, 255), (0.3, -7.0, 128), (0.3, -20.0, 166), (-0.2, 6.0, 17),
              (0.1, 12.0, 200), (1e4, -2.0, 0), (-1e4, -2.0, 255), (50.0, 0.0, 3), (-3.0, -5.0, 254),
              (0.999, -7.0, 255), (-1.0, -7.0, 0), (0.5, 2.0, 1), (0.0, 30.0, 100), (2.0, 60.0, 7)]


@needs_extension
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
def test_edge_values_in_simd_lanes(level, dtype):
    """test_edge_values_exact's cases (and larger scales) through the SIMD lanes of every level: each
    case is one example of 37 identical pixels (whole vectors and a tail), so ll / 37 is its
    log-probability; against the float64 reference of one pixel, and finite gradients equal to the
    reference's in the same dtype."""
    n, W = len(EDGE_CASES), 37
    params = torch.zeros(n, 3, 1, W, dtype=torch.float64)  # C = 1, M = 1: logit, mean, log-scale
    x = torch.zeros(n, 1, 1, W, dtype=torch.int64)
    for i, (mean, ls, v) in enumerate(EDGE_CASES):
        params[i, 1], params[i, 2], x[i] = mean, ls, v
    params = params.to(dtype)
    ll = RAW.dmol_log_likelihood(params, x, 1, 256, -7.0)
    assert torch.isfinite(ll).all(), ll
    ref = reference.dmol_log_likelihood(params[..., :1].double(), x[..., :1], num_mixtures=1)
    assert_close(ll.double() / W, ref, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-5)
    grad = torch.linspace(-1.0, 1.0, n, dtype=dtype)
    g = RAW.dmol_log_likelihood_backward(grad, params, x, 1, 256, -7.0)
    assert torch.isfinite(g).all()
    assert_close(g, reference.dmol_log_likelihood_backward(grad, params, x, num_mixtures=1), **TOL[dtype])


@needs_extension
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
def test_cpu_levels_agree_and_are_bit_identical_across_threads(dtype):
    params, x = make(2, 3, 33, 37, 4, dtype=dtype)
    grad = torch.randn(2, dtype=dtype)

    def run():
        return [RAW.dmol_log_likelihood(params, x, 4, 256, -7.0),
                RAW.dmol_log_likelihood_backward(grad, params, x, 4, 256, -7.0)]

    before_level, before_threads = hvae_fast.cpu_level(), torch.get_num_threads()
    results = {}
    try:
        for name in LEVELS:
            hvae_fast.set_cpu_level(name)
            torch.set_num_threads(1)
            one = run()
            torch.set_num_threads(2)
            two = run()
            assert all(torch.equal(a, b) for a, b in zip(one, two)), name
            results[name] = one
    finally:
        hvae_fast.set_cpu_level(before_level)
        torch.set_num_threads(before_threads)
    for name, got in results.items():
        assert_close(got, results["generic"], **TOL[dtype])


# ---- CUDA: half precision and determinism (skipped without a GPU) ----------------------------

LOW_TOL = {torch.float16: {"rtol": 1e-2, "atol": 5e-2}, torch.bfloat16: {"rtol": 3e-2, "atol": 2e-1}}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 4), (2, 1, 33, 35, 10)], ids=lambda s: "B{}C{}H{}W{}M{}".format(*s))
def test_cuda_low_precision_vs_float32_reference(shape, dtype):
    B, C, H, W, M = shape
    params, x = make(B, C, H, W, M, dtype=dtype, device="cuda")
    ll, grad = value_and_grad(ops.dmol_log_likelihood, params, x, num_mixtures=M)
    assert ll.dtype == dtype and grad.dtype == dtype
    want = value_and_grad(reference.dmol_log_likelihood, params.float(), x, num_mixtures=M)
    # the per-example sum is float32-accumulated; compare it relative to its size
    assert_close(ll.float(), want[0], rtol=LOW_TOL[dtype]["rtol"], atol=LOW_TOL[dtype]["atol"] * H * W)
    assert_close(grad.float(), want[1], **LOW_TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_cuda_deterministic(dtype):
    params, x = make(3, 3, 70, 70, 5, dtype=dtype, device="cuda")  # rows of several row_sum chunks
    runs = [value_and_grad(ops.dmol_log_likelihood, params, x, num_mixtures=5) for _ in range(3)]
    for r in runs[1:]:
        assert torch.equal(r[0], runs[0][0]) and torch.equal(r[1], runs[0][1])


@pytest.mark.cuda
def test_cuda_matches_cpu():
    params, x = make(2, 3, 9, 11, 6, dtype=torch.float64)
    cpu = value_and_grad(ops.dmol_log_likelihood, params, x, num_mixtures=6)
    gpu = value_and_grad(ops.dmol_log_likelihood, params.cuda(), x.cuda(), num_mixtures=6)
    assert_close([t.cpu() for t in gpu], cpu, **TOL[torch.float64])


# ---- sampling and the mean (pure PyTorch) -----------------------------------------------------

def all_values(K, C):
    """Every x of C channels in 0..K-1: [K^C, C, 1, 1]."""
    grids = torch.cartesian_prod(*[torch.arange(K)] * C) if C > 1 else torch.arange(K).unsqueeze(1)
    return grids.view(-1, C, 1, 1)


@pytest.mark.parametrize("C,K,temperature", [(1, 6, 1.0), (2, 4, 1.0), (2, 4, 0.6), (3, 3, 1.3)])
def test_samples_follow_the_likelihood(C, K, temperature):
    """The empirical joint of many draws at one pixel matches exp(dmol_log_likelihood) (temperature
    t: the likelihood of the params with log-scales + log t)."""
    M, N = 3, 40000
    gen = torch.Generator().manual_seed(1)
    params = torch.randn(1, _checks.dmol_channels(M, C), 1, 1, generator=gen, dtype=torch.float64)
    params[:, M + C * M:M + 2 * C * M] = torch.rand(1, C * M, 1, 1, generator=gen, dtype=torch.float64) - 1.5
    x = ops.dmol_sample(params.expand(N, -1, -1, -1), num_mixtures=M, channels=C, num_vals=K,
                        temperature=temperature, generator=gen)
    assert x.shape == (N, C, 1, 1) and x.dtype == torch.int64 and x.min() >= 0 and x.max() < K
    hot = params.clone()
    hot[:, M + C * M:M + 2 * C * M] += math.log(temperature)
    values = all_values(K, C)
    prob = torch.exp(ops.dmol_log_likelihood(hot.expand(values.shape[0], -1, -1, -1), values, num_mixtures=M,
                                             num_vals=K))
    index = (x.view(N, C) * (K ** torch.arange(C - 1, -1, -1))).sum(1)
    freq = torch.bincount(index, minlength=K ** C).double() / N
    assert_close(freq, prob, rtol=0, atol=0.012)


def test_sample_at_temperature_zero_is_the_rounded_mean():
    M, C, K = 1, 2, 256
    params = torch.zeros(2, _checks.dmol_channels(M, C), 3, 5)
    params[:, 1] = 0.3   # mean of channel 0
    params[:, 2] = -0.5  # mean of channel 1
    params[:, 5] = 2.0   # coupling (1, 0): tanh(2) * x0
    x = ops.dmol_sample(params, num_mixtures=M, channels=C, temperature=0.0)
    v0 = round((0.3 + 1) / 2 * 255)
    x0 = v0 / 255 * 2 - 1
    v1 = round((-0.5 + math.tanh(2.0) * x0 + 1) / 2 * 255)
    assert torch.all(x[:, 0] == v0) and torch.all(x[:, 1] == v1)


@pytest.mark.parametrize("K", [5, 256])
def test_mean_is_the_expected_value(K):
    """Exact for one channel, and for several without coupling: sum over v of v p(v)."""
    M, C = 4, 2
    params = torch.randn(3, _checks.dmol_channels(M, C), 1, 1, dtype=torch.float64)
    params[:, M + 2 * C * M:] = 0.0  # coefficients: tanh(0) = 0, no coupling
    mean = ops.dmol_mean(params, num_mixtures=M, channels=C, num_vals=K)
    assert mean.shape == (3, C, 1, 1)
    # channel c alone: its own single-channel mixture, params reordered to the C = 1 layout
    for c in range(C):
        single = torch.cat([params[:, :M], params[:, M + c * M:M + (c + 1) * M],
                            params[:, M + C * M + c * M:M + C * M + (c + 1) * M]], 1)
        values = all_values(K, 1)
        for b in range(3):
            p = torch.exp(ops.dmol_log_likelihood(single[b:b + 1].expand(K, -1, -1, -1), values, num_mixtures=M,
                                                  num_vals=K))
            assert_close(mean[b, c, 0, 0], (p * torch.arange(K)).sum(), rtol=1e-9, atol=1e-9)
