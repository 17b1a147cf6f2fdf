"""Latents in and out: model.encode / model.decode on every model, and plots.interpolations."""
import math

import pytest
import torch

from hvae_fast import plots
from hvae_fast.model import BottomUpVAE, ConvTopDownVAE, HierarchicalVAE, OneLevelVAE, TopDownVAE


def conv_model(likelihood="categorical", K=256):
    torch.manual_seed(0)
    m = ConvTopDownVAE((1, 12, 12), K, likelihood, channels=8, latent_channels=2, groups=(1, 1, 2)).double()
    for p in m.parameters():  # the zero-initialised last convolutions would hide most of the paths
        if p.dim() == 4 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.05)
    return m.eval()


MAKERS = {
    "hierarchical": lambda: HierarchicalVAE.from_recipe(),
    "topdown3": lambda: TopDownVAE.from_config(levels=3),
    "topdown1": lambda: TopDownVAE.from_config(levels=1),
    "conv": conv_model,
    "onelevel": lambda: OneLevelVAE.from_config(),
    "bottomup3": lambda: BottomUpVAE.from_config(levels=3),
}


def make(name):
    torch.manual_seed(0)
    return MAKERS[name]().eval()


def data(name, B=5):
    g = torch.Generator().manual_seed(1)
    if name == "conv":
        return torch.randint(0, 256, (B, 144), generator=g).double()
    return torch.randint(0, 17, (B, 64), generator=g).float()


@pytest.mark.parametrize("name", MAKERS)
def test_encode_gives_every_level_z1_first_in_its_shape(name):
    m, x = make(name), data(name)
    zs = m.encode(x)
    assert len(zs) == len(m.latent_dims) == len(m.latent_shapes)
    for z, shape, d in zip(zs, m.latent_shapes, m.latent_dims):
        assert z.shape == (5, *shape) and math.prod(shape) == d
    if name == "conv":  # groups finest first: 6x6, then 3x3, then the two 2x2 groups
        assert m.latent_shapes == [(2, 6, 6), (2, 3, 3), (2, 2, 2), (2, 2, 2)]
    if name == "topdown3":
        assert [z.shape[1] for z in zs] == [16, 16, 8]


def test_posterior_means_follow_the_top_down_pass():
    # the seed's model by hand: z2 = dmu2(r2), z1 = mu_p(z2) + dmu1(r1), no noise anywhere
    m, x = make("hierarchical"), data("hierarchical")
    state = torch.get_rng_state()
    z1, z2 = m.encode(x)
    assert torch.equal(torch.get_rng_state(), state)  # the means draw nothing
    r1 = m.nn_r_1(x)
    want2 = torch.chunk(m.nn_delta_2(m.nn_r_2(r1)), 2, dim=1)[0]
    want1 = torch.chunk(m.nn_z_1(want2), 2, dim=1)[0] + torch.chunk(m.nn_delta_1(r1), 2, dim=1)[0]
    torch.testing.assert_close(z2, want2)
    torch.testing.assert_close(z1, want1)
    # the bottom-up model: z1 is q(z1 | x)'s mean, z2 q(z2 | z1)'s mean at that z1
    b = make("bottomup3")
    z = b.encode(x)
    mu1 = torch.chunk(b.nn_q_z1(x), 2, dim=1)[0]
    torch.testing.assert_close(z[0], mu1)
    torch.testing.assert_close(z[1], torch.chunk(b.nn_q_z2(mu1), 2, dim=1)[0])


@pytest.mark.parametrize("name", MAKERS)
def test_decode_of_a_posterior_draw_is_the_reconstruction(name):
    m, x = make(name), data(name)
    torch.manual_seed(7)
    got = m.decode(m.encode(x, sample=True))
    torch.manual_seed(7)
    want = m.reconstruct(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.shape == x.shape
    top = 255 if name == "conv" else 16
    assert 0 <= float(got.detach().min()) and float(got.detach().max()) <= top
    # the means: decode(encode(x)) is a function of x alone
    torch.testing.assert_close(m.decode(m.encode(x)), m.decode(m.encode(x)), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["topdown3", "conv", "bottomup3"])
def test_posterior_draws_differ_and_are_seeded(name):
    m, x = make(name), data(name)
    torch.manual_seed(3)
    a = m.encode(x, sample=True)
    b = m.encode(x, sample=True)
    torch.manual_seed(3)
    c = m.encode(x, sample=True)
    means = m.encode(x)
    for za, zb, zc, mu in zip(a, b, c, means):
        assert not torch.allclose(za, zb)
        assert torch.equal(za, zc)
        assert not torch.allclose(za, mu)


def test_in_kernel_noise_draws_are_seeded_too():
    m, x = make("topdown3"), data("topdown3")
    m.in_kernel_noise = True
    torch.manual_seed(3)
    a = m.encode(x, sample=True)
    torch.manual_seed(3)
    rec = m.reconstruct(x)
    torch.testing.assert_close(m.decode(a), rec, rtol=0, atol=0)
    assert not torch.allclose(a[0], m.encode(x, sample=True)[0])


@pytest.mark.parametrize("name,likelihood", [("topdown3", "categorical"), ("conv", "categorical"),
                                             ("conv", "bernoulli"), ("onelevel", "categorical")])
def test_decoded_draws_are_values_of_the_data(name, likelihood):
    m = conv_model(likelihood, K=2 if likelihood == "bernoulli" else 256) if name == "conv" else make(name)
    x = data(name)
    if likelihood == "bernoulli":
        x = (x > 127).double()
    zs = m.encode(x)
    torch.manual_seed(2)
    a = m.decode(zs, mean=False)
    torch.manual_seed(2)
    assert torch.equal(a, m.decode(zs, mean=False))
    assert a.shape == x.shape
    if likelihood == "bernoulli":
        assert set(a.unique().tolist()) <= {0.0, 1.0}
    else:
        assert a.dtype == torch.int64 and 0 <= a.min() and a.max() <= m.num_vals - 1
    assert not torch.equal(a, m.decode(zs, mean=False))


def test_a_missing_level_is_drawn_from_the_prior_given_the_levels_above():
    m, x = make("hierarchical"), data("hierarchical")
    z1, z2 = m.encode(x)
    torch.manual_seed(5)
    got = m.decode([None, z2])
    torch.manual_seed(5)
    mu, log_var = torch.chunk(m.nn_z_1(z2), 2, dim=1)
    z1_prior = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
    torch.testing.assert_close(got, m._mean_x(m.nn_x(z1_prior)))
    # temperature 0: the prior's mean, the same every time
    torch.testing.assert_close(m.decode([None, z2], temperature=0.0), m._mean_x(m.nn_x(mu)))
    # the conv model: the top groups given, the finest drawn; a different draw from the full encoding
    c, xc = make("conv"), data("conv")
    zs = c.encode(xc)
    torch.manual_seed(5)
    a = c.decode([None, *zs[1:]])
    torch.manual_seed(5)
    torch.testing.assert_close(a, c.decode([None, *zs[1:]]), rtol=0, atol=0)
    assert not torch.allclose(a, c.decode(zs))


@pytest.mark.parametrize("name", ["topdown3", "conv"])
def test_bad_latents_are_refused_with_what_is_wrong(name):
    m, x = make(name), data(name)
    zs = m.encode(x)
    with pytest.raises(ValueError, match=r"has 3 latent level\(s\); got 2" if name == "topdown3" else
                       r"has 4 latent level\(s\); got 3"):
        m.decode(zs[:-1])
    bad = list(zs)
    bad[1] = zs[1].reshape(5, -1)[:, :-1]
    with pytest.raises(ValueError, match=r"zs\[1\] \(z2\) has shape"):
        m.decode(bad)
    bad = list(zs)
    bad[-1] = zs[-1][:3]  # another batch size than z1's
    with pytest.raises(ValueError, match=rf"zs\[{len(zs) - 1}\] \(z{len(zs)}\) has shape \(3, .*expected \(5, "):
        m.decode(bad)
    with pytest.raises(TypeError, match="zs must be a list"):
        m.decode(zs[0])
    with pytest.raises(ValueError, match="every entry of zs is None"):
        m.decode([None] * len(zs))
    with pytest.raises(TypeError, match=r"zs\[0\] \(z1\) must be a tensor or None"):
        m.decode([zs[0].tolist(), *zs[1:]])
    with pytest.raises(ValueError, match=rf"encode: x must be \[B, D\] with D = {m.D}"):
        m.encode(x[:, :-1])


def test_interpolations_are_decoded_encodings():
    m, x = make("topdown3"), data("topdown3", 4)
    xa, xb = x[:2], x[2:]
    za, zb = m.encode(xa), m.encode(xb)
    # every level interpolated: the ends are decode(encode(.)) of the two images
    rows = plots.interpolations(m, xa, xb, depth=3, steps=5)
    assert rows.shape == (2, 5, 64)
    torch.testing.assert_close(rows[:, 0], m.decode(za))
    torch.testing.assert_close(rows[:, -1], m.decode(zb))
    # the top level alone, the rest the first image's posterior means (only z1 reaches x in the MLP model)
    rows = plots.interpolations(m, xa, xb, depth=1, steps=3, rest="posterior")
    torch.testing.assert_close(rows[:, 1], m.decode(za), rtol=0, atol=0)
    # the top level alone, the rest from the prior: the midpoint is decode([None, None, mid])
    # with the same noise at every step
    rows = plots.interpolations(m, xa, xb, depth=1, steps=3, rest="prior", seed=4)
    mid = 0.5 * za[2] + 0.5 * zb[2]
    for i in range(2):
        torch.manual_seed(4 + i)
        torch.testing.assert_close(rows[i, 1], m.decode([None, None, mid[i:i + 1]])[0])
    with pytest.raises(ValueError, match=r"depth must be in 1 \.\. 3 \(the model.s levels\), got 4"):
        plots.interpolations(m, xa, xb, depth=4, steps=3)
    with pytest.raises(ValueError, match="rest must be 'posterior' or 'prior'"):
        plots.interpolations(m, xa, xb, depth=1, steps=3, rest="data")


def test_interpolation_title_says_what_the_other_levels_are():
    assert plots.interpolation_title(1, 3, "posterior") == ("interpolation of the top 1 of 3 levels between posterior "
                                                            "means; the rest: the first image's posterior means; E[x|z]")
    assert "the rest drawn from the prior" in plots.interpolation_title(2, 3, "prior")
    assert plots.interpolation_title(3, 3, "prior") == "interpolation of every level between posterior means; E[x|z]"
