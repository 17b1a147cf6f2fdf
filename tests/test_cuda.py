"""CUDA-only extras: float16/bfloat16, streams, CUDA graphs, several GPUs, mixed devices.

The core cases (values and gradients vs the reference in float32/float64, clamp
bounds, extreme logits, the seed's formulas, determinism) already run on "cuda"
through the `device` fixture of tests/test_ops.py. Out-of-range class indices are
not tested here: the CUDA kernels assert on the device.
"""
import pytest
import torch

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
