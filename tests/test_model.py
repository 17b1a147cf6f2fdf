"""The models against the seed's own code (the oracle below), and their shapes and counts."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hvae_fast
from hvae_fast import nets
from hvae_fast.model import BottomUpVAE, HierarchicalVAE, OneLevelVAE, TopDownVAE, log_normal

# ---- the seed's code, nearly verbatim (print removed), with the notebook's helpers ----------
EPS = 1.e-7


def log_categorical(x, p, num_classes=256, reduction=None, dim=None):
    x_one_hot = F.one_hot(x.long(), num_classes=num_classes)
    log_p = x_one_hot * torch.log(torch.clamp(p, EPS, 1. - EPS))
    if reduction == 'avg':
        return torch.mean(log_p, dim)
    elif reduction == 'sum':
        return torch.sum(log_p, dim)
    return log_p


def log_bernoulli(x, p, reduction=None, dim=None):
    pp = torch.clamp(p, EPS, 1. - EPS)
    log_p = x * torch.log(pp) + (1. - x) * torch.log(1. - pp)
    if reduction == 'avg':
        return torch.mean(log_p, dim)
    elif reduction == 'sum':
        return torch.sum(log_p, dim)
    return log_p


class SeedHierarchicalVAE(nn.Module):
    def __init__(self, nn_r_1, nn_r_2, nn_delta_1, nn_delta_2, nn_z_1, nn_x, num_vals=256, D=64, L=16,
                 likelihood_type='categorical'):
        super(SeedHierarchicalVAE, self).__init__()
        self.nn_r_1 = nn_r_1
        self.nn_r_2 = nn_r_2
        self.nn_delta_1 = nn_delta_1
        self.nn_delta_2 = nn_delta_2
        self.nn_z_1 = nn_z_1
        self.nn_x = nn_x
        self.D = D
        self.L = L
        self.num_vals = num_vals
        self.likelihood_type = likelihood_type

    def reparameterization(self, mu, log_var):
        std = torch.exp(0.5 * log_var)
        eps = torch.randn_like(std)
        return mu + std * eps

    def forward(self, x, reduction='avg'):
        r_1 = self.nn_r_1(x)
        r_2 = self.nn_r_2(r_1)
        delta_1 = self.nn_delta_1(r_1)
        delta_mu_1, delta_log_var_1 = torch.chunk(delta_1, 2, dim=1)
        delta_log_var_1 = F.hardtanh(delta_log_var_1, -7., 2.)
        delta_2 = self.nn_delta_2(r_2)
        delta_mu_2, delta_log_var_2 = torch.chunk(delta_2, 2, dim=1)
        delta_log_var_2 = F.hardtanh(delta_log_var_2, -7., 2.)
        z_2 = self.reparameterization(delta_mu_2, delta_log_var_2)
        h_1 = self.nn_z_1(z_2)
        mu_1, log_var_1 = torch.chunk(h_1, 2, dim=1)
        z_1 = self.reparameterization(mu_1 + delta_mu_1, log_var_1 + delta_log_var_1)
        h_d = self.nn_x(z_1)
        if self.likelihood_type == 'categorical':
            b = h_d.shape[0]
            d = h_d.shape[1] // self.num_vals
            h_d = h_d.view(b, d, self.num_vals)
            mu_d = torch.softmax(h_d, 2)
        elif self.likelihood_type == 'bernoulli':
            mu_d = torch.sigmoid(h_d)
        if self.likelihood_type == 'categorical':
            RE = log_categorical(x, mu_d, num_classes=self.num_vals, reduction='sum', dim=-1).sum(-1)
        elif self.likelihood_type == 'bernoulli':
            RE = log_bernoulli(x, mu_d, reduction='sum', dim=-1)
        KL_z_2 = 0.5 * (delta_mu_2**2 + torch.exp(delta_log_var_2) - delta_log_var_2 - 1).sum(-1)
        KL_z_1 = 0.5 * (delta_mu_1**2 / torch.exp(log_var_1) + torch.exp(delta_log_var_1) -
                        delta_log_var_1 - 1).sum(-1)
        KL = KL_z_1 + KL_z_2
        if reduction == 'sum':
            loss = -(RE - KL).sum()
        else:
            loss = -(RE - KL).mean()
        return loss

    def sample(self, batch_size=64):
        z_2 = torch.randn(batch_size, self.L)
        h_1 = self.nn_z_1(z_2)
        mu_1, log_var_1 = torch.chunk(h_1, 2, dim=1)
        z_1 = self.reparameterization(mu_1, log_var_1)
        h_d = self.nn_x(z_1)
        if self.likelihood_type == 'categorical':
            b = batch_size
            d = h_d.shape[1] // self.num_vals
            h_d = h_d.view(b, d, self.num_vals)
            mu_d = torch.softmax(h_d, 2)
            p = mu_d.view(-1, self.num_vals)
            x_new = torch.multinomial(p, num_samples=1).view(b, d)
        elif self.likelihood_type == 'bernoulli':
            mu_d = torch.sigmoid(h_d)
            x_new = torch.bernoulli(mu_d)
        return x_new


# ---- helpers ------------------------------------------------------------------------------

def _digits_batch(n=64, likelihood="categorical"):
    from sklearn.datasets import load_digits
    x = torch.from_numpy(load_digits().data[:n]).float()
    return (x > 8).float() if likelihood == "bernoulli" else x


def _pair(likelihood, backend, seed=0):
    torch.manual_seed(seed)
    num_vals = 17 if likelihood == "categorical" else 2
    networks = nets.reference_networks(num_vals=num_vals, likelihood=likelihood)
    ours = HierarchicalVAE(**copy.deepcopy(networks), num_vals=num_vals, D=64, L=8, likelihood_type=likelihood,
                           backend=backend)
    seed_model = SeedHierarchicalVAE(**copy.deepcopy(networks), num_vals=num_vals, D=64, L=8,
                                     likelihood_type=likelihood)
    return ours, seed_model


def _min_probability(model, x):
    """The smallest probability the seed's clamp sees, for one pass with the same noise."""
    with torch.no_grad():
        _, _, h_d = model._trace(x)
        if model.likelihood_type == "categorical":
            return torch.softmax(h_d.view(x.shape[0], -1, model.num_vals), 2).min().item()
        p = torch.sigmoid(h_d)
        return min(p.min().item(), (1 - p).min().item())


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---- parity with the seed ------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["fused", "torch"])
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
@pytest.mark.parametrize("reduction", ["avg", "sum"])
def test_loss_and_gradients_match_seed(likelihood, backend, reduction):
    ours, seed_model = _pair(likelihood, backend)
    x = _digits_batch(64, likelihood)
    # the seed clamps probabilities at 1e-7: the comparison is valid only where it is inactive
    torch.manual_seed(1)
    assert _min_probability(ours, x) > 1e-6
    for m in (ours, seed_model):
        m.zero_grad()
    torch.manual_seed(123)
    loss_ours = ours(x, reduction=reduction)
    loss_ours.backward()
    torch.manual_seed(123)
    loss_seed = seed_model(x, reduction=reduction)
    loss_seed.backward()
    assert math.isfinite(loss_ours.item())
    assert abs(loss_ours.item() - loss_seed.item()) <= 1e-5 * abs(loss_seed.item())
    params_seed = dict(seed_model.named_parameters())
    n = 0
    for name, p in ours.named_parameters():
        g_seed = params_seed[name].grad
        assert p.grad is not None and g_seed is not None, name
        assert _rel(p.grad, g_seed) <= 1e-5, (name, _rel(p.grad, g_seed))
        n += 1
    assert n == len(params_seed) == 13 * 2 + 7 * 2  # 13 Linear layers + 7 BatchNorms
    # the state dicts are interchangeable with the seed's class
    seed_model.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("in_kernel_noise", [False, True], ids=["randn_like", "in_kernel_noise"])
def test_fused_and_torch_backends_agree(in_kernel_noise):
    fused, _ = _pair("categorical", "fused")
    fused.in_kernel_noise = in_kernel_noise
    plain = copy.deepcopy(fused)
    plain.backend = "torch"
    x = _digits_batch(32)
    torch.manual_seed(5)
    lf = fused(x)
    lf.backward()
    torch.manual_seed(5)
    lt = plain(x)
    lt.backward()
    assert abs(lf.item() - lt.item()) <= 1e-5 * abs(lt.item())
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        assert _rel(a.grad, b.grad) <= 1e-5, name


def test_in_kernel_noise_draws_other_noise_than_randn_like():
    model, _ = _pair("categorical", "fused")
    x = _digits_batch(32)
    torch.manual_seed(5)
    a = model(x)
    model.in_kernel_noise = True
    torch.manual_seed(5)
    b = model(x)
    torch.manual_seed(5)
    assert b.item() == model(x).item() and a.item() != b.item()


def test_sample_matches_seed_and_gives_images():
    for likelihood in ("categorical", "bernoulli"):
        ours, seed_model = _pair(likelihood, "fused")
        ours.eval()
        seed_model.eval()
        torch.manual_seed(7)
        a = ours.sample(10)
        torch.manual_seed(7)
        b = seed_model.sample(10)
        assert a.shape == (10, 64)
        assert torch.equal(a.float(), b.float())
        if likelihood == "categorical":
            assert a.dtype == torch.int64 and a.min() >= 0 and a.max() <= 16
        else:
            assert set(a.unique().tolist()) <= {0.0, 1.0}


def test_elbo_terms_add_up_to_the_loss():
    model = HierarchicalVAE.from_recipe()
    x = _digits_batch(16)
    torch.manual_seed(3)
    terms = model.elbo_terms(x)
    torch.manual_seed(3)
    loss = model(x, reduction="sum")
    assert terms.log_px.shape == (16,) and len(terms.kl) == 2
    assert all(k.shape == (16,) and (k >= 0).all() for k in terms.kl)
    assert torch.allclose(-(terms.log_px - terms.kl[0] - terms.kl[1]).sum(), loss)
    assert (terms.log_px < 0).all()


def test_bad_backend_and_likelihood_are_refused():
    with pytest.raises(ValueError, match="backend"):
        HierarchicalVAE.from_recipe(backend="cuda")
    with pytest.raises(ValueError, match="likelihood"):
        HierarchicalVAE.from_recipe(likelihood_type="gaussian")


# ---- the other models ------------------------------------------------------------------------

def test_parameter_counts():
    assert nets.count_parameters(nets.reference_networks()) == 721_808
    assert nets.count_parameters(HierarchicalVAE.from_recipe()) == 721_808
    assert nets.count_parameters(TopDownVAE.from_config(levels=2)) == 721_808
    assert nets.count_parameters(OneLevelVAE.from_config()) == 440_416


def test_two_level_topdown_equals_hierarchical():
    torch.manual_seed(0)
    h = HierarchicalVAE.from_recipe()
    t = TopDownVAE(encoders=[h.nn_r_1, h.nn_r_2], deltas=[h.nn_delta_1, h.nn_delta_2], priors=[h.nn_z_1],
                   decoder=h.nn_x, latent_dims=[16, 8], num_vals=17, D=64)
    x = _digits_batch(16)
    torch.manual_seed(4)
    a = h(x)
    torch.manual_seed(4)
    b = t(x)
    assert torch.equal(a, b)
    torch.manual_seed(4)
    wa = h.log_weight(x)
    torch.manual_seed(4)
    wb = t.log_weight(x)
    assert torch.equal(wa, wb)


@pytest.mark.parametrize("levels", [1, 2, 4])
@pytest.mark.parametrize("conv", [False, True])
def test_topdown_any_depth(levels, conv):
    torch.manual_seed(0)
    m = TopDownVAE.from_config(levels=levels, M=32, conv=conv, image_shape=(8, 8))
    x = _digits_batch(8)
    terms = m.elbo_terms(x)
    assert len(terms.kl) == levels and m.latent_dims == nets.default_latent_dims(levels)
    loss = m(x)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    means = m.posterior_means(x)
    assert [mu.shape[1] for mu in means] == m.latent_dims
    s = m.sample(5)
    assert s.shape == (5, 64) and s.dtype == torch.int64


@pytest.mark.parametrize("cls, levels", [(HierarchicalVAE, 2), (BottomUpVAE, 2), (BottomUpVAE, 3), (BottomUpVAE, 4)])
def test_log_weight_averages_to_the_elbo(cls, levels):
    # E_q[log w] = ELBO: compare the Monte Carlo means of both over many samples of one image
    torch.manual_seed(0)
    m = (cls.from_recipe() if cls is HierarchicalVAE else cls.from_config(levels=levels)).eval()
    x = _digits_batch(1).repeat(4000, 1)
    with torch.no_grad():
        lw = m.log_weight(x)
        elbo = m.elbo_terms(x).elbo
    se = (lw.std() ** 2 / len(lw) + elbo.std() ** 2 / len(elbo)).sqrt()
    assert torch.isfinite(lw).all()
    assert (lw.mean() - elbo.mean()).abs() < 4 * se + 1e-3


def test_bottomup_two_levels_keep_their_networks():
    # the seed's pitfall model as before the n-level generalisation: its count and parameter names
    m = BottomUpVAE.from_config()
    assert nets.count_parameters(m) == 462480 and m.latent_dims == [16, 8]
    assert {k.split(".")[0] for k in m.state_dict()} == {"nn_q_z1", "nn_q_z2", "nn_p_z1", "nn_x"}


@pytest.mark.parametrize("levels", [3, 4])
def test_bottomup_any_depth(levels):
    torch.manual_seed(0)
    m = BottomUpVAE.from_config(levels=levels, M=32)
    x = _digits_batch(8)
    terms = m.elbo_terms(x)
    assert len(terms.kl) == levels and m.latent_dims == nets.default_latent_dims(levels)
    loss = m(x)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert [mu.shape[1] for mu in m.posterior_means(x)] == m.latent_dims
    assert [k.shape[1] for k in m.kl_per_dim(x)] == m.latent_dims
    assert torch.isfinite(m.log_weight(x)).all()
    assert m.sample(5).shape == (5, 64)
    # a fair comparison: the top-down model's priors and decoder at the same depth; only q differs
    td = TopDownVAE.from_config(levels=levels, M=32)

    def shapes(modules):
        return [p.shape for mod in modules for p in mod.parameters()]
    assert shapes([m.nn_p_z1, *m.p_above]) == shapes(td.priors) and shapes([m.nn_x]) == shapes([td.decoder])


def test_bottomup_and_onelevel_run_both_backends():
    x = _digits_batch(8)
    for cls in (BottomUpVAE, OneLevelVAE):
        torch.manual_seed(0)
        m = cls.from_config()
        m2 = copy.deepcopy(m)
        m2.backend = "torch"
        torch.manual_seed(2)
        a = m(x)
        torch.manual_seed(2)
        b = m2(x)
        assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())
        assert len(m.elbo_terms(x).kl) == len(m.latent_dims)
        assert m.sample(3).shape == (3, 64)
        assert torch.isfinite(m.log_weight(x)).all()


def test_log_normal():
    z = torch.randn(4, 3)
    mu, lv = torch.randn(4, 3), torch.randn(4, 3)
    d = torch.distributions.Normal(mu, torch.exp(0.5 * lv))
    assert torch.allclose(log_normal(z, mu, lv), d.log_prob(z).sum(1), atol=1e-5)
    assert torch.allclose(log_normal(z), torch.distributions.Normal(0., 1.).log_prob(z).sum(1), atol=1e-5)


def test_public_names():
    assert hvae_fast.HierarchicalVAE is HierarchicalVAE
    assert hvae_fast.TopDownVAE is TopDownVAE


@pytest.mark.parametrize("make", ["topdown3", "hierarchical"])
def test_conditional_samples_keep_the_top_levels(make):
    from hvae_fast.model import HierarchicalVAE, TopDownVAE
    torch.manual_seed(0)
    m = (TopDownVAE.from_config(levels=3) if make == "topdown3" else HierarchicalVAE.from_recipe()).eval()
    x = torch.randint(0, 17, (5, 64)).float()
    n = len(m.latent_dims)
    for k in range(n + 1):
        s = m.conditional_sample(x, k)
        assert s.shape == (5, 64) and s.dtype == torch.int64
        mean = m.conditional_sample(x, k, mean=True)
        assert mean.shape == (5, 64) and 0 <= mean.min() and mean.max() <= 16
    # all levels kept: the mean is the reconstruction's, drawn with the same noise
    torch.manual_seed(4)
    a = m.conditional_sample(x, n, mean=True)
    torch.manual_seed(4)
    torch.testing.assert_close(a, m.reconstruct(x))


@pytest.mark.parametrize("make", ["topdown", "hierarchical", "onelevel"])
def test_temperature_zero_gives_the_prior_mean_path(make):
    from hvae_fast.model import HierarchicalVAE, OneLevelVAE, TopDownVAE
    torch.manual_seed(0)
    m = {"topdown": lambda: TopDownVAE.from_config(levels=3), "hierarchical": HierarchicalVAE.from_recipe,
         "onelevel": OneLevelVAE.from_config}[make]().eval()
    m.likelihood_type = "bernoulli"  # a draw of 0/1 from sigmoid(h) is still random; compare its input
    seen = []
    m._sample_x = lambda h: seen.append(h) or h
    m.sample(3, temperature=0.0)
    m.sample(3, temperature=0.0)
    torch.testing.assert_close(seen[0], seen[1])
    m.sample(3, temperature=1.0)
    m.sample(3, temperature=1.0)
    assert not torch.allclose(seen[2], seen[3])


@pytest.mark.parametrize("levels", [2, 4])
def test_kl_per_dim_sums_to_the_elbo_kl_terms(levels):
    from hvae_fast.model import BottomUpVAE, TopDownVAE
    for cls in (BottomUpVAE, TopDownVAE):
        torch.manual_seed(0)
        m = cls.from_config(levels=levels).eval()
        x = torch.randint(0, 17, (6, 64)).float()
        torch.manual_seed(1)
        kl = m.elbo_terms(x).kl
        torch.manual_seed(1)
        per_dim = m.kl_per_dim(x)
        for a, b in zip(kl, per_dim):
            torch.testing.assert_close(a, b.sum(1), rtol=1e-5, atol=1e-4)


def test_the_seeds_class_is_the_top_down_pass_under_the_seeds_names():
    from hvae_fast.model import ConvTopDownVAE, VAEBase
    own = set(vars(HierarchicalVAE))
    assert not own & {"_trace", "_top_down", "_deltas", "_generate", "sample", "conditional_sample", "forward"}
    assert issubclass(HierarchicalVAE, TopDownVAE)
    keys = {k.split(".")[0] for k in HierarchicalVAE.from_recipe().state_dict()}
    assert keys == {"nn_r_1", "nn_r_2", "nn_delta_1", "nn_delta_2", "nn_z_1", "nn_x"}  # the seed's state_dict
    for cls in (TopDownVAE, HierarchicalVAE, BottomUpVAE, OneLevelVAE, ConvTopDownVAE):
        assert cls.sample is VAEBase.sample  # one prior-sampling path, each model its own _generate


@pytest.mark.parametrize("make", ["hierarchical", "topdown2"])
def test_samples_of_the_two_level_classes_are_the_same_draws(make):
    torch.manual_seed(0)
    h = HierarchicalVAE.from_recipe().eval()
    t = TopDownVAE(encoders=[h.nn_r_1, h.nn_r_2], deltas=[h.nn_delta_1, h.nn_delta_2], priors=[h.nn_z_1],
                   decoder=h.nn_x, latent_dims=[16, 8], num_vals=17, D=64).eval()
    m = h if make == "hierarchical" else t
    torch.manual_seed(5)
    a = m.sample(8, temperature=0.7)
    torch.manual_seed(5)  # the seed's sampler: z_2 ~ N(0, T^2), z_1 ~ p(z_1 | z_2) with its std times T
    z_2 = torch.randn(8, 8) * 0.7
    mu_1, log_var_1 = torch.chunk(h.nn_z_1(z_2), 2, dim=1)
    z_1 = mu_1 + torch.exp(0.5 * log_var_1) * torch.randn_like(mu_1) * 0.7
    p = torch.softmax(h.nn_x(z_1).view(8, 64, 17), 2).view(-1, 17)
    assert torch.equal(a, torch.multinomial(p, 1).view(8, 64))


def test_networks_that_draw_noise_run_in_the_seeds_order():
    # Dropout inside nn_r_2 and nn_delta_1: the same draws only if r_1, r_2, delta_1, delta_2 run in that order
    torch.manual_seed(0)
    networks = nets.reference_networks(num_vals=17)
    networks["nn_r_2"] = nn.Sequential(nn.Dropout(0.3), networks["nn_r_2"])
    networks["nn_delta_1"] = nn.Sequential(nn.Dropout(0.3), networks["nn_delta_1"])
    ours = HierarchicalVAE(**copy.deepcopy(networks), num_vals=17, D=64, L=8)
    seed_model = SeedHierarchicalVAE(**copy.deepcopy(networks), num_vals=17, D=64, L=8)
    x = _digits_batch(32)
    torch.manual_seed(3)
    a = ours(x)
    torch.manual_seed(3)
    b = seed_model(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
