"""posterior_sample(eps=None) under torch.compile(fullgraph=True): the Philox seed is a
0-dim int64 CPU tensor (hvae_fast.reference.draw_seed), drawn inside the graph and read
on the host by the kernels, so neither the forward nor the backward breaks the graph.
Also: the raw philox ops refuse any other seed, and keep out of CUDA graphs."""
import pytest
import torch
import torch._dynamo.testing
from torch.testing import assert_close

from hvae_fast import ops, reference
from hvae_fast.model import TopDownVAE
from test_noise import philox_args, seed
from test_ops import POST, RAW, TOL, Case, assert_all_close, outputs_and_grads

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def small_model(device):
    torch.manual_seed(0)
    model = TopDownVAE.from_config(levels=2, D=64, M=32, L=4, num_vals=17).to(device)
    model.in_kernel_noise = True
    return model


def loss_and_grads(model, fn, x, rng_seed):
    """fn(x)'s loss and the gradients of model's parameters, after torch.manual_seed(rng_seed)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(rng_seed)
    loss = fn(x)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def test_compiled_model_with_in_kernel_noise(device):
    """A TopDownVAE drawing its noise in the kernels compiles whole, forward and backward,
    and computes what the eager model computes after the same torch.manual_seed: the seed
    draw is ATen's randint on the default generator in the graph too."""
    model = small_model(device)
    x = torch.randint(0, 17, (8, 64), generator=torch.Generator().manual_seed(1)).to(device)
    eager_loss, eager_grads = loss_and_grads(model, model, x, 5)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    loss, grads = loss_and_grads(model, compiled, x, 5)
    assert torch.isfinite(loss)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.isfinite(g).all() and g.abs().max() > 0, p.shape
    # the same noise: the loss to rounding (Inductor's arithmetic around the fused ops)
    assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert_all_close(grads, eager_grads, rtol=1e-4, atol=1e-4)
    again, again_grads = loss_and_grads(model, compiled, x, 5)
    assert torch.equal(again, loss) and all(torch.equal(a, b) for a, b in zip(again_grads, grads, strict=True))
    other, _ = loss_and_grads(model, compiled, x, 6)  # another seed, other noise
    assert not torch.equal(other, loss)


def test_compiled_eps_none_draws_fresh_noise_per_call(device):
    """Compiled ops.posterior_sample(eps=None): each call draws a new seed (nothing baked
    into the graph), and after torch.manual_seed the eager call's noise, bit for bit."""
    args, leaves = philox_args(Case(POST, (3, 100), prior=True), torch.float32, device)

    def f(dmu, dlv, mu_p, lvp):
        return ops.posterior_sample(dmu, dlv, None, mu_p, lvp)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    torch.manual_seed(11)
    first = outputs_and_grads(compiled, args, leaves)
    second = outputs_and_grads(compiled, args, leaves)
    assert not torch.equal(first[0], second[0])
    torch.manual_seed(11)
    eager = outputs_and_grads(f, args, leaves)
    assert torch.equal(first[0], eager[0])  # z: the same kernel on the same seed
    assert_all_close(first, eager, **TOL[torch.float32])


def test_compiled_raw_op_takes_the_seed_as_a_graph_input(device):
    """The seed tensor is an input of the compiled graph, not a constant: a new seed value
    gives that seed's noise without recompiling, forward and backward."""
    args, leaves = philox_args(Case(POST, (3, 100), prior=True), torch.float32, device)

    def f(dmu, dlv, mu_p, lvp, s):
        return RAW.posterior_sample_philox(dmu, dlv, mu_p, lvp, s, -7.0, 2.0)

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=counter)
    runs = {}
    for s in (11, 2**62 + 5, 11):
        got = outputs_and_grads(compiled, (*args, seed(s)), leaves)
        assert_all_close(got, outputs_and_grads(f, (*args, seed(s)), leaves), **TOL[torch.float32])
        if s in runs:
            assert all(torch.equal(a, b) for a, b in zip(got, runs[s], strict=True))
        runs[s] = got
    assert not torch.equal(runs[11][0], runs[2**62 + 5][0])
    assert counter.frame_count == 1


def test_int_and_tensor_seeds_give_the_same_noise():
    """An integer seed's noise did not change with the tensor seed: the raw op on
    torch.tensor(s) draws reference.philox_normal(shape, s) for the int s, and draw_seed
    draws the integer it drew before, as a 0-dim int64 CPU tensor."""
    zeros = torch.zeros(3, 130, dtype=torch.float64)  # delta_logvar 0: z is the noise itself
    for s in (0, 1, 12345, -3, 2**62 + 5, 2**63 - 1):
        z, _ = RAW.posterior_sample_philox(zeros, zeros, None, None, seed(s), -7.0, 2.0)
        spec = reference.philox_normal(zeros.shape, s, dtype=torch.float64)
        assert torch.equal(reference.philox_normal(zeros.shape, seed(s), dtype=torch.float64), spec)
        assert_close(z, spec, rtol=0, atol=1e-12)
    drawn = reference.draw_seed(torch.Generator().manual_seed(7))
    assert drawn.dtype == torch.int64 and drawn.dim() == 0 and drawn.device.type == "cpu"
    assert int(drawn) == int(torch.randint(0, 2**63 - 1, (), generator=torch.Generator().manual_seed(7)))


# ---- the seed argument of the raw ops ------------------------------------------------------

def raw_call(op, dmu, s):
    if op == "forward":
        return RAW.posterior_sample_philox(dmu, dmu, None, None, s, -7.0, 2.0)
    return RAW.posterior_sample_philox_backward(dmu, dmu[:, 0], dmu, dmu, None, s, -7.0, 2.0)


BAD_SEEDS = {
    "float": (lambda: torch.tensor(3.0), TypeError, "seed must be a 0-dim int64 tensor on the CPU.*dtype"),
    "int32": (lambda: torch.tensor(3, dtype=torch.int32), TypeError, "seed must be a 0-dim int64 tensor.*dtype"),
    "1-d": (lambda: torch.tensor([3]), ValueError, r"seed must be a 0-dim int64 tensor.*shape \(?\[?1"),
    "cuda": (lambda: torch.tensor(3, device="cuda"), ValueError, "seed must be a 0-dim int64 tensor on the CPU.*cuda"),
}


def bad_seed_params():
    for name in BAD_SEEDS:
        yield pytest.param(name, marks=pytest.mark.cuda) if name == "cuda" else name


@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("bad", list(bad_seed_params()))
def test_raw_ops_refuse_bad_seeds(bad, op, device):
    """Kernels (or the fallback) and fake kernels alike name `seed` and what it must be."""
    make, error, match = BAD_SEEDS[bad]
    dmu = torch.zeros(2, 5, device=device)
    with pytest.raises(error, match=match):
        raw_call(op, dmu, make())
    with torch._subclasses.FakeTensorMode() as mode:  # what torch.compile traces
        fake_dmu, fake_seed = mode.from_tensor(dmu), mode.from_tensor(make())
        with pytest.raises(error, match=match):
            raw_call(op, fake_dmu, fake_seed)


@pytest.mark.parametrize("op", ["forward", "backward"])
def test_raw_ops_refuse_an_int_seed(op):
    with pytest.raises(RuntimeError, match="seed"):
        raw_call(op, torch.zeros(2, 5), 3)


@pytest.mark.cuda
def test_cuda_seed_refused_beside_cpu_inputs():
    # a CUDA seed makes the dispatcher pick the CUDA kernel for CPU inputs: it must still say why
    with pytest.raises(ValueError, match="seed must be a 0-dim int64 tensor on the CPU"):
        raw_call("forward", torch.zeros(2, 5), torch.tensor(3, device="cuda"))


# ---- CUDA graphs ---------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"), reason="torch < 2.8 has no cudagraph_unsafe tag")
def test_philox_ops_are_tagged_cudagraph_unsafe():
    for name in ops.HOST_SEED_OPS:
        assert torch.Tag.cudagraph_unsafe in getattr(RAW, name).default.tags, name


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_raw_philox_ops_refuse_cuda_graph_capture(op):
    """The CUDA kernels refuse capture themselves: compiled code skips the eager check."""
    dmu = torch.zeros(4, 64, device="cuda")
    raw_call(op, dmu, seed(1))  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            raw_call(op, dmu, seed(1))


@pytest.mark.cuda
def test_reduce_overhead_draws_fresh_noise_per_call():
    """mode="reduce-overhead" keeps the philox op out of its CUDA graphs (the tag): every
    replay draws a new seed, and the noise is that seed's."""
    dmu = torch.zeros(4, 1000, device="cuda")

    def f(dmu, dlv):
        return ops.posterior_sample(dmu, dlv, None)[0] * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    outs = []
    for i in range(4):
        torch.manual_seed(i)
        outs.append(compiled(dmu, dmu).clone())
    for i, out in enumerate(outs):
        torch.manual_seed(i)
        assert torch.equal(out, f(dmu, dmu)), i
    assert len({o.sum().item() for o in outs}) == len(outs)


@pytest.mark.cuda
@pytest.mark.parametrize("prior", [False, True], ids=["top", "prior"])
def test_philox_opcheck_cuda(prior):
    (dmu, dlv, mu_p, lvp), _ = philox_args(Case(POST, (2, 3, 70), prior=prior), torch.float32, "cuda")
    result = torch.library.opcheck(RAW.posterior_sample_philox.default, (dmu, dlv, mu_p, lvp, seed(5), -7.0, 2.0))
    assert set(result.values()) == {"SUCCESS"}, result
    g = torch.randn(2, 3, 70, device="cuda")
    bwd = (g, torch.randn(2, device="cuda"), dmu.detach(), dlv.detach(), None if lvp is None else lvp.detach(),
           seed(-3), -7.0, 2.0)
    result = torch.library.opcheck(RAW.posterior_sample_philox_backward.default, bwd)
    assert set(result.values()) == {"SUCCESS"}, result
