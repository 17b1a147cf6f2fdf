"""linear_categorical_log_likelihood: the decoder's last Linear fused with the likelihood."""
import collections

import pytest
import torch

from hvae_fast import ops, reference

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-9)}


def make(B=6, H=9, D=11, K=17, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, H, dtype=dtype, generator=g).requires_grad_()
    w = (torch.randn(D * K, H, dtype=dtype, generator=g) * 0.5).requires_grad_()
    b = torch.randn(D * K, dtype=dtype, generator=g).requires_grad_() if bias else None
    x = torch.randint(0, K, (B, D), generator=g)
    return h, w, b, x


def grads(fn, h, w, b, x):
    out = fn(h, w, b, x)
    params = [t for t in (h, w, b) if t is not None]
    return [out] + list(torch.autograd.grad(out.sum() * 1.5, params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_pixels", [1, 4, 1000])  # many chunks, a ragged last one, one chunk
def test_matches_reference(dtype, bias, chunk_pixels, monkeypatch):
    h, w, b, x = make(dtype=dtype, bias=bias)
    monkeypatch.setattr(ops, "LINEAR_CHUNK_BYTES", h.shape[0] * 17 * h.element_size() * chunk_pixels)
    for got, want in zip(grads(ops.linear_categorical_log_likelihood, h, w, b, x),
                         grads(reference.linear_categorical_log_likelihood, h, w, b, x)):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("chunk_pixels, chunks", [(1, 11), (4, 3), (1000, 1)])
def test_the_chunks_follow_the_package_setting(chunk_pixels, chunks, monkeypatch):
    """hvae_fast.ops.LINEAR_CHUNK_BYTES set on the package sets the chunks, forward and backward
    (the op's module reads it there at each call)."""
    h, w, b, x = make()  # D = 11 pixels, K = 17
    monkeypatch.setattr(ops, "LINEAR_CHUNK_BYTES", h.shape[0] * 17 * h.element_size() * chunk_pixels)
    with torch.autograd.profiler.profile() as prof:
        grads(ops.linear_categorical_log_likelihood, h, w, b, x)
    calls = collections.Counter(e.name for e in prof.function_events)
    assert calls["hvae_fast::categorical_log_likelihood"] == chunks
    assert calls["hvae_fast::categorical_log_likelihood_backward_"] == chunks


def test_gradcheck(monkeypatch):
    h, w, b, x = make(B=3, H=4, D=5, K=3)
    monkeypatch.setattr(ops, "LINEAR_CHUNK_BYTES", 3 * 3 * 8 * 2)
    assert torch.autograd.gradcheck(lambda h, w, b: ops.linear_categorical_log_likelihood(h, w, b, x), (h, w, b))


def test_opcheck():
    h, w, b, x = make(B=3, H=4, D=5, K=3)
    torch.library.opcheck(torch.ops.hvae_fast.linear_categorical_log_likelihood.default, (h, w, b, x))
    torch.library.opcheck(torch.ops.hvae_fast.linear_categorical_log_likelihood.default, (h, w, None, x))


def test_compile_fullgraph():
    h, w, b, x = make(dtype=torch.float32)
    fn = torch.compile(lambda h, w, b: ops.linear_categorical_log_likelihood(h, w, b, x).sum(),
                       fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(h, w, b), ops.linear_categorical_log_likelihood(h, w, b, x).sum())


@pytest.mark.parametrize("change, match", [
    (lambda h, w, b, x: (h, w[:, :-1], b, x), "weight"),
    (lambda h, w, b, x: (h, w[:-1], b[:-1], x), "D\\*K"),
    (lambda h, w, b, x: (h, w, b[:-1], x), "bias"),
    (lambda h, w, b, x: (h, w, b, x[:-1]), "x must be"),
    (lambda h, w, b, x: (h, w.float(), b, x), "dtype"),
    (lambda h, w, b, x: (h, w, b, x + 17), "class index"),
])
def test_bad_input(change, match):
    args = change(*(t.detach() if t is not None else None for t in make()))
    for fn in (ops.linear_categorical_log_likelihood, reference.linear_categorical_log_likelihood):
        with pytest.raises((ValueError, TypeError, IndexError), match=match):
            fn(*args)
