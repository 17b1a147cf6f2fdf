"""Property-based tests: random shapes, strides, dtypes and values (inf, NaN, huge, tiny)
at every op. Each either matches the reference (NaN where the reference gives NaN) or
raises the same kind of clear error; it never crashes.
"""
import pytest
import torch

from hvae_fast import ops, reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4, 1e30, -1e30, 88.0, -104.0,
           float("inf"), float("-inf"), float("nan")]
ERRORS = (ValueError, TypeError, IndexError)
FUZZ = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def tensors(draw, shape, dtype, special=True):
    """A float tensor of `shape`, maybe laid out as a strided view, with special values."""
    n = 1
    for s in shape:
        n *= s
    values = draw(st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=n, max_size=n))
    t = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if special and n:
        for _ in range(draw(st.integers(0, 3))):
            t.view(-1)[draw(st.integers(0, n - 1))] = draw(st.sampled_from(SPECIAL))
    t = t.to(dtype)
    if draw(st.booleans()) and t.dim() >= 2:  # the same values, through a non-contiguous view
        t = t.transpose(0, -1).contiguous().transpose(0, -1)
    return t


shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
batches = st.integers(0, 4)  # 0: the empty batch, refused by both
dtypes = st.sampled_from([torch.float32, torch.float64])


def same_outcome(fast, ref, *args):
    """fast(*args) equals ref(*args), NaN for NaN, or both raise the same kind of error."""
    try:
        want = ref(*args)
    except ERRORS as e:
        with pytest.raises(type(e)):
            fast(*args)
        return
    got = fast(*args)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        tol = dict(rtol=1e-4, atol=1e-3) if g.dtype == torch.float32 else dict(rtol=1e-9, atol=1e-8)
        torch.testing.assert_close(g, w, equal_nan=True, **tol)


@FUZZ
@given(st.data(), batches, shapes, dtypes, st.booleans())
def test_posterior_sample(data, b, rest, dtype, prior):
    shape = (b,) + rest
    args = [data.draw(tensors(shape, dtype)) for _ in range(5 if prior else 3)]
    same_outcome(ops.posterior_sample, reference.posterior_sample, *args)


@FUZZ
@given(st.data(), batches, shapes, st.integers(1, 6), dtypes, st.sampled_from([torch.int64, torch.float32]))
def test_categorical(data, b, rest, k, dtype, x_dtype):
    logits = data.draw(tensors((b,) + rest + (k,), dtype))
    n = b
    for s in rest:
        n *= s
    # mostly valid class indices, sometimes one out of range or not integral
    x = torch.tensor(data.draw(st.lists(st.integers(0, max(k - 1, 0)), min_size=n, max_size=n)),
                     dtype=x_dtype).reshape((b,) + rest)
    if n and data.draw(st.booleans()):
        x.view(-1)[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from([-1, k, 0.5, float("nan")]
                                                                                 if x_dtype.is_floating_point
                                                                                 else [-1, k]))
    same_outcome(ops.categorical_log_likelihood, reference.categorical_log_likelihood, logits, x)


@FUZZ
@given(st.data(), batches, shapes, dtypes, st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]))
def test_bernoulli(data, b, rest, dtype, x_dtype):
    shape = (b,) + rest
    logits = data.draw(tensors(shape, dtype))
    n = logits.numel()
    x = torch.tensor(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)), dtype=torch.float64)
    if n and x_dtype != torch.bool and data.draw(st.booleans()):
        x.view(-1)[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from([2.0, -1.0, 0.5, float("nan")]))
    same_outcome(ops.bernoulli_log_likelihood, reference.bernoulli_log_likelihood, logits, x.reshape(shape).to(x_dtype))
