"""The CPU kernels at every instruction-set level this machine runs (csrc/cpu/kernels.h):
each level against the reference, the levels against each other, bit-identity across
thread counts within a level, HVAE_FAST_CPU, and no vector instruction outside the code
of the level it belongs to."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import hvae_fast
from hvae_fast import reference

RAW = torch.ops.hvae_fast
INFO = hvae_fast.build_info()
LEVELS = INFO["cpu_levels_supported"]
pytestmark = pytest.mark.skipif(not hvae_fast.extension_available(), reason="hvae_fast._C is not loaded")
# exp_u20 in the SIMD softmax terms is within ~2e-6 relative; sums over a row add ulps
TOL = {torch.float32: {"rtol": 2e-5, "atol": 2e-5}, torch.float64: {"rtol": 1e-11, "atol": 1e-11}}
FLOATS = [torch.float32, torch.float64]


@pytest.fixture(params=LEVELS)
def level(request):
    previous = hvae_fast.set_cpu_level(request.param)
    assert hvae_fast.cpu_level() == request.param
    yield request.param
    hvae_fast.set_cpu_level(previous)


def at_level(name, fn):
    previous = hvae_fast.set_cpu_level(name)
    try:
        return fn()
    finally:
        hvae_fast.set_cpu_level(previous)


# ---- every kernel: (inputs) -> list of outputs, and what the reference says -------------------
# Sizes cut the SIMD loops at every place: whole vectors, 4-vector unrolls, scalar tails.

def categorical(dtype, K, B=3, D=11):
    logits = torch.randn(B, D, K, dtype=dtype) * 3
    x = torch.randint(0, K, (B, D))
    grad = torch.randn(B, dtype=dtype)
    run, _ = categorical_run(logits, x, grad)
    ll = reference.categorical_log_likelihood(logits, x)
    g = reference.categorical_log_likelihood_backward(grad, logits, x)
    return run, [ll, row_lse(logits), g, g]


def row_lse(logits):
    return torch.logsumexp(logits, -1)  # what the saved (max, log sum) add up to


def categorical_run(logits, x, grad):
    def run():
        ll, lse = RAW.categorical_log_likelihood(logits, x)
        g = RAW.categorical_log_likelihood_backward(grad, logits, x, lse)
        inplace = logits.clone()
        RAW.categorical_log_likelihood_backward_(grad, inplace, x, lse)
        finite_rows = ~logits.isnan().any(-1)  # a NaN row's max is unspecified, its log-sum NaN
        assert torch.equal(lse[..., 0][finite_rows], logits.amax(-1)[finite_rows])  # the split: max, then log-sum
        return [ll, lse.sum(-1), g, inplace]

    return run, None


def categorical_edges(dtype, K=37):
    """Rows whose softmax terms reach exp's edges: -inf logits, exact ties, terms down in the
    denormals and below, a NaN; the SIMD exps must give what the reference does."""
    logits = torch.randn(2, 6, K, dtype=dtype)
    logits[0, 0, ::3] = -float("inf")
    logits[0, 1] = 0.5
    logits[0, 2] = torch.linspace(-110, 0, K, dtype=dtype)
    logits[0, 3] = torch.linspace(-0.01, 0.01, K, dtype=dtype) * 1e-3
    logits[0, 4, 5] = float("nan")
    logits[1, 5] = torch.linspace(-30, 80, K, dtype=dtype)
    x = torch.randint(0, K, (2, 6))
    x[0, 0] = 1  # a finite logit
    grad = torch.randn(2, dtype=dtype)
    run, _ = categorical_run(logits, x, grad)
    ll = reference.categorical_log_likelihood(logits, x)
    g = reference.categorical_log_likelihood_backward(grad, logits, x)
    return run, [ll, row_lse(logits), g, g]


def bernoulli(dtype, D):
    logits = torch.randn(4, D, dtype=dtype) * 4
    x = torch.randint(0, 2, (4, D)).to(dtype)
    grad = torch.randn(4, dtype=dtype)

    def run():
        return [RAW.bernoulli_log_likelihood(logits, x), RAW.bernoulli_log_likelihood_backward(grad, logits, x)]

    return run, [reference.bernoulli_log_likelihood(logits, x), reference.bernoulli_log_likelihood_backward(grad, logits, x)]


def posterior(dtype, M, prior):
    t = [torch.randn(5, M, dtype=dtype) for _ in range(5)]
    dmu, dlv, eps, mu_p, lv_p = t[0], t[1] * 4, t[2], t[3], t[4]  # dlv crosses the clamp
    if not prior:
        mu_p = lv_p = None
    gz, gkl = torch.randn(5, M, dtype=dtype), torch.randn(5, dtype=dtype)

    def run():
        z, kl = RAW.posterior_sample(dmu, dlv, eps, mu_p, lv_p, -7.0, 2.0)
        grads = RAW.posterior_sample_backward(gz, gkl, dmu, dlv, eps, lv_p, -7.0, 2.0, True)
        return [z, kl] + [g for g in grads if g.numel()]

    z, kl = reference.posterior_sample(dmu, dlv, eps, mu_p, lv_p)
    grads = reference.posterior_sample_backward(gz, gkl, dmu, dlv, eps, lv_p)
    return run, [z, kl] + [g for g in grads if g is not None]


def philox(dtype, M, prior):
    t = [torch.randn(3, M, dtype=dtype) for _ in range(4)]
    dmu, dlv, mu_p, lv_p = t
    if not prior:
        mu_p = lv_p = None
    gz, gkl = torch.randn(3, M, dtype=dtype), torch.randn(3, dtype=dtype)
    seed = torch.tensor(12345)  # the raw ops' seed: a 0-dim int64 CPU tensor

    def run():
        z, kl = RAW.posterior_sample_philox(dmu, dlv, mu_p, lv_p, seed, -7.0, 2.0)
        grads = RAW.posterior_sample_philox_backward(gz, gkl, dmu, dlv, lv_p, seed, -7.0, 2.0)
        return [z, kl] + [g for g in grads if g.numel()]

    eps = reference.philox_normal(dmu.shape, seed, dtype=dtype)
    z, kl = reference.posterior_sample(dmu, dlv, eps, mu_p, lv_p)
    g_dmu, g_dlv, _, g_lvp = reference.posterior_sample_backward(gz, gkl, dmu, dlv, eps, lv_p)
    return run, [z, kl, g_dmu, g_dlv] + ([g_lvp] if prior else [])


def adamax(dtype, n):
    params = [torch.randn(n, dtype=dtype), torch.randn(3, n + 1, dtype=dtype)]
    grads = [torch.randn_like(p) for p in params]
    avgs = [torch.randn_like(p) for p in params]
    infs = [torch.rand_like(p) for p in params]
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)

    def step(fn):
        state = [[t.clone() for t in ts] for ts in (params, avgs, infs)]
        fn(state[0], grads, state[1], state[2], [-1e-3, -2e-3], **kw)
        return [t for ts in state for t in ts]

    def run():
        return step(lambda p, g, m, u, v, **k: RAW.adamax_(p, g, m, u, v, k["beta1"], k["beta2"], k["eps"],
                                                            k["weight_decay"]))

    return run, step(reference.adamax_)


CASES = {
    "categorical-K2": lambda d: categorical(d, 2),
    "categorical-K7": lambda d: categorical(d, 7),
    "categorical-K17": lambda d: categorical(d, 17),
    "categorical-K64": lambda d: categorical(d, 64),
    "categorical-K257": lambda d: categorical(d, 257),
    "categorical-edges": categorical_edges,
    "bernoulli-D37": lambda d: bernoulli(d, 37),
    "posterior-top-M4099": lambda d: posterior(d, 4099, False),
    "posterior-prior-M37": lambda d: posterior(d, 37, True),
    "philox-top-M131": lambda d: philox(d, 131, False),
    "philox-prior-M4099": lambda d: philox(d, 4099, True),
    "adamax-n45": lambda d: adamax(d, 45),
}


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_the_reference_at_every_level(level, case, dtype):
    run, expected = CASES[case](dtype)
    got = run()
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and g.shape == e.shape, (i, g.shape, e.shape)
        assert_close(g, e, **TOL[dtype], equal_nan=True, msg=lambda m: f"{case} output {i} at {level}: {m}")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_levels_agree(case, dtype):
    run, _ = CASES[case](dtype)
    results = {name: at_level(name, run) for name in LEVELS}
    for name, got in results.items():
        for i, (g, e) in enumerate(zip(got, results["generic"])):
            assert_close(g, e, **TOL[dtype], equal_nan=True, msg=lambda m: f"{case} output {i}, {name} vs generic: {m}")


def big_cases():
    """Sizes that at::parallel_for splits over 2 threads."""
    yield "categorical", categorical(torch.float32, 33, B=64, D=200)[0]
    yield "posterior", posterior(torch.float32, 40000, True)[0]
    yield "philox", philox(torch.float32, 40000, True)[0]
    yield "bernoulli", bernoulli(torch.float32, 60000)[0]


def test_bit_identical_across_thread_counts_within_a_level(level):
    n = torch.get_num_threads()
    try:
        for name, run in big_cases():
            torch.set_num_threads(1)
            one = run()
            torch.set_num_threads(2)
            two = run()
            for i, (a, b) in enumerate(zip(one, two)):
                assert torch.equal(a, b), f"{name} output {i} at {level}: 1 and 2 threads differ"
    finally:
        torch.set_num_threads(n)


def test_the_best_supported_level_is_chosen_by_default():
    if os.environ.get("HVAE_FAST_CPU", "auto") in ("", "auto"):
        assert hvae_fast.cpu_level() == LEVELS[-1]
    assert INFO["cpu_level"] in INFO["cpu_levels"]
    cpu = torch.backends.cpu.get_cpu_capability()  # what ATen itself runs here
    if cpu in ("AVX2", "AVX512") and "avx2" in INFO["cpu_levels"]:
        assert "avx2" in LEVELS
    if cpu == "AVX512" and "avx512" in INFO["cpu_levels"]:
        assert "avx512" in LEVELS


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("name", LEVELS)
def test_the_environment_forces_a_level(name):
    r = run_python("import hvae_fast; print(hvae_fast.cpu_level(), hvae_fast.build_info()['cpu_level'])",
                   HVAE_FAST_CPU=name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [name, name]


def test_an_unknown_level_is_refused_clearly():
    r = run_python("import hvae_fast", HVAE_FAST_CPU="sse9")
    assert r.returncode != 0
    assert "HVAE_FAST_CPU=sse9" in r.stderr and "unknown CPU level sse9" in r.stderr
    with pytest.raises(ValueError, match="unknown CPU level"):
        hvae_fast.set_cpu_level("sse9")
    assert hvae_fast.cpu_level() in LEVELS


@pytest.mark.skipif(set(INFO["cpu_levels"]) == set(LEVELS), reason="this CPU runs every level built")
def test_a_level_the_cpu_lacks_is_refused_clearly():
    missing = [name for name in INFO["cpu_levels"] if name not in LEVELS][0]
    with pytest.raises(ValueError, match="needs instructions this CPU lacks"):
        hvae_fast.set_cpu_level(missing)
    r = run_python("import hvae_fast", HVAE_FAST_CPU=missing)
    assert r.returncode != 0 and "needs instructions this CPU lacks" in r.stderr


# ---- no instruction of a level outside its own code ---------------------------------------------
# A wheel built here must run on a CPU without AVX-512 (or AVX2). The per-level sources put
# their SIMD code in hvae_fast::cpu::<level>; an inline function of a shared header compiled
# with a level's features would be a copy the linker may pick for every caller.

# A level's code: its kernels (hvae_fast::cpu::<level>), its copies of the formulas
# (hvae_fast::<level>::math, out of line in unoptimised builds) and ATen's vectors at
# that capability (at::vec::<CAPABILITY>).
LEVEL_NAMESPACES = {"avx2": ("hvae_fast::cpu::avx2::", "hvae_fast::avx2::", "at::vec::AVX2::"),
                    "avx512": ("hvae_fast::cpu::avx512::", "hvae_fast::avx512::", "at::vec::AVX512::")}


@pytest.mark.skipif(shutil.which("objdump") is None or not sys.platform.startswith("linux"),
                    reason="needs objdump (binutils)")
def test_vector_instructions_stay_in_their_level():
    module = Path(hvae_fast._C.__file__)
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(module)], capture_output=True,
                         text=True, check=True).stdout
    function, found, leaks = None, {"avx2": 0, "avx512": 0}, []
    for line in asm.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            function = head.group(1)
            continue
        parts = line.split("\t")
        if function is None or len(parts) < 2:
            continue
        insn = " ".join(parts[1:]).strip()
        level = next((n for n in ("avx512", "avx2") if any(ns in function for ns in LEVEL_NAMESPACES[n])), None)
        avx512 = bool(re.search(r"%zmm|%k[0-7]\b|\{%k", insn))
        avx = avx512 or bool(re.search(r"%ymm", insn)) or insn.startswith("v")
        if level is not None and avx:
            found[level] += 1
        if (level is None and avx) or (level == "avx2" and avx512):
            leaks.append(f"{function[:120]}: {insn}")
    assert not leaks, f"{len(leaks)} instructions outside their level, e.g. " + "\n".join(leaks[:5])
    for name in found:  # the check sees the levels' code at all
        if name in INFO["cpu_levels"]:
            assert found[name] > 1000, found


@pytest.mark.skipif(len([n for n in LEVELS if n != "generic"]) < 2, reason="needs two SIMD levels")
def test_simd_levels_draw_the_same_noise_bit_for_bit():
    # the AVX2 and AVX-512 noise run one body (math::box_muller_simd) at two widths
    dmu = torch.zeros(3, 4099)
    simd = [n for n in LEVELS if n != "generic"]
    noise = [at_level(n, lambda: RAW.posterior_sample_philox(dmu, dmu, None, None, torch.tensor(99), -7.0, 2.0)[0]) for n in simd]
    assert all(torch.equal(noise[0], other) for other in noise[1:])
    assert_close(noise[0], reference.philox_normal(dmu.shape, 99), rtol=0, atol=1e-5)
