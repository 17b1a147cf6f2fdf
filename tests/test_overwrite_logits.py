"""categorical_log_likelihood(..., overwrite_logits=True): the backward writes the
gradient into the logits' storage; results equal the out-of-place path."""
import pytest
import torch

from hvae_fast import HierarchicalVAE, TopDownVAE, ops, reference


def make(dtype=torch.float64, K=17):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 5 * K, dtype=dtype, generator=g).requires_grad_()
    h = torch.randn(4, 8, dtype=dtype, generator=g)
    x = torch.randint(0, K, (4, 5), generator=g)
    return w, h, x, K


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_gradient_and_logits_hold_it(dtype):
    w, h, x, K = make(dtype)
    grads = []
    for flag in (False, True):
        logits = (h @ w).view(4, 5, K)  # a matmul's output: its backward does not need it
        ll = ops.categorical_log_likelihood(logits, x, overwrite_logits=flag)
        (g_w,) = torch.autograd.grad((ll * torch.arange(1.0, 5.0, dtype=dtype)).sum(), w)
        grads.append(g_w)
        if flag:  # the logits now hold d(sum ll * c)/d logits
            want = torch.autograd.grad((reference.categorical_log_likelihood((h @ w).view(4, 5, K), x)
                                        * torch.arange(1.0, 5.0, dtype=dtype)).sum(), w)[0]
            torch.testing.assert_close(grads[-1], want)
            assert not torch.allclose(logits, (h @ w).view(4, 5, K))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_another_saved_use_of_the_logits_fails_loudly():
    w, h, x, K = make()
    logits = (h @ w).view(4, 5, K)
    other = torch.sin(logits).sum()  # sin saves its input, the logits
    ll = ops.categorical_log_likelihood(logits, x, overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (ll.sum() + other).backward()


def test_non_contiguous_logits_fall_back_to_a_fresh_gradient():
    w, h, x, K = make()
    base = (h @ w).view(4, K, 5)
    logits = base.transpose(1, 2)
    before = logits.detach().clone()
    ll = ops.categorical_log_likelihood(logits, x, overwrite_logits=True)
    (g_w,) = torch.autograd.grad(ll.sum(), w)
    torch.testing.assert_close(logits.detach(), before)  # untouched
    want = torch.autograd.grad(reference.categorical_log_likelihood((h @ w).view(4, K, 5).transpose(1, 2), x)
                               .sum(), w)[0]
    torch.testing.assert_close(g_w, want)


@pytest.mark.parametrize("make_model", [lambda b: HierarchicalVAE.from_recipe(backend=b),
                                        lambda b: TopDownVAE.from_config(levels=3, backend=b)])
def test_models_built_by_the_package_overwrite_and_match_the_reference(make_model):
    x = torch.randint(0, 17, (16, 64)).float()
    grads = {}
    for backend in ("fused", "torch"):
        torch.manual_seed(0)
        model = make_model(backend)
        assert model.overwrite_logits
        torch.manual_seed(1)
        model(x).backward()
        grads[backend] = [p.grad for p in model.parameters()]
    for a, b in zip(grads["fused"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_hand_built_model_keeps_the_logits():
    from hvae_fast import reference_networks
    assert not HierarchicalVAE(**reference_networks(), num_vals=17, D=64, L=8).overwrite_logits


def test_opcheck_of_the_inplace_backward():
    w, h, x, K = make()
    logits = (h @ w).detach().view(4, 5, K)
    _, lse = torch.ops.hvae_fast.categorical_log_likelihood(logits, x)
    torch.library.opcheck(torch.ops.hvae_fast.categorical_log_likelihood_backward_.default,
                          (torch.ones(4, dtype=logits.dtype), logits.clone(), x, lse))


def test_compile_ignores_the_flag_and_matches_eager():
    w, h, x, K = make(torch.float32)

    def f(w):
        return ops.categorical_log_likelihood((h @ w).view(4, 5, K), x, overwrite_logits=True).sum()

    (want,) = torch.autograd.grad(f(w), w)
    (got,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(w), w)
    torch.testing.assert_close(got, want)
