"""CUDA-only extras: float16/bfloat16, streams, CUDA graphs, several GPUs, mixed devices.

The core cases (values and gradients vs the reference in float32/float64, clamp
bounds, extreme logits, the seed's formulas, determinism) already run on "cuda"
through the `device` fixture of tests/test_ops.py. Out-of-range class indices are
not tested here: the CUDA kernels assert on the device, which leaves the CUDA context
unusable for every later test (ops.categorical_log_likelihood's docstring). The layout
tests below cover every thread layout of csrc/cuda/*.cu.
"""
import pytest
import torch
from torch.testing import assert_close

from hvae_fast import ops, reference
from test_ops import (BERN, CAT, DETERMINISM_CASES, POST, Case, assert_all_close, assert_bit_identical,
                      dtype_id, hvae_step, outputs_and_grads)

pytestmark = pytest.mark.cuda  # skipped without a GPU or without hvae_fast's CUDA kernels (conftest.py)

LOW = [torch.float16, torch.bfloat16]
LOW_TOL = {torch.float16: {"rtol": 1e-2, "atol": 1e-2}, torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2}}
LOW_CASES = [
    Case(POST, (3, 17)), Case(POST, (2, 3, 4, 5), "transposed", prior=True), Case(POST, (2, 5000), prior=True),
    Case(CAT, (2, 3, 256), x_dtype=torch.int64), Case(CAT, (2, 3, 1000), "sliced", x_dtype=torch.int32),
    Case(CAT, (1, 70, 17), "transposed", x_dtype=torch.float16),
    Case(BERN, (2, 3, 4, 5)), Case(BERN, (2, 5000), "sliced", x_dtype=torch.bool),
]


def as_float32_leaves(args):
    """The same (rounded) inputs in float32, as fresh leaves, for the float32 reference."""
    args = tuple(a.detach().float().requires_grad_() if a is not None and a.requires_grad else a for a in args)
    return args, [a for a in args if a is not None and a.requires_grad]


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
@pytest.mark.parametrize("case", LOW_CASES, ids=str)
def test_low_precision_vs_float32_reference(case, dtype):
    args, leaves = case.build(dtype, "cuda")
    fast = outputs_and_grads(getattr(ops, case.op), args, leaves)
    assert all(t.dtype == dtype for t in fast)
    ref = outputs_and_grads(getattr(reference, case.op), *as_float32_leaves(args))
    assert_all_close([t.float() for t in fast], ref, **LOW_TOL[dtype])


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=str)
def test_low_precision_deterministic(case, dtype):
    def run():
        args, leaves = case.build(dtype, "cuda")
        return outputs_and_grads(getattr(ops, case.op), args, leaves)

    assert_bit_identical([run() for _ in range(3)])


def all_ops_inputs(dtype=torch.float32, device="cuda"):
    post, post_leaves = Case(POST, (3, 8), prior=True).build(dtype, device)
    cat, cat_leaves = Case(CAT, (3, 4, 7), x_dtype=torch.int64).build(dtype, device, seed=1)
    bern, bern_leaves = Case(BERN, (3, 6)).build(dtype, device, seed=2)
    return post + cat + bern, post_leaves + cat_leaves + bern_leaves


def test_side_stream():
    """Kernels run on the current stream: inputs made on a side stream are read after they are written."""
    args, leaves = all_ops_inputs()
    expected = outputs_and_grads(hvae_step, args, leaves)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(10_000_000)  # delays the copies below on this stream
        fresh = tuple(a.detach().clone().requires_grad_(a.requires_grad) if a is not None else None for a in args)
        got = outputs_and_grads(hvae_step, fresh, [a for a in fresh if a is not None and a.requires_grad])
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert_bit_identical([expected, got])


def test_cuda_graph_capture_and_replay():
    args, leaves = all_ops_inputs()
    static = tuple(a.detach() if a is not None else None for a in args)  # shares the leaves' memory
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture
            hvae_step(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = hvae_step(*static)
        for t in leaves:  # new values in the same buffers (targets stay valid)
            t.mul_(0.5)
        graph.replay()
        torch.cuda.synchronize()
        expected = hvae_step(*static)
    assert_bit_identical([list(expected), list(captured)])


def test_in_kernel_noise_refuses_cuda_graph_capture():
    # its seed comes from the host: a captured graph would replay the same noise silently
    dmu = torch.zeros(4, 64, device="cuda")
    ops.posterior_sample(dmu, dmu, None)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            ops.posterior_sample(dmu, dmu, None)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_while_first_is_current():
    args, leaves = all_ops_inputs(device="cuda:1")
    with torch.cuda.device(0):
        got = outputs_and_grads(hvae_step, args, leaves)
    assert all(t.device == torch.device("cuda:1") for t in got)
    cpu_args, cpu_leaves = all_ops_inputs(device="cpu")
    assert_all_close([t.cpu() for t in got], outputs_and_grads(hvae_step, cpu_args, cpu_leaves),
                     rtol=1e-5, atol=1e-5)


MIXED = [
    (POST, lambda: (torch.randn(2, 3, device="cuda"), torch.randn(2, 3, device="cuda"), torch.randn(2, 3)),
     "eps is on"),
    (CAT, lambda: (torch.randn(2, 5, device="cuda"), torch.zeros(2, dtype=torch.long)), "x is on"),
    (BERN, lambda: (torch.randn(2, 3, device="cuda"), torch.zeros(2, 3)), "x is on"),
]


@pytest.mark.parametrize("impl", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("op,make_args,match", MIXED, ids=[m[0] for m in MIXED])
def test_cpu_cuda_mix_raises(impl, op, make_args, match):
    with pytest.raises(ValueError, match=match):
        getattr(impl, op)(*make_args())


@pytest.mark.parametrize("op,make_args,match", MIXED, ids=[m[0] for m in MIXED])
def test_cpu_cuda_mix_raises_in_raw_op(op, make_args, match):
    extra = (None, None, -7.0, 2.0) if op == POST else ()
    with pytest.raises(ValueError, match=match):
        getattr(torch.ops.hvae_fast, op)(*make_args(), *extra)


# ---- the GPU layouts of the kernels (csrc/cuda/*.cu) -------------------------------------------
# Tolerance rule for CUDA: the kernel's error against a float64 reference is no larger than
# PyTorch's own error in the same dtype (the reference run in that dtype on the GPU), times 2,
# plus a margin of a few units in the last place of the dtype.

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def max_err(got, ref64):
    return max((g.double() - r).abs().max().item() if g.numel() else 0.0 for g, r in zip(got, ref64))


def assert_no_worse_than_torch(op_name, args, leaves, dtype, margin_ulps=8):
    """ops vs float64 reference, against reference-in-dtype vs float64 reference (outputs and grads)."""
    fast = outputs_and_grads(getattr(ops, op_name), args, leaves)
    torch_same = outputs_and_grads(getattr(reference, op_name), args, leaves)
    args64 = tuple(a.detach().double().requires_grad_() if any(a is leaf for leaf in leaves) else a for a in args)
    ref64 = outputs_and_grads(getattr(reference, op_name), args64,
                              [a for a in args64 if isinstance(a, torch.Tensor) and a.requires_grad])
    scale = max(r.abs().max().item() if r.numel() else 0.0 for r in ref64) or 1.0
    for i, (f, t, r) in enumerate(zip(fast, torch_same, ref64)):
        err_f, err_t = max_err([f], [r]), max_err([t], [r])
        bound = 2 * err_t + margin_ulps * EPS[dtype] * max(scale, 1.0)
        assert err_f <= bound, f"tensor {i}: error {err_f:.3g} > bound {bound:.3g} (torch's own {err_t:.3g})"
    return fast


# every team size of the categorical kernels (4, 8, 16, 32 lanes, a block), vector and scalar loads
CAT_K = [2, 16, 17, 32, 33, 64, 65, 256, 1000, 2048, 4099]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "offset"])
@pytest.mark.parametrize("K", CAT_K)
def test_categorical_layouts(K, layout, dtype):
    """offset: contiguous logits 2 bytes past an aligned address (no 16-byte vector loads)."""
    D = max(3, 40000 // K)  # several chunks per example for small K
    case = Case(CAT, (3, D, K), "contiguous" if layout == "offset" else layout, x_dtype=torch.int64)
    (logits, x), _ = case.build(dtype, "cuda")
    if layout == "offset":
        buf = torch.empty(logits.numel() + 8, dtype=dtype, device="cuda")
        view = buf[1:1 + logits.numel()].view(logits.shape)
        view.copy_(logits.detach())
        logits = view.detach().requires_grad_()
    assert_no_worse_than_torch(CAT, (logits, x), [logits], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("K", [17, 256, 4099])
def test_categorical_in_place_backward_vs_reference(K, dtype):
    """overwrite_logits=True: the gradient written into the logits themselves, on the GPU."""
    B, D = 4, 300
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(B, D, K, generator=gen).to(dtype).cuda()
    x = torch.randint(0, K, (B, D), generator=gen).cuda()
    g = torch.randn(B, generator=gen).to(dtype).cuda()
    leaf = base.clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad(reference.categorical_log_likelihood(leaf, x), [leaf], g)
    h = base.clone().requires_grad_()
    logits = h * 1  # a non-leaf, as a decoder's output
    ll = ops.categorical_log_likelihood(logits, x, overwrite_logits=True)
    (got,) = torch.autograd.grad(ll, [h], g)
    assert_close(got.float(), ref_grad.float(), **({"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32
                                                  else {"rtol": 2e-2, "atol": 2e-3}))


@pytest.mark.parametrize("op,shape", [(POST, (3, 3 * 4096 + 17)), (POST, (2, 100000)), (BERN, (3, 3 * 4096 + 17)),
                                      (BERN, (4, 70, 5)), (CAT, (2, 5000, 17))])
def test_two_stage_row_sums_deterministic_and_accurate(op, shape):
    """Rows longer than one chunk: partial sums, then their fixed-order sum; the same bits every run."""
    case = Case(op, shape, prior=True) if op == POST else Case(op, shape, x_dtype=torch.int64)
    args, leaves = case.build(torch.float32, "cuda")
    first = assert_no_worse_than_torch(op, args, leaves, torch.float32)
    again = outputs_and_grads(getattr(ops, op), args, leaves)
    assert_bit_identical([first, again])


def test_in_kernel_noise_low_precision_vs_float32_spec():
    """eps=None in float16 and bfloat16: the float32 spec's noise (reference.philox_normal) rounded."""
    for dtype in LOW:
        dmu = torch.randn(3, 5000, device="cuda").to(dtype).requires_grad_()
        dlv = torch.randn(3, 5000, device="cuda").to(dtype).requires_grad_()
        z, kl = ops.posterior_sample(dmu, dlv, None, generator=torch.Generator().manual_seed(7))
        seed = reference.draw_seed(torch.Generator().manual_seed(7))
        eps = reference.philox_normal(dmu.shape, seed, dtype=torch.float32, device="cuda")
        z_ref, kl_ref = reference.posterior_sample(dmu.float(), dlv.float(), eps)
        assert_close(z.float(), z_ref, **LOW_TOL[dtype])
        assert_close(kl.float(), kl_ref, rtol=LOW_TOL[dtype]["rtol"], atol=LOW_TOL[dtype]["atol"] * 5000 ** 0.5)


def test_in_kernel_noise_cpu_and_cuda_agree_to_1_5e_6():
    """What holds for the in-kernel noise across devices (ops.posterior_sample's docstring): the same
    Philox bits and uniforms, normals within about 1.5e-6 in float32 (CUDA's sinf/cosf/logf against
    the CPU's polynomials), not bit for bit."""
    zeros = torch.zeros(4, 100000)
    z_cpu, _ = ops.posterior_sample(zeros, zeros, None, generator=torch.Generator().manual_seed(3))
    z_cuda, _ = ops.posterior_sample(zeros.cuda(), zeros.cuda(), None, generator=torch.Generator().manual_seed(3))
    diff = (z_cuda.cpu() - z_cpu).abs().max().item()
    assert diff <= 4e-6, diff


def poison_allocator(nbytes):
    """Leaves a freed, NaN-filled block in torch's caching allocator: the next outputs of about this
    size are carved from it, so an element a kernel does not write stays NaN."""
    t = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")
    del t


@pytest.mark.parametrize("case", [Case(POST, (3, 10000), prior=True), Case(POST, (5, 7)),
                                  Case(CAT, (3, 700, 17), x_dtype=torch.int64),
                                  Case(CAT, (2, 9, 4099), x_dtype=torch.int64),
                                  Case(BERN, (3, 10000)), Case(BERN, (300, 7))], ids=str)
def test_every_output_element_written(case):
    args, leaves = case.build(torch.float32, "cuda")
    poison_allocator(sum(a.nbytes for a in leaves))
    got = outputs_and_grads(getattr(ops, case.op), args, leaves)
    for t in got:
        assert not t.isnan().any(), "an output element was left unwritten"


@pytest.mark.parametrize("op,shape", [(POST, (2, 0)), (POST, (3, 0, 4)), (CAT, (2, 0, 5)), (BERN, (2, 0)),
                                      (BERN, (3, 4, 0))])
def test_zero_size_dimensions(op, shape):
    case = Case(op, shape, prior=True) if op == POST else Case(op, shape, x_dtype=torch.int64)
    args, leaves = case.build(torch.float32, "cuda")
    fast = outputs_and_grads(getattr(ops, op), args, leaves)
    ref = outputs_and_grads(getattr(reference, op), args, leaves)
    assert_all_close(fast, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_adamax_low_precision_follows_torch_foreach(dtype):
    """hvae_fast.optim.Adamax in float16/bfloat16 against torch's foreach Adamax in the same dtype:
    the state rounds as torch's does (math::adamax_update's `round`)."""
    from hvae_fast.optim import Adamax
    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 7), (5,), (2_000_000,)] + [(3, 4)] * 30  # more tensors and chunks than one launch takes
    base = [torch.randn(s, generator=gen).to(dtype).cuda() for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype).cuda() for s in shapes] for _ in range(4)]
    ours = [p.clone().requires_grad_() for p in base]
    theirs = [p.clone().requires_grad_() for p in base]
    o1 = Adamax(ours, lr=1e-2, weight_decay=0.1)
    o2 = torch.optim.Adamax(theirs, lr=1e-2, weight_decay=0.1, foreach=True)
    for gs in grads:
        for p, q, g in zip(ours, theirs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    ulp = EPS[dtype]
    for p, q in zip(ours, theirs):
        s1, s2 = o1.state[p], o2.state[q]
        assert_close(s1["exp_avg"].float(), s2["exp_avg"].float(), rtol=2 * ulp, atol=1e-6)
        assert_close(s1["exp_inf"].float(), s2["exp_inf"].float(), rtol=2 * ulp, atol=1e-6)
        assert_close(p.detach().float(), q.detach().float(), rtol=2 * ulp, atol=2 * ulp * 1e-2)


def test_adamax_groups_of_devices_and_dtypes_vs_reference():
    """One call with float32 and float64 tensors, and more tensors and chunks than one launch holds."""
    gen = torch.Generator().manual_seed(1)
    shapes = [(5,), (1_500_000,), (0,), (7, 3)] * 8
    dtypes = [torch.float32, torch.float64] * 16
    make = [(torch.randn(s, generator=gen, dtype=torch.float64).to(d).cuda() for s, d in zip(shapes, dtypes))
            for _ in range(4)]
    params, grads, m, u = ([t for t in ts] for ts in make)
    u = [t.abs() for t in u]
    clrs = [-1e-3 * (1 + j) for j in range(len(shapes))]
    ref = [[t.clone() for t in ts] for ts in (params, m, u)]
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    ops.adamax_(params, grads, m, u, clrs, **kw)
    reference.adamax_(ref[0], grads, ref[1], ref[2], clrs, **kw)
    for got, exp in zip(params + m + u, ref[0] + ref[1] + ref[2]):
        assert_close(got, exp, rtol=1e-6, atol=1e-7)


def test_linear_and_pixel_heads_vs_reference():
    gen = torch.Generator().manual_seed(0)
    B, H, D, K = 4, 9, 300, 17
    h = torch.randn(B, H, generator=gen).cuda().requires_grad_()
    w = torch.randn(D * K, H, generator=gen).cuda().requires_grad_()
    b = torch.randn(D * K, generator=gen).cuda().requires_grad_()
    x = torch.randint(0, K, (B, D), generator=gen).cuda()
    fast = outputs_and_grads(ops.linear_categorical_log_likelihood, (h, w, b, x), [h, w, b])
    ref = outputs_and_grads(reference.linear_categorical_log_likelihood, (h, w, b, x), [h, w, b])
    assert_all_close(fast, ref, rtol=1e-4, atol=1e-4)
    f = torch.randn(2, 8, 6, 5, generator=gen).cuda().requires_grad_()
    w = torch.randn(3 * 256, 8, generator=gen).cuda().requires_grad_()
    b = torch.randn(3 * 256, generator=gen).cuda().requires_grad_()
    x = torch.randint(0, 256, (2, 3, 6, 5), generator=gen).cuda()
    fast = outputs_and_grads(ops.pixel_categorical_log_likelihood, (f, w, b, x), [f, w, b])
    ref = outputs_and_grads(reference.pixel_categorical_log_likelihood, (f, w, b, x), [f, w, b])
    assert_all_close(fast, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph_ops_on_cuda():
    args, leaves = all_ops_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(hvae_step, fullgraph=True)
    assert_all_close(outputs_and_grads(compiled, args, leaves), outputs_and_grads(hvae_step, args, leaves),
                     rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_fullgraph_model_on_cuda():
    from hvae_fast.model import HierarchicalVAE
    torch.manual_seed(0)
    model = HierarchicalVAE.from_recipe().cuda()
    x = torch.randint(0, 17, (8, 64), device="cuda").float()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(1)
    loss_c = compiled(x)
    torch.manual_seed(1)
    loss_e = model(x)
    assert torch.isfinite(loss_c) and torch.isfinite(loss_e)
    assert_close(loss_c, loss_e, rtol=1e-2, atol=1e-2)  # the compiled graph draws its own randn_like
    loss_c.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_categorical_more_than_2_31_elements_bfloat16():
    """Index arithmetic past 2^31 elements (needs ~13 GB of GPU memory)."""
    if torch.cuda.mem_get_info()[0] < 24 * 2**30:
        pytest.skip("needs 24 GB of free GPU memory")
    B, D, K = 2, 2**20 + 1, 1024  # 2^31 + 2048 logits
    logits = torch.randn(B, D, K, device="cuda", dtype=torch.bfloat16).requires_grad_()
    x = torch.randint(0, K, (B, D), device="cuda")
    ll = ops.categorical_log_likelihood(logits, x)
    (grad,) = torch.autograd.grad(ll, [logits], torch.ones(B, device="cuda", dtype=torch.bfloat16))
    tail = logits[1, -3:].detach().float()  # rows past 2^31 elements
    p = torch.softmax(tail, -1)
    expected = torch.nn.functional.one_hot(x[1, -3:], K).float() - p
    assert_close(grad[1, -3:].float(), expected, rtol=2e-2, atol=2e-3)
    per_row = torch.log_softmax(logits.detach().float().view(-1, K)[-4096:], -1)
    assert torch.isfinite(ll).all() and per_row.isfinite().all()
    del grad, logits


def test_fuzz_on_cuda():
    """A short property-based run on the GPU (hypothesis, where installed)."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(B=st.integers(1, 4), D=st.integers(0, 300), K=st.integers(2, 300), seed=st.integers(0, 2**16))
    def run(B, D, K, seed):
        args, leaves = Case(CAT, (B, D, K), x_dtype=torch.int64).build(torch.float32, "cuda", seed=seed)
        fast = outputs_and_grads(ops.categorical_log_likelihood, args, leaves)
        ref = outputs_and_grads(reference.categorical_log_likelihood, args, leaves)
        assert_all_close(fast, ref, rtol=1e-4, atol=1e-4)

    run()
