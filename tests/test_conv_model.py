"""ConvTopDownVAE (--arch resnet): the convolutional hierarchy with the fused per-pixel head."""
import copy
import math

import pytest
import torch

from hvae_fast import evaluate, train
from hvae_fast.model import ConvTopDownVAE


def images(B=5, shape=(1, 12, 12), K=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, K, (B, math.prod(shape)), generator=g).double()


def small(shape=(1, 12, 12), K=256, groups=(1, 1, 2), likelihood="categorical", dtype=torch.float64):
    torch.manual_seed(0)
    m = ConvTopDownVAE(shape, K, likelihood, channels=8, latent_channels=2, groups=groups).to(dtype)
    for p in m.parameters():  # the zero-initialised last convolutions would hide most of the paths
        if p.dim() == 4 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.05)
    return m


@pytest.mark.parametrize("shape,groups", [((1, 12, 12), (1, 1, 2)), ((3, 10, 7), (2, 0, 1)), ((1, 28, 28), (1, 2, 2))])
def test_fused_equals_plain_torch(shape, groups):
    assert_backends_agree(small(shape, groups=groups), images(4, shape))


def loss_and_grads(m, x):
    torch.manual_seed(1)
    loss = m(x)
    return loss, torch.autograd.grad(loss, list(m.parameters()))


def assert_same_loss_and_grads(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-10, atol=1e-9)
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-10)


def assert_backends_agree(m, x):
    """The same loss and parameter gradients with the fused ops and with the plain-torch reference."""
    out = {}
    for backend in ("fused", "torch"):
        m.backend = backend
        out[backend] = loss_and_grads(m, x)
    assert_same_loss_and_grads(out["fused"], out["torch"])


def test_levels_are_groups_finest_first():
    m = ConvTopDownVAE((1, 28, 28), groups=(1, 2, 2), latent_channels=8)
    assert m.scales == [(14, 14), (7, 7), (4, 4)]
    assert m.latent_dims == [8 * 196, 8 * 49, 8 * 49, 8 * 16, 8 * 16]
    t = m.elbo_terms(images(3, (1, 28, 28)).float())
    assert len(t.kl) == 5 and t.log_px.shape == (3,) and all(k.shape == (3,) for k in t.kl)


def test_iw_bound_above_elbo_and_kl_per_dim_sums_to_kl():
    m = small().eval()
    x = images(6)
    with torch.no_grad():
        torch.manual_seed(2)
        t = m.elbo_terms(x)
        torch.manual_seed(2)
        per_dim = m.kl_per_dim(x)
    for k, d in zip(t.kl, per_dim):
        torch.testing.assert_close(k, d.sum(1))
    elbo = evaluate.elbo(m, x)["neg_elbo"]
    iw = -evaluate.iw_log_likelihood(m, x, samples=64).double().mean().item()
    assert iw <= elbo + 1e-6


def test_collapsed_groups_have_no_active_units():
    m = small()
    for d in m.deltas:  # q = p at every group: no information about x in any latent
        torch.nn.init.zeros_(d.weight)
        torch.nn.init.zeros_(d.bias)
    x = images(8)
    assert evaluate.active_units(m, x) == [0] * len(m.latent_dims)
    assert all(float(k.detach().abs().max()) < 1e-12 for k in m.elbo_terms(x).kl)


def test_samples_conditional_samples_and_temperature():
    m = small().eval()
    x = images(4)
    s = m.sample(3)
    assert s.shape == (3, 144) and s.dtype == torch.int64 and 0 <= s.min() and s.max() <= 255
    n = len(m.latent_dims)
    for keep in range(n + 1):
        assert m.conditional_sample(x, keep).shape == (4, 144)
    # keeping every group is the posterior's own path: the features of a reconstruction
    torch.manual_seed(3)
    want = m._trace(x)[2]
    torch.manual_seed(3)
    got = m._top_down(4, m._encode(x), keep=n)[0]
    torch.testing.assert_close(got, want)
    # temperature 0: every group at its prior mean, the same features on every draw
    a, b = m._top_down(2, temperature=0.0)[0], m._top_down(2, temperature=0.0)[0]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(m._top_down(2, temperature=1.0)[0], m._top_down(2, temperature=1.0)[0])


def test_bernoulli_and_rgb():
    m = small((3, 8, 8), K=2, groups=(1, 1), likelihood="bernoulli")
    x = images(4, (3, 8, 8), K=2)
    loss = m(x)
    loss.backward()
    assert torch.isfinite(loss) and m.reconstruct(x).shape == (4, 192)
    assert set(m.sample(2).unique().tolist()) <= {0.0, 1.0}


def test_bad_groups():
    with pytest.raises(ValueError, match="at least one in all"):
        ConvTopDownVAE((1, 8, 8), groups=(0, 0))


def test_trains_and_resumes_through_train(tmp_path):
    from hvae_fast.data import Dataset
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (60, 144), generator=g, dtype=torch.uint8)
    ds = Dataset(x[:40], x[40:50], x[50:], num_vals=256, image_shape=(12, 12), name="tiny")
    cfg = train.TrainConfig(arch="resnet", conv_channels=8, latent_channels=2, groups=[1, 1], epochs=3,
                            batch_size=16, progress=False)
    full = train.train(cfg, ds, out=str(tmp_path / "a"))
    assert type(full["model"]).__name__ == "ConvTopDownVAE" and len(full["history"]) == 3
    part = train.train(train.TrainConfig(**{**cfg.to_dict(), "epochs": 2}), ds, out=str(tmp_path / "b"))
    assert len(part["history"]) == 2
    res = train.train(dataset=ds, out=str(tmp_path / "b"), resume=str(tmp_path / "b" / "last.pt"),
                      overrides={"epochs": 3})
    assert [r["val_loss"] for r in res["history"]] == [r["val_loss"] for r in full["history"]]
    model, config = train.model_from_checkpoint(str(tmp_path / "a" / "best.pt"))
    assert config.arch == "resnet" and model.latent_dims == full["model"].latent_dims


def test_resnet_needs_images():
    from hvae_fast.data import Dataset
    x = torch.zeros(30, 7, dtype=torch.uint8)
    ds = Dataset(x[:10], x[10:20], x[20:], num_vals=256, image_shape=None)
    with pytest.raises(ValueError, match="needs image-shaped data"):
        train.train(train.TrainConfig(arch="resnet", epochs=1, progress=False), ds)


# ---- likelihood_type="dmol": PixelCNN++'s discretized logistic mixture on the per-pixel head ----

def small_dmol(shape=(3, 8, 8), K=256, M=3, groups=(1, 1)):
    torch.manual_seed(0)
    m = ConvTopDownVAE(shape, K, "dmol", channels=8, latent_channels=2, groups=groups, num_mixtures=M).double()
    for p in m.parameters():
        if p.dim() == 4 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.05)
    return m


@pytest.mark.parametrize("shape,M", [((1, 12, 12), 4), ((3, 8, 8), 3), ((2, 6, 5), 1)])
def test_dmol_head_fused_equals_plain_torch(shape, M):
    m = small_dmol(shape, M=M)
    C = shape[0]
    assert m.head.out_channels == M * (1 + 2 * C + C * (C - 1) // 2)
    assert_backends_agree(m, images(4, shape))


def test_dmol_log_px_is_the_op_on_the_head():
    from hvae_fast import reference
    m = small_dmol().eval()
    x = images(3, (3, 8, 8))
    torch.manual_seed(2)
    log_px, _, features = m._trace(m._input(x))
    want = reference.dmol_log_likelihood(m.head(features), x.long().view(3, 3, 8, 8), num_mixtures=3)
    torch.testing.assert_close(log_px, want)
    # uint8 data (the stored form) scores the same as its float copy
    torch.manual_seed(2)
    torch.testing.assert_close(m.elbo_terms(x.to(torch.uint8)).log_px, log_px)


def test_dmol_pictures_samples_means_latents():
    m = small_dmol((3, 8, 8), K=16).eval()
    x = images(4, (3, 8, 8), K=16)
    s = m.sample(5)
    assert s.shape == (5, 192) and s.dtype == torch.int64 and 0 <= s.min() and s.max() <= 15
    r = m.reconstruct(x)
    assert r.shape == (4, 192) and r.is_floating_point() and 0 <= r.min() and r.max() <= 15
    zs = m.encode(x)
    torch.testing.assert_close(m.decode(zs), m.decode(zs))  # means, no noise
    drawn = m.decode(zs, mean=False)
    assert drawn.dtype == torch.int64 and drawn.shape == (4, 192)
    for keep in range(len(m.latent_dims) + 1):
        assert m.conditional_sample(x, keep, mean=True).shape == (4, 192)


def test_dmol_training_fits_a_batch():
    m = small_dmol((1, 8, 8), K=256, M=2).float()
    ramp = torch.arange(64.0).view(1, 64) * 4  # structured pictures: uniform noise has no slack below 8 bits
    x = torch.cat([ramp, 255 - ramp, ramp.flip(1), torch.full_like(ramp, 128)]).repeat(4, 1)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    torch.manual_seed(0)
    first = m(x).item()
    for _ in range(60):
        opt.zero_grad()
        loss = m(x)
        loss.backward()
        opt.step()
    assert math.isfinite(loss.item()) and loss.item() < 0.7 * first


def test_dmol_refuses_what_it_cannot_score():
    m = small_dmol((1, 4, 4), groups=(1,))
    with pytest.raises(ValueError, match="whole pixel values 0..num_vals-1; x holds 2.5"):
        m(torch.full((2, 16), 2.5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"not a pixel value in 0..255"):
        m(torch.full((2, 16), 256.0, dtype=torch.float64))
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="num_mixtures must be an integer >= 1"):
            ConvTopDownVAE((1, 4, 4), 256, "dmol", groups=(1,), num_mixtures=bad)
    from hvae_fast import TopDownVAE
    with pytest.raises(ValueError, match=r"'dmol' needs a per-pixel head: ConvTopDownVAE"):
        TopDownVAE.from_config(likelihood_type="dmol")


def test_dmol_trains_resumes_and_evaluates_through_train(tmp_path):
    from hvae_fast.data import Dataset
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 3 * 36), generator=g, dtype=torch.uint8)
    ds = Dataset(x[:32], x[32:40], x[40:], num_vals=256, image_shape=(6, 6), name="rgb", channels=3)
    cfg = train.TrainConfig(arch="resnet", likelihood="dmol", mixtures=2, conv_channels=8, latent_channels=2,
                            groups=[1, 1], epochs=2, batch_size=16, progress=False, image_channels=3)
    full = train.train(cfg, ds, out=str(tmp_path / "a"))
    assert full["model"].likelihood_type == "dmol" and full["model"].num_mixtures == 2
    part = train.train(train.TrainConfig(**{**cfg.to_dict(), "epochs": 1}), ds, out=str(tmp_path / "b"))
    res = train.train(dataset=ds, out=str(tmp_path / "b"), resume=str(tmp_path / "b" / "last.pt"),
                      overrides={"epochs": 2})
    assert len(part["history"]) == 1
    assert [r["val_loss"] for r in res["history"]] == [r["val_loss"] for r in full["history"]]
    model, config = train.model_from_checkpoint(str(tmp_path / "a" / "best.pt"))
    assert config.likelihood == "dmol" and model.head.out_channels == 2 * (1 + 6 + 3)
    res = evaluate.evaluate(model, ds.test, iw_samples=4)
    assert math.isfinite(res["bpd"]) and res["iw_nll"] <= res["neg_elbo"] + 3 * res["iw_nll_se"]


@pytest.mark.parametrize("likelihood,shape", [("categorical", (1, 12, 12)), ("dmol", (3, 8, 8))])
def test_channels_last_computes_what_the_contiguous_model_does(likelihood, shape):
    m = small(shape, likelihood=likelihood) if likelihood == "categorical" else small_dmol(shape)
    x = images(4, shape)
    cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
    assert any(p.dim() == 4 and not p.is_contiguous() for p in cl.parameters())  # the format took
    assert_same_loss_and_grads(loss_and_grads(cl, x), loss_and_grads(m, x))


def test_channels_last_setting_trains_saves_and_loads(tmp_path):
    from hvae_fast.data import Dataset
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 144), generator=g, dtype=torch.uint8)
    ds = Dataset(x[:32], x[32:40], x[40:], num_vals=256, image_shape=(12, 12), name="tiny")
    base = dict(arch="resnet", conv_channels=8, latent_channels=2, groups=[1, 1], epochs=2, batch_size=16,
                progress=False)
    plain = train.train(train.TrainConfig(**base), ds)
    res = train.train(train.TrainConfig(**base, channels_last=True), ds, out=str(tmp_path / "a"))
    convs = [p for p in res["model"].parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)
    # the same run in another memory layout: the same curve up to float rounding
    for a, b in zip(res["history"], plain["history"]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    model, config = train.model_from_checkpoint(str(tmp_path / "a" / "best.pt"))
    assert config.channels_last and all(p.is_contiguous(memory_format=torch.channels_last)
                                        for p in model.parameters() if p.dim() == 4)
    for p, q in zip(model.parameters(), res["model"].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_channels_last_is_a_resnet_setting():
    with pytest.raises(train.SettingError, match="channels.last.*resnet"):
        train.TrainConfig(channels_last=True).check()


@pytest.mark.parametrize("likelihood", ["dmol", "bernoulli"])
def test_the_head_runs_in_float32_under_bf16_autocast(likelihood):
    torch.manual_seed(0)
    m = ConvTopDownVAE((1, 8, 8), 256 if likelihood == "dmol" else 2, likelihood, channels=8, latent_channels=2,
                       groups=(1, 1), num_mixtures=3)
    features = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.head(features).dtype == torch.bfloat16  # what autocast would do to it
        out = m._head(features.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, m.head(features.bfloat16().float()), rtol=0, atol=0)
