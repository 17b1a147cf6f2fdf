"""Training aids from VDVAE, NVAE and Efficient-VDVAE, each off by default (the recipe).

  UpdateGuard     gradient-norm clipping and VDVAE's update skipping
  EMA             an exponential moving average of the weights (validated, saved, returned)
  linear_warmup   a 0 -> 1 ramp counted in steps (KL weight, learning rate)
  kl_objective    the KL part of the training loss with free bits and NVAE's KL balancing
  LRSchedule      linear warm-up, then constant or cosine decay of the learning rate

train.py calls these; each is usable (and tested) on its own.
"""
import copy
import math

import torch


def grad_norm(params):
    """The total L2 norm of the gradients (a 0-d tensor; 0 when there are none)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


class UpdateGuard:
    """Clips the gradient norm to `clip` and skips updates whose norm is non-finite or above
    `threshold` (VDVAE: a rare huge gradient would otherwise throw the weights far away).

    0/None turns either off. A skipped update leaves the weights and the optimizer state as
    they were, and the buffers too when watch(model) ran before the forward. `max_consecutive`
    skips in a row mean the run cannot recover by itself: `should_stop` tells the loop to end it."""

    def __init__(self, clip=None, threshold=None, max_consecutive=100):
        self.clip = clip or 0.0
        self.threshold = threshold or 0.0
        self.max_consecutive = max_consecutive
        self.total = self.consecutive = self.epoch_skips = 0
        self.norms = []  # this epoch's finite norms, for the metrics row
        self.last_norm, self.cause = None, None
        self.kept = None  # (buffer, its copy) from watch()

    @property
    def skipping(self):
        return self.threshold > 0

    @property
    def active(self):
        return self.skipping or self.clip > 0

    def watch(self, model):
        """Before the forward: keeps a copy of the model's buffers, which a skip puts back,
        since the forward of a bad batch has already written into BatchNorm's running
        statistics (NaN, for a non-finite one)."""
        self.kept = [(b, b.detach().clone()) for b in model.buffers()] if self.skipping else None

    def step(self, optimizer, scaler, params, loss_finite=True):
        """After backward: measure, maybe clip, then step or skip; True when it stepped.

        Under DDP the gradients are already all-reduced, so every rank measures the same
        norm and takes the same decision. The caller still calls scaler.update()."""
        params = list(params)
        scaler.unscale_(optimizer)  # the norm of the true gradients, not of the scaled ones
        norm = (torch.nn.utils.clip_grad_norm_(params, self.clip) if self.clip > 0 else grad_norm(params)).item()
        self.last_norm = norm
        if math.isfinite(norm):
            self.norms.append(norm)
        if self.skipping and not (loss_finite and math.isfinite(norm) and norm <= self.threshold):
            self.cause = ("the loss was non-finite" if not loss_finite else
                          "the gradient norm was non-finite" if not math.isfinite(norm) else
                          f"gradient norm {norm:.4g} > --skip-threshold {self.threshold:g}")
            self.total, self.consecutive, self.epoch_skips = self.total + 1, self.consecutive + 1, self.epoch_skips + 1
            with torch.no_grad():
                for b, saved in self.kept or ():
                    b.copy_(saved)
            return False
        self.consecutive = 0
        scaler.step(optimizer)
        return True

    @property
    def should_stop(self):
        return self.skipping and self.consecutive >= self.max_consecutive

    def why(self):
        return f"{self.consecutive} updates in a row were skipped (the last: {self.cause})"

    def epoch_row(self):
        """The metrics of the epoch just ended; resets the per-epoch counters."""
        row = {}
        if self.skipping:
            row.update(skipped=self.epoch_skips, skipped_total=self.total)
        if self.active:
            row["grad_norm"] = sum(self.norms) / len(self.norms) if self.norms else None
        self.epoch_skips, self.norms = 0, []
        return row

    def state_dict(self):
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state):
        self.total, self.consecutive = state["total"], state["consecutive"]


class EMA:
    """ema = decay * ema + (1 - decay) * w for the floating parameters after every update;
    buffers (BatchNorm's running statistics) are copied, since averaging them would not
    describe the averaged weights any better than the latest ones do."""

    def __init__(self, model, decay):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        pairs = [(e, p) for e, p in zip(self.model.parameters(), model.parameters())]
        avg = [(e, p) for e, p in pairs if e.is_floating_point()]
        if avg:
            ema, w = zip(*avg)
            torch._foreach_mul_(ema, self.decay)
            torch._foreach_add_(ema, w, alpha=1.0 - self.decay)
        for e, p in pairs:
            if not e.is_floating_point():
                e.copy_(p)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


def linear_warmup(step, steps):
    """(step + 1) / steps, at most 1: the first step already moves (1/steps), `steps` reach 1."""
    return 1.0 if steps <= 0 else min(1.0, (step + 1) / steps)


def free_bits(kls, floor):
    """max(KL_g, floor) of each group's batch-mean KL: below its floor a group's KL has no
    gradient, so the optimizer stops pressing it to zero (Kingma et al. 2016)."""
    return [torch.clamp(k, min=floor) for k in kls] if floor > 0 else list(kls)


def kl_balance_coefficients(kls):
    """NVAE's kl_balancer: one coefficient per group, proportional to the group's batch-mean
    |KL| (+ 0.01, so that a collapsed group keeps some weight), scaled to average 1; detached.
    Groups with much KL are pushed harder, so that none collapses while the KL weight is small."""
    c = torch.stack([k.detach().abs() for k in kls]) + 0.01
    return c / c.mean()


def kl_objective(kl, beta, floor=0.0, balance=False):
    """The KL part of the training loss: beta * sum_g coeff_g * max(mean_b KL_g, floor).

    kl: one per-example [B] tensor per group. Balancing applies only while beta < 1 (NVAE)."""
    kls = [k.mean() for k in kl]
    terms = free_bits(kls, floor)
    if balance and beta < 1.0:
        terms = [c * t for c, t in zip(kl_balance_coefficients(kls), terms)]
    return beta * sum(terms)


class LRSchedule:
    """The learning-rate factor at a step: linear warm-up over `warmup` steps, then 1
    ('constant') or a cosine from 1 to `min_factor` at `total` steps ('cosine')."""

    KINDS = ("constant", "cosine")

    def __init__(self, kind="constant", warmup=0, total=0, min_factor=0.0):
        if kind not in self.KINDS:
            raise ValueError(f"lr_schedule must be one of {self.KINDS}, got {kind!r}")
        self.kind, self.warmup, self.total, self.min_factor = kind, warmup, total, min_factor

    @property
    def active(self):
        return self.warmup > 0 or self.kind != "constant"

    def factor(self, step):
        if step < self.warmup:
            return linear_warmup(step, self.warmup)
        if self.kind == "constant":
            return 1.0
        t = min(1.0, (step - self.warmup) / max(1, self.total - 1 - self.warmup))
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
