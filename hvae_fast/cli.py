"""The `hvae-fast` command: train, eval, sample, compare.

  hvae-fast train                 the reference recipe on digits, into ./hvae-run
  hvae-fast eval RUN/best.pt      test -ELBO, IW-NLL, bpd, KL per level, active units
  hvae-fast sample RUN/best.pt    a PNG grid of new images
  hvae-fast interpolate RUN/best.pt  a PNG grid of interpolations between test images in latent space
  hvae-fast compare               top-down vs bottom-up vs one-level, at one or more depths
"""
import argparse
import dataclasses
import json
import os
import sys
import tempfile

import torch

from . import config
from . import data as _data
from . import distributed as _dist
from . import evaluate as _eval
from . import preempt as _preempt
from . import train as _train
from . import writer as _writer

_positive_int = config.POSITIVE_INT.parse
_nonneg_int = config.NONNEG_INT.parse
_nonneg_float = config.NONNEG.parse
_steps = config.Kind(int, lambda v: v >= 2, ">= 2").parse


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


# what `compare` sets itself, per row
COMPARE_SETS = ("model", "arch", "conv_channels", "latent_channels", "groups", "levels", "latent_dims", "conv",
                "seed")


def settings(typed, resume=False):
    """(a TrainConfig from the typed settings, the recipe's settings it took): a named data
    set's recipe (config.RECIPES) fills what was not typed. For a resume: (None, {})."""
    if resume:
        return None, {}
    name = typed.get("data")
    if name not in config.RECIPES:
        return config.TrainConfig(**typed), {}
    taken = config.recipe_values(name, typed)  # those that act beside the typed ones
    return config.TrainConfig(**{**taken, **typed}), taken


def build_parser():
    parser = argparse.ArgumentParser(prog="hvae-fast", description="Fast top-down hierarchical VAEs.")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,sample,interpolate,compare}")
    sub.required = True

    p = sub.add_parser("train", help="train a model (default: the reference recipe on digits)", allow_abbrev=False,
                       description="Train a model. With no options: the reference recipe (two-level top-down "
                                   "VAE, Adamax 1e-3, batch 64, patience 20) on sklearn's digits. SIGTERM, SIGINT "
                                   "or SIGUSR1 stop training after the current step (under torchrun: every rank, "
                                   "at the same step), write OUT/last.pt with the position inside the epoch, mark "
                                   "summary.json interrupted and exit with status "
                                   f"{_train.EXIT_INTERRUPTED} (EX_TEMPFAIL); --resume OUT/last.pt continues "
                                   "from there.")
    config.add_options(p)
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue RUN/last.pt, in RUN unless --out says otherwise: every setting comes from it; "
                        "only " + ", ".join(config.flag(f) for f in config.RESUME_OVERRIDES) + " may be given")
    _add_common(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory: checkpoints, metrics.jsonl, PNGs, summary.json (default hvae-run; "
                        "with --resume, the checkpoint's folder). One that holds a run is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds a run: delete its files and start a new one there")

    p = sub.add_parser("eval", help="evaluate a checkpoint on the test set",
                       description="Test -ELBO, importance-weighted NLL, bits/dim, KL per level, active units.")
    _add_checkpoint(p)
    p.add_argument("--iw-samples", type=_nonneg_int, default=1000, help="importance samples (default 1000)")
    p.add_argument("--iw-subset", type=_positive_int, default=None, metavar="N",
                   help="the IW-NLL on N images of the split drawn at random (seeded by --seed), with its "
                        "standard error (default: all of them)")
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="evaluate on this source's split instead (as train's --data; split as the run did)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test",
                   help="the split to score (default test); train is binarized once, seeded, where the run drew "
                        "it again every batch (--binarize dynamic)")
    p.add_argument("--weights", choices=_train.WEIGHTS, default="validated",
                   help="validated (default): the model training validated, the EMA of an --ema run; raw: "
                        "last.pt's raw weights")
    p.add_argument("--backend", choices=("fused", "torch"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")
    p.add_argument("--against", default=None, metavar="FILE",
                   help="another model's --json file (or a run's summary.json): also print this model's IW-NLL "
                        "minus that one's on the same images, with its paired standard error")
    _add_eval_memory(p)
    _add_device(p)
    _add_common(p)

    p = sub.add_parser("sample", help="draw new images from a checkpoint into a PNG grid")
    _add_checkpoint(p)
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

    p = sub.add_parser("interpolate", help="interpolate between pairs of test images in latent space, into a PNG",
                       description="For --pairs pairs of test images (drawn at random, seeded by --seed), one row "
                                   "each: image a, --steps images E[x | z] along the line between the two images' "
                                   "posterior means (model.encode) at the top --depth levels, image b. The levels "
                                   "below --depth are image a's posterior means (--rest posterior) or drawn from "
                                   "the prior given the levels above (--rest prior), with the same noise at every "
                                   "step of a row; the picture's title says which.")
    _add_checkpoint(p)
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="take the pairs from this source's test split (as train's --data; default: the run's data)")
    p.add_argument("--depth", type=_positive_int, default=None, metavar="K",
                   help="interpolate the top K levels (1 .. the model's levels; default: all of them)")
    p.add_argument("--rest", default="posterior", metavar="{posterior,prior}",
                   help="the levels below --depth: posterior (default), image a's posterior means; prior, drawn "
                        "from the prior given the levels above")
    p.add_argument("--pairs", type=_positive_int, default=4, metavar="N", help="pairs of test images (default 4)")
    p.add_argument("--steps", type=_steps, default=8, metavar="S",
                   help="images along each line, both ends included (>= 2, default 8)")
    p.add_argument("--out", default="interpolations.png", metavar="PNG")
    p.add_argument("--seed", type=int, default=0, help="picks the pairs and seeds the prior's draws (default 0)")
    _add_device(p)
    _add_common(p)

    p = sub.add_parser("compare", help="top-down vs bottom-up vs one-level VAE at one or more depths",
                       description="Train the top-down VAE, the bottom-up VAE (q(z1|x)q(z2|z1)...) and the "
                                   "one-level VAE with the recipe on --data (default: digits), the hierarchies at "
                                   "each --levels count with the same priors, decoder and latent sizes, and print "
                                   "a table with one row per model and depth: test -ELBO, IW-NLL, KL per level and "
                                   "KL-active units per level.")
    p.add_argument("--levels", dest="level_counts", type=_positive_int, nargs="+", default=None, metavar="N",
                   help="level counts of topdown and bottomup, each trained at each (default 2); onelevel "
                        "always has 1, bottomup at least 2")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--models", nargs="+", choices=("topdown", "bottomup", "onelevel"),
                   default=["topdown", "bottomup", "onelevel"])
    p.add_argument("--out", default=None, metavar="DIR", help="write compare.json (and each run) here")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds a comparison or runs of these rows: delete their files and start again")
    config.add_options(p, exclude=COMPARE_SETS)
    _add_common(p)
    return parser


def _check_out_dir(parser, path, what="--out"):
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".hvae-write-test-"):
            pass
    except OSError as e:
        parser.error(f"{what} {path}: cannot write there ({e.strerror or e})")


def _add_checkpoint(p):
    from ._pretrained import pretrained_names
    p.add_argument("checkpoint", nargs="?", help="a best.pt or last.pt written by `hvae-fast train` (or --pretrained)")
    p.add_argument("--pretrained", default=None, metavar="NAME",
                   help="instead of a checkpoint file, a model shipped with the package: "
                        + (", ".join(pretrained_names()) or "none in this install"))


def _checkpoint(parser, args):
    """The checkpoint file the command reads: the one given, or the shipped model --pretrained names."""
    from ._pretrained import pretrained_path
    if (args.checkpoint is None) == (args.pretrained is None):
        parser.error("give a checkpoint file or --pretrained NAME (one of the two)")
    if args.pretrained is not None:
        try:
            return str(pretrained_path(args.pretrained))
        except ValueError as e:
            parser.error(f"--pretrained: {e}")
    _check_file(parser, args.checkpoint, "checkpoint")
    return args.checkpoint


def _check_file(parser, path, what):
    if path is not None and not os.path.isfile(path):
        parser.error(f"{what} {path}: no such file")


def _check_data(parser, source):
    """--data: a known name, a folder or a file."""
    if source is not None and source not in _data.NAMED and not os.path.exists(source):
        parser.error(f"--data {source}: no such file or folder (or one of: {', '.join(_data.NAMED)})")


def _fmt_eval(r, split="test"):
    lines = [f"{split + ' -ELBO':<18}{r['neg_elbo']:.2f} nats  ({r['bpd_elbo']:.3f} bits/dim)",
             f"  log p(x|z1)     {r['log_px']:.2f}",
             "  KL per level    " + "  ".join(f"z{i + 1}: {k:.2f}" for i, k in enumerate(r["kl"]))]
    if "iw_nll" in r:
        lines.append(f"{split + ' IW-NLL':<18}{r['iw_nll']:.2f} +- {r['iw_nll_se']:.2f} nats  "
                     f"({r['bpd']:.3f} bits/dim, K = {r['iw_samples']}, on {r['iw_n']} of {r['n']} images)")
    lines.append("active units      " + "  ".join(f"z{i + 1}: {a}/{d}" for i, (a, d) in
                                                 enumerate(zip(r["active_units"], r["latent_dims"])))
                 + "  (KL > 0.01 nats; by posterior-mean variance: "
                 + ", ".join(str(a) for a in r.get("active_units_cov", [])) + ")")
    return "\n".join(lines)


def _log(message):
    print(f"hvae-fast: {message}", file=sys.stderr)


def cmd_train(args, parser):
    typed = config.typed_settings(args)
    _check_data(parser, typed.get("data"))
    _check_file(parser, args.resume, "--resume")
    _device(parser, typed.get("device", "cpu"))
    out = args.out or ((os.path.dirname(args.resume) or ".") if args.resume else "hvae-run")
    _check_out_dir(parser, out)
    cfg, taken = settings(typed, resume=args.resume is not None)
    recipe = f"the {cfg.data} recipe: " + ", ".join(f"{config.flag(k)} {v}" for k, v in taken.items()) if taken else ""
    try:
        if cfg is not None:
            cfg.check(name=config.flag, given=typed)  # what was typed is given, a recipe's values not
    except config.SettingError as e:
        parser.error(e.named(config.flag) + (f" ({recipe})" if recipe else ""))
    if taken:
        _log(recipe + " (options on the command line win)")
    ctx = _dist.setup()  # None unless run under torchrun
    # the signal handlers stay until the ranks have left the process group: once one rank exits,
    # torchrun's agent sends SIGTERM to the others, which are then exiting with the same status
    stop, held, agreed = _train.StopSignals().__enter__(), False, False
    try:
        summary = _train.run(cfg, out=out, resume=args.resume, ctx=ctx, log=_log,
                             overrides=typed if args.resume else None, overwrite=args.overwrite)
        agreed = True
    except (config.SettingError, config.ResumeError) as e:  # the data-dependent checks, a resume's
        parser.error(e.named(config.flag))
    except (_data.DataError, _train.CheckpointError, _train.RunExistsError) as e:
        parser.error(str(e))
    except _train.TrainingDiverged as e:  # every rank saw it at the same step (all_sum)
        agreed = True
        _log(str(e))
        return 1
    except _train.TrainingInterrupted as e:
        agreed = True
        if ctx is None or ctx.is_main:
            _log(str(e))
        if ctx is not None:  # a rank ignores them until its process ends
            _preempt.ignore_stop_signals()
            held = True
        return _train.EXIT_INTERRUPTED
    finally:
        stop.immediate = False  # run() is over: a signal from here on changes nothing
        _dist.teardown(ctx, together=agreed)
        if not held:
            stop.__exit__(None, None, None)
    if summary is None:  # a rank other than 0 under torchrun
        return 0
    c = summary["config"]
    print(f"{c['model']}{'' if c['arch'] == 'mlp' else ' (' + c['arch'] + ')'}: {summary['epochs']} epochs "
          f"({summary['stopped']}) in {summary['train_time_s']:.1f} s; best validation "
          f"{'IW bound (K = %d)' % c['val_iw'] if c['val_iw'] else '-ELBO'} {summary['best_val']:.2f}")
    print(_fmt_eval(summary["test"]))
    written = [os.path.basename(f) for f in summary["files"].values()]  # those there: best.pt may not be yet
    print(f"wrote {out}/: " + " ".join([n for n in ("best.pt", "last.pt", "metrics.jsonl") if n in written]
                                       + ["summary.json"] + [n for n in written if n.endswith(".png")])
          + (f" {_writer.TENSORBOARD}/" if c["tensorboard"] else ""))
    return 0


def _run_data(parser, cfg, data=None):
    """The run's data (or `data`'s), split as the run did; usage errors where it cannot be read
    or its examples do not fit the model."""
    try:
        ds = _train.load_data(dataclasses.replace(cfg, data=data or cfg.data, max_train=None))
    except _data.DataError as e:
        parser.error(str(e))
    if ds.test.shape[1] != cfg.D:
        parser.error(f"--data: examples have {ds.test.shape[1]} values, the model expects D = {cfg.D}")
    return ds


def cmd_eval(args, parser):
    path = _checkpoint(parser, args)
    _check_data(parser, args.data)
    other = _against(parser, args.against, args.iw_samples)
    try:
        ck = _train.load_checkpoint(path)
        model, cfg = _train.model_from_checkpoint(ck, backend=args.backend, weights=args.weights)
    except _train.CheckpointError as e:
        parser.error(str(e))
    ds = _run_data(parser, cfg, args.data)
    x = getattr(ds, args.split)
    if args.split == "train" and ds.grey_max is not None:  # grey levels: drawn once, as val and test were
        x = _data.binarize_once(x, ds.grey_max, cfg.seed + 2)
    model.to(_device(parser, args.device))
    r = _eval.evaluate(model, x, iw_samples=args.iw_samples, seed=args.seed, memory=args.eval_memory * 2**20,
                       iw_subset=args.iw_subset)
    r["checkpoint"] = os.path.abspath(path)
    r["split"] = args.split
    r["weights"] = _train.checkpoint_weights(ck, args.weights)[1]
    print(f"scored: {r['weights']}; the {args.split} split")
    print(_fmt_eval(r, args.split))
    if other is not None:
        try:
            r["against"] = {"file": os.path.abspath(args.against), **_eval.paired_difference(r, other)}
        except ValueError as e:
            parser.error(f"--against {args.against}: {e}")
        a = r["against"]
        print(f"minus {args.against}: {a['diff']:+.2f} +- {a['se']:.2f} nats ({a['diff_bpd']:+.4f} +- "
              f"{a['se_bpd']:.4f} bits/dim), paired over the same {a['n']} images")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


def _against(parser, path, iw_samples):
    """The report in --against's file (an eval --json file or a run's summary.json), read
    before the long evaluation so that a bad file fails at once."""
    if path is None:
        return None
    if not iw_samples:
        parser.error("--against compares IW-NLLs; --iw-samples 0 computes none")
    _check_file(parser, path, "--against")
    try:
        with open(path) as f:
            r = json.load(f)
    except (OSError, ValueError) as e:
        parser.error(f"--against {path}: not a JSON report ({e})")
    r = r.get("test", r) if isinstance(r, dict) else r
    if not isinstance(r, dict) or "iw_log_px" not in r or "iw_indices" not in r:
        parser.error(f"--against {path}: holds no per-example IW log-likelihoods (iw_log_px): write it with "
                     f"hvae-fast eval --json, or use the summary.json of a run that computed its IW-NLL")
    return r


def cmd_sample(args, parser):
    path = _checkpoint(parser, args)
    _check_out_dir(parser, os.path.dirname(os.path.abspath(args.out)))
    try:
        model, cfg = _train.model_from_checkpoint(path)
    except _train.CheckpointError as e:
        parser.error(str(e))
    if args.conditional and not hasattr(model, "conditional_sample"):
        parser.error(f"--conditional: a {cfg.model} model has no top-down path to keep levels of")
    from . import plots
    model.to(_device(parser, args.device))
    torch.manual_seed(args.seed)
    if args.conditional:
        ds = _run_data(parser, cfg)
        plots.save_conditional(*plots.conditional_rows(model, ds, args.num, args.temperature), args.out,
                               plots.run_image_shape(cfg), model.num_vals)
        print(f"wrote {args.out} (conditional samples of {args.num} test images, T = {args.temperature})")
        return 0
    x = model.sample(args.num, temperature=args.temperature)
    plots.save_samples(x, args.out, plots.run_image_shape(cfg), model.num_vals,
                       title="samples" if args.temperature == 1 else f"samples, T = {args.temperature:g}")
    print(f"wrote {args.out} ({args.num} samples, T = {args.temperature})")
    return 0


def cmd_interpolate(args, parser):
    path = _checkpoint(parser, args)
    _check_data(parser, args.data)
    _check_out_dir(parser, os.path.dirname(os.path.abspath(args.out)))
    try:
        model, cfg = _train.model_from_checkpoint(path)
    except _train.CheckpointError as e:
        parser.error(str(e))
    from . import plots  # matplotlib loads only where pictures are drawn
    if args.rest not in plots.REST:
        parser.error(f"--rest {args.rest!r}: must be one of {', '.join(plots.REST)}")
    levels = len(model.latent_dims)
    depth = levels if args.depth is None else args.depth
    if depth > levels:
        parser.error(f"--depth {depth}: the model has {levels} latent level(s); give 1 .. {levels}")
    ds = _run_data(parser, cfg, args.data)
    if 2 * args.pairs > len(ds.test):
        parser.error(f"--pairs {args.pairs}: the test split has {len(ds.test)} images, enough for "
                     f"{len(ds.test) // 2} pairs")
    device = _device(parser, args.device)
    model.to(device)
    order = torch.randperm(len(ds.test), generator=torch.Generator().manual_seed(args.seed))[:2 * args.pairs]
    xa, xb = ds.test[order[0::2]], ds.test[order[1::2]]
    rows = plots.interpolations(model, ds.batch(xa, device, "test"), ds.batch(xb, device, "test"), depth,
                                args.steps, args.rest, args.seed)
    plots.save_interpolations(xa, xb, rows, args.out, plots.interpolation_title(depth, levels, args.rest),
                              plots.run_image_shape(cfg), model.num_vals)
    print(f"wrote {args.out} ({args.pairs} pairs, {args.steps} steps, top {depth} of {levels} levels, "
          f"rest: {args.rest if depth < levels else '-'})")
    return 0


def cmd_compare(args, parser):
    if args.out:
        _check_out_dir(parser, args.out)
    _check_data(parser, getattr(args, "data", None))
    # (model, levels) rows: onelevel once at 1 level; a one-level bottom-up model would be onelevel
    if args.level_counts is not None and set(args.models) == {"onelevel"}:
        parser.error("--levels applies to the topdown and bottomup rows; onelevel has 1 level")
    keys = [(m, n) for m in args.models if m != "onelevel" for n in dict.fromkeys(args.level_counts or [2])
            if not (m == "bottomup" and n < 2)] + [("onelevel", 1)] * ("onelevel" in args.models)
    if not keys:
        parser.error("nothing to train: bottomup needs --levels >= 2")
    typed = config.typed_settings(args)
    try:  # every row checked before the first trains
        configs = {(m, n, seed): config.TrainConfig(**typed, model=m, levels=n, seed=seed).check(name=config.flag,
                                                                                                given=typed)
                   for seed in args.seeds for m, n in keys}
    except config.SettingError as e:
        parser.error(e.named(config.flag))
    outs = {(m, n, seed): os.path.join(args.out, f"{m}{n if m != 'onelevel' else ''}-seed{seed}") if args.out
            else None for seed in args.seeds for m, n in keys}
    if args.out and not args.overwrite:  # every row's folder, before the first trains
        held = [p for p in outs.values() if _writer.run_files(p)]
        held += [os.path.join(args.out, "compare.json")] * os.path.exists(os.path.join(args.out, "compare.json"))
        if held:
            parser.error(f"--out {args.out} already holds a comparison ({', '.join(held)}); nothing was written. "
                         f"Use another --out, or --overwrite to delete those files first")
    if args.out and args.overwrite and os.path.exists(os.path.join(args.out, "compare.json")):
        os.unlink(os.path.join(args.out, "compare.json"))
    rows = {k: [] for k in keys}
    for seed in args.seeds:
        for m, n in keys:
            cfg, out = configs[m, n, seed], outs[m, n, seed]
            try:
                s = _train.run(cfg, out=out, log=_log, overwrite=args.overwrite)
            except config.SettingError as e:  # what depends on the data
                parser.error(e.named(config.flag))
            except (_data.DataError, _train.RunExistsError) as e:
                parser.error(str(e))
            except (_train.TrainingInterrupted, _train.TrainingDiverged) as e:
                _log(f"{m} {n} levels seed {seed}: {e}")
                _log("compare stopped: compare.json was not written" + (
                     f"; the rows trained so far are in {args.out}" if args.out and any(rows.values()) else ""))
                return _train.EXIT_INTERRUPTED if isinstance(e, _train.TrainingInterrupted) else 1
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
    """A markdown table: mean (min-max) over seeds of each row's test numbers (the IW-NLL's
    +- is its standard error over the test images, averaged over the seeds). rows: {(model,
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
        if iw != "-" and all("iw_nll_se" in t for t in ts):  # the standard error over the images (seeds: mean)
            iw += f" +- {sum(t['iw_nll_se'] for t in ts) / len(ts):.2f}"
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
    sub = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "interpolate": cmd_interpolate,
           "compare": cmd_compare}[args.command]
    # parser.error on the subparser would print the top-level usage; use the subcommand's
    sub_parser = parser._subparsers._group_actions[0].choices[args.command]
    return sub(args, sub_parser)


if __name__ == "__main__":
    sys.exit(main())
