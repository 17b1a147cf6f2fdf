"""hvae_fast.reference's written-out gradients against autograd through its forward functions."""
import pytest
import torch
from torch.testing import assert_close

from hvae_fast import reference
from test_ops import BERN, CAT, POST, Case, FLOATS, TOL, dtype_id

CASES = ([Case(POST, s, lay, prior=p) for s in [(3, 5), (2, 3, 4), (1, 7)] for lay in ("contiguous", "transposed")
          for p in (False, True)]
         + [Case(CAT, s, lay, x_dtype=xd) for s in [(3, 4, 17), (2, 5)] for lay in ("contiguous", "sliced")
            for xd in (torch.int64, torch.float32)]
         + [Case(BERN, s, lay, x_dtype=xd) for s in [(3, 7), (2, 3, 4)] for lay in ("contiguous", "transposed")
            for xd in (torch.float32, torch.bool)])


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_written_out_gradients_match_autograd(case, dtype):
    args, leaves = case.build(dtype, "cpu")
    outs = getattr(reference, case.op)(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(5)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o) for o in outs]
    auto = torch.autograd.grad(outs, leaves, cots)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    with torch.no_grad():
        if case.op == POST:
            dmu, dlv, eps, mu_p, lvp = plain
            g_dmu, g_dlv, g_eps, g_lvp = reference.posterior_sample_backward(*cots, dmu, dlv, eps, lvp)
            written = [g_dmu, g_dlv, g_eps] + ([cots[0], g_lvp] if case.prior else [])
        else:
            written = [getattr(reference, case.op + "_backward")(cots[0], *plain)]
    for a, w in zip(auto, written, strict=True):
        assert_close(w, a, **TOL[dtype])


@pytest.mark.parametrize("bound", [-7.0, 2.0])
def test_posterior_gradient_is_zero_at_the_clamp_bounds(bound):
    dlv = torch.full((2, 3), bound, dtype=torch.float64)
    ones = torch.ones(2, 3, dtype=torch.float64)
    _, g_dlv, _, _ = reference.posterior_sample_backward(ones, torch.ones(2, dtype=torch.float64), ones, dlv, ones)
    assert (g_dlv == 0).all()  # as torch's hardtanh_backward
