"""The settings of a run: one dataclass, from which `hvae-fast train` generates its options.

Each field carries its help text and, where it has one, its range (a Kind); `check()` is the
one place a configuration is validated, for the Python API and the command line alike (its
messages name fields, or options when the CLI asks). The defaults are the reference recipe;
RECIPES holds the settings of named data sets.
"""
import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from . import aids as _aids
from . import data as _data
from . import writer as _writer

class Kind(typing.NamedTuple):
    """A range of values: its base type, the test, and how errors describe it."""
    type: type
    ok: typing.Callable
    text: str

    def parse(self, s):
        """An argparse type: the value, or an error that says what was expected."""
        try:
            v = self.type(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.type.__name__}, got {s!r}") from None
        if not self.ok(v):
            raise argparse.ArgumentTypeError(f"must be {self.text}, got {v}")
        return v


POSITIVE_INT = Kind(int, lambda v: v >= 1, ">= 1")
NONNEG_INT = Kind(int, lambda v: v >= 0, ">= 0")
POSITIVE = Kind(float, lambda v: v > 0, "> 0")
NONNEG = Kind(float, lambda v: v >= 0, ">= 0")
UNIT = Kind(float, lambda v: 0 <= v < 1, "in [0, 1)")
FRACTION = Kind(float, lambda v: 0 <= v <= 1, "in [0, 1]")

MODELS = ("topdown", "hierarchical", "bottomup", "onelevel")
ARCHS = ("mlp", "resnet")
PRECISIONS = ("fp32", "bf16", "fp16")


def setting(default, help, *, kind=None, choices=None, flag=None, metavar=None, group="training", cli=True):
    """A field with its help text, range and command-line option (flag: default --name-with-dashes)."""
    meta = dict(help=help, kind=kind, choices=choices, flag=flag, metavar=metavar, group=group, cli=cli)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # -- the model
    model: str = setting("topdown", "topdown: n-level top-down VAE (2 levels: the recipe); hierarchical: the seed's "
                         "class; bottomup: q(z1|x) q(z2|z1) ...; onelevel: a one-level VAE", choices=MODELS,
                         group="model")
    arch: str = setting("mlp", "topdown: mlp (the seed's networks, 1-d latents) or resnet (residual conv cells, "
                        "latent groups at 1/2, 1/4, 1/8 of the image size, a fused per-pixel head)", choices=ARCHS,
                        group="model")
    conv_channels: int = setting(32, "resnet: channels of every cell (scale up on a GPU)", kind=POSITIVE_INT,
                                 metavar="C", group="model")
    latent_channels: int = setting(8, "resnet: channels of every latent group", kind=POSITIVE_INT, metavar="C",
                                   group="model")
    groups: List[int] = setting([1, 2, 2], "resnet: latent groups per scale, finest first (1 2 2: one at 14x14, "
                                "two at 7x7, two at 4x4 for 28x28 images)", kind=NONNEG_INT, metavar="N",
                                group="model")
    channels_last: bool = setting(False, "resnet: keep the weights and activations in channels_last memory "
                                  "format (with --precision bf16 on an AMX CPU the step is about 1.5x faster)",
                                  group="model")
    levels: int = setting(2, "levels of the topdown (>= 1) or bottomup (>= 2) model", kind=POSITIVE_INT,
                          group="model")
    latent_dims: Optional[List[int]] = setting(None, "topdown, bottomup: the size of each level, z1 first "
                                               "(default: 2L for every level, L on top)", kind=POSITIVE_INT,
                                               metavar="N", group="model")
    L: int = setting(8, "top latent size; z1 = 2L (the one-level model: 2L)", kind=POSITIVE_INT, group="model")
    hidden: int = setting(256, "hidden units M of the MLP networks", kind=POSITIVE_INT, group="model")
    conv: bool = setting(False, "topdown MLP model: conv encoder and decoder (image-shaped data)", group="model")
    dropout: float = setting(0.0, "topdown MLPs: Dropout(P) after every BatchNorm (0: none, the recipe)", kind=UNIT,
                             metavar="P", group="model")
    likelihood: str = setting("categorical", "p(x | z1): categorical over the pixel values, bernoulli of "
                              "binarized pixels, or dmol, PixelCNN++'s discretized logistic mixture (arch resnet)",
                              choices=("categorical", "bernoulli", "dmol"), group="data")
    mixtures: int = setting(10, "likelihood dmol: logistic components per pixel", kind=POSITIVE_INT, metavar="M",
                            group="data")
    backend: str = setting("fused", "fused: the compiled kernels; torch: the pure-PyTorch reference",
                           choices=("fused", "torch"), group="model")
    in_kernel_noise: bool = setting(False, "draw each level's noise inside the posterior_sample kernel (Philox, "
                                    "drawn again in the backward) instead of torch.randn_like", group="model")
    # -- the data
    data: Optional[str] = setting(None, "fashion-mnist (Debian's dataset-fashion-mnist package), a folder of "
                                  "MNIST-format IDX files, or a .npy, .npz or IDX file (default: sklearn's digits, "
                                  "the recipe's split)", metavar="SOURCE", group="data")
    val_size: int = setting(_data.DEFAULT_VAL_SIZE, "IDX folders and fashion-mnist: validate on the last N "
                            "training images (the test split is the official one)", kind=POSITIVE_INT, metavar="N", group="data")
    shuffle_seed: Optional[int] = setting(None, "a single-array file: shuffle with SEED before the 60/20/20 split "
                                          "(default: in order)", metavar="SEED", group="data")
    binarize: str = setting("threshold", "bernoulli: threshold (x > --threshold) or dynamic (every training batch "
                            "drawn again as x ~ Bernoulli(x / max); val and test drawn once, seeded)",
                            choices=_data.BINARIZE, group="data")
    threshold: Optional[float] = setting(None, "bernoulli: binarize x > THRESHOLD (default: the middle of the "
                                         "range)", group="data")
    num_vals: Optional[int] = setting(None, "values per pixel (default: 256 for uint8, else max + 1)",
                                      kind=POSITIVE_INT, group="data")
    max_train: Optional[int] = setting(None, "use only the first N training examples", kind=POSITIVE_INT,
                                       metavar="N", group="data")
    # -- training
    epochs: int = setting(1000, "maximum epochs", kind=POSITIVE_INT)
    patience: int = setting(20, "early stopping: stop once the validation loss has not improved for more than "
                            "this many epochs", kind=NONNEG_INT)
    lr: float = setting(1e-3, "Adamax learning rate", kind=POSITIVE)
    batch_size: int = setting(64, "examples per step (under torchrun: per rank)", kind=POSITIVE_INT)
    kl_warmup: int = setting(0, "epochs of linear KL warm-up (0: none, the recipe)", kind=NONNEG_INT)
    iw_train: int = setting(1, "train on the importance-weighted (IWAE) bound with K samples per image (1: the "
                            "-ELBO, the recipe)", kind=POSITIVE_INT, metavar="K")
    val_iw: int = setting(0, "select the best model and early-stop on the validation IW bound with K samples (0: "
                          "on the validation -ELBO, the recipe)", kind=NONNEG_INT, metavar="K")
    weight_decay: float = setting(0.0, "Adamax weight decay", kind=NONNEG)
    lr_drops: int = setting(0, "when the patience runs out, reload the best model and multiply the learning rate by "
                            "--lr-drop-factor, N times before stopping (0: stop, the recipe)", kind=NONNEG_INT,
                            metavar="N")
    lr_drop_factor: float = setting(0.1, "the factor of each lr drop", kind=POSITIVE)
    seed: int = setting(0, "seeds the initial weights, the shuffling and the noise")
    precision: str = setting("fp32", "the training step under torch.autocast in this dtype (the fused ops run in "
                             "float32); fp16 on CUDA uses a gradient scaler", choices=PRECISIONS)
    device: str = setting("cpu", "cpu, cuda or cuda:N (under torchrun each rank uses its own: cuda:LOCAL_RANK "
                          "when GPUs are present)", group="run")
    deterministic: bool = setting(False, "deterministic algorithms only (cuDNN included): a resumed GPU run then "
                                  "repeats the uninterrupted one bit for bit; slower on GPUs (CPU runs are "
                                  "deterministic anyway)", group="run")
    progress: bool = setting(True, "no progress bar", flag="--no-progress", group="run")
    tensorboard: bool = setting(False, "also write TensorBoard event files into OUT/tensorboard: every metrics.jsonl "
                                "row's numbers (step = epoch) and, every --tensorboard-every epochs, samples and "
                                "reconstructions (needs the tensorboard package: pip install "
                                "'hvae_fast[tensorboard]')", group="run")
    tensorboard_every: int = setting(5, "with --tensorboard: samples and reconstructions of validation images after "
                                     "the first epoch and every N epochs", kind=POSITIVE_INT, metavar="N",
                                     group="run")
    # -- training aids (VDVAE / NVAE / Efficient-VDVAE), all off by default: the recipe
    grad_clip: Optional[float] = setting(None, "clip the total gradient norm to NORM (0 or unset: no clipping)",
                                         kind=NONNEG, metavar="NORM", group="aids")
    skip_threshold: Optional[float] = setting(None, "skip updates whose gradient norm is above NORM or "
                                              "non-finite, as VDVAE (unset: never skip; a non-finite loss then "
                                              "stops the run)", kind=NONNEG, metavar="NORM", group="aids")
    max_consecutive_skips: int = setting(100, "with --skip-threshold: stop after N skipped updates in a row",
                                         kind=POSITIVE_INT, metavar="N", group="aids")
    ema: float = setting(0.0, "keep an exponential moving average of the weights with this decay (e.g. 0.999); it "
                         "is validated, saved and returned (0: none)", kind=UNIT, metavar="DECAY", group="aids")
    kl_warmup_steps: int = setting(0, "linear KL warm-up over STEPS training steps, instead of --kl-warmup's "
                                   "epochs", kind=NONNEG_INT, metavar="STEPS", group="aids")
    free_bits: float = setting(0.0, "free bits: each latent level's KL term in the training loss is at least NATS "
                               "(the logged losses stay the -ELBO)", kind=NONNEG, metavar="NATS", group="aids")
    kl_balance: bool = setting(False, "NVAE's KL balancing of the levels while the KL weight is below 1",
                               group="aids")
    lr_warmup_steps: int = setting(0, "linear learning-rate warm-up over STEPS steps", kind=NONNEG_INT,
                                   metavar="STEPS", group="aids")
    lr_schedule: str = setting("constant", "cosine: decay the learning rate to lr * --lr-min-factor over --epochs",
                               choices=_aids.LRSchedule.KINDS, group="aids")
    lr_min_factor: float = setting(0.0, "cosine: the final learning rate as a fraction of --lr", kind=FRACTION,
                                   metavar="F", group="aids")
    # -- the final evaluation
    iw_samples: int = setting(1000, "importance samples of the test IW-NLL (0: skip it)", kind=NONNEG_INT,
                              group="evaluation")
    iw_subset: Optional[int] = setting(None, "the test IW-NLL on N test images drawn at random (seeded), with its "
                                       "standard error (default: all of them)", kind=POSITIVE_INT, metavar="N",
                                       group="evaluation")
    eval_memory_mb: int = setting(512, "memory budget of every evaluation pass (validation and test) in MiB: how "
                                  "many rows go through the networks at once, from what one row costs the model",
                                  kind=POSITIVE_INT, flag="--eval-memory", metavar="MB", group="evaluation")
    # -- filled in by the run
    world_size: int = setting(1, "data-parallel ranks (torchrun)", cli=False)
    D: Optional[int] = setting(None, "values per example, from the data", cli=False)
    image_shape: Optional[List[int]] = setting(None, "[H, W] of the images, from the data", cli=False)
    image_channels: int = setting(1, "channels of the images, from the data", cli=False)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def recipe(cls, name, **settings):
        """The documented recipe for a named data set (RECIPES), with `settings` on top."""
        return cls(**{**recipe_values(name, settings), **settings})

    def __post_init__(self):
        for name in ("groups", "latent_dims", "image_shape"):  # tuples are welcome; checkpoints hold lists
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))

    def given(self):
        """The settings this config sets: those not at their default value (the command line
        knows better: what was typed, see check(given=...))."""
        return {f.name for f in dataclasses.fields(self) if getattr(self, f.name) != _default(f)}

    def check(self, name=None, only=None, given=None):
        """Raises SettingError for the first setting out of range, at odds with another, or given
        where nothing reads it, and returns self. name(field) spells a setting in the message
        (default: the field's name). given: the settings the user set (default: self.given();
        a recipe's values are not the user's). only: check the ranges of these fields alone, and
        that each acts (a resume's overrides), not the saved run's rules."""
        n = _mark
        for f in dataclasses.fields(self):
            if only is not None and f.name not in only:
                continue
            v, kind, choices = getattr(self, f.name), f.metadata["kind"], f.metadata["choices"]
            values = v if isinstance(v, list) else [v]
            if choices and v not in choices:
                raise SettingError(f"{n(f.name)} must be one of {choices}, got {v!r}", name)
            if kind and v is not None and not all(kind.ok(x) for x in values):
                raise SettingError(f"{n(f.name)} must be {kind.text}, got {v!r}", name)
        if only is None or "device" in only:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise SettingError(f"{n('device')} {self.device!r}: not a device (cpu, cuda, cuda:N)", name) from None
        if self.tensorboard:  # the environment, not a rule of the settings: checked on resume too
            try:
                _writer.summary_writer_class()
            except ImportError as e:
                raise SettingError(f"{n('tensorboard')}: {e}", name) from None
        if only is not None:
            given = set(only)
        else:
            given = self.given() if given is None else set(given)
            rules = [
                (self.model == "bottomup" and self.levels < 2,
                 f"{n('model')} bottomup needs {n('levels')} >= 2 (one level is {n('model')} onelevel)"),
                (sum(self.groups) < 1, f"{n('groups')} needs at least one latent group"),
                (self.latent_dims and len(self.latent_dims) != self.levels,
                 f"{n('latent_dims')} needs {self.levels} sizes (one per level), got {len(self.latent_dims or [])}"),
                (self.iw_train > 1 and self.kl_warmup > 0,
                 f"{n('iw_train')} > 1 and {n('kl_warmup')} cannot be combined (the IW bound has no KL term to "
                 f"weight)"),
                (self.iw_train > 1 and (self.kl_warmup_steps > 0 or self.free_bits > 0 or self.kl_balance),
                 f"{n('iw_train')} > 1 cannot be combined with {n('kl_warmup_steps')}, {n('free_bits')} or "
                 f"{n('kl_balance')} (the IW bound has no KL term)"),
                (self.kl_warmup > 0 and self.kl_warmup_steps > 0,
                 f"{n('kl_warmup')} (epochs) and {n('kl_warmup_steps')}: set one"),
                # a value the model cannot have, whoever set it
                (self.arch == "resnet" and self.model != "topdown",
                 f"{n('arch')} applies to {n('model')} topdown only"),
                (self.likelihood == "dmol" and not (self.model == "topdown" and self.arch == "resnet"),
                 f"{n('likelihood')} dmol needs a per-pixel head: {n('model')} topdown with {n('arch')} resnet"),
                (self.model == "onelevel" and self.levels not in (1, 2) or self.model == "hierarchical"
                 and self.levels != 2, self._inert_text("levels")),
            ]
            for bad, message in rules:
                if bad:
                    raise SettingError(message, name)
        for field_name, acts, message in self.settings_that_act():
            if field_name in given and not acts:
                raise SettingError(message, name)
        return self

    def _inert_text(self, f):
        return next(message for g, _, message in self.settings_that_act() if g == f)

    def settings_that_act(self):
        """(field, whether it acts in this configuration, the message when it does not): every
        setting that some other setting can make inert. A setting given where it does not act is
        refused by check(); a recipe does not fill it (recipe_values)."""
        n = _mark
        mlp = self.model != "topdown" or self.arch == "mlp"
        resnet = not mlp
        by_level = self.model in ("topdown", "bottomup")
        own_levels = {"onelevel": 1, "hierarchical": 2}.get(self.model)
        data_file = self.data is not None and self.data not in _data.NAMED
        if resnet:
            levels_text = {f: f"{n(f)} applies to the MLP models; {n('arch')} resnet's levels are {n('groups')}"
                           for f in ("levels", "latent_dims")}
        else:
            text = (f"{n('levels')} and {n('latent_dims')} apply to {n('model')} topdown and bottomup only "
                    f"({self.model} has {own_levels} level{'s' if own_levels != 1 else ''})")
            levels_text = {"levels": text, "latent_dims": text}
        return [
            ("arch", self.model == "topdown", f"{n('arch')} applies to {n('model')} topdown only (the other models "
                                              f"have MLP networks)"),
            ("conv_channels", resnet, f"{n('conv_channels')} applies to {n('arch')} resnet only"),
            ("latent_channels", resnet, f"{n('latent_channels')} applies to {n('arch')} resnet only"),
            ("groups", resnet, f"{n('groups')} applies to {n('arch')} resnet only"),
            ("channels_last", resnet, f"{n('channels_last')} applies to {n('arch')} resnet only"),
            ("levels", mlp and (by_level or self.levels == own_levels), levels_text["levels"]),
            ("latent_dims", mlp and by_level, levels_text["latent_dims"]),
            ("L", mlp and not (by_level and self.latent_dims),
             f"{n('L')} applies to the MLP models; {n('arch')} resnet's latent sizes are {n('latent_channels')} "
             f"and {n('groups')}" if resnet else
             f"{n('L')} sets the default level sizes; {n('latent_dims')} gives every level's size"),
            ("hidden", mlp, f"{n('hidden')} applies to the MLP networks; {n('arch')} resnet's width is "
                            f"{n('conv_channels')}"),
            ("conv", self.model == "topdown" and mlp,
             f"{n('conv')} applies to {n('model')} topdown only" if self.model != "topdown" else
             f"{n('conv')} applies to {n('arch')} mlp only (resnet is convolutional)"),
            ("dropout", self.model == "topdown" and mlp and not self.conv,
             f"{n('dropout')} applies to the topdown model's MLP networks only (not {n('conv')}, not {n('arch')} "
             f"resnet)"),
            ("mixtures", self.likelihood == "dmol", f"{n('mixtures')} applies to {n('likelihood')} dmol only"),
            ("binarize", self.likelihood == "bernoulli",
             f"{n('binarize')} applies to {n('likelihood')} bernoulli only"),
            ("threshold", self.likelihood == "bernoulli" and self.binarize == "threshold",
             f"{n('threshold')} applies to {n('likelihood')} bernoulli only" if self.likelihood != "bernoulli" else
             f"{n('threshold')} applies to {n('binarize')} threshold, not dynamic"),
            ("num_vals", self.data is not None,
             f"{n('num_vals')} applies to a source given as {n('data')}; sklearn's digits (the default) have 17 "
             f"values"),
            ("val_size", self.data is not None and not (data_file and os.path.isfile(self.data)),
             f"{n('val_size')} applies to IDX folders and fashion-mnist only ("
             + ("the default digits have the recipe's split)" if self.data is None else
                f"{self.data} is a file: its split is 60/20/20)")),
            ("shuffle_seed", data_file and not os.path.isdir(self.data),
             f"{n('shuffle_seed')} applies to a single-array file only (the digits, fashion-mnist and IDX folders "
             f"have fixed splits)"),
            ("lr_drop_factor", self.lr_drops > 0, f"{n('lr_drop_factor')} applies with {n('lr_drops')} >= 1 only"),
            ("max_consecutive_skips", bool(self.skip_threshold),
             f"{n('max_consecutive_skips')} applies with {n('skip_threshold')} only"),
            ("kl_balance", self.kl_warmup > 1 or self.kl_warmup_steps > 1,
             f"{n('kl_balance')} acts only while the KL weight is below 1: set {n('kl_warmup')} or "
             f"{n('kl_warmup_steps')}"),
            ("kl_warmup", self.kl_warmup != 1, f"{n('kl_warmup')} 1 is no warm-up (the KL weight is 1 from the "
                                               f"first epoch)"),
            ("kl_warmup_steps", self.kl_warmup_steps != 1, f"{n('kl_warmup_steps')} 1 is no warm-up (the KL weight "
                                                           f"is 1 from the first step)"),
            ("lr_warmup_steps", self.lr_warmup_steps != 1, f"{n('lr_warmup_steps')} 1 is no warm-up (the first step "
                                                           f"takes the full learning rate)"),
            ("lr_min_factor", self.lr_schedule == "cosine",
             f"{n('lr_min_factor')} applies to {n('lr_schedule')} cosine only"),
            ("iw_subset", self.iw_samples > 0, f"{n('iw_subset')} applies with {n('iw_samples')} >= 1 only (0 "
                                               f"skips the test IW-NLL)"),
            ("tensorboard_every", self.tensorboard, f"{n('tensorboard_every')} applies with {n('tensorboard')} only"),
        ]

    def check_out(self, out, name=None):
        """Raises SettingError where a setting needs the run's folder and `out` is None."""
        if self.tensorboard and out is None:
            raise SettingError(f"{_mark('tensorboard')} writes into the run's folder, and this run has none (give "
                               f"out=..., --out)", name)
        return self

    def check_data(self, ds, name=None):
        """What depends on the data, once it is loaded: raises SettingError (named as in check())
        for a setting the data `ds` cannot take or make use of, and returns self."""
        n, src = _mark, ds.name
        rules = [
            (self.model == "topdown" and self.arch == "mlp" and self.conv and ds.channels != 1,
             f"{n('conv')} takes one-channel images; {src} has {ds.channels} channels ({n('arch')} resnet takes them)"),
            (self.model == "topdown" and self.arch == "mlp" and self.conv and ds.image_shape is None,
             f"{n('conv')} needs image-shaped data ([N, H, W] arrays, or square D); {src} has rows of {ds.D} values"),
            (self.model == "topdown" and self.arch == "resnet" and ds.image_shape is None,
             f"{n('arch')} resnet needs image-shaped data ([N, H, W] or [N, C, H, W] arrays, or square D); {src} "
             f"has rows of {ds.D} values"),
            (self.shuffle_seed is not None and "shuffle_seed" not in ds.info,
             f"{n('shuffle_seed')} applies to a single array; {src} holds its own train, val and test arrays"),
            (self.likelihood == "bernoulli" and self.binarize == "dynamic" and ds.grey_max is None,
             f"{n('binarize')} dynamic: {src} is already 0/1, there is nothing to draw"),
            (self.max_train is not None and len(ds.train) < self.max_train,
             f"{n('max_train')} {self.max_train}: {src}' training split has only {len(ds.train)} examples"),
            (self.iw_samples > 0 and self.iw_subset is not None and self.iw_subset >= len(ds.test),
             f"{n('iw_subset')} {self.iw_subset}: {src}' test split has only {len(ds.test)} examples (leave it out "
             f"to use all of them)"),
        ]
        for bad, message in rules:
            if bad:
                raise SettingError(message, name)
        return self


def _default(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _mark(field_name):
    """A setting's name in a message, spelled later (SettingError.named)."""
    return f"\x00{field_name}\x00"


class _Named(ValueError):
    """An error whose message names settings: str() spells them as `name` does (default: the
    field names), named(flag) as options."""

    def __init__(self, message, name=None):
        super().__init__(message)
        self.message, self.name = message, name

    def named(self, name=None):
        name = name or self.name or (lambda f: f)
        return "".join(name(p) if i % 2 else p for i, p in enumerate(self.message.split("\x00")))

    def __str__(self):
        return self.named()


class SettingError(_Named):
    """A setting out of range, or two that cannot be combined; the message names them."""


# The settings `hvae-fast train --data NAME` (and TrainConfig.recipe(NAME)) take for a named
# data set wherever the command line does not say otherwise; README "Real data" reports them.
RECIPES = {
    "fashion-mnist": dict(data="fashion-mnist", arch="resnet", likelihood="dmol", groups=[2, 3, 3],
                          channels_last=True, precision="bf16", epochs=22, lr=3e-3, lr_warmup_steps=200,
                          lr_schedule="cosine", ema=0.999, grad_clip=200.0, skip_threshold=1e5, iw_subset=1000),
}


def bf16_is_fast(device="cpu"):
    """Whether bf16 autocast speeds the image model up on `device`: a GPU with bf16 units, or
    a CPU with AMX tiles (Sapphire Rapids and later; 1.5x here). Elsewhere a CPU emulates bf16
    and the step gets slower, so a recipe keeps fp32 there."""
    try:
        if str(device).startswith("cuda"):
            return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, AssertionError, RuntimeError):  # a torch without the probe, or without CUDA
        return False


def recipe_values(name, settings):
    """The values recipe `name` gives the settings that `settings` leave open, those of them
    that act beside `settings` (the fashion-mnist recipe's arch resnet is no setting of a
    bottomup model, its iw_subset none with iw_samples 0): a recipe never sets what check()
    would refuse a user for. Its precision bf16 is taken only where bf16_is_fast()."""
    if name not in RECIPES:
        raise ValueError(f"no recipe for {name!r}; recipes: {', '.join(RECIPES)}")
    values = {k: v for k, v in RECIPES[name].items() if k not in settings}
    if values.get("precision") == "bf16" and not bf16_is_fast(settings.get("device", "cpu")):
        del values["precision"]  # the machine's choice, not the recipe's: fp32 where bf16 is emulated
    while True:
        merged = TrainConfig(**{**values, **settings})
        inert = {f for f, acts, _ in merged.settings_that_act() if not acts}
        if values.get("likelihood") == "dmol" and not (merged.model == "topdown" and merged.arch == "resnet"):
            inert.add("likelihood")  # the recipe's head needs its image model; the others keep their default
        if not inert & set(values):
            return values
        values = {k: v for k, v in values.items() if k not in inert}


# What a resumed run may change; every other setting comes from its checkpoint.
RESUME_OVERRIDES = ("epochs", "patience", "progress", "lr_drops", "lr_drop_factor", "device", "iw_samples",
                    "iw_subset", "eval_memory_mb", "max_consecutive_skips", "tensorboard", "tensorboard_every")


class ResumeError(_Named):
    """A resume that asks for a run other than the saved one; the message says what differs."""


def resumed(saved, overrides, path):
    """(the saved config with `overrides` applied, a description of each change).

    Only RESUME_OVERRIDES may differ from the saved run; asking for another change is an
    error that names it, since the run would silently not be the one it claims to continue."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ResumeError(f"not training settings: {', '.join(unknown)}")
    fixed = [f"{_mark(k)} (saved {getattr(saved, k)!r}, asked {v!r})" for k, v in overrides.items()
             if k not in RESUME_OVERRIDES and getattr(saved, k) != v]
    if fixed:
        raise ResumeError(f"{path}: a resumed run keeps its settings; cannot change {', '.join(fixed)}. "
                          f"Only {', '.join(map(_mark, RESUME_OVERRIDES))} may change on resume")
    if saved.lr_schedule == "cosine" and overrides.get("epochs", saved.epochs) != saved.epochs:
        # the cosine's length is the run's steps: other epochs would move the lr off its curve at once
        raise ResumeError(f"{path}: cannot change {_mark('epochs')} ({saved.epochs} -> {overrides['epochs']}) under "
                          f"{_mark('lr_schedule')} 'cosine', which plans the learning rate over the saved run's "
                          f"{saved.epochs} epochs: the lr would jump where the run resumes. Resume with "
                          f"{saved.epochs} epochs, or start a new run")
    changes = [f"{k} {getattr(saved, k)!r} -> {v!r}" for k, v in overrides.items() if getattr(saved, k) != v]
    return dataclasses.replace(saved, **overrides), changes


# ---- the command line ------------------------------------------------------------------------

GROUP_TITLES = {"model": "model", "data": "data", "training": "training", "aids": "training aids (all off by "
                "default: the recipe)", "evaluation": "the final evaluation", "run": "the run"}


def flag(name):
    """The option that sets field `name`."""
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return f.metadata["flag"] or "--" + name.replace("_", "-")


def add_options(parser, exclude=()):
    """One option per TrainConfig field, grouped, with the field's help and default. Options
    not given leave no attribute (argparse.SUPPRESS), so that typed_settings(args) tells the
    settings a user typed from the defaults."""
    groups = {}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        m = f.metadata
        if not m["cli"] or f.name in exclude:
            continue
        if m["group"] not in groups:
            groups[m["group"]] = parser.add_argument_group(GROUP_TITLES[m["group"]])
        g, hint = groups[m["group"]], hints[f.name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kw = dict(dest=f.name, default=argparse.SUPPRESS)
        if hint is bool:
            # a switch a recipe turns on can be turned off again: --no-NAME
            recipe_sets = not m["flag"] and any(f.name in r for r in RECIPES.values())
            kw.update(action=argparse.BooleanOptionalAction if recipe_sets else
                      "store_false" if default else "store_true", help=m["help"])
        else:
            if typing.get_origin(hint) is typing.Union:  # Optional[T]
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            listed = typing.get_origin(hint) is list
            elem = typing.get_args(hint)[0] if listed else hint
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            kw.update(type=m["kind"].parse if m["kind"] else elem, choices=m["choices"], metavar=m["metavar"],
                      help=m["help"] + ("" if default is None else f" (default: {shown})"))
            if listed:
                kw["nargs"] = "+"
        g.add_argument(m["flag"] or "--" + f.name.replace("_", "-"), **kw)


def typed_settings(args):
    """{field: value} of the TrainConfig options a user typed (see add_options)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}
