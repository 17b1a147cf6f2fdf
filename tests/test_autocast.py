"""Under autocast the ops run in float32 (hvae_fast.ops._registry._autocast_to_float32, called by each op's module)."""
import pytest
import torch

from hvae_fast import ops, reference, train as T

CUDA = pytest.mark.cuda  # skipped without a GPU and the CUDA kernels (tests/conftest.py); selected by -m cuda
CASES = [("cpu", torch.bfloat16), ("cpu", torch.float16),
         pytest.param("cuda", torch.bfloat16, marks=CUDA), pytest.param("cuda", torch.float16, marks=CUDA)]


@pytest.mark.parametrize("device,dtype", CASES)
def test_autocast_runs_ops_in_float32(device, dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 2 * 8 + 64 * 17, device=device)
    h = torch.randn(4, 8, device=device)
    x = torch.randint(0, 17, (4, 64), device=device).float()
    eps = torch.randn(4, 8, device=device)  # float32, while the network's outputs are half
    with torch.autocast(device, dtype=dtype):
        out = lin(h)
        assert out.dtype == dtype
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


@CUDA
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cuda(precision):
    """A short run of the recipe on the GPU under --precision (fp16 with a gradient scaler)."""
    res = T.train(T.TrainConfig(epochs=2, max_train=128, progress=False, precision=precision, device="cuda"))
    assert all(torch.isfinite(torch.tensor(r["val_loss"])) for r in res["history"])
    assert res["history"][-1]["train_loss"] < res["history"][0]["train_loss"]
