"""Training: the reference recipe by default, with checkpoints, resume and a metrics log.

Recipe: Adamax(lr=1e-3), batch 64 (only the training set is shuffled), up to 1000 epochs,
early stopping with patience 20 (stop once the validation loss has not improved for more
than 20 epochs), keep the best-validation model. Validation loss = sum over the set of the
per-example -ELBO / N, in eval() mode, one latent sample per image.

The settings are hvae_fast.config.TrainConfig (options beyond the recipe are all off by
default). Each concern of a run has one home:
  TrainConfig    (config.py)   the settings, their help text and their checks
  RunState                     what a run has done: epochs, steps, history, clock, RNG
                               streams, early stopping; saved and restored whole
  EarlyStopping                the best model, the patience count and the lr drops
  Trainer                      the epoch loop over one model, optimizer and objective
  RunWriter      (writer.py)   checkpoints, the metrics log, summary.json and the TensorBoard events
  StopSignals    (preempt.py)  SIGTERM/SIGINT/SIGUSR1: stop after the current step, resumably
  evaluate.py                  validation during training and the final test evaluation
train() trains and returns the best model; run() also evaluates it on the test set, draws
the pictures and writes summary.json: everything `hvae-fast train` does.
"""
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from . import aids as _aids
from . import data as _data
from . import distributed as _dist
from . import evaluate as _eval
from . import preempt as _preempt
from . import writer as _writer
from .config import (ARCHS, MODELS, RECIPES, RESUME_OVERRIDES, ResumeError, SettingError,  # noqa: F401
                     TrainConfig, resumed)
from .model import BottomUpVAE, ConvTopDownVAE, HierarchicalVAE, OneLevelVAE, TopDownVAE
from .optim import Adamax
from .preempt import EXIT_INTERRUPTED, StopSignals, TrainingInterrupted  # noqa: F401
from .writer import (CHECKPOINT_FORMAT, CheckpointError, RunExistsError,  # noqa: F401 (their old home)
                     load_checkpoint)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class _Stop(Exception):
    """train_epoch() stopped after a step on a signal; state.progress says where."""


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
                               latent_channels=c.latent_channels, groups=c.groups, backend=c.backend,
                               num_mixtures=c.mixtures)
        if c.channels_last:  # the convolutions' outputs follow their weights' format
            model = model.to(memory_format=torch.channels_last)
    elif c.model == "topdown":
        if c.conv and image_shape is None:
            raise ValueError("conv networks need image-shaped data ([N, H, W] arrays, or square D)")
        model = TopDownVAE.from_config(levels=c.levels, M=c.hidden, L=c.L, latent_dims=c.latent_dims,
                                       conv=c.conv, image_shape=image_shape, dropout=c.dropout, **common)
    elif c.model == "bottomup":
        model = BottomUpVAE.from_config(M=c.hidden, L=c.L, levels=c.levels, latent_dims=c.latent_dims, **common)
    elif c.model == "onelevel":
        model = OneLevelVAE.from_config(M=c.hidden, L=2 * c.L, **common)
    else:
        raise SettingError(f"model must be one of {MODELS}, got {c.model!r}")
    model.in_kernel_noise = c.in_kernel_noise
    return model


WEIGHTS = ("validated", "raw")


def checkpoint_weights(ck, weights="validated"):
    """(the state dict to load, what it is in words). 'validated': the model training
    validated and returned (an --ema run's moving average: last.pt holds it beside the raw
    weights, best.pt holds only it); 'raw': the optimizer's weights, in last.pt."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    ema_run, last = bool(ck["config"].get("ema")), "optimizer" in ck
    epoch = ck.get("epoch") if last else ck.get("best_epoch", ck.get("epoch"))
    where = f"{'last.pt' if last else 'best.pt'}, epoch {epoch}"
    if not ema_run:
        return ck["model"], f"the weights of {where}"
    if weights == "raw":
        if not last:
            raise CheckpointError("best.pt of an --ema run holds only the validated (EMA) weights; the raw ones "
                                  "are in last.pt")
        return ck["model"], f"the raw weights of {where} (not the EMA that training validated)"
    return (ck["ema"] if last else ck["model"]), f"the EMA weights of {where} (the model training validated)"


def model_from_checkpoint(path_or_ck, backend=None, weights="validated"):
    """(model in eval mode, TrainConfig) from a checkpoint file or a loaded checkpoint dict,
    with the weights training validated unless weights='raw' (checkpoint_weights)."""
    ck = load_checkpoint(path_or_ck) if not isinstance(path_or_ck, dict) else path_or_ck
    config = TrainConfig.from_dict(ck["config"])
    if backend is not None:
        config.backend = backend
    shape = tuple(config.image_shape) if config.image_shape else None
    model = build_model(config, ck["num_vals"], config.D, shape)
    model.load_state_dict(checkpoint_weights(ck, weights)[0])
    return model.eval(), config


# ---- the objective -------------------------------------------------------------------------

def iwae_loss(model, x, K):
    """The IWAE loss: mean over x of -(logsumexp_k log w_k - log K), K samples z ~ q per image.

    x is repeated K times (sample k of example e at row k*B + e) and goes through
    model.log_weight once; in train() mode BatchNorm sees the repeated batch, whose mean and
    (biased) variance are those of x. K = 1 gives -mean(log w), a single-sample -ELBO estimate
    (the same expectation as model(x), which uses the analytic KL).
    """
    return _iwae(model, x, K)[0]


def _iwae(model, x, K):
    """(the IWAE loss, the K x B log weights it came from)."""
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    b = len(x)
    lw = model.log_weight(x.repeat(K, 1)).view(K, b)
    return -(torch.logsumexp(lw, 0) - math.log(K)).mean(), lw


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Objective(nn.Module):
    """The training loss as a module, so that DistributedDataParallel can wrap it."""

    def __init__(self, model, config):
        super().__init__()
        self.model = model
        self.iw_train = config.iw_train
        self.autocast_dtype = PRECISIONS[config.precision]
        self.free_bits, self.kl_balance = config.free_bits, config.kl_balance
        # whether the loss minimised can differ from the -ELBO (then both are logged)
        self.differs = (config.iw_train > 1 or config.free_bits > 0 or config.kl_balance or config.kl_warmup > 0
                        or config.kl_warmup_steps > 0)

    def forward(self, xb, beta):
        """The loss to minimize; where it is not the -ELBO (KL warm-up, free bits, balancing,
        the IW bound), (that loss, the batch's -ELBO detached), so that the log reports the
        bound itself. Under the IW objective the -ELBO is the mean of -log w over its K samples."""
        if self.autocast_dtype is None:
            return self._loss(xb, beta)
        with torch.autocast(xb.device.type, dtype=self.autocast_dtype):
            out = self._loss(xb, beta)
            return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()

    def _loss(self, xb, beta):
        if self.iw_train > 1:
            loss, lw = _iwae(self.model, xb, self.iw_train)
            return loss, -lw.mean().detach()
        if self.free_bits > 0 or self.kl_balance:
            t = self.model.elbo_terms(xb)
            kl = _aids.kl_objective(t.kl, beta, self.free_bits, self.kl_balance)
            return kl - t.log_px.mean(), -t.elbo.mean().detach()
        if beta == 1.0:
            return self.model(xb)
        t = self.model.elbo_terms(xb)
        return -(t.log_px - beta * t.kl_total).mean(), -t.elbo.mean().detach()


# ---- the run state -------------------------------------------------------------------------

class EarlyStopping:
    """The best validation value and model, the epochs since it improved, and the lr drops
    taken: when `bad_epochs` exceeds the patience, either an lr drop is due (drops remain)
    or the run stops."""

    def __init__(self, patience, lr_drops=0):
        self.patience, self.lr_drops = patience, lr_drops
        self.best_val, self.best_epoch, self.best_state = math.inf, None, None
        self.bad_epochs, self.drops = 0, 0

    def update(self, value, epoch, model):
        """Records epoch's validation value; True when it improved (model's state kept)."""
        if value < self.best_val:
            self.best_val, self.best_epoch, self.bad_epochs = value, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    @property
    def drop_due(self):
        return self.bad_epochs > self.patience and self.drops < self.lr_drops

    @property
    def should_stop(self):
        return self.bad_epochs > self.patience and not self.drop_due

    def take_drop(self):
        self.drops, self.bad_epochs = self.drops + 1, 0

    def state_dict(self):
        return {"best_val": self.best_val, "best_epoch": self.best_epoch, "best_state": self.best_state,
                "bad_epochs": self.bad_epochs, "drops": self.drops}

    def load_state_dict(self, state):
        for k in ("best_val", "best_epoch", "best_state", "bad_epochs", "drops"):
            setattr(self, k, state[k])


@dataclass
class RunState:
    """What a run has done, saved in last.pt and restored whole on resume."""
    epoch: int = 0                    # epochs done
    step: int = 0                     # batches trained on (skipped updates included): the step schedules' clock
    history: List[dict] = field(default_factory=list)  # one row per epoch, as metrics.jsonl
    train_time_s: float = 0.0         # the clock, continued across resumes
    rng: Optional[dict] = None        # this process's noise and shuffling generators
    rng_per_rank: Optional[list] = None  # under torchrun: every rank's noise stream
    # a run stopped inside an epoch (a signal): where, else None. batch: the batches of epoch
    # `epoch` + 1 done; perm: that epoch's shuffled order; sums: each rank's [loss sum, rows]
    # so far (the epoch's train_loss); skips, norms: the update guard's counts of the epoch
    progress: Optional[dict] = None

    def state_dict(self, stopping):
        return {**dataclasses.asdict(self), "stopping": stopping.state_dict()}

    @classmethod
    def from_state_dict(cls, state, stopping):
        stopping.load_state_dict(state["stopping"])
        return cls(**{k: state[k] for k in ("epoch", "step", "history", "train_time_s", "rng", "rng_per_rank")},
                   progress=state.get("progress"))  # format 2 and older: at an epoch's end


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


# ---- the loop ------------------------------------------------------------------------------

def _kl_weight(config, epoch, step):
    if config.kl_warmup_steps > 0:
        return _aids.linear_warmup(step, config.kl_warmup_steps)
    return 1.0 if config.kl_warmup <= 0 else min(1.0, (epoch + 1) / config.kl_warmup)


class Trainer:
    """One run: the model, its optimizer and objective, the training aids, the run state and
    the writer. fit() runs the epoch loop to its end (max epochs or early stopping)."""

    def __init__(self, config, dataset, out=None, ctx=None, checkpoint=None):
        self.config, self.dataset, self.ctx, self.out = config, dataset, ctx, out
        self.is_main = ctx is None or ctx.is_main
        self.world = ctx.world if ctx is not None else 1
        rank = ctx.rank if ctx is not None else 0
        torch.manual_seed(config.seed + rank)  # each rank its own noise
        self.gen = torch.Generator().manual_seed(config.seed)  # the same shuffled order on every rank
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS first starts
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.model = model = build_model(config, dataset.num_vals, dataset.D, dataset.image_shape)
        self.device = ctx.device if ctx is not None else torch.device(config.device)
        self.objective = _Objective(model, config)
        self.objective_differs = self.objective.differs  # before DDP wraps it
        if ctx is not None:
            self.objective = _dist.wrap(self.objective, ctx)  # moves the model; SyncBatchNorm on CUDA
        else:
            model.to(self.device)
        self.optimizer = Adamax(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        # fp16 gradients underflow without loss scaling; bf16 has float32's range
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16" and
                                           next(model.parameters()).device.type == "cuda")
        self.guard = _aids.UpdateGuard(config.grad_clip, config.skip_threshold, config.max_consecutive_skips)
        self.ema = _aids.EMA(model, config.ema) if config.ema > 0 else None
        self.evaluated = self.ema.model if self.ema is not None else model  # validated, saved as best, returned
        self.batches = self._batches()
        self.schedule = _aids.LRSchedule(config.lr_schedule, config.lr_warmup_steps,
                                         config.epochs * len(self.batches), config.lr_min_factor)
        self.stopping = EarlyStopping(config.patience, config.lr_drops)
        self.state = RunState()
        self.writer = _writer.RunWriter(out if self.is_main else None,
                                        config.tensorboard_every if config.tensorboard else None, dataset.D)
        self.stop = StopSignals()  # fit() enters it (or shares train()'s or run()'s)
        self.test_signal = _preempt.test_hook(ctx.rank if ctx is not None else 0)
        if checkpoint is not None:
            self._restore(checkpoint)
        self.writer.begin(self.state.history)

    def _batches(self):
        """(start, stop) of every global batch in an epoch; under torchrun a last batch too
        small to give every rank a row is left out."""
        n, per = len(self.dataset.train), self.config.batch_size * self.world
        return [(i, min(i + per, n)) for i in range(0, n, per)
                if self.ctx is None or _dist.every_rank_has_rows(min(per, n - i), self.ctx)]

    def _restore(self, ck):
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        run = ck["run"]
        self.state = RunState.from_state_dict(run, self.stopping)
        if self.state.step is None:  # format 1 before the step schedules
            self.state.step = self.state.epoch * len(self.batches)
        if ck.get("update_guard"):
            self.guard.load_state_dict(ck["update_guard"])
        if self.ema is not None:
            self.ema.load_state_dict(ck["ema"])
        if self.scaler.is_enabled() and ck.get("grad_scaler"):
            self.scaler.load_state_dict(ck["grad_scaler"])
        rng, ranks = self.state.rng, self.state.rng_per_rank
        if ranks and self.ctx is not None and len(ranks) == self.ctx.world:
            rng = {**rng, **ranks[self.ctx.rank]}  # this rank's noise stream
        _set_rng_state(rng, self.gen)
        if self.stopping.drop_due:  # an early-stopped run resumed with more lr drops takes the next one now
            self._take_lr_drop()

    def _take_lr_drop(self):
        """A smaller step from the best model."""
        self.model.load_state_dict(self.stopping.best_state)
        if self.ema is not None:  # the average restarts where the weights do
            self.ema.load_state_dict(self.stopping.best_state)
        for g in self.optimizer.param_groups:
            g["lr"] *= self.config.lr_drop_factor
        self.stopping.take_drop()

    def _diverged(self, what, epoch, batch=None, advice="Lower the learning rate, or train in fp32"):
        where = f"epoch {epoch + 1}" + ("" if batch is None else f", batch {batch + 1}")
        saved = (f"the last good checkpoint is {os.path.join(self.out, 'last.pt')}" if self.out and self.state.history
                 else "no checkpoint was written")  # the same words on every rank
        return TrainingDiverged(f"training stopped: {what} at {where}; {saved}. {advice}")

    def train_epoch(self, epoch):
        """One pass over the shuffled training set: (mean -ELBO, mean loss minimised, KL weight).
        A stop asked for by a signal ends it after the current step: the position goes into
        state.progress and _Stop is raised (fit() writes last.pt)."""
        c, ctx, state = self.config, self.ctx, self.state
        self.model.train()
        rank = ctx.rank if ctx is not None else 0
        if state.progress is None:
            beta = _kl_weight(c, epoch, state.step)
            perm = torch.randperm(len(self.dataset.train), generator=self.gen)
            first, (total, minimised, counted) = 0, (0.0, 0.0, 0)  # skipped non-finite losses are not in the means
        else:  # a stopped epoch, resumed where it stopped
            p, state.progress = state.progress, None
            beta = _kl_weight(c, epoch, state.step - 1)  # its last step's
            perm, first, (total, minimised, counted) = p["perm"], p["batch"], p["sums"][rank]
            self.guard.epoch_skips, self.guard.norms = p["skips"], list(p["norms"])  # the same on every rank
        for bi in range(first, len(self.batches)):
            start, stop = self.batches[bi]
            rows = perm[start:stop]
            if ctx is not None:
                rows = _dist.shard(rows, ctx)
            xb = self.dataset.batch(self.dataset.train[rows], self.device)
            if self.schedule.active:  # the schedule scales the base lr, which each lr drop lowers
                for g in self.optimizer.param_groups:
                    g["lr"] = c.lr * c.lr_drop_factor ** self.stopping.drops * self.schedule.factor(state.step)
            beta = _kl_weight(c, epoch, state.step)
            state.step += 1
            if self.test_signal is not None:
                self.test_signal(state.step)
            self.guard.watch(self.model)  # a skipped update restores the buffers this forward moves
            loss = self.objective(xb, beta)
            loss, elbo = loss if isinstance(loss, tuple) else (loss, loss)
            finite = bool(torch.isfinite(loss))
            if ctx is not None:  # every rank takes the same decisions, or the others wait forever
                bad, stops = _dist.all_sum([0.0 if finite else 1.0, float(self.stop.requested)], ctx)
                finite, stop_now = bad == 0, stops > 0  # a signal to any rank stops all after this step
            if not finite and not self.guard.skipping:  # with skipping on, the guard skips this update
                value = f"{loss.item()}" if ctx is None else "non-finite on at least one rank"
                raise self._diverged(f"the loss became {value}", epoch, bi)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # also for a skipped one: DDP's all-reduce needs every rank
            if self.guard.active:
                stepped = self.guard.step(self.optimizer, self.scaler, self.model.parameters(), finite)
            else:
                self.scaler.step(self.optimizer)
                stepped = True
            self.scaler.update()
            if self.guard.should_stop:
                raise self._diverged(self.guard.why(), epoch, bi, "Raise --skip-threshold, lower --lr, or enable "
                                                                   "--grad-clip")
            if stepped and self.ema is not None:
                self.ema.update(self.model)
            if finite:
                total, minimised = total + elbo.item() * len(xb), minimised + loss.item() * len(xb)
                counted += len(xb)
            if ctx is None:
                stop_now = self.stop.requested
            if stop_now:
                sums = [total, minimised, counted]
                sums = _dist.gather(sums, ctx) if ctx is not None else [sums]
                state.progress = {"batch": bi + 1, "perm": perm, "sums": sums, "skips": self.guard.epoch_skips,
                                  "norms": list(self.guard.norms)}
                raise _Stop()
        if ctx is not None:
            total, minimised, counted = _dist.all_sum([total, minimised, counted], ctx)
            _dist.broadcast_buffers(self.model, ctx)  # validate rank 0's model, the one saved
            if self.ema is not None:
                _dist.broadcast_buffers(self.ema.model, ctx)
        return (total / counted if counted else math.nan), (minimised / counted if counted else math.nan), beta

    def validate(self, epoch):
        """The validation metrics of the evaluated model, and the value the run selects on."""
        c = self.config
        val = _eval.validate(self.evaluated, self.dataset.val, batch_size=c.batch_size,
                             memory=c.eval_memory_mb * 2**20, iw_samples=c.val_iw, ctx=self.ctx)
        select = val["iw"] if c.val_iw > 0 else val["loss"]
        for name, v in (("the validation loss", val["loss"]), ("the validation IW bound", val.get("iw", 0.0))):
            if not math.isfinite(v):
                raise self._diverged(f"{name} became {v}", epoch)
        return val, select

    def _checkpoints(self, improved):
        """(last.pt, best.pt or None) as dicts; every rank's RNG is gathered (a collective)."""
        s, c = self.state, self.config
        s.rng = _rng_state(self.gen)
        s.rng_per_rank = _dist.gather_rng(s.rng, self.ctx) if self.ctx is not None else None
        common = {"format": _writer.CHECKPOINT_FORMAT, "config": c.to_dict(), "num_vals": self.dataset.num_vals,
                  "model_class": type(self.model).__name__, "epoch": s.epoch,
                  "best_epoch": self.stopping.best_epoch, "best_val": self.stopping.best_val}
        best = {**common, "model": self.stopping.best_state} if improved or not self.writer.has_best() else None
        last = {**common, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "update_guard": self.guard.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "run": s.state_dict(self.stopping)}
        return last, best

    def _stop_agreed(self):
        """Whether a signal asked any rank to stop (a collective under torchrun)."""
        if self.ctx is None:
            return self.stop.requested
        return _dist.all_sum([float(self.stop.requested)], self.ctx)[0] > 0

    def _interrupted(self):
        """The TrainingInterrupted to raise once last.pt holds where the run stopped (the same
        words on every rank: the signal is the first rank's that caught one; a collective)."""
        s, p = self.state, self.state.progress
        caught = [self.stop.signum] if self.ctx is None else _dist.gather(self.stop.signum, self.ctx)
        name = _preempt.signal_name(next(n for n in caught if n is not None))
        where = f"after epoch {s.epoch}" if p is None else \
            f"at epoch {s.epoch + 1}, batch {p['batch']} of {len(self.batches)}"
        last = os.path.join(self.out, "last.pt") if self.out else None
        resume = f"hvae-fast train --resume {last}" if last else None
        info = {"signal": name, "during": "training", "epoch": s.epoch + (p is not None),
                "batch": p["batch"] if p else None, "batches": len(self.batches), "step": s.step,
                "last": last, "resume": resume}
        if last is None:
            told = "nothing was written (no output directory)"
        else:
            told = f"{last} holds the run up to there; resume with `{resume}`"
            if self.world > 1:
                told += f" under torchrun with {self.world} ranks"
        return TrainingInterrupted(f"training stopped by {name} {where} (step {s.step}); {told}", name, info)

    def fit(self):
        """Trains until the last epoch or early stopping; returns how it stopped. On SIGTERM,
        SIGINT or SIGUSR1 it finishes the current step, writes last.pt with the position in
        the epoch and raises TrainingInterrupted."""
        with StopSignals() as self.stop:
            return self._fit()

    def _fit(self):
        c, s = self.config, self.state
        bar = None
        if c.progress and self.is_main:
            from tqdm.auto import tqdm
            bar = tqdm(total=c.epochs, initial=s.epoch, desc=c.model, unit="epoch", leave=False)
        t0 = time.perf_counter() - s.train_time_s  # the clock continues across resumes
        try:
            while s.epoch < c.epochs and not self.stopping.should_stop:
                epoch = s.epoch
                try:
                    train_loss, minimised, beta = self.train_epoch(epoch)
                except _Stop:
                    s.train_time_s = time.perf_counter() - t0
                    self.writer.last(self._checkpoints(improved=False)[0])
                    raise self._interrupted() from None
                val, select = self.validate(epoch)
                improved = self.stopping.update(select, epoch + 1, self.evaluated)
                lr_now = self.optimizer.param_groups[0]["lr"]
                if self.stopping.drop_due:  # before the checkpoint, so that a resume sees it
                    self._take_lr_drop()
                row = {"epoch": epoch + 1, "train_loss": train_loss,
                       **({"train_objective": minimised} if self.objective_differs else {}), "val_loss": val["loss"],
                       "val_log_px": val["log_px"], "val_kl": val["kl"], "best_val": self.stopping.best_val,
                       "kl_weight": beta, "time": time.perf_counter() - t0}
                if c.lr_drops or self.schedule.active:
                    row["lr"] = lr_now
                row.update(self.guard.epoch_row())
                if "iw" in val:
                    row["val_iw"] = val["iw"]
                s.history.append(row)
                s.epoch, s.train_time_s = epoch + 1, row["time"]
                pictures = self._pictures(epoch + 1) if self.writer.pictures_due(epoch + 1) else None
                last, best = self._checkpoints(improved)
                self.writer.epoch(row, last, best, pictures)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(val=f"{val['loss']:.2f}", best=f"{self.stopping.best_val:.2f}")
                if self._stop_agreed():  # a signal during validation or the writes: last.pt is this epoch's
                    raise self._interrupted()
        finally:
            if bar is not None:
                bar.close()
            self.writer.close()
        s.train_time_s = time.perf_counter() - t0
        return "early_stopping" if self.stopping.should_stop else "max_epochs"

    @torch.no_grad()
    def _pictures(self, epoch):
        """TensorBoard's pictures of the evaluated model after `epoch`: 16 samples, and the first
        8 validation images above their reconstructions, as [H, W(, 3)] grids in [0, 1]. Their
        noise is seeded by the run's seed and the epoch; the training's RNG is left as it was."""
        from . import plots
        m, ds, c = self.evaluated, self.dataset, self.config
        was_training = m.training
        m.eval()
        try:
            with _eval.seeded(c.seed + epoch, self.device):
                samples = m.sample(16)
                x = ds.val[:8]
                rec = m.reconstruct(ds.batch(x, self.device, "val"))
        finally:
            m.train(was_training)
        shape = plots.run_image_shape(c)
        return {"samples": plots.tile(samples, shape, ds.num_vals, cols=8),
                "reconstructions": plots.tile(torch.cat([x.to(rec), rec]), shape, ds.num_vals, cols=len(x))}

    def best_model(self):
        """The model with the best validated weights, in eval mode, on the training device."""
        self.model.load_state_dict(self.stopping.best_state)
        return self.model.eval()


def _settings(config, resume, overrides, ctx, log):
    """(the run's checked settings, the checkpoint to continue or None)."""
    if resume is None:
        config = TrainConfig() if config is None else dataclasses.replace(config)
        return dataclasses.replace(config, **(overrides or {})).check(), None
    if config is not None:
        raise ValueError("train(resume=...) takes its settings from the checkpoint: pass the ones to change "
                     "as overrides={...}, not a config")
    ck = load_checkpoint(resume)
    if "optimizer" not in ck:
        raise CheckpointError(f"{resume}: holds no training state (use last.pt to resume, not best.pt)")
    config, changes = resumed(TrainConfig.from_dict(ck["config"]), overrides or {}, resume)
    world = ctx.world if ctx is not None else 1
    if config.world_size != world:
        raise ResumeError(f"{resume}: the run was saved with {config.world_size} rank(s) and resumes with {world}: "
                          f"its global batch and each rank's noise stream would change; resume with "
                          f"{config.world_size}")
    if changes and log is not None and (ctx is None or ctx.is_main):
        log(f"resuming {resume} with " + ", ".join(changes))
    return config.check(only=overrides or {}), ck  # the saved run's settings were checked when it started


def trainer(config=None, dataset=None, out=None, resume=None, log=print, ctx=None, overrides=None, overwrite=False):
    """A Trainer for a new run (config, with `overrides` on top) or a resumed one (resume: a
    last.pt; every setting then comes from it, only RESUME_OVERRIDES may be overridden)."""
    config, ck = _settings(config, resume, overrides, ctx, log)
    config.check_out(out)
    main = ctx is None or ctx.is_main
    stale = []
    if out is not None:  # on every rank, before any of them writes (DDP's set-up waits for all)
        stale = _writer.claim(out, resume, overwrite)
        if resume is not None and not _writer.same_folder(os.path.dirname(os.path.abspath(resume)), out) \
                and log is not None and main:
            log(f"resuming {resume} into {out}: the run continues there; {os.path.dirname(resume) or '.'} "
                f"is left as it is")
    if dataset is None:
        dataset = load_data(config)
    if ck is None:
        config.check_data(dataset)  # what the settings check could not know: the data's shape and size
    if stale and main:  # the run is checked: only now may --overwrite delete the old one
        _writer.clear(out, stale)
    config.D, config.image_channels = dataset.D, dataset.channels
    config.image_shape = list(dataset.image_shape) if dataset.image_shape else None
    config.world_size = ctx.world if ctx is not None else 1
    return Trainer(config, dataset, out=out, ctx=ctx, checkpoint=ck)


def train(config=None, dataset=None, out=None, resume=None, log=print, ctx=None, overrides=None, overwrite=False):
    """Trains a model; returns a dict: model (best, eval mode, on the training device), config,
    dataset, history, best_val, best_epoch, epochs, stopped, train_time_s, paths.

    out: directory for checkpoints and the metrics log (None: nothing is written). A folder
    that holds another run is refused (writer.RunExistsError) before anything is written,
    unless `overwrite`, which deletes that run's files; a resume may continue in its
    checkpoint's own folder.
    resume: a last.pt to continue from. Every setting then comes from the checkpoint; pass
    the ones to change as `overrides` (only RESUME_OVERRIDES may change; each change is
    logged), not a config.
    ctx: a hvae_fast.distributed.Context under torchrun: every rank trains its shard of
    each global batch (batch_size per rank) with its own noise; only rank 0 writes.
    In the main thread SIGTERM, SIGINT and SIGUSR1 stop training after the current step:
    last.pt then holds the position inside the epoch (resume= continues it) and
    TrainingInterrupted is raised (its .result: this dict without the model); the previous
    signal handlers are restored on return.
    """
    with StopSignals():
        t = trainer(config, dataset, out, resume, log, ctx, overrides, overwrite)
        s = t.state
        result = {"config": t.config, "dataset": t.dataset, "history": s.history, "paths": dict(t.writer.paths)}
        try:
            stopped = t.fit()
        except TrainingInterrupted as e:
            e.result = {**result, "best_val": t.stopping.best_val, "best_epoch": t.stopping.best_epoch,
                        "epochs": len(s.history), "stopped": "interrupted", "train_time_s": s.train_time_s}
            raise
    return {"model": t.best_model(), **result, "best_val": t.stopping.best_val, "best_epoch": t.stopping.best_epoch,
            "epochs": len(s.history), "stopped": stopped, "train_time_s": s.train_time_s}


def run(config=None, dataset=None, out=None, resume=None, log=print, ctx=None, overrides=None, pictures=True,
        overwrite=False):
    """train(), then what `hvae-fast train` does after it: summary.json (written after
    training and after each stage, so that a crash never loses what was measured), the
    pictures (before the long evaluation), and the test evaluation (-ELBO, KL, active
    units, then the IW-NLL). Returns the summary; None on ranks other than 0.

    A signal (SIGTERM, SIGINT, SIGUSR1) stops it as train() says; summary.json then says
    "stopped": "interrupted" with an "interrupted" entry (the signal, where, how to resume)
    and TrainingInterrupted is raised. After training, a signal stops the pictures or the
    test evaluation at once (summary.json keeps what was measured and says "interrupted";
    a resume runs them again)."""
    with StopSignals() as stop:
        try:
            res = train(config, dataset, out, resume, log, ctx, overrides, overwrite)
        except TrainingInterrupted as e:
            if ctx is None or ctx.is_main:
                _writer.RunWriter(out).summary({**_summary(e.result), "interrupted": e.info})
            _dist.barrier(ctx)  # every rank stopped at the same step: none exits before rank 0 wrote
            raise
        if ctx is not None and not ctx.is_main:
            return None  # rank 0 evaluates and writes
        model, ds, c = res["model"], res["dataset"], res["config"]
        writer = _writer.RunWriter(out)
        summary = _summary(res, model)
        writer.summary(summary)
        stop.immediate = True  # nothing left to save: a signal from here on stops at once
        try:
            if stop.requested:
                stop.raise_now("the test evaluation")
            if pictures and out is not None:  # cheap, and kept if the long evaluation fails
                from . import plots
                pngs = plots.save_run_pictures(model, ds, res["history"], c, out)
                summary["files"].update({k: os.path.abspath(v) for k, v in pngs.items()})
                writer.summary(summary)
            t = time.perf_counter()
            for test in _eval.evaluate_steps(model, ds.test, iw_samples=c.iw_samples, seed=c.seed,
                                             memory=c.eval_memory_mb * 2**20, iw_subset=c.iw_subset):
                summary["test"] = dict(test)
                summary["eval_time_s"] = time.perf_counter() - t
                writer.summary(summary)
        except TrainingInterrupted as e:
            writer.summary({**summary, "interrupted": e.info})
            raise
    summary["complete"] = True
    writer.summary(summary)
    return summary


def _summary(res, model=None):
    """summary.json's entries about training (not yet complete)."""
    return {"config": res["config"].to_dict(), "epochs": res["epochs"], "stopped": res["stopped"],
            "best_val": res["best_val"], "best_epoch": res["best_epoch"], "train_time_s": res["train_time_s"],
            **({"parameters": sum(p.numel() for p in model.parameters())} if model is not None else {}),
            "complete": False,  # the files there: no best.pt yet where no epoch has ended in this folder
            "files": {k: os.path.abspath(v) for k, v in res["paths"].items() if os.path.exists(v)}}
