"""Training: the reference recipe by default, with checkpoints, resume and a metrics log.

Recipe: Adamax(lr=1e-3), batch 64 (only the training set is shuffled), up to 1000 epochs,
early stopping with patience 20 (stop once the validation loss has not improved for more
than 20 epochs), keep the best-validation model. Validation loss = sum over the set of the
per-example -ELBO / N, in eval() mode, one latent sample per image.

Options beyond the recipe (all off by default): iw_train = K > 1 trains on the IWAE bound
(K importance samples per image); val_iw = K > 0 selects the best model and early-stops on the
validation IW bound with K samples instead of the -ELBO (best_val is then that bound);
weight_decay is Adamax's; lr_drops = n > 0: each time the patience runs out, reload the best
model, multiply the learning rate by lr_drop_factor and go on, n times, then stop.
Training aids (hvae_fast.aids, also off by default): gradient clipping and update skipping,
an EMA of the weights (then the validated, saved and returned model), KL warm-up in steps,
free bits and KL balancing, learning-rate warm-up and cosine decay.

Files in `out`:
  last.pt       everything needed to resume (model, optimizer, best model, counters, RNG)
  best.pt       the best-validation model and its config (what `hvae-fast eval` reads)
  metrics.jsonl one JSON line per epoch
Checkpoints hold only tensors, dicts, lists, str, int, float, bool and None, so
torch.load(path, weights_only=True) reads them; they are written atomically.
"""
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from torch import nn

from . import aids as _aids
from . import data as _data
from . import distributed as _dist
from . import evaluate as _eval
from .model import BottomUpVAE, ConvTopDownVAE, HierarchicalVAE, OneLevelVAE, TopDownVAE
from .optim import Adamax

MODELS = ("topdown", "hierarchical", "bottomup", "onelevel")
ARCHS = ("mlp", "resnet")


@dataclass
class TrainConfig:
    model: str = "topdown"          # topdown | hierarchical | bottomup | onelevel
    arch: str = "mlp"               # topdown: mlp (the seed's networks, 1-d latents) | resnet (ConvTopDownVAE:
                                    # residual conv cells, latent groups at several resolutions, fused head)
    conv_channels: int = 32         # resnet: channels of every cell
    latent_channels: int = 8        # resnet: channels of every latent group
    groups: List[int] = field(default_factory=lambda: [1, 2, 2])  # resnet: latent groups per scale, finest first
    levels: int = 2                 # topdown (>= 1) and bottomup (>= 2)
    latent_dims: Optional[List[int]] = None  # topdown and bottomup; default 2L for every level, L on top
    L: int = 8                      # top latent size (the one-level model uses 2L = 16)
    hidden: int = 256               # M
    conv: bool = False              # topdown only: conv encoder/decoder for image-shaped data
    likelihood: str = "categorical"
    backend: str = "fused"
    in_kernel_noise: bool = False   # each level's noise drawn in the posterior_sample kernel (Philox),
                                    # not by torch.randn_like (False: the seed's noise)
    data: Optional[str] = None      # None: digits; 'fashion-mnist'; an IDX folder; a .npy/.npz/IDX file
    val_size: int = 10000           # IDX folders: validation = the last val_size training images
    shuffle_seed: Optional[int] = None  # a single array: shuffled with this seed before the split (None: in order)
    binarize: str = "threshold"     # bernoulli: 'threshold' (x > threshold) or 'dynamic' (redrawn every batch)
    threshold: Optional[float] = None
    num_vals: Optional[int] = None
    max_train: Optional[int] = None
    epochs: int = 1000
    patience: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    kl_warmup: int = 0              # epochs of linear KL warm-up (0: none, the recipe)
    iw_train: int = 1               # importance samples per image in the training loss (1: -ELBO, the recipe;
                                    # K > 1: the IWAE bound -log (1/K) sum_k w_k)
    val_iw: int = 0                 # > 0: select/early-stop on the validation IW bound with this many samples
                                    # (0: on the validation -ELBO, the recipe)
    weight_decay: float = 0.0       # Adamax weight decay (0: none, the recipe)
    dropout: float = 0.0            # topdown MLPs only: Dropout after every BatchNorm (0: none, the recipe)
    lr_drops: int = 0               # when patience runs out: reload the best model, lr *= lr_drop_factor and
    lr_drop_factor: float = 0.1     # go on, this many times before stopping (0: stop at once, the recipe)
    # training aids (VDVAE / NVAE / Efficient-VDVAE), all off by default: the recipe
    grad_clip: Optional[float] = None   # clip the total gradient norm to this (0/None: no clipping)
    skip_threshold: Optional[float] = None  # skip updates whose gradient norm is above this or non-finite
                                    # (0/None: never skip; a non-finite loss then stops the run)
    max_consecutive_skips: int = 100  # this many skipped updates in a row stop the run
    ema: float = 0.0                # decay of an EMA of the weights, validated, saved and returned (0: none)
    kl_warmup_steps: int = 0        # steps of linear KL warm-up (0: none; kl_warmup counts epochs instead)
    free_bits: float = 0.0          # nats per latent group: its KL term is max(batch-mean KL, free_bits) (0: none)
    kl_balance: bool = False        # NVAE's KL balancing of the groups while the KL weight is < 1
    lr_warmup_steps: int = 0        # steps of linear learning-rate warm-up (0: none)
    lr_schedule: str = "constant"   # constant | cosine (to lr * lr_min_factor at the last step of `epochs`)
    lr_min_factor: float = 0.0
    seed: int = 0
    progress: bool = True
    world_size: int = 1             # data-parallel ranks (torchrun); batch_size is per rank
    precision: str = "fp32"         # fp32 | bf16 | fp16: the training step under torch.autocast
    device: str = "cpu"             # where a single process trains (under torchrun: each rank's own)
    deterministic: bool = False     # deterministic algorithms (cuDNN included): bit-identical GPU resumes, slower
    iw_samples: int = 1000          # importance samples of the final test IW-NLL (hvae-fast train's report)
    iw_subset: Optional[int] = None  # the test IW-NLL on this many random test images (None: all of them)
    eval_memory_mb: int = 512       # memory budget of every evaluation pass (validation, test), in MiB
    # filled from the data when the model is built
    D: Optional[int] = None
    image_shape: Optional[List[int]] = None
    image_channels: int = 1

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def recipe(cls, name, **settings):
        """The documented recipe for a named data set (RECIPES), with `settings` on top."""
        if name not in RECIPES:
            raise ValueError(f"no recipe for {name!r}; recipes: {', '.join(RECIPES)}")
        return cls(**{**RECIPES[name], **settings})

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# The settings `hvae-fast train --data NAME` (and TrainConfig.recipe(NAME)) take for a named
# data set wherever the command line does not say otherwise; README "Real data" reports them.
RECIPES = {
    "fashion-mnist": dict(data="fashion-mnist", arch="resnet", epochs=12, lr=3e-3, lr_warmup_steps=200,
                          lr_schedule="cosine", ema=0.999, grad_clip=200.0, iw_subset=1000),
}


# What a resumed run may change; every other setting comes from its checkpoint.
RESUME_OVERRIDES = ("epochs", "patience", "progress", "lr_drops", "lr_drop_factor", "device", "iw_samples", "iw_subset",
                    "eval_memory_mb", "max_consecutive_skips")


def resumed_config(saved, overrides, path):
    """(the saved config with `overrides` applied, a description of each change).

    Only RESUME_OVERRIDES may differ from the saved run; asking for another change is an
    error that names it, since the run would silently not be the one it claims to continue."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ResumeError(f"not training settings: {', '.join(unknown)}")
    fixed = [f"{k} (saved {getattr(saved, k)!r}, asked {v!r})" for k, v in overrides.items()
             if k not in RESUME_OVERRIDES and getattr(saved, k) != v]
    if fixed:
        raise ResumeError(f"{path}: a resumed run keeps its settings; cannot change {', '.join(fixed)}. "
                         f"Only {', '.join(RESUME_OVERRIDES)} may change on resume")
    changes = [f"{k} {getattr(saved, k)!r} -> {v!r}" for k, v in overrides.items() if getattr(saved, k) != v]
    return dataclasses.replace(saved, **overrides), changes


class ResumeError(ValueError):
    """A resume that asks for a run other than the saved one; the message says what differs."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read; the message names it."""


def load_data(config):
    """The dataset a config names (its source, split and binarization)."""
    return _data.load(config.data, config.likelihood, config.threshold, config.num_vals, max_train=config.max_train,
                      val_size=config.val_size, shuffle_seed=config.shuffle_seed, binarize_mode=config.binarize,
                      seed=config.seed)


def build_model(config, num_vals, D, image_shape=None):
    """The model a config describes (data-dependent sizes given explicitly)."""
    c = config
    common = dict(D=D, num_vals=num_vals, likelihood_type=c.likelihood, backend=c.backend)
    if c.model == "hierarchical":
        model = HierarchicalVAE.from_recipe(M=c.hidden, L=c.L, **common)
    elif c.model == "topdown" and c.arch == "resnet":
        if image_shape is None:
            raise ValueError("arch 'resnet' needs image-shaped data ([N, H, W] or [N, C, H, W] arrays, or square D)")
        model = ConvTopDownVAE(image_shape=(c.image_channels, *image_shape), num_vals=num_vals,
                               likelihood_type=c.likelihood, channels=c.conv_channels,
                               latent_channels=c.latent_channels, groups=c.groups, backend=c.backend)
    elif c.model == "topdown":
        model = TopDownVAE.from_config(levels=c.levels, M=c.hidden, L=c.L, latent_dims=c.latent_dims,
                                       conv=c.conv, image_shape=image_shape, dropout=c.dropout, **common)
    elif c.model == "bottomup":
        model = BottomUpVAE.from_config(M=c.hidden, L=c.L, levels=c.levels, latent_dims=c.latent_dims, **common)
    elif c.model == "onelevel":
        model = OneLevelVAE.from_config(M=c.hidden, L=2 * c.L, **common)
    else:
        raise ValueError(f"model must be one of {MODELS}, got {c.model!r}")
    model.in_kernel_noise = c.in_kernel_noise
    return model


# ---- checkpoints ----------------------------------------------------------------------------

CHECKPOINT_FORMAT = 1  # raise when the layout of a checkpoint changes


def atomic_save(obj, path):
    """torch.save to a temporary file in the same directory, then os.replace."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(obj, path):
    """json.dump to a temporary file in the same directory, then os.replace."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def load_checkpoint(path):
    """torch.load(path, weights_only=True), with a clear error naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: not a readable hvae_fast checkpoint (corrupt, truncated or not written "
                              f"by hvae-fast; {type(e).__name__}: {first})") from None
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise CheckpointError(f"{path}: not an hvae_fast checkpoint (no 'model' and 'config' entries)")
    if ck.get("format", 1) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: written by a newer hvae_fast (checkpoint format {ck['format']}; this "
                              f"version reads format {CHECKPOINT_FORMAT} and older): upgrade hvae_fast")
    return ck


def model_from_checkpoint(path_or_ck, backend=None):
    """(model in eval mode, TrainConfig) from a checkpoint file or a loaded checkpoint dict."""
    ck = load_checkpoint(path_or_ck) if not isinstance(path_or_ck, dict) else path_or_ck
    config = TrainConfig.from_dict(ck["config"])
    if backend is not None:
        config.backend = backend
    shape = tuple(config.image_shape) if config.image_shape else None
    model = build_model(config, ck["num_vals"], config.D, shape)
    model.load_state_dict(ck["model"])
    return model.eval(), config


def _rng_state(gen):
    """torch's CPU and CUDA generators (the noise) and the shuffling generator."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "shuffle": gen.get_state()}


def _set_rng_state(state, gen):
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    gen.set_state(state["shuffle"])


def _write_metrics(path, history):
    """The log rewritten from a checkpoint's history: one row per epoch it holds."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in history)
    os.replace(tmp, path)


# ---- the loop ------------------------------------------------------------------------------

def evaluate_loss(model, x, batch_size=None, memory=None):
    """sum over x of the per-example -ELBO / N, with KL per level; in eval() mode, one sample each."""
    r = _eval.elbo(model, x, batch_size, memory)
    return {"loss": r["neg_elbo"], "log_px": r["log_px"], "kl": r["kl"]}


def iwae_loss(model, x, K):
    """The IWAE loss: mean over x of -(logsumexp_k log w_k - log K), K samples z ~ q per image.

    x is repeated K times (sample k of example e at row k*B + e) and goes through
    model.log_weight once; in train() mode BatchNorm sees the repeated batch, whose mean and
    (biased) variance are those of x. K = 1 gives -mean(log w), a single-sample -ELBO estimate
    (the same expectation as model(x), which uses the analytic KL).
    """
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    b = len(x)
    lw = model.log_weight(x.repeat(K, 1)).view(K, b)
    return -(torch.logsumexp(lw, 0) - math.log(K)).mean()


@torch.no_grad()
def evaluate_iw(model, x, samples, memory=None):
    """-mean over x of the IW bound with `samples` samples (eval() mode): the IW-NLL estimate."""
    return -_eval.iw_log_likelihood(model, x, samples, memory=memory).mean().item()


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Objective(nn.Module):
    """The training loss as a module, so that DistributedDataParallel can wrap it."""

    def __init__(self, model, config):
        super().__init__()
        self.model = model
        self.iw_train = config.iw_train
        self.autocast_dtype = PRECISIONS[config.precision]
        self.free_bits, self.kl_balance = config.free_bits, config.kl_balance

    def forward(self, xb, beta):
        """The loss to minimize; with free bits or KL balancing, (that loss, the true -ELBO) since
        the floored and reweighted objective is no bound and must not be reported as one."""
        if self.autocast_dtype is None:
            return self._loss(xb, beta)
        with torch.autocast(xb.device.type, dtype=self.autocast_dtype):
            out = self._loss(xb, beta)
            return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    def _loss(self, xb, beta):
        if self.iw_train > 1:
            return iwae_loss(self.model, xb, self.iw_train)
        if self.free_bits > 0 or self.kl_balance:
            t = self.model.elbo_terms(xb)
            kl = _aids.kl_objective(t.kl, beta, self.free_bits, self.kl_balance)
            return kl - t.log_px.mean(), -t.elbo.mean().detach()
        if beta == 1.0:
            return self.model(xb)
        t = self.model.elbo_terms(xb)
        return -(t.log_px - beta * t.kl_total).mean()


def _validate(model, x_val, config, ctx):
    """Validation metrics over the whole set; under torchrun each rank takes a shard."""
    if ctx is None:
        x_val = x_val.to(next(model.parameters()).device)
        val = evaluate_loss(model, x_val, config.batch_size, config.eval_memory_mb * 2**20)
        if config.val_iw > 0:
            val["iw"] = evaluate_iw(model, x_val, config.val_iw, config.eval_memory_mb * 2**20)
        return val
    shard = _dist.shard(x_val, ctx).to(ctx.device)
    n = len(shard)
    memory = config.eval_memory_mb * 2**20
    val = evaluate_loss(model, shard, config.batch_size, memory) if n else {"loss": 0.0, "log_px": 0.0, "kl": None}
    kl = val["kl"] or [0.0] * len(model.latent_dims)
    sums = [val["loss"] * n, val["log_px"] * n] + [k * n for k in kl]
    if config.val_iw > 0:
        sums.append(evaluate_iw(model, shard, config.val_iw, memory) * n if n else 0.0)
    sums = [v / len(x_val) for v in _dist.all_sum(sums, ctx)]
    out = {"loss": sums[0], "log_px": sums[1], "kl": sums[2:2 + len(kl)]}
    if config.val_iw > 0:
        out["iw"] = sums[-1]
    return out


def _kl_weight(config, epoch):
    return 1.0 if config.kl_warmup <= 0 else min(1.0, (epoch + 1) / config.kl_warmup)


def _check_aids(c):
    """ValueError naming the first out-of-range training-aid setting."""
    bad = [(c.grad_clip or 0) < 0 and "grad_clip must be >= 0 (0/None: off)",
           (c.skip_threshold or 0) < 0 and "skip_threshold must be >= 0 (0/None: off)",
           c.max_consecutive_skips < 1 and "max_consecutive_skips must be >= 1",
           not 0 <= c.ema < 1 and "ema (the decay) must be in [0, 1)",
           c.kl_warmup_steps < 0 and "kl_warmup_steps must be >= 0",
           c.kl_warmup_steps > 0 and c.kl_warmup > 0 and "kl_warmup (epochs) and kl_warmup_steps: set one",
           c.free_bits < 0 and "free_bits must be >= 0",
           c.lr_warmup_steps < 0 and "lr_warmup_steps must be >= 0",
           c.lr_schedule not in _aids.LRSchedule.KINDS and f"lr_schedule must be one of {_aids.LRSchedule.KINDS}",
           not 0 <= c.lr_min_factor <= 1 and "lr_min_factor must be in [0, 1]",
           c.iw_train > 1 and (c.kl_warmup_steps > 0 or c.free_bits > 0 or c.kl_balance) and
           "iw_train > 1 cannot be combined with kl_warmup_steps, free_bits or kl_balance (the IW bound has no "
           "KL term)"]
    bad = [b for b in bad if b]
    if bad:
        raise ValueError(bad[0])


def train(config=None, dataset=None, out=None, resume=None, log=print, ctx=None, overrides=None):
    """Trains a model; returns a dict: model (best, eval mode, on the training device), config,
    history, best_val, best_epoch, ...

    out: directory for checkpoints and the metrics log (None: nothing is written).
    resume: a last.pt to continue from. Every setting then comes from the checkpoint; pass
    the ones to change as `overrides` (only RESUME_OVERRIDES may change; each change is
    logged), not a config.
    ctx: a hvae_fast.distributed.Context under torchrun: every rank trains its shard of
    each global batch (batch_size per rank) with its own noise; only rank 0 writes.
    """
    state = None
    if resume is not None:
        if config is not None:
            raise ValueError("train(resume=...) takes its settings from the checkpoint: pass the ones to change "
                             "as overrides={...}, not a config")
        state = load_checkpoint(resume)
        if "optimizer" not in state:
            raise CheckpointError(f"{resume}: holds no training state (use last.pt to resume, not best.pt)")
        config, changes = resumed_config(TrainConfig.from_dict(state["config"]), overrides or {}, resume)
        if changes and log is not None and (ctx is None or ctx.is_main):
            log(f"resuming {resume} with " + ", ".join(changes))
    else:
        config = TrainConfig() if config is None else dataclasses.replace(config)
        if overrides:
            config = dataclasses.replace(config, **overrides)
    if dataset is None:
        dataset = load_data(config)
    config.D = dataset.D
    config.image_shape = list(dataset.image_shape) if dataset.image_shape else None
    config.image_channels = dataset.channels
    if config.arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {config.arch!r}")
    if config.arch != "mlp" and (config.model != "topdown" or config.conv):
        raise ValueError("arch 'resnet' is a topdown model of its own (no --conv, --model topdown)")
    if config.conv and dataset.image_shape is None:
        raise ValueError("conv networks need image-shaped data ([N, H, W] arrays, or square D)")
    if config.dropout and (config.model != "topdown" or config.conv):
        raise ValueError("dropout applies to the topdown model's MLP networks only (not conv)")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
    if config.iw_train < 1:
        raise ValueError(f"iw_train must be >= 1, got {config.iw_train}")
    if config.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {config.precision!r}")
    if config.iw_train > 1 and config.kl_warmup > 0:
        raise ValueError("iw_train > 1 and kl_warmup > 0 cannot be combined (the IW bound has no KL term to weight)")
    _check_aids(config)

    world = ctx.world if ctx is not None else 1
    if state is not None and config.world_size != world:
        raise ResumeError(f"{resume}: the run was saved with {config.world_size} rank(s) and resumes with {world}: "
                          f"its global batch and each rank's noise stream would change; resume with "
                          f"{config.world_size}")
    config.world_size = world
    rank = ctx.rank if ctx is not None else 0
    torch.manual_seed(config.seed + rank)  # each rank its own noise
    gen = torch.Generator().manual_seed(config.seed)  # the same shuffled order on every rank
    if config.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS first starts
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    model = build_model(config, dataset.num_vals, dataset.D, dataset.image_shape)
    device = ctx.device if ctx is not None else torch.device(config.device)
    objective = _Objective(model, config)
    if ctx is not None:
        objective = _dist.wrap(objective, ctx)  # moves the model; SyncBatchNorm on CUDA
    else:
        model.to(device)
    optimizer = Adamax(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # fp16 gradients underflow without loss scaling; bf16 has float32's range
    scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16" and
                                  next(model.parameters()).device.type == "cuda")
    history, best_val, patience, start, best_state, best_epoch = [], math.inf, 0, 0, None, None
    drops, elapsed_before = 0, 0.0
    guard = _aids.UpdateGuard(config.grad_clip, config.skip_threshold, config.max_consecutive_skips)
    ema = _aids.EMA(model, config.ema) if config.ema > 0 else None
    per_batch = config.batch_size * world
    steps_per_epoch = sum(1 for i in range(0, len(dataset.train), per_batch)
                          if ctx is None or _dist.every_rank_has_rows(min(per_batch, len(dataset.train) - i), ctx))
    schedule = _aids.LRSchedule(config.lr_schedule, config.lr_warmup_steps, config.epochs * steps_per_epoch,
                                config.lr_min_factor)
    steps_done = 0  # batches trained on (skipped updates included): the clock of the step schedules
    if state is not None:
        drops = state.get("lr_drops_done", 0)
        steps_done = state.get("step", (state["epoch"] + 1) * steps_per_epoch)
        if state.get("update_guard"):
            guard.load_state_dict(state["update_guard"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best_val = state["history"], state["best_val"]
        patience, start, best_state = state["patience"], state["epoch"] + 1, state["best_model"]
        best_epoch = state.get("best_epoch")
        elapsed_before = state.get("train_time_s", history[-1]["time"] if history else 0.0)
        if scaler.is_enabled() and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        rng = state["rng"]
        ranks = state.get("rng_per_rank")
        if ranks and ctx is not None and len(ranks) == ctx.world:
            rng = {**rng, **ranks[ctx.rank]}  # this rank's noise stream
        _set_rng_state(rng, gen)

    paths = {}
    if out is not None and (ctx is None or ctx.is_main):
        os.makedirs(out, exist_ok=True)
        paths = {k: os.path.join(out, k + ".pt") for k in ("last", "best")}
        paths["metrics"] = os.path.join(out, "metrics.jsonl")
        if state is None and os.path.exists(paths["metrics"]):
            os.unlink(paths["metrics"])
        if state is not None:  # a row logged after the last checkpoint is gone with it
            _write_metrics(paths["metrics"], history)

    def checkpoint(epoch, improved, elapsed, rng_per_rank):
        common = {"format": CHECKPOINT_FORMAT, "config": config.to_dict(), "num_vals": dataset.num_vals,
                  "epoch": epoch, "best_epoch": best_epoch,
                  "best_val": best_val, "model_class": type(model).__name__}
        if improved or not os.path.exists(paths["best"]):
            atomic_save({**common, "model": best_state}, paths["best"])
        atomic_save({**common, "model": model.state_dict(), "best_model": best_state,
                     "optimizer": optimizer.state_dict(), "patience": patience, "history": history,
                     "lr_drops_done": drops, "train_time_s": elapsed,
                     "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "step": steps_done, "update_guard": guard.state_dict(),
                     "ema": ema.state_dict() if ema is not None else None,
                     "rng": _rng_state(gen), "rng_per_rank": rng_per_rank}, paths["last"])

    x_train, x_val = dataset.train, dataset.val
    n = len(x_train)
    bar = None
    if config.progress and (ctx is None or ctx.is_main):
        from tqdm.auto import tqdm
        bar = tqdm(total=config.epochs, initial=start, desc=f"{config.model}", unit="epoch", leave=False)
    t0 = time.perf_counter() - elapsed_before  # the time column continues across resumes
    evaluated = ema.model if ema is not None else model  # validated, selected, saved as best and returned

    def where():
        return f"the last good checkpoint is {os.path.join(out, 'last.pt')}" if out and history else \
            "no checkpoint was written"

    def take_lr_drop_if_due():
        """Once the patience has run out, while drops remain: a smaller step from the best model."""
        nonlocal drops, patience
        if patience > config.patience and drops < config.lr_drops:
            model.load_state_dict(best_state)
            if ema is not None:  # the average restarts where the weights do
                ema.load_state_dict(best_state)
            for g in optimizer.param_groups:
                g["lr"] *= config.lr_drop_factor
            drops, patience = drops + 1, 0

    if state is not None:  # an early-stopped run resumed with more lr drops takes the next one now
        take_lr_drop_if_due()
    stopped = "early_stopping" if patience > config.patience else "max_epochs"
    try:
        for epoch in range(start, config.epochs if stopped == "max_epochs" else start):
            model.train()
            beta = _kl_weight(config, epoch)
            perm = torch.randperm(n, generator=gen)
            train_sum, dropped = 0.0, 0  # dropped: rows of skipped non-finite losses, not in train_loss
            step = config.batch_size * config.world_size
            for bi, i in enumerate(range(0, n, step)):
                rows = perm[i:i + step]
                if ctx is not None:
                    if not _dist.every_rank_has_rows(len(rows), ctx):
                        continue  # a last global batch too small to give every rank a row
                    rows = _dist.shard(rows, ctx)
                xb = dataset.batch(x_train[rows], device)
                if schedule.active:  # the schedule scales the base lr, which each lr drop lowers
                    for g in optimizer.param_groups:
                        g["lr"] = config.lr * config.lr_drop_factor ** drops * schedule.factor(steps_done)
                if config.kl_warmup_steps > 0:
                    beta = _aids.linear_warmup(steps_done, config.kl_warmup_steps)
                steps_done += 1
                loss = objective(xb, beta)
                loss, shown = loss if isinstance(loss, tuple) else (loss, loss)
                finite = bool(torch.isfinite(loss))
                if ctx is not None:  # every rank takes the same decision, or the others wait forever
                    finite = _dist.all_sum([0.0 if finite else 1.0], ctx)[0] == 0
                if not finite and not guard.skipping:  # with skipping on, the guard skips this update
                    value = f"{loss.item()}" if ctx is None else "non-finite on at least one rank"
                    raise TrainingDiverged(f"training stopped: the loss became {value} at epoch {epoch + 1}, "
                                           f"batch {bi + 1}; {where()}. Lower the learning rate, or train in fp32")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # also for a skipped one: DDP's all-reduce needs every rank
                if guard.active:
                    stepped = guard.step(optimizer, scaler, model.parameters(), finite)
                else:
                    scaler.step(optimizer)
                    stepped = True
                scaler.update()
                if guard.should_stop:
                    raise TrainingDiverged(f"training stopped: {guard.why()} at epoch {epoch + 1}, batch {bi + 1}; "
                                           f"{where()}. Raise --skip-threshold, lower --lr, or enable --grad-clip")
                if stepped and ema is not None:
                    ema.update(model)
                if finite:
                    train_sum += shown.item() * len(xb)
                else:
                    dropped += len(xb)
            if ctx is not None:
                train_sum, dropped = _dist.all_sum([train_sum, dropped], ctx)
                _dist.broadcast_buffers(model, ctx)  # validate rank 0's model, the one saved
                if ema is not None:
                    _dist.broadcast_buffers(ema.model, ctx)
            val = _validate(evaluated, x_val, config, ctx)
            if not math.isfinite(val["loss"]):
                raise TrainingDiverged(f"training stopped: the validation loss became {val['loss']} at epoch "
                                       f"{epoch + 1}; the last good checkpoint is kept")
            select = val["loss"]
            if config.val_iw > 0:
                select = val["iw"]
                if not math.isfinite(select):
                    raise TrainingDiverged(f"training stopped: the validation IW bound became {select} at epoch "
                                           f"{epoch + 1}; the last good checkpoint is kept")
            improved = select < best_val
            if improved:
                best_val, patience, best_epoch = select, 0, epoch + 1
                best_state = {k: v.detach().clone() for k, v in evaluated.state_dict().items()}
            else:
                patience += 1
            lr_now = optimizer.param_groups[0]["lr"]
            take_lr_drop_if_due()  # before the checkpoint, so that a resume sees it
            train_loss = train_sum / (n - dropped) if n > dropped else math.nan
            row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"],
                   "val_log_px": val["log_px"], "val_kl": val["kl"], "best_val": best_val,
                   "kl_weight": beta, "time": time.perf_counter() - t0}
            if config.lr_drops or schedule.active:
                row["lr"] = lr_now
            row.update(guard.epoch_row())
            if "iw" in val:
                row["val_iw"] = val["iw"]
            history.append(row)
            rng_per_rank = _dist.gather_rng(_rng_state(gen), ctx) if ctx is not None else None
            if paths:
                with open(paths["metrics"], "a") as f:
                    f.write(json.dumps(row) + "\n")
                checkpoint(epoch, improved, row["time"], rng_per_rank)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(val=f"{val['loss']:.2f}", best=f"{best_val:.2f}")
            if patience > config.patience:
                stopped = "early_stopping"
                break
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    model.load_state_dict(best_state)
    model.eval()
    return {"model": model, "config": config, "dataset": dataset, "history": history, "best_val": best_val,
            "best_epoch": best_epoch, "epochs": len(history), "stopped": stopped, "train_time_s": elapsed,
            "paths": paths}
