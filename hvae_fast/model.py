"""The models: the seed's HierarchicalVAE, an n-level TopDownVAE, and two baselines.

The arithmetic of the ELBO runs in three functions (posterior_sample and the two
log-likelihoods). `backend='fused'` takes them from hvae_fast.ops (the compiled kernels, or
the registered fallback where there is none); `backend='torch'` takes them from
hvae_fast.reference. That table is the only thing the models choose; they never look at
the device.

Every model gives:
  forward(x, reduction='avg')  the loss, -ELBO, averaged (or summed) over the batch
  elbo_terms(x)                ELBOTerms: per-example log p(x|z1) and KL per level
  log_weight(x)                one importance weight log p(x, z) - log q(z|x) per example
  posterior_means(x)           the posterior mean of each level (for active units)
  sample(batch_size)           new images
  encode(x, sample=False)      the latents of every level: q's means along the pass, or one draw
  decode(zs, mean=True)        E[x | z] (or a draw of x) at given latents
Levels are always listed bottom to top: index 0 is z1, the last is the top level.
"""
import math
from collections import namedtuple
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, reference
from . import nets as _nets

Backend = namedtuple("Backend", "posterior_sample categorical_log_likelihood bernoulli_log_likelihood "
                                "pixel_categorical_log_likelihood dmol_log_likelihood")

BACKENDS = {name: Backend(m.posterior_sample, m.categorical_log_likelihood, m.bernoulli_log_likelihood,
                          m.pixel_categorical_log_likelihood, m.dmol_log_likelihood)
            for name, m in (("fused", ops), ("torch", reference))}

MIN_LOGVAR, MAX_LOGVAR = -7.0, 2.0  # the seed's hardtanh bounds on the delta log-variance
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class ELBOTerms:
    """The ELBO's parts, per example: log_px [B] and kl, one [B] tensor per level (z1 first)."""
    log_px: torch.Tensor
    kl: List[torch.Tensor]

    @property
    def kl_total(self):
        return sum(self.kl)

    @property
    def elbo(self):
        return self.log_px - self.kl_total


@dataclass
class Level:
    """One latent level of one pass: the sample, its KL term, q's and p's parameters.

    p_mean/p_logvar None means the standard normal prior. q_mean/q_logvar are only filled
    when the pass is asked for them (log_weight, posterior_means).
    """
    z: torch.Tensor
    kl: torch.Tensor
    q_mean: Optional[torch.Tensor] = None
    q_logvar: Optional[torch.Tensor] = None
    p_mean: Optional[torch.Tensor] = None
    p_logvar: Optional[torch.Tensor] = None


def _own_networks(model):
    """A model built from the package's networks: see VAEBase.overwrite_logits."""
    model.overwrite_logits = True
    return model


def log_normal(z, mean=None, logvar=None):
    """log N(z | mean, exp(logvar)) summed over dim 1; mean = logvar = None: N(0, 1)."""
    if mean is None:
        return -0.5 * (_LOG_2PI + z**2).sum(1)
    return -0.5 * (_LOG_2PI + logvar + (z - mean)**2 * torch.exp(-logvar)).sum(1)


def _dmol_channels(M, C):
    """The parameter channels of a discretized logistic mixture: logits, means, log-scales, couplings."""
    return M * (1 + 2 * C + C * (C - 1) // 2)


def _pixel_values(x):
    """x as int64 pixel values for dmol_log_likelihood: the models take stored data as floats
    (_input), whose values are whole numbers; anything else is refused, not truncated."""
    if not x.is_floating_point():
        return x.long()
    v = torch.round(x)
    if not torch.equal(v, x):
        bad = x[v != x][0].item()
        raise ValueError(f"likelihood 'dmol' takes whole pixel values 0..num_vals-1; x holds {bad}")
    return v.long()


def clamp_logvar(delta_logvar):
    return F.hardtanh(delta_logvar, MIN_LOGVAR, MAX_LOGVAR)


class VAEBase(nn.Module):
    """What every model shares: the backend table, the likelihood, the ELBO bookkeeping."""

    # True: the categorical backward writes its gradient into the decoder's output
    # (hvae_fast.ops.categorical_log_likelihood's overwrite_logits), saving a fresh
    # [B, D, K] tensor. Safe when nothing reads that output after the backward, as
    # with the package's own decoders (they end in a Linear or a conv): the factories
    # turn it on. Networks passed in by hand keep it off.
    overwrite_logits = False
    # True: each level's noise is drawn inside the posterior_sample kernel (Philox, see
    # hvae_fast.ops.posterior_sample with eps=None) instead of by torch.randn_like, and
    # drawn again in the backward: no noise tensor is written or read. Off by default,
    # so that a seeded model draws the seed's noise.
    in_kernel_noise = False
    # the likelihoods this model's decoder can end in
    LIKELIHOODS = ("categorical", "bernoulli")

    def __init__(self, num_vals, D, likelihood_type, backend):
        super().__init__()
        if likelihood_type not in self.LIKELIHOODS:
            others = "" if "dmol" in self.LIKELIHOODS else " ('dmol' needs a per-pixel head: ConvTopDownVAE)"
            raise ValueError(f"{type(self).__name__}: likelihood_type must be one of {self.LIKELIHOODS}, got "
                             f"{likelihood_type!r}{others}")
        self.D = D  # dim of inputs
        self.num_vals = num_vals  # num of values per pixel
        self.likelihood_type = likelihood_type
        self.backend = backend

    @property
    def backend(self):
        return self._backend_name

    @backend.setter
    def backend(self, name):
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {name!r}")
        self._backend_name = name
        self.fn = BACKENDS[name]

    # -- pieces the subclasses use ---------------------------------------------------------
    def _posterior(self, delta_mu, delta_log_var, mu_p=None, log_var_p=None, mean=False):
        """One level's z and KL (see in_kernel_noise for where the noise comes from); mean=True:
        z is q's mean (the same op with eps = 0, no noise drawn)."""
        if mean:
            eps = torch.zeros_like(delta_mu)
        else:
            # in logical order whatever the memory format, so that channels_last draws the same z
            eps = None if self.in_kernel_noise else torch.randn_like(delta_mu, memory_format=torch.contiguous_format)
        return self.fn.posterior_sample(delta_mu, delta_log_var, eps, mu_p, log_var_p)

    def _device(self):
        return next(self.parameters()).device

    def _prior_draw(self, mu, log_var, temperature, top_shape=None):
        """z from the prior with its standard deviation times `temperature`: N(0, 1) of
        top_shape at the top (mu None), N(mu, exp(log_var)) below it."""
        if mu is None:
            p = next(self.parameters())
            return torch.randn(top_shape, device=p.device, dtype=p.dtype) * temperature
        return mu + torch.exp(0.5 * log_var) * torch.randn_like(mu, memory_format=torch.contiguous_format) * temperature

    def _generate(self, batch_size, temperature):
        """The decoder's output at latents drawn from the prior, top level first (_prior_draw)."""
        raise NotImplementedError

    def _decoder_output(self, zs, temperature=1.0):
        """The decoder's output at the latents zs (one entry per level, z1 first, each in its
        latent_shapes shape); a None entry is drawn from the prior given the levels above it,
        its standard deviation times `temperature`."""
        raise NotImplementedError

    def _input(self, x):
        """Stored data (uint8) as the networks' floating dtype; floating x as given."""
        return x if x.is_floating_point() else x.to(next(self.parameters()).dtype)

    def _log_px(self, h_d, x):
        """log p(x | z1) per example, from the decoder's output h_d."""
        if self.likelihood_type == "categorical":
            b, d = h_d.shape[0], h_d.shape[1] // self.num_vals
            return self.fn.categorical_log_likelihood(h_d.view(b, d, self.num_vals), x.view(b, d),
                                                      overwrite_logits=self.overwrite_logits)
        return self.fn.bernoulli_log_likelihood(h_d, x.view(h_d.shape))

    def _sample_x(self, h_d):
        """x ~ p(x | z1): class indices (int64) for categorical, 0/1 floats for Bernoulli."""
        b = h_d.shape[0]
        if self.likelihood_type == "categorical":
            d = h_d.shape[1] // self.num_vals
            p = torch.softmax(h_d.view(b, d, self.num_vals), 2).view(-1, self.num_vals)
            return torch.multinomial(p, num_samples=1).view(b, d)
        return torch.bernoulli(torch.sigmoid(h_d))

    def _mean_x(self, h_d):
        """E[x | z1] per pixel: sum_k k p_k for categorical, sigmoid for Bernoulli."""
        b = h_d.shape[0]
        if self.likelihood_type == "categorical":
            p = torch.softmax(h_d.view(b, -1, self.num_vals), 2)
            return p @ torch.arange(self.num_vals, dtype=p.dtype, device=p.device)
        return torch.sigmoid(h_d)

    def _delta_level(self, z, kl, delta_mu, delta_logvar, mu_p=None, logvar_p=None, full=False):
        if not full:
            return Level(z, kl)
        c = clamp_logvar(delta_logvar)
        if mu_p is None:
            return Level(z, kl, delta_mu, c)
        return Level(z, kl, mu_p + delta_mu, logvar_p + c, mu_p, logvar_p)

    # -- the interface -----------------------------------------------------------------------
    def _trace(self, x, full=False, mean=False):
        """One pass through q and p: (log p(x|z1) [B], [Level, ...] bottom to top, h_d);
        mean=True: every level at q's mean given the levels it conditions on, no noise drawn."""
        raise NotImplementedError

    def elbo_terms(self, x):
        """Per-example reconstruction log-likelihood and KL per level (z1 first)."""
        log_px, levels, _ = self._trace(self._input(x))
        return ELBOTerms(log_px, [lv.kl for lv in levels])

    def forward(self, x, reduction="avg"):
        """-ELBO: averaged over the batch, or summed with reduction='sum'."""
        elbo = self.elbo_terms(x).elbo
        if reduction == "sum":
            return -elbo.sum()
        return -elbo.mean()

    def log_weight(self, x):
        """log p(x|z1) + sum_i [log p(z_i | z_{i+1}) - log q(z_i | ...)] at one sample z ~ q."""
        log_px, levels, _ = self._trace(self._input(x), full=True)
        lw = log_px
        for lv in levels:
            lw = lw + log_normal(lv.z, lv.p_mean, lv.p_logvar) - log_normal(lv.z, lv.q_mean, lv.q_logvar)
        return lw

    def posterior_means(self, x):
        """Mean of q at each level (z1 first), given one sample of the levels it conditions on."""
        _, levels, _ = self._trace(self._input(x), full=True)
        return [lv.q_mean for lv in levels]

    def kl_per_dim(self, x):
        """KL(q || p) of every latent dimension, [B, d] per level (z1 first), at one sample
        of the levels each conditions on: the terms whose sum is elbo_terms(x).kl."""
        _, levels, _ = self._trace(self._input(x), full=True)
        return [self._kl_per_dim(i, lv) for i, lv in enumerate(levels)]

    def _kl_per_dim(self, i, lv):
        """Level i's analytic KL(q || p) per dimension (p = N(0, 1) where lv has no p)."""
        p_mean = torch.zeros_like(lv.q_mean) if lv.p_mean is None else lv.p_mean
        p_logvar = torch.zeros_like(lv.q_logvar) if lv.p_logvar is None else lv.p_logvar
        return 0.5 * (p_logvar - lv.q_logvar - 1 + (torch.exp(lv.q_logvar) + (lv.q_mean - p_mean)**2)
                      * torch.exp(-p_logvar))

    @torch.no_grad()
    def sample(self, batch_size=64, temperature=1.0):
        """New data x ~ p(x | z), every level of z from the prior with its standard deviation
        times `temperature`: class indices (categorical), pixel values (int64, dmol) or 0/1 floats
        (Bernoulli), [B, D]."""
        return self._sample_x(self._generate(batch_size, temperature))

    def reconstruct(self, x):
        """E[x | z1] with z1 one sample from the posterior: [B, D]."""
        _, _, h_d = self._trace(self._input(x))
        return self._mean_x(h_d)

    def encode(self, x, sample=False):
        """The latents of x, one tensor per level, z1 first (latent_shapes gives each one's
        shape after the batch): sample=False, q's mean at every level given the means of the
        levels it conditions on (no noise drawn); sample=True, one draw z ~ q(z | x), the draw
        elbo_terms and reconstruct make (torch.manual_seed seeds it). x: [B, D] rows (or images
        of D values). Differentiable; wrap in torch.no_grad() when no gradient is wanted."""
        x = self._input(x)
        if x.dim() < 2 or math.prod(x.shape[1:]) != self.D:
            raise ValueError(f"encode: x must be [B, D] with D = {self.D} values per example, got shape "
                             f"{tuple(x.shape)}")
        _, levels, _ = self._trace(x, mean=not sample)
        return [lv.z if None in shape else lv.z.view(len(x), *shape) for lv, shape in zip(levels, self.latent_shapes)]

    def decode(self, zs, mean=True, temperature=1.0):
        """x from the latents zs (one per level, z1 first, as encode returns them): mean=True,
        E[x | z] per value ([B, D] floats in the data's range: 0 .. num_vals - 1, or 0 .. 1 for
        Bernoulli); mean=False, a draw x ~ p(x | z) (class indices or pixel values, int64, or 0/1 floats).
        decode(encode(x, sample=True)) is reconstruct(x) under the same seed. An entry None is
        drawn from the prior given the levels above it, its standard deviation times
        `temperature` (the models without a top-down prior: their prior path); at least one
        entry must be given."""
        h = self._decode_checked(zs, temperature)
        return self._mean_x(h) if mean else self._sample_x(h)

    def _decode_checked(self, zs, temperature):
        shapes = self.latent_shapes
        if not isinstance(zs, (list, tuple)):
            raise TypeError(f"decode: zs must be a list of {len(shapes)} latent tensors (z1 first, as encode "
                            f"returns them), got {type(zs).__name__}")
        if len(zs) != len(shapes):
            raise ValueError(f"decode: this model has {len(shapes)} latent level(s); got {len(zs)} tensors "
                             f"(z1 first, as encode returns them)")
        given = [i for i, z in enumerate(zs) if z is not None]
        if not given:
            raise ValueError("decode: every entry of zs is None: give at least one level (or use sample())")
        batch = None
        for i in given:
            z = zs[i]
            if not isinstance(z, torch.Tensor):
                raise TypeError(f"decode: zs[{i}] (z{i + 1}) must be a tensor or None, got {type(z).__name__}")
            if batch is None:
                batch = z.shape[0] if z.dim() else None
            want = (batch, *shapes[i])
            if None in shapes[i]:  # a size the model cannot tell (HierarchicalVAE without a Linear last layer)
                want = (batch, z.shape[-1] if z.dim() else None)
            if tuple(z.shape) != want:
                raise ValueError(f"decode: zs[{i}] (z{i + 1}) has shape {tuple(z.shape)}, expected {want} "
                                 f"(batch {batch}, then latent_shapes[{i}] = {tuple(shapes[i])})")
        return self._decoder_output(list(zs), temperature)

    @property
    def latent_dims(self):
        """Latent sizes per level, z1 first."""
        return list(self._latent_dims)

    @property
    def latent_shapes(self):
        """The shape of each level's latent after the batch dimension, z1 first: (d,) here."""
        return [(d,) for d in self.latent_dims]


class TopDownVAE(VAEBase):
    """A top-down VAE with n >= 1 levels: the seed's construction repeated.

    Bottom-up deterministic path r_1 = f_1(x), r_i = f_i(r_{i-1}); a delta network per level;
    a shared top-down path z_n ~ N(0,1) (plus delta), z_i ~ N(mu_i(z_{i+1}) + dmu_i, ...).
    encoders, deltas: n networks each; priors: n - 1 networks (prior i maps z_{i+1} to
    [mu_i, logvar_i]); decoder maps z_1 to the likelihood's parameters.
    HierarchicalVAE is this class at two levels under the seed's names.
    """

    def __init__(self, encoders, deltas, priors, decoder, latent_dims, num_vals=256, D=64,
                 likelihood_type="categorical", backend="fused"):
        super().__init__(num_vals, D, likelihood_type, backend)
        n = len(latent_dims)
        if n < 1 or len(encoders) != n or len(deltas) != n or len(priors) != n - 1:
            raise ValueError(f"TopDownVAE with {n} levels needs {n} encoders, {n} deltas and {n - 1} priors; "
                             f"got {len(encoders)}, {len(deltas)}, {len(priors)}")
        self.encoders = nn.ModuleList(encoders)
        self.deltas = nn.ModuleList(deltas)
        self.priors = nn.ModuleList(priors)
        self.decoder = decoder
        self._latent_dims = list(latent_dims)

    @classmethod
    def from_config(cls, levels=2, D=64, M=256, L=8, num_vals=17, likelihood_type="categorical",
                    latent_dims=None, conv=False, image_shape=None, backend="fused", dropout=0.0):
        n = _nets.topdown_networks(levels, D, M, L, num_vals, likelihood_type, latent_dims, conv, image_shape,
                                   dropout)
        return _own_networks(cls(n["encoders"], n["deltas"], n["priors"], n["decoder"], n["latent_dims"],
                   num_vals=num_vals, D=D, likelihood_type=likelihood_type, backend=backend))


    def _trace(self, x, full=False, mean=False):
        return self._top_down(x.shape[0], self._deltas(x), x=x, full=full, mean=mean)

    def _deltas(self, x, keep=None):
        """[dmu_i, dlogvar_i] of the top `keep` levels (all when None; None for the others)
        from the bottom-up path r_1 = f_1(x), r_i = f_i(r_{i-1}). The whole path runs before
        any delta network, in the seed's order (which matters when a network draws noise)."""
        rs, r = [], x
        for f in self.encoders:
            r = f(r)
            rs.append(r)
        n = len(rs)
        keep = n if keep is None else keep
        return [torch.chunk(d(r), 2, dim=1) if i >= n - keep else None
                for i, (d, r) in enumerate(zip(self.deltas, rs))]

    def _top_down(self, batch_size, deltas=None, keep=None, temperature=1.0, x=None, full=False, mean=False,
                  zs=None):
        """The shared top-down path: the top level against N(0, 1), every other one against
        p(z_i | z_{i+1}). The top `keep` levels (all when None) come from q (given the deltas;
        mean=True: q's mean), the others from p with their standard deviation times
        `temperature`; a level whose entry in zs is given takes it as it is. Returns
        (log p(x|z1) or None without x, [Level or None per level], decoder output)."""
        n = len(self.deltas)
        keep = n if keep is None else keep
        levels = [None] * n
        z = None
        for i in reversed(range(n)):
            if zs is not None and zs[i] is not None:
                z = zs[i]
                continue
            mu, log_var = (None, None) if i == n - 1 else torch.chunk(self.priors[i](z), 2, dim=1)
            if deltas is not None and n - 1 - i < keep:
                delta_mu, delta_log_var = deltas[i]
                z, kl = self._posterior(delta_mu, delta_log_var, mu, log_var, mean)
                levels[i] = self._delta_level(z, kl, delta_mu, delta_log_var, mu, log_var, full)
            else:
                z = self._prior_draw(mu, log_var, temperature, (batch_size, self.latent_dims[i]))
        h_d = self.decoder(z)
        return (None if x is None else self._log_px(h_d, x)), levels, h_d

    def _generate(self, batch_size, temperature):
        return self._top_down(batch_size, temperature=temperature)[2]

    def _decoder_output(self, zs, temperature=1.0):
        batch = next(z.shape[0] for z in zs if z is not None)
        return self._top_down(batch, temperature=temperature, zs=zs)[2]

    @torch.no_grad()
    def conditional_sample(self, x, keep, temperature=1.0, mean=False):
        """Keep the top `keep` levels of x's posterior, draw the rest from the prior
        (mean=True: E[x | z] per pixel instead of a draw of the pixels)."""
        x = self._input(x)
        deltas = self._deltas(x, keep) if keep > 0 else None  # the networks that keep needs, as the seed ran them
        h_d = self._top_down(x.shape[0], deltas, keep, temperature)[2]
        return self._mean_x(h_d) if mean else self._sample_x(h_d)


class HierarchicalVAE(TopDownVAE):
    """The seed's two-level top-down VAE, with its constructor and attribute names; it is
    TopDownVAE's pass with encoders (nn_r_1, nn_r_2), deltas (nn_delta_1, nn_delta_2), the
    prior nn_z_1 and the decoder nn_x, so the maths runs in the same fused ops.

    Given the same networks and torch.manual_seed, its loss and gradients equal the seed's
    code wherever the seed's probability clamp (1e-7) is inactive; noise is drawn with
    torch.randn_like in the seed's shapes and order (z2 first, then z1).
    """

    def __init__(self, nn_r_1, nn_r_2, nn_delta_1, nn_delta_2, nn_z_1, nn_x, num_vals=256, D=64, L=16,
                 likelihood_type="categorical", backend="fused"):
        VAEBase.__init__(self, num_vals, D, likelihood_type, backend)  # the seed's names, not ModuleLists
        # bottom-up path
        self.nn_r_1 = nn_r_1
        self.nn_r_2 = nn_r_2
        self.nn_delta_1 = nn_delta_1
        self.nn_delta_2 = nn_delta_2
        # top-down path
        self.nn_z_1 = nn_z_1
        self.nn_x = nn_x
        self.L = L  # dim of the second (top) latent layer

    @classmethod
    def from_recipe(cls, D=64, M=256, L=8, num_vals=17, likelihood_type="categorical", backend="fused"):
        """The reference recipe's model: its networks (721,808 parameters on digits), z2 = L, z1 = 2L."""
        nets = _nets.reference_networks(D, M, L, num_vals, likelihood_type)
        return _own_networks(cls(**nets, num_vals=num_vals, D=D, L=L, likelihood_type=likelihood_type,
                                 backend=backend))

    # TopDownVAE's networks, under the seed's names
    encoders = property(lambda self: (self.nn_r_1, self.nn_r_2))
    deltas = property(lambda self: (self.nn_delta_1, self.nn_delta_2))
    priors = property(lambda self: (self.nn_z_1,))
    decoder = property(lambda self: self.nn_x)

    @property
    def latent_dims(self):
        """[z1, z2] sizes; z1's is read from nn_delta_1's last Linear layer (None if it has none)."""
        last = [m for m in self.nn_delta_1.modules() if isinstance(m, nn.Linear)]
        return [last[-1].out_features // 2 if last else None, self.L]


class BottomUpVAE(VAEBase):
    """The seed's pitfall, with n >= 2 levels: Q = q(z1|x) q(z2|z1) ... q(zn|z_{n-1}),
    P = p(x|z1) p(z1|z2) ... p(z_{n-1}|zn) p(zn), p(zn) = N(0,1).

    kl[-1] (top) = KL[q(zn|z_{n-1}) || N(0,1)], analytic, via posterior_sample's top-level form.
    kl[i] = E_q[log q(z_i|z_{i-1})] - log p(z_i|z_{i+1}) (z_0 = x) with the entropy of q analytic
    and log p at the sampled z_i, z_{i+1}: a single-sample estimate, because z_{i+1} depends on
    z_i and so no closed-form KL exists for these levels. The ELBO stays unbiased.
    Two levels: nn_q_z1, nn_q_z2, nn_p_z1, nn_x as in the seed; more levels add q_above
    (q(z_{i+1}|z_i), i >= 2) and p_above (p(z_i|z_{i+1}), i >= 2), empty at two levels, so the
    two-level model keeps its parameters and state_dict keys.
    """

    def __init__(self, nn_q_z1, nn_q_z2, nn_p_z1, nn_x, latent_dims, num_vals=256, D=64,
                 likelihood_type="categorical", backend="fused", q_above=(), p_above=()):
        super().__init__(num_vals, D, likelihood_type, backend)
        n = len(latent_dims)
        if n < 2 or len(q_above) != n - 2 or len(p_above) != n - 2:
            raise ValueError(f"BottomUpVAE with {n} levels needs n >= 2 and {n - 2} q_above and p_above networks; "
                             f"got {len(q_above)}, {len(p_above)}")
        self.nn_q_z1 = nn_q_z1
        self.nn_q_z2 = nn_q_z2
        self.nn_p_z1 = nn_p_z1
        self.nn_x = nn_x
        self.q_above = nn.ModuleList(q_above)
        self.p_above = nn.ModuleList(p_above)
        self._latent_dims = list(latent_dims)

    def _kl_per_dim(self, i, lv):
        # below the top the ELBO's term is the single-sample estimate (class doc), not an
        # analytic KL at the sampled z_{i+1}, which is drawn given z_i: count what the ELBO counts
        if i == len(self._latent_dims) - 1:
            return super()._kl_per_dim(i, lv)
        return -0.5 * (_LOG_2PI + 1 + lv.q_logvar) + 0.5 * (_LOG_2PI + lv.p_logvar
                                                              + (lv.z - lv.p_mean)**2 * torch.exp(-lv.p_logvar))

    @classmethod
    def from_config(cls, D=64, M=256, L=8, num_vals=17, likelihood_type="categorical", backend="fused", levels=2,
                    latent_dims=None):
        n = _nets.bottomup_networks(D, M, L, num_vals, likelihood_type, levels, latent_dims)
        return _own_networks(cls(n["nn_q_z1"], n["nn_q_z2"], n["nn_p_z1"], n["nn_x"], n["latent_dims"],
                                 num_vals=num_vals, D=D, likelihood_type=likelihood_type, backend=backend,
                                 q_above=n["q_above"], p_above=n["p_above"]))


    def _trace(self, x, full=False, mean=False):
        q_nets = [self.nn_q_z1, self.nn_q_z2, *self.q_above]
        # up: z_1 ~ q(z_1|x), z_i ~ q(z_i|z_{i-1}) below the top, noise drawn z_1 first (the seed's order)
        h, lower = x, []
        for f in q_nets[:-1]:
            mu, log_var = torch.chunk(f(h), 2, dim=1)
            log_var = clamp_logvar(log_var)
            h = mu if mean else mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
            lower.append((h, mu, log_var))
        # the top: q(z_n|z_{n-1}) and KL[q(z_n|z_{n-1}) || N(0,1)]
        delta_mu, delta_log_var = torch.chunk(q_nets[-1](h), 2, dim=1)
        z, kl = self._posterior(delta_mu, delta_log_var, mean=mean)
        levels = [self._delta_level(z, kl, delta_mu, delta_log_var, full=full)]
        # down: E_q[log q(z_i|.)] = -entropy, minus log p(z_i|z_{i+1}) at the samples
        for (z_i, mu, log_var), p in zip(reversed(lower), reversed([self.nn_p_z1, *self.p_above])):
            mu_p, log_var_p = torch.chunk(p(levels[0].z), 2, dim=1)
            kl = -0.5 * (_LOG_2PI + 1 + log_var).sum(1) - log_normal(z_i, mu_p, log_var_p)
            levels.insert(0, Level(z_i, kl, mu, log_var, mu_p, log_var_p))
        h_d = self.nn_x(levels[0].z)
        return self._log_px(h_d, x), levels, h_d

    def _generate(self, batch_size, temperature):
        """z_n ~ N(0,1), z_i ~ p(z_i|z_{i+1}), then p(x|z_1)'s parameters."""
        return self._decoder_output([None] * len(self._latent_dims), temperature, batch_size)

    def _decoder_output(self, zs, temperature=1.0, batch_size=None):
        """The prior path with the given levels of zs in place of draws (only z1 reaches x)."""
        if batch_size is None:
            batch_size = next(z.shape[0] for z in zs if z is not None)
        z = zs[-1] if zs[-1] is not None else self._prior_draw(None, None, temperature,
                                                                (batch_size, self._latent_dims[-1]))
        for i, p in reversed(list(enumerate([self.nn_p_z1, *self.p_above]))):
            z = zs[i] if zs[i] is not None else self._prior_draw(*torch.chunk(p(z), 2, dim=1), temperature)
        return self.nn_x(z)


class OneLevelVAE(VAEBase):
    """The one-level VAE baseline: q(z|x) = N(mu(x), exp(clamp(logvar(x)))), p(z) = N(0,1)."""

    def __init__(self, encoder, decoder, latent_dims, num_vals=256, D=64, likelihood_type="categorical",
                 backend="fused"):
        super().__init__(num_vals, D, likelihood_type, backend)
        self.encoder = encoder
        self.decoder = decoder
        self._latent_dims = list(latent_dims)

    @classmethod
    def from_config(cls, D=64, M=256, L=16, num_vals=17, likelihood_type="categorical", backend="fused"):
        n = _nets.onelevel_networks(D, M, L, num_vals, likelihood_type)
        return _own_networks(cls(n["encoder"], n["decoder"], n["latent_dims"], num_vals=num_vals, D=D,
                   likelihood_type=likelihood_type, backend=backend))


    def _trace(self, x, full=False, mean=False):
        delta_mu, delta_log_var = torch.chunk(self.encoder(x), 2, dim=1)
        z, KL_z = self._posterior(delta_mu, delta_log_var, mean=mean)
        h_d = self.decoder(z)
        return self._log_px(h_d, x), [self._delta_level(z, KL_z, delta_mu, delta_log_var, full=full)], h_d

    def _generate(self, batch_size, temperature):
        return self._decoder_output([None], temperature, batch_size)

    def _decoder_output(self, zs, temperature=1.0, batch_size=None):
        z = zs[0] if zs[0] is not None else self._prior_draw(None, None, temperature,
                                                             (batch_size, self._latent_dims[0]))
        return self.decoder(z)


class ConvTopDownVAE(VAEBase):
    """A convolutional top-down hierarchy for images, in the NVAE/VDVAE mould, with the seed's
    relative (delta) posterior at every latent group.

    Bottom-up: a stem convolution at full resolution, then per scale a stride-2 convolution
    and one residual cell per group; r_g is the activation after group g's cell.
    Top-down: h starts as a learned tensor at the coarsest scale. At every group, top first:
      p(z_g | z_>g) = N(mu_p(h), exp(logvar_p(h)))     (N(0, 1) for the top group, as in the seed)
      q(z_g | x, z_>g) = N(mu_p + dmu, exp(logvar_p + dlogvar)),  [dmu, dlogvar] = delta_g([h, r_g])
      h <- cell_g(h + proj_g(z_g))
    with h upsampled between scales and to full resolution, where a last cell (half the
    channels) gives the features of the head, a per-pixel linear map to the likelihood's parameters:
      categorical: channels x K logits, fused with the likelihood (ops.pixel_categorical_log_likelihood),
                   so the full logits never exist;
      bernoulli:   one logit per channel;
      dmol:        PixelCNN++'s discretized logistic mixture of `num_mixtures` components with its
                   channel coupling (ops.dmol_log_likelihood): M (1 + 2C + C(C-1)/2) parameters.
    Every group's sample and KL run in the fused posterior_sample on [B, c, h, w] latents.

    image_shape: (C, H, W). groups: latent groups per scale, finest first; for 28x28 the
    scales are 14x14, 7x7 and 4x4. Levels (latent_dims, elbo_terms().kl) are the groups,
    finest (z1) first.
    """

    LIKELIHOODS = ("categorical", "bernoulli", "dmol")

    def __init__(self, image_shape=(1, 28, 28), num_vals=256, likelihood_type="categorical", channels=32,
                 latent_channels=8, groups=(1, 2, 2), backend="fused", num_mixtures=10):
        C, H, W = image_shape
        super().__init__(num_vals, C * H * W, likelihood_type, backend)
        if likelihood_type == "dmol" and (isinstance(num_mixtures, bool) or not isinstance(num_mixtures, int)
                                          or num_mixtures < 1):
            raise ValueError(f"num_mixtures must be an integer >= 1 for likelihood_type 'dmol', got {num_mixtures!r}")
        if not groups or min(groups) < 0 or sum(groups) < 1:
            raise ValueError(f"groups must give a number >= 0 of latent groups per scale, at least one in all; "
                             f"got {groups}")
        self.image_shape = (C, H, W)
        self.scales = _nets.latent_scales(image_shape, len(groups))
        self.groups = list(groups)
        self.group_scale = [s for s, g in enumerate(groups) for _ in range(g)]  # finest group first
        n, c, zc = len(self.group_scale), channels, latent_channels
        self.stem = nn.Conv2d(C, c, 3, padding=1)
        self.down = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for _ in groups)
        self.encoder_cells = nn.ModuleList(_nets.ResidualCell(c) for _ in range(n))
        self.h_top = nn.Parameter(torch.zeros(1, c, *self.scales[-1]))
        self.priors = nn.ModuleList(nn.Conv2d(c, 2 * zc, 3, padding=1) for _ in range(n - 1))  # the top has N(0, 1)
        self.deltas = nn.ModuleList(nn.Conv2d(2 * c, 2 * zc, 3, padding=1) for _ in range(n))
        self.projections = nn.ModuleList(nn.Conv2d(zc, c, 1) for _ in range(n))
        self.decoder_cells = nn.ModuleList(_nets.ResidualCell(c) for _ in range(n))
        # full resolution costs 4x the finest latent scale per channel: half the channels there
        self.output_cell = nn.Sequential(nn.Conv2d(c, c // 2, 1), _nets.ResidualCell(c // 2))
        self.num_mixtures = num_mixtures if likelihood_type == "dmol" else None
        self.k = num_vals if likelihood_type == "categorical" else 1
        outputs = _dmol_channels(num_mixtures, C) if likelihood_type == "dmol" else C * self.k
        self.head = nn.Conv2d(c // 2, outputs, 1)
        self._latent_dims = [zc * self.scales[s][0] * self.scales[s][1] for s in self.group_scale]

    def _encode(self, x):
        """r_g for every group, finest first."""
        h = self.stem(x.view(-1, *self.image_shape) * (2 / (self.num_vals - 1)) - 1)
        rs = []
        for s, g in enumerate(self.groups):
            h = self.down[s](h)
            for _ in range(g):
                h = self.encoder_cells[len(rs)](h)
                rs.append(h)
        return rs

    def _top_down(self, batch_size, rs=None, keep=None, temperature=1.0, full=False, mean=False, zs=None):
        """(head features, [Level per group drawn from q]): the top `keep` groups (all when
        None) from q given the encoder's rs (mean=True: q's mean), the others from p with their
        standard deviation times `temperature`; a group whose entry in zs is given takes it
        ([B, c, h, w]) as it is."""
        n = len(self.group_scale)
        keep = n if keep is None else keep
        h = self.h_top.expand(batch_size, -1, -1, -1)
        levels = [None] * n
        for g in reversed(range(n)):
            size = self.scales[self.group_scale[g]]
            if h.shape[-2:] != size:
                h = F.interpolate(h, size=size, mode="nearest")
            if zs is not None and zs[g] is not None:
                h = self.decoder_cells[g](h + self.projections[g](zs[g]))
                continue
            mu_p, logvar_p = (None, None) if g == n - 1 else torch.chunk(self.priors[g](h), 2, dim=1)
            if rs is not None and n - 1 - g < keep:
                delta_mu, delta_logvar = torch.chunk(self.deltas[g](torch.cat([h, rs[g]], 1)), 2, dim=1)
                z, kl = self._posterior(delta_mu, delta_logvar, mu_p, logvar_p, mean)
                flat = [None if t is None else t.flatten(1) for t in (mu_p, logvar_p)]
                levels[g] = self._delta_level(z.flatten(1), kl, delta_mu.flatten(1), delta_logvar.flatten(1),
                                              *flat, full)
            else:
                z = self._prior_draw(mu_p, logvar_p, temperature, (batch_size, self.projections[g].in_channels, *size))
            h = self.decoder_cells[g](h + self.projections[g](z))
        h = F.interpolate(h, size=self.image_shape[1:], mode="nearest")
        return self.output_cell(h), levels

    def _trace(self, x, full=False, mean=False):
        features, levels = self._top_down(x.shape[0], self._encode(x), full=full, mean=mean)
        return self._log_px(features, x), levels, features

    @property
    def latent_shapes(self):
        """(latent_channels, h, w) of every group, finest (z1) first."""
        return [(self.projections[g].in_channels, *self.scales[s]) for g, s in enumerate(self.group_scale)]

    def _decoder_output(self, zs, temperature=1.0):
        batch = next(z.shape[0] for z in zs if z is not None)
        return self._top_down(batch, temperature=temperature, zs=zs)[0]

    def _log_px(self, features, x):
        b = features.shape[0]
        if self.likelihood_type == "categorical":
            return self.fn.pixel_categorical_log_likelihood(features, self.head.weight.flatten(1), self.head.bias,
                                                            x.view(b, *self.image_shape))
        if self.likelihood_type == "dmol":
            return self.fn.dmol_log_likelihood(self._head(features), _pixel_values(x).view(b, *self.image_shape),
                                               num_mixtures=self.num_mixtures, num_vals=self.num_vals)
        return self.fn.bernoulli_log_likelihood(self._head(features).flatten(1), x.view(b, -1))

    def _head(self, features):
        """The 1x1 head in the weights' dtype even under autocast: in bf16 a DMOL mean near 1
        would be rounded by a quarter of a pixel's bin (the categorical op, which fuses the
        head, upcasts the same way)."""
        with torch.autocast(features.device.type, enabled=False):
            return self.head(features.to(self.head.weight.dtype))

    def _dmol(self):
        return dict(num_mixtures=self.num_mixtures, channels=self.image_shape[0], num_vals=self.num_vals)

    def _pixel_probs(self, features):
        """[B, C, H, W, K] class probabilities per pixel (small batches: pictures, samples)."""
        C, H, W = self.image_shape
        logits = self._head(features).view(features.shape[0], C, self.k, H, W)
        return torch.softmax(logits.permute(0, 1, 3, 4, 2), -1)

    def _sample_x(self, features):
        if self.likelihood_type == "dmol":
            return ops.dmol_sample(self._head(features), **self._dmol()).flatten(1)
        if self.likelihood_type != "categorical":
            return torch.bernoulli(torch.sigmoid(self._head(features))).flatten(1)
        p = self._pixel_probs(features)
        return torch.multinomial(p.reshape(-1, self.k), 1).view(features.shape[0], -1)

    def _mean_x(self, features):
        if self.likelihood_type == "dmol":
            return ops.dmol_mean(self._head(features), **self._dmol()).flatten(1)
        if self.likelihood_type != "categorical":
            return torch.sigmoid(self._head(features)).flatten(1)
        p = self._pixel_probs(features)
        return (p @ torch.arange(self.k, dtype=p.dtype, device=p.device)).flatten(1)

    def _generate(self, batch_size, temperature):
        return self._top_down(batch_size, temperature=temperature)[0]

    @torch.no_grad()
    def conditional_sample(self, x, keep, temperature=1.0, mean=False):
        """Images that keep the top `keep` groups of x's posterior and draw the rest from the
        prior: keep = 0 is an unconditional sample, keep = all groups a reconstruction.
        mean=True: E[x | z] per pixel instead of a draw of the pixels."""
        x = self._input(x)
        features = self._top_down(x.shape[0], self._encode(x), keep, temperature)[0]
        return self._mean_x(features) if mean else self._sample_x(features)
