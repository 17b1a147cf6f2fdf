"""Under autocast the ops run in float32 (see the end of hvae_fast/ops.py)."""
import torch

from hvae_fast import ops, reference


def test_cpu_bf16_autocast_runs_ops_in_float32():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 2 * 8 + 64 * 17)
    h = torch.randn(4, 8)
    x = torch.randint(0, 17, (4, 64)).float()
    eps = torch.randn(4, 8)  # float32, while the network's outputs are bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(h)
        assert out.dtype == torch.bfloat16
        dmu, dlv, logits = out[:, :8], out[:, 8:16], out[:, 16:].reshape(4, 64, 17)
        z, kl = ops.posterior_sample(dmu, dlv, eps)
        ll = ops.categorical_log_likelihood(logits, x)
        bll = ops.bernoulli_log_likelihood(logits[..., 0], (x > 8).float())
    for t in (z, kl, ll, bll):
        assert t.dtype == torch.float32
    # the same as the float32 reference on the bf16 values
    z_ref, kl_ref = reference.posterior_sample(dmu.float(), dlv.float(), eps)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(kl, kl_ref)
    torch.testing.assert_close(ll, reference.categorical_log_likelihood(logits.float(), x))
    (-(ll - kl).sum() - bll.sum()).backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
