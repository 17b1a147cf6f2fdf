"""Networks for the models in hvae_fast.model.

`reference_networks` builds exactly the networks of the reference recipe (the notebook that
goes with the seed text): D = 64, M = 256, L = 8, z1 has 2L = 16 dimensions, 721,808
parameters. The other factories repeat that construction for more levels, for the
bottom-up two-level VAE, for the one-level baseline and for image-shaped (conv) inputs.
"""
import math

import torch
from torch import nn


class GELU(nn.Module):
    """The recipe's 'GELU': x * sigmoid(1.702 x) (the sigmoid approximation)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def _out_dim(D, num_vals, likelihood):
    if likelihood == "categorical":
        return D * num_vals
    if likelihood == "bernoulli":
        return D
    raise ValueError(f"likelihood must be 'categorical' or 'bernoulli', got {likelihood!r}"
                     + (" ('dmol' needs a per-pixel head: ConvTopDownVAE)" if likelihood == "dmol" else ""))


def _block(n_in, M, n_out, last=None, dropout=0.0):
    """Linear(n_in, M) - GELU - BN [- Dropout] - Linear(M, n_out) [- last]: the recipe's building block."""
    layers = [nn.Linear(n_in, M), GELU(), nn.BatchNorm1d(M)] + ([nn.Dropout(dropout)] if dropout > 0 else []) \
        + [nn.Linear(M, n_out)]
    if last is not None:
        layers.append(last)
    return nn.Sequential(*layers)


def _decoder(L1, M, n_out, dropout=0.0):
    """nn_x: Linear(L1,M) - GELU - BN [- Dropout] - Linear(M,M) - GELU - BN [- Dropout] - Linear(M, n_out)."""
    def drop():
        return [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(nn.Linear(L1, M), GELU(), nn.BatchNorm1d(M), *drop(),
                         nn.Linear(M, M), GELU(), nn.BatchNorm1d(M), *drop(),
                         nn.Linear(M, n_out))


def reference_networks(D=64, M=256, L=8, num_vals=17, likelihood="categorical"):
    """The recipe's six networks, keyed by the seed's constructor argument names.

    z2 has L dimensions, z1 has 2L. Use as HierarchicalVAE(**reference_networks(), ...).
    """
    L1, L2 = 2 * L, L
    return {
        "nn_r_1": _block(D, M, M, nn.GELU()),
        "nn_r_2": _block(M, M, M, nn.LeakyReLU()),
        "nn_delta_1": _block(M, M, 2 * L1),
        "nn_delta_2": _block(M, M, 2 * L2),
        "nn_z_1": _block(L2, M, 2 * L1),
        "nn_x": _decoder(L1, M, _out_dim(D, num_vals, likelihood)),
    }


def default_latent_dims(levels, L=8):
    """Level sizes bottom to top: 2L for every level but the top one, which has L."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    return [2 * L] * (levels - 1) + [L] if levels > 1 else [2 * L]


class ConvEncoder(nn.Module):
    """r_1 for image-shaped data: [B, H*W] -> [B, 1, H, W] -> two conv blocks -> Linear -> M."""

    def __init__(self, image_shape, M=256, channels=32):
        super().__init__()
        H, W = image_shape
        self.image_shape = tuple(image_shape)
        h2, w2 = math.ceil(H / 2), math.ceil(W / 2)
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), GELU(), nn.BatchNorm2d(channels),
            nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), GELU(), nn.BatchNorm2d(2 * channels),
            nn.Flatten(), nn.Linear(2 * channels * h2 * w2, M), nn.GELU())

    def forward(self, x):
        return self.net(x.view(x.shape[0], 1, *self.image_shape))


class ConvDecoder(nn.Module):
    """nn_x for image-shaped data: z1 -> Linear -> [C, H/2, W/2] -> upsampling conv -> logits.

    Returns [B, H*W*K] laid out pixel-major (K logits per pixel), as the likelihoods expect.
    """

    def __init__(self, L1, image_shape, num_vals, likelihood, M=256, channels=32):
        super().__init__()
        H, W = image_shape
        self.image_shape = tuple(image_shape)
        self.k = num_vals if likelihood == "categorical" else 1
        _out_dim(H * W, num_vals, likelihood)  # validates likelihood
        self.h2, self.w2 = math.ceil(H / 2), math.ceil(W / 2)
        self.c = 2 * channels
        self.fc = nn.Sequential(nn.Linear(L1, M), GELU(), nn.BatchNorm1d(M),
                                nn.Linear(M, self.c * self.h2 * self.w2), GELU())
        self.conv = nn.Sequential(
            nn.BatchNorm2d(self.c),
            nn.ConvTranspose2d(self.c, channels, 4, stride=2, padding=1), GELU(), nn.BatchNorm2d(channels),
            nn.Conv2d(channels, self.k, 3, padding=1))

    def forward(self, z):
        h = self.fc(z).view(z.shape[0], self.c, self.h2, self.w2)
        h = self.conv(h)[:, :, :self.image_shape[0], :self.image_shape[1]]
        return h.permute(0, 2, 3, 1).reshape(z.shape[0], -1)


def topdown_networks(levels=2, D=64, M=256, L=8, num_vals=17, likelihood="categorical",
                     latent_dims=None, conv=False, image_shape=None, dropout=0.0):
    """Networks for TopDownVAE with any number of levels (the seed's construction repeated).

    encoders r_1..r_n (bottom-up), deltas per level, priors p(z_i | z_{i+1}) for i < n, and the
    decoder. dropout > 0 puts Dropout(dropout) after every BatchNorm of the MLP blocks (0: none).
    With levels=2, conv=False and dropout=0 these are exactly reference_networks(). Returns a dict
    of TopDownVAE's constructor arguments (encoders, deltas, priors, decoder, latent_dims).
    """
    dims = list(latent_dims) if latent_dims is not None else default_latent_dims(levels, L)
    if len(dims) != levels:
        raise ValueError(f"latent_dims has {len(dims)} entries for {levels} levels")
    if conv:
        if image_shape is None or image_shape[0] * image_shape[1] != D:
            raise ValueError(f"conv networks need image_shape (H, W) with H*W = D = {D}, got {image_shape}")
        first = ConvEncoder(image_shape, M)
        decoder = ConvDecoder(dims[0], image_shape, num_vals, likelihood, M)
    else:
        first = _block(D, M, M, nn.GELU(), dropout)
        decoder = _decoder(dims[0], M, _out_dim(D, num_vals, likelihood), dropout)
    encoders = [first] + [_block(M, M, M, nn.LeakyReLU(), dropout) for _ in range(levels - 1)]
    deltas = [_block(M, M, 2 * d, dropout=dropout) for d in dims]
    priors = [_block(dims[i + 1], M, 2 * dims[i], dropout=dropout) for i in range(levels - 1)]
    return {"encoders": nn.ModuleList(encoders), "deltas": nn.ModuleList(deltas),
            "priors": nn.ModuleList(priors), "decoder": decoder, "latent_dims": dims}


def bottomup_networks(D=64, M=256, L=8, num_vals=17, likelihood="categorical", levels=2, latent_dims=None):
    """Networks for BottomUpVAE: q(z1|x), q(z2|z1), p(z1|z2), p(x|z1), and for levels > 2
    q_above (q(z_{i+1}|z_i), i >= 2) and p_above (p(z_i|z_{i+1}), i >= 2).

    Level sizes as topdown_networks (default_latent_dims: z1 = 2L, top = L). The priors and the
    decoder are exactly topdown_networks' at the same levels, so the two models differ only in
    the inference path.
    """
    dims = list(latent_dims) if latent_dims is not None else default_latent_dims(levels, L)
    if len(dims) != levels or levels < 2:
        raise ValueError(f"bottomup_networks needs levels >= 2 and one latent size per level; got {levels} levels, "
                         f"latent_dims {dims}")
    # built in the two-level factory's order (q(z1|x), q(z2|z1), p(z1|z2), p(x|z1)): the same seed
    # gives the same two-level weights as before
    q_z1 = nn.Sequential(nn.Linear(D, M), GELU(), nn.BatchNorm1d(M),
                         nn.Linear(M, M), GELU(), nn.BatchNorm1d(M), nn.Linear(M, 2 * dims[0]))
    q = [_block(dims[i], M, 2 * dims[i + 1]) for i in range(levels - 1)]
    p = [_block(dims[i + 1], M, 2 * dims[i]) for i in range(levels - 1)]
    return {
        "nn_q_z1": q_z1, "nn_q_z2": q[0], "nn_p_z1": p[0],
        "nn_x": _decoder(dims[0], M, _out_dim(D, num_vals, likelihood)),
        "latent_dims": dims, "q_above": nn.ModuleList(q[1:]), "p_above": nn.ModuleList(p[1:]),
    }


def onelevel_networks(D=64, M=256, L=16, num_vals=17, likelihood="categorical"):
    """The series' one-level VAE: LeakyReLU MLPs, no BatchNorm (440,416 parameters on digits)."""
    enc = nn.Sequential(nn.Linear(D, M), nn.LeakyReLU(), nn.Linear(M, M), nn.LeakyReLU(),
                        nn.Linear(M, 2 * L))
    dec = nn.Sequential(nn.Linear(L, M), nn.LeakyReLU(), nn.Linear(M, M), nn.LeakyReLU(),
                        nn.Linear(M, _out_dim(D, num_vals, likelihood)))
    return {"encoder": enc, "decoder": dec, "latent_dims": [L]}


def count_parameters(module_or_dict):
    """Number of trainable parameters of a module, or of a dict of modules."""
    if isinstance(module_or_dict, dict):
        return sum(count_parameters(m) for m in module_or_dict.values() if isinstance(m, nn.Module))
    return sum(p.numel() for p in module_or_dict.parameters() if p.requires_grad)


# ---- the convolutional hierarchy (ConvTopDownVAE) ------------------------------------------

class ResidualCell(nn.Module):
    """x + conv(GELU(BN(conv(GELU(BN(x)))))): NVAE's residual cell without squeeze-excitation.

    The last convolution starts at zero, so every cell starts as the identity (as VDVAE scales
    its last layers down): a deep stack then trains from the first step.
    """

    def __init__(self, channels):
        super().__init__()
        self.net = nn.Sequential(nn.BatchNorm2d(channels), GELU(), nn.Conv2d(channels, channels, 3, padding=1),
                                 nn.BatchNorm2d(channels), GELU(), nn.Conv2d(channels, channels, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x):
        return x + self.net(x)


def latent_scales(image_shape, scales=3):
    """The latent resolutions of an image, finest first: H/2, H/4, ... (rounded up), e.g.
    28x28 -> [(14, 14), (7, 7), (4, 4)]."""
    H, W = image_shape[-2:]
    out = []
    for _ in range(scales):
        H, W = math.ceil(H / 2), math.ceil(W / 2)
        out.append((H, W))
    return out
