"""The `hvae-fast` command: train, eval, sample, compare.

  hvae-fast train                 the reference recipe on digits, into ./hvae-run
  hvae-fast eval RUN/best.pt      test -ELBO, IW-NLL, bpd, KL per level, active units
  hvae-fast sample RUN/best.pt    a PNG grid of new images
  hvae-fast compare               top-down vs bottom-up vs one-level, at one or more depths
"""
import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

from . import data as _data
from . import distributed as _dist
from . import evaluate as _eval
from . import train as _train

MODEL_CHOICES = ("topdown", "hierarchical", "bottomup", "onelevel")


def _number(kind, ok, what):
    """An argparse type: kind(s), accepted when ok(value); `what` names it in errors."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: v > 0, "a positive number")
_nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")


def _add_common(p):
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch.set_num_threads (default: torch's default; 1 is fastest for the recipe's "
                        "small networks on a busy machine)")


def _add_eval_memory(p):
    p.add_argument("--eval-memory", type=_positive_int, default=512, metavar="MB",
                   help="memory budget of each evaluation pass in MiB: sets how many rows go through the "
                        "networks at once, from what one row costs the model (default 512)")


def _add_device(p):
    p.add_argument("--device", default="cpu", help="where to run: cpu (default), cuda or cuda:N")


def _device(parser, name):
    """torch.device(name), or a parser error that says why not."""
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name!r}: not a device (cpu, cuda, cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: this torch sees no CUDA device")
    return device


def _add_data_args(p):
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="fashion-mnist (Debian's dataset-fashion-mnist package), a folder of MNIST-format IDX "
                        "files (train-images-idx3-ubyte[.gz], t10k-images-idx3-ubyte[.gz]), or a .npy, .npz or "
                        "IDX file; default: sklearn digits, the recipe's split")
    p.add_argument("--val-size", type=_positive_int, default=_data.DEFAULT_VAL_SIZE, metavar="N",
                   help="IDX folders and fashion-mnist: validate on the last N training images "
                        f"(default {_data.DEFAULT_VAL_SIZE}); the test split is the official one")
    p.add_argument("--shuffle-seed", type=int, default=None, metavar="SEED",
                   help="a single-array file: shuffle with SEED before the 60/20/20 split (default: in order)")
    p.add_argument("--likelihood", choices=("categorical", "bernoulli"), default="categorical")
    p.add_argument("--binarize", choices=_data.BINARIZE, default="threshold",
                   help="--likelihood bernoulli: threshold (x > --threshold, default) or dynamic (every training "
                        "batch drawn again as x ~ Bernoulli(x / max); val and test drawn once, seeded)")
    p.add_argument("--threshold", type=float, default=None,
                   help="binarize x > THRESHOLD for --likelihood bernoulli (default: middle of the range)")
    p.add_argument("--num-vals", type=_positive_int, default=None,
                   help="values per pixel of --data (default: 256 for uint8, else max + 1)")


_unit_float = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
_fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def _add_aids_args(p):
    """VDVAE / NVAE / Efficient-VDVAE training aids (hvae_fast.aids); every default is the recipe's."""
    g = p.add_argument_group("training aids (all off by default: the recipe)")
    g.add_argument("--grad-clip", type=_nonneg_float, default=None, metavar="NORM",
                   help="clip the total gradient norm to NORM (default: no clipping, the recipe)")
    g.add_argument("--skip-threshold", type=_nonneg_float, default=None, metavar="NORM",
                   help="skip updates whose gradient norm is above NORM or non-finite, as VDVAE (default: never "
                        "skip, the recipe; a non-finite loss then stops the run)")
    g.add_argument("--max-consecutive-skips", type=_positive_int, default=100, metavar="N",
                   help="with --skip-threshold: stop after N skipped updates in a row (default 100)")
    g.add_argument("--ema", type=_unit_float, default=0.0, metavar="DECAY",
                   help="keep an exponential moving average of the weights with this decay (e.g. 0.999) and "
                        "validate, save and return it (default 0: none, the recipe)")
    g.add_argument("--kl-warmup-steps", type=_nonneg_int, default=0, metavar="STEPS",
                   help="linear KL warm-up over STEPS training steps, instead of --kl-warmup's epochs "
                        "(default 0: none, the recipe)")
    g.add_argument("--free-bits", type=_nonneg_float, default=0.0, metavar="NATS",
                   help="free bits: each latent level's KL term in the training loss is at least NATS "
                        "(default 0: none, the recipe; the logged losses stay the -ELBO)")
    g.add_argument("--kl-balance", action="store_true",
                   help="NVAE's KL balancing of the levels while the KL weight is below 1 (default: off, the recipe)")
    g.add_argument("--lr-warmup-steps", type=_nonneg_int, default=0, metavar="STEPS",
                   help="linear learning-rate warm-up over STEPS steps (default 0: none, the recipe)")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="cosine: decay the learning rate to lr * --lr-min-factor over --epochs (default constant, "
                        "the recipe)")
    g.add_argument("--lr-min-factor", type=_fraction, default=0.0, metavar="F",
                   help="--lr-schedule cosine: the final learning rate as a fraction of --lr (default 0)")


def _add_training_args(p, single=True):
    if single:
        p.add_argument("--model", choices=MODEL_CHOICES, default="topdown",
                       help="topdown: n-level top-down VAE (2 levels = the recipe); hierarchical: the seed's "
                            "class; bottomup: q(z1|x)q(z2|z1)...q(zn|z_{n-1}); onelevel: one-level VAE (default: topdown)")
        p.add_argument("--arch", choices=_train.ARCHS, default="mlp",
                       help="topdown: mlp (the seed's networks, default) or resnet (a convolutional hierarchy for "
                            "images: residual cells, latent groups at 1/2, 1/4, 1/8 of the image size, a fused "
                            "per-pixel 256-way head)")
        p.add_argument("--conv-channels", type=_positive_int, default=32, metavar="C",
                       help="--arch resnet: channels of every cell (default 32; scale up on a GPU)")
        p.add_argument("--latent-channels", type=_positive_int, default=8, metavar="C",
                       help="--arch resnet: channels of every latent group (default 8)")
        p.add_argument("--groups", type=_nonneg_int, nargs="+", default=[1, 2, 2], metavar="N",
                       help="--arch resnet: latent groups per scale, finest first (default 1 2 2: one at 14x14, "
                            "two at 7x7, two at 4x4 for 28x28 images)")
        p.add_argument("--levels", type=_positive_int, default=2,
                       help="levels of the topdown (>= 1) or bottomup (>= 2) model (default 2)")
        p.add_argument("--latent-dims", type=_positive_int, nargs="+", default=None, metavar="N",
                       help="topdown, bottomup: size of each level, z1 first (default 16 ... 16 8)")
        p.add_argument("--conv", action="store_true", help="topdown: conv encoder/decoder (image-shaped data)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--resume", default=None, metavar="CKPT", help="continue from OUT/last.pt")
    _add_data_args(p)
    p.add_argument("--hidden", type=_positive_int, default=256, help="hidden units M (default 256)")
    p.add_argument("--L", type=_positive_int, default=8, help="top latent size; z1 = 2L (default 8)")
    p.add_argument("--epochs", type=_positive_int, default=1000, help="maximum epochs (default 1000)")
    p.add_argument("--patience", type=_nonneg_int, default=20, help="early-stopping patience (default 20)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adamax learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--kl-warmup", type=_nonneg_int, default=0, help="epochs of linear KL warm-up (default 0)")
    p.add_argument("--iw-train", type=_positive_int, default=1, metavar="K",
                   help="train on the importance-weighted (IWAE) bound with K samples per image "
                        "(default 1: the -ELBO, the recipe)")
    p.add_argument("--val-iw", type=_nonneg_int, default=0, metavar="K",
                   help="select the best model and early-stop on the validation IW bound with K samples "
                        "(default 0: on the validation -ELBO, the recipe)")
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.0, help="Adamax weight decay (default 0)")
    p.add_argument("--dropout", type=_nonneg_float, default=0.0, metavar="P",
                   help="topdown MLPs: Dropout(P) after every BatchNorm (default 0: none, the recipe)")
    p.add_argument("--lr-drops", type=_nonneg_int, default=0, metavar="N",
                   help="when the patience runs out, reload the best model and multiply the learning rate by "
                        "--lr-drop-factor, N times before stopping (default 0: stop, the recipe)")
    p.add_argument("--lr-drop-factor", type=_positive_float, default=0.1, help="(default 0.1)")
    _add_aids_args(p)
    p.add_argument("--max-train", type=_positive_int, default=None, help="use only the first N training examples")
    p.add_argument("--backend", choices=("fused", "torch"), default="fused")
    p.add_argument("--in-kernel-noise", action="store_true",
                   help="draw each level's noise inside the posterior_sample kernel (counter-based Philox, "
                        "drawn again in the backward) instead of torch.randn_like")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N; under torchrun each rank "
                   "uses its own (cuda:LOCAL_RANK when GPUs are present)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="training under torch.autocast in this dtype (the fused ops run in float32); "
                        "fp16 on CUDA uses a gradient scaler")
    p.add_argument("--iw-samples", type=_nonneg_int, default=1000,
                   help="importance samples for the test NLL (0: skip; default 1000)")
    p.add_argument("--iw-subset", type=_positive_int, default=None, metavar="N",
                   help="the test NLL on N test images drawn at random (seeded), with its standard error "
                        "(default: all of them)")
    _add_eval_memory(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only (cuDNN included): a resumed GPU run then repeats the "
                        "uninterrupted one bit for bit; slower on GPUs (CPU runs are deterministic anyway)")
    _add_common(p)


def typed_options(parser, argv):
    """The destinations of the options written on the command line (not their defaults)."""
    out = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if any(a == opt or a.startswith(opt + "=") for a in argv):
                out.add(action.dest)
    return out


# argparse destinations whose TrainConfig field has another name
FIELD_OF_DEST = {"no_progress": "progress", "eval_memory": "eval_memory_mb"}


def with_recipe(config, name, typed):
    """(config with the named recipe's settings where no option was typed, the settings taken)."""
    typed = {FIELD_OF_DEST.get(d, d) for d in typed}
    taken = {k: v for k, v in _train.RECIPES[name].items() if k not in typed and getattr(config, k) != v}
    return dataclasses.replace(config, **taken), taken


def resume_overrides(args, typed):
    """The settings typed on the command line, as TrainConfig fields, for a resumed run."""
    config = _config(args).to_dict()
    fields = {FIELD_OF_DEST.get(d, d) for d in typed if d not in {"resume", "out", "threads", "command"}}
    return {f: config[f] for f in fields if f in config}


def build_parser():
    parser = argparse.ArgumentParser(prog="hvae-fast", description="Fast top-down hierarchical VAEs.")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,sample,compare}")
    sub.required = True

    p = sub.add_parser("train", help="train a model (default: the reference recipe on digits)", allow_abbrev=False,
                       description="Train a model. With no options: the reference recipe (two-level top-down "
                                   "VAE, Adamax 1e-3, batch 64, patience 20) on sklearn's digits.")
    _add_training_args(p)
    p.add_argument("--out", default="hvae-run", metavar="DIR",
                   help="output directory: checkpoints, metrics.jsonl, PNGs, summary.json (default hvae-run)")

    p = sub.add_parser("eval", help="evaluate a checkpoint on the test set",
                       description="Test -ELBO, importance-weighted NLL, bits/dim, KL per level, active units.")
    p.add_argument("checkpoint", help="a best.pt or last.pt written by `hvae-fast train`")
    p.add_argument("--iw-samples", type=_nonneg_int, default=1000, help="importance samples (default 1000)")
    p.add_argument("--iw-subset", type=_positive_int, default=None, metavar="N",
                   help="the IW-NLL on N images of the split drawn at random (seeded by --seed), with its "
                        "standard error (default: all of them)")
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="evaluate on this source's split instead (as train's --data; split as the run did)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--backend", choices=("fused", "torch"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    _add_eval_memory(p)
    _add_device(p)
    _add_common(p)

    p = sub.add_parser("sample", help="draw new images from a checkpoint into a PNG grid")
    p.add_argument("checkpoint")
    p.add_argument("-n", "--num", type=_positive_int, default=64, help="number of images (default 64)")
    p.add_argument("--temperature", type=_nonneg_float, default=1.0, metavar="T",
                   help="every prior standard deviation times T (default 1; below 1: smoother, more typical)")
    p.add_argument("--conditional", action="store_true",
                   help="instead: for -n test images, one row per k of samples that keep the posterior's top k "
                        "levels and draw the rest from the prior, drawn as E[x | z] (what each level encodes); "
                        "top-down models")
    p.add_argument("--out", default="samples.png", metavar="PNG")
    p.add_argument("--seed", type=int, default=0)
    _add_device(p)
    _add_common(p)

    p = sub.add_parser("compare", help="top-down vs bottom-up vs one-level VAE at one or more depths",
                       description="Train the top-down VAE, the bottom-up VAE (q(z1|x)q(z2|z1)...) and the "
                                   "one-level VAE with the recipe on --data (default: digits), the hierarchies at "
                                   "each --levels count with the same priors, decoder and latent sizes, and print "
                                   "a table with one row per model and depth: test -ELBO, IW-NLL, KL per level and "
                                   "KL-active units per level.")
    p.add_argument("--levels", type=_positive_int, nargs="+", default=[2], metavar="N",
                   help="level counts of topdown and bottomup, each trained at each (default 2); onelevel "
                        "always has 1, bottomup at least 2")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--models", nargs="+", choices=("topdown", "bottomup", "onelevel"),
                   default=["topdown", "bottomup", "onelevel"])
    p.add_argument("--out", default=None, metavar="DIR", help="write compare.json (and each run) here")
    _add_training_args(p, single=False)
    return parser


def _check_out_dir(parser, path, what="--out"):
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".hvae-write-test-"):
            pass
    except OSError as e:
        parser.error(f"{what} {path}: cannot write there ({e.strerror or e})")


def _check_file(parser, path, what):
    if path is not None and not os.path.isfile(path):
        parser.error(f"{what} {path}: no such file")


def _check_data(parser, source):
    """--data: a known name, a folder or a file."""
    if source is not None and source not in _data.NAMED and not os.path.exists(source):
        parser.error(f"--data {source}: no such file or folder (or one of: {', '.join(_data.NAMED)})")


def _config(args, **over):
    c = _train.TrainConfig(
        model=getattr(args, "model", "topdown"), levels=getattr(args, "levels", 2),
        arch=getattr(args, "arch", "mlp"), conv_channels=getattr(args, "conv_channels", 32),
        latent_channels=getattr(args, "latent_channels", 8), groups=list(getattr(args, "groups", [1, 2, 2])),
        latent_dims=getattr(args, "latent_dims", None), L=args.L, hidden=args.hidden,
        conv=getattr(args, "conv", False), likelihood=args.likelihood,
        backend=args.backend, in_kernel_noise=getattr(args, "in_kernel_noise", False),
        data=args.data, val_size=args.val_size, shuffle_seed=args.shuffle_seed, binarize=args.binarize,
        threshold=args.threshold, num_vals=args.num_vals, max_train=args.max_train, epochs=args.epochs,
        patience=args.patience, lr=args.lr, batch_size=args.batch_size, kl_warmup=args.kl_warmup,
        iw_train=args.iw_train, val_iw=args.val_iw, weight_decay=args.weight_decay,
        lr_drops=args.lr_drops, lr_drop_factor=args.lr_drop_factor, dropout=args.dropout,
        grad_clip=args.grad_clip, skip_threshold=args.skip_threshold, max_consecutive_skips=args.max_consecutive_skips,
        ema=args.ema, kl_warmup_steps=args.kl_warmup_steps, free_bits=args.free_bits, kl_balance=args.kl_balance,
        lr_warmup_steps=args.lr_warmup_steps, lr_schedule=args.lr_schedule, lr_min_factor=args.lr_min_factor,
        seed=getattr(args, "seed", 0), progress=not args.no_progress,
        precision=getattr(args, "precision", "fp32"), device=getattr(args, "device", "cpu"),
        deterministic=getattr(args, "deterministic", False), iw_samples=args.iw_samples, iw_subset=args.iw_subset,
        eval_memory_mb=args.eval_memory)
    for k, v in over.items():
        setattr(c, k, v)
    return c


def _fmt_eval(r):
    lines = [f"test -ELBO        {r['neg_elbo']:.2f} nats  ({r['bpd_elbo']:.3f} bits/dim)",
             f"  log p(x|z1)     {r['log_px']:.2f}",
             "  KL per level    " + "  ".join(f"z{i + 1}: {k:.2f}" for i, k in enumerate(r["kl"]))]
    if "iw_nll" in r:
        lines.append(f"test IW-NLL       {r['iw_nll']:.2f} +- {r['iw_nll_se']:.2f} nats  ({r['bpd']:.3f} bits/dim, "
                     f"K = {r['iw_samples']}, on {r['iw_n']} of {r['n']} images)")
    lines.append("active units      " + "  ".join(f"z{i + 1}: {a}/{d}" for i, (a, d) in
                                                 enumerate(zip(r["active_units"], r["latent_dims"])))
                 + "  (KL > 0.01 nats; by posterior-mean variance: "
                 + ", ".join(str(a) for a in r.get("active_units_cov", [])) + ")")
    return "\n".join(lines)


def _train_and_report(config, out, resume=None, ctx=None, overrides=None):
    res = _train.train(None if resume else config, out=out, resume=resume, ctx=ctx, overrides=overrides,
                       log=lambda m: print(f"hvae-fast: {m}", file=sys.stderr))
    if ctx is not None and not ctx.is_main:
        return None  # rank 0 evaluates and writes
    model, ds = res["model"], res["dataset"]
    iw_samples, seed_eval = res["config"].iw_samples, res["config"].seed  # the run's, also when resumed
    device = next(model.parameters()).device
    summary = {"config": res["config"].to_dict(), "epochs": res["epochs"], "stopped": res["stopped"],
               "best_val": res["best_val"], "best_epoch": res["best_epoch"], "train_time_s": res["train_time_s"],
               "parameters": sum(p.numel() for p in model.parameters()), "complete": False}

    def write():  # after each stage: a crash later never loses what the run has
        if out is not None:
            summary["files"] = {k: os.path.abspath(v) for k, v in {**res["paths"], **pngs}.items()}
            _train.atomic_write_json(summary, os.path.join(out, "summary.json"))

    pngs = {}
    write()
    if out is not None:  # the pictures first: cheap, and kept if the long evaluation fails
        from . import plots
        shape = picture_shape(res["config"])
        torch.manual_seed(seed_eval)
        pngs.update(samples=plots.save_samples(model.sample(64), os.path.join(out, "samples.png"), shape,
                                               ds.num_vals),
                    reconstructions=plots.save_reconstructions(
                        ds.test[:16], model.reconstruct(ds.batch(ds.test[:16], device, "test")).detach(),
                        os.path.join(out, "reconstructions.png"), shape, ds.num_vals),
                    val_curve=plots.save_curve(res["history"], os.path.join(out, "val_curve.png")),
                    kl_per_level=plots.save_kl(res["history"], os.path.join(out, "kl_per_level.png")))
        if hasattr(model, "conditional_sample"):
            pngs["conditional"] = plots.save_conditional(*conditional_rows(model, ds, 10), os.path.join(
                out, "conditional.png"), shape, ds.num_vals)
        write()
    t = time.perf_counter()
    memory = res["config"].eval_memory_mb * 2**20
    for test in _eval.evaluate_steps(model, ds.test, iw_samples=iw_samples, seed=seed_eval, memory=memory,
                                     iw_subset=res["config"].iw_subset):
        summary["test"] = dict(test)
        summary["eval_time_s"] = time.perf_counter() - t
        write()
    summary["complete"] = True
    write()
    return summary


def cmd_train(args, parser):
    if args.model not in ("topdown", "bottomup") and (args.levels != 2 or args.latent_dims):
        parser.error("--levels and --latent-dims apply to --model topdown and bottomup only")
    if args.model != "topdown" and args.conv:
        parser.error("--conv applies to --model topdown only")
    if args.model == "bottomup" and args.levels < 2:
        parser.error("--model bottomup needs --levels >= 2 (one level is --model onelevel)")
    if args.arch == "resnet" and (args.model != "topdown" or args.conv or args.levels != 2 or args.latent_dims):
        parser.error("--arch resnet is a topdown model of its own: its levels are --groups; drop --model, --conv, "
                     "--levels and --latent-dims")
    if sum(args.groups) < 1:
        parser.error("--groups needs at least one latent group")
    if args.latent_dims and len(args.latent_dims) != args.levels:
        parser.error(f"--latent-dims needs {args.levels} sizes (one per level), got {len(args.latent_dims)}")
    if args.dropout and (args.model != "topdown" or args.conv):
        parser.error("--dropout applies to --model topdown without --conv only")
    if args.dropout >= 1:
        parser.error(f"--dropout must be below 1, got {args.dropout}")
    if args.iw_train > 1 and args.kl_warmup > 0:
        parser.error("--iw-train > 1 and --kl-warmup cannot be combined")
    if args.iw_train > 1 and (args.kl_warmup_steps or args.free_bits or args.kl_balance):
        parser.error("--iw-train > 1 cannot be combined with --kl-warmup-steps, --free-bits or --kl-balance")
    if args.kl_warmup and args.kl_warmup_steps:
        parser.error("--kl-warmup (epochs) and --kl-warmup-steps: give one")
    _check_data(parser, args.data)
    _check_file(parser, args.resume, "--resume")
    _device(parser, args.device)
    _check_out_dir(parser, args.out)
    config = _config(args)
    typed = typed_options(parser, args.argv)
    overrides = resume_overrides(args, typed) if args.resume else None
    if not args.resume and args.data in _train.RECIPES:
        config, taken = with_recipe(config, args.data, typed)
        if taken:
            print(f"hvae-fast: the {args.data} recipe: " + ", ".join(f"{k} {v}" for k, v in taken.items())
                  + " (options on the command line win)", file=sys.stderr)
    ctx = _dist.setup()  # None unless run under torchrun
    try:
        summary = _train_and_report(config, args.out, args.resume, ctx=ctx, overrides=overrides)
    except _data.DataError as e:
        parser.error(str(e))
    except _train.CheckpointError as e:
        parser.error(str(e))
    except _train.ResumeError as e:
        parser.error(str(e))
    except _train.TrainingDiverged as e:
        print(f"hvae-fast: {e}", file=sys.stderr)
        return 1
    finally:
        _dist.teardown(ctx)
    if summary is None:  # a rank other than 0 under torchrun
        return 0
    arch = summary["config"].get("arch", "mlp")
    print(f"{summary['config']['model']}{'' if arch == 'mlp' else ' (' + arch + ')'}: {summary['epochs']} epochs ({summary['stopped']}) in "
          f"{summary['train_time_s']:.1f} s; best validation "
          f"{'IW bound (K = %d)' % summary['config']['val_iw'] if summary['config'].get('val_iw') else '-ELBO'} "
          f"{summary['best_val']:.2f}")
    print(_fmt_eval(summary["test"]))
    print(f"wrote {args.out}/: best.pt last.pt metrics.jsonl summary.json "
          + " ".join(os.path.basename(f) for k, f in summary["files"].items() if f.endswith(".png")))
    return 0


def cmd_eval(args, parser):
    _check_file(parser, args.checkpoint, "checkpoint")
    _check_data(parser, args.data)
    try:
        model, config = _train.model_from_checkpoint(args.checkpoint, backend=args.backend)
        ds = _train.load_data(dataclasses.replace(config, data=args.data or config.data, max_train=None))
    except (_train.CheckpointError, _data.DataError) as e:
        parser.error(str(e))
    x = getattr(ds, args.split)
    if x.shape[1] != config.D:
        parser.error(f"--data: examples have {x.shape[1]} values, the model expects D = {config.D}")
    model.to(_device(parser, args.device))
    r = _eval.evaluate(model, x, iw_samples=args.iw_samples, seed=args.seed, memory=args.eval_memory * 2**20,
                       iw_subset=args.iw_subset)
    r["checkpoint"] = os.path.abspath(args.checkpoint)
    r["split"] = args.split
    print(_fmt_eval(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


def cmd_sample(args, parser):
    _check_file(parser, args.checkpoint, "checkpoint")
    _check_out_dir(parser, os.path.dirname(os.path.abspath(args.out)))
    try:
        model, config = _train.model_from_checkpoint(args.checkpoint)
    except _train.CheckpointError as e:
        parser.error(str(e))
    if args.conditional and not hasattr(model, "conditional_sample"):
        parser.error(f"--conditional: a {config.model} model has no top-down path to keep levels of")
    from . import plots
    model.to(_device(parser, args.device))
    torch.manual_seed(args.seed)
    if args.conditional:
        try:
            ds = _train.load_data(dataclasses.replace(config, max_train=None))
        except _data.DataError as e:
            parser.error(str(e))
        plots.save_conditional(*conditional_rows(model, ds, args.num, args.temperature), args.out,
                               picture_shape(config), model.num_vals)
        print(f"wrote {args.out} (conditional samples of {args.num} test images, T = {args.temperature})")
        return 0
    x = model.sample(args.num, temperature=args.temperature)
    plots.save_samples(x, args.out, picture_shape(config), model.num_vals,
                       title="samples" if args.temperature == 1 else f"samples, T = {args.temperature:g}")
    print(f"wrote {args.out} ({args.num} samples, T = {args.temperature})")
    return 0


def picture_shape(config):
    """(C, H, W) of the run's images, or None."""
    return (config.image_channels, *config.image_shape) if config.image_shape else None


def conditional_rows(model, ds, n, temperature=1.0):
    """(the first n test images, [(k, E[x | z] keeping the top k levels of each)] for every k):
    the means, since single pixel draws of a 256-way categorical hide the structure."""
    x = ds.test[:n]
    xb = ds.batch(x, next(model.parameters()).device, "test")
    levels = len(model.latent_dims)
    return x, [(k, model.conditional_sample(xb, k, temperature, mean=True)) for k in range(levels + 1)]


def cmd_compare(args, parser):
    if args.out:
        _check_out_dir(parser, args.out)
    _check_data(parser, args.data)
    # (model, levels) rows: onelevel once at 1 level; a one-level bottom-up model would be onelevel
    keys = [(m, n) for m in args.models if m != "onelevel" for n in dict.fromkeys(args.levels)
            if not (m == "bottomup" and n < 2)] + [("onelevel", 1)] * ("onelevel" in args.models)
    if not keys:
        parser.error("nothing to train: bottomup needs --levels >= 2")
    rows = {k: [] for k in keys}
    for seed in args.seeds:
        for m, n in keys:
            config = _config(args, model=m, levels=n, seed=seed, progress=not args.no_progress)
            out = os.path.join(args.out, f"{m}{n if m != 'onelevel' else ''}-seed{seed}") if args.out else None
            try:
                s = _train_and_report(config, out)
            except _data.DataError as e:
                parser.error(str(e))
            rows[m, n].append(s)
            t = s["test"]
            print(f"  {m:9s} {n} levels seed {seed}: test -ELBO {t['neg_elbo']:.2f}"
                  + (f", IW-NLL {t['iw_nll']:.2f}" if "iw_nll" in t else "")
                  + f", {s['epochs']} epochs, {s['train_time_s']:.1f} s", flush=True)
    table = compare_table(rows)
    print(table)
    if args.out:  # as before, {model: [run, ...]}; each run's config says its levels
        runs = {m: [] for m in dict.fromkeys(m for m, _ in keys)}
        for (m, _), ss in rows.items():
            runs[m] += [{k: v for k, v in s.items() if k != "files"} for s in ss]
        with open(os.path.join(args.out, "compare.json"), "w") as f:
            json.dump(runs, f, indent=2)
    return 0


def _mean_range(vals, fmt="{:.2f}"):
    if not vals:
        return "-"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return fmt.format(m)
    return f"{fmt.format(m)} ({fmt.format(min(vals))}-{fmt.format(max(vals))})"


def compare_table(rows):
    """A markdown table: mean (min-max) over seeds of each row's test numbers. rows: {(model,
    levels): [summary, ...]} (or {model: [...]}); each row lists its own levels, z1 first."""
    head = ("| model | levels | parameters | test -ELBO | test IW-NLL | KL per level (z1, z2, ...) | "
            "KL-active units per level | epochs | train s |")
    lines = [head, "|" + "---|" * 9]
    for key, runs in rows.items():
        if not runs:
            continue
        m = key[0] if isinstance(key, tuple) else key
        ts = [r["test"] for r in runs]
        levels = len(ts[0]["kl"])
        kl = ", ".join(_mean_range([t["kl"][i] for t in ts]) for i in range(levels))
        au = ", ".join(_mean_range([t["active_units"][i] for t in ts], "{:.1f}") + f"/{ts[0]['latent_dims'][i]}"
                       for i in range(levels))
        iw = _mean_range([t["iw_nll"] for t in ts]) if all("iw_nll" in t for t in ts) else "-"
        if len(ts) == 1 and "iw_nll_se" in ts[0]:  # one seed: its standard error over the images instead
            iw += f" +- {ts[0]['iw_nll_se']:.2f}"
        lines.append(f"| {m} | {levels} | {_mean_range([r['parameters'] for r in runs], '{:,.0f}')} | "
                     f"{_mean_range([t['neg_elbo'] for t in ts])} | {iw} | {kl} | {au} | "
                     f"{_mean_range([r['epochs'] for r in runs], '{:.0f}')} | "
                     f"{_mean_range([r['train_time_s'] for r in runs], '{:.0f}')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sub = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "compare": cmd_compare}[args.command]
    # parser.error on the subparser would print the top-level usage; use the subcommand's
    sub_parser = parser._subparsers._group_actions[0].choices[args.command]
    return sub(args, sub_parser)


if __name__ == "__main__":
    sys.exit(main())
