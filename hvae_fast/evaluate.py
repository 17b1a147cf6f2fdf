"""Evaluation: test -ELBO (the recipe's number), importance-weighted NLL, bpd, KL and active units.

All in eval() mode (BatchNorm running statistics) and without gradients.

- test -ELBO: sum over the set of the per-example -ELBO / N, one latent sample per image,
  exactly as the recipe reports it (its "nll").
- IW-NLL: -log (1/K) sum_k w_k, log w = log p(x|z1) + sum_i log p(z_i|z_{i+1}) + log p(z_top)
  - sum_i log q(z_i|...), full Gaussian log-densities (model.log_weight), K samples per image.
- memory: every pass goes through the networks in chunks of rows (at most the batch size
  asked) that fit a budget in bytes (`memory`, default DEFAULT_MEMORY), from what one row
  costs this model (row_bytes: the outputs of all its layers, twice), whatever D, K or the
  networks.
- bits per dimension: nats / (D ln 2), D the values of one example (C * H * W for images).
- active units per level: a dimension is active when its KL(q || p), averaged over the data,
  exceeds 0.01 nats, as NVAE counts them. A collapsed level has q = p and KL 0 whatever x.
- active_units_cov: the covariance count of Burda et al. (2015), a dimension whose posterior
  mean varies over the data (variance > 0.01). For a lower level of a top-down model that
  mean is mu_p(z_{i+1}) + delta_mu, which varies with x even when q = p: a collapsed level
  still counts there, so it is reported beside the KL count, not instead of it.
"""
import contextlib
import functools
import math

import torch


def _on(model, x):
    """x on the model's device (evaluation runs where the model is), as floating point
    (datasets are stored as uint8)."""
    p = next(model.parameters(), None)
    if p is not None:
        x = x.to(p.device)
    return x if x.is_floating_point() else x.to(torch.float32 if p is None else p.dtype)


def _in_eval_mode(fn):
    """Runs fn(model, ...) in eval() mode without gradients, then restores the model's mode."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        was_training = model.training
        try:
            with torch.no_grad():
                return fn(model.eval(), *args, **kwargs)
        finally:
            model.train(was_training)
    return wrapper


DEFAULT_MEMORY = 512 * 2**20


@_in_eval_mode
def row_bytes(model, x):
    """An upper bound on the bytes one row of x takes through model.log_weight: the outputs
    of every layer, measured on one row, doubled for the likelihood's temporaries. A model
    may say it itself with a row_bytes(x) method."""
    if callable(getattr(model, "row_bytes", None)):
        return model.row_bytes(x)
    total = [x[:1].nbytes]

    def count(module, inputs, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                total[0] += t.nbytes

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with seeded(0, _on(model, x[:0]).device):  # the probe draws none of the caller's noise
            model.log_weight(_on(model, x[:1]))
    finally:
        for h in hooks:
            h.remove()
    return 2 * total[0]


def chunk_rows(model, x, memory=None, most=None):
    """Rows per pass through the networks within `memory` bytes: at least 1, at most `most`."""
    rows = max(1, int((DEFAULT_MEMORY if memory is None else memory) // row_bytes(model, x)))
    return rows if most is None else min(rows, most)


@contextlib.contextmanager
def seeded(seed, device):
    """torch's RNG seeded with `seed` inside, and as it was before outside."""
    devices = [] if device.type != "cuda" else [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@_in_eval_mode
def elbo(model, x, batch_size=None, memory=None):
    """{'neg_elbo', 'log_px', 'kl': [per level]} in nats per example, one sample per image.
    batch_size: at most this many rows at once (default 256), fewer if the memory budget says so."""
    batch_size = chunk_rows(model, x, memory, batch_size or 256)
    neg, re, kls = 0.0, 0.0, None
    for i in range(0, len(x), batch_size):
        t = model.elbo_terms(_on(model, x[i:i + batch_size]))
        neg += -t.elbo.sum().item()
        re += t.log_px.sum().item()
        k = [v.sum().item() for v in t.kl]
        kls = k if kls is None else [a + b for a, b in zip(kls, k)]
    n = len(x)
    return {"neg_elbo": neg / n, "log_px": re / n, "kl": [k / n for k in kls]}


@_in_eval_mode
def iw_log_likelihood(model, x, samples=1000, max_rows=None, memory=None):
    """Per-example importance-weighted estimate of log p(x) with `samples` samples: [N].
    At most `max_rows` rows (sample-example pairs, default 32768) go through the networks
    at once, fewer if the memory budget says so."""
    max_rows = chunk_rows(model, x, memory, max_rows or 32768)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    out = []
    per_example = max(1, max_rows // samples)  # examples per chunk when all K fit at once
    k_chunk = min(samples, max_rows)
    for i in range(0, len(x), per_example):
        xb = _on(model, x[i:i + per_example])
        b = len(xb)
        lws = []
        for k0 in range(0, samples, k_chunk):
            k = min(k_chunk, samples - k0)
            rows = xb.repeat(k, 1)  # [k*b, D]: sample j of example e at row j*b + e
            lws.append(model.log_weight(rows).view(k, b))
        lw = torch.cat(lws, 0)
        out.append((torch.logsumexp(lw.double(), 0) - math.log(samples)).cpu())
    return torch.cat(out).float()


def bits_per_dim(nats, D):
    return nats / (D * math.log(2))


@_in_eval_mode
def active_units(model, x, threshold=0.01, batch_size=None, memory=None):
    """Per level (z1 first): the number of dimensions whose KL averaged over x exceeds `threshold` nats."""
    batch_size = chunk_rows(model, x, memory, batch_size or 256)
    sums = None
    for i in range(0, len(x), batch_size):
        kl = [k.double().sum(0) for k in model.kl_per_dim(_on(model, x[i:i + batch_size]))]
        sums = kl if sums is None else [a + b for a, b in zip(sums, kl)]
    return [int((s / len(x) > threshold).sum()) for s in sums]


@_in_eval_mode
def active_units_cov(model, x, threshold=0.01, batch_size=None, memory=None):
    """Per level (z1 first): the number of dimensions whose posterior mean varies (var > threshold)."""
    batch_size = chunk_rows(model, x, memory, batch_size or 256)
    means = None
    for i in range(0, len(x), batch_size):
        m = model.posterior_means(_on(model, x[i:i + batch_size]))
        means = [[t] for t in m] if means is None else [a + [t] for a, t in zip(means, m)]
    return [int((torch.cat(m).var(0, unbiased=True) > threshold).sum()) for m in means]


def validate(model, x, batch_size=None, memory=None, iw_samples=0, ctx=None):
    """What training validates on: {'loss' (the -ELBO), 'log_px', 'kl': [per level]} in nats
    per example, and 'iw' (the IW bound's NLL with iw_samples samples) when iw_samples > 0.
    Under torchrun (ctx) each rank takes a shard of x and the sums are reduced."""
    if ctx is not None:
        from . import distributed as _dist
        x = _dist.shard(x, ctx)
    n = len(x)
    sums = [0.0, 0.0] + [0.0] * len(model.latent_dims)
    if n:
        e = elbo(model, x, batch_size, memory)
        sums = [e["neg_elbo"] * n, e["log_px"] * n] + [k * n for k in e["kl"]]
    if iw_samples > 0:
        sums.append(-iw_log_likelihood(model, x, iw_samples, memory=memory).double().sum().item() if n else 0.0)
    sums.append(float(n))
    if ctx is not None:  # one reduction: the sums and the number of examples
        sums = _dist.all_sum(sums, ctx)
    sums = [v / sums[-1] for v in sums[:-1]]
    out = {"loss": sums[0], "log_px": sums[1], "kl": sums[2:2 + len(model.latent_dims)]}
    if iw_samples > 0:
        out["iw"] = sums[-1]
    return out


def evaluate_steps(model, x, iw_samples=1000, seed=0, memory=None, iw_subset=None):
    """The report for one set x as it grows: yielded after the -ELBO and active units, then
    again with the IW-NLL (the long part), so that a caller can write what it has.
    iw_subset: the IW-NLL on this many examples drawn at random (seeded) instead of all of x;
    its standard error over the examples is reported either way. x: [N, D] rows, or [N, ...]
    examples (e.g. [N, C, H, W] images), which are taken as rows: bits per dimension divide
    by each example's element count."""
    x = x.reshape(len(x), -1)
    D = x.shape[1]
    with seeded(seed, _on(model, x[:0]).device):
        e = elbo(model, x, memory=memory)
        res = {"n": len(x), "neg_elbo": e["neg_elbo"], "log_px": e["log_px"], "kl": e["kl"],
               "bpd_elbo": bits_per_dim(e["neg_elbo"], D), "active_units": active_units(model, x, memory=memory),
               "active_units_cov": active_units_cov(model, x, memory=memory),
               "latent_dims": list(model.latent_dims)}
        yield res
        if iw_samples:
            idx = torch.arange(len(x))
            if iw_subset is not None and iw_subset < len(x):
                idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:iw_subset]
            ll = iw_log_likelihood(model, x[idx], iw_samples, memory=memory).double()
            nll, se = -ll.mean().item(), _standard_error(ll)
            res.update(iw_nll=nll, iw_nll_se=se, iw_n=len(idx), iw_samples=iw_samples, bpd=bits_per_dim(nll, D),
                       bpd_se=bits_per_dim(se, D), D=D, iw_indices=idx.tolist(), iw_log_px=ll.tolist())
            yield res


def _standard_error(v):
    """The standard error of the mean of the 1-d tensor v (nan for fewer than two values)."""
    return v.std().item() / math.sqrt(len(v)) if len(v) > 1 else float("nan")


def paired_difference(a, b):
    """The IW-NLL of report `a` minus that of report `b` (evaluate()'s dicts, or a run's
    summary["test"]) on the same examples, with the standard error of the per-example
    differences: paired, so it is far smaller than either report's own when the two models
    find the same images hard. {"n", "diff", "se", "diff_bpd", "se_bpd"}, nats and bits/dim."""
    for name, r in (("a", a), ("b", b)):
        if "iw_log_px" not in r:
            raise ValueError(f"report {name} holds no per-example IW log-likelihoods (iw_log_px): it was written "
                             f"before they were kept, or with iw_samples 0")
    if a["iw_indices"] != b["iw_indices"] or a["n"] != b["n"] or a["D"] != b["D"]:
        raise ValueError(f"the reports scored different examples (a: {a['iw_n']} of {a['n']}, D = {a['D']}; "
                         f"b: {b['iw_n']} of {b['n']}, D = {b['D']}); evaluate both with the same split, "
                         f"iw_subset and seed")
    d = torch.tensor(b["iw_log_px"], dtype=torch.float64) - torch.tensor(a["iw_log_px"], dtype=torch.float64)
    se = _standard_error(d)
    return {"n": len(d), "diff": d.mean().item(), "se": se, "diff_bpd": bits_per_dim(d.mean().item(), a["D"]),
            "se_bpd": bits_per_dim(se, a["D"])}


def evaluate(model, x, iw_samples=1000, seed=0, memory=None, iw_subset=None):
    """The whole report for one set x: a JSON-ready dict. Its noise comes from `seed`; the
    caller's RNG state and the model's train/eval mode are left as they were; `memory`
    bytes bound each pass (module doc)."""
    for res in evaluate_steps(model, x, iw_samples, seed, memory, iw_subset):
        pass
    return res
