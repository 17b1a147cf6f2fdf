"""PNG pictures with matplotlib's Agg backend: samples, reconstructions, curves, KL per level."""
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .evaluate import seeded  # noqa: E402


def picture_shape(D):
    """(H, W) to draw D values without a known image shape: the most nearly square factors
    H <= W of D; a prime D (or 1 x D) is drawn as a strip."""
    h = int(math.isqrt(D))
    while D % h:
        h -= 1
    return h, D // h


def _images(x, image_shape):
    """[N, H, W] (grey) or [N, H, W, 3] (RGB) arrays from rows x [N, D]; image_shape is (H, W)
    or (C, H, W), rows channel-major. Without a fitting shape: strips (picture_shape)."""
    x = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    x = x.reshape(len(x), -1)
    if image_shape is not None and len(image_shape) == 3:
        c, h, w = image_shape
        if c == 3 and c * h * w == x.shape[1]:
            return x.reshape(len(x), c, h, w).transpose(0, 2, 3, 1)
        image_shape = (h, w) if c == 1 else None
    if image_shape is None or math.prod(image_shape) != x.shape[1]:
        image_shape = picture_shape(x.shape[1])
    return x.reshape(len(x), *image_shape)


def tile(x, image_shape=None, num_vals=17, cols=8, pad=1):
    """Rows x [N, D] as one picture in [0, 1] (value / (num_vals - 1)): [H, W] for grey
    images, [H, W, 3] for RGB; `cols` images a row, `pad` pixels of 0 between them."""
    imgs = np.clip(_images(x, image_shape) / (num_vals - 1), 0, 1)
    n, h, w = imgs.shape[:3]
    rows = int(math.ceil(n / cols))
    out = np.zeros((rows * (h + pad) - pad, cols * (w + pad) - pad, *imgs.shape[3:]), dtype=np.float32)
    for i, img in enumerate(imgs):
        r, c = divmod(i, cols)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = img
    return out


def _grid(ax_rows, imgs, vmax):
    for ax, img in zip(ax_rows, imgs):
        if img.ndim == 3:  # RGB
            ax.imshow(np.clip(img / vmax, 0, 1))
        else:
            ax.imshow(img, cmap="gray_r", vmin=0, vmax=vmax)
        ax.axis("off")


def save_samples(x, path, image_shape=None, num_vals=17, title="samples"):
    """A grid of images x [N, D] as a PNG."""
    imgs = _images(x, image_shape)
    n = len(imgs)
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    _grid(axes.flat, imgs, num_vals - 1)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_reconstructions(x, x_rec, path, image_shape=None, num_vals=17):
    """The data (top row) beside their reconstructions E[x | z1] (bottom row)."""
    a, b = _images(x, image_shape), _images(x_rec, image_shape)
    n = len(a)
    fig, axes = plt.subplots(2, n, figsize=(n * 0.8, 2.0), squeeze=False)
    _grid(axes[0], a, num_vals - 1)
    _grid(axes[1], b, num_vals - 1)
    axes[0][0].set_title("data", fontsize=8, loc="left")
    axes[1][0].set_title("reconstruction", fontsize=8, loc="left")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_curve(history, path):
    """Training and validation loss per epoch (from the metrics log rows)."""
    ep = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ep, [r["train_loss"] for r in history], label="train (mean -ELBO)")
    objective = [r for r in history if "train_objective" in r]  # KL warm-up, free bits, balancing, IW bound
    if objective:  # (a run resumed from an older version logs it from the resume on)
        ax.plot([r["epoch"] for r in objective], [r["train_objective"] for r in objective], ls="--",
                label="train (loss minimised)")
    ax.plot(ep, [r["val_loss"] for r in history], label="validation -ELBO")
    best = min(history, key=lambda r: r["val_loss"])
    ax.axvline(best["epoch"], color="gray", ls=":", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.set_title(f"best validation {best['val_loss']:.2f} at epoch {best['epoch']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_kl(history, path):
    """Validation KL per level over the epochs (levels z1 .. z_top)."""
    ep = [r["epoch"] for r in history]
    kls = np.array([r["val_kl"] for r in history])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for i in range(kls.shape[1]):
        ax.plot(ep, kls[:, i], label=f"KL(z{i + 1})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image (validation)")
    ax.set_title("KL per level")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_conditional(x, rows, path, image_shape=None, num_vals=17):
    """What each level encodes: the data (top row), then one row per k of samples that keep
    the posterior's top k levels of each image and draw the rest from the prior.
    rows: [(k, samples [N, D]), ...], k from 0 (a sample from the prior) to all levels."""
    n = len(x)
    fig, axes = plt.subplots(len(rows) + 1, n, figsize=(n * 0.8, (len(rows) + 1) * 0.85 + 0.2), squeeze=False)
    _grid(axes[0], _images(x, image_shape), num_vals - 1)
    axes[0][0].set_title("data", fontsize=7, loc="left")
    levels = max(k for k, _ in rows)
    for r, (k, xs) in enumerate(rows, start=1):
        _grid(axes[r], _images(xs, image_shape), num_vals - 1)
        axes[r][0].set_title(f"top {k} of {levels} levels from q(z|x), the rest from p; E[x|z]", fontsize=7,
                             loc="left")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_image_shape(config):
    """(C, H, W) of a run's images, or None."""
    return (config.image_channels, *config.image_shape) if config.image_shape else None


def conditional_rows(model, ds, n, temperature=1.0):
    """(the first n test images, [(k, E[x | z] keeping the top k levels of each)] for every k):
    the means, since single pixel draws of a 256-way categorical hide the structure."""
    x = ds.test[:n]
    xb = ds.batch(x, next(model.parameters()).device, "test")
    return x, [(k, model.conditional_sample(xb, k, temperature, mean=True)) for k in range(len(model.latent_dims) + 1)]


REST = ("posterior", "prior")


@torch.no_grad()
def interpolations(model, xa, xb, depth, steps, rest="posterior", seed=0):
    """[N, steps, D] of E[x | z] along lines between the posterior means (model.encode) of
    xa[i] and xb[i]: the top `depth` levels move linearly from a's to b's, the others are
    rest='posterior': a's posterior means; rest='prior': drawn from the prior given the levels
    above (model.decode with those entries None), with the same noise at every step of a row
    (row i seeded with seed + i; the caller's RNG is left as it was)."""
    n = len(model.latent_dims)
    if not 1 <= depth <= n:
        raise ValueError(f"depth must be in 1 .. {n} (the model's levels), got {depth}")
    if rest not in REST:
        raise ValueError(f"rest must be 'posterior' or 'prior', got {rest!r}")
    za, zb = model.encode(xa), model.encode(xb)
    lower = n - depth  # levels 0 .. lower-1 are not interpolated
    rows = []
    for t in torch.linspace(0, 1, steps).tolist():
        top = [(1 - t) * a + t * b for a, b in zip(za[lower:], zb[lower:])]
        if rest == "posterior" or lower == 0:
            rows.append(model.decode(za[:lower] + top))
            continue
        step = []
        for i in range(len(xa)):
            with seeded(seed + i, za[0].device):
                step.append(model.decode([None] * lower + [z[i:i + 1] for z in top]))
        rows.append(torch.cat(step))
    return torch.stack(rows, 1)


def interpolation_title(depth, levels, rest):
    """What an interpolation picture shows, in words."""
    moved = "every level" if depth == levels else f"the top {depth} of {levels} levels"
    others = "" if depth == levels else \
        ("; the rest: the first image's posterior means" if rest == "posterior" else "; the rest drawn from the prior")
    return f"interpolation of {moved} between posterior means{others}; E[x|z]"


def save_interpolations(xa, xb, rows, path, title, image_shape=None, num_vals=17):
    """One row per pair: image a, the interpolation's steps, image b. Each image is 80 x 80
    pixels: the PNG is (steps + 2) * 80 wide and N * 85 + 50 high."""
    n, steps = rows.shape[0], rows.shape[1]
    cols = steps + 2
    fig, axes = plt.subplots(n, cols, figsize=(cols * 80 / 100, (n * 85 + 50) / 100), squeeze=False)
    a, b = _images(xa, image_shape), _images(xb, image_shape)
    for r in range(n):
        _grid(axes[r], [a[r], *_images(rows[r], image_shape), b[r]], num_vals - 1)
    fig.suptitle(title, fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_run_pictures(model, ds, history, config, out):
    """A run's pictures in `out`, their noise seeded by the run's seed (the caller's RNG is
    left as it was): {name: path}."""
    shape, paths = run_image_shape(config), {}
    device = next(model.parameters()).device
    with seeded(config.seed, device):
        paths["samples"] = save_samples(model.sample(64), os.path.join(out, "samples.png"), shape, ds.num_vals)
        x = ds.test[:16]
        paths["reconstructions"] = save_reconstructions(x, model.reconstruct(ds.batch(x, device, "test")).detach(),
                                                        os.path.join(out, "reconstructions.png"), shape, ds.num_vals)
        paths["val_curve"] = save_curve(history, os.path.join(out, "val_curve.png"))
        paths["kl_per_level"] = save_kl(history, os.path.join(out, "kl_per_level.png"))
        if hasattr(model, "conditional_sample"):
            paths["conditional"] = save_conditional(*conditional_rows(model, ds, 10),
                                                    os.path.join(out, "conditional.png"), shape, ds.num_vals)
    return paths
