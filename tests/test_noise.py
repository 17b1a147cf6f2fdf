"""posterior_sample with eps=None: the noise drawn in the kernel (Philox4x32-10 and
Box-Muller, specified by hvae_fast.reference.philox_normal) and drawn again in the backward."""
import pytest
import torch

from hvae_fast import ops, reference
from test_ops import (DENSE_SHAPES, FLOATS, POST, RAW, TOL, Case, assert_all_close, assert_bit_identical,
                      dtype_id, outputs_and_grads)

# Random123's known-answer vectors of Philox4x32-10: counter words, key words, output words
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    c = counter[0] | counter[1] << 32
    c = torch.tensor([c - 2**64 if c >= 2**63 else c])  # the same 64 bits as an int64
    words = reference.philox4x32_10(c, key[0] | key[1] << 32, high=counter[2:])
    assert tuple(int(w) for w in words) == expected


def test_noise_is_standard_normal():
    n = reference.philox_normal((64, 2**14), seed=12345, dtype=torch.float64).flatten()
    assert abs(n.mean()) < 0.005 and abs(n.std() - 1) < 0.005  # standard errors 0.001, 0.0007
    assert abs((n**4).mean() - 3) < 0.05  # kurtosis, standard error 0.0024 * sqrt(96) ~ 0.024
    ks = (torch.special.ndtr(n.sort().values) - torch.arange(1, n.numel() + 1) / n.numel()).abs().max()
    assert ks < 0.002  # Kolmogorov-Smirnov; 1.95 / sqrt(2^20) at the 0.1 % level
    assert n.abs().max() < 5.9  # the 24-bit uniforms bound the tails
    # neighbours share a counter or a radius (lanes 0 and 1 are r0 cos t0, r0 sin t0)
    blocks = n.view(-1, 4, 16)
    for a, b in [(blocks[:, 0], blocks[:, 1]), (blocks[:, 0], blocks[:, 2]), (n[:-1], n[1:])]:
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.01
        assert abs(torch.corrcoef(torch.stack([a.flatten() ** 2, b.flatten() ** 2]))[0, 1]) < 0.01


def test_noise_depends_on_seed_and_position():
    a = reference.philox_normal((8, 1000), seed=1)
    assert not torch.equal(a, reference.philox_normal((8, 1000), seed=2))
    assert torch.equal(a, reference.philox_normal((8, 1000), seed=1))
    assert a.unique().numel() > 0.99 * a.numel()
    # rows are padded to 64-element blocks: row b's noise does not depend on B
    assert torch.equal(a[:3], reference.philox_normal((3, 1000), seed=1))


def seed(value):
    """The raw philox ops' seed argument: a 0-dim int64 tensor on the CPU."""
    return torch.tensor(value, dtype=torch.int64)


PHILOX_CASES = [Case(POST, s, lay, prior=p) for s in DENSE_SHAPES + [(3, 64), (2, 65), (1, 3, 4, 17)]
                for lay in ("contiguous", "transposed") for p in (False, True)]


def philox_fn(module, seed=7):
    """module.posterior_sample with eps=None and a generator seeded afresh on every call."""
    def f(dmu, dlv, mu_p, lvp):
        return module.posterior_sample(dmu, dlv, None, mu_p, lvp, generator=torch.Generator().manual_seed(seed))

    return f


def philox_args(case, dtype, device):
    (dmu, dlv, _, mu_p, lvp), leaves = case.build(dtype, device)
    return (dmu, dlv, mu_p, lvp), leaves


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("case", PHILOX_CASES, ids=str)
def test_philox_matches_reference(case, dtype, device):
    """Values and gradients: the backward must draw the forward's noise again."""
    args, leaves = philox_args(case, dtype, device)
    fast = outputs_and_grads(philox_fn(ops), args, leaves)
    ref = outputs_and_grads(philox_fn(reference), args, leaves)
    assert_all_close(fast, ref, **TOL[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
def test_philox_same_noise_on_cpu_and_cuda(dtype):
    args, leaves = philox_args(Case(POST, (3, 1000), prior=True), dtype, "cpu")
    cpu = outputs_and_grads(philox_fn(ops), args, leaves)
    cuda_args = [a.detach().cuda().requires_grad_() for a in args]
    cuda = outputs_and_grads(philox_fn(ops), cuda_args, cuda_args)
    assert_all_close([t.cpu() for t in cuda], cpu, **TOL[dtype])


def test_philox_follows_torch_manual_seed():
    dmu, dlv = torch.randn(2, 3, 100).unbind(0)
    torch.manual_seed(3)
    z1, _ = ops.posterior_sample(dmu, dlv, None)
    z2, _ = ops.posterior_sample(dmu, dlv, None)
    torch.manual_seed(3)
    z3, _ = ops.posterior_sample(dmu, dlv, None)
    assert torch.equal(z1, z3) and not torch.equal(z1, z2)


def test_philox_eps_none_raises_like_eps():
    with pytest.raises(ValueError, match="delta_logvar has shape"):
        ops.posterior_sample(torch.zeros(2, 3), torch.zeros(2, 4), None)
    with pytest.raises(ValueError, match="give both mu_p and logvar_p"):
        ops.posterior_sample(torch.zeros(2, 3), torch.zeros(2, 3), None, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="delta_logvar has shape"):
        RAW.posterior_sample_philox(torch.zeros(2, 3), torch.zeros(2, 4), None, None, seed(1), -7.0, 2.0)


@pytest.mark.parametrize("prior", [False, True], ids=["top", "prior"])
def test_philox_gradcheck(prior):
    args, leaves = philox_args(Case(POST, (2, 3, 5), prior=prior), torch.float64, "cpu")

    def fn(*ts):
        it = iter(ts)
        return philox_fn(ops)(*[next(it) if a is not None else None for a in args])

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("prior", [False, True], ids=["top", "prior"])
def test_philox_opcheck(prior, requires_grad):
    (dmu, dlv, mu_p, lvp), _ = philox_args(Case(POST, (2, 3, 70), prior=prior), torch.float64, "cpu")
    args = [a if a is None or requires_grad else a.detach() for a in (dmu, dlv, mu_p, lvp)]
    result = torch.library.opcheck(RAW.posterior_sample_philox.default, (*args, seed(2**62 + 5), -7.0, 2.0))
    assert set(result.values()) == {"SUCCESS"}, result
    g = torch.randn(2, 3, 70, dtype=torch.float64)
    bwd = (g, torch.randn(2, dtype=torch.float64), dmu.detach(), dlv.detach(),
           None if lvp is None else lvp.detach(), seed(-3), -7.0, 2.0)
    result = torch.library.opcheck(RAW.posterior_sample_philox_backward.default, bwd)
    assert set(result.values()) == {"SUCCESS"}, result


def test_philox_deterministic_across_thread_counts():
    args, leaves = philox_args(Case(POST, (4, 20000), prior=True), torch.float32, "cpu")
    before = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            runs.append(outputs_and_grads(philox_fn(ops), args, leaves))
    finally:
        torch.set_num_threads(before)
    assert_bit_identical(runs)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_philox_raw_op_under_torch_compile():
    args, leaves = philox_args(Case(POST, (3, 100), prior=True), torch.float32, "cpu")

    def f(dmu, dlv, mu_p, lvp):
        return RAW.posterior_sample_philox(dmu, dlv, mu_p, lvp, seed(11), -7.0, 2.0)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    assert_all_close(outputs_and_grads(compiled, args, leaves), outputs_and_grads(f, args, leaves),
                     **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_half_precision_spec_is_the_float32_noise_rounded(dtype):
    # computed in the output dtype, float16 overflowed in floor(w / 256) (~99 % NaN) and
    # bfloat16 differed from the float32 noise by up to 0.064
    spec = reference.philox_normal((4, 1000), 17, dtype=dtype)
    f32 = reference.philox_normal((4, 1000), 17)
    assert spec.dtype == dtype and torch.isfinite(spec).all()
    assert torch.equal(spec, f32.to(dtype))
