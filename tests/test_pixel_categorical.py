"""pixel_categorical_log_likelihood: an image decoder's last 1x1 conv fused with the likelihood."""
import json
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from hvae_fast import ops, reference

OP = "pixel_categorical_log_likelihood"
RAW = torch.ops.hvae_fast
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-9)}


def make(B=3, C=5, H=4, W=6, channels=3, K=17, dtype=torch.float64, bias=True, seed=0, device="cpu",
         channels_last=False, x_dtype=torch.int64):
    """(features, weight, bias, x), the first three leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(B, C, H, W, dtype=torch.float64, generator=g)
    w = torch.randn(channels * K, C, dtype=torch.float64, generator=g) * 0.5
    b = torch.randn(channels * K, dtype=torch.float64, generator=g) if bias else None
    x = torch.randint(0, K, (B, channels, H, W), generator=g).to(device=device, dtype=x_dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    f = f.to(device=device, dtype=dtype, memory_format=fmt)
    w, b = (None if t is None else t.to(device=device, dtype=dtype) for t in (w, b))
    return tuple(None if t is None else t.requires_grad_() for t in (f, w, b)) + (x,)


def grads(fn, f, w, b, x):
    out = fn(f, w, b, x)
    params = [t for t in (f, w, b) if t is not None]
    return [out] + list(torch.autograd.grad(out.sum() * 1.5, params))


def truth(f, w, b, x):
    """The reference in float64 on the CPU, on the same (rounded) inputs."""
    def up(t):
        return None if t is None else t.detach().cpu().double().requires_grad_()
    return grads(reference.pixel_categorical_log_likelihood, up(f), up(w), up(b), x.cpu())


def chunk_bytes(channels, K, dtype, pixels):
    return channels * K * torch.empty((), dtype=dtype).element_size() * pixels


def assert_matches(got, want, dtype):
    assert len(got) == len(want)
    for a, e in zip(got, want):
        assert a.dtype == dtype and a.shape == e.shape
        torch.testing.assert_close(a.detach().cpu().double(), e.to(torch.float64), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_pixels", [1, 5, 7, 10_000])  # many chunks, ragged last ones, one chunk
def test_matches_reference(dtype, bias, chunk_pixels, device, monkeypatch):
    f, w, b, x = make(dtype=dtype, bias=bias, device=device)
    monkeypatch.setattr(ops, "LINEAR_CHUNK_BYTES", chunk_bytes(3, 17, dtype, chunk_pixels))
    got = grads(ops.pixel_categorical_log_likelihood, f, w, b, x)
    assert_matches(got, truth(f, w, b, x), dtype)
    if device == "cpu":  # and the reference in the same dtype
        assert_matches(got, grads(reference.pixel_categorical_log_likelihood, f, w, b, x), dtype)


SHAPES = [  # B, C, H, W, channels, K
    (1, 1, 1, 1, 1, 2), (2, 3, 5, 4, 1, 2), (4, 8, 3, 7, 3, 17), (3, 16, 6, 6, 1, 256), (2, 4, 4, 3, 3, 256),
    (5, 2, 1, 9, 3, 2), (1, 7, 8, 2, 1, 17), (7, 5, 2, 2, 3, 5),
]


@pytest.mark.parametrize("seed", range(len(SHAPES)))
def test_random_shapes(seed, device, monkeypatch):
    B, C, H, W, channels, K = SHAPES[seed]
    gen = torch.Generator().manual_seed(100 + seed)
    dtype = (torch.float32, torch.float64)[seed % 2]
    layout = dict(channels_last=seed % 3 == 1, x_dtype=(torch.int64, torch.int32, dtype, torch.uint8)[seed % 4])
    if layout["x_dtype"] == torch.uint8 and K > 256:
        layout["x_dtype"] = torch.int64
    f, w, b, x = make(B, C, H, W, channels, K, dtype=dtype, bias=seed % 2 == 0, seed=seed, device=device, **layout)
    if seed % 4 == 2:  # features with H and W strides swapped, weight stored transposed
        f = f.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
        w = w.detach().t().contiguous().t().requires_grad_()
    pixels = int(torch.randint(1, B * H * W + 2, (), generator=gen))
    monkeypatch.setattr(ops, "LINEAR_CHUNK_BYTES", chunk_bytes(channels, K, dtype, pixels))
    assert_matches(grads(ops.pixel_categorical_log_likelihood, f, w, b, x), truth(f, w, b, x), dtype)


def test_edge_values(device, monkeypatch):
    """Logits about 1e4 in float32, and the classes 0 and K-1: exact integer features and
    weights, so the logits are exact and the float64 reference on them is the truth."""
    B, C, H, W, channels, K = 3, 4, 5, 3, 3, 256
    g = torch.Generator().manual_seed(7)
    f = torch.randint(-3000, 3001, (B, C, H, W), generator=g).float()
    w = torch.randint(-1, 2, (channels * K, C), generator=g).float()
    b = torch.randint(-100, 101, (channels * K,), generator=g).float()
    x = (K - 1) * torch.randint(0, 2, (B, channels, H, W), generator=g)
    assert F.conv2d(f, w[:, :, None, None], b).abs().max() > 5000
    f, w, b, x = (t.to(device) for t in (f, w, b, x))
    monkeypatch.setattr(ops, "LINEAR_CHUNK_BYTES", chunk_bytes(channels, K, torch.float32, 4))
    f, w, b = (t.requires_grad_() for t in (f, w, b))
    got = grads(ops.pixel_categorical_log_likelihood, f, w, b, x)
    for t in got:
        assert torch.isfinite(t).all()
    want = truth(f, w, b, x)
    torch.testing.assert_close(got[0].double().cpu(), want[0], rtol=1e-6, atol=1e-2)
    for a, e in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.double().cpu(), e, rtol=1e-5, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_half(dtype, bias, monkeypatch):
    """Half inputs run the half CUDA kernels (float32 accumulation, float32 lse)."""
    monkeypatch.setattr(ops, "LINEAR_CHUNK_BYTES", chunk_bytes(3, 17, dtype, 7))
    f, w, b, x = make(dtype=dtype, bias=bias, device="cuda")
    got = grads(ops.pixel_categorical_log_likelihood, f, w, b, x)
    want = truth(f, w, b, x)
    tol = {torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]
    for a, e in zip(got, want):
        assert a.dtype == dtype and a.shape == e.shape and torch.isfinite(a).all()
        assert (a.double().cpu() - e).abs().max() <= tol * e.abs().max()
    lse = torch.ops.hvae_fast.pixel_categorical_log_likelihood(f, w, b, x)[1]
    assert lse.dtype == torch.float32


def test_gradcheck(monkeypatch):
    f, w, b, x = make(B=2, C=3, H=2, W=3, channels=2, K=3)
    monkeypatch.setattr(ops, "LINEAR_CHUNK_BYTES", chunk_bytes(2, 3, torch.float64, 5))  # 3 chunks, ragged
    assert torch.autograd.gradcheck(lambda f, w, b: ops.pixel_categorical_log_likelihood(f, w, b, x), (f, w, b))
    assert torch.autograd.gradcheck(lambda f, w: ops.pixel_categorical_log_likelihood(f, w, None, x), (f, w))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels", [1, 3])
def test_opcheck(bias, channels, monkeypatch):
    monkeypatch.setattr(ops, "LINEAR_CHUNK_BYTES", chunk_bytes(channels, 3, torch.float64, 4))
    f, w, b, x = make(B=2, C=3, H=2, W=3, channels=channels, K=3, bias=bias)
    result = torch.library.opcheck(RAW.pixel_categorical_log_likelihood.default, (f, w, b, x))
    assert set(result.values()) == {"SUCCESS"}, result
    f, w, b = (None if t is None else t.detach() for t in (f, w, b))
    lse = RAW.pixel_categorical_log_likelihood(f, w, b, x)[1]
    grad = torch.randn(2, dtype=torch.float64)
    result = torch.library.opcheck(RAW.pixel_categorical_log_likelihood_backward.default, (grad, f, w, b, x, lse))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("bias", [True, False])
def test_compile_fullgraph(bias, monkeypatch):
    monkeypatch.setattr(ops, "LINEAR_CHUNK_BYTES", chunk_bytes(3, 17, torch.float32, 7))
    f, w, b, x = make(dtype=torch.float32, bias=bias)
    fn = torch.compile(lambda f, w, b: ops.pixel_categorical_log_likelihood(f, w, b, x) * 2.0,
                       fullgraph=True, backend="aot_eager")
    got = grads(lambda f, w, b, x: fn(f, w, b), f, w, b, x)
    want = grads(lambda f, w, b, x: ops.pixel_categorical_log_likelihood(f, w, b, x) * 2.0, f, w, b, x)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_autocast_cpu_runs_in_float32():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    head = torch.nn.Conv2d(8, 2 * 17, 1)
    x_in = torch.randn(2, 3, 5, 4)
    x = torch.randint(0, 17, (2, 2, 5, 4)).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x_in)
        assert h.dtype == torch.bfloat16
        ll = ops.pixel_categorical_log_likelihood(h, head.weight[:, :, 0, 0], head.bias, x)
    assert ll.dtype == torch.float32
    want = reference.pixel_categorical_log_likelihood(h.float(), head.weight[:, :, 0, 0], head.bias, x)
    torch.testing.assert_close(ll, want)
    ll.sum().backward()
    for p in (conv.weight, head.weight, head.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_uint8_pixels_with_256_classes():
    """8-bit pixels as uint8 with K = 256 (the reference once compared them with 256 as uint8, i.e. 0)."""
    f, w, b, x = make(channels=1, K=256, x_dtype=torch.uint8)
    assert x.max() > 200
    want = reference.pixel_categorical_log_likelihood(f, w, b, x.long())
    torch.testing.assert_close(reference.pixel_categorical_log_likelihood(f, w, b, x), want)
    torch.testing.assert_close(ops.pixel_categorical_log_likelihood(f, w, b, x), want, **TOL[torch.float64])


def test_empty_image():
    f, w, b, x = make(H=0)
    torch.testing.assert_close(ops.pixel_categorical_log_likelihood(f, w, b, x), torch.zeros(3, dtype=torch.float64))


def test_meta_and_shapes():
    """The fake kernels: shapes, dtypes and the gradient's strides (channels_last, whatever features')."""
    f, w, b, x = (t.detach().to("meta") for t in make(dtype=torch.float32))
    ll, lse = RAW.pixel_categorical_log_likelihood(f, w, b, x)
    assert ll.shape == (3,) and lse.shape == (3 * 4 * 6, 3, 2) and lse.dtype == torch.float32
    gf, gw, gb = RAW.pixel_categorical_log_likelihood_backward(ll, f, w, b, x, lse)
    assert gf.shape == f.shape and gw.shape == w.shape and gb.shape == b.shape
    assert gf.is_contiguous(memory_format=torch.channels_last)


# ---- bad inputs ----------------------------------------------------------------------------

def _args(**kw):
    return tuple(None if t is None else t.detach() for t in make(**kw))


BAD = [  # (f, w, b, x) -> bad args, exception, match
    (lambda f, w, b, x: (f[0], w, b, x), ValueError, r"features must be \[B, C, H, W\]", "3d-features"),
    (lambda f, w, b, x: (f.long(), w, b, x), TypeError, "features must be a floating", "int-features"),
    (lambda f, w, b, x: (f[:0], w, b, x[:0]), ValueError, "features must have a non-empty batch", "empty-batch"),
    (lambda f, w, b, x: ([1.0], w, b, x), TypeError, "features must be a torch.Tensor", "list-features"),
    (lambda f, w, b, x: (f, w[:, :-1], b, x), ValueError, r"weight must be \[channels\*K, C\] with C = 5", "C"),
    (lambda f, w, b, x: (f, w[None], b, x), ValueError, r"weight must be \[channels\*K, C\]", "3d-weight"),
    (lambda f, w, b, x: (f, w.long(), b, x), TypeError, "weight must be a floating", "int-weight"),
    (lambda f, w, b, x: (f, w[:-1], b[:-1], x), ValueError, r"not channels\*K for channels = 3", "rows"),
    (lambda f, w, b, x: (f, w[:3], b[:3], x), ValueError, "need K >= 2", "K1"),
    (lambda f, w, b, x: (f, w, b, x[:-1]), ValueError, r"x must be \[B, channels, H, W\]", "x-batch"),
    (lambda f, w, b, x: (f, w, b, x[:, :, :-1]), ValueError, r"x must be \[B, channels, H, W\]", "x-H"),
    (lambda f, w, b, x: (f, w, b, x[:, :, :, :-1]), ValueError, r"x must be \[B, channels, H, W\]", "x-W"),
    (lambda f, w, b, x: (f, w, b, x[:, 0]), ValueError, r"x must be \[B, channels, H, W\]", "3d-x"),
    (lambda f, w, b, x: (f, w, b, x[:, :0]), ValueError, "channels >= 1", "0-channels"),
    (lambda f, w, b, x: (f, w, b, x.tolist()), TypeError, "x must be a torch.Tensor", "list-x"),
    (lambda f, w, b, x: (f, w, b, x.bool()), TypeError, "x holds class indices; got a bool", "bool-x"),
    (lambda f, w, b, x: (f, w, b, x.to(torch.complex64)), TypeError, "x must be real", "complex-x"),
    (lambda f, w, b, x: (f, w, b[:-1], x), ValueError, "bias has shape", "bias-shape"),
    (lambda f, w, b, x: (f, w, b[None], x), ValueError, "bias has shape", "2d-bias"),
    (lambda f, w, b, x: (f, w, b.long(), x), TypeError, "bias must be a floating", "int-bias"),
    (lambda f, w, b, x: (f, w, b.float(), x), TypeError, "bias has dtype", "bias-dtype"),
    (lambda f, w, b, x: (f, w.float(), b.float(), x), TypeError, "weight has dtype", "weight-dtype"),
    (lambda f, w, b, x: (f, w, b, x.to("meta")), ValueError, "x is on meta but features is on cpu", "x-meta"),
    (lambda f, w, b, x: (f, w.to("meta"), b, x), ValueError, "weight is on meta", "weight-meta"),
    (lambda f, w, b, x: (f, w.to("meta"), b.to("meta"), x), ValueError, "weight is on meta", "weight-bias-meta"),
    (lambda f, w, b, x: (f, w, b.to("meta"), x), ValueError, "bias is on meta", "bias-meta"),
]


@pytest.mark.parametrize("impl", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("change,exc,match", [b[:3] for b in BAD], ids=[b[3] for b in BAD])
def test_bad_input(impl, change, exc, match):
    with pytest.raises(exc, match=f"{OP}: .*{match}"):  # every message names the op
        getattr(impl, OP)(*change(*_args()))


@pytest.mark.parametrize("change,exc,match", [b[:3] for b in BAD if "meta" in b[3]], ids=[b[3] for b in BAD
                                                                                     if "meta" in b[3]])
def test_fake_kernel_checks(change, exc, match):
    """A raw call given a meta tensor beside real ones reaches the fake kernel, which must refuse it."""
    with pytest.raises(exc, match=match):
        RAW.pixel_categorical_log_likelihood(*change(*_args()))


@pytest.mark.parametrize("value,where", [(17, (1, 2, 3, 5)), (-1, (0, 0, 0, 0)), (2.5, (2, 1, 3, 0)),
                                         (1000, (2, 2, 3, 5))])
@pytest.mark.parametrize("impl", [ops, reference], ids=["ops", "reference"])
def test_out_of_range_class_raises(value, where, impl, monkeypatch):
    """On the CPU (the CUDA kernels assert on the device, see tests/test_cuda.py)."""
    monkeypatch.setattr(ops, "LINEAR_CHUNK_BYTES", chunk_bytes(3, 17, torch.float64, 7))  # in a later chunk
    f, w, b, x = make(x_dtype=torch.float64 if isinstance(value, float) else torch.int64)
    x = x.clone()
    x[where] = value
    match = f"{OP}: x holds {value}" + (f"(\\.0)? at \\[{', '.join(map(str, where))}\\]" if impl is ops else "")
    with pytest.raises(IndexError, match=match + r".*not a class index in 0\.\.16"):
        impl.pixel_categorical_log_likelihood(f, w, b, x)


# ---- memory: the full logits are never allocated -------------------------------------------

def cpu_allocations(fn):
    """(peak bytes live, largest single allocation) of torch's CPU allocator while fn runs,
    from the profiler's memory events: allocation sizes, not timings."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = [e["args"] for e in json.load(fh)["traceEvents"] if e.get("name") == "[memory]"]
    events = [e for e in events if e.get("Device Type", 0) == 0]
    assert events
    base = events[0]["Total Allocated"] - events[0]["Bytes"]  # what was live when profiling began
    return max(e["Total Allocated"] for e in events) - base, max(e["Bytes"] for e in events)


def head_steps(f, w, b, x):
    """One forward+backward of the fused head and of F.conv2d + F.cross_entropy (channels = 1)."""
    def fused():
        torch.autograd.grad(ops.pixel_categorical_log_likelihood(f, w, b, x).sum(), (f, w, b))

    def unfused():
        logits = F.conv2d(f, w[:, :, None, None], b)
        ll = -F.cross_entropy(logits, x[:, 0], reduction="none").flatten(1).sum(1)
        torch.autograd.grad(ll.sum(), (f, w, b))

    return fused, unfused


def test_full_logits_never_allocated(monkeypatch):
    B, C, H, W, channels, K = 4, 8, 16, 16, 1, 256
    monkeypatch.setattr(ops, "LINEAR_CHUNK_BYTES", 64 * 2**10)
    f, w, b, x = make(B, C, H, W, channels, K, dtype=torch.float32)
    logits_bytes = B * channels * K * H * W * 4
    features_bytes = f.numel() * 4

    fused, unfused = head_steps(f, w, b, x)

    peak, largest = cpu_allocations(fused)
    assert largest <= max(features_bytes, ops.LINEAR_CHUNK_BYTES)
    assert peak < logits_bytes / 2
    unfused_peak, unfused_largest = cpu_allocations(unfused)
    assert unfused_largest >= logits_bytes  # the measurement sees a logits-sized tensor when there is one
    assert peak < unfused_peak / 4


@pytest.mark.cuda
def test_cuda_peak_memory(monkeypatch):
    B, C, H, W, channels, K = 16, 8, 32, 32, 1, 256
    monkeypatch.setattr(ops, "LINEAR_CHUNK_BYTES", 2**20)
    f, w, b, x = make(B, C, H, W, channels, K, dtype=torch.float32, device="cuda")
    logits_bytes = B * channels * K * H * W * 4

    def peak(fn):
        fn()  # warm: cuBLAS workspaces and the like
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused, unfused = head_steps(f, w, b, x)

    fused_peak, unfused_peak = peak(fused), peak(unfused)
    assert fused_peak < logits_bytes / 4
    assert unfused_peak >= logits_bytes
