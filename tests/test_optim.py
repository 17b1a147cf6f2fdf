"""hvae_fast.optim.Adamax (the fused step, hvae_fast.ops.adamax_) against torch.optim.Adamax
and hvae_fast.reference.adamax_."""
import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from hvae_fast import ops, reference
from hvae_fast.optim import Adamax
from test_ops import FLOATS, RAW, dtype_id

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}


def net(dtype, device):
    # no bias before the BatchNorm: its gradient would be 0 up to rounding, and Adamax
    # (|g| against eps = 1e-8) would turn that rounding noise into steps
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 33, bias=False), nn.BatchNorm1d(33), nn.LeakyReLU(),
                         nn.Linear(33, 5)).to(device, dtype)


def train(model, opt, steps, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 7, generator=gen, dtype=dtype).to(device)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("kw", [{}, {"weight_decay": 1e-2, "lr": 3e-2, "betas": (0.8, 0.99), "eps": 1e-6}],
                         ids=["defaults", "options"])
def test_matches_torch_adamax(kw, dtype, device):
    a, b = net(dtype, device), net(dtype, device)
    train(a, torch.optim.Adamax(a.parameters(), **kw), 25, dtype, device)
    train(b, Adamax(b.parameters(), **kw), 25, dtype, device)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert_close(q, p, **TOL[dtype], msg=name)


def test_exp_avg_takes_torch_lerp_from_the_nearer_end():
    # torch's lerp computes g - (g - m) * beta1 once the weight 1 - beta1 is 0.5 or more;
    # the fused step does the same, so the first moment matches torch's bits for any beta1
    for beta1 in (0.3, 0.9):
        a, b = net(torch.float32, "cpu"), net(torch.float32, "cpu")
        oa = torch.optim.Adamax(a.parameters(), betas=(beta1, 0.999), foreach=False)
        ob = Adamax(b.parameters(), betas=(beta1, 0.999))
        train(a, oa, 5, torch.float32, "cpu")
        train(b, ob, 5, torch.float32, "cpu")
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(ob.state[q]["exp_avg"], oa.state[p]["exp_avg"]), beta1


def test_state_dict_moves_between_torch_and_hvae_fast():
    a, b = net(torch.float32, "cpu"), net(torch.float32, "cpu")
    oa, ob = torch.optim.Adamax(a.parameters()), Adamax(b.parameters())
    train(a, oa, 5, torch.float32, "cpu")
    train(b, ob, 5, torch.float32, "cpu")
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for k in ("step", "exp_avg", "exp_inf"):
            assert_close(sb["state"][i][k], sa["state"][i][k], **TOL[torch.float32])
    # swap: torch's state into ours and ours into torch's, then go on alike
    ob.load_state_dict(copy.deepcopy(sa))  # load_state_dict may keep the very tensors it is given
    b.load_state_dict(a.state_dict())
    c = copy.deepcopy(a)
    oc = torch.optim.Adamax(c.parameters())
    oc.load_state_dict(copy.deepcopy(sa))
    train(b, ob, 5, torch.float32, "cpu", seed=2)
    train(c, oc, 5, torch.float32, "cpu", seed=2)
    for p, q in zip(c.parameters(), b.parameters()):
        assert_close(q, p, **TOL[torch.float32])


def test_parameters_the_fused_step_does_not_take():
    """No grad, a non-contiguous parameter and a maximize group go through torch's step."""
    def params():
        torch.manual_seed(0)
        return [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3, 4).t()), nn.Parameter(torch.randn(5)),
                nn.Parameter(torch.randn(2))]

    results = []
    for cls in (torch.optim.Adamax, Adamax):
        ps = params()
        opt = cls([{"params": ps[:3]}, {"params": ps[3:], "maximize": True}], lr=0.1)
        for step in range(4):
            opt.zero_grad()
            loss = (ps[0].sum(1) ** 2).sum() + (ps[1] * ps[0]).sum() + (ps[3] ** 3).sum()
            if step % 2:
                loss = loss + ps[2].square().sum()  # ps[2] has a gradient every other step only
            loss.backward()
            opt.step()
        results.append(ps)
    for p, q in zip(*results):
        assert_close(q, p, **TOL[torch.float32])


def test_step_hooks_run_once():
    model = net(torch.float32, "cpu")
    opt = Adamax([{"params": model[0].parameters()}, {"params": model[3].parameters(), "maximize": True}])
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    train(model, opt, 2, torch.float32, "cpu")
    assert calls == ["pre", "post"] * 2


def lists(shapes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(s, scale=1.0):
        return (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    params = [r(s) for s in shapes]
    grads = [r(s, 0.1) for s in shapes]
    exp_avgs = [r(s, 0.01) for s in shapes]
    exp_infs = [r(s, 0.01).abs() for s in shapes]
    return params, grads, exp_avgs, exp_infs


EDGE = [float("nan"), float("inf"), -float("inf"), 0.0, 1e30]


@pytest.mark.parametrize("dtype", FLOATS, ids=dtype_id)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_op_matches_reference(weight_decay, dtype, device):
    shapes = [(3, 5), (1,), (0,), (70000,), (2, 3, 4)]  # (70000,) runs on several threads
    fast = lists(shapes, dtype, device)
    for i, v in enumerate(EDGE):  # edge values in the gradients
        fast[1][3][i] = v
    ref = [[t.clone() for t in ts] for ts in fast]
    neg_clrs = [-1e-3 / (1 - 0.9 ** k) for k in range(1, len(shapes) + 1)]
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay)
    ops.adamax_(*fast, neg_clrs, **kw)
    reference.adamax_(*ref, neg_clrs, **kw)
    for a, b in zip(sum(fast, []), sum(ref, [])):
        assert_close(a, b, **TOL[dtype], equal_nan=True)
    assert fast[0][3][:3].isnan().all()  # a NaN or infinite gradient shows, as in torch


def test_opcheck():
    args = (*lists([(3, 5), (7,)], torch.float64, "cpu"), [-1e-3, -2e-3], 0.9, 0.999, 1e-8, 0.01)
    result = torch.library.opcheck(RAW.adamax_.default, args)
    assert set(result.values()) == {"SUCCESS"}, result


def _bad(kind):
    p, g, m, u = lists([(3, 5), (7,)], torch.float32, "cpu")
    clrs = [-1e-3, -1e-3]
    if kind == "lengths":
        g = g[:1]
    elif kind == "shape":
        m[1] = torch.zeros(8)
    elif kind == "dtype":
        u[0] = u[0].double()
    elif kind == "contiguous":
        g[0] = torch.zeros(5, 3).t()
    elif kind == "integer":
        p[1] = torch.zeros(7, dtype=torch.int64)
    return p, g, m, u, clrs


BAD = [("lengths", ValueError, "one entry each per parameter"), ("shape", ValueError, "exp_avgs.* has shape"),
       ("dtype", TypeError, "exp_infs.* has dtype"), ("contiguous", ValueError, "grads.* must be contiguous"),
       ("integer", TypeError, "must be a floating-point tensor")]


@pytest.mark.parametrize("impl", ["ops", "raw"])
@pytest.mark.parametrize("kind,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise(impl, kind, exc, match):
    args = _bad(kind)
    with pytest.raises(exc, match=match):
        if impl == "ops":
            ops.adamax_(*args, beta1=0.9, beta2=0.999, eps=1e-8)
        else:
            RAW.adamax_(*args, 0.9, 0.999, 1e-8, 0.0)
